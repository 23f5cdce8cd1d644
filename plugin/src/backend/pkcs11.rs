//! PKCS#11 backend: the key-encryption key is an AES-256 secret key inside an HSM token (SoftHSM2 in
//! development), used only through `C_Encrypt`/`C_Decrypt` with `CKM_AES_GCM`; it never leaves the
//! token.
//!
//! **Ciphertext** (at most 1024 bytes): `0x01` (format version) ‖ IV (12 bytes, fresh per call) ‖
//! AES-256-GCM ciphertext ‖ tag (16 bytes). The AAD is the key_id, so a ciphertext presented under
//! another key_id fails authentication. Annotation [`FORMAT_ANNOTATION`] = [`FORMAT`].
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

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::{AuthPin, RawAuthPin};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretBox, SecretSlice};
use tokio::sync::Semaphore;
use zeroize::{Zeroize, Zeroizing};

use super::FORMAT_ANNOTATION;
use crate::service::{Annotations, Encrypted, KeyService};
use crate::{Error, Result};

/// Value of the [`FORMAT_ANNOTATION`] annotation on every ciphertext this backend writes.
pub const FORMAT: &str = "pkcs11-aes-256-gcm-v1";

/// First byte of every ciphertext: the layout version.
const VERSION: u8 = 0x01;
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
const TAG_BITS: u64 = 128;
const HEADER_LEN: usize = 1 + IV_LEN;
/// The apiserver rejects ciphertexts and key_ids longer than this (kms.md 2.1).
const MAX_WIRE_LEN: usize = 1024;
/// Largest plaintext whose ciphertext still fits in [`MAX_WIRE_LEN`].
const MAX_PLAINTEXT: usize = MAX_WIRE_LEN - HEADER_LEN - TAG_LEN;
/// Length of the random CKA_ID `init` gives a new key.
const KEY_ID_BYTES: usize = 16;
const KEY_ID_PREFIX: &str = "pkcs11:";
/// PKCS#11 token labels are 32 bytes, blank padded.
const MAX_TOKEN_LABEL: usize = 32;
/// Most PKCS#11 calls in flight (and sessions open) per backend; keeps blocked threads from piling up.
pub const MAX_SESSIONS: usize = 16;
/// Least time between two module reloads (`C_Finalize` + `C_Initialize`) of one module.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);
const BACKEND: &str = "pkcs11";
const TOKEN_LOST: &str = "token_lost";

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

// ---------------------------------------------------------------------------------------------
// Error classification: the one place a PKCS#11 return code becomes a crate::Error.
// ---------------------------------------------------------------------------------------------

/// Classifies a cryptoki failure of `function` (our operation, e.g. `"encrypt"`) into the plugin's
/// [`Error`], once, and logs it with its class and return code. The detail names the operation,
/// the C function and the CKR code; never key material or PINs.
///
/// The one context-dependent case is decided by the caller, not here: SoftHSM 2.6 reports a GCM
/// authentication failure in `C_Decrypt` as `CKR_GENERAL_ERROR` (measured), so the decrypt path
/// checks that the token is still present and then reports a bad ciphertext instead.
fn classify(function: &str, err: CkError) -> Error {
    let (rv, call) = match &err {
        CkError::Pkcs11(rv, call) => (*rv, *call),
        _ => {
            let error = classify_library(function, &err);
            log_failure(&error, "-");
            return error;
        }
    };
    let rc = rc_name(rv);
    let detail = format!("{function}: C_{call:?} returned {rc}");
    let unavailable = |class: &'static str| Error::Unavailable {
        backend: BACKEND,
        class,
        detail: detail.clone(),
    };
    let denied = |class: &'static str| Error::Denied {
        backend: BACKEND,
        class,
        detail: detail.clone(),
    };
    use RvError as R;
    let error = match rv {
        // The token, its slot, our session or our handles are gone: drop everything and reconnect.
        R::DeviceRemoved
        | R::DeviceError
        | R::GeneralError
        | R::TokenNotPresent
        | R::TokenNotRecognized
        | R::SlotIdInvalid
        | R::SessionHandleInvalid
        | R::SessionClosed
        | R::ObjectHandleInvalid
        | R::KeyHandleInvalid
        | R::UserNotLoggedIn
        | R::CryptokiNotInitialized => unavailable(TOKEN_LOST),
        R::HostMemory | R::DeviceMemory | R::SessionCount => unavailable("resources"),
        R::FunctionFailed | R::FunctionCanceled | R::Cancel => unavailable("function_failed"),
        R::PinIncorrect | R::PinInvalid | R::PinLenRange => denied("pin_incorrect"),
        R::PinLocked => denied("pin_locked"),
        R::PinExpired => denied("pin_expired"),
        R::EncryptedDataInvalid | R::EncryptedDataLenRange => {
            Error::BadCiphertext(format!("the token rejected the ciphertext ({detail})"))
        }
        R::DataInvalid | R::DataLenRange => {
            Error::InvalidRequest(format!("the token rejected the plaintext ({detail})"))
        }
        R::UserPinNotInitialized => Error::Config(format!(
            "{detail}: the token has no user PIN yet; run `kleidi pkcs11 init`"
        )),
        R::MechanismInvalid
        | R::MechanismParamInvalid
        | R::KeyTypeInconsistent
        | R::KeySizeRange
        | R::KeyFunctionNotPermitted
        | R::FunctionNotSupported
        | R::TokenWriteProtected
        | R::TemplateIncomplete
        | R::TemplateInconsistent
        | R::AttributeTypeInvalid
        | R::AttributeValueInvalid
        | R::ActionProhibited => Error::Config(format!(
            "{detail}: the token or key cannot do AES-256-GCM as kleidi needs (an AES key with CKA_ENCRYPT and CKA_DECRYPT)"
        )),
        R::ArgumentsBad | R::BufferTooSmall | R::OperationActive | R::OperationNotInitialized => {
            Error::Backend(detail.clone())
        }
        _ => unavailable("pkcs11_error"),
    };
    log_failure(&error, &rc);
    error
}

