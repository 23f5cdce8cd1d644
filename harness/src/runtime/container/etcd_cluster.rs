//! An etcd cluster in containers (`kleidi-etcd`): n members on the caller's network, each named
//! and advertised by its container name, so peers find a restarted member whatever address the
//! engine gives it; the host is given the current address, re-read after every start. A member's
//! data dir lives in its container's filesystem, which a stop, kill or start keeps: a member
//! started again rejoins with its own data and catches up from the leader. Containers are removed
//! on drop, also on panic.

use std::fmt;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use testcontainers::ImageExt as _;

use super::{ContainerHandle, RUN_LABEL};
use crate::apiserver::{EtcdStore, EtcdTls};
use crate::images::etcd::{CLIENT_PORT, EtcdContainer, EtcdImage};
use crate::images::poll;

/// Bound on the cluster or a member becoming ready: a cold start on a loaded 2-core machine.
const READY_LIMIT: Duration = Duration::from_secs(90);
/// Grace of a stop before SIGKILL; etcd exits within a second of SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// The key readiness writes and reads back.
const PROBE_KEY: &[u8] = b"/kleidi-harness/cluster-ready";

/// One member: its container, the engine handle for the fault verbs, and its current address.
struct Member {
    etcd: EtcdContainer,
    handle: ContainerHandle,
    name: String,
    /// Re-read after every start: the engine may hand a restarted container another address.
    ip: Mutex<IpAddr>,
}

impl Member {
    fn endpoint(&self) -> String {
        let ip = *self.ip.lock().unwrap_or_else(PoisonError::into_inner);
        format!("http://{ip}:{CLIENT_PORT}")
    }
}

/// A running etcd cluster; removed on drop.
pub struct EtcdCluster {
    members: Vec<Member>,
    network: String,
}

impl fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("network", &self.network)
            .field(
                "members",
                &self.members.iter().map(|m| &m.name).collect::<Vec<_>>(),
            )
            .field("endpoints", &self.endpoints())
            .finish()
    }
}

