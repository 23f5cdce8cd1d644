//! Faults as verbs on the cluster's handles, the timeline a scenario writes them on, and the
//! randomized nemesis that draws one from a seed. Every step is recorded in the history with what it
//! does to the run (breaks, heals, changes) so the checkers can tell outages from noise; a verb a
//! backend cannot do fails with a clear error naming the verb and the backend, never a silent no-op.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::cluster::{Backend, BackendKind, Cluster};
use super::history::{ALL, Effect, Event, ExitRecord, FaultRecord, ROTATE, Role};
use crate::runtime::{Fault as ProxyFault, RuntimeKind, TokenLease};

/// One fault (or heal) a scenario can put on its timeline.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// SIGKILL node `n`'s plugin (a crash: its socket file stays).
    KillPlugin(usize),
    /// SIGTERM node `n`'s plugin (a graceful stop: it removes its socket).
    StopPlugin(usize),
    /// Start node `n`'s plugin again after a kill or stop.
    StartPlugin(usize),
    /// SIGSTOP node `n`'s plugin.
    PausePlugin(usize),
    /// SIGCONT node `n`'s plugin.
    ResumePlugin(usize),
    /// Remove node `n`'s plugin socket file while it runs.
    UnlinkSocket(usize),
    /// Restart node `n`'s apiserver: empty cache, first probe inline.
    RestartApiserver(usize),
    /// Restart every apiserver at once (a control-plane upgrade).
    RestartAllApiservers,
    /// Restart etcd (SIGKILL and start on the same data).
    RestartEtcd,
    /// Stop etcd (SIGTERM); its data stays.
    StopEtcd,
    /// Start etcd again on its data.
    StartEtcd,
    /// SIGSTOP etcd.
    PauseEtcd,
    /// SIGCONT etcd.
    ResumeEtcd,
    /// Stop the OpenBao server gracefully (vault).
    StopBackend,
    /// SIGKILL the OpenBao server (vault).
    KillBackend,
    /// Start OpenBao again and unseal it (vault).
    StartBackend,
    /// SIGSTOP OpenBao: every call hangs (vault).
    PauseBackend,
    /// SIGCONT OpenBao (vault).
    ResumeBackend,
    /// Seal OpenBao (vault).
    Seal,
    /// Unseal OpenBao (vault).
    Unseal,
    /// Revoke kleidi's token (vault).
    RevokeToken,
    /// Write a new kleidi token to the token file (vault).
    NewToken(TokenLease),
    /// Rotate the KEK: a new transit version (vault); a new key label and a rolling restart of the
    /// plugins with it (pkcs11, as an operator does); `kleidi tpm init` (tpm, one node) or a new
    /// shareable KEK enrolled on every node before any node uses it (tpm, several nodes).
    RotateKey,
    /// Delete the KEK for good (vault: transit key deleted).
    DeleteKey,
    /// SIGKILL the TPM (tpm): every loaded object and session is gone; its state stays. With
    /// several nodes, node 0's TPM: one node's TPM rebooting is the fault a cluster meets.
    KillTpm,
    /// Start the TPM again on its state (tpm; node 0's with several nodes).
    StartTpm,
    /// SIGSTOP the TPM (tpm; node 0's with several nodes).
    PauseTpm,
    /// SIGCONT the TPM (tpm; node 0's with several nodes).
    ResumeTpm,
    /// Put a fault on node `n`'s proxies to OpenBao, or on every node's with `None` (vault; on the
    /// container runtime a node has a proxy per Raft node, on the network's gateway).
    Proxy(Option<usize>, ProxyFault),
    /// Take node `n`'s plugin off the run's network: no backend reachable, its socket still
    /// answers the apiserver (container runtime).
    Partition(usize),
    /// Put node `n`'s plugin back on the network (container runtime).
    HealPartition(usize),
    /// SIGKILL OpenBao's Raft leader; the others elect a new one (vault, container runtime).
    KillBackendLeader,
    /// Start the OpenBao nodes that are down: they come back sealed (vault, container runtime).
    StartBackendSealed,
    /// SIGKILL etcd member `i`; the other two keep quorum (container runtime).
    LoseEtcdMember(usize),
    /// Start etcd member `i` again on its data (container runtime).
    RestoreEtcdMember(usize),
    /// Move the token's own directory away (pkcs11).
    LoseToken,
    /// Move the whole `directories.tokendir` away (pkcs11).
    LoseTokenStore,
    /// Put every moved token directory back (pkcs11).
    RestoreToken,
    /// Replace the PIN file with a wrong PIN (pkcs11).
    WrongPin,
    /// Put the right PIN back (pkcs11).
    RightPin,
    /// End every outage: resume, start, unseal, restore, pass. Every timeline ends with it.
    HealAll,
}

