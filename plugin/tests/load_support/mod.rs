//! Load and soak support: one `kleidi serve` in front of each real backend (a SoftHSM token, an
//! OpenBao dev server, a swtpm), clients that each hold a connection of their own and do Encrypt
//! then Decrypt of a random seed until a deadline, a Status poller beside them, and what /proc
//! says of the plugin: RSS, open fds by kind, threads, CPU time. Everything listens on Unix
//! sockets or 127.0.0.1, every loop ends at its deadline, and every process is killed on drop.
//! The checks and the numbers they allow live in the test files (`load.rs`, `soak.rs`).
// Test support: a failed setup step should panic with its message.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kleidi::proto::v2;
use rand::Rng;

use crate::support::{KEK, Kleidi, Token, seed, status_kib};
use crate::swtpm::Node;
use crate::vault_support::Bao;

type Client = v2::key_management_service_client::KeyManagementServiceClient<tonic::transport::Channel>;

/// A backend kleidi serves in these tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Pkcs11,
    Vault,
    Tpm,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Pkcs11 => "pkcs11",
            Backend::Vault => "vault",
            Backend::Tpm => "tpm",
        })
    }
}

/// What keeps a backend alive; dropped after the plugin in front of it.
enum Keep {
    Token(Token),
    Bao(Bao),
    Tpm(Node),
}

/// A `kleidi serve` process in front of its own backend; both killed on drop (plugin first).
pub struct Served {
    pub kleidi: Kleidi,
    pub backend: Backend,
    keep: Keep,
    _dir: tempfile::TempDir,
}

impl Served {
    /// Starts `backend` and `kleidi serve` for it with `extra` flags.
    pub async fn start(backend: Backend, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut env = Vec::new();
        let (mut args, keep): (Vec<String>, Keep) = match backend {
            Backend::Pkcs11 => {
                let token = Token::new();
                env.push(("SOFTHSM2_CONF", token.conf()));
                let mut args = vec!["--backend".into(), "pkcs11".into()];
                args.extend(token.flags(KEK));
                (args, Keep::Token(token))
            }
            Backend::Vault => {
                let bao = Bao::dev();
                // Longer than any soak: a token that expires mid-run would be an error of the test.
                let file = bao.file("token", &bao.kleidi_token("kek", "4h"));
                let args = [
                    "--backend",
                    "vault",
                    "--vault-addr",
                    &bao.addr,
                    "--vault-key",
                    "kek",
                    "--vault-auth",
                    "token",
                    "--vault-token-file",
                    file.to_str().unwrap(),
                ];
                (args.map(String::from).to_vec(), Keep::Bao(bao))
            }
            Backend::Tpm => {
                let node = Node::new();
                let config = node.config();
                kleidi::backend::tpm::init(&config).await.unwrap();
                let args = vec![
                    "--backend".into(),
                    "tpm".into(),
                    "--tpm-tcti".into(),
                    config.tcti,
                    "--tpm-state-dir".into(),
                    config.state_dir.display().to_string(),
                ];
                (args, Keep::Tpm(node))
            }
        };
        args.extend(extra.iter().map(|s| s.to_string()));
        let kleidi = Kleidi::serve(dir.path(), &backend.to_string(), &args, &env);
        Served {
            kleidi,
            backend,
            keep,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.kleidi.child.id()
    }

    /// The backend server's process, if it is one (SoftHSM runs inside kleidi).
    pub fn backend_pid(&self) -> Option<u32> {
        match &self.keep {
            Keep::Token(_) => None,
            Keep::Bao(bao) => bao.pid(),
            Keep::Tpm(node) => node.tpm.pid(),
        }
    }

    /// Status, an Encrypt and a Decrypt on a connection of their own, so that the backend's
    /// connections and sessions exist before anything is measured; the key_id Status names.
    pub async fn warm_up(&self) -> String {
        let mut client = self.kleidi.v2().await;
        let status = client.status(v2::StatusRequest {}).await.unwrap().into_inner();
        assert_eq!(status.healthz, "ok", "{}", self.kleidi.logs());
        let s = seed();
        let encrypted = encrypt(&mut client, &s).await.unwrap();
        assert_eq!(encrypted.key_id, status.key_id);
        assert_eq!(decrypt(&mut client, &encrypted).await.unwrap(), s);
        status.key_id
    }

    /// Lines kleidi logged at WARN or ERROR (at its default filter a healthy run logs none).
    pub fn complaints(&self) -> Vec<String> {
        self.kleidi
            .logs()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(String::from)
            .collect()
    }
}

async fn encrypt(client: &mut Client, plaintext: &[u8]) -> Result<v2::EncryptResponse, tonic::Status> {
    let request = v2::EncryptRequest {
        plaintext: plaintext.to_vec(),
        uid: uuid::Uuid::new_v4().to_string(),
    };
    client.encrypt(request).await.map(tonic::Response::into_inner)
}

async fn decrypt(client: &mut Client, encrypted: &v2::EncryptResponse) -> Result<Vec<u8>, tonic::Status> {
    let request = v2::DecryptRequest {
        ciphertext: encrypted.ciphertext.clone(),
        uid: uuid::Uuid::new_v4().to_string(),
        key_id: encrypted.key_id.clone(),
        annotations: encrypted.annotations.clone(),
    };
    client.decrypt(request).await.map(|r| r.into_inner().plaintext)
}

/// How a workload runs: its clients and how long, each client's pause between round trips
/// (none: back to back), how often the poller asks Status.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub clients: usize,
    pub length: Duration,
    pub pace: Option<Duration>,
    pub status_every: Duration,
}

