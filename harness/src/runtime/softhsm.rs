//! A SoftHSM2 token of its own in a temp dir, initialized by `kleidi pkcs11 init` (the same command
//! a user runs), with PIN files as a user keeps them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Where Debian's `softhsm2` puts the module.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A token with one or more AES-256 keys.
pub struct SoftHsmToken {
    /// Token label.
    pub label: String,
    dir: tempfile::TempDir,
}

impl SoftHsmToken {
    /// Creates the token and the key `key_label` with `kleidi pkcs11 init`.
    pub fn create(kleidi: &Path, label: &str, key_label: &str) -> Result<Self> {
        if !Path::new(SOFTHSM_MODULE).exists() {
            bail!("{SOFTHSM_MODULE} is missing: run `just deps` (apt-get install softhsm2)");
        }
        let dir = tempfile::Builder::new().prefix("kleidi-softhsm-").tempdir()?;
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens)?;
        std::fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )?;
        // Random PINs: nothing about a test token is guessable from the repository. Mode 0600:
        // kleidi refuses PIN files other users can read.
        super::write_private(
            &dir.path().join("pin"),
            format!("{}\n", uuid::Uuid::new_v4().simple()),
        )?;
        super::write_private(
            &dir.path().join("so-pin"),
            format!("{}\n", uuid::Uuid::new_v4().simple()),
        )?;
        let token = SoftHsmToken {
            label: label.into(),
            dir,
        };
        token.add_key(kleidi, key_label)?;
        Ok(token)
    }

    /// Generates another key on the token (rotation), idempotently.
    pub fn add_key(&self, kleidi: &Path, key_label: &str) -> Result<()> {
        let out = std::process::Command::new(kleidi)
            .args(["pkcs11", "init"])
            .args(self.flags(key_label))
            .arg("--pkcs11-so-pin-file")
            .arg(self.dir.path().join("so-pin"))
            .env("SOFTHSM2_CONF", self.conf())
            .output()
            .with_context(|| format!("running {}", kleidi.display()))?;
        if !out.status.success() {
            bail!(
                "kleidi pkcs11 init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// `SOFTHSM2_CONF` for processes using this token.
    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }

    /// The token's own directory (SoftHSM keeps one per token under tokendir); moving it away is
    /// how a scenario takes the token out.
    pub fn token_dir(&self) -> Result<PathBuf> {
        let mut dirs = std::fs::read_dir(self.dir.path().join("tokens"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir());
        dirs.next()
            .context("the token has no directory (was it removed?)")
    }

    /// The scratch dir this token lives in (logs and sockets may go here too).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The `--pkcs11-*` flags that reach this token with key `key_label`.
    pub fn flags(&self, key_label: &str) -> Vec<String> {
        [
            "--pkcs11-module",
            SOFTHSM_MODULE,
            "--pkcs11-token-label",
            &self.label,
            "--pkcs11-pin-file",
            &self.dir.path().join("pin").display().to_string(),
            "--pkcs11-key-label",
            key_label,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}