impl Fault {
    /// The verb, target and effect recorded for this step.
    pub fn describe(&self) -> (String, String, Effect) {
        use Effect::{Breaks, Changes, Heals};
        let plugin = |n: &usize| format!("plugin-{n}");
        let (verb, target, effect) = match self {
            Self::KillPlugin(n) => ("kill", plugin(n), Breaks),
            Self::StopPlugin(n) => ("stop", plugin(n), Breaks),
            Self::StartPlugin(n) => ("start", plugin(n), Heals),
            Self::PausePlugin(n) => ("pause", plugin(n), Breaks),
            Self::ResumePlugin(n) => ("resume", plugin(n), Heals),
            Self::UnlinkSocket(n) => ("unlink_socket", plugin(n), Changes),
            Self::RestartApiserver(n) => ("restart_cold", format!("apiserver-{n}"), Changes),
            Self::RestartAllApiservers => ("restart_cold", "apiservers".into(), Changes),
            Self::RestartEtcd => ("restart", "etcd".into(), Changes),
            Self::StopEtcd => ("stop", "etcd".into(), Breaks),
            Self::StartEtcd => ("start", "etcd".into(), Heals),
            Self::PauseEtcd => ("pause", "etcd".into(), Breaks),
            Self::ResumeEtcd => ("resume", "etcd".into(), Heals),
            Self::StopBackend => ("stop", "openbao".into(), Breaks),
            Self::KillBackend => ("kill", "openbao".into(), Breaks),
            Self::StartBackend => ("start", "openbao".into(), Heals),
            Self::PauseBackend => ("pause", "openbao".into(), Breaks),
            Self::ResumeBackend => ("resume", "openbao".into(), Heals),
            Self::Seal => ("seal", "openbao".into(), Breaks),
            Self::Unseal => ("unseal", "openbao".into(), Heals),
            Self::RevokeToken => ("revoke_token", "openbao-token".into(), Breaks),
            Self::NewToken(_) => ("new_token", "openbao-token".into(), Heals),
            Self::RotateKey => (ROTATE, "kek".into(), Changes),
            Self::KillTpm => ("kill", "tpm".into(), Breaks),
            Self::StartTpm => ("start", "tpm".into(), Heals),
            Self::PauseTpm => ("pause", "tpm".into(), Breaks),
            Self::ResumeTpm => ("resume", "tpm".into(), Heals),
            Self::DeleteKey => ("delete_key", "kek".into(), Breaks),
            Self::Proxy(node, fault) => {
                let target = node.map_or("proxy-all".into(), |n| format!("proxy-{n}"));
                let effect = if matches!(fault, ProxyFault::Pass) {
                    Heals
                } else {
                    Breaks
                };
                ("proxy", target, effect)
            }
            Self::Partition(n) => ("partition", plugin(n), Breaks),
            Self::HealPartition(n) => ("heal_partition", plugin(n), Heals),
            Self::KillBackendLeader => ("kill_leader", "openbao".into(), Breaks),
            Self::StartBackendSealed => ("start_sealed", "openbao".into(), Changes),
            Self::LoseEtcdMember(i) => ("kill", format!("etcd-{i}"), Changes),
            Self::RestoreEtcdMember(i) => ("start", format!("etcd-{i}"), Changes),
            Self::LoseToken => ("lose_token_dir", "hsm".into(), Breaks),
            Self::LoseTokenStore => ("lose_token_store", "hsm".into(), Breaks),
            Self::RestoreToken => ("restore", "hsm".into(), Heals),
            Self::WrongPin => ("wrong_pin", "hsm-pin".into(), Breaks),
            Self::RightPin => ("right_pin", "hsm-pin".into(), Heals),
            Self::HealAll => ("heal", ALL.into(), Heals),
        };
        (verb.to_owned(), target, effect)
    }

