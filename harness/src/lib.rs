//! kleidi-harness: plays kube-apiserver's KMS v2 role against kleidi byte for byte, so scenarios can
//! check what really lands in etcd. [`apiserver`] holds the envelope (writes, reads, rotation, cache),
//! the stored format, the plugin client, raw etcd access and the audit of raw etcd values;
//! [`runtime`] starts the real components (etcd, a SoftHSM token, `kleidi serve`) and holds their
//! fault verbs. The `kleidi-harness` binary (`src/main.rs`) puts both behind a CLI.

#![forbid(unsafe_code)]

pub mod apiserver;
pub mod cluster;
pub mod conformance;
pub mod images;
pub mod kubeapi;
pub mod runtime;
pub mod scenario;

pub use apiserver::audit;
pub use apiserver::{Envelope, Error};
