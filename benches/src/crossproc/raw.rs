//! The raw side: each backend's operation in this process with its own client library, nothing of
//! kleidi's. PKCS#11: C_Encrypt / C_Decrypt (AES-GCM) on one logged-in session per caller.
//! OpenBao: vaultrs transit encrypt / decrypt on one shared client. TPM: kleidi's own device layer
//! (`kleidi::backend::tpm::RawConnection`: the TPM commands of one seal or unseal, nothing above
//! them) on one connection to a swtpm of its own.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use kleidi::backend::tpm::{RawConnection, RawSealed, TpmConfig};
use vaultrs::client::VaultClient;
use vaultrs::transit::data;

use super::measure::{Conc, Hist, Method, SEED};

/// A loaded PKCS#11 module and the slot of the bench's token.
pub struct RawHsm {
    ctx: Pkcs11,
    slot: Slot,
    key_label: String,
    pin: String,
}

impl RawHsm {
    /// Loads `module` (reads SOFTHSM2_CONF of this process) and finds the token `token_label`.
    pub fn open(module: &str, token_label: &str, key_label: &str, pin: &str) -> anyhow::Result<Self> {
        let ctx = Pkcs11::new(module)?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(e.into()),
        }
        let mut found = None;
        for slot in ctx.get_slots_with_token()? {
            if ctx.get_token_info(slot)?.label() == token_label {
                found = Some(slot);
            }
        }
        let slot = found.with_context(|| format!("no token {token_label:?}"))?;
        Ok(Self {
            ctx,
            slot,
            key_label: key_label.into(),
            pin: pin.into(),
        })
    }

    /// A logged-in session with the key's handle.
    pub fn session(&self) -> anyhow::Result<RawSession> {
        let session = self.ctx.open_rw_session(self.slot)?;
        // Login is per application: the second session finds the user logged in already.
        match session.login(UserType::User, Some(&AuthPin::new(self.pin.as_str().into()))) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => return Err(e.into()),
        }
        let key = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(self.key_label.as_bytes().to_vec()),
            ])?
            .into_iter()
            .next()
            .with_context(|| format!("no key {:?}", self.key_label))?;
        Ok(RawSession {
            session,
            key,
            counter: 0,
        })
    }

    /// `callers` threads, each on its own session, making `total / callers` C_Decrypts.
    pub fn concurrent_decrypt(&self, callers: u64, total: u64) -> anyhow::Result<Conc> {
        let each = (total / callers).max(1);
        let sessions = (0..callers)
            .map(|_| {
                let mut s = self.session()?;
                let (iv, ct) = s.encrypt()?;
                Ok((s, iv, ct))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(threads(callers, each, sessions, |(s, iv, ct)| {
            s.sequential_decrypt(&iv, &ct, each)
        }))
    }
}

/// One logged-in session and the key handle.
pub struct RawSession {
    session: Session,
    key: ObjectHandle,
    counter: u64,
}

impl RawSession {
    /// C_Encrypt of [`SEED`] under a fresh IV (a counter; the backend draws random ones).
    pub fn encrypt(&mut self) -> anyhow::Result<([u8; 12], Vec<u8>)> {
        self.seal(&SEED)
    }

    /// C_Encrypt of `plain` under a fresh IV.
    pub fn seal(&mut self, plain: &[u8]) -> anyhow::Result<([u8; 12], Vec<u8>)> {
        self.counter += 1;
        let mut iv = [0u8; 12];
        iv[..8].copy_from_slice(&self.counter.to_le_bytes());
        let params = GcmParams::new(&mut iv, b"", 128.into())?;
        let ct = self
            .session
            .encrypt(&Mechanism::AesGcm(params), self.key, plain)?;
        Ok((iv, ct))
    }

    /// C_Decrypt of `ct` under `iv`; true when it gives [`SEED`] back.
    pub fn decrypt(&self, iv: &[u8; 12], ct: &[u8]) -> bool {
        self.open(iv, ct).is_ok_and(|p| p == SEED)
    }

    /// C_Decrypt of `ct` under `iv`.
    pub fn open(&self, iv: &[u8; 12], ct: &[u8]) -> anyhow::Result<Vec<u8>> {
        let mut iv = *iv;
        let params = GcmParams::new(&mut iv, b"", 128.into())?;
        Ok(self.session.decrypt(&Mechanism::AesGcm(params), self.key, ct)?)
    }

    fn sequential_decrypt(&self, iv: &[u8; 12], ct: &[u8], n: u64) -> Hist {
        let mut hist = Hist::new();
        for _ in 0..n {
            let start = Instant::now();
            let ok = self.decrypt(iv, ct);
            hist.record(start.elapsed(), ok);
        }
        hist
    }

    /// `n` sequential calls of Encrypt or Decrypt.
    pub fn sequential(&mut self, method: Method, n: u64) -> anyhow::Result<Hist> {
        let (iv, ct) = self.encrypt()?;
        if method == Method::Decrypt {
            return Ok(self.sequential_decrypt(&iv, &ct, n));
        }
        let mut hist = Hist::new();
        for _ in 0..n {
            let start = Instant::now();
            let ok = self.encrypt().is_ok();
            hist.record(start.elapsed(), ok);
        }
        Ok(hist)
    }
}

/// vaultrs transit against the bench's OpenBao, key `key` on mount `transit`.
pub struct RawVault {
    client: Arc<VaultClient>,
    key: String,
}

impl RawVault {
    /// Wraps a client.
    pub fn new(client: VaultClient, key: &str) -> Self {
        Self {
            client: Arc::new(client),
            key: key.into(),
        }
    }

    /// One transit encrypt of [`SEED`].
    pub async fn encrypt(&self) -> anyhow::Result<String> {
        self.seal(&SEED).await
    }

    /// One transit encrypt of `plain`.
    pub async fn seal(&self, plain: &[u8]) -> anyhow::Result<String> {
        Ok(
            data::encrypt(&*self.client, "transit", &self.key, &B64.encode(plain), None)
                .await?
                .ciphertext,
        )
    }

    /// One transit decrypt of `ct`; true when it gives [`SEED`] back.
    pub async fn decrypt(&self, ct: &str) -> bool {
        self.open(ct).await.is_ok_and(|p| p == SEED)
    }

    /// One transit decrypt of `ct`.
    pub async fn open(&self, ct: &str) -> anyhow::Result<Vec<u8>> {
        let r = data::decrypt(&*self.client, "transit", &self.key, ct, None).await?;
        Ok(B64.decode(r.plaintext)?)
    }

    async fn sequential_decrypt(&self, ct: &str, n: u64) -> Hist {
        let mut hist = Hist::new();
        for _ in 0..n {
            let start = Instant::now();
            let ok = self.decrypt(ct).await;
            hist.record(start.elapsed(), ok);
        }
        hist
    }

    /// `n` sequential calls of Encrypt or Decrypt.
    pub async fn sequential(&self, method: Method, n: u64) -> anyhow::Result<Hist> {
        let ct = self.encrypt().await?;
        if method == Method::Decrypt {
            return Ok(self.sequential_decrypt(&ct, n).await);
        }
        let mut hist = Hist::new();
        for _ in 0..n {
            let start = Instant::now();
            let ok = self.encrypt().await.is_ok();
            hist.record(start.elapsed(), ok);
        }
        Ok(hist)
    }

    /// `callers` tasks on the one client, each making `total / callers` decrypts of a ciphertext of
    /// its own (as the kleidi side does). Run on a multi-thread runtime.
    pub async fn concurrent_decrypt(self: &Arc<Self>, callers: u64, total: u64) -> anyhow::Result<Conc> {
        let mut cts = Vec::with_capacity(callers as usize);
        for _ in 0..callers {
            cts.push(self.encrypt().await?);
        }
        let each = (total / callers).max(1);
        let start = Instant::now();
        let tasks: Vec<_> = cts
            .into_iter()
            .map(|ct| {
                let me = self.clone();
                tokio::spawn(async move { me.sequential_decrypt(&ct, each).await })
            })
            .collect();
        let hist = Hist::gather(tasks, each).await;
        Ok(Conc::new(callers, &hist, start.elapsed()))
    }
}

/// The TPM commands kleidi's tpm backend makes, on one connection: Encrypt = TPM2_Create of a data
/// object under the KEK; Decrypt = TPM2_Load + TPM2_Unseal (+ flush); both in the connection's
/// salted HMAC session with parameter encryption. Taken from kleidi rather than re-implemented, so
/// the baseline cannot drift from what the backend sends.
///
/// swtpm serves one connection at a time (a second one waits until the first closes) and a TPM
/// runs one command at a time, so concurrent callers share this one connection behind a mutex, as
/// kleidi's backend does: that is the raw concurrent ceiling.
pub struct RawTpm {
    conn: Mutex<RawConnection>,
}

impl RawTpm {
    /// Connects to the TPM of `cfg` and takes the current KEK of its state directory.
    pub fn open(cfg: &TpmConfig) -> anyhow::Result<Self> {
        Ok(Self {
            conn: Mutex::new(RawConnection::open(cfg)?),
        })
    }

    fn lock(&self) -> MutexGuard<'_, RawConnection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn decrypt(&self, sealed: &RawSealed) -> bool {
        self.lock().unseal(sealed).is_ok_and(|p| p.as_slice() == SEED)
    }

    fn sequential_decrypt(&self, sealed: &RawSealed, n: u64) -> Hist {
        let mut hist = Hist::new();
        for _ in 0..n {
            let start = Instant::now();
            let ok = self.decrypt(sealed);
            hist.record(start.elapsed(), ok);
        }
        hist
    }

    /// `n` sequential seals or unseals (the first seal also loads the KEK; it is not timed).
    pub fn sequential(&self, method: Method, n: u64) -> anyhow::Result<Hist> {
        let sealed = self.lock().seal(&SEED)?;
        if method == Method::Decrypt {
            return Ok(self.sequential_decrypt(&sealed, n));
        }
        let mut hist = Hist::new();
        for _ in 0..n {
            let start = Instant::now();
            let ok = self.lock().seal(&SEED).is_ok();
            hist.record(start.elapsed(), ok);
        }
        Ok(hist)
    }

    /// `callers` threads, each unsealing a sealed seed of its own `total / callers` times, all on the
    /// one connection (each call waits for the mutex, as each kleidi call waits for the TPM).
    pub fn concurrent_decrypt(&self, callers: u64, total: u64) -> anyhow::Result<Conc> {
        let each = (total / callers).max(1);
        let sealed = (0..callers)
            .map(|_| Ok(self.lock().seal(&SEED)?))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(threads(callers, each, sealed, |s| {
            self.sequential_decrypt(&s, each)
        }))
    }
}

/// One thread per item, each running `caller` on it (`each` calls), timed together; a thread that
/// panicked counts all its calls as errors.
fn threads<I: Send>(callers: u64, each: u64, items: Vec<I>, caller: impl Fn(I) -> Hist + Sync) -> Conc {
    let start = Instant::now();
    let hists: Vec<Hist> = std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .into_iter()
            .map(|item| {
                let caller = &caller;
                scope.spawn(move || caller(item))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    let mut failed = Hist::new();
                    failed.errors = each;
                    failed
                })
            })
            .collect()
    });
    let wall = start.elapsed();
    let mut hist = Hist::new();
    hists.iter().for_each(|h| hist.merge(h));
    Conc::new(callers, &hist, wall)
}
