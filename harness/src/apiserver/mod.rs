//! The kube-apiserver side of KMS v2, byte for byte: what it stores in etcd and how it talks to the
//! plugin. Reading order: [`envelope`] (writes, reads, probe and rotation) → [`encrypted_object`] (the
//! stored message, validation, cache key) → [`aes`] (the two data layouts) → [`kms`] (the plugin
//! client and the upstream test KEK) → [`inputs`] (randomness, clock). [`object`] builds and parses the
//! Secrets that get encrypted; [`audit`] classifies raw etcd values without decrypting; [`store`] moves raw bytes in and out of etcd. Processes
//! (etcd, the plugin) live in the runtime, not here.

pub mod aes;
pub mod audit;
pub mod encrypted_object;
pub mod envelope;
mod error;
pub mod inputs;
pub mod kms;
pub mod object;
pub mod store;

pub use envelope::{Envelope, Probe, Stats};
pub use error::Error;
pub use kms::{Authority, Base64Kek, GrpcKms, KmsClient, connect_unix, connect_unix_lazy};
pub use store::{Apiservers, EtcdStore, EtcdTls, Page, Storage, StoreError, Versioned};
