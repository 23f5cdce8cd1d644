//! Instructions per call, counted by callgrind: the part of the latency comparison that does not
//! depend on the machine's noise. On a shared 2-core VM the p50 of the same loop moves by 2–4× from
//! one minute to the next; the instructions a server executes for the same call do not (the same
//! binary and inputs give the same count whatever else runs).
//!
//! Each server (`kleidi serve`, the trivial server, the peer) runs under `valgrind --tool=callgrind`;
//! the bench zeroes its counters (`callgrind_control -z`), makes [`CALLS`] sequential calls, and
//! dumps them (`callgrind_control -d`): the dump holds those calls' instructions, all threads of the
//! process together. callgrind reads its control file only while the process runs code, so the
//! bench sends Status calls until each control command returns: a few Status calls (≈ 0.1 % of the
//! count) land in the figures. The raw side runs in a child process (`kleidi-bench raw-loop`) with
//! collection on only inside its measured loop (`--toggle-collect`).
//!
//! What this does not show: time spent waiting (thread hand-offs, wake-ups, the backend's own
//! process). That is what the latency tables show, with their noise.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::measure::{Method, connect, sequential, wrap};
use super::procs::Server;
use super::raw::{RawHsm, RawVault};
use super::{Backend, Config, KEK, PIN, Rts, SOFTHSM_MODULE, TOKEN};
use crate::OpenBao;

/// Calls per count: enough that the Status calls that trigger the control commands vanish.
pub const CALLS: u64 = 500;
/// The raw loop's function, the only one callgrind collects in `raw-loop`.
const RAW_FN: &str = "*raw_measured*";

/// One backend and method.
#[derive(Clone, Debug, Serialize)]
pub struct InsnRow {
    /// pkcs11 | vault.
    pub backend: String,
    /// Encrypt | Decrypt.
    pub method: String,
    /// `kleidi serve`, per call.
    pub kleidi: u64,
    /// The trivial server, per call.
    pub trivial: u64,
    /// The backend's operation in-process, per call (client side only: OpenBao's own work is in
    /// another process, for kleidi as for the raw client).
    pub raw: u64,
    /// The peer plugin, per call, when given (OpenBao only).
    pub peer: Option<u64>,
    /// kleidi ÷ (trivial + raw).
    pub ratio: f64,
}

