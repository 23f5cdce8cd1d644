//! The HashiCorp Vault / OpenBao transit backend: the key-encryption key is a transit key that never
//! leaves Vault; kleidi asks Vault to encrypt and decrypt the apiserver's seeds with it.
//!
//! - **Binding.** Every encrypt names the key version explicitly and passes `associated_data` (the
//!   key is an AEAD type, so no derived key or `context` is needed): a fixed label plus the key_id,
//!   which names mount, key, version and the version's creation time. A ciphertext moved to another
//!   key, version or recreated key, or with its key_id edited, fails authentication in Vault.
//! - **key_id** is `vault:<mount>/<key>:v<N>:<8 hex>`, the hex being a hash of namespace, mount,
//!   key, version and that version's creation time, so a deleted and recreated key gets new ids.
//!   Status reads the key once (`transit/keys/<key>`: one round trip) and Encrypt uses exactly the
//!   version Status last saw, so both report the same key_id even while a rotation lands.
//! - **Never creating keys.** The key must exist at connect (kleidi refuses to start otherwise) and
//!   at every Status; the policy in `fixtures/vault` grants no `create` on transit paths, and a
//!   token that could create keys through encrypt (transit's upsert) is warned about at start.
//! - **Decrypt storms** (an apiserver filling its cache) are collapsed: concurrent decrypts of the
//!   same ciphertext share one Vault call, and different ciphertexts that queue up while calls are
//!   in flight go together as one transit `batch_input` call (`batch`). That queue is bounded
//!   ([`MAX_QUEUED_DECRYPTS`]; beyond it a decrypt fails at once, class `overloaded`) and never sends
//!   a decrypt whose caller gave up.
//!
//! Talking to Vault (TLS, failover, error classes) lives in `client`, logging in and token renewal
//! in `auth`, the raw transit endpoints in `api`, decrypt batching in `batch`.

pub(crate) mod api;
mod auth;
pub(crate) mod batch;
mod cert;
mod client;

pub use self::auth::SERVICE_ACCOUNT_TOKEN;
pub use self::batch::MAX_QUEUED as MAX_QUEUED_DECRYPTS;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use self::auth::Session;
pub use self::client::DEFAULT_CALL_BUDGET;
use self::client::{BoxFut, Call, Nodes, Op, clone_error};
use super::FORMAT_ANNOTATION;
use crate::config::VaultArgs;
use crate::service::{Annotations, Credential, Encrypted, KeyService};
use crate::{Error, Result};

/// The value of [`FORMAT_ANNOTATION`]: transit ciphertext bound to the key_id by associated data.
const FORMAT: &str = "vault-transit-aad/1";
/// The fixed label in front of the key_id in the associated data.
const AAD_LABEL: &str = "kleidi.dev/vault-transit/v1";
/// How long connect waits for Vault before serving anyway (calls then answer Unavailable).
const CONNECT_BOUND: Duration = Duration::from_secs(5);
/// Transit key types that authenticate associated data.
const AEAD_TYPES: [&str; 4] = [
    "aes256-gcm96",
    "aes128-gcm96",
    "chacha20-poly1305",
    "xchacha20-poly1305",
];

/// Wraps seeds with a Vault / OpenBao transit key. Dropping it stops its token renewal.
pub struct VaultBackend {
    inner: Arc<Inner>,
    renewer: tokio::task::JoinHandle<()>,
}

struct Inner {
    nodes: Nodes,
    session: Session,
    mount: String,
    key: String,
    namespace: String,
    /// The version and key_id the last Status reported; Encrypt uses exactly these.
    current: Mutex<Option<Current>>,
    /// Decrypts in flight, by (key_id, ciphertext).
    inflight: Mutex<HashMap<FlightKey, Flight>>,
    /// Decrypts of different ciphertexts waiting to go to Vault together.
    queue: Mutex<batch::Queue>,
    /// `--vault-client-cert`, for its notAfter in metrics.
    client_cert: Option<std::path::PathBuf>,
}

#[derive(Clone)]
struct Current {
    version: u64,
    key_id: String,
    /// The transit key's type, for `kleidi check`.
    key_type: String,
}

type FlightKey = (String, Vec<u8>);
type Flight = Arc<OnceCell<Result<Arc<SecretSlice<u8>>>>>;

impl VaultBackend {
    /// Checks the flags, logs in and checks that the transit key exists and can bind associated data.
    /// A Vault that is down or refuses the credentials does not stop kleidi (calls answer
    /// Unavailable or Denied until it recovers); a missing or unsuitable key does.
    pub async fn connect(args: &VaultArgs) -> Result<Self> {
        Self::connect_with_budget(args, DEFAULT_CALL_BUDGET).await
    }

