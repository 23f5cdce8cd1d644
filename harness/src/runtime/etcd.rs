//! A real etcd (Debian `etcd-server`) on free 127.0.0.1 ports with its own data dir.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{Process, free_port};
use crate::apiserver::{EtcdStore, EtcdTls};

/// A single-member etcd for one run.
pub struct Etcd {
    /// The process (fault verbs: stop, kill, pause, …).
    pub process: Process,
    /// `http://127.0.0.1:PORT` (`https://` with TLS).
    pub url: String,
    /// The client certificates it demands, when started with [`Etcd::start_tls`].
    pub tls: EtcdTls,
    _dir: tempfile::TempDir,
}

/// Files for an etcd that serves TLS and demands client certificates (as kubeadm sets it up).
#[derive(Clone, Debug)]
pub struct EtcdServerTls {
    /// CA that signed both the server's and the clients' certificates.
    pub ca: PathBuf,
    /// Server certificate (valid for 127.0.0.1) and key.
    pub cert: PathBuf,
    /// Server key.
    pub key: PathBuf,
    /// What a client presents.
    pub client: EtcdTls,
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub async fn start() -> Result<Self> {
        Self::launch(None).await
    }

    /// Starts etcd serving TLS with `--client-cert-auth`; [`Etcd::client`] presents `tls.client`.
    pub async fn start_tls(tls: &EtcdServerTls) -> Result<Self> {
        Self::launch(Some(tls)).await
    }

    async fn launch(tls: Option<&EtcdServerTls>) -> Result<Self> {
        let bin =
            which("etcd").context("etcd is not installed: run `just deps` (apt-get install etcd-server)")?;
        let dir = tempfile::Builder::new().prefix("kleidi-etcd-").tempdir()?;
        let (client, peer) = (free_port()?, free_port()?);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let args: Vec<String> = [
            "--name",
            "harness",
            "--data-dir",
            &dir.path().join("data").display().to_string(),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("harness={peer_url}"),
            "--log-level",
            "warn",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut args = args;
        if let Some(tls) = tls {
            for (flag, path) in [
                ("--cert-file", &tls.cert),
                ("--key-file", &tls.key),
                ("--trusted-ca-file", &tls.ca),
            ] {
                args.extend([flag.to_string(), path.display().to_string()]);
            }
            args.push("--client-cert-auth".into());
        }
        let log = dir.path().join("etcd.log");
        let process = Process::spawn("etcd", &bin, &args, &[], &log)?;
        let tls = tls.map(|t| t.client.clone()).unwrap_or_default();
        let etcd = Etcd {
            process,
            url,
            tls,
            _dir: dir,
        };
        etcd.wait_ready(Duration::from_secs(20)).await?;
        Ok(etcd)
    }

    /// A raw client (bytes in and out).
    pub async fn client(&self) -> Result<EtcdStore> {
        Ok(EtcdStore::connect(std::slice::from_ref(&self.url), &self.tls).await?)
    }

    /// Waits until etcd serves a read.
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Ok(c) = self.client().await
                && c.get(b"health-probe").await.is_ok()
            {
                return Ok(());
            }
            if started.elapsed() > limit {
                bail!(
                    "etcd did not answer within {limit:?}; log:\n{}",
                    self.process.logs()
                );
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
