//! The OpenBao runtime and the fault proxy against a real `bao server`: what kleidi's token may
//! do, what survives a restart, a seal, a revoked or expired token and a rotation, and what each
//! proxy fault does to a call. Timing assertions are lower bounds only (a 2-core machine is slow,
//! never fast).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test helpers outside #[test] functions

use std::time::{Duration, Instant};

use kleidi_harness::apiserver::{Authority, KmsClient, connect_unix};
use kleidi_harness::runtime::{
    BaoClient, Direction, Fault, FaultProxy, KleidiPlugin, OpenBao, TokenLease, kleidi_bin,
};
use secrecy::{ExposeSecret, SecretString};

const SEED: &[u8] = b"a 32-byte seed, as the apiserver";

/// A started OpenBao, a proxy in front of it, and a client with kleidi's token through the proxy.
struct Rig {
    bao: OpenBao,
    proxy: FaultProxy,
    client: BaoClient,
    token: SecretString,
}

impl Rig {
    async fn start() -> Self {
        let bao = OpenBao::start().await.unwrap();
        let proxy = FaultProxy::start(bao.listen_addr()).await.unwrap();
        let client = BaoClient::new(&proxy.url(), Duration::from_secs(2)).unwrap();
        let token = bao.kleidi_token().unwrap();
        Rig {
            bao,
            proxy,
            client,
            token,
        }
    }

    async fn encrypt(&self) -> anyhow::Result<String> {
        self.client
            .encrypt(&self.token, self.bao.mount(), self.bao.key(), SEED)
            .await
    }

    async fn decrypt(&self, ciphertext: &str) -> anyhow::Result<Vec<u8>> {
        let plaintext = self
            .client
            .decrypt(&self.token, self.bao.mount(), self.bao.key(), ciphertext)
            .await?;
        Ok(plaintext.to_vec())
    }

    /// The HTTP status kleidi's token gets for an encrypt (0 if no answer at all).
    async fn encrypt_status(&self) -> u16 {
        let body = serde_json::json!({ "plaintext": "AAAA" });
        let path = format!("{}/encrypt/{}", self.bao.mount(), self.bao.key());
        match self
            .client
            .request("POST", &path, Some(&self.token), Some(&body))
            .await
        {
            Ok(answer) => answer.status,
            Err(_) => 0,
        }
    }
}

#[tokio::test]
async fn kleidis_token_round_trips_through_the_proxy_and_may_not_rotate() {
    let rig = Rig::start().await;
    let ciphertext = rig.encrypt().await.unwrap();
    assert!(ciphertext.starts_with("vault:v1:"), "{ciphertext}");
    assert_eq!(rig.decrypt(&ciphertext).await.unwrap(), SEED);

    let rotate = format!("{}/keys/{}/rotate", rig.bao.mount(), rig.bao.key());
    let denied = rig
        .client
        .request("POST", &rotate, Some(&rig.token), None)
        .await
        .unwrap();
    assert_eq!(denied.status, 403, "the fixture policy grants no rotation");

    let stats = rig.proxy.stats();
    assert!(stats.connections >= 3, "{stats:?}");
    assert!(
        stats.bytes_to_server > 0 && stats.bytes_to_client > 0,
        "{stats:?}"
    );
    let debug = format!("{:?}", rig.bao);
    assert!(!debug.contains(rig.token.expose_secret()), "{debug}");
    assert!(!rig.bao.logs().contains(rig.token.expose_secret()));
}

#[tokio::test]
async fn restart_comes_back_sealed_and_unsealing_keeps_key_and_token() {
    let mut rig = Rig::start().await;
    let ciphertext = rig.encrypt().await.unwrap();

    rig.bao.restart().await.unwrap();
    assert!(rig.bao.is_sealed().await.unwrap());
    assert_eq!(rig.encrypt_status().await, 503);
    rig.bao.unseal().await.unwrap();
    assert_eq!(rig.decrypt(&ciphertext).await.unwrap(), SEED);

    // A crash (SIGKILL) keeps the same: raft wrote everything before answering.
    rig.bao.kill().await.unwrap();
    assert_eq!(rig.encrypt_status().await, 0, "nothing listens after a kill");
    rig.bao.restart_and_unseal().await.unwrap();
    assert_eq!(rig.decrypt(&ciphertext).await.unwrap(), SEED);
}

#[tokio::test]
async fn sealing_refuses_every_call_until_unsealed() {
    let rig = Rig::start().await;
    rig.bao.seal().await.unwrap();
    assert!(rig.bao.is_sealed().await.unwrap());
    assert_eq!(rig.encrypt_status().await, 503);
    rig.bao.unseal().await.unwrap();
    assert_eq!(rig.encrypt_status().await, 200);
}

#[tokio::test]
async fn a_revoked_token_gets_403_and_a_new_token_in_the_file_works() {
    let mut rig = Rig::start().await;
    rig.bao.revoke_token().await.unwrap();
    assert_eq!(rig.encrypt_status().await, 403);

    rig.bao
        .new_token(TokenLease::Periodic(Duration::from_secs(60)))
        .await
        .unwrap();
    let fresh = rig.bao.kleidi_token().unwrap();
    assert_ne!(fresh.expose_secret(), rig.token.expose_secret());
    rig.token = fresh;
    assert_eq!(rig.encrypt_status().await, 200);
}

