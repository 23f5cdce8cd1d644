//! `kleidi-bench`: `kleidi serve` measured from another process over its Unix socket, the way
//! kube-apiserver calls it, beside a trivial KMS v2 server (gRPC alone), the raw backend in-process
//! and, when given, a peer plugin on the same OpenBao. Every loop has a fixed count. Backends:
//! SoftHSM (PKCS#11), OpenBao (transit) and swtpm (TPM 2.0; two of them, see `tpm_setup`).
//!
//! Runtimes of this (client) process: sequential latency loops run on a current-thread runtime (no
//! cross-thread wake-ups of our own in the figures); concurrent callers run on a 2-worker
//! multi-thread runtime, each caller its own task, all on clones of one channel (one HTTP/2
//! connection, as kube-apiserver holds one per plugin).

pub mod instructions;
pub mod measure;
pub mod procs;
pub mod raw;
pub mod report;
pub mod trivial;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use kleidi::backend::tpm::TpmConfig;
use kleidi_harness::runtime::Swtpm;
use serde::Serialize;
use tokio::runtime::Runtime;

use crate::OpenBao;
use measure::{Conc, Hist, KmsClient, Lat, Method, concurrent_decrypt, connect, sequential, wrap};
use procs::Server;
use raw::{RawHsm, RawTpm, RawVault};

/// The SoftHSM module.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const TOKEN: &str = "bench";
const KEK: &str = "kek";
const PIN: &str = "bench-pin-1";
/// Concurrency levels measured.
pub const CALLERS: [u64; 3] = [1, 16, 64];
/// The TPM makes this many times fewer calls per loop: each of its commands takes milliseconds.
pub const TPM_DIVISOR: u64 = 10;

/// What to run.
pub struct Config {
    /// `kleidi` binary.
    pub kleidi: PathBuf,
    /// This binary, for `trivial-server`.
    pub self_exe: PathBuf,
    /// Peer plugin binary, if any.
    pub peer: Option<PathBuf>,
    /// Calls per latency loop.
    pub n: u64,
    /// Calls per concurrent run (split among the callers).
    pub conc_total: u64,
    /// Backends: "pkcs11", "vault", "tpm".
    pub backends: Vec<String>,
    /// Scratch directory (sockets, token, logs); also where SOFTHSM2_CONF points.
    pub work: PathBuf,
    /// Count instructions per call under callgrind (PKCS#11 and OpenBao; needs valgrind).
    pub instructions: bool,
}

/// One backend and method, every path.
#[derive(Clone, Debug, Serialize)]
pub struct LatRow {
    /// pkcs11 | vault | tpm.
    pub backend: String,
    /// Encrypt | Decrypt | Status.
    pub method: String,
    /// Through `kleidi serve`.
    pub kleidi: Lat,
    /// Through the trivial server.
    pub trivial: Lat,
    /// The backend operation in-process (none for Status).
    pub raw: Option<Lat>,
    /// Through the peer plugin (OpenBao only, with --peer-bin).
    pub peer: Option<Lat>,
    /// kleidi p50 ÷ (trivial p50 + raw p50); raw counts 0 for Status.
    pub ratio: f64,
    /// Through the trivial server with the raw call inline behind it (Encrypt and Decrypt of
    /// PKCS#11 and OpenBao).
    pub plain: Option<Lat>,
    /// kleidi p50 ÷ plain p50.
    pub plain_ratio: Option<f64>,
    /// OpenBao transit requests per kleidi RPC during the loop (audit log).
    pub kleidi_backend_requests_per_call: Option<f64>,
    /// OpenBao transit requests per peer RPC during the loop (audit log).
    pub peer_backend_requests_per_call: Option<f64>,
}

