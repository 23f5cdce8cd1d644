//! TPM 2.0 backend: the key-encryption key is a storage key created inside the TPM; only its
//! TPM-wrapped blobs leave it, into `--tpm-state-dir`.
//!
//! **Mechanism: sealing.** Each seed is sealed as a TPM data object (keyed hash, null scheme) under
//! the KEK: TPM2_Create with the seed as sensitive data; the ciphertext is the object's public and
//! private areas. Decrypt is TPM2_Load under the same KEK, then TPM2_Unseal. Chosen over
//! TPM2_EncryptDecrypt because that command is optional (many hardware TPMs lack it) and the TPM
//! has no AEAD mode, while Create/Load/Unseal are mandatory everywhere. Integrity comes from the
//! TPM itself: the private area carries an HMAC, keyed from the KEK's secret seed, over the
//! encrypted sensitive area and the object's Name (a hash of the public area). Any altered byte,
//! or a sealed seed presented under another KEK, fails TPM2_Load (TPM_RC_INTEGRITY and friends)
//! and becomes `BadCiphertext`, never garbage. Cost: 32 bytes in → about 200 bytes out (checked
//! against the apiserver's 1024), and at most [`MAX_PLAINTEXT`] (128) bytes per seal, which covers
//! KMS v2 seeds and v1 DEKs (32 bytes).
//!
//! **Keys.** The primary is the TCG SRK shape (ECC P-256) in the owner hierarchy: deterministic,
//! re-created on every connect, never stored. The KEK (ECC P-256 storage key, fixedTPM,
//! fixedParent, noDA) is made by `kleidi tpm init`; every init makes a new current key and keeps
//! the older ones for Decrypt. key_id = `tpm:<hex Name>`, the Name being SHA-256 of the public
//! area: public, stable across restarts, new for every key. `kleidi tpm init --shareable` makes a
//! KEK that admin-approved nodes can import, wrapped TPM to TPM (`share`: design and threat model).
//!
//! **Sessions.** Every command that carries a seed runs in an HMAC session salted to the primary
//! with parameter encryption, so seeds cross the bus to a discrete TPM encrypted.
//!
//! **Concurrency.** An ESAPI `Context` is `Send` but not `Sync`, and its session carries rolling
//! nonces, so commands must not interleave: one mutex guards the connection. Callers wait for
//! their turn in a first-come queue and only then take a `spawn_blocking` thread, so a caller that
//! times out in the queue costs no thread and no TPM time. A TPM executes one command at a time
//! anyway, so a pool would only queue inside the TPM. Status costs no TPM command:
//! `current_key_id` reads the state directory (which also makes a rotation by `kleidi tpm init`
//! visible without a restart); the health layer's cached probe is what exercises the TPM.
//!
//! **Faults.** A connection failure or a TPM that forgot our handles (restarted) drops the
//! connection; the call is retried once on a fresh one (new context, primary, session, KEK load),
//! so a restarted TPM costs no failed call. A KEK that no longer loads (TPM cleared, state lost)
//! is `Unavailable` class `key_lost` naming the key; nothing is re-created. A refused owner auth
//! (or a TPM in lockout) is `Denied` and remembered: the same auth is not presented again until
//! `--tpm-owner-auth-file` changes.

mod approval;
mod device;
mod errors;
pub(crate) mod format;
mod share;
mod state;

pub use self::share::{admin_key, approve, export, export_parent, import, init_shareable};

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretSlice};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use self::device::Connection;
use self::errors::{BACKEND, needs_reconnect};
use self::format::Blob;
pub use self::format::{MAX_PLAINTEXT, VERSION};
use super::FORMAT_ANNOTATION;
use crate::logging::Client;
use crate::service::{Annotations, Encrypted, KeyService};
use crate::{Error, Result};

/// Value of the [`FORMAT_ANNOTATION`] annotation on every ciphertext this backend writes.
pub const FORMAT: &str = "tpm-sealed-v1";

/// Where the TPM is and where its wrapped keys live. Nothing here is secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TpmConfig {
    /// TCTI: `device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`, `tabrmd:`…
    pub tcti: String,
    /// Directory of the TPM-wrapped KEK blobs and the `current` pointer.
    pub state_dir: PathBuf,
    /// File holding the owner hierarchy's auth value; none = empty auth (the TPM default).
    pub owner_auth_file: Option<PathBuf>,
}

/// Wraps seeds by sealing them under a KEK inside a TPM.
pub struct TpmBackend {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: TpmConfig,
    /// Callers queue here, first come first served, before they take a blocking thread: the TPM runs
    /// one command at a time, and a caller that gives up (the call timeout) leaves the queue without
    /// having used a thread or a turn. Waiting on `tpm` itself instead parks one blocking thread
    /// per caller on an unfair lock (64 callers: 3 s tails and 67 threads).
    turn: Arc<tokio::sync::Semaphore>,
    tpm: Mutex<Tpm>,
    keys: Mutex<state::Keyring>,
}

