//! Child processes the bench measures: `kleidi serve`, the trivial server, the peer plugin. Each is
//! killed (by its own pid) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use kleidi::proto::v2::StatusRequest;

use super::measure::{KmsClient, connect};

/// A server process on a Unix socket.
pub struct Server {
    child: Child,
    /// Its socket.
    pub socket: PathBuf,
    log: PathBuf,
    /// What it is, for messages.
    pub name: String,
}

impl Server {
    /// Spawns `cmd` (stdout and stderr to `log`) and waits (at most 30 s) until a Status over
    /// `socket` answers with healthz "ok" (or anything, when `any_status`).
    pub async fn start(
        name: &str,
        mut cmd: Command,
        socket: &Path,
        log: &Path,
        any_status: bool,
    ) -> anyhow::Result<Self> {
        let file = std::fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let mut server = Self {
            child,
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
            name: name.into(),
        };
        // Bounded: 300 tries of 100 ms.
        let mut last = String::from("socket not there");
        for _ in 0..300 {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "{name} exited ({status}) before answering:\n{}",
                    server.log_tail()
                );
            }
            if socket.exists() {
                match try_status(socket).await {
                    Ok(healthz) if any_status || healthz == "ok" => return Ok(server),
                    Ok(healthz) => last = format!("healthz {healthz:?}"),
                    Err(e) => last = format!("{e:#}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let tail = server.log_tail();
        server.stop();
        bail!("{name} did not answer Status within 30 s ({last}):\n{tail}")
    }

    /// The process id, for /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// VmRSS in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(self.pid())
    }

    /// Last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines
            .iter()
            .skip(lines.len().saturating_sub(20))
            .copied()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Kills and reaps it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn try_status(socket: &Path) -> anyhow::Result<String> {
    let mut client: KmsClient = connect(socket).await?;
    let answer = tokio::time::timeout(Duration::from_secs(5), client.status(StatusRequest {})).await??;
    Ok(answer.into_inner().healthz)
}

/// VmRSS of `pid` in KiB, from /proc/PID/status.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// A free 127.0.0.1 TCP port (bound and released: a tiny race, fine for a bench).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