/// One backend at one concurrency.
#[derive(Clone, Debug, Serialize)]
pub struct ConcRow {
    /// pkcs11 | vault | tpm.
    pub backend: String,
    /// Through `kleidi serve`.
    pub kleidi: Conc,
    /// The backend in-process, same number of callers.
    pub raw: Conc,
    /// The trivial server over its socket, same number of callers: what gRPC alone allows.
    pub trivial: Conc,
    /// kleidi calls/s ÷ raw calls/s.
    pub ratio: f64,
    /// kleidi calls/s ÷ the lower of raw and trivial calls/s: the ceiling a plugin behind a socket
    /// can reach at all.
    pub ceiling_ratio: f64,
    /// The plain plugin (trivial server with the raw call inline), as many callers.
    pub plain: Option<Conc>,
}

/// One server runtime choice.
#[derive(Clone, Debug, Serialize)]
pub struct RuntimeRow {
    /// pkcs11 | vault | tpm.
    pub backend: String,
    /// `--runtime …` as passed.
    pub runtime: String,
    /// Sequential Decrypt.
    pub decrypt: Lat,
    /// 16 concurrent callers' Decrypts.
    pub conc16: Conc,
}

/// RSS of one `kleidi serve`.
#[derive(Clone, Debug, Serialize)]
pub struct MemRow {
    /// pkcs11 | vault | tpm.
    pub backend: String,
    /// `MALLOC_ARENA_MAX` as given to it, and the arena bound that means.
    pub arenas: String,
    /// After start and its first health probe.
    pub idle_kib: u64,
    /// After each of 3 load runs of 64 callers.
    pub after_kib: Vec<u64>,
}

/// Everything one run measured.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// The run's date and host facts.
    pub meta: serde_json::Value,
    /// Point 2.
    pub latency: Vec<LatRow>,
    /// Point 3.
    pub concurrency: Vec<ConcRow>,
    /// Point 4.
    pub runtime: Vec<RuntimeRow>,
    /// Point 6.
    pub memory: Vec<MemRow>,
    /// Instructions per call (callgrind), or empty with the reason in `instructions_note`.
    pub instructions: Vec<instructions::InsnRow>,
    /// Why instructions were not counted, if they were not.
    pub instructions_note: String,
    /// Peer: measured or why not.
    pub peer: String,
    /// Failed calls in the memory load runs.
    pub memory_errors: u64,
    /// Failed calls in the whole run.
    pub errors: u64,
    /// Wall time of the run, s.
    pub elapsed_s: f64,
}

/// The two runtimes of this process (see the module doc).
pub struct Rts {
    seq: Runtime,
    conc: Runtime,
}

impl Rts {
    /// Builds both.
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            seq: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            conc: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?,
        })
    }
}

/// How the raw side of a backend is reached.
enum RawSide {
    Hsm(RawHsm),
    /// kleidi's TPM device layer on one connection to its own swtpm.
    Tpm(Box<RawTpm>),
    /// Two clients: a reqwest pool's connections are driven by the runtime that opened them, so
    /// each of our runtimes gets its own (one shared pool hangs once the other runtime is idle).
    Vault {
        seq: Arc<RawVault>,
        conc: Arc<RawVault>,
    },
}

/// One backend's setup: how to start kleidi on it, and its raw side.
struct Backend {
    name: &'static str,
    serve_args: Vec<OsString>,
    raw: RawSide,
    /// `trivial-server` flags that put this backend behind it (none: not measured).
    plain_args: Option<Vec<OsString>>,
    /// OpenBao's file audit log, to count transit requests.
    audit: Option<PathBuf>,
    /// Calls per latency loop.
    n: u64,
    /// Calls per concurrent run.
    conc_total: u64,
}

/// What the trivial server puts behind Encrypt and Decrypt: transit on `vault_addr`, the bench's
/// SoftHSM token, or nothing (echo).
pub fn behind(vault_addr: Option<&str>, pkcs11: bool) -> anyhow::Result<trivial::Behind> {
    Ok(match (vault_addr, pkcs11) {
        (Some(addr), _) => trivial::Behind::Vault(RawVault::new(crate::raw_vault_client(addr)?, crate::KEY)),
        (None, true) => {
            let hsm = RawHsm::open(SOFTHSM_MODULE, TOKEN, KEK, PIN)?;
            trivial::Behind::Hsm(std::sync::Mutex::new(vec![hsm.session()?]), hsm)
        }
        (None, false) => trivial::Behind::Echo,
    })
}

