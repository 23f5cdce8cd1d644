//! One open TPM: the ESAPI context, the owner primary, a salted HMAC session and at most one loaded
//! KEK. Blocking; used only under the backend's mutex (an ESAPI `Context` is neither `Sync` nor
//! safe to interleave: sessions carry rolling nonces).
//!
//! Object slots: swtpm (and many TPMs without a resource manager) hold 3 loaded objects. This keeps
//! the primary and one KEK loaded and loads each sealed seed only for the command that needs it.
//! The TPM half of sharing a KEK (`share`) lives here too: TPM2_Duplicate under an admin approval,
//! TPM2_Import under this TPM's primary.

use std::str::FromStr;

use tss_esapi::Context;
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::{CapabilityType, SessionType};
use tss_esapi::handles::{KeyHandle, ObjectHandle, SessionHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Auth, CapabilityData, Digest, EccParameter, EccSignature, EncryptedSecret, Name, Nonce, Private, Public,
    SensitiveData, Signature, SymmetricDefinition, SymmetricDefinitionObject, VerifiedTicket,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use zeroize::Zeroizing;

use super::errors::{Subject, classify, library, unavailable};
use super::format::{self, Blob};
use crate::{Error, Result};

/// First handle of each range whose leftovers (from a killed kleidi, on a TPM without a resource
/// manager) are flushed on connect: transient objects, HMAC sessions, policy sessions.
const STALE_RANGES: [u32; 3] = [0x8000_0000, 0x0200_0000, 0x0300_0000];

pub struct Connection {
    ctx: Context,
    primary: KeyHandle,
    /// The primary's public area: the parent other nodes duplicate shareable KEKs to.
    primary_public: Public,
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
        let created = ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .map_err(|e| classify("create owner primary", Subject::Tpm, e))?;
        let (primary, primary_public) = (created.key_handle, created.out_public);
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
            primary_public,
            session,
            kek: None,
        })
    }

    /// This TPM's storage parent (the owner primary), public part.
    pub fn parent_public(&self) -> &Public {
        &self.primary_public
    }

    /// Creates a new KEK from `template` under the primary (TPM2_Create) and proves it loads.
    /// Nothing is stored.
    pub fn create_kek(&mut self, template: Public) -> Result<Blob> {
        let (primary, session) = (self.primary, self.session);
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
        let template = format::sealed_template(kek.public.object_attributes().fixed_tpm())?;
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

    /// TPM2_Duplicate of the shareable KEK `key_id` to `parent` (loaded as a public key only),
    /// in a policy session that satisfies the KEK's policy with the admin's approval:
    /// PolicyDuplicationSelect(parent) then PolicyAuthorize(approved, ticket of the admin's
    /// signature over `approval_hash`). The TPM checks every step; this only asks.
    pub fn duplicate(
        &mut self,
        key_id: &str,
        kek: &Blob,
        to: &Approved,
    ) -> Result<(Private, EncryptedSecret)> {
        let object = self.kek_handle(key_id, kek)?;
        let verify = |e| classify("verify approval", Subject::Approval, e);
        // swtpm holds 3 objects: primary and KEK are loaded, so the admin key and the parent take
        // turns in the third slot.
        let admin = self
            .ctx
            .load_external_public(to.admin.clone(), Hierarchy::Owner)
            .map_err(verify)?;
        let ticket = Digest::try_from(to.approval_hash.to_vec())
            .map_err(|e| library("approval hash", e))
            .and_then(|hash| {
                self.ctx
                    .verify_signature(admin, hash, to.signature.clone())
                    .map_err(verify)
            });
        let _ = self.ctx.flush_context(admin.into());
        let ticket = ticket?;
        let parent = self
            .ctx
            .load_external_public(to.parent.clone(), Hierarchy::Null)
            .map_err(|e| classify("load target parent", Subject::Tpm, e))?;
        let result = self.duplicate_under_policy(object.into(), parent.into(), to, ticket);
        let _ = self.ctx.flush_context(parent.into());
        result
    }

    fn duplicate_under_policy(
        &mut self,
        object: ObjectHandle,
        parent: ObjectHandle,
        to: &Approved,
        ticket: VerifiedTicket,
    ) -> Result<(Private, EncryptedSecret)> {
        let refused = |e| classify("duplicate", Subject::Approval, e);
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::Null,
                HashingAlgorithm::Sha256,
            )
            .map_err(|e| classify("start policy session", Subject::Tpm, e))?
            .ok_or_else(|| Error::Backend("start policy session: no session returned".into()))?;
        // continueSession: the session outlives Duplicate, so the flush below always has a target.
        let (attributes, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .build();
        let policy = self
            .ctx
            .tr_sess_set_attributes(session, attributes, mask)
            .map_err(|e| classify("policy session attributes", Subject::Tpm, e))
            .and_then(|()| PolicySession::try_from(session).map_err(|e| library("policy session", e)));
        let result = policy.and_then(|policy| {
            let name = |bytes: &[u8]| Name::try_from(bytes.to_vec()).map_err(|e| library("name", e));
            let (kek_name, parent_name, admin_name) =
                (name(&to.kek_name)?, name(&to.parent_name)?, name(&to.admin_name)?);
            let approved =
                Digest::try_from(to.approved.to_vec()).map_err(|e| library("approved policy", e))?;
            let policy_ref = Nonce::try_from(super::approval::POLICY_REF.to_vec())
                .map_err(|e| library("policy ref", e))?;
            self.ctx
                .policy_duplication_select(policy, kek_name, parent_name, false)
                .map_err(refused)?;
            self.ctx
                .policy_authorize(policy, approved, policy_ref, &admin_name, ticket)
                .map_err(refused)?;
            let (_, duplicate, seed) = self
                .ctx
                .execute_with_session(Some(session), |ctx| {
                    ctx.duplicate(object, parent, None, SymmetricDefinitionObject::Null)
                })
                .map_err(refused)?;
            Ok((duplicate, seed))
        });
        let _ = self.ctx.flush_context(SessionHandle::from(session).into());
        result
    }

    /// TPM2_Import of a duplicated KEK under the primary; proves the result loads.
    pub fn import(
        &mut self,
        key_id: &str,
        public: Public,
        duplicate: Private,
        seed: EncryptedSecret,
    ) -> Result<Blob> {
        let (primary, session) = (self.primary, self.session);
        let kek_public = public.clone();
        let private = self
            .ctx
            .execute_with_session(Some(session), |ctx| {
                ctx.import(
                    primary.into(),
                    None,
                    public,
                    duplicate,
                    seed,
                    SymmetricDefinitionObject::Null,
                )
            })
            .map_err(|e| classify("import", Subject::Import, e))?;
        let blob = Blob {
            public: kek_public,
            private,
        };
        self.kek_handle(key_id, &blob)?;
        Ok(blob)
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

/// What a duplication needs, all public: the approval as the TPM checks it.
pub struct Approved {
    /// The admin's verification key and its Name (named by the KEK's policy).
    pub admin: Public,
    pub admin_name: Vec<u8>,
    pub parent: Public,
    pub parent_name: Vec<u8>,
    pub kek_name: Vec<u8>,
    /// PolicyDuplicationSelect(parent)'s digest, what the admin signed (with the policyRef).
    pub approved: [u8; 32],
    pub approval_hash: [u8; 32],
    pub signature: Signature,
}

/// An r ‖ s ECDSA P-256 signature as the TPM takes it.
pub fn ecdsa_signature(rs: &[u8]) -> Result<Signature> {
    let (r, s) = rs
        .split_at_checked(32)
        .ok_or_else(|| Error::Config("the approval's signature is not 64 bytes".into()))?;
    let param = |v: &[u8]| EccParameter::try_from(v.to_vec()).map_err(|e| library("signature", e));
    let signature = EccSignature::create(HashingAlgorithm::Sha256, param(r)?, param(s)?)
        .map_err(|e| library("signature", e))?;
    Ok(Signature::EcDsa(signature))
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
