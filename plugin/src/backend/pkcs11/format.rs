//! Bytes and files: the ciphertext layout, key_ids, PIN files and the key templates. Pure helpers,
//! checked without a token.

use std::path::Path;

use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::types::{AuthPin, RawAuthPin};
use secrecy::SecretBox;
use zeroize::{Zeroize, Zeroizing};

use super::errors::bad_ciphertext;
use super::{FORMAT, Pkcs11Config};
use crate::backend::FORMAT_ANNOTATION;
use crate::service::Annotations;
use crate::{Error, Result};

/// First byte of every ciphertext: the layout version.
pub(super) const VERSION: u8 = 0x01;
pub(super) const IV_LEN: usize = 12;
pub(super) const TAG_LEN: usize = 16;
pub(super) const TAG_BITS: u64 = 128;
pub(super) const HEADER_LEN: usize = 1 + IV_LEN;
/// The apiserver rejects ciphertexts and key_ids longer than this (kms.md 2.1).
pub(super) const MAX_WIRE_LEN: usize = 1024;
/// Largest plaintext whose ciphertext still fits in [`MAX_WIRE_LEN`].
pub(super) const MAX_PLAINTEXT: usize = MAX_WIRE_LEN - HEADER_LEN - TAG_LEN;
/// Length of the random CKA_ID `init` gives a new key.
pub(super) const KEY_ID_BYTES: usize = 16;
pub(super) const KEY_ID_PREFIX: &str = "pkcs11:";
/// PKCS#11 token labels are 32 bytes, blank padded.
pub(super) const MAX_TOKEN_LABEL: usize = 32;

/// The flag naming the user PIN file, for errors.
pub(super) const PIN_FLAG: &str = "--pkcs11-pin-file";
/// The flag naming the security officer PIN file, for errors.
pub(super) const SO_PIN_FLAG: &str = "--pkcs11-so-pin-file";

/// Reads a PIN file (named by `flag` in errors; refused if other users can read or change it, see
/// [`credfile`](crate::credfile)): the whole content minus one trailing newline, zeroizing. Blocking.
pub(super) fn read_pin(path: &Path, flag: &str) -> Result<Zeroizing<Vec<u8>>> {
    let raw = crate::credfile::read(path, flag)?;
    let mut pin: &[u8] = &raw;
    if let Some(rest) = pin.strip_suffix(b"\n") {
        pin = rest.strip_suffix(b"\r").unwrap_or(rest);
    }
    if pin.is_empty() {
        return Err(Error::Config(format!("{flag} {} is empty", path.display())));
    }
    // `to_vec` allocates exactly `len`, so later conversions into boxes never reallocate (and leave
    // an unzeroized copy behind).
    Ok(Zeroizing::new(pin.to_vec()))
}

pub(super) fn raw_pin(pin: &[u8]) -> RawAuthPin {
    SecretBox::new(Box::new(pin.to_vec()))
}

/// A PIN as the UTF-8 string `C_InitToken`/`C_InitPIN` take in cryptoki.
pub(super) fn text_pin(pin: &[u8], what: &str) -> Result<AuthPin> {
    match String::from_utf8(pin.to_vec()) {
        Ok(s) => Ok(AuthPin::from(s)),
        Err(e) => {
            e.into_bytes().zeroize();
            Err(Error::Config(format!("the {what} is not UTF-8 text")))
        }
    }
}

/// `pkcs11:<label>:<hex CKA_ID>`; refuses keys without a CKA_ID.
pub fn key_id_for(label: &str, id: Option<&[u8]>) -> Result<String> {
    let id = match id {
        Some(id) if !id.is_empty() => id,
        _ => {
            return Err(Error::Config(format!(
                "the key labelled {label:?} has no CKA_ID, and kleidi derives the key_id from it; \
                 give it a unique CKA_ID (e.g. `pkcs11-tool --login --type secrkey --label {label} \
                 --set-id <hex>` ... ) or create a new key with `kleidi pkcs11 init --pkcs11-key-label <new label>`"
            )));
        }
    };
    let key_id = format!("{KEY_ID_PREFIX}{label}:{}", hex::encode(id));
    if key_id.len() > MAX_WIRE_LEN {
        return Err(Error::Config(format!(
            "the key_id for key label {label:?} would be {} bytes; the apiserver allows {MAX_WIRE_LEN}",
            key_id.len()
        )));
    }
    Ok(key_id)
}

/// Splits a key_id into label and CKA_ID (on the last ':'); `None` unless it is exactly what
/// [`key_id_for`] produces.
pub fn parse_key_id(key_id: &str) -> Option<(&str, Vec<u8>)> {
    let (label, hex_id) = key_id.strip_prefix(KEY_ID_PREFIX)?.rsplit_once(':')?;
    let id = hex::decode(hex_id).ok()?;
    (!label.is_empty() && !id.is_empty() && hex::encode(&id) == hex_id).then_some((label, id))
}