/// Runs everything in `cfg`.
pub fn run(cfg: &Config) -> anyhow::Result<Report> {
    let start = Instant::now();
    let rts = Rts::new()?;
    let mut report = Report {
        meta: serde_json::json!({
            "n": cfg.n,
            "conc_total": cfg.conc_total,
            "tpm_n": cfg.n / TPM_DIVISOR,
            "tpm_conc_total": cfg.conc_total / TPM_DIVISOR,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "client": "latency: current-thread runtime; concurrency: 2-worker runtime, one task per caller, one shared channel",
            "tpm": if cfg.backends.iter().any(|b| b == "tpm") { TPM_NOTE } else { "not measured (not in --backends)" },
        }),
        peer: "peer: not measured (no --peer-bin)".into(),
        ..Report::default()
    };
    let trivial_sock = cfg.work.join("trivial.sock");
    let mut cmd = Command::new(&cfg.self_exe);
    cmd.arg("trivial-server").arg("--socket").arg(&trivial_sock);
    let trivial = rts.seq.block_on(Server::start(
        "trivial-server",
        cmd,
        &trivial_sock,
        &cfg.work.join("trivial.log"),
        false,
    ))?;

    for name in &cfg.backends {
        match name.as_str() {
            "pkcs11" => {
                let backend = pkcs11_setup(cfg)?;
                bench_backend(cfg, &rts, &backend, &trivial, None, &mut report)?;
            }
            "vault" => {
                let bao = OpenBao::start()?;
                let audit = cfg.work.join("bao-audit.log");
                bao.bao(&[
                    "audit",
                    "enable",
                    "file",
                    &format!("file_path={}", audit.display()),
                ])?;
                let backend = Backend {
                    name: "vault",
                    serve_args: [
                        "--backend",
                        "vault",
                        "--vault-addr",
                        bao.addr.as_str(),
                        "--vault-key",
                        crate::KEY,
                        "--vault-auth",
                        "token",
                        "--vault-token-file",
                    ]
                    .iter()
                    .map(OsString::from)
                    .chain([bao.dir.path().join("token").into_os_string()])
                    .collect(),
                    raw: RawSide::Vault {
                        seq: Arc::new(RawVault::new(bao.raw_client()?, crate::KEY)),
                        conc: Arc::new(RawVault::new(bao.raw_client()?, crate::KEY)),
                    },
                    plain_args: Some(vec!["--vault-addr".into(), bao.addr.as_str().into()]),
                    audit: Some(audit),
                    n: cfg.n,
                    conc_total: cfg.conc_total,
                };
                bench_backend(cfg, &rts, &backend, &trivial, Some(&bao), &mut report)?;
            }
            "tpm" => {
                let (backend, tpms) = tpm_setup(cfg, &rts)?;
                let result = bench_backend(cfg, &rts, &backend, &trivial, None, &mut report);
                // The raw connection flushes its objects on drop: before its swtpm goes.
                drop(backend);
                drop(tpms);
                result?;
            }
            other => anyhow::bail!("unknown backend {other:?} (pkcs11, vault, tpm)"),
        }
    }
    if !cfg.instructions {
        report.instructions_note = "not counted (--no-instructions)".into();
    } else if !instructions::available() {
        report.instructions_note = "not counted: valgrind (with callgrind_control) is not installed".into();
    }
    report.errors = report
        .latency
        .iter()
        .map(|r| {
            r.kleidi.errors
                + r.trivial.errors
                + r.raw.as_ref().map_or(0, |l| l.errors)
                + r.peer.as_ref().map_or(0, |l| l.errors)
        })
        .sum::<u64>()
        + report
            .concurrency
            .iter()
            .map(|r| r.kleidi.lat.errors + r.raw.lat.errors + r.trivial.lat.errors)
            .sum::<u64>()
        + report
            .runtime
            .iter()
            .map(|r| r.decrypt.errors + r.conc16.lat.errors)
            .sum::<u64>()
        + report.memory_errors;
    report.elapsed_s = start.elapsed().as_secs_f64();
    Ok(report)
}

