//! What sharing a KEK computes and moves without a TPM: the administrator's signing key, the policy
//! digests a shareable KEK and an approval carry, and the three files users carry between machines
//! (a node's parent, an approval, an export). The TPM-facing steps and the threat model are in
//! `share`.
//!
//! Files are `magic (8 bytes) ‖ u16-length-prefixed parts`, big endian like every TPM structure;
//! a file is accepted only if it is exactly one such encoding.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use sha2::{Digest as _, Sha256};
use tss_esapi::structures::{EncryptedSecret, Private, Public};
use tss_esapi::traits::{Marshall, UnMarshall};
use zeroize::Zeroizing;

use super::format::{self, put_sized, take_sized};
use crate::{Error, Result};

/// policyRef of every approval: binds the admin's signatures to this use, so a signature the same
/// key made for anything else is no approval.
pub const POLICY_REF: &[u8] = b"kleidi.dev/tpm/duplicate/v1";
const CC_POLICY_AUTHORIZE: u32 = 0x0000_016A;
const CC_POLICY_DUPLICATION_SELECT: u32 = 0x0000_0188;
const ADMIN_PUB_MAGIC: &[u8; 8] = b"KLTPADM1";
const PARENT_MAGIC: &[u8; 8] = b"KLTPPAR1";
const APPROVAL_MAGIC: &[u8; 8] = b"KLTPAPR1";
const EXPORT_MAGIC: &[u8; 8] = b"KLTPEXP1";
/// An uncompressed P-256 point: 0x04 ‖ x ‖ y.
const POINT_LEN: usize = 65;
/// An ECDSA P-256 signature as r ‖ s.
const SIGNATURE_LEN: usize = 64;

/// The KEK's authPolicy: TPM2_PolicyAuthorize(keySign = the admin key's Name, [`POLICY_REF`]).
/// Whatever the admin key signs (and only that) satisfies it.
pub fn kek_policy(admin_name: &[u8]) -> [u8; 32] {
    let first = Sha256::new()
        .chain_update([0u8; 32])
        .chain_update(CC_POLICY_AUTHORIZE.to_be_bytes())
        .chain_update(admin_name)
        .finalize();
    Sha256::new()
        .chain_update(first)
        .chain_update(POLICY_REF)
        .finalize()
        .into()
}

/// The policy an approval signs: TPM2_PolicyDuplicationSelect(newParentName = `parent_name`,
/// includeObject = NO). A duplication it allows goes to that parent only; one approval per node
/// serves every shareable KEK of the same admin key, so a rotation needs no new approvals.
pub fn approved_policy(parent_name: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update([0u8; 32])
        .chain_update(CC_POLICY_DUPLICATION_SELECT.to_be_bytes())
        .chain_update(parent_name)
        .chain_update([0u8]) // includeObject = NO
        .finalize()
        .into()
}

/// aHash, what the TPM checks the admin's signature against: SHA-256(approvedPolicy ‖ policyRef).
/// ring's ECDSA-SHA256 hashes the message itself, so the admin signs `approved ‖ POLICY_REF`.
fn approval_message(approved: &[u8; 32]) -> Vec<u8> {
    [approved.as_slice(), POLICY_REF].concat()
}

pub fn approval_hash(approved: &[u8; 32]) -> [u8; 32] {
    Sha256::digest(approval_message(approved)).into()
}

/// The administrator's verification key (public).
#[derive(Clone, PartialEq, Eq)]
pub struct AdminPublic {
    point: [u8; POINT_LEN],
}

impl AdminPublic {
    /// The key as a TPM public area, for TPM2_LoadExternal.
    pub fn public(&self) -> Result<Public> {
        let (x, y) = self
            .point
            .get(1..)
            .and_then(|c| c.split_at_checked(32))
            .ok_or_else(|| Error::Backend("admin key point".into()))?;
        format::admin_key_template(x, y)
    }

    /// The Name a shareable KEK's policy names.
    pub fn name(&self) -> Result<Vec<u8>> {
        format::name_of(&self.public()?)
    }

    pub fn read(path: &Path) -> Result<Self> {
        let bytes = read_file(path, "admin public key")?;
        parse(&bytes, ADMIN_PUB_MAGIC, 1)
            .and_then(|parts| Self::from_point(parts.first()?))
            .ok_or_else(|| not_a(path, "kleidi TPM admin public key (`kleidi tpm admin-key`)"))
    }

    fn from_point(point: &[u8]) -> Option<Self> {
        let point = <[u8; POINT_LEN]>::try_from(point).ok()?;
        (point.first() == Some(&0x04)).then_some(Self { point })
    }
}

