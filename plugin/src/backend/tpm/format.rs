//! Bytes at rest: the ciphertext layout, the KEK files in the state directory, key_ids, and the
//! object templates. Everything here is checked without a TPM, before one is touched.

use sha2::{Digest as _, Sha256};
use tss_esapi::attributes::{ObjectAttributes, ObjectAttributesBuilder};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::structures::{
    Digest, EccParameter, EccPoint, EccScheme, HashScheme, KeyDerivationFunctionScheme, KeyedHashScheme,
    Private, Public, PublicBuilder, PublicEccParametersBuilder, PublicKeyedHashParameters,
    SymmetricDefinitionObject,
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
    /// The public area (TPMT_PUBLIC).
    pub public: Public,
    /// The private area as the TPM encrypted it (TPM2B_PRIVATE's buffer).
    pub private: Private,
}

impl Blob {
    /// `u16 len ‖ TPMT_PUBLIC ‖ u16 len ‖ TPM2B_PRIVATE.buffer` (big endian, as the TPM marshals).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let public = self.public.marshall().map_err(|e| library("marshal public", e))?;
        let mut out = Vec::with_capacity(4 + public.len() + self.private.len());
        put_sized(&mut out, &public)?;
        put_sized(&mut out, &self.private)?;
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

/// Splits `u16 len ‖ bytes` off the front (the TPM's sized-buffer encoding).
pub fn take_sized(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = bytes.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_be_bytes(*len));
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// Appends `u16 len ‖ part`.
pub fn put_sized(out: &mut Vec<u8>, part: &[u8]) -> Result<()> {
    let len = u16::try_from(part.len())
        .map_err(|_| crate::Error::Backend("a TPM object part exceeds 64 KiB".into()))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(part);
    Ok(())
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
    let same_shape = |expected: Public| match (&blob.public, &expected) {
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
    // Sealed under a node-bound KEK (fixedTPM) or under a shareable one (not fixedTPM).
    let known = [true, false]
        .into_iter()
        .any(|fixed_tpm| sealed_template(fixed_tpm).is_ok_and(same_shape));
    known.then_some(blob)
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

/// A KEK other nodes can hold (`share`): the same storage key without fixedTPM and fixedParent,
/// so TPM2_Duplicate works on it, but only in a policy session that satisfies `auth_policy` (the
/// DUP role always needs a policy). adminWithPolicy: no other administrative use by auth value.
pub fn shareable_kek_template(auth_policy: Digest) -> Result<Public> {
    let attributes = storage_key_attributes(false)?;
    storage_key_builder(attributes)?
        .with_auth_policy(auth_policy)
        .build()
        .map_err(|e| library("shareable kek template", e))
}

/// Whether `public` has exactly the shape [`shareable_kek_template`] makes (any policy, any point):
/// what `kleidi tpm import` accepts.
pub fn is_shareable_kek(public: &Public) -> bool {
    let Ok(Public::Ecc {
        object_attributes: ea,
        name_hashing_algorithm: eh,
        parameters: ep,
        ..
    }) = shareable_kek_template(Digest::default())
    else {
        return false;
    };
    matches!(public, Public::Ecc { object_attributes: a, name_hashing_algorithm: h, auth_policy: p, parameters: s, .. }
        if *a == ea && *h == eh && *s == ep && p.len() == 32)
}

fn storage_key_attributes(fixed: bool) -> Result<ObjectAttributes> {
    let builder = ObjectAttributesBuilder::new()
        .with_fixed_tpm(fixed)
        .with_fixed_parent(fixed)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true);
    // Without fixedTPM the key is a duplicable one: keep every other use behind its policy.
    let builder = if fixed {
        builder
    } else {
        builder.with_admin_with_policy(true)
    };
    builder.build().map_err(|e| library("storage key attributes", e))
}

fn storage_key_template() -> Result<Public> {
    storage_key_builder(storage_key_attributes(true)?)?
        .build()
        .map_err(|e| library("storage key template", e))
}

fn storage_key_builder(attributes: ObjectAttributes) -> Result<PublicBuilder> {
    let params = PublicEccParametersBuilder::new()
        .with_symmetric(SymmetricDefinitionObject::AES_128_CFB)
        .with_ecc_scheme(EccScheme::Null)
        .with_curve(EccCurve::NistP256)
        .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
        .with_is_decryption_key(true)
        .with_restricted(true)
        .build()
        .map_err(|e| library("storage key parameters", e))?;
    Ok(PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(params)
        .with_ecc_unique_identifier(EccPoint::default()))
}

/// The administrator's ECDSA P-256 verification key as the TPM sees it (TPM2_LoadExternal, public
/// part only). Its Name, fixed by this template and the point, is what a shareable KEK's policy
/// names; `x` and `y` are the 32-byte coordinates.
pub fn admin_key_template(x: &[u8], y: &[u8]) -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_user_with_auth(true)
        .with_sign_encrypt(true)
        .build()
        .map_err(|e| library("admin key attributes", e))?;
    let params = PublicEccParametersBuilder::new()
        .with_symmetric(SymmetricDefinitionObject::Null)
        .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
        .with_curve(EccCurve::NistP256)
        .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
        .with_is_signing_key(true)
        .build()
        .map_err(|e| library("admin key parameters", e))?;
    let point = |c: &[u8]| EccParameter::try_from(c.to_vec()).map_err(|e| library("admin key point", e));
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(params)
        .with_ecc_unique_identifier(EccPoint::new(point(x)?, point(y)?))
        .build()
        .map_err(|e| library("admin key template", e))
}

/// A sealed data object (keyed hash, null scheme) holding one seed: no sign, no decrypt, so the TPM
/// only ever hands its data back through TPM2_Unseal. fixedParent: it loads under this KEK only;
/// fixedTPM when the KEK has it (a child of a shareable KEK cannot). noDA as for the KEK.
pub fn sealed_template(fixed_tpm: bool) -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(fixed_tpm)
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
            public: sealed_template(true).unwrap(),
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
