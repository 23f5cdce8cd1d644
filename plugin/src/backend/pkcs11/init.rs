//! `kleidi pkcs11 init`: the token, the user PIN and the AES-256 key, each created only if absent.

use std::path::Path;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::slot::Slot;
use rand::RngCore;

use super::errors::classify;
use super::format::{
    KEY_ID_BYTES, PIN_FLAG, SO_PIN_FLAG, key_id_for, raw_pin, read_pin, secret_key, text_pin, validate,
};
use super::module::Module;
use super::{BACKEND, InitOutcome, Pkcs11Config, join_error, lock};
use crate::{Error, Result};

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

pub(super) fn init_blocking(cfg: &Pkcs11Config, so_pin_file: &Path) -> Result<InitOutcome> {
    let module = Module::get(&cfg.module)?;
    let _serial = lock(&module.init_lock);
    // Held for the whole init: no reload can invalidate the slot or sessions below, which are
    // declared later and so dropped (closed) before it.
    let _life = module.read();
    let ctx = &module.ctx;
    let pin = read_pin(&cfg.pin_file, PIN_FLAG)?;

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
            let so_pin = text_pin(&read_pin(so_pin_file, SO_PIN_FLAG)?, "SO PIN")?;
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
        let so_pin = text_pin(&read_pin(so_pin_file, SO_PIN_FLAG)?, "SO PIN")?;
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
