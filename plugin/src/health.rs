//! Cached health, as a layer around any [`KeyService`].
//!
//! kube-apiserver polls Status every minute, and its healthz/readyz endpoints add a call about every
//! 20 s, on every control-plane node. Status must stay cheap and still tell the truth, so it answers
//! from the last probe, repeated at most once per `ok_ttl` while healthy and once per `err_ttl`
//! after a failure.
//!
//! A probe has two depths, so an idle plugin stays inside a budget of backend calls per hour (each
//! may cost money or rate limit) and still notices a rotation or an outage within one `ok_ttl`:
//! - **Key check** (one call): read the current key_id. It proves the backend answers, the
//!   credential works and the key exists, and it is how a rotation is seen. A backend whose key_id
//!   comes from local state (TPM) proves nothing by it, so there every probe is a round trip.
//! - **Round trip** (two more): encrypt a random 32-byte value with the current key and decrypt it.
//!   It runs when the key check is not enough: after a failure, when a real call cast doubt, when
//!   the key_id changed, or when encrypt or decrypt have not been seen working with the current key
//!   for `roundtrip` (a real Encrypt, or a real Decrypt under the current key, counts).
//!
//! Real calls feed in both ways. A backend failure (not bad input) while the cache says healthy makes
//! the next Status probe at once instead of trusting the cache; while the cache already says
//! unhealthy, further failures change nothing (`err_ttl` paces the probes, so a hung backend costs one
//! probe per `err_ttl`, not one per Status). A successful Encrypt, or a Decrypt under the current
//! key, is as good as a probe: Status says ok again with the first call that works.
//!
//! Only one probe runs at a time, as a task of its own. The Status call that starts it waits for it
//! at most `answer_within` (below the apiserver's 3 s deadline) when an earlier verdict exists;
//! Status calls arriving during it answer from the earlier verdict at once. So a probe may take as
//! long as its three backend calls need (`probe_timeout`, 3 × `--call-timeout`): a slow backend
//! whose every call succeeds is healthy, and a hung one never makes Status slow.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretSlice};
use tracing::Instrument as _;

use crate::metrics::{self, Observed};
use crate::service::{Credential, Encrypted, KeyService};
use crate::{Error, Result};

/// How long a probe result is trusted.
#[derive(Clone, Copy, Debug)]
pub struct HealthTtl {
    /// After a successful probe (default 45 s: below the apiserver's 60 s poll, and 80 key checks an
    /// hour, which leaves room in a budget of 120 backend calls an hour for the round trips).
    pub ok: Duration,
    /// How long encrypt and decrypt, once seen working with the current key, are trusted before a
    /// probe checks them again with a round trip (default 5 min: 12 round trips an hour when idle,
    /// none while real calls keep succeeding).
    pub roundtrip: Duration,
    /// After a failed probe (default 5 s: below the apiserver's 10 s retry).
    pub err: Duration,
    /// Bound on a whole probe (three backend calls, each bounded by the call timeout on its own).
    pub probe_timeout: Duration,
    /// How long the Status call that starts a probe waits for it before answering from the earlier
    /// verdict (default 2 s: inside the apiserver's 3 s Status deadline).
    pub answer_within: Duration,
}

impl Default for HealthTtl {
    fn default() -> Self {
        Self {
            ok: Duration::from_secs(45),
            roundtrip: Duration::from_secs(300),
            err: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(6),
            answer_within: Duration::from_secs(2),
        }
    }
}

/// What Status reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// `"ok"`, or a short reason the apiserver shows in its healthz output.
    pub healthz: String,
    /// The current key_id; empty only if no probe has ever reached the backend.
    pub key_id: String,
}

/// The last verdict on the backend, from a probe or a real call.
struct Verdict {
    at: Instant,
    /// `None` when healthy, else the healthz reason.
    failure: Option<String>,
    /// When the backend last went from healthy to failing (for the recovery log line).
    failing_since: Option<Instant>,
}

/// When encrypt and decrypt last worked with one key, by a probe or a real call.
#[derive(Default)]
struct Proven {
    key_id: String,
    encrypt: Option<Instant>,
    decrypt: Option<Instant>,
}