#[derive(Default)]
struct Tpm {
    conn: Option<Connection>,
    /// The fingerprint of an owner auth the TPM refused, with the refusal.
    denied: Option<([u8; 32], Error)>,
}

impl std::fmt::Debug for TpmBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmBackend")
            .field("cfg", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

impl TpmBackend {
    /// Reads the state directory (which must hold a current key: `kleidi tpm init`) and tries the
    /// TPM once. A TPM that is down, or that lost the key, does not stop kleidi: calls answer
    /// `Unavailable` with the reason until it is back.
    pub async fn connect(cfg: TpmConfig) -> Result<Self> {
        validate(&cfg)?;
        let ring = state::read(&cfg.state_dir)?;
        let current = ring.current.clone().ok_or_else(|| {
            Error::Config(format!(
                "{} holds no TPM key; create one with `kleidi tpm init`",
                cfg.state_dir.display()
            ))
        })?;
        let inner = Arc::new(Inner {
            cfg,
            turn: Arc::new(tokio::sync::Semaphore::new(1)),
            tpm: Mutex::new(Tpm::default()),
            keys: Mutex::new(ring),
        });
        let probe = Arc::clone(&inner);
        let loaded = blocking(move || probe.with_tpm(|conn, keys| conn.warm(&current, keys))).await;
        match loaded {
            Ok(()) => tracing::info!(backend = BACKEND, "tpm: current key loaded"),
            Err(err) => {
                tracing::warn!(backend = BACKEND, class = err.class(), error = %err, "tpm: not usable yet; serving")
            }
        }
        Ok(Self { inner })
    }
}

#[async_trait]
impl KeyService for TpmBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn encrypt(&self, _uid: &str, plaintext: &SecretSlice<u8>) -> Result<Encrypted> {
        let len = plaintext.expose_secret().len();
        if len == 0 || len > MAX_PLAINTEXT {
            return Err(Error::InvalidRequest(format!(
                "plaintext is {len} bytes; the tpm backend seals 1 to {MAX_PLAINTEXT}"
            )));
        }
        let seed = Zeroizing::new(plaintext.expose_secret().to_vec());
        let inner = Arc::clone(&self.inner);
        in_turn(&self.inner, move || {
            let key_id = match lock(&inner.keys).current.clone() {
                Some(key_id) => key_id,
                None => inner.refresh_current()?,
            };
            let sealed = inner.with_tpm(|conn, keys| conn.seal(&key_id, kek(keys, &key_id)?, &seed))?;
            Ok(Encrypted {
                ciphertext: format::seal_ciphertext(&sealed)?,
                key_id,
                annotations: Annotations::from([(FORMAT_ANNOTATION.to_owned(), FORMAT.as_bytes().to_vec())]),
            })
        })
        .await
    }

    async fn decrypt(&self, _uid: &str, encrypted: &Encrypted) -> Result<SecretSlice<u8>> {
        match encrypted.annotations.get(FORMAT_ANNOTATION) {
            Some(f) if f.as_slice() == FORMAT.as_bytes() => {}
            Some(f) => {
                return Err(Error::BadCiphertext(format!(
                    "{FORMAT_ANNOTATION} is {:?}; the tpm backend reads {FORMAT}",
                    Client(&String::from_utf8_lossy(f))
                )));
            }
            None => {
                return Err(Error::BadCiphertext(format!(
                    "no {FORMAT_ANNOTATION} annotation: not written by the tpm backend"
                )));
            }
        }
        let key_id = encrypted.key_id.clone();
        if format::parse_key_id(&key_id).is_none() {
            return Err(Error::BadCiphertext(format!(
                "key_id {} is not a tpm key_id (tpm:<hex Name>)",
                Client(&key_id)
            )));
        }
        let sealed = format::open_ciphertext(&encrypted.ciphertext).ok_or_else(|| {
            Error::BadCiphertext("the ciphertext is not a sealed seed of this format".into())
        })?;
        let inner = Arc::clone(&self.inner);
        in_turn(&self.inner, move || {
            if !lock(&inner.keys).keys.contains_key(&key_id) {
                // A key made by `kleidi tpm init` after this process read the directory.
                let ring = state::read(&inner.cfg.state_dir)?;
                *lock(&inner.keys) = ring;
            }
            let plain =
                inner.with_tpm(|conn, keys| conn.unseal(&key_id, kek(keys, &key_id)?, sealed.clone()))?;
            Ok(SecretSlice::from(plain.to_vec()))
        })
        .await
    }

    async fn current_key_id(&self) -> Result<String> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.refresh_current()).await
    }

    /// The key_id comes from the state directory: reading it tells nothing about the TPM.
    fn key_id_reaches_backend(&self) -> bool {
        false
    }

    async fn describe(&self) -> Vec<(&'static str, String)> {
        let cfg = &self.inner.cfg;
        let (current, keys) = {
            let ring = lock(&self.inner.keys);
            (ring.current.clone(), ring.keys.len())
        };
        vec![
            ("tcti", cfg.tcti.clone()),
            ("state_dir", cfg.state_dir.display().to_string()),
            ("current_key", current.unwrap_or_else(|| "none".into())),
            ("keys_in_state_dir", keys.to_string()),
            (
                "owner_auth",
                match &cfg.owner_auth_file {
                    Some(file) => format!("from {}", file.display()),
                    None => "empty (the TPM default)".into(),
                },
            ),
        ]
    }
}

