//! Runs the real `kleidi` binary the way a user does: a SoftHSM token in a temp dir made by
//! `kleidi pkcs11 init`, then `kleidi serve` on a socket, with a tonic client to talk to it.
// Test support: a failed setup step should panic with its message.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../common/private.rs"]
mod private;
#[path = "../common/v2_calls.rs"]
mod v2_calls;

#[allow(unused_imports)] // not every test binary writes credential files
pub use private::write_private;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kleidi::proto::{v1beta1, v2};
use tonic::transport::Channel;

pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const PIN: &str = "user-pin-5b7e13";
pub const SO_PIN: &str = "so-pin-90c2aa";
pub const KEK: &str = "kek-1";

/// A SoftHSM token of its own in a temp dir.
pub struct Token {
    pub dir: tempfile::TempDir,
    pub label: String,
}

impl Token {
    /// Creates the token and the key `KEK` with `kleidi pkcs11 init`.
    pub fn new() -> Self {
        assert!(
            Path::new(SOFTHSM_MODULE).exists(),
            "{SOFTHSM_MODULE} is missing: run `just deps` (apt-get install softhsm2)"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tokens")).unwrap();
        std::fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )
        .unwrap();
        write_private(&dir.path().join("pin"), format!("{PIN}\n"));
        write_private(&dir.path().join("so-pin"), SO_PIN);
        let token = Token {
            dir,
            label: "kleidi-test".into(),
        };
        token.init_key(KEK);
        token
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }

    pub fn pin_file(&self) -> PathBuf {
        self.dir.path().join("pin")
    }

    /// The flags every kleidi command needs to reach this token with key `key`.
    pub fn flags(&self, key: &str) -> Vec<String> {
        vec![
            "--pkcs11-module".into(),
            SOFTHSM_MODULE.into(),
            "--pkcs11-token-label".into(),
            self.label.clone(),
            "--pkcs11-pin-file".into(),
            self.pin_file().display().to_string(),
            "--pkcs11-key-label".into(),
            key.into(),
        ]
    }

    /// `kleidi pkcs11 init` for key `key`; returns its stderr.
    pub fn init_key(&self, key: &str) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_kleidi"))
            .args(["pkcs11", "init"])
            .args(self.flags(key))
            .arg("--pkcs11-so-pin-file")
            .arg(self.dir.path().join("so-pin"))
            .env("SOFTHSM2_CONF", self.conf())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "kleidi pkcs11 init failed: {stderr}");
        stderr
    }

    /// The directory SoftHSM keeps this token in (one per token under tokendir).
    pub fn token_dir(&self) -> PathBuf {
        let mut dirs: Vec<_> = std::fs::read_dir(self.dir.path().join("tokens"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir())
            .collect();
        assert_eq!(dirs.len(), 1, "expected one token directory");
        dirs.pop().unwrap()
    }
}

/// A running `kleidi serve`; killed on drop.
pub struct Kleidi {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Kleidi {
    /// Starts `kleidi serve` on `<token dir>/run/<name>.sock` and waits until it accepts connections.
    pub fn start(token: &Token, key: &str, extra: &[&str]) -> Self {
        let socket = token.dir.path().join("run/kms.sock");
        let log = token.dir.path().join(format!("kleidi-{}.log", rand_suffix()));
        let child = Self::spawn(token, key, &socket, &log, extra);
        let kleidi = Kleidi { child, socket, log };
        kleidi.wait_ready();
        kleidi
    }

    /// Starts a second instance on its own socket name.
    pub fn start_on(token: &Token, key: &str, name: &str) -> Self {
        let socket = token.dir.path().join("run").join(name);
        let log = token.dir.path().join(format!("{name}.log"));
        let child = Self::spawn(token, key, &socket, &log, &[]);
        let kleidi = Kleidi { child, socket, log };
        kleidi.wait_ready();
        kleidi
    }

    /// Starts `kleidi serve` for any backend on `<dir>/<name>.sock`, `args` naming the backend and
    /// its flags and `env` adding variables (`SOFTHSM2_CONF`); logs at kleidi's default filter, as
    /// deployed, to `<dir>/<name>.log`. Waits until it accepts connections.
    pub fn serve(dir: &Path, name: &str, args: &[String], env: &[(&str, PathBuf)]) -> Self {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_kleidi"))
            .arg("serve")
            .arg("--listen")
            .arg(format!("unix://{}", socket.display()))
            .args(args)
            .envs(env.iter().cloned())
            .env_remove("KLEIDI_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let kleidi = Kleidi { child, socket, log };
        kleidi.wait_ready();
        kleidi
    }

    pub fn spawn(token: &Token, key: &str, socket: &Path, log: &Path, extra: &[&str]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_kleidi"))
            .arg("serve")
            .arg("--listen")
            .arg(format!("unix://{}", socket.display()))
            .args(["--backend", "pkcs11"])
            .args(token.flags(key))
            .args(extra)
            .env("SOFTHSM2_CONF", token.conf())
            .env("KLEIDI_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    }

    pub fn wait_ready(&self) {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("kleidi did not listen within 20 s; log:\n{}", self.logs());
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("kleidi did not exit within {limit:?}");
    }

    pub async fn channel(&self) -> Channel {
        self.try_channel().await.unwrap()
    }

    /// A connection, or why there is none (e.g. closed at once by `--max-connections`).
    pub async fn try_channel(&self) -> Result<Channel, tonic::transport::Error> {
        tonic::transport::Endpoint::from_shared(format!("unix:{}", self.socket.display()))
            .unwrap()
            .timeout(Duration::from_secs(3))
            .connect()
            .await
    }

    pub async fn v2(&self) -> v2::key_management_service_client::KeyManagementServiceClient<Channel> {
        v2::key_management_service_client::KeyManagementServiceClient::new(self.channel().await)
    }

    pub async fn v1(&self) -> v1beta1::key_management_service_client::KeyManagementServiceClient<Channel> {
        v1beta1::key_management_service_client::KeyManagementServiceClient::new(self.channel().await)
    }

    /// A v2 Status that must answer.
    pub async fn status(&self) -> v2::StatusResponse {
        v2_calls::status(self.v2().await).await
    }

    /// A v2 Encrypt of `plaintext` with a fresh uid.
    pub async fn encrypt(&self, plaintext: &[u8]) -> Result<v2::EncryptResponse, tonic::Status> {
        v2_calls::encrypt(self.v2().await, plaintext).await
    }

    /// A v2 Decrypt of what Encrypt answered, with a fresh uid.
    pub async fn decrypt(&self, wrapped: &v2::EncryptResponse) -> Result<Vec<u8>, tonic::Status> {
        v2_calls::decrypt(self.v2().await, wrapped).await
    }
}

impl Drop for Kleidi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// A /proc/PID/status field in KiB (`VmRSS:`, `VmHWM:`).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A random 32-byte seed, as kube-apiserver sends.
pub fn seed() -> Vec<u8> {
    use rand::RngCore;
    let mut s = vec![0u8; 32];
    rand::rng().fill_bytes(&mut s);
    s
}
