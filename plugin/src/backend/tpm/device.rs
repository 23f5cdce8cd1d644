//! One open TPM: the ESAPI context, the owner primary, a salted HMAC session and at most one loaded
//! KEK. Blocking; used only under the backend's mutex (an ESAPI `Context` is neither `Sync` nor
//! safe to interleave: sessions carry rolling nonces).
//!
//! Object slots: swtpm (and many TPMs without a resource manager) hold 3 loaded objects. This keeps
//! the primary and one KEK loaded and loads each sealed seed only for the command that needs it.

use std::str::FromStr;

use tss_esapi::Context;
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::{CapabilityType, SessionType};
use tss_esapi::handles::{KeyHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{Auth, CapabilityData, SensitiveData, SymmetricDefinition};
use tss_esapi::tcti_ldr::TctiNameConf;
use zeroize::Zeroizing;

use super::errors::{Subject, classify, unavailable};
use super::format::{self, Blob};
use crate::{Error, Result};

/// First handle of each range whose leftovers (from a killed kleidi, on a TPM without a resource
/// manager) are flushed on connect: transient objects, HMAC sessions, policy sessions.
const STALE_RANGES: [u32; 3] = [0x8000_0000, 0x0200_0000, 0x0300_0000];

pub struct Connection {
    ctx: Context,
    primary: KeyHandle,
    session: AuthSession,
    /// The loaded KEK and its key_id.
    kek: Option<(String, KeyHandle)>,
}

impl Connection {
    /// Connects through `tcti`, flushes stale objects, creates the owner primary (with `owner_auth`)
    /// and starts an HMAC session salted to it. The session encrypts the first parameter both ways
    /// (AES-128-CFB), so seeds cross the bus to a discrete TPM only encrypted.
    pub fn open(tcti: &str, owner_auth: &[u8]) -> Result<Self> {
        let conf =
            TctiNameConf::from_str(tcti).map_err(|e| Error::Config(format!("--tpm-tcti {tcti:?}: {e}")))?;
        let mut ctx = Context::new(conf).map_err(|e| match classify("connect", Subject::Tpm, e) {
            Error::Unavailable { class, detail, .. } => unavailable(class, format!("{tcti}: {detail}")),
            other => other,
        })?;
        flush_stale(&mut ctx);
        let auth = Auth::try_from(owner_auth.to_vec())
            .map_err(|_| Error::Config("the owner auth is longer than the TPM accepts".into()))?;
        ctx.tr_set_auth(Hierarchy::Owner.into(), auth)
            .map_err(|e| classify("set owner auth", Subject::Tpm, e))?;
        let template = format::primary_template()?;
        let primary = ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .map_err(|e| classify("create owner primary", Subject::Tpm, e))?
            .key_handle;
        let session = ctx
            .start_auth_session(
                Some(primary),
                None,
                None,
                SessionType::Hmac,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(|e| classify("start session", Subject::Tpm, e))?
            .ok_or_else(|| Error::Backend("start session: no session returned".into()))?;
        let (attributes, mask) = SessionAttributesBuilder::new()
            .with_decrypt(true)
            .with_encrypt(true)
            .with_continue_session(true)
            .build();
        ctx.tr_sess_set_attributes(session, attributes, mask)
            .map_err(|e| classify("session attributes", Subject::Tpm, e))?;
        Ok(Self {
            ctx,
            primary,
            session,
            kek: None,
        })
    }

    /// Creates a new KEK under the primary (TPM2_Create) and proves it loads. Nothing is stored.
    pub fn create_kek(&mut self) -> Result<Blob> {
        let (primary, session) = (self.primary, self.session);
        let template = format::kek_template()?;
        let created = self
            .ctx
            .execute_with_session(Some(session), |ctx| {
                ctx.create(primary, template, None, None, None, None)
            })
            .map_err(|e| classify("create kek", Subject::Tpm, e))?;
        let blob = Blob {
            public: created.out_public,
            private: created.out_private,
        };
        let key_id = format::key_id(&blob.name()?);
        self.kek_handle(&key_id, &blob)?;
        Ok(blob)
    }

    /// Seals `seed` as a data object under the KEK (TPM2_Create with the seed as sensitive data).
    pub fn seal(&mut self, key_id: &str, kek: &Blob, seed: &[u8]) -> Result<Blob> {
        let parent = self.kek_handle(key_id, kek)?;
        let data = SensitiveData::try_from(seed.to_vec())
            .map_err(|_| Error::InvalidRequest(format!("{} bytes cannot be sealed", seed.len())))?;
        let session = self.session;
        let template = format::sealed_template()?;
        let created = self
            .ctx
            .execute_with_session(Some(session), |ctx| {
                ctx.create(parent, template, None, Some(data), None, None)
            })
            .map_err(|e| classify("seal", Subject::Tpm, e))?;
        Ok(Blob {
            public: created.out_public,
            private: created.out_private,
        })
    }

    /// Loads the sealed object under the KEK and unseals it. The TPM checks the private area's
    /// HMAC (keyed from the KEK's seed, over the object's Name) before anything is decrypted.
    pub fn unseal(&mut self, key_id: &str, kek: &Blob, sealed: Blob) -> Result<Zeroizing<Vec<u8>>> {
        let parent = self.kek_handle(key_id, kek)?;
        let session = self.session;
        let object = self
            .ctx
            .execute_with_session(Some(session), |ctx| {
                ctx.load(parent, sealed.private, sealed.public)
            })
            .map_err(|e| classify("load sealed seed", Subject::Ciphertext, e))?;
        let data = self
            .ctx
            .execute_with_session(Some(session), |ctx| ctx.unseal(object.into()))
            .map_err(|e| classify("unseal", Subject::Ciphertext, e));
        let flushed = self.ctx.flush_context(object.into());
        let data = data?;
        flushed.map_err(|e| classify("flush sealed seed", Subject::Tpm, e))?;
        Ok(Zeroizing::new(data.value().to_vec()))
    }

    /// The KEK `key_id`, loading it (and flushing the one loaded before) if needed.
    fn kek_handle(&mut self, key_id: &str, kek: &Blob) -> Result<KeyHandle> {
        if let Some((loaded, handle)) = &self.kek {
            if loaded == key_id {
                return Ok(*handle);
            }
        }
        if let Some((_, handle)) = self.kek.take() {
            self.ctx
                .flush_context(handle.into())
                .map_err(|e| classify("flush kek", Subject::Tpm, e))?;
        }
        let (primary, session) = (self.primary, self.session);
        let handle = self
            .ctx
            .execute_with_session(Some(session), |ctx| {
                ctx.load(primary, kek.private.clone(), kek.public.clone())
            })
            .map_err(|e| classify("load kek", Subject::Kek(key_id), e))?;
        self.kek = Some((key_id.to_owned(), handle));
        Ok(handle)
    }
}

/// Best effort: a failure here shows up, classified, on the next command.
fn flush_stale(ctx: &mut Context) {
    for first in STALE_RANGES {
        let Ok((CapabilityData::Handles(handles), _)) =
            ctx.get_capability(CapabilityType::Handles, first, 64)
        else {
            continue;
        };
        for handle in handles.into_inner() {
            // A range lists only its own kind, but a session flushed above must not be retried.
            if matches!(handle, TpmHandle::Permanent(_) | TpmHandle::Persistent(_)) {
                continue;
            }
            if let Ok(object) = ctx.tr_from_tpm_public(handle) {
                let _ = ctx.flush_context(object);
                tracing::debug!(
                    backend = "tpm",
                    "flushed a stale handle left by an earlier process"
                );
            }
        }
    }
}
