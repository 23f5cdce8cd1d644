//! An OpenBao Raft cluster in containers (`kleidi-openbao`), as production runs it: n nodes on the
//! caller's network, each advertising its container name (names survive a restart, addresses may
//! not). Node 0 is initialized (one key share) and unseals; nodes 1..n join it through
//! `sys/storage/raft/join` and unseal with the same key. An explicit join rather than `retry_join`
//! in the config: a node that cannot join fails the start at once with OpenBao's answer instead of
//! retrying silently in the background, and a restarted node rejoins from its Raft data either way.
//! Transit, the key, the least-privilege policy ([`KLEIDI_POLICY`]) and a kleidi token in a host
//! file (mode 0600, in a directory a kleidi container bind-mounts at [`TOKEN_DIR_IN_CONTAINER`])
//! are set up as the process runtime's [`crate::runtime::OpenBao`] does, and [`OpenBaoRaft`] has
//! the same admin verbs, sent to whichever node leads. The root token and the unseal key never
//! leave this module. Containers are removed on drop, also on panic.

use std::fmt;
use std::future::Future;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use testcontainers::core::{AccessMode, Mount};
use testcontainers::{ContainerAsync, ImageExt as _};

use super::{ContainerHandle, RUN_LABEL};
use crate::images::openbao::{self, API_PORT, OpenBaoImage};
use crate::images::poll;
use crate::runtime::{BaoClient, BaoResponse, TokenLease};

/// Where a kleidi container mounts [`OpenBaoRaft::token_mount`]: the token directory, read-only.
/// A directory, not the file: [`OpenBaoRaft::new_token`] replaces the file by a rename, which a
/// bind-mounted file would not see.
pub const TOKEN_DIR_IN_CONTAINER: &str = "/run/kleidi-vault";
/// The token file's name in that directory (and in [`OpenBaoRaft::token_dir`] on the host).
pub const TOKEN_FILE_NAME: &str = "kleidi-token";

/// Bound on one admin call; longer than any healthy answer.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one health or leader probe: a paused node must not hold up finding the leader.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on the cluster or a node becoming ready: a cold start on a loaded 2-core machine.
const READY_LIMIT: Duration = Duration::from_secs(90);
/// How long an admin call keeps looking for a leader that takes it (an election takes seconds).
const ADMIN_LIMIT: Duration = Duration::from_secs(30);
/// Bound on a change reaching every standby (measured: about 200 ms behind the leader).
const SETTLE_LIMIT: Duration = Duration::from_secs(20);

/// What one node's `sys/health` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// Unsealed and active: the leader (200).
    Active,
    /// Unsealed standby following a leader (429; 473 for a performance standby).
    Standby,
    /// Sealed (503): a restarted node until [`OpenBaoRaft::unseal`].
    Sealed,
    /// Not initialized (501): a node that never joined.
    Uninitialized,
    /// Any other status.
    Other(u16),
}

impl NodeState {
    fn from_status(status: u16) -> Self {
        match status {
            200 => NodeState::Active,
            429 | 473 => NodeState::Standby,
            503 => NodeState::Sealed,
            501 => NodeState::Uninitialized,
            other => NodeState::Other(other),
        }
    }
}

/// What [`OpenBaoRaftSpec::start`] sets up. `Default`: 3 nodes, mount `transit`, key `kleidi-kek`,
/// a token of 1 h renewable up to 24 h (as the process runtime's `OpenBaoSpec::default`).
#[derive(Clone, Debug)]
pub struct OpenBaoRaftSpec {
    nodes: usize,
    mount: String,
    key: String,
    lease: TokenLease,
}

impl Default for OpenBaoRaftSpec {
    fn default() -> Self {
        OpenBaoRaftSpec {
            nodes: 3,
            mount: "transit".into(),
            key: "kleidi-kek".into(),
            lease: TokenLease::Ttl {
                ttl: Duration::from_secs(3600),
                max: Duration::from_secs(24 * 3600),
            },
        }
    }
}