    /// [`VaultBackend::connect`] with each call's time on Vault (every address, login and retry)
    /// bounded by `budget`; `kleidi serve` sets it a little below `--call-timeout`.
    pub async fn connect_with_budget(args: &VaultArgs, budget: Duration) -> Result<Self> {
        let key = args.vault_key.clone().unwrap_or_default();
        let mount = args.vault_transit_mount.trim_matches('/').to_string();
        let usable = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_graphic());
        if !usable(&key) || key.contains('/') || !usable(&mount) {
            return Err(Error::Config(
                "--vault-key and --vault-transit-mount must be non-empty names (no spaces; no '/' in the key)"
                    .into(),
            ));
        }
        let inner = Arc::new(Inner {
            nodes: Nodes::new(args, budget)?,
            session: Session::new(args)?,
            mount,
            key,
            namespace: args.vault_namespace.clone().unwrap_or_default(),
            current: Mutex::new(None),
            inflight: Mutex::new(HashMap::new()),
            queue: Mutex::new(batch::Queue::default()),
            client_cert: args.vault_client_cert.clone(),
        });
        match tokio::time::timeout(CONNECT_BOUND, inner.current_key_id()).await {
            Ok(Ok(key_id)) => {
                tracing::info!(%key_id, "vault: transit key ready");
                inner.warn_if_encrypt_can_create_keys().await;
            }
            Ok(Err(err)) if err.class() == "key_missing" => {
                return Err(Error::Config(format!(
                    "transit key {}/{} cannot be used (kleidi never creates keys): {err}",
                    inner.mount, inner.key
                )));
            }
            // An unsuitable key type, or a credential file that cannot be read.
            Ok(Err(err @ Error::Config(_))) => return Err(err),
            Ok(Err(err)) => {
                tracing::warn!(class = err.class(), error = %err, "vault: not usable yet; serving and retrying")
            }
            Err(_) => tracing::warn!("vault: no answer within {CONNECT_BOUND:?}; serving and retrying"),
        }
        let weak = Arc::downgrade(&inner);
        let renewer = tokio::spawn(async move {
            while let Some(inner) = weak.upgrade() {
                let wait = inner.session.maintain(&inner.nodes).await;
                drop(inner);
                tokio::time::sleep(wait).await;
            }
        });
        Ok(Self { inner, renewer })
    }
}

impl Drop for VaultBackend {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

impl Inner {
    /// Runs one Vault call with the current token; if Vault refuses the token (revoked, expired),
    /// logs in again once and retries once. All of it within the call budget.
    async fn run<T>(&self, op: Op, f: &(dyn Fn(Call) -> BoxFut<T> + Send + Sync)) -> Result<T> {
        let deadline = self.nodes.deadline();
        let token = self.session.token(&self.nodes, deadline).await?;
        match self.nodes.send(op, Some(&token.secret), deadline, f).await {
            Err(Error::Denied { .. }) => {
                let token = self
                    .session
                    .login(&self.nodes, token.generation, deadline)
                    .await?;
                self.nodes.send(op, Some(&token.secret), deadline, f).await
            }
            other => other,
        }
    }

    /// Transit creates a missing key on encrypt for a token with `create` on the encrypt path
    /// (unless the mount sets `disable_upsert`): if the key were deleted, the next encrypt would
    /// silently wrap seeds with a brand-new key. kleidi never asks for that; it warns, once, when its
    /// token could. One call at start; a refusal (no `default` policy) just skips the check.
    async fn warn_if_encrypt_can_create_keys(&self) {
        let path = format!("{}/encrypt/{}", self.mount, self.key);
        let endpoint_path = path.clone();
        let f = move |call: Call| -> BoxFut<api::Capabilities> {
            let endpoint = api::CapabilitiesSelf {
                paths: vec![endpoint_path.clone()],
            };
            Box::pin(async move { vaultrs::api::exec_with_result(&call, endpoint).await })
        };
        let deadline = self.nodes.deadline();
        let answer = match self.session.token(&self.nodes, deadline).await {
            Ok(token) => self.nodes.send(Op::Auth, Some(&token.secret), deadline, &f).await,
            Err(err) => Err(err),
        };
        match answer {
            Ok(caps) if caps.capabilities.iter().any(|c| c == "create" || c == "root") => {
                tracing::warn!(
                    path = %path,
                    "vault: this token may create transit keys: if the key is deleted, an encrypt \
                     would create a new one instead of failing; use the policy in fixtures/vault \
                     (no create) or set disable_upsert=true on {}/config/keys",
                    self.mount
                );
            }
            Ok(_) => {}
            Err(err) => {
                tracing::debug!(class = err.class(), error = %err, "vault: cannot check the token's capabilities")
            }
        }
    }

