//! Bytes at rest: the ciphertext layout, the KEK files in the state directory, key_ids, and the
//! object templates. Everything here is checked without a TPM, before one is touched.

use sha2::{Digest as _, Sha256};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::structures::{
    EccPoint, EccScheme, KeyDerivationFunctionScheme, KeyedHashScheme, Private, Public, PublicBuilder,
    PublicEccParametersBuilder, PublicKeyedHashParameters, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};

use super::errors::library;
use crate::Result;

/// First byte of every ciphertext: the layout version.
pub const VERSION: u8 = 0x01;
/// The apiserver rejects ciphertexts longer than this (kms.md 2.1).
pub const MAX_CIPHERTEXT: usize = 1024;
/// A sealed data object holds at most MAX_SYM_DATA (128) bytes of sensitive data.
pub const MAX_PLAINTEXT: usize = 128;
/// Every key_id this backend writes starts with this.
pub const KEY_ID_PREFIX: &str = "tpm:";
/// TPM_ALG_SHA256 in front of the digest: a Name as the TPM computes it.
const NAME_ALG: [u8; 2] = [0x00, 0x0b];

/// An object as TPM2_Create returns it and TPM2_Load takes it back: the public area (TPMT_PUBLIC)
/// and the private area, which the TPM encrypted and integrity-protected under the parent.
#[derive(Clone)]
pub struct Blob {
    pub public: Public,
    pub private: Private,
}

impl Blob {
    /// `u16 len ‖ TPMT_PUBLIC ‖ u16 len ‖ TPM2B_PRIVATE.buffer` (big endian, as the TPM marshals).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let public = self.public.marshall().map_err(|e| library("marshal public", e))?;
        let mut out = Vec::with_capacity(4 + public.len() + self.private.len());
        for part in [public.as_slice(), self.private.as_ref()] {
            let len = u16::try_from(part.len())
                .map_err(|_| crate::Error::Backend("a TPM object part exceeds 64 KiB".into()))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(part);
        }
        Ok(out)
    }

    /// The inverse of [`Blob::encode`]; `None` unless the bytes are exactly one canonical encoding.
    pub fn decode(bytes: &[u8]) -> Option<Blob> {
        let (public_bytes, rest) = take_sized(bytes)?;
        let (private_bytes, rest) = take_sized(rest)?;
        if !rest.is_empty() || private_bytes.is_empty() {
            return None;
        }
        let public = Public::unmarshall(public_bytes).ok()?;
        // Unmarshalling ignores trailing bytes; re-marshalling proves there were none.
        if public.marshall().ok()?.as_slice() != public_bytes {
            return None;
        }
        let private = Private::try_from(private_bytes.to_vec()).ok()?;
        Some(Blob { public, private })
    }

    /// The object's Name: nameAlg ‖ SHA-256(TPMT_PUBLIC), exactly what the TPM computes on load.
    pub fn name(&self) -> Result<Vec<u8>> {
        name_of(&self.public)
    }
}

fn take_sized(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = bytes.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_be_bytes(*len));
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// Name of a public area with a SHA-256 name algorithm.
pub fn name_of(public: &Public) -> Result<Vec<u8>> {
    let digest = Sha256::digest(public.marshall().map_err(|e| library("marshal public", e))?);
    Ok([NAME_ALG.as_slice(), digest.as_slice()].concat())
}

/// `tpm:<hex Name>`: public, and stable for as long as the key exists.
pub fn key_id(name: &[u8]) -> String {
    format!("{KEY_ID_PREFIX}{}", hex::encode(name))
}

/// The hex Name a key_id carries, if it is one this backend could have written.
pub fn parse_key_id(key_id: &str) -> Option<&str> {
    let hex = key_id.strip_prefix(KEY_ID_PREFIX)?;
    let ok = hex.len() == 2 * (NAME_ALG.len() + 32)
        && hex.starts_with("000b")
        && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    ok.then_some(hex)
}

/// The ciphertext: [`VERSION`] ‖ the sealed object's [`Blob`].
pub fn seal_ciphertext(sealed: &Blob) -> Result<Vec<u8>> {
    let mut out = vec![VERSION];
    out.extend(sealed.encode()?);
    if out.len() > MAX_CIPHERTEXT {
        return Err(crate::Error::Backend(format!(
            "a sealed object of {} bytes exceeds the apiserver's {MAX_CIPHERTEXT}",
            out.len()
        )));
    }
    Ok(out)
}