impl EtcdCluster {
    /// Starts `members` members on `network` together (each waits for the others to form a
    /// quorum before it serves) and waits until a write and a read succeed through the cluster.
    pub async fn launch(network: &str, members: usize) -> Result<Self> {
        if members == 0 {
            bail!("an etcd cluster needs at least one member");
        }
        let names: Vec<String> = (0..members).map(|i| format!("{network}-etcd-{i}")).collect();
        let initial: Vec<String> = names
            .iter()
            .enumerate()
            .map(|(i, name)| format!("etcd-{i}=http://{name}:2380"))
            .collect();
        let initial = initial.join(",");
        let tasks: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let request = EtcdImage::default()
                    .with_name(&format!("etcd-{i}"))
                    .with_advertise_host(name)
                    .with_initial_cluster(&initial)
                    .with_network(network)
                    .with_container_name(name)
                    .with_label(RUN_LABEL, network);
                (name.clone(), tokio::spawn(EtcdContainer::start(request)))
            })
            .collect();
        // Every task is awaited before an error returns, so no container outlives this call in a
        // detached task; those already started are removed when `started` drops.
        let mut started = Vec::new();
        let mut failure = None;
        for (name, task) in tasks {
            match task.await {
                Ok(Ok(etcd)) => {
                    let handle = ContainerHandle::new(etcd.container().id(), &name)?;
                    let ip = handle
                        .ip(network)
                        .await?
                        .with_context(|| format!("{name} has no address on {network}"))?;
                    started.push(Member {
                        etcd,
                        handle,
                        name,
                        ip: Mutex::new(ip),
                    });
                }
                Ok(Err(e)) => failure = failure.or(Some(e.context(format!("starting {name}")))),
                Err(e) => failure = failure.or(Some(anyhow!("starting {name}: {e}"))),
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        let cluster = EtcdCluster {
            members: started,
            network: network.into(),
        };
        cluster.wait_ready(READY_LIMIT).await?;
        Ok(cluster)
    }

    /// How many members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there is no member (never, once started).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The network the members are on.
    pub fn network(&self) -> &str {
        &self.network
    }

    /// `http://<ip>:2379` of each member as the host reaches it now.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// Member `i`'s `http://<ip>:2379`.
    pub fn endpoint(&self, i: usize) -> Result<String> {
        Ok(self.member(i)?.endpoint())
    }

    /// `http://<container name>:2379` of each member: what containers on the network use (a
    /// kube-apiserver's `--etcd-servers`); stable across restarts.
    pub fn network_endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{}:{CLIENT_PORT}", m.name))
            .collect()
    }

    /// Member `i`'s container name (its host name on the network).
    pub fn name(&self, i: usize) -> Result<&str> {
        Ok(&self.member(i)?.name)
    }

    /// Member `i`'s container id.
    pub fn container_id(&self, i: usize) -> Result<&str> {
        Ok(self.member(i)?.etcd.container().id())
    }

    /// Member `i`'s engine handle (the verbs below use it; network partitions too).
    pub fn handle(&self, i: usize) -> Result<&ContainerHandle> {
        Ok(&self.member(i)?.handle)
    }

    /// A client over every member's current endpoint (the client balances across them and avoids
    /// members that do not answer).
    pub async fn client(&self) -> Result<EtcdStore> {
        Ok(EtcdStore::connect(&self.endpoints(), &EtcdTls::default()).await?)
    }

    /// A client of member `i` alone: what that member itself serves.
    pub async fn member_client(&self, i: usize) -> Result<EtcdStore> {
        let endpoint = self.endpoint(i)?;
        Ok(EtcdStore::connect(&[endpoint], &EtcdTls::default()).await?)
    }

    /// Waits up to `limit` until a write and a read of it succeed through [`Self::client`].
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        poll("the etcd cluster", limit, || async {
            let value = uuid::Uuid::new_v4().simple().to_string().into_bytes();
            let client = self.client().await?;
            client.put(PROBE_KEY, value.clone()).await?;
            match client.get(PROBE_KEY).await? {
                Some(got) if got == value => Ok(()),
                other => bail!("read back {other:?} after writing {value:?}"),
            }
        })
        .await
    }

    /// Waits up to `limit` until member `i` alone serves a (linearizable) read: it has a leader
    /// and has caught up with it.
    pub async fn wait_member_ready(&self, i: usize, limit: Duration) -> Result<()> {
        poll("an etcd member", limit, || async {
            self.member_client(i).await?.get(PROBE_KEY).await?;
            Ok(())
        })
        .await
    }

    /// Graceful stop of member `i` (SIGTERM; SIGKILL after 10 s).
    pub async fn stop(&self, i: usize) -> Result<()> {
        self.handle(i)?.stop(STOP_GRACE).await?;
        Ok(())
    }

    /// SIGKILL member `i`'s container (a crash; a paused one too) and waits until the engine
    /// reports it stopped. Its data dir stays in the container.
    pub async fn kill(&self, i: usize) -> Result<()> {
        self.handle(i)?.kill().await
    }

    /// Starts member `i`'s container again after a stop or kill, re-reads its address and waits
    /// until it serves reads itself (rejoined with its data, caught up).
    pub async fn start(&self, i: usize) -> Result<()> {
        self.start_container(i).await?;
        self.wait_member_ready(i, READY_LIMIT).await
    }

    /// Freezes member `i` (cgroup freezer): connections are accepted, nothing answers.
    pub async fn pause(&self, i: usize) -> Result<()> {
        self.handle(i)?.pause().await
    }

    /// Undoes [`Self::pause`].
    pub async fn resume(&self, i: usize) -> Result<()> {
        self.handle(i)?.resume().await
    }

    /// Stops every member gracefully.
    pub async fn stop_all(&self) -> Result<()> {
        for i in 0..self.members.len() {
            self.stop(i).await?;
        }
        Ok(())
    }

    /// Starts every stopped member again (all before waiting: none serves without a quorum),
    /// then waits until the cluster takes a write and a read.
    pub async fn start_all(&self) -> Result<()> {
        for i in 0..self.members.len() {
            if !self.handle(i)?.is_running().await? {
                self.start_container(i).await?;
            }
        }
        self.wait_ready(READY_LIMIT).await
    }

    /// Freezes every member.
    pub async fn pause_all(&self) -> Result<()> {
        for i in 0..self.members.len() {
            self.pause(i).await?;
        }
        Ok(())
    }

    /// Thaws every member.
    pub async fn resume_all(&self) -> Result<()> {
        for i in 0..self.members.len() {
            self.resume(i).await?;
        }
        Ok(())
    }

    async fn start_container(&self, i: usize) -> Result<()> {
        let member = self.member(i)?;
        member.handle.start().await?;
        let ip = member
            .handle
            .ip(&self.network)
            .await?
            .with_context(|| format!("{} has no address on {}", member.name, self.network))?;
        *member.ip.lock().unwrap_or_else(PoisonError::into_inner) = ip;
        Ok(())
    }

    fn member(&self, i: usize) -> Result<&Member> {
        self.members
            .get(i)
            .with_context(|| format!("no etcd member {i} (the cluster has {})", self.members.len()))
    }
}