/// A SoftHSM token in `cfg.work` made by `kleidi pkcs11 init` (SOFTHSM2_CONF was set by main).
fn pkcs11_setup(cfg: &Config) -> anyhow::Result<Backend> {
    let pin = cfg.work.join("pin");
    let so_pin = cfg.work.join("so-pin");
    kleidi_harness::runtime::write_private(&pin, PIN)?;
    kleidi_harness::runtime::write_private(&so_pin, "bench-so-pin")?;
    let out = Command::new(&cfg.kleidi)
        .args(["pkcs11", "init", "--pkcs11-module", SOFTHSM_MODULE])
        .args(["--pkcs11-token-label", TOKEN, "--pkcs11-key-label", KEK])
        .arg("--pkcs11-pin-file")
        .arg(&pin)
        .arg("--pkcs11-so-pin-file")
        .arg(&so_pin)
        .output()
        .with_context(|| format!("running {} pkcs11 init", cfg.kleidi.display()))?;
    if !out.status.success() {
        anyhow::bail!("kleidi pkcs11 init: {}", String::from_utf8_lossy(&out.stderr));
    }
    let serve_args = [
        "--backend",
        "pkcs11",
        "--pkcs11-module",
        SOFTHSM_MODULE,
        "--pkcs11-token-label",
        TOKEN,
        "--pkcs11-key-label",
        KEK,
        "--pkcs11-pin-file",
    ]
    .iter()
    .map(OsString::from)
    .chain([pin.into_os_string()])
    .collect();
    Ok(Backend {
        name: "pkcs11",
        serve_args,
        raw: RawSide::Hsm(RawHsm::open(SOFTHSM_MODULE, TOKEN, KEK, PIN)?),
        plain_args: Some(vec!["--pkcs11".into()]),
        audit: None,
        n: cfg.n,
        conc_total: cfg.conc_total,
    })
}

/// What the report says about the TPM rows.
const TPM_NOTE: &str = "swtpm, two local processes (kleidi-harness Swtpm), each given a KEK by `kleidi tpm init`; \
`kleidi serve --backend tpm` on one, the raw side on the other (a swtpm holds 3 loaded objects: one client's \
primary and KEK leave room for one sealed seed, and a client flushes stale objects when it connects). \
Raw = kleidi's device layer in this process: Encrypt = TPM2_Create (seal), Decrypt = TPM2_Load + \
TPM2_Unseal, in a salted HMAC session with parameter encryption. Its concurrent callers share that one \
connection (ESAPI context) behind a mutex: swtpm executes one command at a time and serves one TCP \
connection at a time, so this is the raw ceiling. 10x fewer calls per loop than the other backends.";

/// Two swtpm processes started by the harness, each with a KEK made by `kleidi tpm init` (as a
/// user would): `kleidi serve` gets the first, the raw side a connection to the second. One swtpm
/// would not do: without a resource manager it holds 3 loaded objects (two clients' primaries and
/// KEKs are 4), and a client flushes the stale objects and sessions it finds when it connects.
fn tpm_setup(cfg: &Config, rts: &Rts) -> anyhow::Result<(Backend, [Swtpm; 2])> {
    let (served, raw) = rts.seq.block_on(async {
        let served = Swtpm::start().await?;
        served.init_key(&cfg.kleidi).await?;
        let raw = Swtpm::start().await?;
        raw.init_key(&cfg.kleidi).await?;
        anyhow::Ok((served, raw))
    })?;
    let raw_side = RawTpm::open(&TpmConfig {
        tcti: raw.tcti(),
        state_dir: raw.kleidi_state_dir(),
        owner_auth_file: None,
    })
    .context("raw TPM connection")?;
    let backend = Backend {
        name: "tpm",
        serve_args: served.kleidi_flags().into_iter().map(OsString::from).collect(),
        raw: RawSide::Tpm(Box::new(raw_side)),
        // A swtpm serves one connection at a time, and both are taken.
        plain_args: None,
        audit: None,
        n: cfg.n / TPM_DIVISOR,
        conc_total: cfg.conc_total / TPM_DIVISOR,
    };
    Ok((backend, [served, raw]))
}

