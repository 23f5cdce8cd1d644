//! The `EncryptedObject` kube-apiserver stores after `k8s:enc:kms:v2:<provider>:` (spec 3): the generated
//! message, its encoding written the way Go's marshallers write it, the apiserver's validation rules
//! (spec 2.1, checked on every encode and decode) and the read-cache key (spec 2.4). No cryptography here.

use std::collections::BTreeMap;

use prost::Message;
use sha2::{Digest, Sha256};

use super::Error;

/// Generated from `proto/k8s/apiserver/kmsv2/encrypted_object.proto` (annotations as a sorted map).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/apiserver.kmsv2.rs"));
}

pub use pb::{EncryptedDekSourceType, EncryptedObject};

/// The fixed part of every KMS v2 etcd value; the provider name and `:` follow.
pub const PREFIX_V2: &str = "k8s:enc:kms:v2:";
/// `KeyIDMaxSize`: longest accepted key ID, in bytes.
pub const KEY_ID_MAX: usize = 1024;
/// `encryptedDEKSourceMaxSize`: longest accepted wrapped DEK/seed, in bytes.
pub const DEK_SOURCE_MAX: usize = 1024;
/// `annotationsMaxSize`: largest accepted sum of annotation key and value lengths, in bytes.
pub const ANNOTATIONS_MAX: usize = 32 * 1024;

/// One broken rule of the apiserver's `ValidateEncryptedObject` (spec 2.1); messages follow upstream.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// `encryptedDEKSourceType` is neither 0 nor 1.
    #[error("unknown encryptedDEKSourceType: {0}")]
    UnknownType(i32),
    /// `encryptedData` is empty.
    #[error("encrypted data is empty")]
    EmptyData,
    /// `encryptedDEKSource` (the plugin's ciphertext) is empty.
    #[error("encrypted DEK source is empty")]
    EmptyDekSource,
    /// `encryptedDEKSource` is over 1024 bytes.
    #[error("encrypted DEK source is {0} bytes, which exceeds the max size of {DEK_SOURCE_MAX}")]
    DekSourceTooLong(usize),
    /// The key ID is empty.
    #[error("keyID is empty")]
    EmptyKeyId,
    /// The key ID is over 1024 bytes.
    #[error("keyID is {0} bytes, which exceeds the max size of {KEY_ID_MAX}")]
    KeyIdTooLong(usize),
    /// An annotation key is not a fully qualified domain name.
    #[error("annotation key {0:?} is not a fully qualified domain name")]
    AnnotationKey(String),
    /// Annotation keys and values add up to more than 32 KiB.
    #[error("annotations total {0} bytes, which exceeds the max size of {ANNOTATIONS_MAX}")]
    AnnotationsTooLarge(usize),
}

/// Protobuf-decodes and validates an `EncryptedObject`, as the apiserver does on every read.
pub fn decode(bytes: &[u8]) -> Result<EncryptedObject, Error> {
    let object = EncryptedObject::decode(bytes)?;
    validate(&object)?;
    Ok(object)
}

/// Validates and encodes an `EncryptedObject`, as the apiserver does on every write.
pub fn encode(object: &EncryptedObject) -> Result<Vec<u8>, Error> {
    validate(object)?;
    Ok(marshal(object))
}

