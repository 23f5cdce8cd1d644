//! A local AWS KMS: `moto_server` (PyPI `moto[server]`), which speaks the KMS wire API, on 127.0.0.1,
//! with one symmetric key. Its admin side (create, rotate, disable) is boto3, AWS's own Python SDK,
//! an independent client. moto keeps its keys in memory: a restart loses them, so its outages are a
//! pause (SIGSTOP) or a fault proxy in front of it, never a stop.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{Process, free_port};

/// The region every key is made in and kleidi is told.
pub const REGION: &str = "us-east-1";
/// moto accepts any credentials; this key ID is the one kleidi's environment names.
const ACCESS_KEY_ID: &str = "AKIAKLEIDISCENARIO01";

/// A running moto server with one key; killed on drop.
pub struct Moto {
    process: Process,
    port: u16,
    python: PathBuf,
    key_arn: String,
    /// A secret access key of this run's own: moto ignores it, the no-secret-in-logs check looks
    /// for it.
    secret_access_key: String,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for Moto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Moto")
            .field("url", &self.url())
            .field("key_arn", &self.key_arn)
            .finish_non_exhaustive()
    }
}

impl Moto {
    /// Starts moto on a free port, waits until it answers, and creates the key.
    pub async fn start() -> Result<Self> {
        let python = python().await?;
        let port = free_port()?;
        let dir = tempfile::Builder::new().prefix("kleidi-moto-").tempdir()?;
        let args: Vec<String> = ["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let process = Process::spawn("moto", &python, &args, &[], &dir.path().join("moto.log"))?;
        let secret_access_key = format!("kleidi-scenario-{:032x}", rand::random::<u128>());
        let mut moto = Self {
            process,
            port,
            python,
            key_arn: String::new(),
            secret_access_key,
            dir,
        };
        moto.wait_listening().await?;
        moto.key_arn = moto
            .boto("print(kms.create_key(Description='kleidi scenario KEK')['KeyMetadata']['Arn'])")
            .await?;
        Ok(moto)
    }

    async fn wait_listening(&mut self) -> Result<()> {
        let started = Instant::now();
        // Bounded: moto imports in 1–3 s here.
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            if let Some(status) = self.process.try_exit() {
                bail!("moto_server exited ({status}): {}", self.process.logs());
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("moto_server did not listen within 30 s: {}", self.process.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The listener's address (what a fault proxy forwards to).
    pub fn listen_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The key's ARN.
    pub fn key_arn(&self) -> &str {
        &self.key_arn
    }

    /// The secret access key kleidi is given (moto ignores it; it must never reach a log).
    pub fn secret_access_key(&self) -> &str {
        &self.secret_access_key
    }

    /// The scratch dir (the server's log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the server logged so far (one access-log line per request).
    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// `kleidi serve` flags for this key at `url` ([`Self::url`] or a fault proxy's), for cluster
    /// `cluster` (the encryption context).
    pub fn kleidi_flags(&self, url: &str, cluster: &str) -> Vec<String> {
        [
            "--backend",
            "aws-kms",
            "--aws-kms-key-id",
            &self.key_arn,
            "--aws-region",
            REGION,
            "--aws-endpoint-url",
            url,
            "--aws-encryption-context-cluster",
            cluster,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// kleidi's environment: credentials of the standard chain's first link, no shared files, no
    /// instance metadata (the chain would otherwise wait on it).
    pub fn kleidi_env(&self) -> Vec<(String, String)> {
        let none = self.dir.path().join("no-such-file").display().to_string();
        [
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key.as_str()),
            ("AWS_CONFIG_FILE", none.as_str()),
            ("AWS_SHARED_CREDENTIALS_FILE", none.as_str()),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Rotates the key's material on demand (kleidi's key_id version counts rotations).
    pub async fn rotate_key(&self) -> Result<()> {
        self.boto(&format!("kms.rotate_key_on_demand(KeyId='{}')", self.key_arn))
            .await
            .map(drop)
    }

    /// Freezes the server (SIGSTOP): connections are accepted, nothing answers; keys survive.
    pub fn pause(&self) -> Result<()> {
        self.process.pause()
    }

    /// Undoes [`Self::pause`].
    pub fn resume(&self) -> Result<()> {
        self.process.resume()
    }

    /// Runs boto3 against the server (`kms` is its KMS client) and returns what the script printed.
    async fn boto(&self, script: &str) -> Result<String> {
        let program = format!(
            "import boto3\nkms = boto3.client('kms', endpoint_url='{}', region_name='{REGION}')\n{script}",
            self.url()
        );
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(&self.python)
                .args(["-c", &program])
                .env("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
                .env("AWS_SECRET_ACCESS_KEY", &self.secret_access_key)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .context("boto3 did not finish within 30 s")??;
        if !out.status.success() {
            bail!("boto3: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

/// The Python interpreter that has moto and boto3 (the interpreter itself, not a pyenv shim, so a
/// signal reaches the server).
async fn python() -> Result<PathBuf> {
    let out = tokio::process::Command::new("python3")
        .args(["-c", "import sys, moto.server, boto3; print(sys.executable)"])
        .output()
        .await
        .context("python3")?;
    if !out.status.success() {
        bail!(
            "moto is missing: `python3 -m pip install 'moto[server]'` (just deps): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}