/// Failures that are not a PKCS#11 return code: the module itself is unusable, or a conversion.
fn classify_library(function: &str, err: &CkError) -> Error {
    match err {
        CkError::LibraryLoading(_)
        | CkError::NullFunctionPointer
        | CkError::MissingSymbol(_)
        | CkError::NotSupported => {
            Error::Config(format!("{function}: the PKCS#11 module cannot do this: {err}"))
        }
        _ => Error::Backend(format!("{function}: {err}")),
    }
}

/// `RvError::SlotIdInvalid` → `CKR_SLOT_ID_INVALID`.
fn rc_name(rv: RvError) -> String {
    match rv {
        RvError::VendorDefined(code) => format!("CKR_VENDOR_DEFINED({code:#x})"),
        RvError::UnknownErrorCode(code) => format!("CKR_UNKNOWN({code:#x})"),
        other => {
            let camel = format!("{other:?}");
            let mut name = String::from("CKR_");
            for (i, c) in camel.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    name.push('_');
                }
                name.push(c.to_ascii_uppercase());
            }
            name
        }
    }
}

/// Debug level: the guard layer logs every failed call once, with this error's class and text.
fn log_failure(error: &Error, rc: &str) {
    tracing::debug!(backend = BACKEND, class = error.class(), rc, "{error}");
}

/// A client-supplied key_id for an error message: escaped and cut short.
fn shown(key_id: &str) -> crate::logging::Client<'_> {
    crate::logging::Client(key_id)
}

fn is_lost(err: &Error) -> bool {
    matches!(err, Error::Unavailable { class, .. } if *class == TOKEN_LOST)
}

/// A token_lost failure that has no return code (the token is simply not there); logged like
/// [`classify`]'s.
fn token_lost(detail: String) -> Error {
    let error = Error::Unavailable {
        backend: BACKEND,
        class: TOKEN_LOST,
        detail,
    };
    log_failure(&error, "-");
    error
}