/// Whether valgrind and callgrind_control are installed.
pub fn available() -> bool {
    let ok = |cmd: &str| {
        Command::new(cmd)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    ok("valgrind") && ok("callgrind_control")
}

/// Counts Encrypt and Decrypt for kleidi, the trivial server, the raw side and (OpenBao) the peer.
pub(super) fn count(
    cfg: &Config,
    rts: &Rts,
    b: &Backend,
    bao: Option<&OpenBao>,
) -> anyhow::Result<Vec<InsnRow>> {
    let dir = cfg.work.join(format!("callgrind-{}", b.name));
    std::fs::create_dir_all(&dir)?;

    let sock = cfg.work.join(format!("cg-kleidi-{}.sock", b.name));
    let mut cmd = under_callgrind(&dir.join("kleidi.out"));
    cmd.arg(&cfg.kleidi)
        .arg("serve")
        .arg("--listen")
        .arg(format!("unix://{}", sock.display()))
        .args(&b.serve_args);
    let kleidi = start(
        rts,
        "kleidi serve (callgrind)",
        cmd,
        &sock,
        &dir.join("kleidi.log"),
        false,
    )?;
    let kleidi_counts = per_method(rts, &kleidi, &dir.join("kleidi.out"))?;
    drop(kleidi);

    let sock = cfg.work.join(format!("cg-trivial-{}.sock", b.name));
    let mut cmd = under_callgrind(&dir.join("trivial.out"));
    cmd.arg(&cfg.self_exe)
        .arg("trivial-server")
        .arg("--socket")
        .arg(&sock);
    let trivial = start(
        rts,
        "trivial server (callgrind)",
        cmd,
        &sock,
        &dir.join("trivial.log"),
        false,
    )?;
    let trivial_counts = per_method(rts, &trivial, &dir.join("trivial.out"))?;
    drop(trivial);

    let peer_counts = match (bao, &cfg.peer) {
        (Some(bao), Some(bin)) => {
            let sock = cfg.work.join("cg-peer.sock");
            let mut cmd = under_callgrind(&dir.join("peer.out"));
            cmd.arg(bin);
            super::peer_env(&mut cmd, &sock, bao)?;
            let peer = start(rts, "peer (callgrind)", cmd, &sock, &dir.join("peer.log"), true)?;
            let counts = per_method(rts, &peer, &dir.join("peer.out"))?;
            drop(peer);
            Some(counts)
        }
        _ => None,
    };

    let [k_enc, k_dec] = kleidi_counts;
    let [t_enc, t_dec] = trivial_counts;
    let paths = [
        (Method::Encrypt, k_enc, t_enc, peer_counts.map(|[p, _]| p)),
        (Method::Decrypt, k_dec, t_dec, peer_counts.map(|[_, p]| p)),
    ];
    let mut rows = Vec::new();
    for (method, k, t, peer) in paths {
        let raw = raw_count(cfg, b, bao, method, &dir)?;
        rows.push(InsnRow {
            backend: b.name.into(),
            method: method.name().into(),
            kleidi: k,
            trivial: t,
            raw,
            peer,
            ratio: k as f64 / (t + raw).max(1) as f64,
        });
    }
    Ok(rows)
}

fn under_callgrind(out: &Path) -> Command {
    let mut cmd = Command::new("valgrind");
    cmd.arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()));
    cmd
}

fn start(
    rts: &Rts,
    name: &str,
    cmd: Command,
    sock: &Path,
    log: &Path,
    any_status: bool,
) -> anyhow::Result<Server> {
    rts.seq.block_on(Server::start(name, cmd, sock, log, any_status))
}

/// Instructions per Encrypt and per Decrypt of `server` (in that order).
fn per_method(rts: &Rts, server: &Server, out: &Path) -> anyhow::Result<[u64; 2]> {
    let mut counts = Vec::with_capacity(2);
    for method in [Method::Encrypt, Method::Decrypt] {
        counts.push(rts.seq.block_on(async {
            let mut client = connect(&server.socket).await?;
            let wrapped = wrap(&mut client).await?;
            // Warm: first calls fill caches, pools and the health verdict.
            let _ = sequential(&mut client, method, &wrapped, 50).await;
            control(&mut client, server.pid(), "-z").await?;
            let hist = sequential(&mut client, method, &wrapped, CALLS).await;
            if hist.lat().errors > 0 {
                bail!(
                    "{}: {} of {CALLS} {} calls failed under callgrind",
                    server.name,
                    hist.lat().errors,
                    method.name()
                );
            }
            let seen = dumps(out)?;
            control(&mut client, server.pid(), "-d").await?;
            let dump = dumps(out)?
                .into_iter()
                .find(|d| !seen.contains(d))
                .with_context(|| format!("{}: callgrind wrote no dump", server.name))?;
            Ok(total(&dump)? / CALLS)
        })?);
    }
    match counts[..] {
        [encrypt, decrypt] => Ok([encrypt, decrypt]),
        _ => bail!("{}: expected two counts", server.name),
    }
}

/// Runs `callgrind_control FLAG PID`, sending Status calls until it returns (callgrind acts on it
/// only while the process runs).
async fn control(client: &mut super::measure::KmsClient, pid: u32, flag: &str) -> anyhow::Result<()> {
    let mut child: Child = Command::new("callgrind_control")
        .arg(flag)
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("callgrind_control")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("callgrind_control {flag} {pid}: {status}");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("callgrind_control {flag} {pid} did not return within 60 s");
        }
        let _ = client.status(kleidi::proto::v2::StatusRequest {}).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The dump files of `out` (`out.1`, `out.2`, …).