/// Idle RSS of `kleidi`, then after each of 3 load runs of 64 callers; and the calls that failed.
fn memory_runs(rts: &Rts, kleidi: &Server, b: &Backend, arenas: String) -> anyhow::Result<(MemRow, u64)> {
    let idle_kib = kleidi.rss_kib()?;
    let mut after_kib = Vec::new();
    let mut errors = 0;
    for _ in 0..3 {
        let run = conc_loop(rts, &kleidi.socket, 64, b.conc_total)?;
        errors += run.lat.errors;
        after_kib.push(kleidi.rss_kib()?);
    }
    let row = MemRow {
        backend: b.name.into(),
        arenas,
        idle_kib,
        after_kib,
    };
    Ok((row, errors))
}

fn start_kleidi(cfg: &Config, rts: &Rts, b: &Backend, extra: &[&str], tag: &str) -> anyhow::Result<Server> {
    start_kleidi_with(cfg, rts, b, extra, tag, &[])
}

fn start_kleidi_with(
    cfg: &Config,
    rts: &Rts,
    b: &Backend,
    extra: &[&str],
    tag: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<Server> {
    let sock = cfg.work.join(format!("kleidi-{}-{tag}.sock", b.name));
    let mut cmd = Command::new(&cfg.kleidi);
    cmd.arg("serve")
        .arg("--listen")
        .arg(format!("unix://{}", sock.display()))
        .args(&b.serve_args)
        .args(extra)
        // Only what `env` says: the bench's own environment must not choose kleidi's arenas.
        .env_remove("MALLOC_ARENA_MAX")
        .envs(env.iter().copied());
    rts.seq.block_on(Server::start(
        &format!("kleidi serve ({}, {tag})", b.name),
        cmd,
        &sock,
        &cfg.work.join(format!("kleidi-{}-{tag}.log", b.name)),
        false,
    ))
}

/// The peer's configuration (it reads only environment variables): `sock`, the bench's OpenBao,
/// root token and transit key, and a free loopback port for its health endpoint.
fn peer_env(cmd: &mut Command, sock: &Path, bao: &OpenBao) -> anyhow::Result<()> {
    cmd.env("SOCKET_PATH", sock)
        .env("VAULT_ADDRESS", &bao.addr)
        .env("VAULT_TOKEN", crate::ROOT)
        .env("VAULT_TRANSIT_KEY", crate::KEY)
        .env("HTTP_ADDRESS", format!("127.0.0.1:{}", procs::free_port()?));
    Ok(())
}

/// Transit requests in OpenBao's audit log so far (one "request" entry per HTTP request).
fn transit_requests(audit: Option<&Path>) -> Option<u64> {
    let text = std::fs::read_to_string(audit?).ok()?;
    Some(
        text.lines()
            .filter(|l| l.contains(r#""type":"request""#) && l.contains(r#""path":"transit/"#))
            .count() as u64,
    )
}

fn per_call(before: Option<u64>, after: Option<u64>, calls: u64) -> Option<f64> {
    Some(after?.saturating_sub(before?) as f64 / calls.max(1) as f64)
}

/// Sequential loop of `method` against `socket`, with the audit delta per call.
fn seq_loop(
    rts: &Rts,
    socket: &Path,
    method: Method,
    n: u64,
    audit: Option<&Path>,
) -> anyhow::Result<(Lat, Option<f64>)> {
    rts.seq.block_on(sequential_calls(socket, method, n, audit))
}

/// `n` sequential calls of `method` on a new connection to `socket`, after a few warm-up calls so
/// the connection's setup is not in the figures; with the OpenBao transit requests per call when
/// given its audit log. Run on a current-thread runtime.
pub async fn sequential_calls(
    socket: &Path,
    method: Method,
    n: u64,
    audit: Option<&Path>,
) -> anyhow::Result<(Lat, Option<f64>)> {
    let mut client: KmsClient = connect(socket).await?;
    let wrapped = wrap(&mut client).await?;
    let _ = sequential(&mut client, method, &wrapped, 10).await;
    let before = transit_requests(audit);
    let lat = sequential(&mut client, method, &wrapped, n).await.lat();
    let per = per_call(before, transit_requests(audit), lat.calls + lat.errors);
    Ok((lat, per))
}

fn conc_loop(rts: &Rts, socket: &Path, callers: u64, total: u64) -> anyhow::Result<Conc> {
    rts.conc.block_on(async {
        let client: KmsClient = connect(socket).await?;
        concurrent_decrypt(&client, callers, total).await
    })
}

fn raw_seq(rts: &Rts, raw: &RawSide, method: Method, n: u64) -> anyhow::Result<Option<Lat>> {
    if method == Method::Status {
        return Ok(None);
    }
    let hist: Hist = match raw {
        RawSide::Hsm(hsm) => hsm.session()?.sequential(method, n)?,
        RawSide::Tpm(tpm) => tpm.sequential(method, n)?,
        RawSide::Vault { seq, .. } => rts.seq.block_on(seq.sequential(method, n))?,
    };
    Ok(Some(hist.lat()))
}

fn raw_conc(rts: &Rts, raw: &RawSide, callers: u64, total: u64) -> anyhow::Result<Conc> {
    match raw {
        RawSide::Hsm(hsm) => hsm.concurrent_decrypt(callers, total),
        RawSide::Tpm(tpm) => tpm.concurrent_decrypt(callers, total),
        RawSide::Vault { conc, .. } => rts.conc.block_on(conc.concurrent_decrypt(callers, total)),
    }
}

fn bench_backend(
    cfg: &Config,
    rts: &Rts,
    b: &Backend,
    trivial: &Server,
    bao: Option<&OpenBao>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let audit = b.audit.as_deref();
    eprintln!("kleidi-bench: {} ...", b.name);
    // Point 7 first, on fresh processes: idle RSS, then 3 identical load runs; as kleidi serves
    // (one malloc arena), then with glibc's own arena bound (8 per core) given through
    // MALLOC_ARENA_MAX, which kleidi keeps (BENCHMARKS.md, Memory). One at a time: a swtpm serves
    // one connection at a time.
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let glibc = (8 * cores).to_string();
    for arenas in [None, Some(glibc.as_str())] {
        let (env, tag, label) = match arenas {
            None => (
                Vec::new(),
                "arenas-kleidi".to_string(),
                "unset: kleidi's 1".to_string(),
            ),
            Some(n) => (
                vec![("MALLOC_ARENA_MAX", n)],
                format!("arenas-{n}"),
                format!("{n}: glibc's 8 per core"),
            ),
        };
        let server = start_kleidi_with(cfg, rts, b, &[], &tag, &env)?;
        let (row, errors) = memory_runs(rts, &server, b, label)?;
        report.memory_errors += errors;
        report.memory.push(row);
    }
    let kleidi = start_kleidi(cfg, rts, b, &[], "default")?;

    // The peer on the same OpenBao and transit key, when given.
    let peer = match (bao, &cfg.peer) {
        (Some(bao), Some(bin)) => {
            let sock = cfg.work.join("peer.sock");
            let mut cmd = Command::new(bin);
            peer_env(&mut cmd, &sock, bao)?;
            let server = rts.seq.block_on(Server::start(
                "peer",
                cmd,
                &sock,
                &cfg.work.join("peer.log"),
                true,
            ))?;
            report.peer = format!("peer: {} on the same OpenBao and transit key", bin.display());
            Some(server)
        }
        _ => None,
    };

    // The plainest plugin: the trivial server with this backend's raw call behind it.
    let plain = match &b.plain_args {
        Some(args) => {
            let sock = cfg.work.join(format!("plain-{}.sock", b.name));
            let mut cmd = Command::new(&cfg.self_exe);
            cmd.arg("trivial-server").arg("--socket").arg(&sock).args(args);
            Some(rts.seq.block_on(Server::start(
                "plain plugin",
                cmd,
                &sock,
                &cfg.work.join(format!("plain-{}.log", b.name)),
                false,
            ))?)
        }
        None => None,
    };

    // Point 2: latency per method and path.
    for method in Method::ALL {
        let (k, k_req) = seq_loop(rts, &kleidi.socket, method, b.n, audit)?;
        let (t, _) = seq_loop(rts, &trivial.socket, method, b.n, None)?;
        let pl = match (&plain, method) {
            (Some(server), Method::Encrypt | Method::Decrypt) => {
                Some(seq_loop(rts, &server.socket, method, b.n, None)?.0)
            }
            _ => None,
        };
        let r = raw_seq(rts, &b.raw, method, b.n)?;
        let (p, p_req) = match &peer {
            Some(peer) => {
                let (l, req) = seq_loop(rts, &peer.socket, method, b.n, audit)?;
                (Some(l), req)
            }
            None => (None, None),
        };
        let raw_p50 = r.as_ref().map_or(0.0, |l| l.p50_us);
        report.latency.push(LatRow {
            backend: b.name.into(),
            method: method.name().into(),
            ratio: k.p50_us / (t.p50_us + raw_p50).max(1e-9),
            plain_ratio: pl.as_ref().map(|l| k.p50_us / l.p50_us.max(1e-9)),
            plain: pl,
            kleidi: k,
            trivial: t,
            raw: r,
            peer: p,
            kleidi_backend_requests_per_call: k_req,
            peer_backend_requests_per_call: p_req,
        });
    }
    drop(peer);

    // Point 3: concurrent Decrypt, kleidi vs the raw ceiling with as many callers.
    for callers in CALLERS {
        let k = conc_loop(rts, &kleidi.socket, callers, b.conc_total)?;
        let r = raw_conc(rts, &b.raw, callers, b.conc_total)?;
        let t = conc_loop(rts, &trivial.socket, callers, b.conc_total)?;
        let pl = match &plain {
            Some(server) => Some(conc_loop(rts, &server.socket, callers, b.conc_total)?),
            None => None,
        };
        report.concurrency.push(ConcRow {
            plain: pl,
            backend: b.name.into(),
            ratio: k.calls_per_s / r.calls_per_s.max(1e-9),
            ceiling_ratio: k.calls_per_s / r.calls_per_s.min(t.calls_per_s).max(1e-9),
            kleidi: k,
            raw: r,
            trivial: t,
        });
    }
    drop(kleidi);
    drop(plain);

    // Point 4: the server's runtime, one process per choice, same loops.
    let choices: [(&str, &[&str]); 3] = [
        ("multi-thread (workers = cores)", &["--runtime", "multi-thread"]),
        (
            "multi-thread, 1 worker",
            &["--runtime", "multi-thread", "--worker-threads", "1"],
        ),
        ("current-thread", &["--runtime", "current-thread"]),
    ];
    for (i, (label, args)) in choices.iter().enumerate() {
        let server = start_kleidi(cfg, rts, b, args, &format!("rt{i}"))?;
        let (decrypt, _) = seq_loop(rts, &server.socket, Method::Decrypt, b.n / 2, None)?;
        let conc16 = conc_loop(rts, &server.socket, 16, b.conc_total)?;
        report.runtime.push(RuntimeRow {
            backend: b.name.into(),
            runtime: (*label).into(),
            decrypt,
            conc16,
        });
    }

    // Instructions per call: the comparison above without the machine's noise. The TPM's cost
    // is the TPM's (milliseconds of swtpm per command), not counted.
    if cfg.instructions && b.name != "tpm" && instructions::available() {
        report.instructions.extend(instructions::count(cfg, rts, b, bao)?);
    }
    Ok(())
}
