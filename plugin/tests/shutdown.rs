//! SIGTERM while a call is in flight: the call still gets an answer, and kleidi exits within
//! `--shutdown-grace` even when the backend hangs, removing its socket. A hung backend is a real
//! OpenBao frozen with SIGSTOP (a PKCS#11 call finishes in microseconds and cannot be held open).

#![cfg(feature = "vault")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // tests

mod vault_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kleidi::proto::v2;
use kleidi::proto::v2::key_management_service_client::KeyManagementServiceClient;
use tonic::Code;
use vault_support::Bao;

struct Serving {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(bao: &Bao, call_timeout: &str, grace: &str) -> Serving {
    let dir = tempfile::tempdir().unwrap();
    let token = bao.file("token", &bao.kleidi_token("kek", "1h"));
    let socket = dir.path().join("kms.sock");
    let log = dir.path().join("kleidi.log");
    let child = Command::new(env!("CARGO_BIN_EXE_kleidi"))
        .args([
            "serve",
            "--listen",
            socket.to_str().unwrap(),
            "--backend",
            "vault",
        ])
        .args([
            "--vault-addr",
            &bao.addr,
            "--vault-key",
            "kek",
            "--vault-auth",
            "token",
        ])
        .arg("--vault-token-file")
        .arg(&token)
        .args(["--call-timeout", call_timeout, "--shutdown-grace", grace])
        .env("KLEIDI_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let serving = Serving {
        child,
        socket,
        log,
        _dir: dir,
    };
    let started = Instant::now();
    while std::os::unix::net::UnixStream::connect(&serving.socket).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "kleidi did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    serving
}

async fn client(socket: &Path) -> KeyManagementServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("unix:{}", socket.display()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    KeyManagementServiceClient::new(channel)
}

/// Starts an Encrypt that will hang on the frozen server, then sends SIGTERM while it is in flight.
async fn terminate_during_a_hung_encrypt(
    bao: &Bao,
    k: &mut Serving,
) -> (
    tokio::task::JoinHandle<Result<v2::EncryptResponse, tonic::Status>>,
    Instant,
) {
    let mut kms = client(&k.socket).await;
    assert_eq!(
        kms.status(v2::StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .healthz,
        "ok"
    );
    bao.pause();
    let call = tokio::spawn(async move {
        kms.encrypt(v2::EncryptRequest {
            plaintext: vec![7; 32],
            uid: "in-flight".into(),
        })
        .await
        .map(tonic::Response::into_inner)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !call.is_finished(),
        "the encrypt should be waiting on the frozen server"
    );
    let ok = Command::new("kill")
        .args(["-TERM", &k.child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    (call, Instant::now())
}

fn wait_exit(k: &mut Serving, limit: Duration) -> Option<i32> {
    let started = Instant::now();
    loop {
        if let Some(status) = k.child.try_wait().unwrap() {
            return status.code();
        }
        assert!(
            started.elapsed() < limit,
            "kleidi still runs {limit:?} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_an_in_flight_call_finish_with_an_answer_then_removes_the_socket() {
    let bao = Bao::dev();
    let mut k = serve(&bao, "1s", "10s");
    let (call, _) = terminate_during_a_hung_encrypt(&bao, &mut k).await;
    // The call is bounded by --call-timeout and answered by kleidi with the backend's class, not
    // cut off by the shutdown (a dropped connection would be a transport error, not this text).
    let status = call.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("backend vault unavailable (network)"),
        "{status:?}"
    );
    assert_eq!(wait_exit(&mut k, Duration::from_secs(10)), Some(0));
    assert!(!k.socket.exists(), "socket left behind");
    bao.resume();
    let logs = std::fs::read_to_string(&k.log).unwrap();
    assert!(logs.contains("letting in-flight calls finish"), "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_waits_no_longer_than_the_grace_for_a_call_that_does_not_finish() {
    let bao = Bao::dev();
    // A call bound far above the grace: only the grace can end the wait.
    let mut k = serve(&bao, "60s", "1s");
    let (call, signalled) = terminate_during_a_hung_encrypt(&bao, &mut k).await;
    assert_eq!(wait_exit(&mut k, Duration::from_secs(15)), Some(0));
    let waited = signalled.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "exited after {waited:?}, before the grace"
    );
    assert!(!k.socket.exists(), "socket left behind");
    // The client learns the call failed instead of waiting forever.
    assert!(call.await.unwrap().is_err());
    bao.resume();
    let logs = std::fs::read_to_string(&k.log).unwrap();
    assert!(logs.contains("did not finish within the grace period"), "{logs}");
}
