//! Sessions: the pool of logged-in sessions, leases, login with the remembered PIN refusal, the
//! recovering [`Inner::run`] and the resets after a lost token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use zeroize::Zeroizing;

use super::errors::{TOKEN_LOST, classify, is_lost, log_failure, token_lost};
use super::format::{PIN_FLAG, raw_pin, read_pin};
use super::module::Module;
use super::{BACKEND, Pkcs11Config, RELOAD_INTERVAL, lock};
use crate::{Error, Result};

pub(super) struct Inner {
    pub(super) module: Arc<Module>,
    pub(super) cfg: Pkcs11Config,
    pub(super) state: Mutex<State>,
    /// Held across read-PIN-file → C_Login → remember-the-verdict, so concurrent callers never
    /// present one wrong PIN more than once.
    pub(super) login: Mutex<Login>,
}

#[derive(Default)]
pub(super) struct Login {
    /// The last PIN the token rejected with CKR_PIN_INCORRECT.
    pub(super) rejected: Option<Zeroizing<Vec<u8>>>,
}

#[derive(Default)]
pub(super) struct State {
    /// Module generation every handle below belongs to.
    pub(super) generation: u64,
    /// Bumped on each reset; a session leased before it is closed on return, not pooled.
    pub(super) epoch: u64,
    pub(super) slot: Option<Slot>,
    pub(super) idle: Vec<Session>,
    pub(super) keys: HashMap<(String, Vec<u8>), ObjectHandle>,
    pub(super) current: Option<CurrentKey>,
    /// The last attempt could not find or confirm the token at all: a module reload may help.
    pub(super) missing: bool,
    /// A reset happened and no session has logged in since (for the reconnect log line).
    pub(super) lost: bool,
}

#[derive(Clone)]
pub(super) struct CurrentKey {
    pub(super) handle: ObjectHandle,
    pub(super) key_id: String,
}

/// A session taken from the pool for one attempt.
pub(super) struct Lease {
    pub(super) session: Session,
    pub(super) slot: Slot,
    pub(super) epoch: u64,
}

impl Inner {
    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// One call with recovery. After a token_lost failure (which already dropped the sessions and
    /// handles) it tries once more with a fresh session; when that fails too, or the token could not
    /// be found at all, or the module is uninitialized, it reloads the module (rate limited) and tries
    /// once more after that. At most three attempts.
    pub(super) fn run<T>(&self, attempt: impl Fn(u64) -> Result<T>) -> Result<T> {
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
    pub(super) fn uninitialized(&self, cause: &str) -> Error {
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
    pub(super) fn adopt(&self, st: &mut State, module_gen: u64) {
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
    pub(super) fn reset(&self, module_gen: u64, err: &Error) {
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
    pub(super) fn with_slot<T>(&self, module_gen: u64, op: impl FnOnce(Slot) -> Result<T>) -> Result<T> {
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
    pub(super) fn with_session<T>(&self, module_gen: u64, op: impl FnOnce(&Lease) -> Result<T>) -> Result<T> {
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

    pub(super) fn checkout(&self, module_gen: u64) -> Result<Lease> {
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
    pub(super) fn slot(&self, module_gen: u64) -> Result<Slot> {
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
    pub(super) fn confirm_token(&self, slot: Slot) -> Result<()> {
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
    pub(super) fn login(&self, session: &Session) -> Result<()> {
        let mut login = lock(&self.login);
        let pin = read_pin(&self.cfg.pin_file, PIN_FLAG)?;
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
