//! The cluster's parts on either runtime, behind one set of verbs: a node's plugin, etcd, OpenBao, a
//! node's TPM. The process runtime's part is a local process (one etcd, one `bao server`, a swtpm per
//! node); the container runtime's is a container (a three-member etcd, a three-node OpenBao Raft
//! cluster, a kleidi and a swtpm container per node). A verb one runtime cannot do fails with an error naming the verb, the target
//! and the runtime ([`unsupported`]); nothing is silently skipped.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, anyhow};
use secrecy::SecretString;

use crate::apiserver::EtcdStore;
use crate::runtime::container::etcd_cluster::EtcdCluster;
use crate::runtime::container::kleidi_node::KleidiNode;
use crate::runtime::container::openbao_raft::OpenBaoRaft;
use crate::runtime::container::swtpm_node::SwtpmNode;
use crate::runtime::{Etcd, KleidiPlugin, OpenBao, RuntimeKind, Swtpm, TokenLease, TpmAccess};

/// Bound on etcd coming back after a start.
const ETCD_READY: Duration = Duration::from_secs(30);

/// `VERB on TARGET: not supported by the RUNTIME runtime`.
pub fn unsupported(verb: &str, target: &str, runtime: RuntimeKind) -> anyhow::Error {
    anyhow!(
        "{verb} on {target}: not supported by the {} runtime",
        runtime.name()
    )
}

/// How a plugin ended, as the history records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal, if one ended it (process runtime only: an engine reports 128 + signal as the code).
    pub signal: Option<i32>,
}

/// A node's plugin.
pub enum Plugin {
    /// `kleidi serve` (or a foreign plugin) as a local process.
    Process(Box<KleidiPlugin>),
    /// `kleidi serve` in a container; the socket on the host.
    Container(Box<KleidiNode>),
}

impl Plugin {
    /// The socket kube-apiserver (the harness) dials.
    pub fn socket(&self) -> &Path {
        match self {
            Self::Process(p) => &p.socket,
            Self::Container(c) => c.socket(),
        }
    }

    /// Which runtime it runs on.
    pub fn runtime(&self) -> RuntimeKind {
        match self {
            Self::Process(_) => RuntimeKind::Process,
            Self::Container(_) => RuntimeKind::Container,
        }
    }