/// Encodes like Go's gogo/protobuf-go `Marshal`: fields in number order, proto3 defaults omitted, and
/// each annotation entry with both key and value even when empty (prost would drop an empty value,
/// spec 3.2). Annotations go out in sorted order; Go's order is random with two or more.
pub fn marshal(object: &EncryptedObject) -> Vec<u8> {
    let mut out = Vec::with_capacity(object.encoded_len() + 8);
    if !object.encrypted_data.is_empty() {
        put_bytes(&mut out, 1, &object.encrypted_data);
    }
    if !object.key_id.is_empty() {
        put_bytes(&mut out, 2, object.key_id.as_bytes());
    }
    if !object.encrypted_dek_source.is_empty() {
        put_bytes(&mut out, 3, &object.encrypted_dek_source);
    }
    for (key, value) in &object.annotations {
        let mut entry = Vec::with_capacity(key.len() + value.len() + 6);
        put_bytes(&mut entry, 1, key.as_bytes());
        put_bytes(&mut entry, 2, value);
        put_bytes(&mut out, 4, &entry);
    }
    if object.encrypted_dek_source_type != 0 {
        put_varint(&mut out, 5 << 3);
        // proto3 int32: negative values are sign-extended to 64 bits, as in Go.
        put_varint(&mut out, i64::from(object.encrypted_dek_source_type) as u64);
    }
    out
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// `ValidateEncryptedObject`: type, data, DEK source, key ID, annotations, in upstream's order.
pub fn validate(object: &EncryptedObject) -> Result<(), Violation> {
    if EncryptedDekSourceType::try_from(object.encrypted_dek_source_type).is_err() {
        return Err(Violation::UnknownType(object.encrypted_dek_source_type));
    }
    if object.encrypted_data.is_empty() {
        return Err(Violation::EmptyData);
    }
    validate_dek_source(&object.encrypted_dek_source)?;
    validate_key_id(&object.key_id)?;
    validate_annotations(&object.annotations)
}

/// `validateEncryptedDEKSource`: 1..=1024 bytes.
pub fn validate_dek_source(source: &[u8]) -> Result<(), Violation> {
    match source.len() {
        0 => Err(Violation::EmptyDekSource),
        n if n > DEK_SOURCE_MAX => Err(Violation::DekSourceTooLong(n)),
        _ => Ok(()),
    }
}

/// `ValidateKeyID`: 1..=1024 bytes (Status and Encrypt key IDs, and stored ones).
pub fn validate_key_id(key_id: &str) -> Result<(), Violation> {
    match key_id.len() {
        0 => Err(Violation::EmptyKeyId),
        n if n > KEY_ID_MAX => Err(Violation::KeyIdTooLong(n)),
        _ => Ok(()),
    }
}

/// `validateAnnotations`: every key an FQDN, keys + values at most 32 KiB in total.
pub fn validate_annotations(annotations: &BTreeMap<String, Vec<u8>>) -> Result<(), Violation> {
    if let Some(bad) = annotations
        .keys()
        .find(|key| !is_fully_qualified_domain_name(key))
    {
        return Err(Violation::AnnotationKey(bad.clone()));
    }
    let total: usize = annotations
        .iter()
        .map(|(key, value)| key.len() + value.len())
        .sum();
    if total > ANNOTATIONS_MAX {
        return Err(Violation::AnnotationsTooLarge(total));
    }
    Ok(())
}

/// apimachinery `IsFullyQualifiedDomainName`: one trailing `.` dropped, then a DNS-1123 subdomain (at most
/// 253 characters) of at least two labels, each `[a-z0-9]([-a-z0-9]*[a-z0-9])?` and at most 63 long.
pub fn is_fully_qualified_domain_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = name.split('.').collect();
    labels.len() >= 2 && labels.iter().all(|label| is_dns1123_label(label))
}

fn is_dns1123_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            bytes.len() <= 63 && alnum(first) && alnum(last) && bytes.iter().all(|b| alnum(b) || *b == b'-')
        }
        _ => false,
    }
}

/// `generateCacheKey` (cryptobyte, big-endian): `u32 type ‖ u16len dekSource ‖ u16len keyID` and, only if
/// there are annotations, `u32 count` then each sorted `u16len key ‖ u16len value`.
pub fn cache_key(object: &EncryptedObject) -> Result<Vec<u8>, Violation> {
    let mut out = Vec::with_capacity(16 + object.encrypted_dek_source.len() + object.key_id.len());
    out.extend_from_slice(&(object.encrypted_dek_source_type as u32).to_be_bytes());
    put_u16_prefixed(&mut out, &object.encrypted_dek_source).map_err(Violation::DekSourceTooLong)?;
    put_u16_prefixed(&mut out, object.key_id.as_bytes()).map_err(Violation::KeyIdTooLong)?;
    if object.annotations.is_empty() {
        return Ok(out);
    }
    let count = u32::try_from(object.annotations.len())
        .map_err(|_| Violation::AnnotationsTooLarge(object.annotations.len()))?;
    out.extend_from_slice(&count.to_be_bytes());
    // BTreeMap iterates in byte order of the keys, which is Go's sort.Strings order.
    for (key, value) in &object.annotations {
        put_u16_prefixed(&mut out, key.as_bytes()).map_err(Violation::AnnotationsTooLarge)?;
        put_u16_prefixed(&mut out, value).map_err(Violation::AnnotationsTooLarge)?;
    }
    Ok(out)
}

