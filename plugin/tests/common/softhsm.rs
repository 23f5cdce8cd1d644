//! A SoftHSM2 token store for in-process tests of the pkcs11 backend.
//!
//! SoftHSM reads `SOFTHSM2_CONF` in `C_Initialize`, once per process (and on a module reload), so
//! there is one store per test process: `$CARGO_TARGET_TMPDIR/softhsm-XXXX/{softhsm2.conf,tokens/}`.
//! Each test makes its own token with a unique label, so tests share the store and run in parallel
//! under `cargo test`; under `cargo nextest` (a process per test) each gets a store of its own.
// Test support: a failed setup step should panic with its message.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "private.rs"]
mod private;

#[allow(unused_imports)] // not every test binary writes credential files
pub use private::write_private;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use kleidi::backend::pkcs11::{self, InitOutcome, Pkcs11Backend, Pkcs11Config};
use secrecy::SecretSlice;

pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const PIN: &str = "user-pin-3f9a61";
pub const SO_PIN: &str = "so-pin-77c1d0";

/// This process's token store.
pub struct Store {
    pub dir: PathBuf,
    pub tokens: PathBuf,
}

/// Creates the store and points `SOFTHSM2_CONF` at it, once per process, before any test loads
/// the module (every helper below goes through here first).
pub fn store() -> &'static Store {
    static STORE: OnceLock<Store> = OnceLock::new();
    STORE.get_or_init(|| {
        assert!(
            Path::new(MODULE).exists(),
            "{MODULE} is missing: these tests need a real SoftHSM2 token; install it with \
             `apt-get install softhsm2` (or `just deps`)"
        );
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        prune_old_stores(base);
        let dir = tempfile::Builder::new()
            .prefix("softhsm-")
            .tempdir_in(base)
            .unwrap()
            .keep();
        let tokens = dir.join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        set_softhsm2_conf(&conf);
        // The backend's log lines, shown for failing tests (or all with --nocapture);
        // KLEIDI_LOG filters them like `kleidi serve` does.
        let filter = tracing_subscriber::EnvFilter::try_from_env("KLEIDI_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("kleidi=info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
        Store { dir, tokens }
    })
}

// The workspace denies unsafe_code (instead of forbidding it) for exactly this call.
#[allow(unsafe_code)]
fn set_softhsm2_conf(conf: &Path) {
    // SAFETY: runs once, inside `store()`'s OnceLock, before any test of this process has loaded
    // the PKCS#11 module (the only reader of SOFTHSM2_CONF, via getenv in C_Initialize): every test
    // calls `store()` first and blocks on the OnceLock until this returns. Rust's own env accesses
    // on other test threads are serialized by std's environment lock.
    unsafe { std::env::set_var("SOFTHSM2_CONF", conf) };
}

/// Stores are kept for the life of their process (statics are never dropped); remove those
/// older than an hour so `target/` does not fill up.
fn prune_old_stores(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > Duration::from_secs(3600));
        if old && entry.file_name().to_string_lossy().starts_with("softhsm-") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A token of this test's own, with its PIN files in a temp dir.
pub struct Token {
    pub label: String,
    pub files: tempfile::TempDir,
}

impl Token {
    /// A token labelled `kt-<name>`; `name` must be unique among the tests of this binary.
    /// Nothing is created on the HSM until [`Token::init`].
    pub fn new(name: &str) -> Self {
        store();
        let label = format!("kt-{name}");
        assert!(label.len() <= 32, "token label {label:?} is over 32 bytes");
        let files = tempfile::tempdir().unwrap();
        write_private(&files.path().join("pin"), format!("{PIN}\n"));
        write_private(&files.path().join("so-pin"), SO_PIN);
        Token { label, files }
    }

    pub fn pin_file(&self) -> PathBuf {
        self.files.path().join("pin")
    }

    pub fn so_pin_file(&self) -> PathBuf {
        self.files.path().join("so-pin")
    }

    pub fn config(&self, key_label: &str) -> Pkcs11Config {
        Pkcs11Config {
            module: MODULE.into(),
            token_label: self.label.clone(),
            pin_file: self.pin_file(),
            key_label: key_label.into(),
        }
    }

    /// `kleidi pkcs11 init` for `key_label`.
    pub async fn init(&self, key_label: &str) -> InitOutcome {
        pkcs11::init(&self.config(key_label), &self.so_pin_file())
            .await
            .unwrap()
    }

    /// Inits `key_label` and connects a backend to it.
    pub async fn backend(&self, key_label: &str) -> Pkcs11Backend {
        self.init(key_label).await;
        Pkcs11Backend::connect(self.config(key_label)).await.unwrap()
    }
}

/// The directory SoftHSM keeps the token with this serial in: `<uuid>` under tokendir, whose
/// last 16 hex digits are the serial.
pub fn token_dir(serial: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(&store().tokens)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .replace('-', "")
                    .ends_with(serial)
        })
        .collect();
    assert_eq!(found.len(), 1, "token directories for serial {serial}: {found:?}");
    found.into_iter().next().unwrap()
}

/// A random 32-byte seed, as kube-apiserver sends.
pub fn seed() -> SecretSlice<u8> {
    use rand::RngCore;
    let mut s = vec![0u8; 32];
    rand::rng().fill_bytes(&mut s);
    SecretSlice::from(s)
}

/// Runs `make` on a read-write, logged-in session of the token labelled `label`, through a
/// cryptoki context of the test's own (SoftHSM is one library per process, so this shares the
/// backend's initialized module). Retried a few times: another test of this process may reload
/// the module (C_Finalize) under it.
pub fn with_admin_session<T>(
    label: &str,
    make: impl Fn(&cryptoki::session::Session) -> cryptoki::error::Result<T>,
) -> T {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::error::{Error as CkError, RvError};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    store();
    let ctx = Pkcs11::new(MODULE).unwrap();
    let mut last = None;
    for _ in 0..5 {
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => panic!("C_Initialize: {e}"),
        }
        let attempt = (|| {
            let slot = ctx
                .get_slots_with_token()?
                .into_iter()
                .find(|s| ctx.get_token_info(*s).is_ok_and(|i| i.label() == label))
                .expect("token not found");
            let session = ctx.open_rw_session(slot)?;
            match session.login(UserType::User, Some(&AuthPin::from(PIN.to_owned()))) {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                Err(e) => return Err(e),
            }
            make(&session)
        })();
        match attempt {
            Ok(value) => return value,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("admin session on {label}: {last:?}");
}
