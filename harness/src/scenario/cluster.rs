//! The simulated control plane a scenario runs on: etcd, one key backend (a SoftHSM token, an
//! OpenBao server, or a swtpm per node sharing one KEK) and `N` nodes, each a `kleidi serve` on its
//! own socket beside its own [`Envelope`] (the apiserver's KMS v2 role, probing on upstream's
//! schedule, compressed by [`Timing`]). On the process runtime everything is a local process on
//! 127.0.0.1 (one etcd, one OpenBao behind a fault proxy per node); on the container runtime etcd is
//! three members, OpenBao a three-node Raft cluster, each node's plugin and TPM a container, all on the
//! run's own network ([`super::handles`]). The fault verbs live in [`super::fault`], the workload in
//! [`super::workload`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::handles::{Bao, EtcdPart, Plugin, Tpm};
use super::history::History;
use super::recorder::Recording;
use crate::Envelope;
use crate::apiserver::envelope::{HEALTHY_PROBE_INTERVAL, UNHEALTHY_PROBE_INTERVAL, WRITE_STATE_TTL};
use crate::apiserver::inputs::{Clock, SeededRandom};
use crate::apiserver::{Authority, EtcdStore, connect_unix_lazy};
use crate::runtime::container::etcd_cluster::EtcdCluster;
use crate::runtime::container::kleidi_node::{KleidiNode, KleidiNodeSpec};
use crate::runtime::container::openbao_raft::OpenBaoRaft;
use crate::runtime::container::swtpm_node::SwtpmNode;
use crate::runtime::{
    Etcd, FaultProxy, KleidiPlugin, Moto, OpenBao, RuntimeKind, SharedKek, SoftHsmToken, Swtpm,
    kleidi_aws_kms_bin,
};

/// The provider name every node's EncryptionConfiguration uses.
pub const PROVIDER: &str = "kleidi";
/// Where the workload's objects live in etcd.
pub const PREFIX: &str = "/registry/secrets/";
/// The cluster name in kleidi's AWS KMS encryption context.
const AWS_CLUSTER: &str = "kleidi-scenario";

/// The key services a scenario can run against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// A SoftHSM2 token through PKCS#11.
    Pkcs11,
    /// OpenBao transit, each node through its own fault proxy.
    Vault,
    /// TPM 2.0: a swtpm per node; with several nodes one shareable KEK enrolled on all of them.
    Tpm,
    /// Any KMS v2 plugin, started by a command of the user's (`{socket}` stands for the socket
    /// path); only faults that need no control over its backend apply.
    Foreign,
    /// AWS KMS: a local moto server, each node through its own fault proxy; kleidi built with the
    /// `aws-kms` feature. Process runtime only (no moto image).
    AwsKms,
}

impl BackendKind {
    /// Every backend, in the order runs are listed.
    pub const ALL: [BackendKind; 5] = [Self::Pkcs11, Self::Vault, Self::Tpm, Self::AwsKms, Self::Foreign];

    /// `pkcs11`, `vault`, `tpm`, `aws-kms`, `foreign`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pkcs11 => "pkcs11",
            Self::Vault => "vault",
            Self::Tpm => "tpm",
            Self::Foreign => "foreign",
            Self::AwsKms => "aws-kms",
        }
    }

    /// Why it cannot run on `runtime`, if it cannot.
    pub fn unsupported_on(self, runtime: RuntimeKind) -> Option<String> {
        (self == Self::AwsKms && runtime == RuntimeKind::Container)
            .then(|| "aws-kms: not supported by the container runtime (moto runs as a local process)".into())
    }

    /// The backend named `name`.
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|b| b.name() == name)
            .with_context(|| format!("unknown backend {name:?} (pkcs11, vault, tpm, aws-kms, foreign)"))
    }
}

/// How much faster than upstream the apiserver's clock runs: probe intervals (60 s healthy, 10 s
/// after a failure) and the 3-minute write-state expiry are divided by `compression`; kleidi's own
/// health TTLs with them. Plugin call timeouts are not compressed (a hung backend costs real time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// 1 = upstream's timing.
    pub compression: u32,
}

impl Timing {
    /// Upstream's timing.
    pub const UPSTREAM: Timing = Timing { compression: 1 };

    /// Upstream's timing divided by `factor`.
    pub const fn compressed(factor: u32) -> Self {
        Timing { compression: factor }
    }

