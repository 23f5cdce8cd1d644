//! Cached health, as a layer around any [`KeyService`].
//!
//! kube-apiserver polls Status every minute, and its healthz/readyz endpoints add a call about every
//! 20 s, on every control-plane node. Status must stay cheap and still tell the truth, so it answers
//! from the last probe: a real encrypt + decrypt round trip of a random 32-byte value with the current
//! key, repeated at most once per `ok_ttl` while healthy and once per `err_ttl` after a failure.
//! Real calls feed in: an error that says something about the backend (not bad input) makes the next
//! Status probe again instead of trusting the cache. Concurrent Status calls share one probe.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretSlice};

use crate::service::{Encrypted, KeyService};
use crate::{Error, Result};

/// How long a probe result is trusted.
#[derive(Clone, Copy, Debug)]
pub struct HealthTtl {
    /// After a successful probe (default 30 s: below the apiserver's 60 s poll).
    pub ok: Duration,
    /// After a failed probe (default 5 s: below the apiserver's 10 s retry).
    pub err: Duration,
    /// Bound on a whole probe (three backend calls), so Status answers within the apiserver's 3 s
    /// even when each call alone stays under its own bound.
    pub probe_timeout: Duration,
}

impl Default for HealthTtl {
    fn default() -> Self {
        Self {
            ok: Duration::from_secs(30),
            err: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(2),
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

struct Probe {
    at: Instant,
    healthy: bool,
    health: Health,
}

/// A [`KeyService`] that also answers Status from a cached round-trip probe.
pub struct Healthy<S> {
    inner: S,
    ttl: HealthTtl,
    last: tokio::sync::Mutex<Option<Probe>>,
    /// The key_id of the latest successful encrypt or probe, so Status follows a rotation that a real
    /// Encrypt saw first.
    key_id: Mutex<String>,
    /// Set by a backend failure in a real call: the next Status probes instead of using the cache.
    suspect: AtomicBool,
}

impl<S: KeyService> Healthy<S> {
    /// Wraps `inner`; nothing is probed until the first Status.
    pub fn new(inner: S, ttl: HealthTtl) -> Self {
        Self {
            inner,
            ttl,
            last: tokio::sync::Mutex::new(None),
            key_id: Mutex::new(String::new()),
            suspect: AtomicBool::new(false),
        }
    }

    /// The cached health, probing the backend first if the cache is stale.
    pub async fn health(&self) -> Health {
        let mut last = self.last.lock().await;
        let fresh = last.as_ref().is_some_and(|p| {
            let ttl = if p.healthy { self.ttl.ok } else { self.ttl.err };
            p.at.elapsed() < ttl
        });
        if fresh && !self.suspect.load(Ordering::Acquire) {
            if let Some(p) = last.as_ref() {
                return Health {
                    healthz: p.health.healthz.clone(),
                    key_id: self.known_key_id(),
                };
            }
        }
        self.suspect.store(false, Ordering::Release);
        let result = tokio::time::timeout(self.ttl.probe_timeout, self.probe())
            .await
            .unwrap_or(Err(Error::Timeout(self.ttl.probe_timeout)));
        let healthy = result.is_ok();
        let healthz = match result {
            Ok(key_id) => {
                self.remember_key_id(&key_id);
                "ok".to_string()
            }
            Err(err) => {
                tracing::warn!(class = err.class(), error = %err, "health probe failed");
                short_reason(&err)
            }
        };
        let health = Health {
            healthz,
            key_id: self.known_key_id(),
        };
        *last = Some(Probe {
            at: Instant::now(),
            healthy,
            health: health.clone(),
        });
        health
    }

    async fn probe(&self) -> Result<String> {
        let key_id = self.inner.current_key_id().await?;
        self.remember_key_id(&key_id);
        let mut probe = vec![0u8; 32];
        rand::rng().fill_bytes(&mut probe);
        let probe = SecretSlice::from(probe);
        let uid = format!("kleidi-health-{}", uuid::Uuid::new_v4());
        let wrapped = self.inner.encrypt(&uid, &probe).await?;
        if wrapped.key_id != key_id {
            return Err(Error::Backend(format!(
                "encrypt used key_id {} while the current key is {key_id}",
                wrapped.key_id
            )));
        }
        let unwrapped = self.inner.decrypt(&uid, &wrapped).await?;
        if unwrapped.expose_secret() != probe.expose_secret() {
            return Err(Error::Backend("decrypt did not return what was encrypted".into()));
        }
        Ok(key_id)
    }

    fn known_key_id(&self) -> String {
        self.key_id.lock().map(|k| k.clone()).unwrap_or_default()
    }

    fn remember_key_id(&self, key_id: &str) {
        if let Ok(mut k) = self.key_id.lock() {
            if *k != key_id {
                if !k.is_empty() {
                    tracing::info!(from = %*k, to = %key_id, "current key_id changed");
                }
                *k = key_id.to_string();
            }
        }
    }

    fn observe<T>(&self, result: &Result<T>) {
        if let Err(err) = result {
            if err.affects_health() {
                self.suspect.store(true, Ordering::Release);
            }
        }
    }
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
        self.inner.name()
    }

    async fn encrypt(&self, uid: &str, plaintext: &SecretSlice<u8>) -> Result<Encrypted> {
        let result = self.inner.encrypt(uid, plaintext).await;
        self.observe(&result);
        if let Ok(out) = &result {
            self.remember_key_id(&out.key_id);
        }
        result
    }

    async fn decrypt(&self, uid: &str, encrypted: &Encrypted) -> Result<SecretSlice<u8>> {
        let result = self.inner.decrypt(uid, encrypted).await;
        self.observe(&result);
        result
    }

    async fn current_key_id(&self) -> Result<String> {
        let result = self.inner.current_key_id().await;
        self.observe(&result);
        result
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
        key_id: Mutex<String>,
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
        async fn current_key_id(&self) -> Result<String> {
            self.calls.fetch_add(1, Ordering::SeqCst);
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
        let backend = Arc::new(Scripted::default());
        *backend.key_id.lock().unwrap() = "k1".into();
        let ttl = Duration::from_millis(ttl_ms);
        (
            backend.clone(),
            Healthy::new(
                backend,
                HealthTtl {
                    ok: ttl,
                    err: ttl,
                    probe_timeout: Duration::from_secs(5),
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
}
