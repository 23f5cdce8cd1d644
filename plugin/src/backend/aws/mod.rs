//! The AWS KMS backend: the key-encryption key is a symmetric KMS key that never leaves KMS; kleidi
//! asks KMS to encrypt and decrypt the apiserver's seeds with it (one KMS call each).
//!
//! - **Ciphertext** is the KMS ciphertext blob as Encrypt returns it (it names its key and key
//!   material; ≈ 180 bytes for a 32-byte seed), with the annotation `format.kleidi.dev` =
//!   `aws-kms-ec/1`.
//! - **Encryption context.** Every Encrypt and Decrypt passes `kleidi.dev/cluster` =
//!   `--aws-encryption-context-cluster` and `kleidi.dev/provider` = `--aws-encryption-context-provider`.
//!   KMS authenticates it with the blob, so a wrapped seed copied into another cluster (or another
//!   provider of the same cluster) fails to decrypt, and CloudTrail names the cluster on every call;
//!   an IAM condition on `kms:EncryptionContext:kleidi.dev/cluster` (fixtures/aws) limits a role to
//!   its own cluster's seeds.
//! - **key_id** is `aws-kms:<key ARN>:v<N>`, N being one more than the rotations ListKeyRotations
//!   reports for that key: it changes when the key material rotates (automatic or on demand) and
//!   when the alias moves to another key (another ARN). Status reads it (DescribeKey of the
//!   configured key or alias, then ListKeyRotations of the ARN: two calls per health interval, none
//!   per poll) and Encrypt uses exactly the ARN Status last saw, so both report the same key_id even
//!   while an alias moves. Decrypt passes the ARN its key_id names as KeyId (KMS checks it against
//!   the blob), so seeds wrapped before a rotation or under the alias's previous key still decrypt
//!   (that key must stay enabled and decryptable by kleidi's role).
//! - **Concurrency.** The SDK client is shared; calls run in parallel on its connection pool. No
//!   lock is held across a call.
//! - **Recovery.** Each call is bounded by a budget a little below `--call-timeout`; inside it the
//!   SDK retries throttling, 5xx and connection failures with a short jittered backoff. A key seen
//!   disabled or pending deletion is re-read before the next Encrypt (Encrypt fails with its class
//!   while it stays so), so re-enabling it recovers without a restart. Credentials come from the
//!   standard chain and are refreshed by the SDK.
//!
//! Error classes live in `errors`.

mod errors;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_kms::Client;
use aws_sdk_kms::config::retry::RetryConfig;
use aws_sdk_kms::config::timeout::TimeoutConfig;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::EncryptionAlgorithmSpec;
use aws_smithy_http_client::tls;
use secrecy::{ExposeSecret, SecretSlice};

use self::errors::{Op, classify, key_state_class, unavailable};
use super::FORMAT_ANNOTATION;
use crate::config::AwsArgs;
use crate::service::{Annotations, Encrypted, KeyService};
use crate::{Error, Result};

/// This backend's name in logs, metrics and error classes.
pub(crate) const BACKEND: &str = "aws-kms";
/// The value of [`FORMAT_ANNOTATION`]: a KMS ciphertext blob bound to kleidi's encryption context.
const FORMAT: &str = "aws-kms-ec/1";
/// Every key_id starts with it.
const KEY_ID_PREFIX: &str = "aws-kms:";
/// Encryption context key naming the cluster.
pub const CONTEXT_CLUSTER: &str = "kleidi.dev/cluster";
/// Encryption context key naming the KMS provider.
pub const CONTEXT_PROVIDER: &str = "kleidi.dev/provider";
/// How long connect waits for KMS before serving anyway (calls then answer Unavailable).
const CONNECT_BOUND: Duration = Duration::from_secs(5);
/// Largest ciphertext the apiserver stores.
const MAX_CIPHERTEXT: usize = 1024;

/// Wraps seeds with an AWS KMS key.
pub struct AwsKmsBackend {
    client: Client,
    /// `--aws-kms-key-id` as given: an ARN or an alias.
    key: String,
    context: HashMap<String, String>,
    budget: Duration,
    region: String,
    endpoint: Option<String>,
    /// What the last DescribeKey / ListKeyRotations saw; Encrypt uses its ARN.
    current: Mutex<Option<Current>>,
}

#[derive(Clone)]
struct Current {
    arn: String,
    /// KMS's KeyState (`Enabled`, `Disabled`, `PendingDeletion`…).
    state: String,
    /// Set only while the key is Enabled.
    key_id: Option<String>,
    rotations: usize,
    last_rotation: Option<String>,
}

