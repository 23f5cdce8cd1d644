//! The container runtime: the same components as the process runtime, as containers on a Docker
//! network the run creates and removes (images from `fixtures/images/`, no registry). What a
//! process cannot do, a container can: leave a network and come back ([`ContainerHandle::disconnect`]),
//! lose one member of a Raft or etcd cluster. [`openbao_raft`] and [`etcd_cluster`] are the
//! three-node clusters, [`kleidi_node`] a control-plane node's plugin with its socket on the host.
//! Every container carries [`RUN_LABEL`], so a test can prove that nothing outlives a run.

pub mod etcd_cluster;
pub mod kleidi_node;
pub mod openbao_raft;
pub mod swtpm_node;

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use testcontainers::bollard::Docker;
use testcontainers::bollard::models::{NetworkConnectRequest, NetworkDisconnectRequest};
use testcontainers::bollard::query_parameters::{
    InspectContainerOptions, KillContainerOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptions,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, StartContainerOptions, StopContainerOptionsBuilder,
};

/// Bound on the engine reporting a killed container stopped.
const EXIT_LIMIT: Duration = Duration::from_secs(20);

/// The label every container of a harness run carries (value: the run's network name).
pub const RUN_LABEL: &str = "io.kleidi.harness.run";

/// The engine client, through [`crate::images::engine`]'s relay when the engine is older than
/// testcontainers' client (the caller set `DOCKER_HOST` before the runtime started).
pub fn docker() -> Result<Docker> {
    Docker::connect_with_local_defaults().context("connecting to the Docker engine")
}

/// The fault verbs on one container, by id: what `docker kill/stop/start/pause/unpause` and
/// `docker network disconnect/connect` do. Cheap to clone; the container's owner removes it.
#[derive(Clone)]
pub struct ContainerHandle {
    docker: Docker,
    id: String,
    name: String,
}

impl std::fmt::Debug for ContainerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerHandle")
            .field("id", &self.id)
            .field("name", &self.name)
            .finish()
    }
}

impl ContainerHandle {
    /// The handle of container `id`, called `name` in errors.
    pub fn new(id: &str, name: &str) -> Result<Self> {
        Ok(ContainerHandle {
            docker: docker()?,
            id: id.into(),
            name: name.into(),
        })
    }

    /// What errors call it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The container id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// SIGKILL its main process (a paused container's too) and waits until the engine reports it
    /// stopped: the container stops, its filesystem stays.
    pub async fn kill(&self) -> Result<()> {
        let options = KillContainerOptionsBuilder::new().signal("KILL").build();
        self.docker
            .kill_container(&self.id, Some(options))
            .await
            .with_context(|| format!("kill {}", self.name))?;
        crate::images::poll("a killed container to stop", EXIT_LIMIT, || async {
            match self.is_running().await? {
                true => anyhow::bail!("{} still runs", self.name),
                false => Ok(()),
            }
        })
        .await
    }

    /// SIGTERM, SIGKILL after `grace`; the exit code.
    pub async fn stop(&self, grace: Duration) -> Result<Option<i64>> {
        let options = StopContainerOptionsBuilder::new()
            .t(i32::try_from(grace.as_secs()).unwrap_or(10))
            .build();
        self.docker
            .stop_container(&self.id, Some(options))
            .await
            .with_context(|| format!("stop {}", self.name))?;
        Ok(self.exit_code().await?.flatten())
    }

    /// Starts it again (same container, same filesystem, same command).
    pub async fn start(&self) -> Result<()> {
        self.docker
            .start_container(&self.id, None::<StartContainerOptions>)
            .await
            .with_context(|| format!("start {}", self.name))
    }

    /// Freezes every process in it (cgroup freezer): calls to it hang.
    pub async fn pause(&self) -> Result<()> {
        self.docker
            .pause_container(&self.id)
            .await
            .with_context(|| format!("pause {}", self.name))
    }

    /// Thaws it.
    pub async fn resume(&self) -> Result<()> {
        self.docker
            .unpause_container(&self.id)
            .await
            .with_context(|| format!("unpause {}", self.name))
    }

    /// Whether its main process runs (a paused container does).
    pub async fn is_running(&self) -> Result<bool> {
        Ok(self.exit_code().await?.is_none())
    }

    /// `None` while it runs; `Some(exit code)` once it stopped.
    pub async fn exit_code(&self) -> Result<Option<Option<i64>>> {
        let inspect = self
            .docker
            .inspect_container(&self.id, None::<InspectContainerOptions>)
            .await
            .with_context(|| format!("inspect {}", self.name))?;
        let state = inspect.state.unwrap_or_default();
        Ok(if state.running.unwrap_or(false) {
            None
        } else {
            Some(state.exit_code)
        })
    }

    /// Takes it off `network`: every peer there is unreachable, and it is unreachable from them.
    pub async fn disconnect(&self, network: &str) -> Result<()> {
        let request = NetworkDisconnectRequest {
            container: self.id.clone(),
            force: Some(true),
        };
        self.docker
            .disconnect_network(network, request)
            .await
            .with_context(|| format!("disconnect {} from {network}", self.name))
    }