impl OpenBaoRaftSpec {
    /// How many nodes (at least 1; 3 tolerate the loss of one).
    pub fn with_nodes(mut self, nodes: usize) -> Self {
        self.nodes = nodes;
        self
    }

    /// The transit mount path.
    pub fn with_mount(mut self, mount: &str) -> Self {
        self.mount = mount.into();
        self
    }

    /// The transit key's name.
    pub fn with_key(mut self, key: &str) -> Self {
        self.key = key.into();
        self
    }

    /// The lease of the first kleidi token.
    pub fn with_lease(mut self, lease: TokenLease) -> Self {
        self.lease = lease;
        self
    }

    /// Starts the nodes on `network` (together: none waits on another), initializes and unseals
    /// node 0, sets up transit, the key and the policy, joins and unseals the others, writes
    /// kleidi's token and waits until [`OpenBaoRaft::wait_ready`] holds.
    pub async fn start(self, network: &str) -> Result<OpenBaoRaft> {
        if self.nodes == 0 {
            bail!("an OpenBao cluster needs at least one node");
        }
        let dir = tempfile::Builder::new()
            .prefix("kleidi-openbao-raft-")
            .tempdir()?;
        let tasks: Vec<_> = (0..self.nodes)
            .map(|i| {
                let name = format!("{network}-bao-{i}");
                let request = OpenBaoImage::default()
                    .with_node_id(&format!("bao-{i}"))
                    .with_advertise_host(&name)
                    .with_network(network)
                    .with_container_name(&name)
                    .with_label(RUN_LABEL, network);
                (name, tokio::spawn(openbao::start_uninitialized(request)))
            })
            .collect();
        // Every task is awaited before an error returns, so no container outlives this call in a
        // detached task; those already started are removed when `nodes` drops.
        let mut nodes = Vec::new();
        let mut failure = None;
        for (name, task) in tasks {
            match task.await {
                Ok(Ok((container, ip))) => nodes.push(Node::new(container, name, ip)?),
                Ok(Err(e)) => failure = failure.or(Some(e.context(format!("starting {name}")))),
                Err(e) => failure = failure.or(Some(anyhow!("starting {name}: {e}"))),
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        let first = nodes.first().context("no node started")?;
        let init = json!({ "secret_shares": 1, "secret_threshold": 1 });
        let init = first
            .client(ADMIN_TIMEOUT)?
            .request("PUT", "sys/init", None, Some(&init))
            .await?
            .ok()?;
        let root = SecretString::from(init.str_at("/root_token")?);
        let unseal_key = SecretString::from(init.str_at("/keys_base64/0")?);
        let leader_url = first.network_url();
        let raft = OpenBaoRaft {
            nodes,
            network: network.into(),
            mount: self.mount,
            key: self.key,
            root,
            unseal_key,
            accessor: Mutex::new(String::new()),
            dir,
        };
        raft.unseal(0).await?;
        raft.wait_state(0, &[NodeState::Active], READY_LIMIT).await?;
        // Autopilot adds a joining node as a non-voter and promotes it after this long healthy
        // (10 s by default); until then losing the leader would lose the quorum.
        let autopilot = json!({ "server_stabilization_time": "2s" });
        raft.root_call(
            "POST",
            "sys/storage/raft/autopilot/configuration",
            Some(&autopilot),
        )
        .await?;
        raft.set_up_transit().await?;
        for i in 1..raft.nodes.len() {
            let join = json!({ "leader_api_addr": leader_url });
            let answer = raft
                .node(i)?
                .client(ADMIN_TIMEOUT)?
                .request("POST", "sys/storage/raft/join", None, Some(&join))
                .await?
                .ok()?;
            if answer.body.get("joined").and_then(serde_json::Value::as_bool) != Some(true) {
                bail!("{} did not join {leader_url}: {}", raft.name(i)?, answer.body);
            }
            // The unseal key answers the leader's challenge; the node then catches up as a standby.
            raft.unseal(i).await?;
        }
        raft.new_token(self.lease).await?;
        raft.wait_ready(READY_LIMIT).await?;
        Ok(raft)
    }
}

/// One node: its container, the engine handle for the fault verbs, and its current address.
struct Node {
    container: ContainerAsync<OpenBaoImage>,
    handle: ContainerHandle,
    name: String,
    /// Re-read after every start: the engine may hand a restarted container another address.
    ip: Mutex<IpAddr>,
}

impl Node {
    fn new(container: ContainerAsync<OpenBaoImage>, name: String, ip: IpAddr) -> Result<Self> {
        let handle = ContainerHandle::new(container.id(), &name)?;
        Ok(Node {
            container,
            handle,
            name,
            ip: Mutex::new(ip),
        })
    }

    fn ip(&self) -> IpAddr {
        *self.ip.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn url(&self) -> String {
        format!("http://{}:{API_PORT}", self.ip())
    }

    /// The address other containers use, and what this node advertises as `api_addr`.
    fn network_url(&self) -> String {
        format!("http://{}:{API_PORT}", self.name)
    }

    fn client(&self, timeout: Duration) -> Result<BaoClient> {
        BaoClient::new(&self.url(), timeout)
    }
}

/// A running OpenBao Raft cluster with transit, a key and a token for kleidi; removed on drop.
pub struct OpenBaoRaft {
    nodes: Vec<Node>,
    network: String,
    mount: String,
    key: String,
    root: SecretString,
    unseal_key: SecretString,
    /// The current kleidi token's accessor: enough to revoke it, useless to encrypt with.
    accessor: Mutex<String>,
    /// Holds the token file; bind-mounted into kleidi containers.
    dir: tempfile::TempDir,
}

impl fmt::Debug for OpenBaoRaft {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenBaoRaft")
            .field("network", &self.network)
            .field("nodes", &self.nodes.iter().map(|n| &n.name).collect::<Vec<_>>())
            .field("urls", &self.urls())
            .field("mount", &self.mount)
            .field("key", &self.key)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl OpenBaoRaft {
    /// [`OpenBaoRaftSpec::default`] (3 nodes) started on `network`.
    pub async fn launch(network: &str) -> Result<Self> {
        OpenBaoRaftSpec::default().start(network).await
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there is no node (never, once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The network the nodes are on.
    pub fn network(&self) -> &str {
        &self.network
    }

    /// `http://<ip>:8200` of each node as the host reaches it now (an address may change when a
    /// node is started again).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// `http://<container name>:8200` of each node: what containers on the network use; stable
    /// across restarts.
    pub fn network_urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::network_url).collect()
    }

    /// Node `i`'s container name (its host name on the network).
    pub fn name(&self, i: usize) -> Result<&str> {
        Ok(&self.node(i)?.name)
    }

    /// Node `i`'s container id.
    pub fn container_id(&self, i: usize) -> Result<&str> {
        Ok(self.node(i)?.container.id())
    }

    /// Node `i`'s engine handle (the verbs below use it; network partitions too).
    pub fn handle(&self, i: usize) -> Result<&ContainerHandle> {
        Ok(&self.node(i)?.handle)
    }

    /// The transit mount.
    pub fn mount(&self) -> &str {
        &self.mount
    }

    /// The transit key's name.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The host directory holding the token file (mode 0700, the file 0600; containers run as
    /// root, so a bind mount reads it).
    pub fn token_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The token file on the host (`--vault-token-file` of a host process).
    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join(TOKEN_FILE_NAME)
    }

    /// The token file as a container sees it through [`Self::token_mount`].
    pub fn token_file_in_container(&self) -> String {
        format!("{TOKEN_DIR_IN_CONTAINER}/{TOKEN_FILE_NAME}")
    }

    /// A read-only bind mount of [`Self::token_dir`] at [`TOKEN_DIR_IN_CONTAINER`], for a kleidi
    /// container's request (`.with_mount(raft.token_mount())`).
    pub fn token_mount(&self) -> Mount {
        Mount::bind_mount(self.dir.path().display().to_string(), TOKEN_DIR_IN_CONTAINER)
            .with_access_mode(AccessMode::ReadOnly)
    }

    /// kleidi's current token, as the file holds it.
    pub fn kleidi_token(&self) -> Result<SecretString> {
        let raw = SecretString::from(std::fs::read_to_string(self.token_file())?);
        Ok(SecretString::from(raw.expose_secret().trim()))
    }

    /// `kleidi serve` flags for a kleidi **container** with [`Self::token_mount`]: every address in
    /// `urls` (usually [`Self::network_urls`]), this cluster's key, the mounted token file.
    pub fn kleidi_flags(&self, urls: &[String]) -> Vec<String> {
        self.flags(urls, &self.token_file_in_container())
    }

    /// `kleidi serve` flags for a kleidi **process on the host**: every address in `urls` (usually
    /// [`Self::urls`]), this cluster's key, the host's token file.
    pub fn host_kleidi_flags(&self, urls: &[String]) -> Vec<String> {
        self.flags(urls, &self.token_file().display().to_string())
    }

    fn flags(&self, urls: &[String], token_file: &str) -> Vec<String> {
        let mut flags: Vec<String> = ["--backend", "vault"].iter().map(|s| s.to_string()).collect();
        for url in urls {
            flags.extend(["--vault-addr".to_string(), url.clone()]);
        }
        // The cluster serves plain HTTP on the run's own Docker network (container IPs, the
        // gateway's fault proxies): not loopback, so kleidi needs the opt-in.
        flags.push("--vault-allow-plain-http".to_string());
        flags.extend(
            [
                "--vault-transit-mount",
                &self.mount,
                "--vault-key",
                &self.key,
                "--vault-auth",
                "token",
                "--vault-token-file",
                token_file,
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        flags
    }

    /// What node `i`'s `sys/health` says (an error if it does not answer: stopped, killed, paused).
    pub async fn state(&self, i: usize) -> Result<NodeState> {
        state_of(self.node(i)?.client(PROBE_TIMEOUT)?).await
    }

    /// Whether node `i` reports itself sealed (an error if it does not answer).
    pub async fn is_sealed(&self, i: usize) -> Result<bool> {
        let health = self
            .node(i)?
            .client(PROBE_TIMEOUT)?
            .request("GET", "sys/health", None, None)
            .await?;
        health
            .body
            .get("sealed")
            .and_then(serde_json::Value::as_bool)
            .context("sys/health answer without `sealed`")
    }

    /// The node that leads now, by asking every node: the one whose `sys/health` says active. If
    /// several say so (a deposed leader cut off from the others has not stepped down yet), the one
    /// the most other nodes name in `sys/leader`. An error when none is active.
    pub async fn leader(&self) -> Result<usize> {
        let states = self.probe_all(state_of).await;
        let active: Vec<usize> = states
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, Ok(NodeState::Active)))
            .map(|(i, _)| i)
            .collect();
        match active.as_slice() {
            [one] => return Ok(*one),
            [] => {
                let seen: Vec<String> = states
                    .iter()
                    .zip(&self.nodes)
                    .map(|(s, n)| match s {
                        Ok(state) => format!("{}: {state:?}", n.name),
                        Err(e) => format!("{}: {e:#}", n.name),
                    })
                    .collect();
                bail!("no active OpenBao node ({})", seen.join("; "));
            }
            _ => {}
        }
        let named = self.probe_all(leader_address).await;
        let votes = |i: &usize| {
            let url = self.nodes.get(*i).map(Node::network_url);
            named
                .iter()
                .filter(|n| n.as_ref().ok().and_then(Option::as_ref) == url.as_ref())
                .count()
        };
        let best = active.iter().max_by_key(|i| votes(i)).copied();
        match best {
            Some(i) if active.iter().filter(|j| votes(j) == votes(&i)).count() == 1 => Ok(i),
            _ => bail!("several nodes claim to be active and none is named leader by more: {active:?}"),
        }
    }

    /// Waits up to `limit` until a leader is elected among the running, unsealed nodes; which.
    pub async fn wait_leader(&self, limit: Duration) -> Result<usize> {
        poll("an OpenBao leader", limit, || self.leader()).await
    }

    /// Waits up to `limit` until the whole cluster is ready: every node unsealed, one active
    /// leader, every standby naming it in `sys/leader`, every node a Raft voter, and the transit
    /// key readable through every node (standbys forward to the leader).
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        poll("the OpenBao Raft cluster", limit, || self.check_ready()).await
    }

    async fn check_ready(&self) -> Result<()> {
        let leader = self.leader().await?;
        let leader_url = self.node(leader)?.network_url();
        let named = self.probe_all(leader_address).await;
        for (i, (node, named)) in self.nodes.iter().zip(named).enumerate() {
            if i != leader && named?.as_deref() != Some(leader_url.as_str()) {
                bail!("{} does not follow {leader_url} yet", node.name);
            }
            let path = format!("{}/keys/{}", self.mount, self.key);
            node.client(ADMIN_TIMEOUT)?
                .request("GET", &path, Some(&self.root), None)
                .await?
                .ok()
                .with_context(|| format!("reading the key through {}", node.name))?;
        }
        let config = self
            .node(leader)?
            .client(ADMIN_TIMEOUT)?
            .request("GET", "sys/storage/raft/configuration", Some(&self.root), None)
            .await?
            .ok()?;
        let servers = config
            .body
            .pointer("/data/config/servers")
            .and_then(serde_json::Value::as_array)
            .context("raft configuration without data.config.servers")?;
        let voters = servers
            .iter()
            .filter(|s| s.get("voter").and_then(serde_json::Value::as_bool) == Some(true))
            .count();
        if voters != self.nodes.len() {
            bail!("{voters} of {} nodes are Raft voters", self.nodes.len());
        }
        Ok(())
    }

    /// SIGKILL node `i`'s container (a crash; a paused one too) and waits until the engine reports
    /// it stopped. Raft data stays in the container; [`Self::start`] brings it back sealed.
    pub async fn kill(&self, i: usize) -> Result<()> {
        self.handle(i)?.kill().await
    }

    /// Graceful stop of node `i` (SIGTERM; a leader hands over; SIGKILL after 10 s).
    pub async fn stop(&self, i: usize) -> Result<()> {
        self.handle(i)?.stop(Duration::from_secs(10)).await?;
        Ok(())
    }

    /// Starts node `i`'s container again after a stop or kill and waits until it answers. It
    /// comes back **sealed**, as a real node does: [`Self::unseal`] next. Its address is re-read.
    pub async fn start(&self, i: usize) -> Result<()> {
        let node = self.node(i)?;
        node.handle.start().await?;
        let ip = node
            .handle
            .ip(&self.network)
            .await?
            .with_context(|| format!("{} has no address on {}", node.name, self.network))?;
        *node.ip.lock().unwrap_or_else(PoisonError::into_inner) = ip;
        poll("a restarted OpenBao node", READY_LIMIT, || self.state(i))
            .await
            .map(drop)
    }

    /// Freezes node `i` (cgroup freezer): connections are accepted, nothing answers.
    pub async fn pause(&self, i: usize) -> Result<()> {
        self.handle(i)?.pause().await
    }

    /// Undoes [`Self::pause`].
    pub async fn resume(&self, i: usize) -> Result<()> {
        self.handle(i)?.resume().await
    }

    /// Unseals node `i` with the cluster's key and waits until it is active or a standby (it
    /// rejoins from its Raft data).
    pub async fn unseal(&self, i: usize) -> Result<()> {
        // The JSON copy of the key is not zeroized (serde_json); the request bytes are.
        let body = json!({ "key": self.unseal_key.expose_secret() });
        self.node(i)?
            .client(ADMIN_TIMEOUT)?
            .request("PUT", "sys/unseal", None, Some(&body))
            .await?
            .ok()?;
        self.wait_state(i, &[NodeState::Active, NodeState::Standby], READY_LIMIT)
            .await
    }

    /// Seals node `i`: it refuses every request (503) until [`Self::unseal`]. Sealing the leader
    /// makes the others elect a new one.
    pub async fn seal(&self, i: usize) -> Result<()> {
        self.node(i)?
            .client(ADMIN_TIMEOUT)?
            .request("PUT", "sys/seal", Some(&self.root), None)
            .await?
            .ok()?;
        Ok(())
    }

    /// Seals every node that answers unsealed, the standbys first (so no election runs between),
    /// and returns when all report sealed.
    pub async fn seal_all(&self) -> Result<()> {
        let states = self.probe_all(state_of).await;
        let mut order: Vec<(usize, NodeState)> = states
            .into_iter()
            .enumerate()
            .filter_map(|(i, s)| s.ok().map(|s| (i, s)))
            .filter(|(_, s)| matches!(s, NodeState::Active | NodeState::Standby))
            .collect();
        order.sort_by_key(|(_, s)| *s == NodeState::Active);
        for (i, _) in order {
            self.seal(i).await?;
            self.wait_state(i, &[NodeState::Sealed], READY_LIMIT).await?;
        }
        Ok(())
    }

    /// Unseals every node that runs, then waits until a leader is elected and the key reads
    /// back through it.
    pub async fn unseal_all(&self) -> Result<()> {
        for i in 0..self.nodes.len() {
            if self.handle(i)?.is_running().await? {
                self.unseal(i).await?;
            }
        }
        self.wait_leader(READY_LIMIT).await?;
        self.key_version().await.map(drop)
    }

    /// Revokes kleidi's current token: every call with it is refused (403) from now on, by every
    /// node that answers once this returns. The token file keeps the dead token until
    /// [`Self::new_token`].
    pub async fn revoke_token(&self) -> Result<()> {
        let accessor = self
            .accessor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let old = self.kleidi_token()?;
        let body = json!({ "accessor": accessor });
        self.root_call("POST", "auth/token/revoke-accessor", Some(&body))
            .await?;
        self.settle(&old, "auth/token/lookup-self", |a| a.status == 403)
            .await
    }

    /// Creates a new kleidi token with `lease` and replaces the token file with it (atomically:
    /// a reader sees the old token or the new one), once every node that answers knows it. The old
    /// token stays valid until it expires or [`Self::revoke_token`] is called first.
    pub async fn new_token(&self, lease: TokenLease) -> Result<()> {
        let body = match lease {
            TokenLease::Ttl { ttl, max } => json!({
                "policies": ["kleidi"], "display_name": "kleidi", "renewable": true,
                "ttl": go_duration(ttl), "explicit_max_ttl": go_duration(max),
            }),
            TokenLease::Periodic(period) => json!({
                "policies": ["kleidi"], "display_name": "kleidi", "renewable": true,
                "period": go_duration(period),
            }),
        };
        // An orphan: revoking it never takes other tokens with it, nor it with them.
        let answer = self
            .root_call("POST", "auth/token/create-orphan", Some(&body))
            .await?;
        let token = SecretString::from(answer.str_at("/auth/client_token")?);
        let accessor = answer.str_at("/auth/accessor")?.to_string();
        let staged = self.dir.path().join(format!("{TOKEN_FILE_NAME}.new"));
        let _ = std::fs::remove_file(&staged);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staged)?;
        writeln!(file, "{}", token.expose_secret())?;
        file.sync_all()?;
        std::fs::rename(&staged, self.token_file())?;
        *self.accessor.lock().unwrap_or_else(PoisonError::into_inner) = accessor;
        self.settle(&token, "auth/token/lookup-self", |a| a.status == 200)
            .await
    }

    /// Rotates the transit key: new encryptions use the new version (on every node that answers,
    /// once this returns), every older one still decrypts. Returns the new version.
    pub async fn rotate_key(&self) -> Result<u64> {
        let path = format!("{}/keys/{}/rotate", self.mount, self.key);
        self.root_call("POST", &path, None).await?;
        let version = self.key_version().await?;
        self.settle_key(|a| {
            a.body
                .pointer("/data/latest_version")
                .and_then(serde_json::Value::as_u64)
                == Some(version)
        })
        .await?;
        Ok(version)
    }

    /// The key's latest version (what encrypt uses).
    pub async fn key_version(&self) -> Result<u64> {
        let path = format!("{}/keys/{}", self.mount, self.key);
        let key = self.root_call("GET", &path, None).await?;
        key.body
            .pointer("/data/latest_version")
            .and_then(serde_json::Value::as_u64)
            .context("key answer without data.latest_version")
    }

    /// Disables the key's versions below `version`: ciphertext made with them no longer decrypts,
    /// on any node that answers once this returns (undone by setting a lower one again; nothing is
    /// deleted).
    pub async fn set_min_decryption_version(&self, version: u64) -> Result<()> {
        let path = format!("{}/keys/{}/config", self.mount, self.key);
        let body = json!({ "min_decryption_version": version });
        self.root_call("POST", &path, Some(&body)).await?;
        self.settle_key(|a| {
            a.body
                .pointer("/data/min_decryption_version")
                .and_then(serde_json::Value::as_u64)
                == Some(version)
        })
        .await
    }

    /// Deletes the transit key for good (allowing deletion first): nothing wrapped with any
    /// version of it decrypts again, and encrypt fails (the mount refuses upserts).
    pub async fn delete_key(&self) -> Result<()> {
        let key_path = format!("{}/keys/{}", self.mount, self.key);
        let allow = json!({ "deletion_allowed": true });
        self.root_call("POST", &format!("{key_path}/config"), Some(&allow))
            .await?;
        self.root_call("DELETE", &key_path, None).await?;
        self.settle_key(|a| a.status == 404).await
    }

    async fn set_up_transit(&self) -> Result<()> {
        for (method, path, body) in crate::runtime::openbao::transit_setup(&self.mount, &self.key) {
            self.root_call(method, &path, Some(&body)).await?;
        }
        Ok(())
    }

    /// An admin call as root, sent to the node that leads now; while none does or it fails in a
    /// way another node might not (no answer, sealed, standby, 5xx), asked again for up to 30 s.
    /// A call that timed out may have been applied: a retried rotation may rotate twice.
    async fn root_call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<BaoResponse> {
        let started = Instant::now();
        loop {
            let last = match self.leader().await {
                Ok(i) => {
                    let node = self.node(i)?;
                    match node
                        .client(ADMIN_TIMEOUT)?
                        .request(method, path, Some(&self.root), body)
                        .await
                    {
                        Ok(answer) if !matches!(answer.status, 429 | 500 | 502 | 503) => {
                            return answer.ok();
                        }
                        Ok(answer) => anyhow!(
                            "{} answered {}: {}",
                            node.name,
                            answer.status,
                            answer.body.get("errors").unwrap_or(&serde_json::Value::Null)
                        ),
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            if started.elapsed() > ADMIN_LIMIT {
                return Err(last.context(format!(
                    "{method} {path}: no OpenBao leader took it within {ADMIN_LIMIT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until every unsealed node that answers reads the key as `check` wants.
    async fn settle_key(&self, check: impl Fn(&BaoResponse) -> bool) -> Result<()> {
        let path = format!("{}/keys/{}", self.mount, self.key);
        let root = self.root.clone();
        self.settle(&root, &path, check).await
    }

    /// Waits until every unsealed node that answers gives an answer `check` accepts to `GET path`
    /// with `token`. Standbys serve reads (and transit calls) from their own Raft replica, a few
    /// hundred ms behind the leader: without this, a verb's effect would depend on the node asked.
    /// Nodes down or sealed are skipped; they catch up before they serve again.
    async fn settle(
        &self,
        token: &SecretString,
        path: &str,
        check: impl Fn(&BaoResponse) -> bool,
    ) -> Result<()> {
        poll("a change on every OpenBao node", SETTLE_LIMIT, || async {
            for node in &self.nodes {
                let client = node.client(PROBE_TIMEOUT)?;
                let state = state_of(client.clone()).await;
                if !matches!(state, Ok(NodeState::Active | NodeState::Standby)) {
                    continue;
                }
                let answer = client.request("GET", path, Some(token), None).await?;
                if !check(&answer) {
                    bail!("{} answers {} to {path}", node.name, answer.status);
                }
            }
            Ok(())
        })
        .await
    }

    /// Waits up to `limit` until node `i` reports one of `states`.
    async fn wait_state(&self, i: usize, states: &[NodeState], limit: Duration) -> Result<()> {
        poll("an OpenBao node's state", limit, || async {
            let state = self.state(i).await?;
            if states.contains(&state) {
                Ok(())
            } else {
                bail!("{} is {state:?}, waiting for {states:?}", self.name(i)?)
            }
        })
        .await
    }

    /// `probe` on every node at once (each bounded by [`PROBE_TIMEOUT`]), answers in node order.
    async fn probe_all<T, F, Fut>(&self, probe: F) -> Vec<Result<T>>
    where
        F: Fn(BaoClient) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let tasks: Vec<_> = self
            .nodes
            .iter()
            .map(|n| n.client(PROBE_TIMEOUT).map(|c| tokio::spawn(probe(c))))
            .collect();
        let mut out = Vec::with_capacity(tasks.len());
        for task in tasks {
            out.push(match task {
                Ok(task) => task.await.map_err(anyhow::Error::from).and_then(|r| r),
                Err(e) => Err(e),
            });
        }
        out
    }

    fn node(&self, i: usize) -> Result<&Node> {
        self.nodes
            .get(i)
            .with_context(|| format!("no OpenBao node {i} (the cluster has {})", self.nodes.len()))
    }
}

async fn state_of(client: BaoClient) -> Result<NodeState> {
    let health = client.request("GET", "sys/health", None, None).await?;
    Ok(NodeState::from_status(health.status))
}

/// The `leader_address` a node's `sys/leader` names (`None` when it names none).
async fn leader_address(client: BaoClient) -> Result<Option<String>> {
    let answer = client.request("GET", "sys/leader", None, None).await?.ok()?;
    Ok(answer
        .body
        .get("leader_address")
        .and_then(serde_json::Value::as_str)
        .filter(|a| !a.is_empty())
        .map(str::to_string))
}

/// A duration as OpenBao parses it (Go syntax, whole milliseconds).
fn go_duration(d: Duration) -> serde_json::Value {
    json!(format!("{}ms", d.as_millis()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_statuses_name_the_node_states() {
        assert_eq!(NodeState::from_status(200), NodeState::Active);
        assert_eq!(NodeState::from_status(429), NodeState::Standby);
        assert_eq!(NodeState::from_status(503), NodeState::Sealed);
        assert_eq!(NodeState::from_status(501), NodeState::Uninitialized);
        assert_eq!(NodeState::from_status(418), NodeState::Other(418));
    }
}