    /// [`describe`](Self::describe) with the backend server named as `backend`'s (the backend
    /// verbs name OpenBao, the first server they broke).
    pub fn describe_for(&self, backend: BackendKind) -> (String, String, Effect) {
        let (verb, target, effect) = self.describe();
        match backend {
            BackendKind::AwsKms if target == "openbao" => (verb, "aws-kms".into(), effect),
            _ => (verb, target, effect),
        }
    }

    /// Whether `backend` can do this verb.
    pub fn applies_to(&self, backend: BackendKind) -> bool {
        let vault_only = matches!(
            self,
            Self::StopBackend
                | Self::KillBackend
                | Self::StartBackend
                | Self::PauseBackend
                | Self::ResumeBackend
                | Self::Seal
                | Self::Unseal
                | Self::RevokeToken
                | Self::NewToken(_)
                | Self::DeleteKey
                | Self::Proxy(..)
                | Self::KillBackendLeader
                | Self::StartBackendSealed
        );
        let pkcs11_only = matches!(
            self,
            Self::LoseToken | Self::LoseTokenStore | Self::RestoreToken | Self::WrongPin | Self::RightPin
        );
        let tpm_only = matches!(
            self,
            Self::KillTpm | Self::StartTpm | Self::PauseTpm | Self::ResumeTpm
        );
        // moto keeps its keys in memory: it can hang and be cut off, never stop and come back.
        let aws_too = matches!(self, Self::PauseBackend | Self::ResumeBackend | Self::Proxy(..));
        match backend {
            BackendKind::Vault => !pkcs11_only && !tpm_only,
            BackendKind::AwsKms => (!vault_only || aws_too) && !pkcs11_only && !tpm_only,
            BackendKind::Pkcs11 => !vault_only && !tpm_only,
            BackendKind::Tpm => !vault_only && !pkcs11_only,
            // No control over a foreign plugin's backend: not even a rotation.
            BackendKind::Foreign => {
                !vault_only && !pkcs11_only && !tpm_only && !matches!(self, Self::RotateKey)
            }
        }
    }
}

impl Fault {
    /// Whether `runtime` can do this verb: a network partition, a Raft leader and etcd members
    /// exist only in containers; the fault proxy sits between host processes only.
    pub fn runs_on(&self, runtime: RuntimeKind) -> bool {
        let container_only = matches!(
            self,
            Self::Partition(_)
                | Self::HealPartition(_)
                | Self::KillBackendLeader
                | Self::StartBackendSealed
                | Self::LoseEtcdMember(_)
                | Self::RestoreEtcdMember(_)
        );
        match runtime {
            RuntimeKind::Process => !container_only,
            RuntimeKind::Container => true,
        }
    }
}

/// A fault at a time (real seconds since the workload started).
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// When.
    pub at: Duration,
    /// What.
    pub fault: Fault,
}

/// `fault` at `secs` seconds: how scenario pages write their timeline.
pub fn at(secs: f64, fault: Fault) -> Step {
    Step {
        at: Duration::from_secs_f64(secs),
        fault,
    }
}

impl Cluster {
    /// Applies `fault` now and records it.
    pub async fn apply(&mut self, fault: &Fault) -> Result<()> {
        let backend = self.backend.kind();
        let (verb, target, effect) = fault.describe_for(backend);
        if !fault.applies_to(backend) {
            bail!(
                "{verb} on {target}: not supported by the {} backend",
                backend.name()
            );
        }
        if !fault.runs_on(self.runtime()) {
            bail!(
                "{verb} on {target}: not supported by the {} runtime",
                self.runtime().name()
            );
        }
        let detail = self
            .act(fault)
            .await
            .with_context(|| format!("{verb} {target}"))?;
        // A restarted OpenBao container may have a new address: the proxies follow it.
        self.retarget_proxies()?;
        self.history.record(Event::Fault(FaultRecord {
            at_ms: self.history.now_ms(),
            verb,
            target,
            effect,
            detail,
        }));
        Ok(())
    }