fn dumps(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let dir = out.parent().context("dump path has no directory")?;
    let stem = out
        .file_name()
        .and_then(|n| n.to_str())
        .context("dump path has no name")?;
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("{stem}.")))
        {
            found.push(path);
        }
    }
    Ok(found)
}

/// The instruction total of a callgrind output file (its `totals:` or `summary:` line).
fn total(file: &Path) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(file)?;
    text.lines()
        .find_map(|l| l.strip_prefix("totals:").or_else(|| l.strip_prefix("summary:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{}: no totals line", file.display()))
}

/// The raw side's instructions per call, from `kleidi-bench raw-loop` under callgrind.
fn raw_count(
    cfg: &Config,
    b: &Backend,
    bao: Option<&OpenBao>,
    method: Method,
    dir: &Path,
) -> anyhow::Result<u64> {
    let out = dir.join(format!("raw-{}.out", method.name()));
    let mut cmd = under_callgrind(&out);
    cmd.arg("--collect-atstart=no")
        .arg(format!("--toggle-collect={RAW_FN}"))
        .arg(&cfg.self_exe)
        .arg("raw-loop")
        .arg("--backend")
        .arg(b.name)
        .arg("--method")
        .arg(method.name())
        .arg("--n")
        .arg(CALLS.to_string());
    if let Some(bao) = bao {
        cmd.arg("--vault-addr").arg(&bao.addr);
    }
    let done = cmd.output().context("running raw-loop under callgrind")?;
    if !done.status.success() {
        bail!(
            "raw-loop ({}, {}): {}",
            b.name,
            method.name(),
            String::from_utf8_lossy(&done.stderr)
        );
    }
    Ok(total(&out)? / CALLS)
}

/// `kleidi-bench raw-loop`: `n` sequential calls of `method` on the raw side of `backend`, inside
/// [`raw_measured`] (what callgrind collects). PKCS#11 uses the bench's token (SOFTHSM2_CONF is
/// inherited); OpenBao the root token on `vault_addr`.
pub fn raw_loop(backend: &str, method: &str, n: u64, vault_addr: Option<&str>) -> anyhow::Result<()> {
    let method = match method {
        "Encrypt" => Method::Encrypt,
        "Decrypt" => Method::Decrypt,
        other => bail!("method {other:?}: Encrypt or Decrypt"),
    };
    match backend {
        "pkcs11" => {
            let hsm = RawHsm::open(SOFTHSM_MODULE, TOKEN, KEK, PIN)?;
            let mut session = hsm.session()?;
            let (iv, ct) = session.encrypt()?;
            let ok = raw_measured(|| match method {
                Method::Decrypt => (0..n).all(|_| session.decrypt(&iv, &ct)),
                _ => (0..n).all(|_| session.encrypt().is_ok()),
            });
            if !ok {
                bail!("a raw PKCS#11 call failed");
            }
        }
        "vault" => {
            let addr = vault_addr.context("--vault-addr")?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let raw = RawVault::new(crate::raw_vault_client(addr)?, crate::KEY);
            let ct = rt.block_on(raw.encrypt())?;
            // Warm: the connection is opened outside the count, as kleidi's is.
            let _ = rt.block_on(raw.decrypt(&ct));
            let ok = raw_measured(|| {
                rt.block_on(async {
                    for _ in 0..n {
                        let ok = match method {
                            Method::Decrypt => raw.decrypt(&ct).await,
                            _ => raw.encrypt().await.is_ok(),
                        };
                        if !ok {
                            return false;
                        }
                    }
                    true
                })
            });
            if !ok {
                bail!("a raw transit call failed");
            }
        }
        other => bail!("raw-loop backend {other:?}: pkcs11 or vault"),
    }
    Ok(())
}

/// The measured part of `raw-loop`: callgrind collects only inside this function.
#[inline(never)]
fn raw_measured<T>(f: impl FnOnce() -> T) -> T {
    f()
}
