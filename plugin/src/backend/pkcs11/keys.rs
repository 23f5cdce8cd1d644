//! The key operations on a leased session: finding the current key and cached key handles, and
//! the AES-256-GCM `C_Encrypt` / `C_Decrypt` calls.

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectHandle};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretSlice};
use zeroize::Zeroizing;

use super::errors::{bad_ciphertext, classify, shown};
use super::format::{HEADER_LEN, IV_LEN, TAG_BITS, TAG_LEN, VERSION, key_id_for, secret_key};
use super::session::{CurrentKey, Inner, Lease};
use super::{BACKEND, FORMAT};
use crate::backend::FORMAT_ANNOTATION;
use crate::service::{Annotations, Encrypted};
use crate::{Error, Result};

impl Inner {
    /// Finds the key labelled `key_label` now (so a replaced key is noticed) and makes it current.
    pub(super) fn refresh_current(&self) -> Result<String> {
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

    pub(super) fn find_current(&self, lease: &Lease) -> Result<CurrentKey> {
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
    pub(super) fn key_handle(
        &self,
        lease: &Lease,
        label: &str,
        id: &[u8],
        key_id: &str,
    ) -> Result<ObjectHandle> {
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

    pub(super) fn encrypt(&self, lease: &Lease, plaintext: &SecretSlice<u8>) -> Result<Encrypted> {
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

    pub(super) fn decrypt(
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
