//! kleidi-harness: plays kube-apiserver's KMS v2 role against kleidi byte for byte, so scenarios can
//! check what really lands in etcd. [`apiserver`] holds the envelope (writes, reads, rotation, cache),
//! the stored format, the plugin client and the audit of raw etcd values; [`audit`] is re-exported at
//! the root for the CLI.

#![forbid(unsafe_code)]

pub mod apiserver;

pub use apiserver::audit;
pub use apiserver::{Envelope, Error};
