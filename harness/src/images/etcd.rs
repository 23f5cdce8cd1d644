//! etcd in a container (`kleidi-etcd`, Debian's etcd-server): one member by default, a member of a
//! cluster with [`EtcdImage::with_name`], [`EtcdImage::with_advertise_host`] and
//! [`EtcdImage::with_initial_cluster`]. Ready when the member answers a maintenance Status RPC.

use std::borrow::Cow;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::Result;
use testcontainers::core::WaitFor;
use testcontainers::{ContainerAsync, ContainerRequest, Image};

use super::{READY_LIMIT, poll, start_on_network};

/// The image `fixtures/images/etcd.sh` builds.
pub const NAME: &str = "kleidi-etcd";
/// Its pinned tag (`fixtures/images/tags`).
pub const TAG: &str = "3.4.23";
/// The client port inside the container.
pub const CLIENT_PORT: u16 = 2379;

/// `etcd` with its member name, advertised host and initial cluster.
#[derive(Clone, Debug)]
pub struct EtcdImage {
    args: Vec<String>,
    name: String,
    host: String,
    initial_cluster: Option<String>,
    existing: bool,
}

impl Default for EtcdImage {
    /// A single member `default` that advertises 127.0.0.1: no name needs resolving.
    fn default() -> Self {
        let mut image = EtcdImage {
            args: Vec::new(),
            name: "default".into(),
            host: "127.0.0.1".into(),
            initial_cluster: None,
            existing: false,
        };
        image.args = image.command();
        image
    }
}

impl EtcdImage {
    /// The member name (`--name`).
    pub fn with_name(mut self, name: &str) -> Self {
        self.name = name.into();
        self.args = self.command();
        self
    }

    /// The host other members and clients reach this one at (its container name on the network).
    pub fn with_advertise_host(mut self, host: &str) -> Self {
        self.host = host.into();
        self.args = self.command();
        self
    }

    /// `--initial-cluster`: `name=http://host:2380,…` of every member; default this one alone.
    pub fn with_initial_cluster(mut self, cluster: &str) -> Self {
        self.initial_cluster = Some(cluster.into());
        self.args = self.command();
        self
    }

    /// Joins a running cluster (`--initial-cluster-state existing`) instead of forming one.
    pub fn with_existing_cluster(mut self) -> Self {
        self.existing = true;
        self.args = self.command();
        self
    }

    fn command(&self) -> Vec<String> {
        let (name, host) = (&self.name, &self.host);
        let peer = format!("http://{host}:2380");
        let cluster = self
            .initial_cluster
            .clone()
            .unwrap_or_else(|| format!("{name}={peer}"));
        let state = if self.existing { "existing" } else { "new" };
        [
            "--name",
            name,
            "--data-dir",
            "/var/lib/etcd/data",
            "--listen-client-urls",
            "http://0.0.0.0:2379",
            "--advertise-client-urls",
            &format!("http://{host}:2379"),
            "--listen-peer-urls",
            "http://0.0.0.0:2380",
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &cluster,
            "--initial-cluster-state",
            state,
            "--initial-cluster-token",
            "kleidi",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

impl Image for EtcdImage {
    fn name(&self) -> &str {
        NAME
    }

    fn tag(&self) -> &str {
        TAG
    }

    fn ready_conditions(&self) -> Vec<WaitFor> {
        // The process is up; EtcdContainer::start then asks the member itself.
        vec![WaitFor::message_on_stderr("ready to serve client requests")]
    }

    fn cmd(&self) -> impl IntoIterator<Item = impl Into<Cow<'_, str>>> {
        &self.args
    }
}

/// A started etcd member that answered Status; removed on drop.
pub struct EtcdContainer {
    container: ContainerAsync<EtcdImage>,
    ip: IpAddr,
}

impl EtcdContainer {
    /// Starts `request` (an [`EtcdImage`] `.with_network(…)`) and waits until the member answers.
    pub async fn start(request: impl Into<ContainerRequest<EtcdImage>>) -> Result<Self> {
        let (container, ip) = start_on_network(request.into()).await?;
        let etcd = EtcdContainer { container, ip };
        etcd.wait_ready(READY_LIMIT).await?;
        Ok(etcd)
    }

    /// `http://<ip on the network>:2379`.
    pub fn endpoint(&self) -> String {
        format!("http://{}:{CLIENT_PORT}", self.ip)
    }

    /// A client of this member.
    pub async fn client(&self) -> Result<etcd_client::Client> {
        Ok(etcd_client::Client::connect([self.endpoint()], None).await?)
    }

    /// Waits up to `limit` for the member to answer a Status RPC (it has a leader when it does).
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        poll("etcd", limit, || async {
            Ok(self.client().await?.status().await.map(drop)?)
        })
        .await
    }

    /// The container, for its verbs (stop, start, pause, unpause) and logs.
    pub fn container(&self) -> &ContainerAsync<EtcdImage> {
        &self.container
    }
}