impl Proven {
    fn note(&mut self, key_id: &str, op: Op) {
        if self.key_id != key_id {
            *self = Proven {
                key_id: key_id.to_string(),
                ..Proven::default()
            };
        }
        let now = Some(Instant::now());
        match op {
            Op::Encrypt => self.encrypt = now,
            Op::Decrypt => self.decrypt = now,
        }
    }

    /// Both seen working with `key_id` within `within`.
    fn fresh(&self, key_id: &str, within: Duration) -> bool {
        self.key_id == key_id
            && [self.encrypt, self.decrypt]
                .iter()
                .all(|t| t.is_some_and(|t| t.elapsed() < within))
    }
}

#[derive(Clone, Copy)]
enum Op {
    Encrypt,
    Decrypt,
}

/// A [`KeyService`] that also answers Status from a cached round-trip probe.
pub struct Healthy<S> {
    shared: Arc<Shared<S>>,
}

/// What the probe task shares with the calls.
struct Shared<S> {
    inner: S,
    ttl: HealthTtl,
    last: Mutex<Option<Verdict>>,
    /// Held by the one probe in flight.
    probing: Arc<tokio::sync::Mutex<()>>,
    /// The key_id of the latest successful encrypt or probe, so Status follows a rotation that a real
    /// Encrypt saw first.
    key_id: Mutex<String>,
    /// Set by a backend failure in a real call while the cache says healthy: the next Status probes.
    suspect: AtomicBool,
    /// Decides whether a probe needs the round trip.
    proven: Mutex<Proven>,
}

impl<S: KeyService> Healthy<S> {
    /// Wraps `inner`; nothing is probed until the first Status.
    pub fn new(inner: S, ttl: HealthTtl) -> Self {
        Self {
            shared: Arc::new(Shared {
                inner,
                ttl,
                last: Mutex::new(None),
                probing: Arc::new(tokio::sync::Mutex::new(())),
                key_id: Mutex::new(String::new()),
                suspect: AtomicBool::new(false),
                proven: Mutex::new(Proven::default()),
            }),
        }
    }

    /// The cached health; when it is stale, starts a probe (unless one runs) and answers from it, or
    /// from the earlier verdict if the probe takes longer than `answer_within`.
    pub async fn health(&self) -> Health {
        let shared = &self.shared;
        if let Some(health) = shared.cached(true) {
            return health;
        }
        let started_here = shared.start_probe();
        match shared.cached(false) {
            Some(earlier) if !started_here => earlier,
            Some(earlier) => {
                let _ = tokio::time::timeout(shared.ttl.answer_within, shared.probing.lock()).await;
                shared.cached(false).unwrap_or(earlier)
            }
            None => {
                // The very first verdict: wait for it (the probe is bounded by probe_timeout).
                drop(shared.probing.lock().await);
                shared.cached(false).unwrap_or_else(|| Health {
                    healthz: "no verdict".into(),
                    key_id: shared.known_key_id(),
                })
            }
        }
    }

    #[cfg(test)]
    fn observe<T>(&self, result: &Result<T>) {
        self.shared.observe(result)
    }
}

impl<S: KeyService> Shared<S> {
    /// Starts a probe as a task of its own unless one is running; whether this call started it.
    fn start_probe(self: &Arc<Self>) -> bool {
        match Arc::clone(&self.probing).try_lock_owned() {
            Ok(guard) => {
                let probe = Arc::clone(self);
                // A span of its own, never the caller's: the probe is shared, and a Status call that
                // started or waited for it must not have the probe's lines logged under its uid.
                let uid = format!("kleidi-health-{}", uuid::Uuid::new_v4());
                let span = tracing::error_span!(parent: None, "health_probe", uid = %uid);
                let run = async move {
                    let _guard = guard;
                    probe.run_probe(&uid).await;
                };
                tokio::spawn(metrics::as_probe(run.instrument(span)));
                true
            }
            Err(_) => false,
        }
    }