    async fn act(&mut self, fault: &Fault) -> Result<Option<String>> {
        match fault {
            Fault::KillPlugin(n) => {
                let node = self.nodes.get_mut(*n).context("no such node")?;
                node.down = true;
                node.plugin.kill().await?;
                self.history.record(Event::Exit(ExitRecord {
                    at_ms: self.history.now_ms(),
                    process: format!("plugin-{n}"),
                    role: Role::Plugin,
                    code: None,
                    signal: Some(9),
                    by_harness: true,
                }));
            }
            Fault::StopPlugin(n) => {
                let node = self.nodes.get_mut(*n).context("no such node")?;
                node.down = true;
                let code = node.plugin.stop(Duration::from_secs(5)).await?;
                self.history.record(Event::Exit(ExitRecord {
                    at_ms: self.history.now_ms(),
                    process: format!("plugin-{n}"),
                    role: Role::Plugin,
                    code,
                    signal: None,
                    by_harness: true,
                }));
            }
            Fault::StartPlugin(n) => self.start_plugin(*n).await?,
            Fault::PausePlugin(n) => {
                let node = self.nodes.get_mut(*n).context("no such node")?;
                node.plugin.pause().await?;
                node.paused = true;
            }
            Fault::ResumePlugin(n) => {
                let node = self.nodes.get_mut(*n).context("no such node")?;
                node.plugin.resume().await?;
                node.paused = false;
            }
            Fault::Partition(n) => {
                let node = self.nodes.get(*n).context("no such node")?;
                node.plugin
                    .disconnect(self.network.as_deref(), &format!("plugin-{n}"))
                    .await?;
            }
            Fault::HealPartition(n) => {
                let node = self.nodes.get(*n).context("no such node")?;
                node.plugin
                    .connect(self.network.as_deref(), &format!("plugin-{n}"))
                    .await?;
            }
            Fault::LoseEtcdMember(i) => {
                self.etcd.lose_member(*i).await?;
                self.etcd_lost.push(*i);
            }
            Fault::RestoreEtcdMember(i) => {
                self.etcd.restore_member(*i).await?;
                self.etcd_lost.retain(|m| m != i);
            }
            Fault::UnlinkSocket(n) => {
                let node = self.nodes.get(*n).context("no such node")?;
                std::fs::remove_file(node.socket())?;
            }
            Fault::RestartApiserver(n) => self.restart_apiserver(*n).await?,
            Fault::RestartAllApiservers => {
                for n in 0..self.nodes.len() {
                    self.restart_apiserver(n).await?;
                }
            }
            Fault::RestartEtcd => self.etcd.restart().await?,
            Fault::StopEtcd => {
                self.etcd.stop().await?;
                self.etcd_down = true;
            }
            Fault::StartEtcd => {
                self.etcd.start().await?;
                self.etcd_down = false;
            }
            Fault::PauseEtcd => {
                self.etcd.pause().await?;
                self.etcd_paused = true;
            }
            Fault::ResumeEtcd => {
                self.etcd.resume().await?;
                self.etcd_paused = false;
            }
            Fault::RotateKey => return self.rotate().await.map(Some),
            Fault::KillBackendLeader => {
                let Backend::Vault { bao, down, .. } = &mut self.backend else {
                    bail!("no OpenBao in this cluster");
                };
                let leader = bao.kill_leader().await?;
                *down = true;
                return Ok(Some(format!("openbao-{leader} was the leader")));
            }
            _ => self.act_on_backend(fault).await?,
        }
        Ok(None)
    }

    async fn start_plugin(&mut self, n: usize) -> Result<()> {
        let node = self.nodes.get_mut(n).context("no such node")?;
        if node.plugin.is_running().await {
            return Ok(());
        }
        node.plugin.start().await?;
        node.down = false;
        Ok(())
    }

