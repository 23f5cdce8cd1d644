//! The Kubernetes API for Secrets, served over the harness's apiserver envelope: what `kubectl`,
//! client-go, kube-rs or the Python client talk to when there is no cluster. Reading order:
//! [`server`] (routes, discovery, [`ApiServer`], the kubeconfig) → [`secrets`] (create/get/list/update/
//! delete with resourceVersions, validation, continue tokens) → [`status`] (the `Status` errors).
//! Storage is [`crate::apiserver`]'s: protobuf Secrets under `/registry/secrets/<ns>/<name>`, KMS v2
//! envelope, etcd. Only Secrets: every other path answers a `Status` 404.

pub mod secrets;
pub mod server;
pub mod status;

pub use secrets::{ListPage, Secrets};
pub use server::{ApiServer, kubeconfig, router};
pub use status::ApiError;