    async fn run_probe(&self, uid: &str) {
        let doubted = self.suspect.swap(false, Ordering::AcqRel);
        let healthy = lock(&self.last).as_ref().is_some_and(|v| v.failure.is_none());
        // Only a healthy verdict nobody doubts may be renewed by the key check alone: a failure may
        // have been in encrypt or decrypt, which the key check does not exercise.
        let full = doubted || !healthy;
        let started = Instant::now();
        let result = tokio::time::timeout(self.ttl.probe_timeout, self.probe(full, uid))
            .await
            .unwrap_or(Err(Error::Timeout(self.ttl.probe_timeout)));
        match result {
            Ok(key_id) => {
                self.remember_key_id(&key_id);
                self.record(started, None);
            }
            Err(err) => {
                tracing::warn!(class = err.class(), error = %err, "health probe failed");
                self.record(started, Some(short_reason(&err)));
            }
        }
    }

    /// The last verdict as Status reports it; with `fresh_only`, only while its TTL lasts and no real
    /// call has cast doubt on a healthy one.
    fn cached(&self, fresh_only: bool) -> Option<Health> {
        let last = lock(&self.last);
        let verdict = last.as_ref()?;
        if fresh_only {
            let ttl = if verdict.failure.is_none() {
                self.ttl.ok
            } else {
                self.ttl.err
            };
            let doubted = verdict.failure.is_none() && self.suspect.load(Ordering::Acquire);
            if verdict.at.elapsed() >= ttl || doubted {
                return None;
            }
        }
        Some(Health {
            healthz: verdict.failure.clone().unwrap_or_else(|| "ok".into()),
            key_id: self.known_key_id(),
        })
    }

    /// Stores a verdict reached by something that started at `started`, unless a newer one exists
    /// (a real call that succeeded while a slow probe was still failing). Logs the transitions.
    fn record(&self, started: Instant, failure: Option<String>) {
        let mut last = lock(&self.last);
        if last.as_ref().is_some_and(|v| v.at > started) {
            return;
        }
        let previous = last.as_ref().map(|v| (v.failure.is_some(), v.failing_since));
        let failing_since = match (&failure, previous) {
            (None, _) => None,
            (Some(_), Some((true, since))) => since,
            (Some(_), _) => Some(started),
        };
        if let (None, Some((true, since))) = (&failure, previous) {
            let down_s = since.map(|t| t.elapsed().as_secs_f64()).unwrap_or_default();
            tracing::info!(down_s = format!("{down_s:.1}"), "backend healthy again");
        }
        *last = Some(Verdict {
            at: Instant::now(),
            failure,
            failing_since,
        });
    }

    /// A real call just worked with the current key: as good as a probe, if the last verdict was a
    /// failure (a healthy verdict is left to age, so probes still run once per `ok` TTL).
    fn vouch(&self) {
        let failing = lock(&self.last).as_ref().is_some_and(|v| v.failure.is_some());
        if failing {
            self.suspect.store(false, Ordering::Release);
            self.record(Instant::now(), None);
        }
    }

    async fn probe(&self, full: bool, uid: &str) -> Result<String> {
        let key_id = self.inner.current_key_id().await?;
        self.remember_key_id(&key_id);
        let key_check_suffices = self.inner.key_id_reaches_backend() && !full;
        if key_check_suffices && lock(&self.proven).fresh(&key_id, self.ttl.roundtrip) {
            return Ok(key_id);
        }
        let mut probe = vec![0u8; 32];
        rand::rng().fill_bytes(&mut probe);
        let probe = SecretSlice::from(probe);
        let wrapped = self.inner.encrypt(uid, &probe).await?;
        if wrapped.key_id != key_id {
            return Err(Error::Backend(format!(
                "encrypt used key_id {} while the current key is {key_id}",
                wrapped.key_id
            )));
        }
        lock(&self.proven).note(&key_id, Op::Encrypt);
        let unwrapped = self.inner.decrypt(uid, &wrapped).await?;
        if unwrapped.expose_secret() != probe.expose_secret() {
            return Err(Error::Backend("decrypt did not return what was encrypted".into()));
        }
        lock(&self.proven).note(&key_id, Op::Decrypt);
        Ok(key_id)
    }

    fn known_key_id(&self) -> String {
        lock(&self.key_id).clone()
    }

    fn remember_key_id(&self, key_id: &str) {
        let mut k = lock(&self.key_id);
        if *k != key_id {
            if !k.is_empty() {
                tracing::info!(from = %*k, to = %key_id, "current key_id changed");
            }
            *k = key_id.to_string();
        }
    }