    /// Puts it back on `network` (it may get another address there; peers reach it by name).
    pub async fn connect(&self, network: &str) -> Result<()> {
        let request = NetworkConnectRequest {
            container: self.id.clone(),
            endpoint_config: None,
        };
        self.docker
            .connect_network(network, request)
            .await
            .with_context(|| format!("connect {} to {network}", self.name))
    }

    /// Its address on `network`, if it is on it.
    pub async fn ip(&self, network: &str) -> Result<Option<IpAddr>> {
        let inspect = self
            .docker
            .inspect_container(&self.id, None::<InspectContainerOptions>)
            .await
            .with_context(|| format!("inspect {}", self.name))?;
        let ip = inspect
            .network_settings
            .and_then(|s| s.networks)
            .and_then(|mut n| n.remove(network))
            .and_then(|e| e.ip_address)
            .filter(|ip| !ip.is_empty());
        ip.map(|ip| {
            ip.parse()
                .with_context(|| format!("{} address {ip:?}", self.name))
        })
        .transpose()
    }

    /// Everything it wrote on stdout and stderr, across restarts.
    pub async fn logs(&self) -> Result<Vec<u8>> {
        use tokio_stream::StreamExt as _;
        let options = LogsOptionsBuilder::new().stdout(true).stderr(true).build();
        let mut stream = self.docker.logs(&self.id, Some(options));
        let mut out = Vec::new();
        // Bounded: without `follow` the engine ends the stream at the log's end.
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(
                &chunk
                    .with_context(|| format!("logs of {}", self.name))?
                    .into_bytes(),
            );
        }
        Ok(out)
    }
}

/// The gateway address of `network`: the host as the network's containers reach it (where the
/// harness's fault proxies listen for them).
pub async fn gateway(network: &str) -> Result<IpAddr> {
    let inspect = docker()?
        .inspect_network(
            network,
            None::<testcontainers::bollard::query_parameters::InspectNetworkOptions>,
        )
        .await
        .with_context(|| format!("inspect network {network}"))?;
    let gateway = inspect
        .ipam
        .and_then(|ipam| ipam.config)
        .unwrap_or_default()
        .into_iter()
        .find_map(|c| c.gateway)
        .with_context(|| format!("network {network} has no gateway"))?;
    gateway
        .parse()
        .with_context(|| format!("network {network} gateway {gateway:?}"))
}

/// Containers of the harness on this engine now (any run): their names.
pub async fn labelled_containers() -> Result<Vec<String>> {
    let list = containers_labelled(&docker()?, RUN_LABEL.to_string()).await?;
    Ok(list
        .into_iter()
        .flat_map(|c| c.names.unwrap_or_default())
        .collect())
}

/// Every container, running or not, matching the engine's label filter `filter` (`key` or
/// `key=value`).
async fn containers_labelled(
    docker: &Docker,
    filter: String,
) -> Result<Vec<testcontainers::bollard::models::ContainerSummary>> {
    use std::collections::HashMap;
    let filters = HashMap::from([("label".to_string(), vec![filter])]);
    let options = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    Ok(docker.list_containers(Some(options)).await?)
}

/// Force-removes every container of every run this process started, then those runs' networks,
/// and answers the names of the containers it removed. For an interrupted run: its containers'
/// owners may still be held by tasks the runtime drops only at shutdown, when an engine call can no
/// longer complete. A container or network already gone is not an error.
pub async fn remove_own_runs() -> Result<Vec<String>> {
    let networks = crate::images::own_networks();
    if networks.is_empty() {
        return Ok(Vec::new());
    }
    let docker = docker()?;
    let mut removed = Vec::new();
    for network in networks {
        let list = containers_labelled(&docker, format!("{RUN_LABEL}={network}"))
            .await
            .with_context(|| format!("listing the containers of {network}"))?;
        for container in list {
            let Some(id) = container.id else { continue };
            let options = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
            match docker.remove_container(&id, Some(options)).await {
                Ok(()) => removed.extend(container.names.unwrap_or_default()),
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e).with_context(|| format!("removing container {id}")),
            }
        }
        match docker.remove_network(&network).await {
            Ok(()) => {}
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(e).with_context(|| format!("removing network {network}")),
        }
    }
    Ok(removed)
}

/// Whether the engine said 404: what was to be removed is already gone.
fn not_found(e: &testcontainers::bollard::errors::Error) -> bool {
    matches!(
        e,
        testcontainers::bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }
    )
}

/// Networks named as the harness names its own ([`crate::images::network_name`]).
pub async fn harness_networks() -> Result<Vec<String>> {
    let list = docker()?.list_networks(None::<ListNetworksOptions>).await?;
    Ok(list
        .into_iter()
        .filter_map(|n| n.name)
        .filter(|n| n.starts_with("kleidi-"))
        .collect())
}
