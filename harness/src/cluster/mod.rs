//! Tools a user points at a cluster's API (any: a real kube-apiserver or the harness's
//! [`crate::kubeapi`]) through kube-rs, with raw etcd beside it to see what was stored: [`verify`]
//! proves a Secret written through the API lands encrypted by the expected provider and key;
//! [`rewrite`] is the storage migration after a KEK rotation, finished by an audit.

pub mod rewrite;
pub mod verify;

use std::path::Path;

use anyhow::{Context as _, Result};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// A client from a kubeconfig file (its current context), or with `None` the standard chain
/// (`$KUBECONFIG`, `~/.kube/config`, in-cluster service account).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using {}", path.display()))?
        }
        None => Config::infer().await.context("no kubeconfig found")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// Whether a kube-rs error is the API's `Status` with `code`.
pub fn is_status(err: &kube::Error, code: u16) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == code)
}
