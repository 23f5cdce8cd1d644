//! The process-wide module registry: one loaded, initialized PKCS#11 module per file, shared by
//! every backend in the process, and its reload (`C_Finalize` + `C_Initialize`) under a generation
//! counter.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::Instant;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};

use super::errors::rc_name;
use super::{BACKEND, RELOAD_INTERVAL, lock};
use crate::{Error, Result};

/// One loaded and initialized PKCS#11 module, shared by every backend in the process that names the
/// same file. Never dropped (a dropped context would unload the library under other users).
pub(super) struct Module {
    pub(super) path: PathBuf,
    pub(super) ctx: Pkcs11,
    /// Read-locked around every PKCS#11 call; write-locked to reload.
    pub(super) life: RwLock<Life>,
    /// Serializes `init` (choosing a free slot and initializing a token is not atomic).
    pub(super) init_lock: Mutex<()>,
}

pub(super) struct Life {
    /// Bumped on every reload; handles from older generations are never used.
    pub(super) generation: u64,
    pub(super) last_reload: Option<Instant>,
    /// Why the last `C_Initialize` failed; `None` while the module is initialized. Nothing but a
    /// reload is attempted while it is set.
    pub(super) init_failure: Option<String>,
}

impl Module {
    /// The module for `path`, loading and initializing it on first use. Blocking.
    pub(super) fn get(path: &Path) -> Result<Arc<Module>> {
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

    pub(super) fn read(&self) -> std::sync::RwLockReadGuard<'_, Life> {
        self.life.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reloads the module (`C_Finalize` + `C_Initialize`) unless someone already did since
    /// generation `seen`, or the last reload was under [`RELOAD_INTERVAL`] ago. Returns whether a
    /// fresh, initialized generation exists now, i.e. whether another attempt is worthwhile.
    /// Blocking; the caller must not hold the read lock.
    pub(super) fn reload(&self, seen: u64) -> bool {
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
pub(super) fn initialize(ctx: &Pkcs11) -> std::result::Result<(), String> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(CkError::Pkcs11(rv, _)) => Err(rc_name(rv)),
        Err(e) => Err(e.to_string()),
    }
}