    /// `d` of upstream time in real time.
    pub fn scale(self, d: Duration) -> Duration {
        d / self.compression.max(1)
    }

    /// Writes are refused this long (real time) after the last good probe.
    pub fn write_ttl(self) -> Duration {
        self.scale(WRITE_STATE_TTL)
    }

    /// kleidi's health flags: its defaults, upstream-scaled (at least 200 ms).
    fn kleidi_flags(self) -> Vec<String> {
        let ms = |d: Duration| format!("{}ms", self.scale(d).as_millis().max(200));
        let ttl = kleidi::health::HealthTtl::default();
        vec![
            "--health-ok-ttl".into(),
            ms(ttl.ok),
            "--health-roundtrip-interval".into(),
            ms(ttl.roundtrip),
            "--health-err-ttl".into(),
            ms(ttl.err),
        ]
    }
}

/// The apiserver's clock, `compression` times faster than real time (write-state expiry).
struct ScaledClock {
    start: Instant,
    factor: u32,
}

impl Clock for ScaledClock {
    fn now(&self) -> Instant {
        self.start + self.start.elapsed() * self.factor.max(1)
    }
}

/// The key backend and its fault state.
pub enum Backend {
    /// A SoftHSM token shared by every node's plugin.
    Pkcs11 {
        /// The token.
        token: SoftHsmToken,
        /// The current key label (rotation adds one and restarts the plugins with it).
        key_label: String,
        /// Where a lost directory was moved: (original, away).
        lost: Vec<(PathBuf, PathBuf)>,
        /// The PIN file's good content while a wrong one is in place.
        saved_pin: Option<Vec<u8>>,
    },
    /// OpenBao; node `i` reaches it through `proxies[i]`: one fault proxy on 127.0.0.1 on the
    /// process runtime; on the container runtime one per Raft node, on the run network's gateway
    /// (the host as its containers see it), and kleidi lists all of them.
    Vault {
        /// The server(s).
        bao: Bao,
        /// One fault proxy per node (process runtime).
        proxies: Vec<Vec<FaultProxy>>,
        /// Whether the server is paused (SIGSTOP).
        paused: bool,
        /// Whether it was stopped or killed and not started again.
        down: bool,
        /// Whether it was sealed and not unsealed.
        sealed: bool,
        /// Whether kleidi's token was revoked and not replaced.
        revoked: bool,
    },
    /// A software TPM per node: node `i` uses `tpms[i]`. One node: its KEK made by `kleidi tpm
    /// init`. Several: one shareable KEK made on node 0 and enrolled on every other node.
    Tpm {
        /// One TPM per node, with its fault state.
        tpms: Vec<NodeTpm>,
        /// The admin side of the shared KEK (several nodes only): rotations reuse its approvals.
        shared: Option<SharedKek>,
    },
    /// moto; node `i` reaches it through `proxies[i]` (127.0.0.1).
    AwsKms {
        /// The server and its key.
        moto: Box<Moto>,
        /// One fault proxy per node.
        proxies: Vec<FaultProxy>,
        /// Whether the server is paused (SIGSTOP).
        paused: bool,
    },
    /// Someone else's plugin: `sh -c "exec <command>"` with `{socket}` replaced.
    Foreign {
        /// The command line.
        command: String,
    },
}

impl Backend {
    /// The backend's kind.
    pub fn kind(&self) -> BackendKind {
        match self {
            Self::Pkcs11 { .. } => BackendKind::Pkcs11,
            Self::Vault { .. } => BackendKind::Vault,
            Self::Tpm { .. } => BackendKind::Tpm,
            Self::Foreign { .. } => BackendKind::Foreign,
            Self::AwsKms { .. } => BackendKind::AwsKms,
        }
    }
}

/// One node's TPM and its fault state.
pub struct NodeTpm {
    /// The TPM.
    pub tpm: Tpm,
    /// Whether it was killed and not started again.
    pub down: bool,
    /// Whether it is paused.
    pub paused: bool,
}

impl NodeTpm {
    fn new(tpm: Tpm) -> Self {
        Self {
            tpm,
            down: false,
            paused: false,
        }
    }
}

