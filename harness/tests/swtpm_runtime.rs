//! The swtpm runtime under `kleidi serve --backend tpm`, both as local processes: a round trip,
//! the TPM killed and started again on its state (kleidi recovers by itself), the TPM paused and
//! resumed, a wiped TPM (unhealthy, naming the lost key), and three TPMs sharing one KEK enrolled by
//! the CLI (`SharedKek`), rotated while every plugin serves. Needs `apt-get install swtpm
//! swtpm-tools libtss2-dev`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test helpers outside #[test] functions

use std::time::{Duration, Instant};

use kleidi_harness::apiserver::kms::{DecryptRequest, EncryptResponse, StatusResponse};
use kleidi_harness::apiserver::{Authority, GrpcKms, KmsClient, connect_unix};
use kleidi_harness::runtime::{KleidiPlugin, SharedKek, Swtpm, kleidi_bin};

const SEED: &[u8] = b"a 32-byte seed, as the apiserver";
/// Health verdicts expire quickly, so Status follows the TPM within a poll or two.
const FAST_HEALTH: [&str; 4] = ["--health-ok-ttl", "200ms", "--health-err-ttl", "200ms"];

/// A TPM, its key, and kleidi serving on it.
struct Rig {
    tpm: Swtpm,
    key_id: String,
    plugin: KleidiPlugin,
    client: GrpcKms,
}

impl Rig {
    async fn start() -> Self {
        let bin = kleidi_bin().unwrap();
        let tpm = Swtpm::start().await.unwrap();
        let key_id = tpm.init_key(&bin).await.unwrap();
        let socket = tpm.dir().join("kms.sock");
        let env = [("TSS2_LOG".to_string(), "all+none".to_string())];
        let log = tpm.dir().join("kleidi.log");
        let plugin = KleidiPlugin::launch(&bin, socket.clone(), tpm.kleidi_flags(), &env, &log, &FAST_HEALTH)
            .await
            .unwrap();
        let client = connect_unix(&socket, Authority::Localhost).await.unwrap();
        Rig {
            tpm,
            key_id,
            plugin,
            client,
        }
    }

    async fn decrypt(&self, sealed: &EncryptResponse) -> Result<Vec<u8>, tonic::Status> {
        let request = DecryptRequest {
            ciphertext: sealed.ciphertext.clone(),
            key_id: sealed.key_id.clone(),
            annotations: sealed.annotations.clone(),
        };
        Ok(self.client.decrypt("uid", &request).await?.to_vec())
    }