impl AwsKmsBackend {
    /// Checks the flags, builds the SDK client (credentials from the standard chain) and reads the
    /// key once. KMS down or refusing the credentials does not stop kleidi (calls answer Unavailable
    /// or Denied until it recovers); a missing key or one that cannot wrap seeds does.
    pub async fn connect(args: &AwsArgs, budget: Duration) -> Result<Self> {
        let key = args.aws_kms_key_id.clone().unwrap_or_default();
        let cluster = args.aws_encryption_context_cluster.clone().unwrap_or_default();
        let provider = args.aws_encryption_context_provider.clone();
        let usable = |s: &str| !s.is_empty() && s.len() <= 256 && s.chars().all(|c| c.is_ascii_graphic());
        if !usable(&key) || !usable(&cluster) || !usable(&provider) {
            return Err(Error::Config(
                "--aws-kms-key-id, --aws-encryption-context-cluster and --aws-encryption-context-provider \
                 must be non-empty printable names without spaces"
                    .into(),
            ));
        }
        let region = region_for(&key, args.aws_region.as_deref())?;
        let endpoint = args.aws_endpoint_url.as_deref().map(check_endpoint).transpose()?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
            .build_https();
        let attempts = RetryConfig::standard()
            .with_max_attempts(4)
            .with_initial_backoff(Duration::from_millis(50))
            .with_max_backoff(budget / 4);
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(budget.min(Duration::from_secs(1)))
            .operation_timeout(budget)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .retry_config(attempts)
            .timeout_config(timeouts);
        if let Some(region) = region {
            loader = loader.region(Region::new(region));
        }
        let shared = tokio::time::timeout(CONNECT_BOUND * 2, loader.load())
            .await
            .map_err(|_| Error::Config("the AWS configuration chain did not load within 10 s".into()))?;
        let region = shared.region().map(ToString::to_string).ok_or_else(|| {
            Error::Config("no AWS region: set --aws-region (or AWS_REGION), or give the key's ARN".into())
        })?;
        // The endpoint is KMS's alone: web identity still reaches STS at its own.
        let mut config = aws_sdk_kms::config::Builder::from(&shared);
        if let Some(url) = &endpoint {
            config = config.endpoint_url(url);
        }
        let backend = Self {
            client: Client::from_conf(config.build()),
            key,
            context: HashMap::from([
                (CONTEXT_CLUSTER.into(), cluster),
                (CONTEXT_PROVIDER.into(), provider),
            ]),
            budget,
            region,
            endpoint,
            current: Mutex::new(None),
        };
        match tokio::time::timeout(CONNECT_BOUND, backend.refresh()).await {
            Ok(Ok(key_id)) => tracing::info!(%key_id, region = %backend.region, "aws-kms: key ready"),
            Ok(Err(err)) if err.class() == "key_missing" => {
                return Err(Error::Config(format!(
                    "KMS key {} cannot be used (kleidi never creates keys): {err}",
                    backend.key
                )));
            }
            Ok(Err(err @ Error::Config(_))) => return Err(err),
            Ok(Err(err)) => {
                tracing::warn!(class = err.class(), error = %err, "aws-kms: not usable yet; serving and retrying")
            }
            Err(_) => tracing::warn!("aws-kms: no answer within {CONNECT_BOUND:?}; serving and retrying"),
        }
        Ok(backend)
    }

    /// Reads the key (DescribeKey) and its rotations (ListKeyRotations) and records them; the
    /// key_id, or why the key cannot encrypt now.
    async fn refresh(&self) -> Result<String> {
        let described = self
            .client
            .describe_key()
            .key_id(&self.key)
            .send()
            .await
            .map_err(|e| classify(Op::Describe, self.budget, e))?;
        let meta = described
            .key_metadata()
            .ok_or_else(|| Error::Backend("DescribeKey answered without KeyMetadata".into()))?;
        let arn = meta
            .arn()
            .ok_or_else(|| Error::Backend("DescribeKey answered without an ARN".into()))?
            .to_string();
        let spec = meta.key_spec().map(|s| s.as_str()).unwrap_or("SYMMETRIC_DEFAULT");
        let usage = meta.key_usage().map(|u| u.as_str()).unwrap_or("ENCRYPT_DECRYPT");
        if spec != "SYMMETRIC_DEFAULT" || usage != "ENCRYPT_DECRYPT" {
            return Err(Error::Config(format!(
                "KMS key {arn} is {spec} for {usage}; kleidi needs a SYMMETRIC_DEFAULT key for ENCRYPT_DECRYPT"
            )));
        }
        let state = meta.key_state().map_or("Enabled", |s| s.as_str()).to_string();
        if let Some(class) = key_state_class(&state) {
            let detail = format!("KMS key {arn} is {state}");
            *lock(&self.current) = Some(Current {
                arn,
                state,
                key_id: None,
                rotations: 0,
                last_rotation: None,
            });
            return Err(unavailable(class, detail));
        }
        let (rotations, last_rotation) = self.rotations(&arn).await?;
        let key_id = format!("{KEY_ID_PREFIX}{arn}:v{}", rotations + 1);
        *lock(&self.current) = Some(Current {
            arn,
            state,
            key_id: Some(key_id.clone()),
            rotations,
            last_rotation,
        });
        Ok(key_id)
    }