    async fn current_key_id(&self) -> Result<String> {
        let (mount, name) = (self.mount.clone(), self.key.clone());
        let f = move |call: Call| -> BoxFut<api::KeyInfo> {
            let endpoint = api::ReadKey {
                mount: mount.clone(),
                name: name.clone(),
            };
            Box::pin(async move { vaultrs::api::exec_with_result(&call, endpoint).await })
        };
        let info = self.run(Op::ReadKey, &f).await?;
        if !AEAD_TYPES.contains(&info.key_type.as_str()) || info.derived {
            return Err(Error::Config(format!(
                "transit key {}/{} is type {}{}; kleidi needs a non-derived AEAD key ({})",
                self.mount,
                self.key,
                info.key_type,
                if info.derived { " (derived)" } else { "" },
                AEAD_TYPES.join(", ")
            )));
        }
        let version = info.latest_version;
        let created = info
            .keys
            .get(&version.to_string())
            .and_then(serde_json::Value::as_i64)
            .ok_or_else(|| Error::Backend(format!("transit key version {version} has no creation time")))?;
        let key_id = self.key_id(version, created);
        *lock(&self.current) = Some(Current {
            version,
            key_id: key_id.clone(),
            key_type: info.key_type,
        });
        Ok(key_id)
    }

    fn key_id(&self, version: u64, created: i64) -> String {
        let mut hash = Sha256::new();
        for part in [
            self.namespace.as_str(),
            self.mount.as_str(),
            self.key.as_str(),
            &version.to_string(),
            &created.to_string(),
        ] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        let tag: String = hex::encode(hash.finalize()).chars().take(8).collect();
        format!("{}{version}:{tag}", self.key_id_prefix())
    }

    fn key_id_prefix(&self) -> String {
        format!("vault:{}/{}:v", self.mount, self.key)
    }
}

/// What decrypt checks before any Vault call: this backend's format annotation, a key_id naming a
/// version of its key (`key_id_prefix` is `Inner::key_id_prefix`), and a transit ciphertext of
/// that version. Returns the ciphertext as transit takes it. Pure, so fuzz/ can reach it.
pub(crate) fn check_decrypt(key_id_prefix: &str, encrypted: &Encrypted) -> Result<String> {
    match encrypted.annotations.get(FORMAT_ANNOTATION) {
        Some(format) if format.as_slice() == FORMAT.as_bytes() => {}
        _ => return Err(Error::BadCiphertext(format!("not in format {FORMAT}"))),
    }
    let version = version_of(key_id_prefix, &encrypted.key_id)?;
    std::str::from_utf8(&encrypted.ciphertext)
        .ok()
        .filter(|c| c.starts_with(&format!("vault:v{version}:")))
        .map(str::to_string)
        .ok_or_else(|| {
            Error::BadCiphertext("ciphertext is not a transit ciphertext of the key_id's version".into())
        })
}

/// The version a key_id names, if it names this backend's key; anything else is not ours.
fn version_of(key_id_prefix: &str, key_id: &str) -> Result<u64> {
    let rest = key_id.strip_prefix(key_id_prefix).ok_or_else(|| {
        Error::BadCiphertext(format!(
            "key_id \"{}\" names another key",
            crate::logging::Client(key_id)
        ))
    })?;
    rest.split_once(':')
        .and_then(|(version, tag)| (tag.len() == 8).then_some(version))
        .and_then(|version| version.parse().ok())
        .ok_or_else(|| {
            Error::BadCiphertext(format!(
                "key_id \"{}\" is malformed",
                crate::logging::Client(key_id)
            ))
        })
}

#[async_trait]
impl KeyService for VaultBackend {
    fn name(&self) -> &'static str {
        "vault"
    }

    fn credential_expiry(&self) -> Vec<(Credential, f64)> {
        let token = self
            .inner
            .session
            .token_expires_in()
            .map(|left| (Credential::VaultToken, left));
        let cert = self
            .inner
            .client_cert
            .as_deref()
            .and_then(cert::expires_in)
            .map(|left| (Credential::ClientCertificate, left));
        token.into_iter().chain(cert).collect()
    }