/// What one client (or a whole workload) saw.
#[derive(Default)]
pub struct Tally {
    /// Successful RPCs (each Encrypt, Decrypt and Status).
    pub rpcs: u64,
    /// Latency of each successful Encrypt and Decrypt, in µs (sorted once [`run`] returns).
    pub latencies_us: Vec<u32>,
    /// Everything that went wrong, the first [`Tally::KEPT`] in words.
    pub errors: u64,
    pub first_errors: Vec<String>,
}

impl Tally {
    const KEPT: usize = 20;

    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.first_errors.len() < Self::KEPT {
            self.first_errors.push(what);
        }
    }

    fn add(&mut self, other: Tally) {
        self.rpcs += other.rpcs;
        self.latencies_us.extend(other.latencies_us);
        self.errors += other.errors;
        let room = Self::KEPT.saturating_sub(self.first_errors.len());
        self.first_errors
            .extend(other.first_errors.into_iter().take(room));
    }

    /// The `q`-quantile (0..=1) of the calls' latencies, of a tally [`run`] returned.
    pub fn latency(&self, q: f64) -> Duration {
        let last = self.latencies_us.len().saturating_sub(1);
        // Nearest rank: q ≤ 1 and len < 2^52, so the casts lose nothing.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let at = ((last as f64) * q).round() as usize;
        Duration::from_micros(self.latencies_us.get(at).copied().unwrap_or(0).into())
    }
}

/// Runs `load` against `served` until its deadline: `load.clients` clients, each on a connection
/// of its own, Encrypt then Decrypt of a fresh random seed (checking the key_id Status named and
/// the plaintext), and at the end each decrypts again its first ciphertext of the run; meanwhile
/// one more connection polls Status (healthz ok, the same key_id). Returns when every client is
/// done and its connection dropped.
pub async fn run(served: &Arc<Served>, key_id: &str, load: Workload) -> Tally {
    let until = Instant::now() + load.length;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..load.clients {
        let (served, key_id) = (Arc::clone(served), key_id.to_owned());
        tasks.spawn(async move { client(&served, &key_id, until, load.pace).await });
    }
    let (poller, key) = (Arc::clone(served), key_id.to_owned());
    tasks.spawn(async move { poll_status(&poller, &key, until, load.status_every).await });
    let mut total = Tally::default();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(tally) => total.add(tally),
            Err(e) => total.error(format!("a client panicked: {e}")),
        }
    }
    total.latencies_us.sort_unstable();
    total
}