    /// How many times the key material rotated, and when last (RFC 3339). Keys that cannot rotate
    /// (custom key stores) answer UnsupportedOperationException: none.
    async fn rotations(&self, arn: &str) -> Result<(usize, Option<String>)> {
        let (mut count, mut last) = (0, None::<aws_sdk_kms::primitives::DateTime>);
        let mut marker = None;
        loop {
            let page = self
                .client
                .list_key_rotations()
                .key_id(arn)
                .limit(1000)
                .set_marker(marker.take())
                .send()
                .await;
            let page = match page {
                Ok(page) => page,
                Err(err)
                    if err.as_service_error().and_then(|e| e.meta().code())
                        == Some("UnsupportedOperationException") =>
                {
                    return Ok((0, None));
                }
                Err(err) => return Err(classify(Op::ListRotations, self.budget, err)),
            };
            count += page.rotations().len();
            for date in page.rotations().iter().filter_map(|r| r.rotation_date()) {
                if last.is_none_or(|l| *date > l) {
                    last = Some(*date);
                }
            }
            match page.next_marker() {
                Some(next) if page.truncated() => marker = Some(next.to_string()),
                _ => break,
            }
        }
        let last = last.and_then(|d| d.fmt(aws_sdk_kms::primitives::DateTimeFormat::DateTime).ok());
        Ok((count, last))
    }

    /// The key Encrypt must use: the ARN and key_id Status last saw, re-read first when none was
    /// seen yet or the key was last seen unusable.
    async fn usable(&self) -> Result<(String, String)> {
        let known = lock(&self.current).clone();
        if let Some(Current {
            arn,
            key_id: Some(key_id),
            ..
        }) = known
        {
            return Ok((arn, key_id));
        }
        let key_id = self.refresh().await?;
        let arn = lock(&self.current)
            .as_ref()
            .map(|c| c.arn.clone())
            .ok_or_else(|| Error::Backend("no current key".into()))?;
        Ok((arn, key_id))
    }

    /// After KMS refused the key itself, forget the key_id so the next Encrypt reads the key again.
    fn forget_if_key_unusable(&self, err: &Error) {
        if err.class().starts_with("key_") {
            if let Some(current) = lock(&self.current).as_mut() {
                current.key_id = None;
            }
        }
    }
}

/// The region to call: `--aws-region`, else the key ARN's; a flag contradicting the ARN is refused.
fn region_for(key: &str, flag: Option<&str>) -> Result<Option<String>> {
    let from_arn = key
        .strip_prefix("arn:")
        .and_then(|rest| rest.split(':').nth(2))
        .filter(|r| !r.is_empty());
    match (flag, from_arn) {
        (Some(flag), Some(arn)) if flag != arn => Err(Error::Config(format!(
            "--aws-region {flag} but the key's ARN is in {arn}"
        ))),
        (Some(region), _) | (None, Some(region)) => Ok(Some(region.to_string())),
        (None, None) => Ok(None),
    }
}

/// `--aws-endpoint-url`: https, or http to a loopback host (a local test server): seeds and
/// session tokens must not cross a network in clear.
fn check_endpoint(url: &str) -> Result<String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| Error::Config(format!("--aws-endpoint-url {url:?}: {e}")))?;
    let host = uri.host().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match uri.scheme_str() {
        Some("https") => Ok(url.to_string()),
        Some("http") if loopback => Ok(url.to_string()),
        Some("http") => Err(Error::Config(format!(
            "--aws-endpoint-url {url}: http:// only to a loopback address; use https://"
        ))),
        _ => Err(Error::Config(format!(
            "--aws-endpoint-url {url:?}: not an http(s) URL"
        ))),
    }
}