/// One control-plane node: the plugin process and the apiserver's envelope.
pub struct Node {
    /// 0-based.
    pub index: usize,
    /// `kleidi serve` (a stopped plugin keeps its handle).
    pub plugin: Plugin,
    /// Whether the plugin is paused.
    pub paused: bool,
    /// Whether the harness stopped or killed the plugin (a watcher tells these from crashes).
    pub down: bool,
    /// How many envelopes this node has had (cold restarts), for fresh randomness each time.
    pub generation: u64,
    prober: tokio::task::JoinHandle<()>,
    dir: PathBuf,
}

impl Node {
    /// The plugin's socket.
    pub fn socket(&self) -> &Path {
        self.plugin.socket()
    }

    /// The plugin's log.
    pub fn log(&self) -> PathBuf {
        self.dir.join("kleidi.log")
    }
}

/// What a cluster needs to start.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Control-plane nodes.
    pub nodes: usize,
    /// The key backend.
    pub backend: BackendKind,
    /// Apiserver timing.
    pub timing: Timing,
    /// Extra `kleidi serve` flags.
    pub kleidi_flags: Vec<String>,
    /// For [`BackendKind::Foreign`]: the command that starts the plugin on `{socket}`.
    pub foreign_command: Option<String>,
    /// The run's seed (envelope randomness is derived from it).
    pub seed: u64,
    /// Where process logs and sockets go.
    pub dir: PathBuf,
    /// Local processes or containers.
    pub runtime: RuntimeKind,
}

// The envelopes the workload uses; replaced one by one on a cold apiserver restart.
pub use crate::apiserver::Apiservers;

/// A running simulated control plane. Everything stops on drop.
pub struct Cluster {
    /// The run's history.
    pub history: History,
    /// etcd.
    pub etcd: EtcdPart,
    /// A raw etcd client.
    pub store: EtcdStore,
    /// The key backend.
    pub backend: Backend,
    /// The nodes.
    pub nodes: Vec<Node>,
    /// What the workload talks to.
    pub apiservers: Apiservers,
    /// Whether etcd is stopped.
    pub etcd_down: bool,
    /// Whether etcd is paused.
    pub etcd_paused: bool,
    /// etcd members lost (container runtime).
    pub etcd_lost: Vec<usize>,
    /// The run's Docker network (container runtime).
    pub network: Option<String>,
    spec: ClusterSpec,
    kleidi: PathBuf,
    clock: Arc<ScaledClock>,
    /// Sockets live apart from the run directory: a Unix socket path must fit in 108 bytes.
    sockets: tempfile::TempDir,
}