/// Splits a ciphertext into the sealed object, refusing anything [`sealed_template`] did not make.
pub fn open_ciphertext(ciphertext: &[u8]) -> Option<Blob> {
    let (&version, body) = ciphertext.split_first()?;
    if version != VERSION || ciphertext.len() > MAX_CIPHERTEXT {
        return None;
    }
    let blob = Blob::decode(body)?;
    let expected = sealed_template().ok()?;
    let same_shape = match (&blob.public, &expected) {
        (
            Public::KeyedHash {
                object_attributes: a,
                name_hashing_algorithm: h,
                auth_policy: p,
                parameters: s,
                ..
            },
            Public::KeyedHash {
                object_attributes: ea,
                name_hashing_algorithm: eh,
                parameters: es,
                ..
            },
        ) => a == ea && h == eh && p.is_empty() && s == es,
        _ => false,
    };
    same_shape.then_some(blob)
}

/// Owner-hierarchy primary: the TCG "SRK" shape (ECC P-256, AES-128-CFB storage key, empty unique).
/// Deterministic: the same TPM (owner seed) always gives the same key; a cleared TPM another one.
pub fn primary_template() -> Result<Public> {
    storage_key_template()
}

/// The KEK: an ECC P-256 restricted decryption (storage) key under the primary. fixedTPM and
/// fixedParent: it can never be duplicated out of this TPM. noDA: its auth is empty, so
/// dictionary-attack lockout protects nothing and must not stop kleidi.
pub fn kek_template() -> Result<Public> {
    storage_key_template()
}

fn storage_key_template() -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(|e| library("storage key attributes", e))?;
    let params = PublicEccParametersBuilder::new()
        .with_symmetric(SymmetricDefinitionObject::AES_128_CFB)
        .with_ecc_scheme(EccScheme::Null)
        .with_curve(EccCurve::NistP256)
        .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
        .with_is_decryption_key(true)
        .with_restricted(true)
        .build()
        .map_err(|e| library("storage key parameters", e))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(params)
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(|e| library("storage key template", e))
}

/// A sealed data object (keyed hash, null scheme) holding one seed: no sign, no decrypt, so the TPM
/// only ever hands its data back through TPM2_Unseal. fixedTPM/fixedParent: it loads under this KEK
/// only; noDA for the same reason as the KEK.
pub fn sealed_template() -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .build()
        .map_err(|e| library("sealed object attributes", e))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Default::default())
        .build()
        .map_err(|e| library("sealed object template", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_name_a_sha256_name_in_lowercase_hex() {
        let name = [NAME_ALG.to_vec(), vec![0xab; 32]].concat();
        let id = key_id(&name);
        assert_eq!(parse_key_id(&id), Some(&id[4..]));
        for bad in [
            "",
            "tpm:",
            "tpm:000b",
            "pkcs11:k:ab",
            &id.to_uppercase(),
            &format!("{id}00"),
        ] {
            assert_eq!(parse_key_id(bad), None, "{bad:?}");
        }
        assert_eq!(parse_key_id(&id.replacen("000b", "000c", 1)), None);
    }

    #[test]
    fn blobs_round_trip_and_refuse_trailing_or_missing_bytes() {
        let blob = Blob {
            public: sealed_template().unwrap(),
            private: Private::try_from(vec![7u8; 40]).unwrap(),
        };
        let bytes = blob.encode().unwrap();
        let back = Blob::decode(&bytes).unwrap();
        assert_eq!(back.encode().unwrap(), bytes);
        assert!(Blob::decode(&[bytes.as_slice(), &[0]].concat()).is_none());
        for len in 0..bytes.len() {
            assert!(Blob::decode(&bytes[..len]).is_none(), "{len}");
        }
        let ct = seal_ciphertext(&blob).unwrap();
        assert_eq!(ct[0], VERSION);
        assert!(open_ciphertext(&ct).is_some());
        let kek = Blob {
            public: kek_template().unwrap(),
            ..back
        };
        let foreign = seal_ciphertext(&kek).unwrap();
        assert!(
            open_ciphertext(&foreign).is_none(),
            "only sealed data objects are accepted"
        );
    }
}
