//! The guard layer: what every call must satisfy whatever the backend. It bounds each backend
//! call in time (well below the apiserver's 3 s), rejects unusable requests before they reach the
//! backend, checks the backend's answers against the limits kube-apiserver enforces (spec 2.1), and
//! logs each call (failures at warn, successes at debug). No secrets are logged: only key_id
//! (escaped and cut: the client chose it), sizes, outcome class and time; the uid is on the line
//! through the call's span (`grpc`, or the health probe's own).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretSlice};

use crate::logging::Client;
use crate::metrics::{Metrics, Op};
use crate::service::{Annotations, Credential, Encrypted, KeyService};
use crate::{Error, Result};

/// Largest plaintext accepted for Encrypt. The apiserver sends 32-byte seeds (v2) and DEKs (v1);
/// the bound keeps every backend's ciphertext under the apiserver's 1024-byte limit.
pub const MAX_PLAINTEXT: usize = 512;
/// kube-apiserver's `encryptedDEKSourceMaxSize` and `KeyIDMaxSize`.
pub const MAX_CIPHERTEXT: usize = 1024;
/// kube-apiserver's `KeyIDMaxSize`.
pub const MAX_KEY_ID: usize = 1024;
/// kube-apiserver's `annotationsMaxSize`: sum of key and value lengths.
pub const MAX_ANNOTATIONS: usize = 32 * 1024;
/// Smallest plaintext accepted for Encrypt: anything shorter is not a key.
pub const MIN_PLAINTEXT: usize = 1;

/// Wraps a [`KeyService`] with time bounds, input limits, response checks and call logging, and
/// counts every backend call (probes included: they pass here too) when given [`Metrics`].
pub struct Guarded<S> {
    inner: S,
    call_timeout: Duration,
    metrics: Option<Arc<Metrics>>,
}

impl<S: KeyService> Guarded<S> {
    /// Bounds every backend call by `call_timeout`.
    pub fn new(inner: S, call_timeout: Duration) -> Self {
        Self {
            inner,
            call_timeout,
            metrics: None,
        }
    }

    /// Counts and times each backend call (and the check of its answer) in `metrics`.
    #[must_use]
    pub fn with_metrics(self, metrics: Arc<Metrics>) -> Self {
        Self {
            metrics: Some(metrics),
            ..self
        }
    }

    async fn bounded<T>(&self, op: Op, call: impl Future<Output = Result<T>>) -> Result<T> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.call_timeout, call)
            .await
            .unwrap_or(Err(Error::Timeout(self.call_timeout)));
        if let Some(metrics) = &self.metrics {
            metrics.backend(self.inner.name(), op, started.elapsed(), &result);
        }
        result
    }
}

#[async_trait]
impl<S: KeyService> KeyService for Guarded<S> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn key_id_reaches_backend(&self) -> bool {
        self.inner.key_id_reaches_backend()
    }

    fn credential_expiry(&self) -> Vec<(Credential, f64)> {
        self.inner.credential_expiry()
    }

    async fn describe(&self) -> Vec<(&'static str, String)> {
        self.inner.describe().await
    }

    async fn encrypt(&self, uid: &str, plaintext: &SecretSlice<u8>) -> Result<Encrypted> {
        let started = Instant::now();
        let len = plaintext.expose_secret().len();
        let result = async {
            if !(MIN_PLAINTEXT..=MAX_PLAINTEXT).contains(&len) {
                return Err(Error::InvalidRequest(format!(
                    "plaintext is {len} bytes; expected {MIN_PLAINTEXT} to {MAX_PLAINTEXT}"
                )));
            }
            // The answer's check is part of the call: a backend that lies counts as failing.
            self.bounded(Op::Encrypt, async {
                let out = self.inner.encrypt(uid, plaintext).await?;
                check_encrypted(&out)
                    .map_err(|why| Error::Backend(format!("encrypt answer rejected: {why}")))?;
                Ok(out)
            })
            .await
        }
        .await;
        let ms = started.elapsed().as_millis();
        match &result {
            // Debug level: a line per successful call would bury the events an operator alerts on.
            Ok(out) => {
                tracing::debug!(key_id = %out.key_id, plaintext_len = len, ms, "encrypt ok")
            }
            Err(err) => {
                tracing::warn!(class = err.class(), ms, error = %err, "encrypt failed")
            }
        }
        result
    }

    async fn decrypt(&self, uid: &str, encrypted: &Encrypted) -> Result<SecretSlice<u8>> {
        let started = Instant::now();
        let result = async {
            check_encrypted(encrypted).map_err(|why| Error::BadCiphertext(why.to_string()))?;
            self.bounded(Op::Decrypt, async {
                let plain = self.inner.decrypt(uid, encrypted).await?;
                if plain.expose_secret().is_empty() {
                    return Err(Error::Backend("decrypt returned an empty plaintext".into()));
                }
                Ok(plain)
            })
            .await
        }
        .await;
        let ms = started.elapsed().as_millis();
        match &result {
            // Decrypt runs thousands of times when an apiserver fills its watch cache: debug level.
            Ok(_) => {
                tracing::debug!(key_id = %Client(&encrypted.key_id), ms, "decrypt ok")
            }
            Err(err) => {
                tracing::warn!(key_id = %Client(&encrypted.key_id), class = err.class(), ms, error = %err, "decrypt failed")
            }
        }
        result
    }

    async fn current_key_id(&self) -> Result<String> {
        self.bounded(Op::CurrentKeyId, async {
            let key_id = self.inner.current_key_id().await?;
            if key_id.is_empty() || key_id.len() > MAX_KEY_ID {
                return Err(Error::Backend(format!(
                    "current key_id is {} bytes",
                    key_id.len()
                )));
            }
            Ok(key_id)
        })
        .await
    }
}