impl Cluster {
    /// Starts etcd, the backend and every node (plugin + envelope with its first probe done).
    pub async fn start(spec: ClusterSpec, kleidi: PathBuf, history: History) -> Result<Self> {
        std::fs::create_dir_all(&spec.dir)?;
        if let Some(why) = spec.backend.unsupported_on(spec.runtime) {
            bail!(why);
        }
        // The workspace build has no AWS SDK: that backend runs the feature build.
        let kleidi = match spec.backend {
            BackendKind::AwsKms => kleidi_aws_kms_bin(&kleidi)?,
            _ => kleidi,
        };
        let network = match spec.runtime {
            RuntimeKind::Process => None,
            RuntimeKind::Container => Some(crate::images::network_name()),
        };
        let etcd = match &network {
            None => EtcdPart::Process(Box::new(Etcd::start().await?)),
            Some(net) => EtcdPart::Cluster(Box::new(EtcdCluster::launch(net, 3).await?)),
        };
        let store = etcd.client().await?;
        let backend = match spec.backend {
            BackendKind::Pkcs11 => {
                let label = format!("kt-{:x}", spec.seed & 0xffff_ffff);
                Backend::Pkcs11 {
                    token: SoftHsmToken::create(&kleidi, &label, "kek-1")?,
                    key_label: "kek-1".into(),
                    lost: Vec::new(),
                    saved_pin: None,
                }
            }
            BackendKind::Vault => {
                let (bao, proxies) = match &network {
                    None => {
                        let bao = OpenBao::start().await?;
                        let mut proxies = Vec::new();
                        for _ in 0..spec.nodes {
                            proxies.push(vec![FaultProxy::start(bao.listen_addr()).await?]);
                        }
                        (Bao::Process(Box::new(bao)), proxies)
                    }
                    Some(net) => {
                        let raft = OpenBaoRaft::launch(net).await?;
                        let gateway = crate::runtime::container::gateway(net).await?;
                        let mut proxies = Vec::new();
                        for _ in 0..spec.nodes {
                            let mut own = Vec::new();
                            for url in raft.urls() {
                                own.push(FaultProxy::start_on(gateway, url_addr(&url)?).await?);
                            }
                            proxies.push(own);
                        }
                        (Bao::Raft(Box::new(raft)), proxies)
                    }
                };
                Backend::Vault {
                    bao,
                    proxies,
                    paused: false,
                    down: false,
                    sealed: false,
                    revoked: false,
                }
            }
            BackendKind::Tpm => {
                let mut tpms = Vec::new();
                for i in 0..spec.nodes.max(1) {
                    let tpm = match &network {
                        None => Tpm::Process(Box::new(Swtpm::start().await?)),
                        Some(net) => Tpm::Container(Box::new(
                            SwtpmNode::start(net, &format!("{net}-swtpm-{i}")).await?,
                        )),
                    };
                    tpms.push(NodeTpm::new(tpm));
                }
                let access: Vec<_> = tpms.iter().map(|t| t.tpm.access()).collect();
                let shared = if let [only] = access.as_slice() {
                    only.init_key(&kleidi).await?;
                    None
                } else {
                    Some(SharedKek::enrol(&kleidi, &access).await?)
                };
                Backend::Tpm { tpms, shared }
            }
            BackendKind::AwsKms => {
                let moto = Moto::start().await?;
                let mut proxies = Vec::new();
                for _ in 0..spec.nodes {
                    proxies.push(FaultProxy::start(moto.listen_addr()).await?);
                }
                Backend::AwsKms {
                    moto: Box::new(moto),
                    proxies,
                    paused: false,
                }
            }
            BackendKind::Foreign => Backend::Foreign {
                command: spec
                    .foreign_command
                    .clone()
                    .context("the foreign backend needs the command that starts the plugin")?,
            },
        };
        let clock = Arc::new(ScaledClock {
            start: Instant::now(),
            factor: spec.timing.compression,
        });
        let mut cluster = Cluster {
            history,
            etcd,
            store,
            backend,
            nodes: Vec::new(),
            apiservers: Arc::new(RwLock::new(Vec::new())),
            etcd_down: false,
            etcd_paused: false,
            etcd_lost: Vec::new(),
            network,
            spec,
            kleidi,
            clock,
            sockets: tempfile::Builder::new().prefix("kleidi-run-").tempdir()?,
        };
        for index in 0..cluster.spec.nodes {
            let plugin = cluster.launch_plugin(index).await?;
            let dir = cluster.spec.dir.join(format!("node-{index}"));
            let envelope = cluster.new_envelope(index, plugin.socket(), 0)?;
            let prober = cluster.start_prober(envelope.clone()).await;
            cluster.apiservers_mut().push(envelope);
            cluster.nodes.push(Node {
                index,
                plugin,
                paused: false,
                down: false,
                generation: 0,
                prober,
                dir,
            });
        }
        Ok(cluster)
    }

    /// The runtime it runs on.
    pub fn runtime(&self) -> RuntimeKind {
        self.spec.runtime
    }

    /// The spec it was started with.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// The apiserver timing.
    pub fn timing(&self) -> Timing {
        self.spec.timing
    }

    /// Node `index`'s envelope now.
    pub fn envelope(&self, index: usize) -> Option<Arc<Envelope>> {
        self.apiservers.read().ok()?.get(index).cloned()
    }

