//! The two AES-GCM layouts found inside `encryptedData` (upstream `pkg/storage/value/encrypt/aes`):
//! [`Gcm`], one key used directly (`nonce ‖ ct ‖ tag`, type 0 `AES_GCM_KEY`), and [`SeedGcm`], a per-write
//! key derived from a seed (`info ‖ nonce ‖ ct ‖ tag`, type 1 `HKDF_SHA256_XNONCE_AES_GCM_SEED`). The AAD
//! is always the etcd key. Randomness comes from the caller, so writes can be replayed byte for byte.

use aes_gcm::aead::consts::U12;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::aes::Aes192;
use aes_gcm::{Aes128Gcm, Aes256Gcm, AesGcm};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::Error;

/// GCM nonce length; upstream's `newGCM` accepts no other.
pub const NONCE_LEN: usize = 12;
/// GCM tag length.
pub const TAG_LEN: usize = 16;
/// Length of the per-write HKDF `info` (`infoSizeExtendedNonceGCM`).
pub const INFO_LEN: usize = 32;
/// Seed length the apiserver generates and the minimum it accepts back (`MinSeedSizeExtendedNonceGCM`).
pub const SEED_LEN: usize = 32;
/// Length of a derived DEK (AES-256).
pub const DEK_LEN: usize = 32;

type Aes192Gcm = AesGcm<Aes192, U12>;

/// One AES key (128, 192 or 256 bit) used directly: `nonce(12) ‖ ciphertext ‖ tag(16)`.
pub struct Gcm(Cipher);

enum Cipher {
    Aes128(Box<Aes128Gcm>),
    Aes192(Box<Aes192Gcm>),
    Aes256(Box<Aes256Gcm>),
}

impl Gcm {
    /// A transformer for a 16, 24 or 32 byte key (`AES_GCM_KEY` mode); other lengths are refused.
    pub fn new(key: &[u8]) -> Result<Self, Error> {
        let wrong = || Error::DekSourceLength {
            mode: "AES_GCM_KEY",
            need: "exactly 16, 24 or 32",
            len: key.len(),
        };
        let cipher = match key.len() {
            16 => Cipher::Aes128(Box::new(Aes128Gcm::new_from_slice(key).map_err(|_| wrong())?)),
            24 => Cipher::Aes192(Box::new(Aes192Gcm::new_from_slice(key).map_err(|_| wrong())?)),
            32 => Cipher::Aes256(Box::new(Aes256Gcm::new_from_slice(key).map_err(|_| wrong())?)),
            _ => return Err(wrong()),
        };
        Ok(Self(cipher))
    }