/// What decrypt checks before any KMS call: this backend's format annotation and a key_id naming a
/// KMS key ARN. Returns the ARN, which Decrypt passes as KeyId. Pure, so fuzz/ can reach it.
pub(crate) fn check_decrypt(encrypted: &Encrypted) -> Result<String> {
    match encrypted.annotations.get(FORMAT_ANNOTATION) {
        Some(format) if format.as_slice() == FORMAT.as_bytes() => {}
        _ => return Err(Error::BadCiphertext(format!("not in format {FORMAT}"))),
    }
    if encrypted.ciphertext.is_empty() || encrypted.ciphertext.len() > MAX_CIPHERTEXT {
        return Err(Error::BadCiphertext("ciphertext length out of range".into()));
    }
    arn_of(&encrypted.key_id).ok_or_else(|| {
        Error::BadCiphertext(format!(
            "key_id \"{}\" is not an aws-kms key_id",
            crate::logging::Client(&encrypted.key_id)
        ))
    })
}

/// The key ARN in `aws-kms:<arn>:v<N>`, if the key_id is one.
fn arn_of(key_id: &str) -> Option<String> {
    let (arn, version) = key_id.strip_prefix(KEY_ID_PREFIX)?.rsplit_once(":v")?;
    if version.is_empty() || version.len() > 9 || !version.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // arn:PARTITION:kms:REGION:ACCOUNT:key/ID
    let parts: Vec<&str> = arn.split(':').collect();
    let well_formed = matches!(parts.as_slice(),
        ["arn", partition, "kms", region, account, resource]
            if !partition.is_empty() && !region.is_empty() && !account.is_empty()
                && resource.strip_prefix("key/").is_some_and(|id| !id.is_empty()
                    && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')));
    well_formed.then(|| arn.to_string())
}

#[async_trait]
impl KeyService for AwsKmsBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn encrypt(&self, _uid: &str, plaintext: &SecretSlice<u8>) -> Result<Encrypted> {
        let (arn, key_id) = self.usable().await?;
        let answer = self
            .client
            .encrypt()
            .key_id(&arn)
            .plaintext(Blob::new(plaintext.expose_secret().to_vec()))
            .set_encryption_context(Some(self.context.clone()))
            .encryption_algorithm(EncryptionAlgorithmSpec::SymmetricDefault)
            .send()
            .await
            .map_err(|e| classify(Op::Encrypt, self.budget, e));
        let answer = match answer {
            Ok(answer) => answer,
            Err(err) => {
                self.forget_if_key_unusable(&err);
                return Err(err);
            }
        };
        if answer.key_id.as_deref() != Some(arn.as_str()) {
            return Err(Error::Backend(format!(
                "encrypt asked for key {arn} and got another"
            )));
        }
        let ciphertext = answer.ciphertext_blob.map(Blob::into_inner).unwrap_or_default();
        if ciphertext.is_empty() || ciphertext.len() > MAX_CIPHERTEXT {
            return Err(Error::Backend(format!(
                "encrypt answered a ciphertext of {} bytes",
                ciphertext.len()
            )));
        }
        Ok(Encrypted {
            ciphertext,
            key_id,
            annotations: Annotations::from([(FORMAT_ANNOTATION.to_string(), FORMAT.as_bytes().to_vec())]),
        })
    }

    async fn decrypt(&self, _uid: &str, encrypted: &Encrypted) -> Result<SecretSlice<u8>> {
        let arn = check_decrypt(encrypted)?;
        let answer = self
            .client
            .decrypt()
            .key_id(&arn)
            .ciphertext_blob(Blob::new(encrypted.ciphertext.clone()))
            .set_encryption_context(Some(self.context.clone()))
            .encryption_algorithm(EncryptionAlgorithmSpec::SymmetricDefault)
            .send()
            .await
            .map_err(|e| classify(Op::Decrypt, self.budget, e))?;
        let plaintext = SecretSlice::from(answer.plaintext.map(Blob::into_inner).unwrap_or_default());
        if answer.key_id.as_deref() != Some(arn.as_str()) {
            return Err(Error::Backend(format!(
                "decrypt asked for key {arn} and another answered"
            )));
        }
        if plaintext.expose_secret().is_empty() {
            return Err(Error::Backend("decrypt answered no plaintext".into()));
        }
        Ok(plaintext)
    }

    async fn current_key_id(&self) -> Result<String> {
        self.refresh().await
    }

    /// From the flags and what the last Status saw; no KMS call.
    async fn describe(&self) -> Vec<(&'static str, String)> {
        let mut facts = vec![
            ("key", self.key.clone()),
            ("region", self.region.clone()),
            (
                "endpoint",
                self.endpoint
                    .clone()
                    .unwrap_or_else(|| "the region's (or AWS_ENDPOINT_URL_KMS)".into()),
            ),
            (
                "encryption_context",
                format!(
                    "{CONTEXT_CLUSTER}={}, {CONTEXT_PROVIDER}={}",
                    self.context.get(CONTEXT_CLUSTER).map_or("", String::as_str),
                    self.context.get(CONTEXT_PROVIDER).map_or("", String::as_str)
                ),
            ),
        ];
        if let Some(current) = lock(&self.current).clone() {
            facts.push(("key_arn", current.arn));
            facts.push(("key_state", current.state));
            facts.push(("rotations", current.rotations.to_string()));
            facts.extend(current.last_rotation.map(|d| ("last_rotation", d)));
        }
        facts
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded value is replaced whole, never left half-written: a poisoned lock is usable.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARN: &str = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

    fn wrapped(key_id: &str) -> Encrypted {
        Encrypted {
            ciphertext: vec![1; 180],
            key_id: key_id.into(),
            annotations: Annotations::from([(FORMAT_ANNOTATION.to_string(), FORMAT.as_bytes().to_vec())]),
        }
    }

    #[test]
    fn decrypt_takes_the_arn_from_the_key_id_and_refuses_anything_else() {
        assert_eq!(
            check_decrypt(&wrapped(&format!("aws-kms:{ARN}:v3"))).unwrap(),
            ARN
        );
        let china = "arn:aws-cn:kms:cn-north-1:111122223333:key/abc";
        assert_eq!(
            check_decrypt(&wrapped(&format!("aws-kms:{china}:v1"))).unwrap(),
            china
        );
        for bad in [
            format!("{ARN}:v1"),
            format!("aws-kms:{ARN}"),
            format!("aws-kms:{ARN}:v"),
            format!("aws-kms:{ARN}:vx"),
            "aws-kms:arn:aws:kms:eu-west-1:111122223333:alias/kek:v1".into(),
            "aws-kms:arn:aws:s3:eu-west-1:111122223333:key/abc:v1".into(),
            "aws-kms:arn:aws:kms:eu-west-1:111122223333:key/a b:v1".into(),
            "vault:transit/kek:v1:0123abcd".into(),
        ] {
            let err = check_decrypt(&wrapped(&bad)).unwrap_err();
            assert!(matches!(err, Error::BadCiphertext(_)), "{bad}: {err}");
        }
        let mut other_format = wrapped(&format!("aws-kms:{ARN}:v1"));
        other_format
            .annotations
            .insert(FORMAT_ANNOTATION.into(), b"vault-transit-aad/1".to_vec());
        assert!(check_decrypt(&other_format).is_err());
        let mut empty = wrapped(&format!("aws-kms:{ARN}:v1"));
        empty.ciphertext.clear();
        assert!(check_decrypt(&empty).is_err());
    }

    #[test]
    fn the_region_comes_from_the_flag_or_the_arn_and_they_must_agree() {
        assert_eq!(region_for(ARN, None).unwrap().as_deref(), Some("eu-west-1"));
        assert_eq!(
            region_for(ARN, Some("eu-west-1")).unwrap().as_deref(),
            Some("eu-west-1")
        );
        assert!(region_for(ARN, Some("us-east-1")).is_err());
        assert_eq!(
            region_for("alias/kek", Some("us-east-1")).unwrap().as_deref(),
            Some("us-east-1")
        );
        assert_eq!(region_for("alias/kek", None).unwrap(), None);
    }

    #[test]
    fn plain_http_endpoints_are_for_loopback_only() {
        assert!(check_endpoint("https://kms.eu-west-1.amazonaws.com").is_ok());
        assert!(check_endpoint("https://vpce-1.kms.eu-west-1.vpce.amazonaws.com").is_ok());
        assert!(check_endpoint("http://127.0.0.1:4566").is_ok());
        assert!(check_endpoint("http://[::1]:4566").is_ok());
        assert!(check_endpoint("http://localhost:4566").is_ok());
        assert!(check_endpoint("http://10.0.0.1:4566").is_err());
        assert!(check_endpoint("ftp://127.0.0.1").is_err());
        assert!(check_endpoint("not a url").is_err());
    }
}