    fn apiservers_mut(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<Envelope>>> {
        self.apiservers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts node `index`'s plugin with the backend's current flags: a local process, or a
    /// container on the run's network (a foreign plugin is always the user's own process).
    pub(crate) async fn launch_plugin(&self, index: usize) -> Result<Plugin> {
        let dir = self.spec.dir.join(format!("node-{index}"));
        std::fs::create_dir_all(&dir)?;
        // A directory per node: a container mounts its socket's directory.
        let socket_dir = self.sockets.path().join(format!("node-{index}"));
        std::fs::create_dir_all(&socket_dir)?;
        let socket = socket_dir.join("kms.sock");
        let log = dir.join("kleidi.log");
        let mut mounts = Vec::new();
        let (mut args, env) = match &self.backend {
            Backend::Pkcs11 { token, key_label, .. } => {
                let mut args = vec!["--backend".to_string(), "pkcs11".into()];
                args.extend(token.flags(key_label));
                mounts.push(token.dir().to_path_buf());
                (
                    args,
                    vec![("SOFTHSM2_CONF".to_string(), token.conf().display().to_string())],
                )
            }
            Backend::Vault { bao, proxies, .. } => {
                let urls: Vec<String> = proxies
                    .get(index)
                    .context("no proxy for this node")?
                    .iter()
                    .map(FaultProxy::url)
                    .collect();
                match bao {
                    Bao::Process(bao) => (bao.kleidi_flags(urls.first().context("no proxy")?), Vec::new()),
                    Bao::Raft(raft) => {
                        // The token file's directory at its host path; a proxy per Raft node.
                        mounts.push(raft.token_dir().to_path_buf());
                        (raft.host_kleidi_flags(&urls), Vec::new())
                    }
                }
            }
            Backend::Tpm { tpms, .. } => {
                let tpm = &tpms.get(index).context("no TPM for this node")?.tpm;
                // kleidi's TPM-wrapped keys, at their host path (a node's own disk).
                mounts.push(tpm.access().state_dir);
                (
                    tpm.kleidi_flags(),
                    vec![("TSS2_LOG".to_string(), "all+none".to_string())],
                )
            }
            Backend::AwsKms { moto, proxies, .. } => {
                let proxy = proxies.get(index).context("no proxy for this node")?;
                (moto.kleidi_flags(&proxy.url(), AWS_CLUSTER), moto.kleidi_env())
            }
            Backend::Foreign { command } => {
                let command = command.replace("{socket}", &socket.display().to_string());
                return Ok(Plugin::Process(Box::new(
                    KleidiPlugin::foreign(&command, socket, &log).await?,
                )));
            }
        };
        args.extend(self.spec.timing.kleidi_flags());
        args.extend(self.spec.kleidi_flags.iter().cloned());
        match &self.network {
            None => Ok(Plugin::Process(Box::new(
                KleidiPlugin::launch(&self.kleidi, socket, std::mem::take(&mut args), &env, &log, &[])
                    .await?,
            ))),
            Some(network) => {
                let spec = KleidiNodeSpec {
                    network: network.clone(),
                    // Unique: a rotation starts a node's new container before the old one is removed.
                    name: format!("{network}-kleidi-{index}-{}", uuid::Uuid::new_v4().simple()),
                    kleidi: self.kleidi.clone(),
                    socket_dir,
                    args,
                    env,
                    mounts,
                };
                Ok(Plugin::Container(Box::new(KleidiNode::start(&spec).await?)))
            }
        }
    }

    /// A fresh envelope for node `index` (an apiserver process with an empty cache), recording its
    /// RPCs; its randomness is derived from the seed, the node and the generation.
    fn new_envelope(&self, index: usize, socket: &Path, generation: u64) -> Result<Arc<Envelope>> {
        let kms = connect_unix_lazy(socket, Authority::Localhost)?;
        let recording = Recording::new(Arc::new(kms), self.history.clone(), index);
        let stream = self
            .spec
            .seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add((index as u64) << 32)
            .wrapping_add(generation);
        let envelope = Envelope::new(PROVIDER, Arc::new(recording))?
            .with_clock(self.clock.clone())
            .with_randomness(SeededRandom::new(stream));
        Ok(Arc::new(envelope))
    }

    /// The apiserver's startup probe inline, then its background loop on the compressed schedule.
    async fn start_prober(&self, envelope: Arc<Envelope>) -> tokio::task::JoinHandle<()> {
        let _ = envelope.refresh().await;
        let timing = self.spec.timing;
        tokio::spawn(async move {
            // Bounded by the cluster's life: the handle is aborted on restart and on drop.
            loop {
                let interval = if envelope.healthy() {
                    timing.scale(HEALTHY_PROBE_INTERVAL)
                } else {
                    timing.scale(UNHEALTHY_PROBE_INTERVAL)
                };
                tokio::time::sleep(interval).await;
                let _ = envelope.refresh().await;
            }
        })
    }

    /// Replaces node `index`'s apiserver with a cold one (new process: empty cache, no write state
    /// until its first probe), as a restart of kube-apiserver does.
    pub async fn restart_apiserver(&mut self, index: usize) -> Result<()> {
        let node = self.nodes.get_mut(index).context("no such node")?;
        node.prober.abort();
        node.generation += 1;
        let (socket, generation) = (node.plugin.socket().to_path_buf(), node.generation);
        let envelope = self.new_envelope(index, &socket, generation)?;
        let prober = self.start_prober(envelope.clone()).await;
        if let Some(slot) = self.apiservers_mut().get_mut(index) {
            *slot = envelope;
        }
        if let Some(node) = self.nodes.get_mut(index) {
            node.prober = prober;
        }
        Ok(())
    }

    /// A new apiserver for node `index` beside the running one, after its inline first probe: what a
    /// restarted kube-apiserver reads with (empty cache: one Decrypt per distinct seed).
    pub async fn cold_envelope(&self, index: usize) -> Result<Arc<Envelope>> {
        let node = self.nodes.get(index).context("no such node")?;
        // Its own randomness stream, apart from every generation the node has had.
        let envelope =
            self.new_envelope(index, node.plugin.socket(), u64::from(u32::MAX) + node.generation)?;
        let _ = envelope.refresh().await;
        Ok(envelope)
    }

    /// Probes every node until each has a write state and a good probe, or `limit` passes. Returns
    /// the nodes that never got there.
    pub async fn wait_healthy(&self, limit: Duration) -> Vec<usize> {
        let started = Instant::now();
        loop {
            let mut unhealthy = Vec::new();
            for index in 0..self.nodes.len() {
                let Some(envelope) = self.envelope(index) else {
                    continue;
                };
                if !envelope.healthy() || envelope.key_id().is_none() {
                    let _ = envelope.refresh().await;
                }
                if !envelope.healthy() || envelope.key_id().is_none() {
                    unhealthy.push(index);
                }
            }
            if unhealthy.is_empty() || started.elapsed() > limit {
                return unhealthy;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every log of the run so far: (name, contents): each plugin's, etcd's (each member's),
    /// OpenBao's, each swtpm's.
    pub async fn logs(&self) -> Vec<(String, Vec<u8>)> {
        let mut logs = Vec::new();
        for node in &self.nodes {
            let contents = match &node.plugin {
                // A process appends to its log file across restarts.
                Plugin::Process(_) => std::fs::read(node.log()).unwrap_or_default(),
                Plugin::Container(_) => node.plugin.logs().await.unwrap_or_default(),
            };
            logs.push((format!("kleidi-{}", node.index), contents));
        }
        logs.extend(self.etcd.logs().await);
        match &self.backend {
            Backend::Vault { bao, .. } => match bao {
                Bao::Process(bao) => logs.push((
                    "openbao".into(),
                    std::fs::read(bao.dir().join("openbao.log")).unwrap_or_default(),
                )),
                Bao::Raft(raft) => {
                    for i in 0..raft.len() {
                        if let Ok(handle) = raft.handle(i) {
                            logs.push((format!("openbao-{i}"), handle.logs().await.unwrap_or_default()));
                        }
                    }
                }
            },
            Backend::Tpm { tpms, .. } => {
                for (i, t) in tpms.iter().enumerate() {
                    logs.push((format!("swtpm-{i}"), t.tpm.logs().await));
                }
            }
            Backend::AwsKms { moto, .. } => logs.push(("moto".into(), moto.logs().into_bytes())),
            Backend::Pkcs11 { .. } | Backend::Foreign { .. } => {}
        }
        logs
    }

    /// The kleidi binary the nodes run.
    pub fn kleidi_bin(&self) -> &Path {
        &self.kleidi
    }
}

/// `ip:port` of an `http://ip:port` URL.
fn url_addr(url: &str) -> Result<std::net::SocketAddr> {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("{url} is not http://ip:port"))
}

impl Cluster {
    /// Points every proxy in front of OpenBao node `j` at its current address (a restarted
    /// container may come back on another one).
    pub(crate) fn retarget_proxies(&self) -> Result<()> {
        if let Backend::Vault {
            bao: Bao::Raft(raft),
            proxies,
            ..
        } = &self.backend
        {
            let targets = raft
                .urls()
                .iter()
                .map(|u| url_addr(u))
                .collect::<Result<Vec<_>>>()?;
            for own in proxies {
                for (proxy, target) in own.iter().zip(&targets) {
                    proxy.set_target(*target);
                }
            }
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            node.prober.abort();
        }
        // A paused OpenBao or plugin is continued by its Process's own drop before the kill.
    }
}