impl Inner {
    /// Re-reads `current` (a file read, no TPM command); re-reads the keys if it names a new one.
    fn refresh_current(&self) -> Result<String> {
        let current = state::read_current(&self.cfg.state_dir)?.ok_or_else(|| {
            Error::Config(format!(
                "{}/current is gone; kleidi never creates keys by itself (`kleidi tpm init`)",
                self.cfg.state_dir.display()
            ))
        })?;
        let mut keys = lock(&self.keys);
        if !keys.keys.contains_key(&current) {
            *keys = state::read(&self.cfg.state_dir)?;
        }
        keys.current = Some(current.clone());
        Ok(current)
    }

    /// Runs `op` on the connection, opening one if there is none. A failure that says the TPM
    /// or our handles are gone drops the connection and, if it was an older one, retries `op`
    /// once on a fresh connection.
    fn with_tpm<T>(&self, op: impl Fn(&mut Connection, &state::Keyring) -> Result<T>) -> Result<T> {
        let mut tpm = lock(&self.tpm);
        let reused = tpm.conn.is_some();
        let result = self.attempt(&mut tpm, &op);
        match result {
            Err(err) if needs_reconnect(&err) && reused && err.class() != "key_lost" => {
                tracing::info!(backend = BACKEND, class = err.class(), "tpm: reconnecting");
                self.attempt(&mut tpm, &op)
            }
            other => other,
        }
    }

    fn attempt<T>(
        &self,
        tpm: &mut Tpm,
        op: &impl Fn(&mut Connection, &state::Keyring) -> Result<T>,
    ) -> Result<T> {
        let conn = match &mut tpm.conn {
            Some(conn) => conn,
            slot @ None => {
                let auth = self.owner_auth()?;
                let seen: [u8; 32] = Sha256::digest(auth.as_slice()).into();
                if let Some((refused, err)) = &tpm.denied {
                    if *refused == seen {
                        return Err(again(err));
                    }
                }
                match Connection::open(&self.cfg.tcti, &auth) {
                    Ok(conn) => {
                        tpm.denied = None;
                        slot.insert(conn)
                    }
                    Err(err @ Error::Denied { .. }) => {
                        let answer = again(&err);
                        tpm.denied = Some((seen, err));
                        return Err(answer);
                    }
                    Err(err) => return Err(err),
                }
            }
        };
        let keys = lock(&self.keys);
        let result = op(conn, &keys);
        if result.as_ref().is_err_and(needs_reconnect) {
            tpm.conn = None;
        }
        result
    }

    fn owner_auth(&self) -> Result<Zeroizing<Vec<u8>>> {
        match &self.cfg.owner_auth_file {
            None => Ok(Zeroizing::new(Vec::new())),
            Some(path) => read_secret(path, OWNER_AUTH_FLAG),
        }
    }
}

/// A refusal repeated from memory, saying why the TPM was not asked again.
fn again(err: &Error) -> Error {
    match err {
        Error::Denied { class, detail, .. } => Error::Denied {
            backend: BACKEND,
            class,
            detail: format!(
                "{detail}; not presenting this owner auth again until --tpm-owner-auth-file changes"
            ),
        },
        other => Error::Backend(other.to_string()),
    }
}

impl Connection {
    fn warm(&mut self, key_id: &str, keys: &state::Keyring) -> Result<()> {
        self.seal(key_id, kek(keys, key_id)?, &[0u8; 32]).map(drop)
    }
}

fn kek<'k>(keys: &'k state::Keyring, key_id: &str) -> Result<&'k Blob> {
    keys.keys.get(key_id).ok_or_else(|| {
        Error::BadCiphertext(format!(
            "unknown key {}: no such key in the state directory",
            Client(key_id)
        ))
    })
}

