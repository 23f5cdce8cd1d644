//! `kleidi serve` as a separate process, exactly as a node runs it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{OpenBao, Process, SoftHsmToken};

/// The `kleidi` binary: `$KLEIDI_BIN`, else the one cargo built beside this executable
/// (`target/<profile>/kleidi`; `cargo test --workspace` and `cargo build -p kleidi` build it).
pub fn kleidi_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KLEIDI_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("kleidi");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "no kleidi binary beside {}: run `cargo build -p kleidi` or set KLEIDI_BIN",
        exe.display()
    )
}

/// `kleidi` built with the `aws-kms` feature, which the workspace build leaves out: `$KLEIDI_AWS_KMS_BIN`,
/// or `kleidi-aws-kms` beside the plain binary `plain`, where `just test-aws` copies its build.
pub fn kleidi_aws_kms_bin(plain: &Path) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KLEIDI_AWS_KMS_BIN") {
        return Ok(PathBuf::from(p));
    }
    let candidate = plain.with_file_name("kleidi-aws-kms");
    if candidate.is_file() {
        return Ok(candidate);
    }
    bail!(
        "{AWS_KMS_BIN_MISSING}: no {} (`just test-aws` builds it) and KLEIDI_AWS_KMS_BIN is not set",
        candidate.display()
    )
}

/// How [`kleidi_aws_kms_bin`]'s error starts, for callers that skip rather than fail without it.
pub const AWS_KMS_BIN_MISSING: &str = "no kleidi built with the aws-kms feature";

/// A running `kleidi serve` (pkcs11 or vault backend).
pub struct KleidiPlugin {
    /// The process (fault verbs: stop, kill, restart, pause, …).
    pub process: Process,
    /// The Unix socket it serves on.
    pub socket: PathBuf,
}

impl KleidiPlugin {
    /// Starts kleidi on `<token dir>/run/kms.sock` with key `key_label` and waits until it listens.
    pub async fn start(bin: &Path, token: &SoftHsmToken, key_label: &str, extra: &[&str]) -> Result<Self> {
        let socket = token.dir().join("run/kms.sock");
        let mut args = token.flags(key_label);
        args.splice(0..0, ["--backend".to_string(), "pkcs11".into()]);
        let env = [("SOFTHSM2_CONF".to_string(), token.conf().display().to_string())];
        let log = token.dir().join(format!("kleidi-{key_label}.log"));
        Self::launch(bin, socket, args, &env, &log, extra).await
    }

    /// Starts kleidi with `--backend vault` on `<dir>/kms.sock` (log `<dir>/kleidi.log`), using
    /// `bao`'s key and kleidi token and reaching OpenBao at `url`: [`OpenBao::url`], or a fault
    /// proxy's in front of it. Waits until it listens.
    pub async fn start_vault(
        bin: &Path,
        bao: &OpenBao,
        url: &str,
        dir: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let socket = dir.join("kms.sock");
        let log = dir.join("kleidi.log");
        Self::launch(bin, socket, bao.kleidi_flags(url), &[], &log, extra).await
    }

    /// Starts `kleidi serve --listen unix://SOCKET` with `backend` flags (and `extra`), `env` added and
    /// its output in `log`; waits until it listens. For callers that place sockets themselves.
    pub async fn launch(
        bin: &Path,
        socket: PathBuf,
        backend: Vec<String>,
        env: &[(String, String)],
        log: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let mut args = vec![
            "serve".to_string(),
            "--listen".into(),
            format!("unix://{}", socket.display()),
        ];
        args.extend(backend);
        args.extend(extra.iter().map(|s| s.to_string()));
        let process = Process::spawn("kleidi", bin, &args, env, log)?;
        let plugin = KleidiPlugin { process, socket };
        plugin.wait_ready(Duration::from_secs(20)).await?;
        Ok(plugin)
    }

    /// Starts someone else's KMS plugin with `sh -c "exec COMMAND"` (output in `log`) and waits
    /// until `socket` accepts connections. The fault verbs work on it as on kleidi.
    pub async fn foreign(command: &str, socket: PathBuf, log: &Path) -> Result<Self> {
        let args = vec!["-c".to_string(), format!("exec {command}")];
        let process = Process::spawn("plugin", Path::new("/bin/sh"), &args, &[], log)?;
        let plugin = KleidiPlugin { process, socket };
        plugin.wait_ready(Duration::from_secs(20)).await?;
        Ok(plugin)
    }

    /// Starts it again after a stop or crash and waits until it listens.
    pub async fn restart(&mut self) -> Result<()> {
        self.process.start()?;
        self.wait_ready(Duration::from_secs(20)).await
    }

    async fn wait_ready(&self, limit: Duration) -> Result<()> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if tokio::net::UnixStream::connect(&self.socket).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(anyhow::anyhow!("kleidi did not listen within {limit:?}")).context(self.process.logs())
    }
}