fn put_u16_prefixed(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), usize> {
    let len = u16::try_from(bytes.len()).map_err(|_| bytes.len())?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

/// The apiserver's `GetHashIfNotEmpty`: `sha256:<hex>` of a key ID, or empty for an empty one.
pub fn key_id_hash(key_id: &str) -> String {
    if key_id.is_empty() {
        return String::new();
    }
    format!("sha256:{}", hex::encode(Sha256::digest(key_id.as_bytes())))
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    fn object() -> EncryptedObject {
        EncryptedObject {
            encrypted_data: vec![1, 2, 3],
            key_id: "kleidi-kms-plugin".into(),
            encrypted_dek_source: vec![9; 64],
            annotations: BTreeMap::from([("version.encryption.remote.io".into(), b"1".to_vec())]),
            encrypted_dek_source_type: EncryptedDekSourceType::HkdfSha256XnonceAesGcmSeed as i32,
        }
    }

    #[rstest]
    #[case("version.encryption.remote.io", true)]
    #[case("local-kek.kms.kubernetes.io", true)]
    #[case("local-kek.kms.kubernetes.io.", true)]
    #[case("a.b", true)]
    #[case("foo", false)]
    #[case("kms.example.io/x", false)]
    #[case("Upper.example.io", false)]
    #[case("under_score.example.io", false)]
    #[case("-dash.example.io", false)]
    #[case("dash-.example.io", false)]
    #[case("a..b", false)]
    #[case("", false)]
    #[case(".", false)]
    fn fqdn_rule_matches_apimachinery(#[case] name: &str, #[case] valid: bool) {
        assert_eq!(is_fully_qualified_domain_name(name), valid, "{name:?}");
    }

    #[test]
    fn fqdn_rule_limits_label_and_name_length() {
        let label63 = "a".repeat(63);
        assert!(is_fully_qualified_domain_name(&format!("{label63}.io")));
        assert!(!is_fully_qualified_domain_name(&format!("a{label63}.io")));
        let long = [label63.as_str(); 4].join(".");
        assert_eq!(long.len(), 255);
        assert!(!is_fully_qualified_domain_name(&long));
    }

    #[test]
    fn limits_accept_exactly_the_maximum_and_reject_one_more() {
        assert_eq!(validate_key_id(&"k".repeat(1024)), Ok(()));
        assert_eq!(
            validate_key_id(&"k".repeat(1025)),
            Err(Violation::KeyIdTooLong(1025))
        );
        assert_eq!(validate_key_id(""), Err(Violation::EmptyKeyId));
        assert_eq!(validate_dek_source(&[0; 1024]), Ok(()));
        assert_eq!(
            validate_dek_source(&[0; 1025]),
            Err(Violation::DekSourceTooLong(1025))
        );
        assert_eq!(validate_dek_source(&[]), Err(Violation::EmptyDekSource));
        let key = "a.io".to_string();
        let exact = BTreeMap::from([(key.clone(), vec![0; ANNOTATIONS_MAX - key.len()])]);
        assert_eq!(validate_annotations(&exact), Ok(()));
        let over = BTreeMap::from([(key.clone(), vec![0; ANNOTATIONS_MAX - key.len() + 1])]);
        assert_eq!(
            validate_annotations(&over),
            Err(Violation::AnnotationsTooLarge(ANNOTATIONS_MAX + 1))
        );
    }

    #[test]
    fn validation_rejects_unknown_type_and_empty_data() {
        let mut bad = object();
        bad.encrypted_dek_source_type = 2;
        assert_eq!(validate(&bad), Err(Violation::UnknownType(2)));
        let mut bad = object();
        bad.encrypted_data.clear();
        assert_eq!(validate(&bad), Err(Violation::EmptyData));
    }

    #[test]
    fn marshal_matches_prost_when_no_value_is_empty() {
        let object = object();
        assert_eq!(marshal(&object), object.encode_to_vec());
    }

    #[test]
    fn marshal_writes_empty_annotation_values_like_go() {
        let mut object = object();
        object.annotations = BTreeMap::from([("a.io".into(), Vec::new())]);
        object.encrypted_dek_source_type = 0;
        let bytes = marshal(&object);
        // entry: 22 08 | 0a 04 "a.io" | 12 00
        assert!(bytes.ends_with(&[0x22, 0x08, 0x0a, 0x04, b'a', b'.', b'i', b'o', 0x12, 0x00]));
        assert_eq!(EncryptedObject::decode(bytes.as_slice()).unwrap(), object);
        assert_ne!(bytes, object.encode_to_vec(), "prost drops the empty value");
    }

    #[test]
    fn cache_key_layout_is_big_endian_with_sorted_annotations() {
        let mut object = object();
        object.encrypted_dek_source = vec![0xaa, 0xbb];
        object.key_id = "1".into();
        object.annotations = BTreeMap::from([("b.io".into(), b"2".to_vec()), ("a.io".into(), b"1".to_vec())]);
        let expected = [
            &[0, 0, 0, 1][..],
            &[0, 2, 0xaa, 0xbb],
            &[0, 1, b'1'],
            &[0, 0, 0, 2],
            &[0, 4, b'a', b'.', b'i', b'o', 0, 1, b'1'],
            &[0, 4, b'b', b'.', b'i', b'o', 0, 1, b'2'],
        ]
        .concat();
        assert_eq!(cache_key(&object).unwrap(), expected);
        object.annotations.clear();
        assert_eq!(
            cache_key(&object).unwrap(),
            [&[0, 0, 0, 1][..], &[0, 2, 0xaa, 0xbb], &[0, 1, b'1']].concat()
        );
    }

    #[test]
    fn key_id_hash_is_sha256_hex_or_empty() {
        assert_eq!(key_id_hash(""), "");
        assert_eq!(
            key_id_hash("1"),
            "sha256:6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b"
        );
    }
}