/// `kleidi tpm admin-key`: a new ECDSA P-256 key pair. The private key (PKCS#8) goes to `out`
/// (mode 0400, never overwritten), the public one to `out.pub`. Returns the public key.
pub fn generate_admin_key(out: &Path) -> Result<AdminPublic> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| Error::Backend("generating the admin key failed".into()))?;
    let pkcs8 = Zeroizing::new(pkcs8.as_ref().to_vec());
    let public = load_admin_key(&pkcs8)?.1;
    write_new(out, &pkcs8, 0o400)?;
    write_new(&pub_path(out), &encode(ADMIN_PUB_MAGIC, &[&public.point])?, 0o644)?;
    Ok(public)
}

/// Where [`generate_admin_key`] puts the public half.
pub fn pub_path(out: &Path) -> std::path::PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".pub");
    name.into()
}

fn load_admin_key(pkcs8: &[u8]) -> Result<(EcdsaKeyPair, AdminPublic)> {
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &SystemRandom::new())
        .map_err(|e| Error::Config(format!("not an ECDSA P-256 admin key (PKCS#8): {e}")))?;
    let public = AdminPublic::from_point(pair.public_key().as_ref())
        .ok_or_else(|| Error::Backend("ring returned an unexpected public key".into()))?;
    Ok((pair, public))
}

/// A node's storage parent (its owner primary), as `kleidi tpm export-parent` writes it.
pub struct ParentFile {
    pub public: Public,
}

impl ParentFile {
    pub fn encode(&self) -> Result<Vec<u8>> {
        encode(PARENT_MAGIC, &[&marshal(&self.public)?])
    }

    pub fn read(path: &Path) -> Result<Self> {
        let bytes = read_file(path, "parent")?;
        parse(&bytes, PARENT_MAGIC, 1)
            .and_then(|parts| unmarshal(parts.first()?))
            .map(|public| Self { public })
            .ok_or_else(|| not_a(path, "kleidi TPM parent file (`kleidi tpm export-parent`)"))
    }

    pub fn name(&self) -> Result<Vec<u8>> {
        format::name_of(&self.public)
    }
}

/// The admin's approval to duplicate shareable KEKs to one parent: the key that signed, the
/// parent's Name, and the signature over [`approval_hash`].
pub struct Approval {
    pub admin: AdminPublic,
    pub parent_name: Vec<u8>,
    pub signature: Vec<u8>,
}

impl Approval {
    /// `kleidi tpm approve`: signs the duplication of this admin key's KEKs to `parent`.
    pub fn sign(admin_key: &Path, parent: &ParentFile) -> Result<Self> {
        // DER, read whole: a text file's trailing newline is trimmed by `read_secret`, and one key
        // in 256 ends in the byte 0x0a (the last byte of its public point).
        let pkcs8 = crate::credfile::read(admin_key, "--admin-key")?;
        let (pair, admin) = load_admin_key(&pkcs8)?;
        let parent_name = parent.name()?;
        let message = approval_message(&approved_policy(&parent_name));
        let signature = pair
            .sign(&SystemRandom::new(), &message)
            .map_err(|_| Error::Backend("signing the approval failed".into()))?;
        Ok(Self {
            admin,
            parent_name,
            signature: signature.as_ref().to_vec(),
        })
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        encode(
            APPROVAL_MAGIC,
            &[&self.admin.point, &self.parent_name, &self.signature],
        )
    }

    pub fn read(path: &Path) -> Result<Self> {
        let bytes = read_file(path, "approval")?;
        let parse_it = || {
            let parts = parse(&bytes, APPROVAL_MAGIC, 3)?;
            let [point, name, signature] = parts.as_slice() else {
                return None;
            };
            (signature.len() == SIGNATURE_LEN).then_some(())?;
            Some(Self {
                admin: AdminPublic::from_point(point)?,
                parent_name: name.to_vec(),
                signature: signature.to_vec(),
            })
        };
        parse_it().ok_or_else(|| not_a(path, "kleidi TPM approval (`kleidi tpm approve`)"))
    }
}

/// A shareable KEK duplicated to one parent (TPM2_Duplicate's output) and that parent's Name.
pub struct ExportFile {
    pub kek: Public,
    pub duplicate: Private,
    pub seed: EncryptedSecret,
    pub parent_name: Vec<u8>,
}

impl ExportFile {
    pub fn encode(&self) -> Result<Vec<u8>> {
        encode(
            EXPORT_MAGIC,
            &[
                &marshal(&self.kek)?,
                &self.duplicate,
                &self.seed,
                &self.parent_name,
            ],
        )
    }

