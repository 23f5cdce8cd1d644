//! Recovery without a restart: the real `kleidi serve` on a SoftHSM token that is lost and restored
//! while callers keep calling, as an apiserver does. Each test has its own token store, so losing the
//! whole `directories.tokendir` touches nothing else.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // tests

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kleidi::proto::v2;
use support::{KEK, Kleidi, Token, seed};
use tokio::sync::Mutex;
use tonic::Code;

/// One call's result, at its end time (since the load started).
struct Outcome {
    at: Duration,
    code: Code,
    message: String,
}

/// Encrypt + Decrypt round trips from `callers` tasks until stopped; every outcome recorded.
struct Load {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    started: Instant,
}

impl Load {
    async fn start(k: &Kleidi, callers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..callers {
            let mut client = k.v2().await;
            let (stop, outcomes) = (stop.clone(), outcomes.clone());
            tasks.push(tokio::spawn(async move {
                // Bounded: the test stops the load, and a caller makes at most 100,000 calls.
                for _ in 0..100_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let s = seed();
                    let result = async {
                        let e = client
                            .encrypt(v2::EncryptRequest {
                                plaintext: s.clone(),
                                uid: "load".into(),
                            })
                            .await?
                            .into_inner();
                        let plain = client
                            .decrypt(v2::DecryptRequest {
                                ciphertext: e.ciphertext,
                                uid: "load".into(),
                                key_id: e.key_id,
                                annotations: e.annotations,
                            })
                            .await?
                            .into_inner()
                            .plaintext;
                        if plain != s {
                            return Err(tonic::Status::data_loss("round trip returned other bytes"));
                        }
                        Ok(())
                    }
                    .await;
                    let (code, message) = match result {
                        Ok(()) => (Code::Ok, String::new()),
                        Err(status) => (status.code(), status.message().to_owned()),
                    };
                    let failed = code != Code::Ok;
                    outcomes.lock().await.push(Outcome {
                        at: started.elapsed(),
                        code,
                        message,
                    });
                    if failed {
                        // An apiserver retries too, but not in a hot loop.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }));
        }
        Load {
            stop,
            outcomes,
            tasks,
            started,
        }
    }

    async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        Arc::try_unwrap(self.outcomes).ok().unwrap().into_inner()
    }
}

/// Loses `what` (moved away) for `outage` under load, restores it, and checks that the same process
/// serves again: every call fails UNAVAILABLE while the token is gone, the first success comes
/// within `recovery` of the return, every call from 2 s after that succeeds, a seed wrapped before
/// the loss still unwraps, and Status says ok as soon as real calls succeed.
async fn lose_and_restore(token: &Token, what: PathBuf, outage: Duration, recovery: Duration) -> Kleidi {
    // A failed probe is trusted for a minute here, so the last assert shows that successful real
    // calls, not a new probe, put Status back to ok.
    let k = Kleidi::start(token, KEK, &["--health-err-ttl", "60s"]);
    let mut client = k.v2().await;
    let before_seed = seed();
    let before = client
        .encrypt(v2::EncryptRequest {
            plaintext: before_seed.clone(),
            uid: "before".into(),
        })
        .await
        .unwrap()
        .into_inner();

    let load = Load::start(&k, 4).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let away = token.dir.path().join("away");
    let lost_at = load.started.elapsed();
    std::fs::rename(&what, &away).unwrap();
    tokio::time::sleep(outage).await;
    assert_ne!(k.status().await.healthz, "ok", "Status must show the loss");
    std::fs::rename(&away, &what).unwrap();
    let back_at = load.started.elapsed();
    tokio::time::sleep(recovery + Duration::from_secs(4)).await;
    let outcomes = load.finish().await;

    let ok_before = outcomes
        .iter()
        .filter(|o| o.at < lost_at && o.code == Code::Ok)
        .count();
    assert!(ok_before > 0, "no load before the loss");
    for o in outcomes.iter().filter(|o| o.at < lost_at) {
        assert_eq!(o.code, Code::Ok, "before the loss: {}", o.message);
    }
    // Calls that started before the loss may still finish after it; allow a short overlap.
    for o in outcomes
        .iter()
        .filter(|o| o.at > lost_at + Duration::from_millis(500) && o.at < back_at)
    {
        assert_eq!(o.code, Code::Unavailable, "while lost: {}", o.message);
    }
    let first_ok = outcomes
        .iter()
        .filter(|o| o.at > back_at && o.code == Code::Ok)
        .map(|o| o.at)
        .min()
        .unwrap_or_else(|| {
            let last = outcomes.iter().rev().find(|o| o.code != Code::Ok);
            panic!(
                "no call succeeded in the {:?} after the token returned; last error: {:?}\nlog:\n{}",
                recovery + Duration::from_secs(4),
                last.map(|o| &o.message),
                tail(&k.logs(), 40)
            )
        });
    let took = first_ok - back_at;
    eprintln!("first successful call {took:?} after the token returned");
    assert!(took < recovery, "recovery took {took:?}");
    let settled = first_ok + Duration::from_secs(2);
    let after: Vec<_> = outcomes.iter().filter(|o| o.at > settled).collect();
    assert!(!after.is_empty(), "no load after recovery");
    for o in after {
        assert_eq!(o.code, Code::Ok, "after recovery: {}", o.message);
    }

    let plain = client
        .decrypt(v2::DecryptRequest {
            ciphertext: before.ciphertext,
            uid: "after".into(),
            key_id: before.key_id.clone(),
            annotations: before.annotations,
        })
        .await
        .unwrap()
        .into_inner()
        .plaintext;
    assert_eq!(
        plain, before_seed,
        "a seed wrapped before the loss unwraps after it"
    );
    let st = k.status().await;
    assert_eq!(
        st.healthz, "ok",
        "real calls succeed again, so Status must say so"
    );
    assert_eq!(st.key_id, before.key_id);
    k
}

fn tail(logs: &str, n: usize) -> String {
    let lines: Vec<&str> = logs.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[tokio::test]
async fn the_whole_token_directory_lost_for_15_s_under_load_recovers_without_a_restart() {
    let token = Token::new();
    let tokendir = token.dir.path().join("tokens");
    let k = lose_and_restore(&token, tokendir, Duration::from_secs(15), Duration::from_secs(5)).await;
    let logs = k.logs();
    // The real cause, on the reload attempts: SoftHSM's C_Initialize fails while tokendir is gone.
    assert!(
        logs.contains("C_Initialize returned CKR_GENERAL_ERROR"),
        "the failed initialize is not logged:\n{}",
        tail(&logs, 40)
    );
    assert!(
        !logs.contains("retrying once after reconnecting"),
        "misleading retry line"
    );
    assert!(logs.contains("pkcs11 reconnected"), "{}", tail(&logs, 40));
}

#[tokio::test]
async fn the_token_subdirectory_lost_under_load_recovers_without_a_restart() {
    let token = Token::new();
    let dir = token.token_dir();
    let k = lose_and_restore(&token, dir, Duration::from_secs(5), Duration::from_secs(5)).await;
    assert!(k.logs().contains("pkcs11 reconnected"));
}