    /// SIGKILL.
    pub async fn kill(&mut self) -> Result<()> {
        match self {
            Self::Process(p) => p.process.kill().await,
            Self::Container(c) => c.handle().kill().await,
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; the exit code if it had one.
    pub async fn stop(&mut self, grace: Duration) -> Result<Option<i32>> {
        match self {
            Self::Process(p) => p.process.stop(grace).await,
            Self::Container(c) => Ok(c
                .handle()
                .stop(grace)
                .await?
                .and_then(|code| i32::try_from(code).ok())),
        }
    }

    /// Starts it again after a stop or a crash; waits until it listens.
    pub async fn start(&mut self) -> Result<()> {
        match self {
            Self::Process(p) => p.restart().await,
            Self::Container(c) => c.restart().await,
        }
    }

    /// SIGSTOP (process) or the cgroup freezer (container).
    pub async fn pause(&mut self) -> Result<()> {
        match self {
            Self::Process(p) => p.process.pause(),
            Self::Container(c) => c.handle().pause().await,
        }
    }

    /// Undoes [`Self::pause`].
    pub async fn resume(&mut self) -> Result<()> {
        match self {
            Self::Process(p) => p.process.resume(),
            Self::Container(c) => c.handle().resume().await,
        }
    }

    /// Whether its main process runs.
    pub async fn is_running(&mut self) -> bool {
        match self {
            Self::Process(p) => p.process.is_running(),
            // An engine that does not answer is no evidence of an exit.
            Self::Container(c) => c.handle().is_running().await.unwrap_or(true),
        }
    }

    /// How it ended, once, if it ended since the last call.
    pub async fn try_exit(&mut self, already_down: bool) -> Option<Exit> {
        match self {
            Self::Process(p) => p.process.try_exit().map(|status| {
                use std::os::unix::process::ExitStatusExt as _;
                Exit {
                    code: status.code(),
                    signal: status.signal(),
                }
            }),
            // A container keeps its exit state: report it only for a plugin not yet known down.
            Self::Container(c) if !already_down => match c.handle().exit_code().await {
                Ok(Some(code)) => Some(Exit {
                    code: code.and_then(|c| i32::try_from(c).ok()),
                    signal: None,
                }),
                _ => None,
            },
            Self::Container(_) => None,
        }
    }

    /// Takes the node off the run's network: it reaches no backend; its socket still answers.
    pub async fn disconnect(&self, network: Option<&str>, target: &str) -> Result<()> {
        match (self, network) {
            (Self::Container(c), Some(net)) => c.handle().disconnect(net).await,
            _ => Err(unsupported("partition", target, self.runtime())),
        }
    }

    /// Puts it back.
    pub async fn connect(&self, network: Option<&str>, target: &str) -> Result<()> {
        match (self, network) {
            (Self::Container(c), Some(net)) => c.handle().connect(net).await,
            _ => Err(unsupported("heal_partition", target, self.runtime())),
        }
    }

    /// Its output so far.
    pub async fn logs(&self) -> Option<Vec<u8>> {
        match self {
            Self::Process(p) => std::fs::read(p.process.log_path()).ok(),
            Self::Container(c) => c.handle().logs().await.ok(),
        }
    }
}

/// A node's TPM: a local swtpm, or a swtpm container on the run's network.
pub enum Tpm {
    /// `swtpm` on 127.0.0.1.
    Process(Box<Swtpm>),
    /// `swtpm` in a container.
    Container(Box<SwtpmNode>),
}

impl Tpm {
    /// How the host reaches it and where kleidi's keys for it are (enrolment, rotation).
    pub fn access(&self) -> TpmAccess {
        match self {
            Self::Process(t) => t.access(),
            Self::Container(t) => t.access(),
        }
    }

    /// The backend flags of the node's `kleidi serve`.
    pub fn kleidi_flags(&self) -> Vec<String> {
        match self {
            Self::Process(t) => t.kleidi_flags(),
            Self::Container(t) => t.kleidi_flags(),
        }
    }

    /// SIGKILL: every loaded object and session gone; the NVRAM stays.
    pub async fn kill(&mut self) -> Result<()> {
        match self {
            Self::Process(t) => t.kill().await,
            Self::Container(t) => t.handle().kill().await,
        }
    }

    /// Started again on its NVRAM; waits until it answers a TPM command.
    pub async fn start(&mut self) -> Result<()> {
        match self {
            Self::Process(t) => t.start_again().await,
            Self::Container(t) => t.start_again().await,
        }
    }

    /// SIGSTOP (process) or the cgroup freezer (container): commands to it hang.
    pub async fn pause(&mut self) -> Result<()> {
        match self {
            Self::Process(t) => t.pause(),
            Self::Container(t) => t.handle().pause().await,
        }
    }

    /// Undoes [`Self::pause`].
    pub async fn resume(&mut self) -> Result<()> {
        match self {
            Self::Process(t) => t.resume(),
            Self::Container(t) => t.handle().resume().await,
        }
    }

    /// Its output so far.
    pub async fn logs(&self) -> Vec<u8> {
        match self {
            Self::Process(t) => std::fs::read(t.process.log_path()).unwrap_or_default(),
            Self::Container(t) => t.handle().logs().await.unwrap_or_default(),
        }
    }
}

/// etcd: one local process, or a three-member cluster in containers.
pub enum EtcdPart {
    /// `etcd` on 127.0.0.1.
    Process(Box<Etcd>),
    /// Members in containers.
    Cluster(Box<EtcdCluster>),
}

impl EtcdPart {
    /// Which runtime it runs on.
    pub fn runtime(&self) -> RuntimeKind {
        match self {
            Self::Process(_) => RuntimeKind::Process,
            Self::Cluster(_) => RuntimeKind::Container,
        }
    }

    /// A client over every endpoint.
    pub async fn client(&self) -> Result<EtcdStore> {
        match self {
            Self::Process(e) => e.client().await,
            Self::Cluster(c) => c.client().await,
        }
    }

    /// Every member SIGKILLed and started again on its data.
    pub async fn restart(&mut self) -> Result<()> {
        match self {
            Self::Process(e) => {
                e.process.kill().await?;
                e.process.start()?;
                e.wait_ready(ETCD_READY).await
            }
            Self::Cluster(c) => {
                for i in 0..c.len() {
                    c.kill(i).await?;
                }
                c.start_all().await?;
                c.wait_ready(ETCD_READY).await
            }
        }
    }

    /// Every member stopped (SIGTERM); data stays.
    pub async fn stop(&mut self) -> Result<()> {
        match self {
            Self::Process(e) => e.process.stop(Duration::from_secs(10)).await.map(|_| ()),
            Self::Cluster(c) => c.stop_all().await,
        }
    }

    /// Every member started again; waits until it serves.
    pub async fn start(&mut self) -> Result<()> {
        match self {
            Self::Process(e) => {
                if !e.process.is_running() {
                    e.process.start()?;
                }
                e.wait_ready(ETCD_READY).await
            }
            Self::Cluster(c) => {
                c.start_all().await?;
                c.wait_ready(ETCD_READY).await
            }
        }
    }

    /// Every member frozen.
    pub async fn pause(&mut self) -> Result<()> {
        match self {
            Self::Process(e) => e.process.pause(),
            Self::Cluster(c) => c.pause_all().await,
        }
    }

    /// Every member thawed.
    pub async fn resume(&mut self) -> Result<()> {
        match self {
            Self::Process(e) => e.process.resume(),
            Self::Cluster(c) => c.resume_all().await,
        }
    }

    /// Member `i` killed: the others keep quorum.
    pub async fn lose_member(&mut self, i: usize) -> Result<()> {
        match self {
            Self::Process(_) => Err(unsupported("lose_member", &format!("etcd-{i}"), self.runtime())),
            Self::Cluster(c) => c.kill(i).await,
        }
    }

    /// Member `i` started again on its data; waits until the cluster serves.
    pub async fn restore_member(&mut self, i: usize) -> Result<()> {
        match self {
            Self::Process(_) => Err(unsupported(
                "restore_member",
                &format!("etcd-{i}"),
                self.runtime(),
            )),
            Self::Cluster(c) => {
                c.start(i).await?;
                c.wait_ready(ETCD_READY).await
            }
        }
    }

    /// Member names (the process runtime's one member is `etcd`).
    pub fn members(&self) -> Vec<String> {
        match self {
            Self::Process(_) => vec!["etcd".into()],
            Self::Cluster(c) => (0..c.len())
                .filter_map(|i| c.name(i).ok().map(str::to_string))
                .collect(),
        }
    }

    /// Its logs: (name, bytes).
    pub async fn logs(&self) -> Vec<(String, Vec<u8>)> {
        match self {
            Self::Process(e) => vec![(
                "etcd".into(),
                std::fs::read(e.process.log_path()).unwrap_or_default(),
            )],
            Self::Cluster(c) => {
                let mut logs = Vec::new();
                for i in 0..c.len() {
                    // Named by member, not container: log names starting `kleidi` are the plugins'.
                    if let Ok(handle) = c.handle(i) {
                        logs.push((format!("etcd-{i}"), handle.logs().await.unwrap_or_default()));
                    }
                }
                logs
            }
        }
    }
}

/// OpenBao: one `bao server` on 127.0.0.1, or a three-node Raft cluster in containers.
pub enum Bao {
    /// A local `bao server`.
    Process(Box<OpenBao>),
    /// Raft nodes in containers.
    Raft(Box<OpenBaoRaft>),
}

impl Bao {
    /// Which runtime it runs on.
    pub fn runtime(&self) -> RuntimeKind {
        match self {
            Self::Process(_) => RuntimeKind::Process,
            Self::Raft(_) => RuntimeKind::Container,
        }
    }

    /// Graceful stop of every node.
    pub async fn stop(&mut self) -> Result<()> {
        match self {
            Self::Process(b) => b.stop().await,
            Self::Raft(r) => {
                for i in 0..r.len() {
                    r.stop(i).await?;
                }
                Ok(())
            }
        }
    }

    /// SIGKILL of every node.
    pub async fn kill(&mut self) -> Result<()> {
        match self {
            Self::Process(b) => b.kill().await,
            Self::Raft(r) => {
                for i in 0..r.len() {
                    r.kill(i).await?;
                }
                Ok(())
            }
        }
    }

    /// Every node started again (stopped ones only) and unsealed; waits for a leader.
    pub async fn start_and_unseal(&mut self) -> Result<()> {
        match self {
            Self::Process(b) => b.restart_and_unseal().await,
            Self::Raft(r) => {
                start_stopped(r).await?;
                r.unseal_all().await?;
                r.wait_leader(Duration::from_secs(60)).await.map(|_| ())
            }
        }
    }

    /// Every node frozen.
    pub async fn pause(&mut self) -> Result<()> {
        match self {
            Self::Process(b) => b.pause(),
            Self::Raft(r) => {
                for i in 0..r.len() {
                    r.pause(i).await?;
                }
                Ok(())
            }
        }
    }

    /// Every node thawed.
    pub async fn resume(&mut self) -> Result<()> {
        match self {
            Self::Process(b) => b.resume(),
            Self::Raft(r) => {
                for i in 0..r.len() {
                    r.resume(i).await?;
                }
                Ok(())
            }
        }
    }

    /// Every node sealed.
    pub async fn seal(&mut self) -> Result<()> {
        match self {
            Self::Process(b) => b.seal().await,
            Self::Raft(r) => r.seal_all().await,
        }
    }

    /// Every node unsealed.
    pub async fn unseal(&mut self) -> Result<()> {
        match self {
            Self::Process(b) => b.unseal().await,
            Self::Raft(r) => {
                r.unseal_all().await?;
                r.wait_leader(Duration::from_secs(60)).await.map(|_| ())
            }
        }
    }

    /// The current leader SIGKILLed; which node it was.
    pub async fn kill_leader(&mut self) -> Result<usize> {
        match self {
            Self::Process(_) => Err(unsupported("kill_leader", "openbao", self.runtime())),
            Self::Raft(r) => {
                let leader = r.leader().await?;
                r.kill(leader).await?;
                Ok(leader)
            }
        }
    }

    /// Stopped nodes started again: they come back sealed and stay so until [`Self::unseal`].
    pub async fn start_sealed(&mut self) -> Result<()> {
        match self {
            Self::Process(_) => Err(unsupported("start_sealed", "openbao nodes", self.runtime())),
            Self::Raft(r) => start_stopped(r).await,
        }
    }

    /// kleidi's token revoked.
    pub async fn revoke_token(&mut self) -> Result<()> {
        match self {
            Self::Process(b) => b.revoke_token().await,
            Self::Raft(r) => r.revoke_token().await,
        }
    }

    /// A new kleidi token in the token file.
    pub async fn new_token(&mut self, lease: TokenLease) -> Result<()> {
        match self {
            Self::Process(b) => b.new_token(lease).await,
            Self::Raft(r) => r.new_token(lease).await,
        }
    }

    /// The transit key deleted.
    pub async fn delete_key(&mut self) -> Result<()> {
        match self {
            Self::Process(b) => b.delete_key().await,
            Self::Raft(r) => r.delete_key().await,
        }
    }

    /// A new transit key version.
    pub async fn rotate_key(&mut self) -> Result<u64> {
        match self {
            Self::Process(b) => b.rotate_key().await,
            Self::Raft(r) => r.rotate_key().await,
        }
    }

    /// kleidi's current token.
    pub fn kleidi_token(&self) -> Result<SecretString> {
        match self {
            Self::Process(b) => b.kleidi_token(),
            Self::Raft(r) => r.kleidi_token(),
        }
    }
}

/// Starts every node that is not running; each comes back sealed.
async fn start_stopped(raft: &OpenBaoRaft) -> Result<()> {
    for i in 0..raft.len() {
        if !raft.handle(i)?.is_running().await? {
            raft.start(i).await?;
        }
    }
    Ok(())
}
