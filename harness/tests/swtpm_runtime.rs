//! The swtpm runtime under `kleidi serve --backend tpm`, both as local processes: a round trip,
//! the TPM killed and started again on its state (kleidi recovers by itself), the TPM paused and
//! resumed, and a wiped TPM (unhealthy, naming the lost key). Needs `apt-get install swtpm
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
use kleidi_harness::runtime::{KleidiPlugin, Swtpm, kleidi_bin};

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
        let key_id = tpm.init_key(&bin).unwrap();
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