async fn client(served: &Served, key_id: &str, until: Instant, pace: Option<Duration>) -> Tally {
    let mut tally = Tally::default();
    let mut client = served.kleidi.v2().await;
    if let Some(pace) = pace {
        // Spread the clients over one pause, so they do not call in step.
        let offset = rand::rng().random_range(Duration::ZERO..pace);
        tokio::time::sleep_until((Instant::now() + offset).min(until).into()).await;
    }
    let mut first = None;
    while Instant::now() < until {
        if let Some(done) = round_trip(&mut client, key_id, &mut tally).await {
            first.get_or_insert(done);
        }
        if let Some(pace) = pace {
            tokio::time::sleep_until((Instant::now() + pace).min(until).into()).await;
        }
    }
    if let Some((s, encrypted)) = first {
        match decrypt(&mut client, &encrypted).await {
            Ok(plaintext) if plaintext == s => tally.rpcs += 1,
            Ok(_) => tally.error("the run's first ciphertext decrypted to another plaintext".into()),
            Err(e) => tally.error(format!("decrypt of the run's first ciphertext: {e:?}")),
        }
    }
    tally
}

/// Encrypt then Decrypt of a fresh seed, checked; the seed and its ciphertext when both worked.
async fn round_trip(
    client: &mut Client,
    key_id: &str,
    tally: &mut Tally,
) -> Option<(Vec<u8>, v2::EncryptResponse)> {
    let s = seed();
    let started = Instant::now();
    let encrypted = encrypt(client, &s)
        .await
        .map_err(|e| tally.error(format!("encrypt: {e:?}")))
        .ok()?;
    tally.timed(started);
    if encrypted.key_id != key_id {
        tally.error(format!(
            "encrypt answered key_id {:?}, Status {key_id:?}",
            encrypted.key_id
        ));
    }
    let started = Instant::now();
    match decrypt(client, &encrypted).await {
        Ok(plaintext) if plaintext == s => tally.timed(started),
        Ok(_) => tally.error("decrypt answered another plaintext".into()),
        Err(e) => tally.error(format!("decrypt: {e:?}")),
    }
    Some((s, encrypted))
}

impl Tally {
    fn timed(&mut self, started: Instant) {
        self.rpcs += 1;
        let us = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
        self.latencies_us.push(us);
    }
}

/// The apiserver's side: Status on a connection of its own every `every`, healthz ok, same key_id.
async fn poll_status(served: &Served, key_id: &str, until: Instant, every: Duration) -> Tally {
    let mut tally = Tally::default();
    let mut client = served.kleidi.v2().await;
    while Instant::now() < until {
        match client.status(v2::StatusRequest {}).await {
            Ok(r) => {
                let r = r.into_inner();
                if r.healthz == "ok" && r.key_id == key_id {
                    tally.rpcs += 1;
                } else {
                    tally.error(format!("Status under load: {r:?}"));
                }
            }
            Err(e) => tally.error(format!("Status: {e:?}")),
        }
        tokio::time::sleep_until((Instant::now() + every).min(until).into()).await;
    }
    tally
}

/// The plugin's open fds by kind: Unix sockets (the listener and client connections), TCP
/// sockets (backend connections: OpenBao's HTTP pool, the swtpm connection), everything else
/// (files, pipes, eventfd, epoll).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fds {
    pub unix: usize,
    pub tcp: usize,
    pub other: usize,
}

impl Fds {
    pub fn total(&self) -> usize {
        self.unix + self.tcp + self.other
    }

    /// Everything but backend TCP connections, whose number a connection pool decides.
    pub fn own(&self) -> usize {
        self.unix + self.other
    }
}

impl fmt::Display for Fds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} fds ({} unix, {} tcp, {} other)",
            self.total(),
            self.unix,
            self.tcp,
            self.other
        )
    }
}