/// Checks the annotation and the layout; returns the IV and the GCM ciphertext ‖ tag.
pub fn split_ciphertext<'c>(
    annotations: &Annotations,
    ciphertext: &'c [u8],
) -> Result<([u8; IV_LEN], &'c [u8])> {
    match annotations.get(FORMAT_ANNOTATION) {
        None => {
            return Err(bad_ciphertext(format!(
                "the {FORMAT_ANNOTATION} annotation is missing; kleidi's pkcs11 backend writes {FORMAT}"
            )));
        }
        Some(format) if format.as_slice() != FORMAT.as_bytes() => {
            let shown: String = String::from_utf8_lossy(format).chars().take(64).collect();
            return Err(bad_ciphertext(format!(
                "unknown ciphertext format {shown:?} in annotation {FORMAT_ANNOTATION}; this build reads {FORMAT}"
            )));
        }
        Some(_) => {}
    }
    let Some((&version, rest)) = ciphertext.split_first() else {
        return Err(bad_ciphertext("empty ciphertext".into()));
    };
    if version != VERSION {
        return Err(bad_ciphertext(format!(
            "ciphertext version {version:#04x}; {FORMAT} is version {VERSION:#04x}"
        )));
    }
    if ciphertext.len() <= HEADER_LEN + TAG_LEN || ciphertext.len() > MAX_WIRE_LEN {
        return Err(bad_ciphertext(format!(
            "ciphertext is {} bytes; {FORMAT} needs {} to {MAX_WIRE_LEN}",
            ciphertext.len(),
            HEADER_LEN + TAG_LEN + 1
        )));
    }
    let (iv, body) = rest
        .split_at_checked(IV_LEN)
        .ok_or_else(|| bad_ciphertext("ciphertext too short for its IV".into()))?;
    let iv =
        <[u8; IV_LEN]>::try_from(iv).map_err(|_| bad_ciphertext("ciphertext too short for its IV".into()))?;
    Ok((iv, body))
}

pub(super) fn validate(cfg: &Pkcs11Config) -> Result<()> {
    if cfg.token_label.is_empty() || cfg.token_label.len() > MAX_TOKEN_LABEL {
        return Err(Error::Config(format!(
            "the token label {:?} must be 1 to {MAX_TOKEN_LABEL} bytes",
            cfg.token_label
        )));
    }
    if cfg.key_label.is_empty() {
        return Err(Error::Config("the key label must not be empty".into()));
    }
    // The longest key_id we would produce must fit the apiserver's limit.
    key_id_for(&cfg.key_label, Some(&[0; KEY_ID_BYTES]))?;
    Ok(())
}

pub(super) fn secret_key(label: &str) -> [Attribute; 2] {
    [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

#[cfg(test)]
mod tests {
    // What holds the PIN (the last one the token rejected, kept to never present it twice) has no
    // Debug or Display, so no log line, error or panic message can print it; Pkcs11Backend's own
    // Debug names the module path and labels only.
    static_assertions::assert_not_impl_any!(
        crate::backend::pkcs11::session::Login: std::fmt::Debug,
        std::fmt::Display
    );
    static_assertions::assert_not_impl_any!(
        crate::backend::pkcs11::session::Inner: std::fmt::Debug,
        std::fmt::Display
    );

    use super::*;

    fn annotated() -> Annotations {
        Annotations::from([(FORMAT_ANNOTATION.to_owned(), FORMAT.as_bytes().to_vec())])
    }

    #[test]
    fn key_ids_round_trip_and_split_on_the_last_colon() {
        let key_id = key_id_for("team:a:kek", Some(&[0xab, 0x01])).unwrap();
        assert_eq!(key_id, "pkcs11:team:a:kek:ab01");
        assert_eq!(parse_key_id(&key_id), Some(("team:a:kek", vec![0xab, 0x01])));
    }

    #[test]
    fn malformed_key_ids_are_refused() {
        for bad in [
            "",
            "pkcs11:",
            "pkcs11:kek",
            "pkcs11::ab",
            "pkcs11:kek:",
            "pkcs11:kek:zz",
            "pkcs11:kek:AB",
            "pkcs11:kek:abc",
            "vault:v1:kek:ab",
        ] {
            assert_eq!(parse_key_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_key_without_cka_id_is_a_config_error_saying_how_to_fix_it() {
        for id in [None, Some(&[][..])] {
            let err = key_id_for("kek", id).unwrap_err();
            assert!(matches!(err, Error::Config(_)));
            assert!(err.to_string().contains("CKA_ID"), "{err}");
            assert!(err.to_string().contains("kleidi pkcs11 init"), "{err}");
        }
    }

    #[test]
    fn layout_is_checked_before_the_token() {
        let good = [vec![VERSION], vec![0; IV_LEN], vec![0; 32 + TAG_LEN]].concat();
        assert!(split_ciphertext(&annotated(), &good).is_ok());
        let mut wrong_version = good.clone();
        wrong_version[0] = 2;
        assert!(split_ciphertext(&annotated(), &wrong_version).is_err());
        assert!(split_ciphertext(&annotated(), &good[..HEADER_LEN + TAG_LEN]).is_err());
        assert!(split_ciphertext(&annotated(), &[]).is_err());
        assert!(split_ciphertext(&Annotations::new(), &good).is_err());
        let other = Annotations::from([(FORMAT_ANNOTATION.to_owned(), b"tpm-v9".to_vec())]);
        let err = split_ciphertext(&other, &good).unwrap_err().to_string();
        assert!(err.contains("tpm-v9"), "{err}");
    }

    #[test]
    fn pin_files_lose_exactly_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        for (content, pin) in [
            (&b"1234\n"[..], &b"1234"[..]),
            (b"1234", b"1234"),
            (b"1234\r\n", b"1234"),
            (b"12 34\n\n", b"12 34\n"),
        ] {
            write_private(&path, content);
            assert_eq!(&*read_pin(&path, PIN_FLAG).unwrap(), pin);
        }
        write_private(&path, b"\n");
        assert!(matches!(read_pin(&path, PIN_FLAG), Err(Error::Config(_))));
    }

    fn write_private(path: &Path, content: &[u8]) {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::write(path, content).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn pin_files_other_users_can_read_are_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        write_private(&path, b"1234\n");
        assert_eq!(&*read_pin(&path, SO_PIN_FLAG).unwrap(), b"1234");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_pin(&path, SO_PIN_FLAG).unwrap_err().to_string();
        assert!(
            err.contains("--pkcs11-so-pin-file") && err.contains("mode 0644") && !err.contains("1234"),
            "{err}"
        );
    }
}