    async fn act_on_backend(&mut self, fault: &Fault) -> Result<()> {
        match &mut self.backend {
            Backend::Vault {
                bao,
                proxies,
                paused,
                down,
                sealed,
                revoked,
            } => match fault {
                Fault::StopBackend => {
                    bao.stop().await?;
                    *down = true;
                }
                Fault::KillBackend => {
                    bao.kill().await?;
                    *down = true;
                }
                Fault::StartBackend => {
                    bao.start_and_unseal().await?;
                    (*down, *sealed) = (false, false);
                }
                Fault::StartBackendSealed => {
                    bao.start_sealed().await?;
                    (*down, *sealed) = (false, true);
                }
                Fault::PauseBackend => {
                    bao.pause().await?;
                    *paused = true;
                }
                Fault::ResumeBackend => {
                    bao.resume().await?;
                    *paused = false;
                }
                Fault::Seal => {
                    bao.seal().await?;
                    *sealed = true;
                }
                Fault::Unseal => {
                    bao.unseal().await?;
                    *sealed = false;
                }
                Fault::RevokeToken => {
                    bao.revoke_token().await?;
                    *revoked = true;
                }
                Fault::NewToken(lease) => {
                    bao.new_token(*lease).await?;
                    *revoked = false;
                }
                Fault::DeleteKey => bao.delete_key().await?,

                Fault::Proxy(node, proxy_fault) => match node {
                    Some(n) => proxies
                        .get(*n)
                        .context("no such proxy")?
                        .iter()
                        .for_each(|p| p.set(*proxy_fault)),
                    None => proxies.iter().flatten().for_each(|p| p.set(*proxy_fault)),
                },
                _ => bail!("not a vault fault"),
            },
            Backend::Pkcs11 {
                token,
                lost,
                saved_pin,
                ..
            } => match fault {
                Fault::LoseToken | Fault::LoseTokenStore => {
                    let dir = if matches!(fault, Fault::LoseToken) {
                        token.token_dir()?
                    } else {
                        token.dir().join("tokens")
                    };
                    let away = token.dir().join(format!("away-{}", lost.len()));
                    std::fs::rename(&dir, &away)?;
                    lost.push((dir, away));
                }
                Fault::RestoreToken => {
                    while let Some((dir, away)) = lost.pop() {
                        std::fs::rename(&away, &dir)?;
                    }
                }
                Fault::WrongPin => {
                    let pin = token.dir().join("pin");
                    if saved_pin.is_none() {
                        *saved_pin = Some(std::fs::read(&pin)?);
                    }
                    std::fs::write(&pin, "wrong-pin-0000\n")?;
                }
                Fault::RightPin => {
                    if let Some(good) = saved_pin.take() {
                        std::fs::write(token.dir().join("pin"), good)?;
                    }
                }
                _ => bail!("not a pkcs11 fault"),
            },
            Backend::Tpm { tpms, .. } => {
                let tpm = tpms.first_mut().context("no TPM")?;
                match fault {
                    Fault::KillTpm => {
                        tpm.tpm.kill().await?;
                        tpm.down = true;
                    }
                    Fault::StartTpm => {
                        tpm.tpm.start().await?;
                        tpm.down = false;
                    }
                    Fault::PauseTpm => {
                        tpm.tpm.pause().await?;
                        tpm.paused = true;
                    }
                    Fault::ResumeTpm => {
                        tpm.tpm.resume().await?;
                        tpm.paused = false;
                    }
                    _ => bail!("not a tpm fault"),
                }
            }
            Backend::AwsKms {
                moto,
                proxies,
                paused,
            } => match fault {
                Fault::PauseBackend => {
                    moto.pause()?;
                    *paused = true;
                }
                Fault::ResumeBackend => {
                    moto.resume()?;
                    *paused = false;
                }
                Fault::Proxy(node, proxy_fault) => match node {
                    Some(n) => proxies.get(*n).context("no such proxy")?.set(*proxy_fault),
                    None => proxies.iter().for_each(|p| p.set(*proxy_fault)),
                },
                _ => bail!("not an aws-kms fault"),
            },
            Backend::Foreign { .. } => bail!("a foreign plugin's backend is not the harness's to break"),
        }
        Ok(())
    }

