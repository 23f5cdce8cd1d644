//! PKCS#11 backend: the key-encryption key is an AES-256 secret key inside an HSM token (SoftHSM2 in
//! development), used only through `C_Encrypt`/`C_Decrypt` with `CKM_AES_GCM`; it never leaves the
//! token.
//!
//! **Ciphertext** (at most 1024 bytes): `0x01` (format version) ‖ IV (12 bytes, fresh per call) ‖
//! AES-256-GCM ciphertext ‖ tag (16 bytes). The AAD is the key_id, so a ciphertext presented under
//! another key_id fails authentication. Annotation [`FORMAT_ANNOTATION`](super::FORMAT_ANNOTATION) = [`FORMAT`].
//!
//! **key_id** = `pkcs11:<CKA_LABEL>:<hex CKA_ID>`, from stable, non-secret attributes: a new key
//! under the same label gets a new random CKA_ID and so a new key_id. Decrypt finds the key by
//! label and CKA_ID, so ciphertexts of earlier keys still decrypt while those keys stay on the token
//! (rotation = point `--pkcs11-key-label` at a new key and keep the old one).
//!
//! **Concurrency**: `Session` is `Send` but not `Sync`, so sessions live in a small pool; each call
//! takes one (opening and logging in a new one when the pool is empty) and returns it. At most
//! [`MAX_SESSIONS`] calls run at once, each on a `spawn_blocking` thread.
//!
//! **One module per process**: `C_Initialize` runs once per module path (`Module`); every backend
//! in the process shares it. Every PKCS#11 call holds the module's read lock; a reload
//! (`C_Finalize` + `C_Initialize`) holds the write lock and bumps a generation, after which every
//! handle (slot, session, object) of the older generation is forgotten, never used or closed.
//!
//! **Recovery**: any `token_lost`-class failure drops the pool and the cached key handles; the next
//! attempt finds the slot again by token label (slot numbers change), opens and logs in a session
//! and finds the keys again. When that fails too, or the token cannot be found at all, the module
//! is reloaded (`C_Finalize` + `C_Initialize`), at most once per [`RELOAD_INTERVAL`]: SoftHSM never
//! revives a token whose directory vanished within a process (measured: its `OSToken` stays invalid
//! and the token store is scanned only in `C_Initialize`). A reload whose `C_Initialize` fails (SoftHSM
//! while its whole `directories.tokendir` is gone; a network HSM while its server is unreachable)
//! leaves the module marked uninitialized: every later call answers `token_lost` with that cause and
//! tries the reload again (same rate bound), so no failure leaves the backend down for good.
//!
//! **PIN**: read from the PIN file on each login (one trailing newline trimmed), held zeroizing, never
//! logged. A PIN the token rejected is remembered and not presented again until the file's content
//! changes: a wrong PIN is never retried in a loop (real HSMs lock the user PIN after a few tries).
//! For the same reason [`Pkcs11Backend::connect`] does not fail on a wrong PIN (a crash loop would
//! retry it on every restart); the backend starts and answers `Denied` until the file is fixed.
//! PKCS#11 login state is per process and token: while any session of the process is logged in,
//! `C_Login` answers `CKR_USER_ALREADY_LOGGED_IN` (success) without checking the PIN.
//!
//! Where things live: `errors` turns PKCS#11 return codes into [`Error`]s; `module` is the
//! process-wide registry of loaded modules and their reload; `session` is the session pool, login
//! and the recovering `run`; `keys` finds keys and does the AES-GCM calls; `format` is the bytes
//! (ciphertext layout, key_ids, PIN files); `init` is `kleidi pkcs11 init`.

mod errors;
pub(crate) mod format;
mod init;
mod keys;
mod module;
mod session;

pub use self::init::init;

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretSlice};
use tokio::sync::Semaphore;

use self::errors::{bad_ciphertext, classify, is_lost, shown};
use self::format::{MAX_PLAINTEXT, parse_key_id, split_ciphertext, validate};
use self::module::Module;
use self::session::{Inner, Login, State};
use crate::service::{Encrypted, KeyService};
use crate::{Error, Result};