    fn observe<T>(&self, result: &Result<T>) {
        if let Err(err) = result {
            let healthy = lock(&self.last).as_ref().is_some_and(|v| v.failure.is_none());
            if err.affects_health() && healthy {
                self.suspect.store(true, Ordering::Release);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The healthz text: the error's class and message, cut short (it lands in apiserver logs).
fn short_reason(err: &Error) -> String {
    let mut reason = err.to_string();
    if reason.len() > 200 {
        let cut = (0..=200).rev().find(|i| reason.is_char_boundary(*i)).unwrap_or(0);
        reason.truncate(cut);
    }
    reason
}

#[async_trait]
impl<S: KeyService> KeyService for Healthy<S> {
    fn name(&self) -> &'static str {
        self.shared.inner.name()
    }

    fn key_id_reaches_backend(&self) -> bool {
        self.shared.inner.key_id_reaches_backend()
    }

    fn credential_expiry(&self) -> Vec<(Credential, f64)> {
        self.shared.inner.credential_expiry()
    }

    async fn encrypt(&self, uid: &str, plaintext: &SecretSlice<u8>) -> Result<Encrypted> {
        let shared = &self.shared;
        let result = shared.inner.encrypt(uid, plaintext).await;
        shared.observe(&result);
        if let Ok(out) = &result {
            // The backend encrypts with its current key, so this names it.
            shared.remember_key_id(&out.key_id);
            lock(&shared.proven).note(&out.key_id, Op::Encrypt);
            shared.vouch();
        }
        result
    }

    async fn decrypt(&self, uid: &str, encrypted: &Encrypted) -> Result<SecretSlice<u8>> {
        let shared = &self.shared;
        let result = shared.inner.decrypt(uid, encrypted).await;
        shared.observe(&result);
        if result.is_ok() && encrypted.key_id == shared.known_key_id() {
            lock(&shared.proven).note(&encrypted.key_id, Op::Decrypt);
            shared.vouch();
        }
        result
    }

    async fn current_key_id(&self) -> Result<String> {
        let result = self.shared.inner.current_key_id().await;
        self.shared.observe(&result);
        result
    }
}

/// What the metrics scrape and `/readyz` read: the cache as it is, plus Status's own refresh.
impl<S: KeyService> Observed for Healthy<S> {
    fn verdict(&self) -> Option<metrics::Verdict> {
        lock(&self.shared.last).as_ref().map(|v| metrics::Verdict {
            failure: v.failure.clone(),
            age: v.at.elapsed(),
        })
    }

    fn refresh(&self) {
        if self.shared.cached(true).is_none() {
            self.shared.start_probe();
        }
    }

    fn key_id(&self) -> String {
        self.shared.known_key_id()
    }

    fn credentials(&self) -> Vec<(Credential, f64)> {
        self.shared.inner.credential_expiry()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// An in-memory key service that counts calls and can be told to fail or to lie. It exists to
    /// test the layer's caching logic; real backends are tested against real tokens and servers.
    #[derive(Default)]
    struct Scripted {
        calls: AtomicUsize,
        down: AtomicBool,
        lie: AtomicBool,
        /// current_key_id waits for this before answering (a hung backend).
        hang: tokio::sync::Notify,
        hung: AtomicBool,
        key_id: Mutex<String>,
        /// current_key_id reads local state only (as the TPM backend's does).
        local_key_id: AtomicBool,
    }

    #[async_trait]
    impl KeyService for Scripted {
        fn name(&self) -> &'static str {
            "scripted"
        }
        async fn encrypt(&self, _: &str, p: &SecretSlice<u8>) -> Result<Encrypted> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(Error::Unavailable {
                    backend: "scripted",
                    class: "network",
                    detail: "down".into(),
                });
            }
            Ok(Encrypted {
                ciphertext: p.expose_secret().to_vec(),
                key_id: self.key_id.lock().unwrap().clone(),
                ..Default::default()
            })
        }
        async fn decrypt(&self, _: &str, e: &Encrypted) -> Result<SecretSlice<u8>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mut p = e.ciphertext.clone();
            if self.lie.load(Ordering::SeqCst) {
                p[0] ^= 1;
            }
            Ok(SecretSlice::from(p))
        }
        fn key_id_reaches_backend(&self) -> bool {
            !self.local_key_id.load(Ordering::SeqCst)
        }
        async fn current_key_id(&self) -> Result<String> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.hung.load(Ordering::SeqCst) {
                self.hang.notified().await;
            }
            if self.down.load(Ordering::SeqCst) {
                return Err(Error::Unavailable {
                    backend: "scripted",
                    class: "network",
                    detail: "down".into(),
                });
            }
            Ok(self.key_id.lock().unwrap().clone())
        }
    }

    fn layer(ttl_ms: u64) -> (Arc<Scripted>, Healthy<Arc<Scripted>>) {
        layer_with(ttl_ms, 60_000)
    }

    fn layer_with(ttl_ms: u64, roundtrip_ms: u64) -> (Arc<Scripted>, Healthy<Arc<Scripted>>) {
        let backend = Arc::new(Scripted::default());
        *backend.key_id.lock().unwrap() = "k1".into();
        let ttl = Duration::from_millis(ttl_ms);
        (
            backend.clone(),
            Healthy::new(
                backend,
                HealthTtl {
                    ok: ttl,
                    roundtrip: Duration::from_millis(roundtrip_ms),
                    err: ttl,
                    probe_timeout: Duration::from_secs(5),
                    answer_within: Duration::from_secs(5),
                },
            ),
        )
    }

    #[tokio::test]
    async fn status_polls_within_the_ttl_cost_one_probe() {
        let (backend, healthy) = layer(60_000);
        for _ in 0..20 {
            assert_eq!(
                healthy.health().await,
                Health {
                    healthz: "ok".into(),
                    key_id: "k1".into()
                }
            );
        }
        // One probe = current_key_id + encrypt + decrypt.
        assert_eq!(backend.calls.load(Ordering::SeqCst), 3);
    }

    fn calls(backend: &Scripted) -> usize {
        backend.calls.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn a_stale_healthy_verdict_is_renewed_by_one_key_check() {
        let (backend, healthy) = layer(50);
        assert_eq!(healthy.health().await.healthz, "ok");
        assert_eq!(calls(&backend), 3, "the first probe is a round trip");
        for probe in 1..=3 {
            tokio::time::sleep(Duration::from_millis(60)).await;
            assert_eq!(healthy.health().await.healthz, "ok");
            assert_eq!(calls(&backend), 3 + probe, "one backend call per later probe");
        }
    }

    #[tokio::test]
    async fn a_key_id_read_from_local_state_never_renews_the_verdict_alone() {
        let (backend, healthy) = layer(50);
        backend.local_key_id.store(true, Ordering::SeqCst);
        assert_eq!(healthy.health().await.healthz, "ok");
        tokio::time::sleep(Duration::from_millis(60)).await;
        let before = calls(&backend);
        assert_eq!(healthy.health().await.healthz, "ok");
        assert_eq!(calls(&backend) - before, 3, "the backend itself must be asked");
    }

    #[tokio::test]
    async fn the_round_trip_comes_back_once_per_roundtrip_interval_when_idle() {
        let (backend, healthy) = layer_with(50, 200);
        assert_eq!(healthy.health().await.healthz, "ok");
        let mut steps = Vec::new();
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(60)).await;
            let before = calls(&backend);
            assert_eq!(healthy.health().await.healthz, "ok");
            steps.push(calls(&backend) - before);
            if steps.iter().filter(|&&s| s == 3).count() == 2 {
                break;
            }
        }
        assert!(steps.contains(&1), "key checks between round trips: {steps:?}");
        assert_eq!(
            steps.iter().filter(|&&s| s == 3).count(),
            2,
            "round trips keep coming: {steps:?}"
        );
        assert!(steps.iter().all(|&s| s == 1 || s == 3), "{steps:?}");
    }

    #[tokio::test]
    async fn real_calls_that_work_spare_the_round_trip() {
        let (backend, healthy) = layer_with(50, 150);
        let seed = SecretSlice::from(vec![1u8; 32]);
        assert_eq!(healthy.health().await.healthz, "ok");
        for _ in 0..8 {
            let wrapped = healthy.encrypt("u", &seed).await.unwrap();
            healthy.decrypt("u", &wrapped).await.unwrap();
            tokio::time::sleep(Duration::from_millis(60)).await;
            let before = calls(&backend);
            assert_eq!(healthy.health().await.healthz, "ok");
            assert_eq!(
                calls(&backend) - before,
                1,
                "the real calls just proved encrypt and decrypt"
            );
        }
    }

    #[tokio::test]
    async fn a_new_key_id_is_proven_by_a_round_trip_at_once() {
        let (backend, healthy) = layer(50);
        assert_eq!(healthy.health().await.key_id, "k1");
        *backend.key_id.lock().unwrap() = "k2".into();
        tokio::time::sleep(Duration::from_millis(60)).await;
        let before = calls(&backend);
        assert_eq!(healthy.health().await.key_id, "k2");
        assert_eq!(
            calls(&backend) - before,
            3,
            "key check, then encrypt + decrypt with k2"
        );
    }

    #[tokio::test]
    async fn a_verdict_doubted_by_a_failed_call_is_renewed_only_by_a_round_trip() {
        let (backend, healthy) = layer(60_000);
        assert_eq!(healthy.health().await.healthz, "ok");
        // Encrypt fails but the key check would pass: only a round trip may say ok again.
        backend.down.store(true, Ordering::SeqCst);
        let seed = SecretSlice::from(vec![1u8; 32]);
        assert!(healthy.encrypt("u", &seed).await.is_err());
        backend.down.store(false, Ordering::SeqCst);
        backend.lie.store(true, Ordering::SeqCst);
        let h = healthy.health().await;
        assert!(
            h.healthz.contains("did not return what was encrypted"),
            "{}",
            h.healthz
        );
    }

    #[tokio::test]
    async fn an_outage_shows_after_the_ttl_and_recovery_after_the_next() {
        let (backend, healthy) = layer(50);
        assert_eq!(healthy.health().await.healthz, "ok");
        backend.down.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(60)).await;
        let h = healthy.health().await;
        assert!(h.healthz.contains("unavailable (network)"), "{}", h.healthz);
        assert_eq!(h.key_id, "k1", "the last known key_id is still reported");
        backend.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(healthy.health().await.healthz, "ok");
    }

    #[tokio::test]
    async fn a_backend_failure_in_a_real_call_makes_the_next_status_probe() {
        let (backend, healthy) = layer(60_000);
        assert_eq!(healthy.health().await.healthz, "ok");
        backend.down.store(true, Ordering::SeqCst);
        assert!(
            healthy
                .encrypt("u", &SecretSlice::from(vec![1u8; 32]))
                .await
                .is_err()
        );
        assert_ne!(
            healthy.health().await.healthz,
            "ok",
            "cache must not hide a failure seen by a real call"
        );
    }

    #[tokio::test]
    async fn bad_input_does_not_make_the_plugin_unhealthy() {
        let (backend, healthy) = layer(60_000);
        assert_eq!(healthy.health().await.healthz, "ok");
        healthy.observe::<()>(&Err(Error::BadCiphertext("tampered".into())));
        assert_eq!(healthy.health().await.healthz, "ok");
        assert_eq!(
            backend.calls.load(Ordering::SeqCst),
            3,
            "no extra probe for bad input"
        );
    }

    #[tokio::test]
    async fn a_backend_that_returns_the_wrong_plaintext_is_unhealthy() {
        let (backend, healthy) = layer(60_000);
        backend.lie.store(true, Ordering::SeqCst);
        assert!(
            healthy
                .health()
                .await
                .healthz
                .contains("did not return what was encrypted")
        );
    }

    #[tokio::test]
    async fn status_follows_a_rotation_seen_by_the_next_probe() {
        let (backend, healthy) = layer(50);
        assert_eq!(healthy.health().await.key_id, "k1");
        *backend.key_id.lock().unwrap() = "k2".into();
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(healthy.health().await.key_id, "k2");
    }

    #[tokio::test]
    async fn a_successful_real_call_with_the_current_key_counts_as_a_good_probe() {
        let (backend, healthy) = layer(60_000);
        assert_eq!(healthy.health().await.healthz, "ok");
        backend.down.store(true, Ordering::SeqCst);
        let seed = SecretSlice::from(vec![1u8; 32]);
        assert!(healthy.encrypt("u", &seed).await.is_err());
        assert_ne!(healthy.health().await.healthz, "ok");
        backend.down.store(false, Ordering::SeqCst);
        let calls = backend.calls.load(Ordering::SeqCst);
        let wrapped = healthy.encrypt("u", &seed).await.unwrap();
        assert_eq!(
            healthy.health().await.healthz,
            "ok",
            "the failed probe is a minute fresh, but a real Encrypt just succeeded"
        );
        assert_eq!(
            backend.calls.load(Ordering::SeqCst),
            calls + 1,
            "no probe was needed"
        );
        // A Decrypt under the current key counts too.
        backend.down.store(true, Ordering::SeqCst);
        assert!(healthy.encrypt("u", &seed).await.is_err());
        assert_ne!(healthy.health().await.healthz, "ok");
        backend.down.store(false, Ordering::SeqCst);
        healthy.decrypt("u", &wrapped).await.unwrap();
        assert_eq!(healthy.health().await.healthz, "ok");
    }

    #[tokio::test]
    async fn a_successful_call_under_an_old_key_is_no_probe_of_the_current_one() {
        let (backend, healthy) = layer(60_000);
        let seed = SecretSlice::from(vec![1u8; 32]);
        assert_eq!(healthy.health().await.key_id, "k1");
        let old = healthy.encrypt("u", &seed).await.unwrap();
        *backend.key_id.lock().unwrap() = "k2".into();
        assert_eq!(healthy.health().await.key_id, "k1", "cached");
        backend.down.store(true, Ordering::SeqCst);
        assert!(healthy.encrypt("u", &seed).await.is_err());
        assert_ne!(healthy.health().await.healthz, "ok");
        backend.down.store(false, Ordering::SeqCst);
        // The cached key_id is k1 here, so a k1 decrypt would count; make k2 known first.
        *healthy.shared.key_id.lock().unwrap() = "k2".into();
        healthy.decrypt("u", &old).await.unwrap();
        assert_ne!(healthy.health().await.healthz, "ok", "k1 is not the current key");
    }

    #[tokio::test]
    async fn while_calls_fail_status_probes_once_per_err_ttl_not_once_per_call() {
        let (backend, healthy) = layer(60_000);
        assert_eq!(healthy.health().await.healthz, "ok");
        backend.down.store(true, Ordering::SeqCst);
        let seed = SecretSlice::from(vec![1u8; 32]);
        let before = backend.calls.load(Ordering::SeqCst);
        for _ in 0..5 {
            assert!(healthy.encrypt("u", &seed).await.is_err());
            assert_ne!(healthy.health().await.healthz, "ok");
        }
        // 5 failed encrypts + one probe (current_key_id fails first).
        assert_eq!(backend.calls.load(Ordering::SeqCst) - before, 5 + 1);
    }

    #[tokio::test]
    async fn against_a_hung_backend_one_probe_is_in_flight_and_other_status_calls_answer_at_once() {
        let (backend, healthy) = layer(50);
        let healthy = Arc::new(healthy);
        backend.down.store(true, Ordering::SeqCst);
        assert_ne!(healthy.health().await.healthz, "ok");
        // The backend hangs; once the failed verdict is older than its TTL, Status probes again.
        backend.hung.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(60)).await;
        let before = backend.calls.load(Ordering::SeqCst);
        let probing = tokio::spawn({
            let healthy = Arc::clone(&healthy);
            async move { healthy.health().await }
        });
        for _ in 0..1000 {
            if backend.calls.load(Ordering::SeqCst) > before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(
            backend.calls.load(Ordering::SeqCst),
            before + 1,
            "the probe started"
        );
        for _ in 0..10 {
            let h = healthy.health().await;
            assert!(h.healthz.contains("unavailable"), "{}", h.healthz);
        }
        assert!(!probing.is_finished(), "the others did not wait for the probe");
        assert_eq!(
            backend.calls.load(Ordering::SeqCst),
            before + 1,
            "one probe in flight"
        );
        backend.hung.store(false, Ordering::SeqCst);
        backend.hang.notify_waiters();
        assert_ne!(probing.await.unwrap().healthz, "ok");
    }
}
