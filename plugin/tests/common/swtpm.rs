//! A real `swtpm` per test: TPM 2.0 over TCP on free 127.0.0.1 ports, its own state directory,
//! started and killed by the test (`apt-get install swtpm swtpm-tools`). Restart keeps the state
//! (a rebooted TPM); wipe starts over on an empty one (a cleared TPM, a replaced board).
// Test support: a failed setup step should panic with its message.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "private.rs"]
mod private;

#[allow(unused_imports)] // not every test binary writes credential files
pub use private::write_private;

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Swtpm {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub ctrl: u16,
    child: Option<Child>,
}

/// A free port P with P+1 free too: the swtpm TCTI finds the control channel at port + 1.
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let first = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no two adjacent free ports on 127.0.0.1 in 100 tries");
}

impl Swtpm {
    pub fn start() -> Self {
        let port = free_port_pair();
        let mut tpm = Swtpm {
            dir: tempfile::tempdir().unwrap(),
            port,
            ctrl: port + 1,
            child: None,
        };
        std::fs::create_dir(tpm.state()).unwrap();
        tpm.launch();
        tpm
    }

    /// The TCTI string kleidi takes with --tpm-tcti.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts swtpm on this state and port (after [`Swtpm::kill`]) and waits until it listens.
    pub fn launch(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::File::create(self.dir.path().join("swtpm.log")).unwrap();
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--server"])
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", self.port))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", self.ctrl))
            .arg("--tpmstate")
            .arg(format!("dir={}", self.state().display()))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("swtpm (apt-get install swtpm swtpm-tools)");
        self.child = Some(child);
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "swtpm did not listen on {} within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The swtpm process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: the TPM is gone, its state stays on disk.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Killed and started again on the same state and port: a rebooted TPM.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// Killed, its state deleted, started again on the same port: a TPM that lost everything.
    pub fn wipe(&mut self) {
        self.kill();
        std::fs::remove_dir_all(self.state()).unwrap();
        std::fs::create_dir(self.state()).unwrap();
        self.launch();
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One control-plane node: a TPM and kleidi's state directory (`<dir>/tpm`) with room for the
/// files a test moves between nodes.
pub struct Node {
    pub tpm: Swtpm,
    pub dir: tempfile::TempDir,
}

impl Node {
    pub fn new() -> Self {
        Node {
            tpm: Swtpm::start(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn config(&self) -> kleidi::backend::tpm::TpmConfig {
        kleidi::backend::tpm::TpmConfig {
            tcti: self.tpm.tcti(),
            state_dir: self.dir.path().join("tpm"),
            owner_auth_file: None,
        }
    }

    pub async fn backend(&self) -> kleidi::backend::tpm::TpmBackend {
        kleidi::backend::tpm::TpmBackend::connect(self.config())
            .await
            .unwrap()
    }
}