    /// Polls Status until `pred` holds; bounded at 15 s.
    async fn status_until(&self, what: &str, pred: impl Fn(&StatusResponse) -> bool) -> StatusResponse {
        let started = Instant::now();
        loop {
            let status = self.client.status().await.unwrap();
            if pred(&status) {
                return status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{what}: Status still {status:?}\n{}",
                self.plugin.process.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn kleidi_on_swtpm_round_trips_and_recovers_by_itself_after_the_tpm_is_killed_and_restarted() {
    let mut rig = Rig::start().await;
    let status = rig.status_until("start", |s| s.healthz == "ok").await;
    assert_eq!(status.key_id, rig.key_id);
    let sealed = rig.client.encrypt("uid", SEED).await.unwrap();
    assert_eq!(sealed.key_id, rig.key_id);
    assert_eq!(rig.decrypt(&sealed).await.unwrap(), SEED);

    rig.tpm.kill().await.unwrap();
    let status = rig.status_until("tpm killed", |s| s.healthz != "ok").await;
    assert!(status.healthz.contains("tpm_unreachable"), "{status:?}");
    let err = rig.client.encrypt("uid", SEED).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");

    rig.tpm.start_again().await.unwrap();
    rig.status_until("tpm back", |s| s.healthz == "ok").await;
    assert_eq!(rig.decrypt(&sealed).await.unwrap(), SEED, "no kleidi restart");
    let fresh = rig.client.encrypt("uid", SEED).await.unwrap();
    assert_eq!(rig.decrypt(&fresh).await.unwrap(), SEED);
    assert!(rig.plugin.process.is_running());

    // restart = kill + start on the same state, in one verb.
    rig.tpm.restart().await.unwrap();
    assert_eq!(rig.decrypt(&fresh).await.unwrap(), SEED);
}

#[tokio::test]
async fn a_paused_tpm_fails_calls_until_resumed_and_a_wiped_one_names_the_lost_key() {
    let mut rig = Rig::start().await;
    let sealed = rig.client.encrypt("uid", SEED).await.unwrap();

    rig.tpm.pause().unwrap();
    assert!(
        rig.decrypt(&sealed).await.is_err(),
        "a hung TPM answers nothing within the call deadline"
    );
    rig.tpm.resume().unwrap();
    rig.status_until("tpm resumed", |s| s.healthz == "ok").await;
    assert_eq!(rig.decrypt(&sealed).await.unwrap(), SEED);

    rig.tpm.wipe().await.unwrap();
    let status = rig.status_until("tpm wiped", |s| s.healthz != "ok").await;
    assert!(status.healthz.contains("key_lost"), "{status:?}");
    assert_eq!(
        status.key_id, rig.key_id,
        "the lost key is still the one Status names"
    );
    let err = rig.decrypt(&sealed).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
}

async fn decrypt(client: &GrpcKms, sealed: &EncryptResponse) -> Result<Vec<u8>, tonic::Status> {
    let request = DecryptRequest {
        ciphertext: sealed.ciphertext.clone(),
        key_id: sealed.key_id.clone(),
        annotations: sealed.annotations.clone(),
    };
    Ok(client.decrypt("uid", &request).await?.to_vec())
}

/// Polls `client`'s Status until it names `key_id`; bounded at 15 s.
async fn status_names(client: &GrpcKms, key_id: &str) {
    let started = Instant::now();
    loop {
        let status = client.status().await.unwrap();
        if status.key_id == key_id && status.healthz == "ok" {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "Status still {status:?}, expected {key_id}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn three_tpms_enrolled_by_the_cli_share_one_kek_and_a_rotation_reaches_all_of_them() {
    let bin = kleidi_bin().unwrap();
    let mut tpms = Vec::new();
    for _ in 0..3 {
        tpms.push(Swtpm::start().await.unwrap());
    }
    let refs: Vec<_> = tpms.iter().map(Swtpm::access).collect();
    let mut shared = SharedKek::enrol(&bin, &refs).await.unwrap();
    let first = shared.key_id().to_owned();
    assert!(first.starts_with("tpm:"), "{first}");
    assert!(
        shared.dir().join("admin").is_file(),
        "the admin key is in the run's temp dir"
    );

    let env = [("TSS2_LOG".to_string(), "all+none".to_string())];
    let mut plugins = Vec::new();
    let mut clients = Vec::new();
    for tpm in &tpms {
        let socket = tpm.dir().join("kms.sock");
        let log = tpm.dir().join("kleidi.log");
        let plugin = KleidiPlugin::launch(&bin, socket.clone(), tpm.kleidi_flags(), &env, &log, &FAST_HEALTH)
            .await
            .unwrap();
        plugins.push(plugin);
        let client = connect_unix(&socket, Authority::Localhost).await.unwrap();
        status_names(&client, &first).await;
        clients.push(client);
    }
    let old = clients[0].encrypt("uid", SEED).await.unwrap();
    assert_eq!(old.key_id, first);
    for client in &clients[1..] {
        assert_eq!(decrypt(client, &old).await.unwrap(), SEED, "wrapped on node 0");
    }

    // While every plugin serves: each node switches to the new key by itself, and what any node
    // wraps with it every node unwraps, as does what was wrapped before.
    let second = shared.rotate(&bin, &refs).await.unwrap();
    assert_ne!(second, first);
    for (n, client) in clients.iter().enumerate() {
        status_names(client, &second).await;
        let fresh = client.encrypt("uid", SEED).await.unwrap();
        assert_eq!(fresh.key_id, second, "node {n}");
        for other in &clients {
            assert_eq!(decrypt(other, &fresh).await.unwrap(), SEED, "wrapped on node {n}");
            assert_eq!(
                decrypt(other, &old).await.unwrap(),
                SEED,
                "the first key, after the rotation"
            );
        }
    }
    for plugin in &mut plugins {
        assert!(plugin.process.is_running());
    }
}
