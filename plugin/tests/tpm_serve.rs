//! `kleidi serve --backend tpm` end to end: `kleidi tpm init` and `kleidi serve` as processes
//! against a real swtpm, the gRPC services kube-apiserver calls on the Unix socket (v2 and
//! v1beta1), rotation, a restarted and a wiped TPM as Status shows them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // tests

#[path = "common/swtpm.rs"]
mod swtpm;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kleidi::proto::{v1beta1, v2};
use rand::RngCore;
use swtpm::Swtpm;
use tonic::Code;
use tonic::transport::Channel;

type V2 = v2::key_management_service_client::KeyManagementServiceClient<Channel>;

struct Node {
    tpm: Swtpm,
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Self {
        Node {
            tpm: Swtpm::start(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn flags(&self) -> Vec<String> {
        vec![
            "--tpm-tcti".into(),
            self.tpm.tcti(),
            "--tpm-state-dir".into(),
            self.dir.path().join("tpm").display().to_string(),
        ]
    }

    /// `kleidi tpm init`; returns the key_id it prints.
    fn init(&self) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_kleidi"))
            .args(["tpm", "init"])
            .args(self.flags())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

/// A running `kleidi serve --backend tpm`; killed on drop.
struct Kleidi {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Kleidi {
    fn start(node: &Node, extra: &[&str]) -> Self {
        let socket = node.dir.path().join("kms.sock");
        let log = node.dir.path().join("kleidi.log");
        let child = Command::new(env!("CARGO_BIN_EXE_kleidi"))
            .arg("serve")
            .arg("--listen")
            .arg(format!("unix://{}", socket.display()))
            .args(["--backend", "tpm"])
            .args(node.flags())
            .args(extra)
            .env("KLEIDI_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let k = Kleidi { child, socket, log };
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&k.socket).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "kleidi did not listen within 20 s:\n{}",
                k.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        k
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("unix:{}", self.socket.display()))
            .unwrap()
            .timeout(Duration::from_secs(3))
            .connect()
            .await
            .unwrap()
    }

    async fn v2(&self) -> V2 {
        V2::new(self.channel().await)
    }

    async fn status(&self) -> v2::StatusResponse {
        self.v2()
            .await
            .status(v2::StatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    async fn encrypt(&self, plaintext: Vec<u8>) -> Result<v2::EncryptResponse, tonic::Status> {
        let req = v2::EncryptRequest {
            plaintext,
            uid: "t".into(),
        };
        self.v2().await.encrypt(req).await.map(|r| r.into_inner())
    }

    async fn decrypt(&self, e: &v2::EncryptResponse) -> Result<Vec<u8>, tonic::Status> {
        let req = v2::DecryptRequest {
            ciphertext: e.ciphertext.clone(),
            uid: "t".into(),
            key_id: e.key_id.clone(),
            annotations: e.annotations.clone(),
        };
        self.v2()
            .await
            .decrypt(req)
            .await
            .map(|r| r.into_inner().plaintext)
    }
}

impl Drop for Kleidi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn seed() -> Vec<u8> {
    let mut s = vec![0u8; 32];
    rand::rng().fill_bytes(&mut s);
    s
}

/// Polls Status until `pred` holds (the health cache expires every 200 ms in these tests).
async fn status_until(
    k: &Kleidi,
    what: &str,
    pred: impl Fn(&v2::StatusResponse) -> bool,
) -> v2::StatusResponse {
    let started = Instant::now();
    loop {
        let st = k.status().await;
        if pred(&st) {
            return st;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: Status still {st:?} after 10 s\n{}",
            k.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const FAST_HEALTH: [&str; 4] = ["--health-ok-ttl", "200ms", "--health-err-ttl", "200ms"];

#[tokio::test]
async fn v2_seed_round_trips_through_the_socket_with_the_status_key_id() {
    let node = Node::new();
    let key_id = node.init();
    let k = Kleidi::start(&node, &[]);
    let st = k.status().await;
    assert_eq!(
        (st.version.as_str(), st.healthz.as_str(), st.key_id.as_str()),
        ("v2", "ok", key_id.as_str())
    );
    let s = seed();
    let enc = k.encrypt(s.clone()).await.unwrap();
    assert_eq!(enc.key_id, key_id);
    assert!(enc.ciphertext.len() <= 1024);
    assert!(
        !enc.ciphertext.windows(s.len()).any(|w| w == s),
        "seed visible in ciphertext"
    );
    assert_eq!(k.decrypt(&enc).await.unwrap(), s);

    let mut tampered = enc.clone();
    tampered.ciphertext[100] ^= 1;
    assert_eq!(
        k.decrypt(&tampered).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let oversized = k.encrypt(vec![1; 129]).await.unwrap_err();
    assert_eq!(oversized.code(), Code::InvalidArgument, "{oversized:?}");
    assert_eq!(
        k.status().await.healthz,
        "ok",
        "bad input leaves the plugin healthy"
    );
}

#[tokio::test]
async fn v1beta1_dek_round_trips_for_clusters_still_on_kms_v1() {
    let node = Node::new();
    node.init();
    let k = Kleidi::start(&node, &[]);
    let mut v1 = v1beta1::key_management_service_client::KeyManagementServiceClient::new(k.channel().await);
    let dek = seed();
    let enc = v1
        .encrypt(v1beta1::EncryptRequest {
            version: "v1beta1".into(),
            plain: dek.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let dec = v1
        .decrypt(v1beta1::DecryptRequest {
            version: "v1beta1".into(),
            cipher: enc.cipher.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dec.plain, dek);
    let mut cipher = enc.cipher;
    *cipher.last_mut().unwrap() ^= 1;
    let bad = v1
        .decrypt(v1beta1::DecryptRequest {
            version: "v1beta1".into(),
            cipher,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn tpm_init_rotates_while_serving_and_old_seeds_still_decrypt() {
    let node = Node::new();
    let first = node.init();
    let k = Kleidi::start(&node, &FAST_HEALTH);
    let s = seed();
    let old = k.encrypt(s.clone()).await.unwrap();
    let second = node.init();
    assert_ne!(second, first);
    status_until(&k, "rotation", |st| st.key_id == second).await;
    assert_eq!(k.encrypt(seed()).await.unwrap().key_id, second);
    assert_eq!(k.decrypt(&old).await.unwrap(), s);
}

#[tokio::test]
async fn a_restarted_tpm_recovers_and_a_wiped_one_is_unhealthy_naming_the_key() {
    let mut node = Node::new();
    let key_id = node.init();
    let k = Kleidi::start(&node, &FAST_HEALTH);
    let s = seed();
    let enc = k.encrypt(s.clone()).await.unwrap();

    node.tpm.kill();
    let st = status_until(&k, "tpm down", |st| st.healthz != "ok").await;
    assert!(st.healthz.contains("tpm_unreachable"), "{st:?}");
    assert_eq!(k.encrypt(seed()).await.unwrap_err().code(), Code::Unavailable);
    node.tpm.launch();
    status_until(&k, "tpm back", |st| st.healthz == "ok").await;
    assert_eq!(k.decrypt(&enc).await.unwrap(), s);

    node.tpm.wipe();
    let st = status_until(&k, "tpm wiped", |st| st.healthz != "ok").await;
    assert!(st.healthz.contains("key_lost"), "{st:?}");
    assert_eq!(st.key_id, key_id, "the lost key is still the one Status names");
    let err = k.decrypt(&enc).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(&key_id), "{err:?}");
}
