//! A real etcd (Debian `etcd-server`) on free 127.0.0.1 ports with its own data dir.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{Process, free_port};

/// A single-member etcd for one run.
pub struct Etcd {
    /// The process (fault verbs: stop, kill, pause, …).
    pub process: Process,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Result<Self> {
        let bin = which("etcd").context("etcd is not installed: run `just deps` (apt-get install etcd-server)")?;
        let dir = tempfile::Builder::new().prefix("kleidi-etcd-").tempdir()?;
        let (client, peer) = (free_port()?, free_port()?);
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let args: Vec<String> = [
            "--name", "harness",
            "--data-dir", &dir.path().join("data").display().to_string(),
            "--listen-client-urls", &url,
            "--advertise-client-urls", &url,
            "--listen-peer-urls", &peer_url,
            "--initial-advertise-peer-urls", &peer_url,
            "--initial-cluster", &format!("harness={peer_url}"),
            "--log-level", "warn",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let log = dir.path().join("etcd.log");
        let process = Process::spawn("etcd", &bin, &args, &[], &log)?;
        let etcd = Etcd { process, url, _dir: dir };
        etcd.wait_ready(Duration::from_secs(20)).await?;
        Ok(etcd)
    }

    /// A client (raw bytes in and out).
    pub async fn client(&self) -> Result<etcd_client::Client> {
        Ok(etcd_client::Client::connect([self.url.as_str()], None).await?)
    }

    /// Waits until etcd serves a read.
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Ok(mut c) = self.client().await {
                if c.get("health-probe", None).await.is_ok() {
                    return Ok(());
                }
            }
            if started.elapsed() > limit {
                bail!("etcd did not answer within {limit:?}; log:\n{}", self.process.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Finds a program on PATH.
pub(crate) fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join(program))
        .find(|p| p.is_file())
}
