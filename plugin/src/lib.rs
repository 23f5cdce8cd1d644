//! kleidi: a Kubernetes KMS plugin. kube-apiserver asks it, over gRPC on a Unix socket, to wrap and
//! unwrap its data-encryption seeds with a key-encryption key that never leaves an external key
//! service (a PKCS#11 HSM, Vault/OpenBao transit, a TPM).
//!
//! Reading order: [`service`] (the backend trait every backend implements) → [`backend`] (the key
//! services) → [`guard`] and [`health`] (layers around any backend) → [`grpc`] (proto ↔ service
//! types, nothing else) → [`server`] (the socket) → [`config`] (flags). Errors live in [`error`]; what logs look like, in [`logging`].

#![forbid(unsafe_code)]

pub mod authority;
pub mod backend;
pub mod config;
pub mod credfile;
pub mod error;
pub mod grpc;
pub mod guard;
pub mod health;
pub mod logging;
pub mod process;
pub mod server;
pub mod service;

pub use error::{Error, Result};
pub use service::{Encrypted, KeyService};

/// Generated protobuf and gRPC code (server and client) for the services kube-apiserver calls.
pub mod proto {
    /// `v2.KeyManagementService` (kubernetes/kms apis/v2).
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod v2 {
        tonic::include_proto!("v2");
    }
    /// `v1beta1.KeyManagementService` (kubernetes/kms apis/v1beta1), deprecated upstream.
    #[allow(missing_docs, deprecated, clippy::all, clippy::pedantic)]
    pub mod v1beta1 {
        tonic::include_proto!("v1beta1");
    }
    /// kleidi's own wrapping of a KMS v1 `cipher` (key_id and annotations travel inside it).
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod envelope {
        tonic::include_proto!("kleidi.v1beta1");
    }
}