    pub fn read(path: &Path) -> Result<Self> {
        let bytes = read_file(path, "export")?;
        let parse_it = || {
            let parts = parse(&bytes, EXPORT_MAGIC, 4)?;
            let [kek, duplicate, seed, parent_name] = parts.as_slice() else {
                return None;
            };
            Some(Self {
                kek: unmarshal(kek)?,
                duplicate: Private::try_from(duplicate.to_vec()).ok()?,
                seed: EncryptedSecret::try_from(seed.to_vec()).ok()?,
                parent_name: parent_name.to_vec(),
            })
        };
        parse_it().ok_or_else(|| not_a(path, "kleidi TPM export (`kleidi tpm export`)"))
    }
}

fn encode(magic: &[u8; 8], parts: &[&[u8]]) -> Result<Vec<u8>> {
    let mut out = magic.to_vec();
    for part in parts {
        put_sized(&mut out, part)?;
    }
    Ok(out)
}

/// Exactly `count` sized parts after `magic`, nothing after them.
fn parse<'b>(bytes: &'b [u8], magic: &[u8; 8], count: usize) -> Option<Vec<&'b [u8]>> {
    let mut rest = bytes.strip_prefix(magic.as_slice())?;
    let mut parts = Vec::with_capacity(count);
    for _ in 0..count {
        let (part, tail) = take_sized(rest)?;
        parts.push(part);
        rest = tail;
    }
    rest.is_empty().then_some(parts)
}

fn marshal(public: &Public) -> Result<Vec<u8>> {
    public
        .marshall()
        .map_err(|e| super::errors::library("marshal public", e))
}

/// A public area, only if it re-marshals to exactly these bytes.
fn unmarshal(bytes: &[u8]) -> Option<Public> {
    let public = Public::unmarshall(bytes).ok()?;
    (public.marshall().ok()? == bytes).then_some(public)
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::Config(format!("cannot read the {what} file {}: {e}", path.display())))
}

fn not_a(path: &Path, what: &str) -> Error {
    Error::Config(format!("{} is not a {what}", path.display()))
}

/// Writes a new file (never replaces one: an admin key or export overwritten by mistake is lost).
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let failed = |e: std::io::Error| Error::Config(format!("cannot write {}: {e}", path.display()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(failed)?;
    file.write_all(bytes).map_err(failed)?;
    file.sync_all().map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_admin_key_whose_der_ends_in_a_newline_byte_still_signs() {
        // Found in CI: `tpm approve` refused such a key as "InvalidEncoding", one key in 256.
        let dir = tempfile::tempdir().unwrap();
        let key = (0..20_000)
            .map(|i| {
                let key = dir.path().join(format!("admin{i}"));
                generate_admin_key(&key).unwrap();
                key
            })
            .find(|key| std::fs::read(key).unwrap().ends_with(b"\n"))
            .expect("one key in 256 ends in 0x0a");
        let parent = ParentFile {
            public: format::primary_template().unwrap(),
        };
        assert!(Approval::sign(&key, &parent).is_ok());
    }

    #[test]
    fn an_approval_signs_the_policy_hash_and_survives_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("admin");
        let admin = generate_admin_key(&key).unwrap();
        assert_eq!(AdminPublic::read(&pub_path(&key)).unwrap().point, admin.point);
        assert!(
            generate_admin_key(&key).is_err(),
            "an admin key is never overwritten"
        );
        let parent = ParentFile {
            public: format::primary_template().unwrap(),
        };
        let approval = Approval::sign(&key, &parent).unwrap();
        let path = dir.path().join("approval");
        write_new(&path, &approval.encode().unwrap(), 0o600).unwrap();
        let back = Approval::read(&path).unwrap();
        assert_eq!(back.parent_name, parent.name().unwrap());
        assert_eq!(back.signature.len(), SIGNATURE_LEN);
        // The signature verifies over approvedPolicy ‖ policyRef, i.e. over aHash as the TPM sees it.
        let message = approval_message(&approved_policy(&back.parent_name));
        assert_eq!(
            approval_hash(&approved_policy(&back.parent_name)),
            <[u8; 32]>::from(Sha256::digest(&message))
        );
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, admin.point)
            .verify(&message, &back.signature)
            .unwrap();
    }

    #[test]
    fn files_of_one_kind_are_not_read_as_another_or_with_trailing_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let parent = ParentFile {
            public: format::primary_template().unwrap(),
        };
        let path = dir.path().join("parent");
        let bytes = parent.encode().unwrap();
        std::fs::write(&path, &bytes).unwrap();
        assert!(ParentFile::read(&path).is_ok());
        assert!(Approval::read(&path).is_err());
        assert!(ExportFile::read(&path).is_err());
        std::fs::write(&path, [bytes.as_slice(), &[0]].concat()).unwrap();
        assert!(ParentFile::read(&path).is_err());
    }
}