/// The socket inodes a /proc/PID/net table lists (its 10th column).
fn socket_inodes(pid: u32, table: &str) -> HashSet<String> {
    std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(if table == "unix" { 6 } else { 9 }))
        .map(String::from)
        .collect()
}

/// What each of `pid`'s fds points at (`socket:[123]`, `anon_inode:[eventpoll]`, a path).
pub fn fd_targets(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|t| t.display().to_string())
        .collect()
}

pub fn fds(pid: u32) -> Fds {
    let targets = fd_targets(pid);
    let unix = socket_inodes(pid, "unix");
    let mut tcp = socket_inodes(pid, "tcp");
    tcp.extend(socket_inodes(pid, "tcp6"));
    let mut fds = Fds::default();
    for t in &targets {
        match t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
            Some(inode) if tcp.contains(inode) => fds.tcp += 1,
            Some(inode) if unix.contains(inode) => fds.unix += 1,
            _ => fds.other += 1,
        }
    }
    fds
}

/// `pid`'s fds grouped by what they point at, socket inodes and paths folded (for messages).
pub fn fd_kinds(pid: u32) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for t in fd_targets(pid) {
        let kind = t.split_once(":[").map_or(t.as_str(), |(k, _)| k).to_owned();
        *kinds.entry(kind).or_insert(0) += 1;
    }
    kinds
}

/// USER_HZ: the unit of /proc/PID/stat's CPU times.
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    })
}

/// CPU time (user + system) `pid` has used so far.
pub fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which may itself hold spaces and parentheses.
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of proc(5); fields[0] is field 3.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    #[allow(clippy::cast_precision_loss)] // ticks of a test run stay far below 2^52
    Duration::from_secs_f64(ticks as f64 / clock_ticks())
}

/// One look at the plugin.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub rss_kib: u64,
    pub fds: Fds,
    pub threads: u64,
    pub cpu: Duration,
}

pub fn sample(pid: u32) -> Sample {
    Sample {
        rss_kib: status_kib(pid, "VmRSS:"),
        fds: fds(pid),
        threads: std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap(),
        cpu: cpu(pid),
    }
}

/// Samples `pid` every 100 ms until `done` holds for a sample or `limit` has passed; the last
/// sample and how long it took.
pub async fn settle(pid: u32, limit: Duration, done: impl Fn(&Sample) -> bool) -> (Sample, Duration) {
    let started = Instant::now();
    loop {
        let s = sample(pid);
        if done(&s) || started.elapsed() >= limit {
            return (s, started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The plugin at rest: no client connected, its backend connections made (after
/// [`Served::warm_up`]); waits until two samples a second apart agree on the fds.
pub async fn idle(pid: u32) -> Sample {
    let mut last = sample(pid);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = sample(pid);
        if now.fds == last.fds {
            return now;
        }
        last = now;
    }
    panic!("kleidi's fds never settled: {} {:?}", last.fds, fd_kinds(pid));
}

/// TCP connections to OpenBao a Vault plugin may hold beyond one per client. Each client has at
/// most one call in flight; beyond those kleidi makes its own (the health probe's key read,
/// encrypt and decrypt; the token's lookup and renewal), and reqwest keeps a connection whose call
/// was dropped at the call timeout until it is closed. Seen: 68 with 64 clients, while CI ran the
/// load tests beside the soak (66 failed there).
pub const VAULT_CONNECTIONS_BEYOND_CLIENTS: usize = 8;

/// A whole number of seconds from env var `name`, or `default`.
pub fn secs_from_env(name: &str, default: u64) -> Duration {
    let secs = std::env::var(name).map_or(default, |v| {
        v.trim().parse().unwrap_or_else(|e| panic!("{name}={v:?}: {e}"))
    });
    Duration::from_secs(secs)
}

pub fn mib(kib: u64) -> String {
    #[allow(clippy::cast_precision_loss)] // RSS in KiB stays far below 2^52
    let mib = kib as f64 / 1024.0;
    format!("{mib:.1} MiB")
}