    /// Rotates the KEK and returns the new key_id, as node 0's plugin reports it once it noticed
    /// (vault: a new transit version, seen within kleidi's health TTL; pkcs11: a new key label and a
    /// rolling restart of the plugins with it, as an operator does; tpm: a new current key in every
    /// node's state directory, which the serving plugins re-read).
    async fn rotate(&mut self) -> Result<String> {
        let before = self.plugin_key_id(0).await?;
        let kleidi = self.kleidi_bin().to_path_buf();
        match &mut self.backend {
            Backend::Vault { bao, .. } => {
                bao.rotate_key().await?;
            }
            // New key material; kleidi's key_id counts the rotations.
            Backend::AwsKms { moto, .. } => moto.rotate_key().await?,
            Backend::Pkcs11 { token, key_label, .. } => {
                let number: u32 = key_label.trim_start_matches("kek-").parse().unwrap_or(1);
                let next = format!("kek-{}", number + 1);
                token.add_key(&kleidi, &next)?;
                *key_label = next;
                for n in 0..self.nodes.len() {
                    let plugin = self.launch_plugin_after_stop(n).await?;
                    if let Some(node) = self.nodes.get_mut(n) {
                        node.plugin = plugin;
                    }
                }
            }
            Backend::Tpm { tpms, shared } => match shared {
                // `kleidi tpm init` again: a new current key; the serving plugin picks it up.
                None => {
                    tpms.first()
                        .context("no TPM")?
                        .tpm
                        .access()
                        .init_key(&kleidi)
                        .await?;
                }
                // Every node holds the new key before any node makes it current.
                Some(shared) => {
                    let access: Vec<_> = tpms.iter().map(|t| t.tpm.access()).collect();
                    shared.rotate(&kleidi, &access).await?;
                }
            },
            Backend::Foreign { .. } => bail!("a foreign plugin's key is not the harness's to rotate"),
        }
        let started = std::time::Instant::now();
        // Bounded: kleidi notices within its (compressed) health TTL.
        while started.elapsed() < Duration::from_secs(30) {
            let now = self.plugin_key_id(0).await?;
            if now != before {
                return Ok(now);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!("node 0's plugin still reports {before} 30 s after the rotation")
    }

    /// Node `n`'s plugin Status key_id, asked directly (not recorded: no apiserver asked).
    async fn plugin_key_id(&self, n: usize) -> Result<String> {
        use crate::apiserver::KmsClient;
        let node = self.nodes.get(n).context("no such node")?;
        let kms =
            crate::apiserver::connect_unix(node.socket(), crate::apiserver::Authority::Localhost).await?;
        Ok(kms
            .status()
            .await
            .map_err(|s| anyhow::anyhow!("Status: {s}"))?
            .key_id)
    }

    /// The old plugin stopped and a new one launched (a container: a new one; the old is removed
    /// when the caller replaces its handle).
    async fn launch_plugin_after_stop(&mut self, n: usize) -> Result<super::handles::Plugin> {
        let node = self.nodes.get_mut(n).context("no such node")?;
        node.plugin.stop(Duration::from_secs(5)).await?;
        self.launch_plugin(n).await
    }

    /// Ends every outage the timeline left (jepsen's final heal) and records one `heal all` step.
    pub async fn heal_all(&mut self) -> Result<()> {
        for n in 0..self.nodes.len() {
            let node = self.nodes.get_mut(n).context("no such node")?;
            if node.paused {
                node.plugin.resume().await?;
                node.paused = false;
            }
            if !node.plugin.is_running().await || !node.socket().exists() {
                let _ = node.plugin.kill().await;
                self.start_plugin(n).await?;
            }
            if let Some(network) = self.network.clone() {
                // Idempotent: reconnecting a node already on the network is refused and ignored.
                let node = self.nodes.get(n).context("no such node")?;
                let _ = node.plugin.connect(Some(&network), &format!("plugin-{n}")).await;
            }
        }
        if self.etcd_paused {
            self.etcd.resume().await?;
            self.etcd_paused = false;
        }
        for member in std::mem::take(&mut self.etcd_lost) {
            self.etcd.restore_member(member).await?;
        }
        if self.etcd_down || self.etcd.runtime() == RuntimeKind::Process {
            // start() is a no-op wait on a running process; it starts a stopped one.
            self.etcd.start().await?;
            self.etcd_down = false;
        }
        let heal = match &self.backend {
            Backend::Vault {
                paused,
                down,
                sealed,
                revoked,
                proxies,
                ..
            } => {
                let mut steps = Vec::new();
                if *paused {
                    steps.push(Fault::ResumeBackend);
                }
                if *down {
                    steps.push(Fault::StartBackend);
                } else if *sealed {
                    steps.push(Fault::Unseal);
                }
                if *revoked {
                    steps.push(Fault::NewToken(TokenLease::Ttl {
                        ttl: Duration::from_secs(3600),
                        max: Duration::from_secs(24 * 3600),
                    }));
                }
                if !proxies.is_empty() {
                    steps.push(Fault::Proxy(None, ProxyFault::Pass));
                }
                steps
            }
            Backend::Pkcs11 { lost, saved_pin, .. } => {
                let mut steps = Vec::new();
                if !lost.is_empty() {
                    steps.push(Fault::RestoreToken);
                }
                if saved_pin.is_some() {
                    steps.push(Fault::RightPin);
                }
                steps
            }
            Backend::AwsKms { paused, .. } => {
                let mut steps = Vec::new();
                if *paused {
                    steps.push(Fault::ResumeBackend);
                }
                steps.push(Fault::Proxy(None, ProxyFault::Pass));
                steps
            }
            // TPMs: below, every node's, not only the one the verbs reach.
            Backend::Tpm { .. } | Backend::Foreign { .. } => Vec::new(),
        };
        if let Backend::Tpm { tpms, .. } = &mut self.backend {
            for tpm in tpms {
                if tpm.paused {
                    tpm.tpm.resume().await?;
                    tpm.paused = false;
                }
                if tpm.down {
                    tpm.tpm.start().await?;
                    tpm.down = false;
                }
            }
        }
        for fault in heal {
            self.act_on_backend(&fault).await?;
        }
        self.retarget_proxies()?;
        self.history.record(Event::Fault(FaultRecord {
            at_ms: self.history.now_ms(),
            verb: "heal".into(),
            target: ALL.into(),
            effect: Effect::Heals,
            detail: None,
        }));
        Ok(())
    }

    /// Records any plugin that exited without the harness stopping it (a crash, a panic).
    pub async fn watch_exits(&mut self) {
        for node in &mut self.nodes {
            if let Some(exit) = node.plugin.try_exit(node.down).await {
                self.history.record(Event::Exit(ExitRecord {
                    at_ms: self.history.now_ms(),
                    process: format!("plugin-{}", node.index),
                    role: Role::Plugin,
                    code: exit.code,
                    signal: exit.signal,
                    by_harness: node.down,
                }));
                node.down = true;
            }
        }
    }
}

/// What the randomized nemesis may draw for `backend` on `runtime`: (break, heal) pairs.
fn fault_pairs(
    backend: BackendKind,
    runtime: RuntimeKind,
    nodes: usize,
    rng: &mut StdRng,
) -> (Fault, Option<Fault>) {
    let n = rng.random_range(0..nodes.max(1));
    let common = [
        (Fault::KillPlugin(n), Some(Fault::StartPlugin(n))),
        (Fault::PausePlugin(n), Some(Fault::ResumePlugin(n))),
        (Fault::RestartApiserver(n), None),
        (Fault::RestartEtcd, None),
        (Fault::RotateKey, None),
        (Fault::Partition(n), Some(Fault::HealPartition(n))),
        (Fault::LoseEtcdMember(n), Some(Fault::RestoreEtcdMember(n))),
    ];
    let specific: Vec<(Fault, Option<Fault>)> = match backend {
        BackendKind::Vault => vec![
            (Fault::KillBackend, Some(Fault::StartBackend)),
            (Fault::PauseBackend, Some(Fault::ResumeBackend)),
            (Fault::Seal, Some(Fault::Unseal)),
            (Fault::KillBackendLeader, Some(Fault::StartBackend)),
            (
                Fault::Proxy(Some(n), ProxyFault::Blackhole),
                Some(Fault::Proxy(Some(n), ProxyFault::Pass)),
            ),
            (
                Fault::Proxy(None, ProxyFault::Reset),
                Some(Fault::Proxy(None, ProxyFault::Pass)),
            ),
        ],
        BackendKind::Pkcs11 => vec![
            (Fault::LoseToken, Some(Fault::RestoreToken)),
            (Fault::LoseTokenStore, Some(Fault::RestoreToken)),
        ],
        BackendKind::Tpm => vec![
            (Fault::KillTpm, Some(Fault::StartTpm)),
            (Fault::PauseTpm, Some(Fault::ResumeTpm)),
        ],
        BackendKind::AwsKms => vec![
            (Fault::PauseBackend, Some(Fault::ResumeBackend)),
            (
                Fault::Proxy(Some(n), ProxyFault::Blackhole),
                Some(Fault::Proxy(Some(n), ProxyFault::Pass)),
            ),
            (
                Fault::Proxy(None, ProxyFault::Reset),
                Some(Fault::Proxy(None, ProxyFault::Pass)),
            ),
        ],
        BackendKind::Foreign => Vec::new(),
    };
    let all: Vec<_> = common
        .into_iter()
        .chain(specific)
        .filter(|(fault, _)| fault.applies_to(backend) && fault.runs_on(runtime))
        .collect();
    let pick = rng.random_range(0..all.len());
    all.into_iter().nth(pick).unwrap_or((Fault::RestartEtcd, None))
}

/// A fault schedule drawn from `seed` of what `backend` and `runtime` can do: one fault at a time, each held 2–12 s, 2–8 s apart, over
/// `length`; every break is healed before the next is drawn (and `HealAll` ends the run anyway).
pub fn nemesis(
    seed: u64,
    backend: BackendKind,
    runtime: RuntimeKind,
    nodes: usize,
    length: Duration,
) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x006e_656d_6573_6973);
    let mut steps = Vec::new();
    let mut t = Duration::from_secs(5);
    // Bounded: each turn advances t by at least 2 s.
    while t < length {
        let (fault, heal) = fault_pairs(backend, runtime, nodes, &mut rng);
        steps.push(Step { at: t, fault });
        t += Duration::from_millis(rng.random_range(2_000..12_000));
        if let Some(heal) = heal {
            steps.push(Step {
                at: t.min(length),
                fault: heal,
            });
        }
        t += Duration::from_millis(rng.random_range(2_000..8_000));
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_schedule_and_another_seed_another() {
        let p = RuntimeKind::Process;
        let a = nemesis(7, BackendKind::Vault, p, 3, Duration::from_secs(300));
        assert_eq!(a, nemesis(7, BackendKind::Vault, p, 3, Duration::from_secs(300)));
        assert_ne!(a, nemesis(8, BackendKind::Vault, p, 3, Duration::from_secs(300)));
        assert!(a.len() > 20, "{} steps in 5 minutes", a.len());
        assert!(a.windows(2).all(|w| w[0].at <= w[1].at), "in time order");
    }

    #[test]
    fn the_nemesis_draws_only_what_the_backend_can_do() {
        let mut drawn = std::collections::HashSet::new();
        for runtime in [RuntimeKind::Process, RuntimeKind::Container] {
            for backend in BackendKind::ALL {
                for seed in 0..20 {
                    for step in nemesis(seed, backend, runtime, 3, Duration::from_secs(120)) {
                        assert!(step.fault.applies_to(backend), "{step:?} on {backend:?}");
                        assert!(step.fault.runs_on(runtime), "{step:?} on {runtime:?}");
                        drawn.insert(step.fault.describe().0);
                    }
                }
            }
        }
        // Each runtime's own verbs are drawn at all.
        for verb in ["partition", "kill_leader", "proxy"] {
            assert!(drawn.contains(verb), "{verb} never drawn");
        }
    }

    #[test]
    fn breaks_and_heals_name_the_same_target() {
        let pairs = [
            (Fault::KillPlugin(1), Fault::StartPlugin(1)),
            (Fault::PauseBackend, Fault::ResumeBackend),
            (Fault::Seal, Fault::Unseal),
            (Fault::LoseTokenStore, Fault::RestoreToken),
            (
                Fault::Proxy(Some(2), ProxyFault::Blackhole),
                Fault::Proxy(Some(2), ProxyFault::Pass),
            ),
        ];
        for (brk, heal) in pairs {
            let (_, t1, e1) = brk.describe();
            let (_, t2, e2) = heal.describe();
            assert_eq!((t1, e1, e2), (t2, Effect::Breaks, Effect::Heals));
        }
    }
}