#[tokio::test]
async fn a_short_ttl_token_works_until_it_expires() {
    let mut rig = Rig::start().await;
    let ttl = Duration::from_secs(2);
    rig.bao
        .new_token(TokenLease::Ttl { ttl, max: ttl })
        .await
        .unwrap();
    let issued = Instant::now();
    rig.token = rig.bao.kleidi_token().unwrap();
    assert_eq!(rig.encrypt_status().await, 200);

    tokio::time::sleep((ttl + Duration::from_millis(500)).saturating_sub(issued.elapsed())).await;
    assert_eq!(rig.encrypt_status().await, 403);
}

#[tokio::test]
async fn rotation_bumps_the_version_and_old_versions_decrypt_until_disabled_or_deleted() {
    let rig = Rig::start().await;
    let old = rig.encrypt().await.unwrap();
    assert_eq!(rig.bao.key_version().await.unwrap(), 1);
    assert_eq!(rig.bao.rotate_key().await.unwrap(), 2);
    let new = rig.encrypt().await.unwrap();
    assert!(new.starts_with("vault:v2:"), "{new}");
    assert_eq!(rig.decrypt(&old).await.unwrap(), SEED);

    rig.bao.set_min_decryption_version(2).await.unwrap();
    assert!(rig.decrypt(&old).await.is_err(), "v1 is disabled");
    assert_eq!(rig.decrypt(&new).await.unwrap(), SEED);

    rig.bao.delete_key().await.unwrap();
    assert!(rig.decrypt(&new).await.is_err(), "the key is gone");
    assert!(
        rig.encrypt().await.is_err(),
        "no upsert: encrypt does not recreate it"
    );
}

#[tokio::test]
async fn blackhole_makes_a_request_time_out_and_pass_restores_it() {
    let rig = Rig::start().await;
    rig.proxy.set(Fault::Blackhole);
    let started = Instant::now();
    let err = rig.encrypt().await.unwrap_err();
    assert!(started.elapsed() >= Duration::from_secs(2), "{err:#}");
    assert!(format!("{err:#}").contains("no answer"), "{err:#}");
    assert!(rig.proxy.stats().bytes_swallowed > 0);

    rig.proxy.set(Fault::Pass);
    assert_eq!(rig.encrypt_status().await, 200);
}

#[tokio::test]
async fn reset_fails_new_and_open_connections_at_once() {
    let rig = Rig::start().await;
    let mut open = tokio::net::TcpStream::connect(rig.proxy.addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await; // the relay to OpenBao is up

    rig.proxy.set(Fault::Reset);
    let started = Instant::now();
    assert!(rig.encrypt().await.is_err());
    let mut buf = [0u8; 16];
    let read = tokio::io::AsyncReadExt::read(&mut open, &mut buf).await;
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    rig.proxy.set(Fault::Pass);
    assert_eq!(rig.encrypt_status().await, 200);
}

#[tokio::test]
async fn latency_delays_each_direction_by_at_least_its_delay() {
    let rig = Rig::start().await;
    let delay = Duration::from_millis(300);
    for (direction, least) in [(Direction::ToServer, delay), (Direction::Both, 2 * delay)] {
        rig.proxy.set(Fault::Latency { delay, direction });
        let started = Instant::now();
        assert_eq!(rig.encrypt_status().await, 200);
        assert!(
            started.elapsed() >= least,
            "{direction:?}: {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn close_after_cuts_the_answer_at_that_many_bytes() {
    let rig = Rig::start().await;
    rig.proxy.set(Fault::CloseAfter {
        bytes: 20,
        direction: Direction::ToClient,
    });
    let before = rig.proxy.stats().bytes_to_client;
    let err = rig.encrypt().await.unwrap_err();
    assert!(format!("{err:#}").contains("no complete HTTP answer"), "{err:#}");
    assert_eq!(rig.proxy.stats().bytes_to_client - before, 20);
}

#[tokio::test]
async fn pause_hangs_calls_and_resume_answers_them() {
    let rig = Rig::start().await;
    rig.bao.pause().unwrap();
    assert_eq!(rig.encrypt_status().await, 0, "a paused server answers nothing");
    rig.bao.resume().unwrap();
    assert_eq!(rig.encrypt_status().await, 200);
}

#[tokio::test]
async fn dropping_the_proxy_closes_its_port() {
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = FaultProxy::start(target.local_addr().unwrap()).await.unwrap();
    let addr = proxy.addr();
    tokio::net::TcpStream::connect(addr).await.unwrap();
    drop(proxy);
    let started = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(started.elapsed() < Duration::from_secs(2), "still listening");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn kleidi_serve_through_the_proxy_fails_under_blackhole_and_recovers_after_pass() {
    let rig = Rig::start().await;
    let dir = tempfile::tempdir().unwrap();
    let plugin = KleidiPlugin::start_vault(
        &kleidi_bin().unwrap(),
        &rig.bao,
        &rig.proxy.url(),
        dir.path(),
        &["--call-timeout", "1s"],
    )
    .await
    .unwrap();
    let kms = connect_unix(&plugin.socket, Authority::Localhost).await.unwrap();
    let wrapped = kms.encrypt("before", SEED).await.unwrap();
    assert!(
        wrapped.key_id.starts_with("vault:transit/kleidi-kek:v1:"),
        "{}",
        wrapped.key_id
    );

    rig.proxy.set(Fault::Blackhole);
    let started = Instant::now();
    assert!(kms.encrypt("during", SEED).await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "bounded by --call-timeout"
    );

    rig.proxy.set(Fault::Pass);
    let after = kms.encrypt("after", SEED).await;
    assert!(after.is_ok(), "{after:?}\n{}", plugin.process.logs());
    let logs = plugin.process.logs();
    assert!(
        !logs.contains(rig.token.expose_secret()),
        "kleidi logged its token"
    );
}