/// Value of the [`FORMAT_ANNOTATION`](super::FORMAT_ANNOTATION) annotation on every ciphertext this backend writes.
pub const FORMAT: &str = "pkcs11-aes-256-gcm-v1";
/// Most PKCS#11 calls in flight (and sessions open) per backend; keeps blocked threads from piling up.
pub const MAX_SESSIONS: usize = 16;
/// Least time between two module reloads (`C_Finalize` + `C_Initialize`) of one module.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);
const BACKEND: &str = "pkcs11";

/// Where the key lives and how to log in. Nothing here is secret: the PIN stays in its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkcs11Config {
    /// The PKCS#11 module (shared library), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// CKA_LABEL of the token (at most 32 bytes).
    pub token_label: String,
    /// File holding the user PIN (one trailing newline is ignored).
    pub pin_file: PathBuf,
    /// CKA_LABEL of the current key-encryption key.
    pub key_label: String,
}

/// What `kleidi pkcs11 init` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitOutcome {
    /// A token was initialized (no token had the label).
    pub token_created: bool,
    /// A key was generated (no key had the label).
    pub key_created: bool,
    /// The key_id of the key now labelled `key_label`.
    pub key_id: String,
}

/// Non-secret facts about the token, for diagnostics (`CK_TOKEN_INFO`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenStatus {
    /// Token label.
    pub label: String,
    /// Token serial number (SoftHSM names the token's directory after it).
    pub serial: String,
    /// Slot the token is in now (slot numbers can change across reconnects).
    pub slot: u64,
    /// `CKF_USER_PIN_COUNT_LOW`: a wrong user PIN was presented since the last good login.
    pub user_pin_count_low: bool,
    /// `CKF_USER_PIN_FINAL_TRY`: one more wrong PIN locks the user PIN.
    pub user_pin_final_try: bool,
    /// `CKF_USER_PIN_LOCKED`.
    pub user_pin_locked: bool,
}

/// The PKCS#11 key service. Cheap to share; all calls may run concurrently.
pub struct Pkcs11Backend {
    inner: Arc<Inner>,
    permits: Arc<Semaphore>,
}

impl fmt::Debug for Pkcs11Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Paths and labels only: the PIN never enters this struct except transiently, zeroizing.
        f.debug_struct("Pkcs11Backend")
            .field("module", &self.inner.module.path)
            .field("token_label", &self.inner.cfg.token_label)
            .field("key_label", &self.inner.cfg.key_label)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Backend {
    /// Loads the module, finds the token and the current key. Fails with [`Error::Config`] when the
    /// token or the key label is absent (or the key has no CKA_ID). A rejected PIN does not fail it:
    /// the backend starts, logs the refusal, and answers `Denied` until the PIN file changes.
    pub async fn connect(cfg: Pkcs11Config) -> Result<Self> {
        validate(&cfg)?;
        let module_path = cfg.module.clone();
        let module = tokio::task::spawn_blocking(move || Module::get(&module_path))
            .await
            .map_err(join_error)??;
        let backend = Pkcs11Backend {
            inner: Arc::new(Inner {
                module,
                cfg,
                state: Mutex::new(State::default()),
                login: Mutex::new(Login::default()),
            }),
            permits: Arc::new(Semaphore::new(MAX_SESSIONS)),
        };
        let cfg = &backend.inner.cfg;
        match backend.blocking(|inner| inner.refresh_current()).await {
            Ok(key_id) => {
                tracing::info!(
                    backend = BACKEND,
                    module = %backend.inner.module.path.display(),
                    token = %cfg.token_label,
                    key_id = %key_id,
                    "pkcs11 backend connected"
                );
                Ok(backend)
            }
            Err(e @ Error::Denied { .. }) => {
                tracing::error!(
                    backend = BACKEND,
                    token = %cfg.token_label,
                    class = e.class(),
                    "starting without a login: {e}; every call answers Denied until {} changes",
                    cfg.pin_file.display()
                );
                Ok(backend)
            }
            Err(e) if is_lost(&e) => Err(Error::Config(format!(
                "cannot reach token {:?} through {}: {e}; create it with `kleidi pkcs11 init`",
                cfg.token_label,
                backend.inner.module.path.display()
            ))),
            Err(e) => Err(e),
        }
    }

    /// The token's non-secret status flags (no login needed).
    pub async fn token_status(&self) -> Result<TokenStatus> {
        self.blocking(|inner| {
            inner.run(|module_gen| {
                inner.with_slot(module_gen, |slot| {
                    let info = inner
                        .module
                        .ctx
                        .get_token_info(slot)
                        .map_err(|e| classify("token status", e))?;
                    Ok(TokenStatus {
                        label: info.label().to_owned(),
                        serial: info.serial_number().to_owned(),
                        slot: slot.id(),
                        user_pin_count_low: info.user_pin_count_low(),
                        user_pin_final_try: info.user_pin_final_try(),
                        user_pin_locked: info.user_pin_locked(),
                    })
                })
            })
        })
        .await
    }

    /// Runs `f` on a blocking thread, holding one of [`MAX_SESSIONS`] permits until it finishes
    /// (even if the caller stops waiting).
    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| Error::Backend("pkcs11 session limiter closed".into()))?;
        let inner = Arc::clone(&self.inner);
        // A blocking thread does not inherit the caller's span: carried over, so the token's lines
        // name the call (its uid) they were made for.
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _in_call = span.enter();
            f(&inner)
        })
        .await
        .map_err(join_error)?
    }
}

