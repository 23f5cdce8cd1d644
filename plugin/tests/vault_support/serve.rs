//! The real `kleidi serve --backend vault` binary on a Unix socket in a temp dir, with its stderr
//! (debug level) in a file, and the tonic client kube-apiserver's role uses.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kleidi::proto::v2;
use kleidi::proto::v2::key_management_service_client::KeyManagementServiceClient;
use tonic::transport::Channel;

#[path = "../common/v2_calls.rs"]
mod v2_calls;

/// A running `kleidi serve`; killed on drop.
pub struct Kleidi {
    child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Kleidi {
    /// `kleidi serve --backend vault --vault-addr ADDR --vault-key KEY` plus `flags`, logging at
    /// debug; waits until the socket accepts connections.
    pub fn start(addr: &str, key: &str, flags: &[&str]) -> Self {
        Self::start_logging("debug", addr, key, flags)
    }

    /// [`Kleidi::start`] with `KLEIDI_LOG=filter`; an empty `filter` leaves kleidi's default.
    pub fn start_logging(filter: &str, addr: &str, key: &str, flags: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("kms.sock");
        let log = dir.path().join("kleidi.log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_kleidi"));
        match filter {
            "" => command.env_remove("KLEIDI_LOG"),
            filter => command.env("KLEIDI_LOG", filter),
        };
        let child = command
            .arg("serve")
            .arg("--listen")
            .arg(format!("unix://{}", socket.display()))
            .args(["--backend", "vault", "--vault-addr", addr, "--vault-key", key])
            .args(flags)
            .env_remove("VAULT_ADDR")
            .env_remove("VAULT_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut kleidi = Self {
            child,
            socket,
            log,
            _dir: dir,
        };
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&kleidi.socket).is_err() {
            if let Some(status) = kleidi.child.try_wait().unwrap() {
                panic!("kleidi exited ({status}); log:\n{}", kleidi.logs());
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "kleidi did not listen within 20 s; log:\n{}",
                kleidi.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        kleidi
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends `sig` (`TERM`, `INT`, …) to the process.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{sig}");
    }

    /// Waits at most `limit` for the process to exit; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(started.elapsed() < limit, "kleidi still runs after {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A v2 client over the socket (`unix:` endpoint, as in the interop tests).
    pub async fn v2(&self) -> KeyManagementServiceClient<Channel> {
        let channel = tonic::transport::Endpoint::from_shared(format!("unix:{}", self.socket.display()))
            .unwrap()
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap();
        KeyManagementServiceClient::new(channel)
    }

    pub async fn status(&self) -> v2::StatusResponse {
        v2_calls::status(self.v2().await).await
    }

    pub async fn encrypt(&self, plaintext: &[u8]) -> Result<v2::EncryptResponse, tonic::Status> {
        v2_calls::encrypt(self.v2().await, plaintext).await
    }

    pub async fn decrypt(&self, encrypted: &v2::EncryptResponse) -> Result<Vec<u8>, tonic::Status> {
        v2_calls::decrypt(self.v2().await, encrypted).await
    }
}

impl Drop for Kleidi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
