//! One testcontainers image definition per service the harness runs in containers: [`etcd`],
//! [`openbao`], [`swtpm`] and [`kleidi`] itself, each built locally by `fixtures/images/` (`just
//! images`; no registry) under the tag its module pins. Each module holds the [`Image`] (a `Default`
//! that runs, `with_*` setters) and a started container type whose `start` waits for real readiness
//! — etcd answering a Status RPC, OpenBao unsealed with transit mounted, swtpm answering a TPM
//! command, kleidi answering Status on its socket — never for a fixed time. Containers join only a
//! network the caller names (the harness's own; no port is published on the host) and are removed
//! when dropped. [`engine`] lets testcontainers talk to an engine older than its client. Fault verbs
//! and clusters built from these live in the runtime, not here.
//!
//! [`Image`]: testcontainers::Image

pub mod engine;
pub mod etcd;
pub mod kleidi;
pub mod openbao;
pub mod swtpm;

use std::future::Future;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use testcontainers::runners::AsyncRunner as _;
use testcontainers::{ContainerAsync, ContainerRequest, Image};

pub use etcd::{EtcdContainer, EtcdImage};
pub use kleidi::{KleidiContainer, KleidiImage};
pub use openbao::{OpenBaoContainer, OpenBaoImage};
pub use swtpm::{SwtpmContainer, SwtpmImage};

/// Bound on a container becoming ready: a cold start on a loaded 2-core machine takes seconds.
pub const READY_LIMIT: Duration = Duration::from_secs(60);

/// Every network name this process handed out, for [`crate::runtime::container::remove_own_runs`].
static OWN_NETWORKS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// A fresh network name for [`testcontainers::ImageExt::with_network`]: testcontainers creates it
/// with the first container on it and removes it with the last.
pub fn network_name() -> String {
    let name = format!("kleidi-{}", uuid::Uuid::new_v4().simple());
    OWN_NETWORKS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(name.clone());
    name
}

/// The networks [`network_name`] named in this process, oldest first.
pub fn own_networks() -> Vec<String> {
    OWN_NETWORKS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// Starts `request` on its network (refused without one: nothing joins Docker's default bridge)
/// and answers the container with its address there.
async fn start_on_network<I: Image>(request: ContainerRequest<I>) -> Result<(ContainerAsync<I>, IpAddr)> {
    let Some(network) = request.network().clone() else {
        bail!(
            "{}: give the container a harness network (`.with_network(images::network_name())`)",
            request.image().name()
        );
    };
    let reference = format!("{}:{}", request.image().name(), request.image().tag());
    let container = request
        .start()
        .await
        .with_context(|| format!("starting {reference} on {network} (built? `just images`)"))?;
    let ip = container.get_bridge_ip_address().await?;
    Ok((container, ip))
}

/// Calls `probe` until it succeeds or `limit` passes; then the last error, naming `what`.
pub(crate) async fn poll<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let started = Instant::now();
    loop {
        match probe().await {
            Ok(value) => return Ok(value),
            Err(e) if started.elapsed() > limit => {
                return Err(e.context(format!("{what} not ready after {limit:?}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_module_pins_the_tag_its_build_script_builds() {
        let tags = include_str!("../../../fixtures/images/tags");
        for (name, tag) in [
            (super::etcd::NAME, super::etcd::TAG),
            (super::openbao::NAME, super::openbao::TAG),
            (super::swtpm::NAME, super::swtpm::TAG),
        ] {
            assert!(
                tags.lines().any(|l| l.split_whitespace().eq([name, tag])),
                "fixtures/images/tags lacks `{name} {tag}`"
            );
        }
    }
}