    /// `nonce ‖ AES-GCM(plaintext, aad)`.
    pub fn seal(&self, nonce: &[u8; NONCE_LEN], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, Error> {
        let payload = Payload { msg: plaintext, aad };
        let nonce: aes_gcm::Nonce<U12> = (*nonce).into();
        let sealed = match &self.0 {
            Cipher::Aes128(c) => c.encrypt(&nonce, payload),
            Cipher::Aes192(c) => c.encrypt(&nonce, payload),
            Cipher::Aes256(c) => c.encrypt(&nonce, payload),
        }
        .map_err(|_| Error::Seal)?;
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(nonce.as_slice());
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens `nonce ‖ ct ‖ tag` with `aad`.
    pub fn open(&self, data: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
        let too_short = Error::TooShort {
            need: NONCE_LEN + TAG_LEN,
            len: data.len(),
        };
        let (nonce, sealed) = data.split_at_checked(NONCE_LEN).ok_or(too_short)?;
        if sealed.len() < TAG_LEN {
            return Err(Error::TooShort {
                need: NONCE_LEN + TAG_LEN,
                len: data.len(),
            });
        }
        let nonce = aes_gcm::Nonce::from_slice(nonce);
        let payload = Payload { msg: sealed, aad };
        match &self.0 {
            Cipher::Aes128(c) => c.decrypt(nonce, payload),
            Cipher::Aes192(c) => c.decrypt(nonce, payload),
            Cipher::Aes256(c) => c.decrypt(nonce, payload),
        }
        .map(Zeroizing::new)
        .map_err(|_| Error::Authentication)
    }
}

/// A seed from which one AES-256 key per write is derived: `info(32) ‖ nonce(12) ‖ ciphertext ‖ tag(16)`.
pub struct SeedGcm {
    seed: Zeroizing<Vec<u8>>,
}

impl SeedGcm {
    /// A transformer for a seed of at least 32 bytes (the apiserver generates exactly 32).
    pub fn new(seed: &[u8]) -> Result<Self, Error> {
        if seed.len() < SEED_LEN {
            return Err(Error::DekSourceLength {
                mode: "HKDF_SHA256_XNONCE_AES_GCM_SEED",
                need: "at least 32",
                len: seed.len(),
            });
        }
        Ok(Self {
            seed: Zeroizing::new(seed.to_vec()),
        })
    }

    /// `info ‖ nonce ‖ AES-256-GCM(derive_key(seed, info), plaintext, aad)`.
    pub fn seal(
        &self,
        info: &[u8; INFO_LEN],
        nonce: &[u8; NONCE_LEN],
        plaintext: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, Error> {
        if aad.is_empty() {
            return Err(Error::EmptyAad);
        }
        let key = derive_key(&self.seed, info)?;
        let sealed = Gcm::new(key.as_slice())?.seal(nonce, plaintext, aad)?;
        let mut out = Vec::with_capacity(INFO_LEN + sealed.len());
        out.extend_from_slice(info);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens `info ‖ nonce ‖ ct ‖ tag` with `aad`.
    pub fn open(&self, data: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
        if aad.is_empty() {
            return Err(Error::EmptyAad);
        }
        let (info, rest) = data.split_at_checked(INFO_LEN).ok_or(Error::TooShort {
            need: INFO_LEN + NONCE_LEN + TAG_LEN,
            len: data.len(),
        })?;
        if rest.len() < NONCE_LEN + TAG_LEN {
            return Err(Error::TooShort {
                need: INFO_LEN + NONCE_LEN + TAG_LEN,
                len: data.len(),
            });
        }
        let key = derive_key(&self.seed, info)?;
        Gcm::new(key.as_slice())?.open(rest, aad)
    }
}

/// `DEK = HKDF-Expand(SHA-256, PRK = seed, info, 32)`: RFC 5869 Expand only, no Extract and no salt,
/// because the seed is already uniformly random (upstream `aes_extended_nonce.go`).
pub fn derive_key(seed: &[u8], info: &[u8]) -> Result<Zeroizing<[u8; DEK_LEN]>, Error> {
    let short = || Error::DekSourceLength {
        mode: "HKDF_SHA256_XNONCE_AES_GCM_SEED",
        need: "at least 32",
        len: seed.len(),
    };
    let hkdf = Hkdf::<Sha256>::from_prk(seed).map_err(|_| short())?;
    let mut key = Zeroizing::new([0u8; DEK_LEN]);
    // 32 bytes is far below HKDF-SHA256's 8160-byte output limit, so this cannot fail.
    hkdf.expand(info, key.as_mut_slice()).map_err(|_| short())?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    // V2 of the golden vectors (upstream aes_test.go, TestExtendedNonceGCMLegacyDataCompatibility).
    const V2_SEED: &str = "5d40323a820ff95561675e3b95e81867c5fdd561d35a88a2d08b08aa9d4fcf5c";
    const V2_INFO: &str = "2442759e33945fbad709db577a0f037fd8a709fc76979b8942209debcecb9d57";
    const V2_KEY: &str = "6e58b7659c304b0c382f42f16bd700465def1dead80bf6f1bf1d52073bdb0c00";

    #[test]
    fn hkdf_expand_without_extract_gives_v2_derived_key() {
        let key = derive_key(&hex::decode(V2_SEED).unwrap(), &hex::decode(V2_INFO).unwrap()).unwrap();
        assert_eq!(hex::encode(key.as_slice()), V2_KEY);
    }

    #[test]
    fn seeds_shorter_than_32_bytes_are_refused() {
        assert!(matches!(
            SeedGcm::new(&[0; 31]),
            Err(Error::DekSourceLength { len: 31, .. })
        ));
        assert!(
            SeedGcm::new(&[0; 33]).is_ok(),
            "upstream accepts longer seeds as the PRK"
        );
    }

    #[test]
    fn only_aes_key_lengths_are_accepted() {
        for len in [16, 24, 32] {
            assert!(Gcm::new(&vec![7; len]).is_ok(), "{len}");
        }
        for len in [0, 15, 31, 33, 64] {
            assert!(
                matches!(Gcm::new(&vec![7; len]), Err(Error::DekSourceLength { .. })),
                "{len}"
            );
        }
    }

    #[test]
    fn every_key_size_round_trips_and_binds_the_aad() {
        for len in [16, 24, 32] {
            let gcm = Gcm::new(&vec![3; len]).unwrap();
            let sealed = gcm
                .seal(&[1; NONCE_LEN], b"secret", b"/registry/secrets/a/b")
                .unwrap();
            assert_eq!(sealed.len(), NONCE_LEN + 6 + TAG_LEN);
            assert_eq!(
                gcm.open(&sealed, b"/registry/secrets/a/b").unwrap().as_slice(),
                b"secret"
            );
            assert!(matches!(
                gcm.open(&sealed, b"/registry/secrets/a/c"),
                Err(Error::Authentication)
            ));
        }
    }

    #[test]
    fn short_data_is_reported_not_panicked() {
        let seed = SeedGcm::new(&[5; SEED_LEN]).unwrap();
        assert!(matches!(
            seed.open(&[0; 59], b"k"),
            Err(Error::TooShort { need: 60, len: 59 })
        ));
        assert!(matches!(seed.open(&[0; 10], b"k"), Err(Error::TooShort { .. })));
        let gcm = Gcm::new(&[5; 32]).unwrap();
        assert!(matches!(
            gcm.open(&[0; 27], b"k"),
            Err(Error::TooShort { need: 28, len: 27 })
        ));
    }

    #[test]
    fn seed_mode_refuses_an_empty_aad() {
        let seed = SeedGcm::new(&[5; SEED_LEN]).unwrap();
        assert!(matches!(
            seed.seal(&[0; INFO_LEN], &[0; NONCE_LEN], b"x", b""),
            Err(Error::EmptyAad)
        ));
    }
}