/// Checks a wrapped key against the limits kube-apiserver enforces on what it stores.
pub fn check_encrypted(e: &Encrypted) -> std::result::Result<(), &'static str> {
    if e.ciphertext.is_empty() {
        return Err("ciphertext is empty");
    }
    if e.ciphertext.len() > MAX_CIPHERTEXT {
        return Err("ciphertext is longer than 1024 bytes");
    }
    if e.key_id.is_empty() {
        return Err("key_id is empty");
    }
    if e.key_id.len() > MAX_KEY_ID {
        return Err("key_id is longer than 1024 bytes");
    }
    check_annotations(&e.annotations)
}

/// The apiserver's annotation rules: fully qualified domain names as keys, 32 KiB in total.
pub fn check_annotations(annotations: &Annotations) -> std::result::Result<(), &'static str> {
    let total: usize = annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_ANNOTATIONS {
        return Err("annotations are larger than 32 KiB");
    }
    if !annotations.keys().all(|k| is_fully_qualified_domain_name(k)) {
        return Err("an annotation key is not a fully qualified domain name");
    }
    Ok(())
}

/// apimachinery's `IsFullyQualifiedDomainName`: one trailing dot dropped, then a lower-case DNS-1123
/// subdomain of at most 253 characters with at least two labels of at most 63 characters each.
pub fn is_fully_qualified_domain_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = name.split('.').collect();
    labels.len() >= 2 && labels.iter().all(|l| is_dns_label(l))
}

fn is_dns_label(label: &str) -> bool {
    let b = label.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    matches!((b.first(), b.last()), (Some(first), Some(last)) if alnum(first) && alnum(last))
        && b.len() <= 63
        && b.iter().all(|c| alnum(c) || *c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fqdn_rule_matches_the_apiserver_examples() {
        for ok in [
            "version.encryption.remote.io",
            "local-kek.kms.kubernetes.io",
            "format.kleidi.dev",
            "a.b.",
        ] {
            assert!(is_fully_qualified_domain_name(ok), "{ok}");
        }
        for bad in [
            "foo",
            "kms.example.io/x",
            "Upper.case.io",
            "under_score.io",
            "-a.io",
            "a..io",
            "",
        ] {
            assert!(!is_fully_qualified_domain_name(bad), "{bad}");
        }
        assert!(!is_fully_qualified_domain_name(&format!("{}.io", "a".repeat(64))));
    }

    #[test]
    fn limits_are_inclusive_like_the_apiserver() {
        let mut e = Encrypted {
            ciphertext: vec![1; 1024],
            key_id: "k".repeat(1024),
            ..Default::default()
        };
        assert_eq!(check_encrypted(&e), Ok(()));
        e.ciphertext.push(0);
        assert!(check_encrypted(&e).is_err());
        let mut a = Annotations::new();
        a.insert("a.io".into(), vec![0; 32 * 1024 - 4]);
        assert_eq!(check_annotations(&a), Ok(()));
        a.insert("b.io".into(), vec![]);
        assert!(check_annotations(&a).is_err());
    }
}

#[cfg(test)]
mod layer_tests {
    use super::*;

    /// A backend that never answers, like a hung HSM or a Vault behind a dropped network.
    struct Hung;

    #[async_trait]
    impl KeyService for Hung {
        fn name(&self) -> &'static str {
            "hung"
        }
        async fn encrypt(&self, _: &str, _: &SecretSlice<u8>) -> Result<Encrypted> {
            std::future::pending().await
        }
        async fn decrypt(&self, _: &str, _: &Encrypted) -> Result<SecretSlice<u8>> {
            std::future::pending().await
        }
        async fn current_key_id(&self) -> Result<String> {
            std::future::pending().await
        }
    }

    #[tokio::test]
    async fn a_hung_backend_gives_a_timeout_within_the_bound() {
        let guarded = Guarded::new(Hung, Duration::from_millis(100));
        let started = Instant::now();
        let err = guarded
            .encrypt("u", &SecretSlice::from(vec![7u8; 32]))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Timeout(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        let e = Encrypted {
            ciphertext: vec![1],
            key_id: "k".into(),
            ..Default::default()
        };
        assert!(matches!(
            guarded.decrypt("u", &e).await.unwrap_err(),
            Error::Timeout(_)
        ));
        assert!(matches!(
            guarded.current_key_id().await.unwrap_err(),
            Error::Timeout(_)
        ));
    }

    #[tokio::test]
    async fn empty_and_oversized_plaintexts_never_reach_the_backend() {
        let guarded = Guarded::new(Hung, Duration::from_secs(60));
        for len in [0, MAX_PLAINTEXT + 1, 1 << 20] {
            let err = guarded
                .encrypt("u", &SecretSlice::from(vec![0u8; len]))
                .await
                .unwrap_err();
            assert!(matches!(err, Error::InvalidRequest(_)), "{len}: {err}");
        }
    }

    #[tokio::test]
    async fn malformed_decrypt_requests_never_reach_the_backend() {
        let guarded = Guarded::new(Hung, Duration::from_secs(60));
        let bad = [
            Encrypted {
                ciphertext: vec![],
                key_id: "k".into(),
                ..Default::default()
            },
            Encrypted {
                ciphertext: vec![1; 1025],
                key_id: "k".into(),
                ..Default::default()
            },
            Encrypted {
                ciphertext: vec![1],
                key_id: String::new(),
                ..Default::default()
            },
            Encrypted {
                ciphertext: vec![1],
                key_id: "k".into(),
                annotations: [("not/a.dns.name".to_string(), vec![])].into(),
            },
        ];
        for e in bad {
            assert!(matches!(
                guarded.decrypt("u", &e).await.unwrap_err(),
                Error::BadCiphertext(_)
            ));
        }
    }
}