    async fn encrypt(&self, _uid: &str, plaintext: &SecretSlice<u8>) -> Result<Encrypted> {
        let inner = &self.inner;
        let known = lock(&inner.current).clone();
        let current = match known {
            Some(current) => current,
            None => {
                inner.current_key_id().await?;
                lock(&inner.current)
                    .clone()
                    .ok_or_else(|| Error::Backend("no current key version".into()))?
            }
        };
        let encoded = Arc::new(SecretString::from(B64.encode(plaintext.expose_secret())));
        let (mount, name) = (inner.mount.clone(), inner.key.clone());
        let (version, aad) = (current.version, associated_data(&current.key_id));
        let f = move |call: Call| -> BoxFut<api::Ciphertext> {
            let endpoint = api::Encrypt {
                mount: mount.clone(),
                name: name.clone(),
                plaintext: encoded.expose_secret().to_owned(),
                associated_data: aad.clone(),
                key_version: version,
            };
            Box::pin(async move { vaultrs::api::exec_with_result(&call, endpoint).await })
        };
        let answer = inner.run(Op::Encrypt, &f).await?;
        if !answer.ciphertext.starts_with(&format!("vault:v{version}:")) {
            return Err(Error::Backend(format!(
                "encrypt asked for key version {version} and got another"
            )));
        }
        Ok(Encrypted {
            ciphertext: answer.ciphertext.into_bytes(),
            key_id: current.key_id,
            annotations: Annotations::from([(FORMAT_ANNOTATION.to_string(), FORMAT.as_bytes().to_vec())]),
        })
    }

    async fn decrypt(&self, uid: &str, encrypted: &Encrypted) -> Result<SecretSlice<u8>> {
        let inner = &self.inner;
        let ciphertext = check_decrypt(&inner.key_id_prefix(), encrypted)?;
        let flight = FlightGuard::join(inner, (encrypted.key_id.clone(), encrypted.ciphertext.clone()));
        let shared = flight
            .cell
            .get_or_init(|| {
                inner.decrypt_batched(
                    api::BatchItem {
                        ciphertext,
                        associated_data: associated_data(&encrypted.key_id),
                    },
                    batch::Caller::current(uid),
                )
            })
            .await;
        match shared {
            Ok(plain) => Ok(SecretSlice::from(plain.expose_secret().to_vec())),
            Err(err) => Err(clone_error(err)),
        }
    }

    async fn current_key_id(&self) -> Result<String> {
        self.inner.current_key_id().await
    }

    /// From what the last login and Status saw; no Vault call.
    async fn describe(&self) -> Vec<(&'static str, String)> {
        let inner = &self.inner;
        let mut facts = vec![
            ("addresses", inner.nodes.addresses().join(", ")),
            ("namespace", inner.namespace.clone()),
        ];
        facts.extend(inner.session.describe());
        facts.push(("transit_key", format!("{}/{}", inner.mount, inner.key)));
        if let Some(current) = lock(&inner.current).clone() {
            facts.push(("key_type", current.key_type));
            facts.push(("latest_version", current.version.to_string()));
        }
        if let Some(left) = inner.client_cert.as_deref().and_then(cert::expires_in) {
            facts.push(("client_certificate_expires_in", format!("{}s", left.round())));
        }
        facts.retain(|(_, value)| !value.is_empty());
        facts
    }
}

/// One caller's share in a decrypt flight; the last one out (or the one that completes it) removes
/// the flight, so the map holds only decrypts in progress, never results.
struct FlightGuard<'a> {
    inner: &'a Inner,
    key: FlightKey,
    cell: Flight,
}

impl<'a> FlightGuard<'a> {
    fn join(inner: &'a Inner, key: FlightKey) -> Self {
        let cell = lock(&inner.inflight).entry(key.clone()).or_default().clone();
        Self { inner, key, cell }
    }
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        let mut flights = lock(&self.inner.inflight);
        let ours = flights.get(&self.key).is_some_and(|c| Arc::ptr_eq(c, &self.cell));
        // Done, or abandoned by everyone (the map and this guard hold the last two references).
        if ours && (self.cell.initialized() || Arc::strong_count(&self.cell) <= 2) {
            flights.remove(&self.key);
        }
    }
}

/// The associated data binding a ciphertext to its key_id (mount, key, version, creation).
fn associated_data(key_id: &str) -> String {
    B64.encode(format!("{AAD_LABEL}\0{key_id}"))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded values are replaced whole, never left half-written: a poisoned lock is usable.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
