//! A real swtpm (Debian `swtpm`) as a local process: TPM 2.0 on two adjacent free 127.0.0.1 ports
//! (the swtpm TCTI finds the control channel at port + 1), its NVRAM state in its own temp dir,
//! and a directory for kleidi's TPM-wrapped keys beside it. Fault verbs and what survives them:
//! `kill` (state stays on disk), `restart` (killed and started on the same state: a rebooted
//! TPM), `pause`/`resume` (SIGSTOP: the TPM hangs), `wipe` (started on empty state: a cleared
//! TPM, a replaced board). Readiness is a real TPM round trip (TPM2_GetRandom), not a port check.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::Process;
use super::etcd::which;

/// TPM2_GetRandom(8) with no sessions: tag TPM_ST_NO_SESSIONS, size 12, TPM_CC_GetRandom.
const GET_RANDOM: [u8; 12] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8];
/// CMD_GET_TPMESTABLISHED on the control channel: answered by the TPM library, also while a
/// client holds the data channel.
const GET_ESTABLISHED: [u8; 4] = [0, 0, 0, 0x04];
/// How long a readiness probe waits for one answer (a paused swtpm never answers).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const READY_LIMIT: Duration = Duration::from_secs(20);

/// One software TPM for one node of a run.
pub struct Swtpm {
    /// The process (fault verbs also on it: stop, kill, pause, …).
    pub process: Process,
    port: u16,
    dir: tempfile::TempDir,
}

impl Swtpm {
    /// Starts swtpm on fresh state and waits until it answers a TPM command.
    pub async fn start() -> Result<Self> {
        let bin = which("swtpm")
            .context("swtpm is not installed: run `just deps` (apt-get install swtpm swtpm-tools)")?;
        let dir = tempfile::Builder::new().prefix("kleidi-swtpm-").tempdir()?;
        std::fs::create_dir(dir.path().join("state"))?;
        let port = free_port_pair()?;
        let args: Vec<String> = [
            "socket",
            "--tpm2",
            "--server",
            &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
            "--ctrl",
            &format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
            "--tpmstate",
            &format!("dir={}", dir.path().join("state").display()),
            "--flags",
            "not-need-init,startup-clear",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let process = Process::spawn("swtpm", &bin, &args, &[], &dir.path().join("swtpm.log"))?;
        let tpm = Swtpm { process, port, dir };
        tpm.wait_ready(READY_LIMIT).await?;
        Ok(tpm)
    }

    /// `--tpm-tcti` for kleidi.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// `--tpm-state-dir` for kleidi: its TPM-wrapped keys for this TPM.
    pub fn kleidi_state_dir(&self) -> PathBuf {
        self.dir.path().join("kleidi")
    }

    /// swtpm's own NVRAM state (what [`Swtpm::wipe`] deletes).
    pub fn tpm_state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The scratch dir (logs and sockets may go here too).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The backend flags of `kleidi serve` (and `kleidi tpm …`) for this TPM.
    pub fn kleidi_flags(&self) -> Vec<String> {
        vec![
            "--backend".into(),
            "tpm".into(),
            "--tpm-tcti".into(),
            self.tcti(),
            "--tpm-state-dir".into(),
            self.kleidi_state_dir().display().to_string(),
        ]
    }

    /// `kleidi tpm init` on this TPM (the command a user runs): a new current key. Returns its key_id.
    pub fn init_key(&self, kleidi: &Path) -> Result<String> {
        let out = std::process::Command::new(kleidi)
            .args(["tpm", "init", "--tpm-tcti", &self.tcti(), "--tpm-state-dir"])
            .arg(self.kleidi_state_dir())
            .env("TSS2_LOG", "all+none")
            .output()
            .with_context(|| format!("running {}", kleidi.display()))?;
        if !out.status.success() {
            bail!("kleidi tpm init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// SIGKILL: the TPM is gone; its state stays on disk.
    pub async fn kill(&mut self) -> Result<()> {
        self.process.kill().await
    }

    /// Starts it again after a kill or stop, on the same state and ports, and waits until it answers.
    pub async fn start_again(&mut self) -> Result<()> {
        self.process.start()?;
        self.wait_ready(READY_LIMIT).await
    }

    /// Killed and started on the same state: a rebooted TPM (every loaded object and session gone).
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await?;
        self.start_again().await
    }

    /// SIGSTOP: the TPM holds its sockets and answers nothing.
    pub fn pause(&self) -> Result<()> {
        self.process.pause()
    }

    /// Undoes [`Swtpm::pause`].
    pub fn resume(&self) -> Result<()> {
        self.process.resume()
    }

    /// Killed, its state deleted, started again on the same ports: a TPM that lost every key.
    /// kleidi's state directory stays (its blobs no longer load).
    pub async fn wipe(&mut self) -> Result<()> {
        self.kill().await?;
        std::fs::remove_dir_all(self.tpm_state_dir())?;
        std::fs::create_dir(self.tpm_state_dir())?;
        self.start_again().await
    }

    /// Waits until the TPM answers TPM2_GetRandom with success on the data channel. swtpm serves
    /// one data connection at a time, so when kleidi got there first (its reconnect after a
    /// restart) the answer comes from the control channel instead: CMD_GET_TPMESTABLISHED, which
    /// also needs a running TPM. A paused swtpm answers neither.
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        let started = Instant::now();
        let mut last = String::from("no attempt");
        while started.elapsed() < limit {
            let data = bounded(get_random(self.port)).await;
            let answer = match data {
                Ok(()) => Ok(()),
                Err(_) => bounded(tpm_established(self.port + 1)).await,
            };
            match answer {
                Ok(()) => return Ok(()),
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "swtpm did not answer a TPM command within {limit:?} ({last}); log:\n{}",
            self.process.logs()
        )
    }
}

async fn bounded(probe: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(PROBE_TIMEOUT, probe)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {PROBE_TIMEOUT:?}")))
}

/// One TPM2_GetRandom round trip on the data port; Ok only for TPM_RC_SUCCESS.
async fn get_random(port: u16) -> Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(&GET_RANDOM).await?;
    let mut header = [0u8; 10];
    stream.read_exact(&mut header).await?;
    let [_, _, _, _, _, _, rc @ ..] = header;
    let rc = u32::from_be_bytes(rc);
    if rc != 0 {
        bail!("TPM2_GetRandom returned {rc:#x}");
    }
    Ok(())
}

/// CMD_GET_TPMESTABLISHED on the control port; Ok only for TPM_SUCCESS.
async fn tpm_established(ctrl: u16) -> Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", ctrl)).await?;
    stream.write_all(&GET_ESTABLISHED).await?;
    let mut answer = [0u8; 8];
    stream.read_exact(&mut answer).await?;
    let [a, b, c, d, ..] = answer;
    let rc = u32::from_be_bytes([a, b, c, d]);
    if rc != 0 {
        bail!("CMD_GET_TPMESTABLISHED returned {rc:#x}");
    }
    Ok(())
}

/// A free port P with P + 1 free too. Bounded: 100 tries.
fn free_port_pair() -> Result<u16> {
    for _ in 0..100 {
        let first = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = first.local_addr()?.port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no two adjacent free ports on 127.0.0.1 in 100 tries")
}