fn bad_ciphertext(detail: String) -> Error {
    let error = Error::BadCiphertext(detail);
    log_failure(&error, "-");
    error
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// The process-wide module registry.
// ---------------------------------------------------------------------------------------------

/// One loaded and initialized PKCS#11 module, shared by every backend in the process that names the
/// same file. Never dropped (a dropped context would unload the library under other users).
struct Module {
    path: PathBuf,
    ctx: Pkcs11,
    /// Read-locked around every PKCS#11 call; write-locked to reload.
    life: RwLock<Life>,
    /// Serializes `init` (choosing a free slot and initializing a token is not atomic).
    init_lock: Mutex<()>,
}

struct Life {
    /// Bumped on every reload; handles from older generations are never used.
    generation: u64,
    last_reload: Option<Instant>,
    /// Why the last `C_Initialize` failed; `None` while the module is initialized. Nothing but a
    /// reload is attempted while it is set.
    init_failure: Option<String>,
}

impl Module {
    /// The module for `path`, loading and initializing it on first use. Blocking.
    fn get(path: &Path) -> Result<Arc<Module>> {
        static MODULES: OnceLock<Mutex<HashMap<PathBuf, Arc<Module>>>> = OnceLock::new();
        // Two spellings of one file must share one entry: one library, one C_Initialize.
        let path = std::fs::canonicalize(path).map_err(|e| {
            Error::Config(format!(
                "PKCS#11 module {}: {e} (for SoftHSM: apt-get install softhsm2)",
                path.display()
            ))
        })?;
        let mut modules = lock(MODULES.get_or_init(Default::default));
        if let Some(module) = modules.get(&path) {
            return Ok(Arc::clone(module));
        }
        let ctx = Pkcs11::new(&path)
            .map_err(|e| Error::Config(format!("cannot load PKCS#11 module {}: {e}", path.display())))?;
        initialize(&ctx).map_err(|rc| {
            Error::Config(format!(
                "cannot initialize PKCS#11 module {}: C_Initialize returned {rc} (for SoftHSM check \
                 SOFTHSM2_CONF and its directories.tokendir)",
                path.display()
            ))
        })?;
        let module = Arc::new(Module {
            path: path.clone(),
            ctx,
            life: RwLock::new(Life {
                generation: 0,
                last_reload: None,
                init_failure: None,
            }),
            init_lock: Mutex::new(()),
        });
        modules.insert(path, Arc::clone(&module));
        Ok(module)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Life> {
        self.life.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reloads the module (`C_Finalize` + `C_Initialize`) unless someone already did since
    /// generation `seen`, or the last reload was under [`RELOAD_INTERVAL`] ago. Returns whether a
    /// fresh, initialized generation exists now, i.e. whether another attempt is worthwhile.
    /// Blocking; the caller must not hold the read lock.
    fn reload(&self, seen: u64) -> bool {
        let mut life = self.life.write().unwrap_or_else(PoisonError::into_inner);
        if life.generation != seen {
            return life.init_failure.is_none();
        }
        if life.last_reload.is_some_and(|t| t.elapsed() < RELOAD_INTERVAL) {
            return false;
        }
        // Every session of every backend dies here; they all hold the read lock while calling, and
        // forget (never close) handles of older generations.
        if life.init_failure.is_none() {
            if let Err(e) = self.ctx.clone().finalize() {
                tracing::debug!(backend = BACKEND, "C_Finalize before reload: {e}");
            }
        }
        let result = initialize(&self.ctx);
        life.generation = life.generation.wrapping_add(1);
        life.last_reload = Some(Instant::now());
        match result {
            Ok(()) => {
                let was_failing = life.init_failure.take().is_some();
                tracing::info!(
                    backend = BACKEND,
                    module = %self.path.display(),
                    generation = life.generation,
                    "reloaded the PKCS#11 module (C_Finalize + C_Initialize){}",
                    if was_failing { "; C_Initialize works again" } else { "" }
                );
                true
            }
            Err(rc) => {
                // The cause an operator needs, once per attempt (at most one a RELOAD_INTERVAL).
                tracing::warn!(
                    backend = BACKEND,
                    module = %self.path.display(),
                    generation = life.generation,
                    rc = %rc,
                    "reloading the PKCS#11 module failed: C_Initialize returned {rc}; the token store \
                     or HSM is unreachable (for SoftHSM: is directories.tokendir there?); retrying \
                     on the next call, at most once every {RELOAD_INTERVAL:?}"
                );
                life.init_failure = Some(format!("C_Initialize returned {rc}"));
                false
            }
        }
    }
}

/// `C_Initialize`; an already initialized module is fine. The failure is the CKR name.
fn initialize(ctx: &Pkcs11) -> std::result::Result<(), String> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(CkError::Pkcs11(rv, _)) => Err(rc_name(rv)),
        Err(e) => Err(e.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// PINs, key ids, formats: pure helpers.
// ---------------------------------------------------------------------------------------------

/// Reads a PIN file: the whole content minus one trailing newline, zeroizing. Blocking.
fn read_pin(path: &Path, what: &str) -> Result<Zeroizing<Vec<u8>>> {
    let raw = Zeroizing::new(
        std::fs::read(path)
            .map_err(|e| Error::Config(format!("cannot read the {what} file {}: {e}", path.display())))?,
    );
    let mut pin: &[u8] = &raw;
    if let Some(rest) = pin.strip_suffix(b"\n") {
        pin = rest.strip_suffix(b"\r").unwrap_or(rest);
    }
    if pin.is_empty() {
        return Err(Error::Config(format!(
            "the {what} file {} is empty",
            path.display()
        )));
    }
    // `to_vec` allocates exactly `len`, so later conversions into boxes never reallocate (and leave
    // an unzeroized copy behind).
    Ok(Zeroizing::new(pin.to_vec()))
}

fn raw_pin(pin: &[u8]) -> RawAuthPin {
    SecretBox::new(Box::new(pin.to_vec()))
}

/// A PIN as the UTF-8 string `C_InitToken`/`C_InitPIN` take in cryptoki.
fn text_pin(pin: &[u8], what: &str) -> Result<AuthPin> {
    match String::from_utf8(pin.to_vec()) {
        Ok(s) => Ok(AuthPin::from(s)),
        Err(e) => {
            e.into_bytes().zeroize();
            Err(Error::Config(format!("the {what} is not UTF-8 text")))
        }
    }
}

/// `pkcs11:<label>:<hex CKA_ID>`; refuses keys without a CKA_ID.
fn key_id_for(label: &str, id: Option<&[u8]>) -> Result<String> {
    let id = match id {
        Some(id) if !id.is_empty() => id,
        _ => {
            return Err(Error::Config(format!(
                "the key labelled {label:?} has no CKA_ID, and kleidi derives the key_id from it; \
                 give it a unique CKA_ID (e.g. `pkcs11-tool --login --type secrkey --label {label} \
                 --set-id <hex>` ... ) or create a new key with `kleidi pkcs11 init --pkcs11-key-label <new label>`"
            )));
        }
    };
    let key_id = format!("{KEY_ID_PREFIX}{label}:{}", hex::encode(id));
    if key_id.len() > MAX_WIRE_LEN {
        return Err(Error::Config(format!(
            "the key_id for key label {label:?} would be {} bytes; the apiserver allows {MAX_WIRE_LEN}",
            key_id.len()
        )));
    }
    Ok(key_id)
}

/// Splits a key_id into label and CKA_ID (on the last ':'); `None` unless it is exactly what
/// [`key_id_for`] produces.
fn parse_key_id(key_id: &str) -> Option<(&str, Vec<u8>)> {
    let (label, hex_id) = key_id.strip_prefix(KEY_ID_PREFIX)?.rsplit_once(':')?;
    let id = hex::decode(hex_id).ok()?;
    (!label.is_empty() && !id.is_empty() && hex::encode(&id) == hex_id).then_some((label, id))
}

/// Checks the annotation and the layout; returns the IV and the GCM ciphertext ‖ tag.
fn split_ciphertext<'c>(annotations: &Annotations, ciphertext: &'c [u8]) -> Result<([u8; IV_LEN], &'c [u8])> {
    match annotations.get(FORMAT_ANNOTATION) {
        None => {
            return Err(bad_ciphertext(format!(
                "the {FORMAT_ANNOTATION} annotation is missing; kleidi's pkcs11 backend writes {FORMAT}"
            )));
        }
        Some(format) if format.as_slice() != FORMAT.as_bytes() => {
            let shown: String = String::from_utf8_lossy(format).chars().take(64).collect();
            return Err(bad_ciphertext(format!(
                "unknown ciphertext format {shown:?} in annotation {FORMAT_ANNOTATION}; this build reads {FORMAT}"
            )));
        }
        Some(_) => {}
    }
    let Some((&version, rest)) = ciphertext.split_first() else {
        return Err(bad_ciphertext("empty ciphertext".into()));
    };
    if version != VERSION {
        return Err(bad_ciphertext(format!(
            "ciphertext version {version:#04x}; {FORMAT} is version {VERSION:#04x}"
        )));
    }
    if ciphertext.len() <= HEADER_LEN + TAG_LEN || ciphertext.len() > MAX_WIRE_LEN {
        return Err(bad_ciphertext(format!(
            "ciphertext is {} bytes; {FORMAT} needs {} to {MAX_WIRE_LEN}",
            ciphertext.len(),
            HEADER_LEN + TAG_LEN + 1
        )));
    }
    let (iv, body) = rest
        .split_at_checked(IV_LEN)
        .ok_or_else(|| bad_ciphertext("ciphertext too short for its IV".into()))?;
    let iv =
        <[u8; IV_LEN]>::try_from(iv).map_err(|_| bad_ciphertext("ciphertext too short for its IV".into()))?;
    Ok((iv, body))
}

fn validate(cfg: &Pkcs11Config) -> Result<()> {
    if cfg.token_label.is_empty() || cfg.token_label.len() > MAX_TOKEN_LABEL {
        return Err(Error::Config(format!(
            "the token label {:?} must be 1 to {MAX_TOKEN_LABEL} bytes",
            cfg.token_label
        )));
    }
    if cfg.key_label.is_empty() {
        return Err(Error::Config("the key label must not be empty".into()));
    }
    // The longest key_id we would produce must fit the apiserver's limit.
    key_id_for(&cfg.key_label, Some(&[0; KEY_ID_BYTES]))?;
    Ok(())
}

fn secret_key(label: &str) -> [Attribute; 2] {
    [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

fn join_error(e: tokio::task::JoinError) -> Error {
    Error::Backend(format!("pkcs11 worker thread failed: {e}"))
}

// ---------------------------------------------------------------------------------------------
// The backend.
// ---------------------------------------------------------------------------------------------

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

struct Inner {
    module: Arc<Module>,
    cfg: Pkcs11Config,
    state: Mutex<State>,
    /// Held across read-PIN-file → C_Login → remember-the-verdict, so concurrent callers never
    /// present one wrong PIN more than once.
    login: Mutex<Login>,
}

#[derive(Default)]
struct Login {
    /// The last PIN the token rejected with CKR_PIN_INCORRECT.
    rejected: Option<Zeroizing<Vec<u8>>>,
}

#[derive(Default)]
struct State {
    /// Module generation every handle below belongs to.
    generation: u64,
    /// Bumped on each reset; a session leased before it is closed on return, not pooled.
    epoch: u64,
    slot: Option<Slot>,
    idle: Vec<Session>,
    keys: HashMap<(String, Vec<u8>), ObjectHandle>,
    current: Option<CurrentKey>,
    /// The last attempt could not find or confirm the token at all: a module reload may help.
    missing: bool,
    /// A reset happened and no session has logged in since (for the reconnect log line).
    lost: bool,
}

#[derive(Clone)]
struct CurrentKey {
    handle: ObjectHandle,
    key_id: String,
}

/// A session taken from the pool for one attempt.
struct Lease {
    session: Session,
    slot: Slot,
    epoch: u64,
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
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
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
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// One call with recovery. After a token_lost failure (which already dropped the sessions and
    /// handles) it tries once more with a fresh session; when that fails too, or the token could not
    /// be found at all, or the module is uninitialized, it reloads the module (rate limited) and tries
    /// once more after that. At most three attempts.
    fn run<T>(&self, attempt: impl Fn(u64) -> Result<T>) -> Result<T> {
        let mut retried = false;
        let mut reloaded = false;
        loop {
            let (result, generation, initialized) = {
                let life = self.module.read();
                match &life.init_failure {
                    Some(cause) => (Err(self.uninitialized(cause)), life.generation, false),
                    None => (attempt(life.generation), life.generation, true),
                }
            };
            let err = match result {
                Ok(value) => return Ok(value),
                Err(err) if is_lost(&err) => err,
                Err(err) => return Err(err),
            };
            let missing = std::mem::take(&mut self.state().missing);
            if initialized && !missing && !retried {
                retried = true;
                tracing::debug!(backend = BACKEND, token = %self.cfg.token_label, "token_lost: trying once more with a fresh session");
                continue;
            }
            if !reloaded && self.module.reload(generation) {
                reloaded = true;
                continue;
            }
            return Err(err);
        }
    }

    /// The answer while the module's last `C_Initialize` failed.
    fn uninitialized(&self, cause: &str) -> Error {
        Error::Unavailable {
            backend: BACKEND,
            class: TOKEN_LOST,
            detail: format!(
                "PKCS#11 module {} is not initialized: the last reload's {cause}; retrying at most once every {RELOAD_INTERVAL:?}",
                self.module.path.display()
            ),
        }
    }

    /// Adopts module generation `module_gen`: handles of an older generation are forgotten. Sessions are
    /// opened with "no close on drop", so dropping them here makes no PKCS#11 call (their handle
    /// numbers may already belong to someone else's session).
    fn adopt(&self, st: &mut State, module_gen: u64) {
        if st.generation != module_gen {
            st.idle.clear();
            st.keys.clear();
            st.current = None;
            st.slot = None;
            st.generation = module_gen;
            st.epoch = st.epoch.wrapping_add(1);
        }
    }

    /// Forgets the slot, the keys and every pooled session after a token_lost failure.
    fn reset(&self, module_gen: u64, err: &Error) {
        let mut st = self.state();
        if st.generation != module_gen {
            return;
        }
        // Only a transition from connected is worth a line; the failure itself is logged already.
        let connected = st.slot.is_some() || !st.idle.is_empty() || !st.keys.is_empty();
        let sessions = std::mem::take(&mut st.idle);
        st.keys.clear();
        st.current = None;
        st.slot = None;
        st.epoch = st.epoch.wrapping_add(1);
        st.lost = true;
        drop(st);
        let dropped = sessions.len();
        for session in sessions {
            // Same generation (the caller holds the module's read lock): closing is safe.
            let _ = session.close();
        }
        if !connected {
            return;
        }
        tracing::warn!(
            backend = BACKEND,
            token = %self.cfg.token_label,
            class = err.class(),
            dropped_sessions = dropped,
            "pkcs11 connection lost ({err}); dropped sessions and key handles, reconnecting on the next call"
        );
    }

    /// Runs `op` with the token's slot (no session, no login).
    fn with_slot<T>(&self, module_gen: u64, op: impl FnOnce(Slot) -> Result<T>) -> Result<T> {
        let result = self.slot(module_gen).and_then(op);
        if let Err(e) = &result {
            if is_lost(e) {
                self.reset(module_gen, e);
            }
        }
        result
    }

    /// Runs `op` on a pooled (or new, logged-in) session and returns the session to the pool,
    /// unless the failure says the connection is gone.
    fn with_session<T>(&self, module_gen: u64, op: impl FnOnce(&Lease) -> Result<T>) -> Result<T> {
        let lease = match self.checkout(module_gen) {
            Ok(lease) => lease,
            Err(e) => {
                if is_lost(&e) {
                    self.reset(module_gen, &e);
                }
                return Err(e);
            }
        };
        let result = op(&lease);
        match &result {
            Err(e) if is_lost(e) => {
                let _ = lease.session.close();
                self.reset(module_gen, e);
            }
            _ => {
                let mut st = self.state();
                if st.generation == module_gen && st.epoch == lease.epoch {
                    st.idle.push(lease.session);
                } else {
                    drop(st);
                    let _ = lease.session.close();
                }
            }
        }
        result
    }

    fn checkout(&self, module_gen: u64) -> Result<Lease> {
        {
            let mut st = self.state();
            self.adopt(&mut st, module_gen);
            if let Some(slot) = st.slot {
                if let Some(session) = st.idle.pop() {
                    return Ok(Lease {
                        session,
                        slot,
                        epoch: st.epoch,
                    });
                }
            }
        }
        let slot = self.slot(module_gen)?;
        let epoch = self.state().epoch;
        let session = self
            .module
            .ctx
            .open_ro_session_no_drop(slot)
            .map_err(|e| classify("open session", e))?;
        if let Err(e) = self.login(&session) {
            let _ = session.close();
            return Err(e);
        }
        let mut st = self.state();
        if st.lost {
            st.lost = false;
            tracing::info!(
                backend = BACKEND,
                token = %self.cfg.token_label,
                slot = slot.id(),
                "pkcs11 reconnected: token found, session open, logged in"
            );
        }
        Ok(Lease { session, slot, epoch })
    }

    /// The token's slot, found by label when not known (slot numbers change when tokens come and go).
    fn slot(&self, module_gen: u64) -> Result<Slot> {
        {
            let mut st = self.state();
            self.adopt(&mut st, module_gen);
            if let Some(slot) = st.slot {
                return Ok(slot);
            }
        }
        let ctx = &self.module.ctx;
        let slots = ctx
            .get_slots_with_token()
            .map_err(|e| classify("list slots", e))?;
        for slot in slots {
            match ctx.get_token_info(slot) {
                Ok(info) if info.label() == self.cfg.token_label => {
                    let mut st = self.state();
                    if st.generation == module_gen {
                        st.slot = Some(slot);
                    }
                    return Ok(slot);
                }
                Ok(_) => {}
                // SoftHSM answers CKR_GENERAL_ERROR for a token whose directory vanished.
                Err(e) => tracing::debug!(backend = BACKEND, slot = slot.id(), "C_GetTokenInfo: {e}"),
            }
        }
        self.state().missing = true;
        Err(token_lost(format!(
            "no token labelled {:?} is present in {}",
            self.cfg.token_label,
            self.module.path.display()
        )))
    }

    /// Confirms that `slot` still holds our token; the failure if not. Used before reporting a
    /// missing key or failed authentication as the caller's fault.
    fn confirm_token(&self, slot: Slot) -> Result<()> {
        let result = match self.module.ctx.get_token_info(slot) {
            Ok(info) if info.label() == self.cfg.token_label => return Ok(()),
            Ok(_) => token_lost(format!(
                "slot {} no longer holds token {:?}",
                slot.id(),
                self.cfg.token_label
            )),
            Err(e) => classify("check token", e),
        };
        if is_lost(&result) {
            self.state().missing = true;
        }
        Err(result)
    }

    /// Logs `session` in with the PIN file's current content, unless the token already rejected
    /// exactly that content. `CKR_USER_ALREADY_LOGGED_IN` is success (login state is per process).
    fn login(&self, session: &Session) -> Result<()> {
        let mut login = lock(&self.login);
        let pin = read_pin(&self.cfg.pin_file, "PIN")?;
        if login.rejected.as_deref() == Some(&*pin) {
            let error = Error::Denied {
                backend: BACKEND,
                class: "pin_incorrect",
                detail: format!(
                    "the token rejected the PIN in {} (CKR_PIN_INCORRECT); not presenting it again until that file changes",
                    self.cfg.pin_file.display()
                ),
            };
            log_failure(&error, "CKR_PIN_INCORRECT");
            return Err(error);
        }
        match session.login_with_raw(UserType::User, &raw_pin(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                login.rejected = None;
                Ok(())
            }
            Err(e) => {
                let incorrect = matches!(e, CkError::Pkcs11(RvError::PinIncorrect, _));
                let error = classify("login", e);
                if incorrect {
                    login.rejected = Some(pin);
                }
                Err(error)
            }
        }
    }

    /// Finds the key labelled `key_label` now (so a replaced key is noticed) and makes it current.
    fn refresh_current(&self) -> Result<String> {
        self.run(|module_gen| {
            self.with_session(module_gen, |lease| {
                let key = self.find_current(lease)?;
                let mut st = self.state();
                if let Some(old) = &st.current {
                    if old.key_id != key.key_id {
                        tracing::info!(backend = BACKEND, old = %old.key_id, new = %key.key_id, "current key changed");
                    }
                }
                st.current = Some(key.clone());
                Ok(key.key_id)
            })
        })
    }

    fn find_current(&self, lease: &Lease) -> Result<CurrentKey> {
        let label = &self.cfg.key_label;
        let found = lease
            .session
            .find_objects(&secret_key(label))
            .map_err(|e| classify("find current key", e))?;
        let handle = match found.as_slice() {
            [handle] => *handle,
            [] => {
                // SoftHSM's FindObjects answers "nothing" when the token vanished: ask the token.
                self.confirm_token(lease.slot)?;
                return Err(Error::Config(format!(
                    "no secret key labelled {label:?} on token {:?}; create it with `kleidi pkcs11 init --pkcs11-key-label {label}`",
                    self.cfg.token_label
                )));
            }
            more => {
                return Err(Error::Config(format!(
                    "{} secret keys are labelled {label:?} on token {:?}; key labels must be unique (relabel or delete the extras)",
                    more.len(),
                    self.cfg.token_label
                )));
            }
        };
        let attributes = lease
            .session
            .get_attributes(handle, &[AttributeType::Id, AttributeType::KeyType])
            .map_err(|e| classify("read key attributes", e))?;
        let mut id = None;
        let mut aes = false;
        for attribute in attributes {
            match attribute {
                Attribute::Id(value) => id = Some(value),
                Attribute::KeyType(kind) => aes = kind == KeyType::AES,
                _ => {}
            }
        }
        if !aes {
            return Err(Error::Config(format!(
                "the key labelled {label:?} is not an AES key; kleidi needs AES-256 (kleidi pkcs11 init creates one)"
            )));
        }
        let key_id = key_id_for(label, id.as_deref())?;
        if let Some(id) = id {
            self.state().keys.insert((label.clone(), id), handle);
        }
        Ok(CurrentKey { handle, key_id })
    }

    /// The handle of the key with this label and CKA_ID, cached.
    fn key_handle(&self, lease: &Lease, label: &str, id: &[u8], key_id: &str) -> Result<ObjectHandle> {
        let name = (label.to_owned(), id.to_vec());
        if let Some(handle) = self.state().keys.get(&name) {
            return Ok(*handle);
        }
        // Only keys that can do what the ciphertext needs: a key_id naming anything else (another
        // key type, CKA_DECRYPT false) is the caller's bad input, not a broken backend.
        let mut template = secret_key(label).to_vec();
        template.extend([
            Attribute::Id(id.to_vec()),
            Attribute::KeyType(KeyType::AES),
            Attribute::Decrypt(true),
        ]);
        let found = lease
            .session
            .find_objects(&template)
            .map_err(|e| classify("find key", e))?;
        match found.as_slice() {
            [handle] => {
                self.state().keys.insert(name, *handle);
                Ok(*handle)
            }
            [] => {
                self.confirm_token(lease.slot)?;
                Err(bad_ciphertext(format!(
                    "unknown key {}: token {:?} has no AES key that may decrypt with that label and CKA_ID",
                    shown(key_id),
                    self.cfg.token_label
                )))
            }
            more => Err(bad_ciphertext(format!(
                "key {} is ambiguous: {} AES keys on token {:?} share that label and CKA_ID",
                shown(key_id),
                more.len(),
                self.cfg.token_label
            ))),
        }
    }

    fn encrypt(&self, lease: &Lease, plaintext: &SecretSlice<u8>) -> Result<Encrypted> {
        let current = self.state().current.clone();
        let key = match current {
            Some(key) => key,
            None => {
                let key = self.find_current(lease)?;
                self.state().current = Some(key.clone());
                key
            }
        };
        let mut iv = [0u8; IV_LEN];
        rand::rng().fill_bytes(&mut iv);
        let sealed = {
            let params = GcmParams::new(&mut iv, key.key_id.as_bytes(), TAG_BITS.into())
                .map_err(|e| classify("encrypt", e))?;
            lease
                .session
                .encrypt(&Mechanism::AesGcm(params), key.handle, plaintext.expose_secret())
                .map_err(|e| classify("encrypt", e))?
        };
        if sealed.len() != plaintext.expose_secret().len() + TAG_LEN {
            return Err(Error::Backend(format!(
                "C_Encrypt (AES-GCM) returned {} bytes for {} bytes of plaintext",
                sealed.len(),
                plaintext.expose_secret().len()
            )));
        }
        // `iv` is read after C_Encrypt: a token that writes its own IV into the parameters (some
        // FIPS-mode HSMs do) still gets the right one stored.
        let mut ciphertext = Vec::with_capacity(HEADER_LEN + sealed.len());
        ciphertext.push(VERSION);
        ciphertext.extend_from_slice(&iv);
        ciphertext.extend_from_slice(&sealed);
        Ok(Encrypted {
            ciphertext,
            key_id: key.key_id,
            annotations: Annotations::from([(FORMAT_ANNOTATION.to_owned(), FORMAT.as_bytes().to_vec())]),
        })
    }

    fn decrypt(
        &self,
        lease: &Lease,
        label: &str,
        id: &[u8],
        key_id: &str,
        mut iv: [u8; IV_LEN],
        body: &[u8],
    ) -> Result<SecretSlice<u8>> {
        let handle = self.key_handle(lease, label, id, key_id)?;
        let params = GcmParams::new(&mut iv, key_id.as_bytes(), TAG_BITS.into())
            .map_err(|e| classify("decrypt", e))?;
        match lease.session.decrypt(&Mechanism::AesGcm(params), handle, body) {
            Ok(plain) => {
                let plain = Zeroizing::new(plain);
                // An exact-size copy: the returned Vec may have spare capacity, and shrinking it in
                // place could leave plaintext in freed memory; `plain` is zeroized on drop.
                Ok(SecretSlice::from(plain.to_vec()))
            }
            Err(CkError::Pkcs11(RvError::GeneralError, Function::Decrypt)) => {
                // SoftHSM's answer to a failed GCM tag check (measured) — or a lost token.
                self.confirm_token(lease.slot)?;
                Err(bad_ciphertext(format!(
                    "authentication failed under {}: the ciphertext, its IV or its key_id was altered, or another key wrapped it",
                    shown(key_id)
                )))
            }
            Err(e) => Err(classify("decrypt", e)),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let life = self.module.read();
        let st = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let sessions = std::mem::take(&mut st.idle);
        if st.generation == life.generation {
            for session in sessions {
                let _ = session.close();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// `kleidi pkcs11 init`.
// ---------------------------------------------------------------------------------------------

/// `kleidi pkcs11 init`, idempotent: initializes a token labelled `token_label` on a free slot
/// (SO PIN from `so_pin_file`) if none exists, sets the user PIN (from `pin_file`) if the token has
/// none, then generates the AES-256 key `key_label` (random 16-byte CKA_ID; token, private,
/// sensitive, not extractable, encrypt/decrypt only) if no key has that label.
pub async fn init(cfg: &Pkcs11Config, so_pin_file: &Path) -> Result<InitOutcome> {
    validate(cfg)?;
    let cfg = cfg.clone();
    let so_pin_file = so_pin_file.to_owned();
    tokio::task::spawn_blocking(move || init_blocking(&cfg, &so_pin_file))
        .await
        .map_err(join_error)?
}

fn init_blocking(cfg: &Pkcs11Config, so_pin_file: &Path) -> Result<InitOutcome> {
    let module = Module::get(&cfg.module)?;
    let _serial = lock(&module.init_lock);
    // Held for the whole init: no reload can invalidate the slot or sessions below, which are
    // declared later and so dropped (closed) before it.
    let _life = module.read();
    let ctx = &module.ctx;
    let pin = read_pin(&cfg.pin_file, "PIN")?;

    let find = |label: &str| -> Result<Option<Slot>> {
        for slot in ctx
            .get_slots_with_token()
            .map_err(|e| classify("list slots", e))?
        {
            if let Ok(info) = ctx.get_token_info(slot) {
                if info.label() == label {
                    return Ok(Some(slot));
                }
            }
        }
        Ok(None)
    };

    let (slot, token_created) = match find(&cfg.token_label)? {
        Some(slot) => (slot, false),
        None => {
            let free = ctx
                .get_slots_with_token()
                .map_err(|e| classify("list slots", e))?
                .into_iter()
                .find(|slot| {
                    ctx.get_token_info(*slot)
                        .is_ok_and(|info| !info.token_initialized())
                })
                .ok_or_else(|| {
                    Error::Config(format!(
                        "no token labelled {:?} and no free slot to initialize one in {}",
                        cfg.token_label,
                        module.path.display()
                    ))
                })?;
            let so_pin = text_pin(&read_pin(so_pin_file, "SO PIN")?, "SO PIN")?;
            ctx.init_token(free, &so_pin, &cfg.token_label)
                .map_err(|e| classify("initialize token", e))?;
            // SoftHSM moves a freshly initialized token to a new slot number: look it up again.
            let slot = find(&cfg.token_label)?.ok_or_else(|| {
                Error::Backend(format!(
                    "token {:?} was initialized but is not listed",
                    cfg.token_label
                ))
            })?;
            tracing::info!(backend = BACKEND, token = %cfg.token_label, slot = slot.id(), "initialized token");
            (slot, true)
        }
    };

    let info = ctx.get_token_info(slot).map_err(|e| classify("token info", e))?;
    if !info.user_pin_initialized() {
        let so_pin = text_pin(&read_pin(so_pin_file, "SO PIN")?, "SO PIN")?;
        let session = ctx
            .open_rw_session(slot)
            .map_err(|e| classify("open session", e))?;
        session
            .login(UserType::So, Some(&so_pin))
            .map_err(|e| classify("login as SO", e))?;
        session
            .init_pin(&text_pin(&pin, "PIN")?)
            .map_err(|e| classify("set user PIN", e))?;
        let _ = session.logout();
        tracing::info!(backend = BACKEND, token = %cfg.token_label, "set the user PIN");
    }

    let session = ctx
        .open_rw_session(slot)
        .map_err(|e| classify("open session", e))?;
    match session.login_with_raw(UserType::User, &raw_pin(&pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => return Err(classify("login", e)),
    }
    let found = session
        .find_objects(&secret_key(&cfg.key_label))
        .map_err(|e| classify("find key", e))?;
    let (key_id, key_created) = match found.as_slice() {
        [] => {
            let mut id = [0u8; KEY_ID_BYTES];
            rand::rng().fill_bytes(&mut id);
            session
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::ValueLen(32.into()),
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                        Attribute::Label(cfg.key_label.as_bytes().to_vec()),
                        Attribute::Id(id.to_vec()),
                    ],
                )
                .map_err(|e| classify("generate key", e))?;
            let key_id = key_id_for(&cfg.key_label, Some(&id))?;
            tracing::info!(backend = BACKEND, token = %cfg.token_label, key_id = %key_id, "generated key");
            (key_id, true)
        }
        [handle] => {
            let id = session
                .get_attributes(*handle, &[AttributeType::Id])
                .map_err(|e| classify("read key attributes", e))?
                .into_iter()
                .find_map(|a| match a {
                    Attribute::Id(id) => Some(id),
                    _ => None,
                });
            (key_id_for(&cfg.key_label, id.as_deref())?, false)
        }
        more => {
            return Err(Error::Config(format!(
                "{} secret keys are labelled {:?} on token {:?}; key labels must be unique",
                more.len(),
                cfg.key_label,
                cfg.token_label
            )));
        }
    };
    Ok(InitOutcome {
        token_created,
        key_created,
        key_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotated() -> Annotations {
        Annotations::from([(FORMAT_ANNOTATION.to_owned(), FORMAT.as_bytes().to_vec())])
    }

    #[test]
    fn key_ids_round_trip_and_split_on_the_last_colon() {
        let key_id = key_id_for("team:a:kek", Some(&[0xab, 0x01])).unwrap();
        assert_eq!(key_id, "pkcs11:team:a:kek:ab01");
        assert_eq!(parse_key_id(&key_id), Some(("team:a:kek", vec![0xab, 0x01])));
    }

    #[test]
    fn malformed_key_ids_are_refused() {
        for bad in [
            "",
            "pkcs11:",
            "pkcs11:kek",
            "pkcs11::ab",
            "pkcs11:kek:",
            "pkcs11:kek:zz",
            "pkcs11:kek:AB",
            "pkcs11:kek:abc",
            "vault:v1:kek:ab",
        ] {
            assert_eq!(parse_key_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_key_without_cka_id_is_a_config_error_saying_how_to_fix_it() {
        for id in [None, Some(&[][..])] {
            let err = key_id_for("kek", id).unwrap_err();
            assert!(matches!(err, Error::Config(_)));
            assert!(err.to_string().contains("CKA_ID"), "{err}");
            assert!(err.to_string().contains("kleidi pkcs11 init"), "{err}");
        }
    }

    #[test]
    fn return_codes_map_to_stable_classes() {
        let c = |rv| classify("op", CkError::Pkcs11(rv, Function::Encrypt));
        for rv in [
            RvError::DeviceRemoved,
            RvError::TokenNotPresent,
            RvError::SessionHandleInvalid,
            RvError::ObjectHandleInvalid,
            RvError::GeneralError,
            RvError::DeviceError,
        ] {
            assert_eq!(c(rv).class(), "token_lost", "{rv:?}");
            assert!(is_lost(&c(rv)));
        }
        assert_eq!(c(RvError::PinIncorrect).class(), "pin_incorrect");
        assert_eq!(c(RvError::PinLocked).class(), "pin_locked");
        assert!(matches!(c(RvError::PinIncorrect), Error::Denied { .. }));
        assert!(matches!(
            c(RvError::EncryptedDataInvalid),
            Error::BadCiphertext(_)
        ));
        assert!(matches!(
            c(RvError::EncryptedDataLenRange),
            Error::BadCiphertext(_)
        ));
        assert!(matches!(c(RvError::DataLenRange), Error::InvalidRequest(_)));
        assert!(matches!(c(RvError::MechanismInvalid), Error::Config(_)));
        let detail = c(RvError::ObjectHandleInvalid).to_string();
        assert!(
            detail.contains("op: C_Encrypt returned CKR_OBJECT_HANDLE_INVALID"),
            "{detail}"
        );
    }

    #[test]
    fn layout_is_checked_before_the_token() {
        let good = [vec![VERSION], vec![0; IV_LEN], vec![0; 32 + TAG_LEN]].concat();
        assert!(split_ciphertext(&annotated(), &good).is_ok());
        let mut wrong_version = good.clone();
        wrong_version[0] = 2;
        assert!(split_ciphertext(&annotated(), &wrong_version).is_err());
        assert!(split_ciphertext(&annotated(), &good[..HEADER_LEN + TAG_LEN]).is_err());
        assert!(split_ciphertext(&annotated(), &[]).is_err());
        assert!(split_ciphertext(&Annotations::new(), &good).is_err());
        let other = Annotations::from([(FORMAT_ANNOTATION.to_owned(), b"tpm-v9".to_vec())]);
        let err = split_ciphertext(&other, &good).unwrap_err().to_string();
        assert!(err.contains("tpm-v9"), "{err}");
    }

    #[test]
    fn pin_files_lose_exactly_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        for (content, pin) in [
            (&b"1234\n"[..], &b"1234"[..]),
            (b"1234", b"1234"),
            (b"1234\r\n", b"1234"),
            (b"12 34\n\n", b"12 34\n"),
        ] {
            std::fs::write(&path, content).unwrap();
            assert_eq!(&*read_pin(&path, "PIN").unwrap(), pin);
        }
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(read_pin(&path, "PIN"), Err(Error::Config(_))));
    }
}