#[async_trait]
impl KeyService for Pkcs11Backend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn encrypt(&self, _uid: &str, plaintext: &SecretSlice<u8>) -> Result<Encrypted> {
        let len = plaintext.expose_secret().len();
        if len == 0 || len > MAX_PLAINTEXT {
            return Err(Error::InvalidRequest(format!(
                "plaintext is {len} bytes; the pkcs11 backend wraps 1 to {MAX_PLAINTEXT}"
            )));
        }
        let plaintext = plaintext.clone();
        self.blocking(move |inner| {
            inner.run(|module_gen| inner.with_session(module_gen, |lease| inner.encrypt(lease, &plaintext)))
        })
        .await
    }

    async fn decrypt(&self, _uid: &str, encrypted: &Encrypted) -> Result<SecretSlice<u8>> {
        // Everything that needs no token is checked first.
        let key_id = encrypted.key_id.clone();
        let Some((label, id)) = parse_key_id(&key_id) else {
            return Err(bad_ciphertext(format!(
                "key_id {} is not a kleidi pkcs11 key_id (pkcs11:<key label>:<hex CKA_ID>)",
                shown(&key_id)
            )));
        };
        let label = label.to_owned();
        let (iv, body) = split_ciphertext(&encrypted.annotations, &encrypted.ciphertext)?;
        let body = body.to_vec();
        self.blocking(move |inner| {
            inner.run(|module_gen| {
                inner.with_session(module_gen, |lease| {
                    inner.decrypt(lease, &label, &id, &key_id, iv, &body)
                })
            })
        })
        .await
    }

    async fn current_key_id(&self) -> Result<String> {
        self.blocking(|inner| inner.refresh_current()).await
    }

    async fn describe(&self) -> Vec<(&'static str, String)> {
        let cfg = &self.inner.cfg;
        let mut facts = vec![
            ("module", cfg.module.display().to_string()),
            ("token_label", cfg.token_label.clone()),
            ("key_label", cfg.key_label.clone()),
            ("pin_file", cfg.pin_file.display().to_string()),
        ];
        match self.token_status().await {
            Ok(token) => {
                let pin = if token.user_pin_locked {
                    "locked"
                } else if token.user_pin_final_try {
                    "one more wrong PIN locks it"
                } else if token.user_pin_count_low {
                    "a wrong PIN was presented since the last good login"
                } else {
                    "ok"
                };
                facts.extend([
                    ("slot", token.slot.to_string()),
                    ("token_serial", token.serial),
                    ("user_pin", pin.to_owned()),
                ]);
            }
            Err(err) => facts.push(("token", format!("cannot read its status: {err}"))),
        }
        facts
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn join_error(e: tokio::task::JoinError) -> Error {
    Error::Backend(format!("pkcs11 worker thread failed: {e}"))
}