/// `kleidi tpm init`: creates a new KEK in the TPM, stores its wrapped blobs and makes it current.
/// Older keys stay in the directory and keep decrypting. Returns the new key_id.
pub async fn init(cfg: &TpmConfig) -> Result<String> {
    validate(cfg)?;
    let cfg = cfg.clone();
    blocking(move || {
        let kek = open(&cfg)?.create_kek(format::kek_template()?)?;
        state::add_current(&cfg.state_dir, &kek)
    })
    .await
}

/// One connection for an administrative command (no reconnects, no remembered refusals).
fn open(cfg: &TpmConfig) -> Result<Connection> {
    let auth = match &cfg.owner_auth_file {
        None => Zeroizing::new(Vec::new()),
        Some(path) => read_secret(path, OWNER_AUTH_FLAG)?,
    };
    Connection::open(&cfg.tcti, &auth)
}

// Exists for the raw TPM baseline of kleidi-bench (benches/src/crossproc/raw.rs).
/// The device layer alone: one connection (primary, salted HMAC session with parameter encryption)
/// and the state directory's current KEK; seal and unseal exactly as the backend makes them, without
/// its mutex, reconnects, gRPC, guard or health layers. Not part of kleidi's API.
#[doc(hidden)]
pub struct RawConnection {
    conn: Connection,
    key_id: String,
    kek: Blob,
}

/// A seed sealed by [`RawConnection::seal`] (kleidi-bench only).
#[doc(hidden)]
#[derive(Clone)]
pub struct RawSealed(Blob);

impl RawConnection {
    /// Opens the TPM as `kleidi tpm init` does and takes the current KEK from the state directory.
    pub fn open(cfg: &TpmConfig) -> Result<Self> {
        validate(cfg)?;
        let ring = state::read(&cfg.state_dir)?;
        let key_id = ring
            .current
            .clone()
            .ok_or_else(|| Error::Config(format!("{} holds no TPM key", cfg.state_dir.display())))?;
        let kek = kek(&ring, &key_id)?.clone();
        Ok(Self {
            conn: open(cfg)?,
            key_id,
            kek,
        })
    }

    /// One Encrypt's TPM commands: TPM2_Create of the seed under the KEK (loading it on first use).
    pub fn seal(&mut self, seed: &[u8]) -> Result<RawSealed> {
        self.conn.seal(&self.key_id, &self.kek, seed).map(RawSealed)
    }

    /// One Decrypt's TPM commands: TPM2_Load of the sealed object, TPM2_Unseal, flush.
    pub fn unseal(&mut self, sealed: &RawSealed) -> Result<Zeroizing<Vec<u8>>> {
        self.conn.unseal(&self.key_id, &self.kek, sealed.0.clone())
    }
}

fn validate(cfg: &TpmConfig) -> Result<()> {
    if cfg.tcti.trim().is_empty() {
        return Err(Error::Config(
            "--tpm-tcti is required (device:/dev/tpmrm0, swtpm:host=127.0.0.1,port=2321)".into(),
        ));
    }
    Ok(())
}

/// The flag naming the owner auth file, for errors.
const OWNER_AUTH_FLAG: &str = "--tpm-owner-auth-file";

/// A secret file named by `flag` (refused if other users can read or change it, see
/// [`crate::credfile`]): one trailing newline is not part of the value.
fn read_secret(path: &Path, flag: &str) -> Result<Zeroizing<Vec<u8>>> {
    let mut bytes = crate::credfile::read(path, flag)?;
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    Ok(bytes)
}

/// Runs a TPM command sequence on a blocking thread once it is this caller's turn.
async fn in_turn<T: Send + 'static>(
    inner: &Inner,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let turn = Arc::clone(&inner.turn)
        .acquire_owned()
        .await
        .map_err(|_| Error::Backend("tpm call queue closed".into()))?;
    blocking(move || {
        let _turn = turn;
        f()
    })
    .await
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    // A blocking thread does not inherit the caller's span: carried over, so the TPM's lines name
    // the call (its uid) they were made for.
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(|e| Error::Backend(format!("tpm worker thread: {e}")))?
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn auth_files_other_users_can_read_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("owner-auth");
        std::fs::write(&path, "owner-secret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(&read_secret(&path, OWNER_AUTH_FLAG).unwrap()[..], b"owner-secret");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret(&path, OWNER_AUTH_FLAG).unwrap_err().to_string();
        assert!(
            err.contains("--tpm-owner-auth-file")
                && err.contains("mode 0644")
                && !err.contains("owner-secret"),
            "{err}"
        );
    }
}
