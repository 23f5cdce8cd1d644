//! The audit's reading of raw etcd values (`k8s:enc:kms:v2:<provider>:` ‖ an `EncryptedObject`,
//! the other transformers' prefixes, plaintext protobuf and JSON) and the apiserver's
//! `EncryptedObject` decoding, validation and cache key. Never panics; a value built the way the
//! apiserver writes one is classified as exactly what was written; an object that decodes and
//! validates re-encodes to one that decodes to the same object, and has a cache key.

#![no_main]

use std::collections::BTreeMap;

use arbitrary::{Arbitrary, Unstructured};
use kleidi_harness::apiserver::audit::{Audit, Class, SeedType, classify};
use kleidi_harness::apiserver::encrypted_object::{self, EncryptedObject, PREFIX_V2};
use libfuzzer_sys::fuzz_target;

/// A KMS v2 value as the apiserver writes it, from its parts.
#[derive(Arbitrary, Debug)]
struct Built<'a> {
    provider: &'a [u8],
    encrypted_data: Vec<u8>,
    key_id: String,
    encrypted_dek_source: Vec<u8>,
    annotations: BTreeMap<String, Vec<u8>>,
    encrypted_dek_source_type: i32,
}

// Input: a mode byte, then a raw etcd value (mode 0), an `EncryptedObject` body (1), or the
// parts of a KMS v2 value (2, read with `arbitrary`).
fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => raw(rest),
        1 => object(rest),
        _ => {
            if let Ok(built) = Built::arbitrary_take_rest(Unstructured::new(rest)) {
                built_value(built);
            }
        }
    }
});

fn raw(value: &[u8]) {
    let class = Audit::new().add(b"/registry/secrets/default/fuzz", value);
    // The audit prints every class it finds.
    let _ = class.to_string();
}

fn object(body: &[u8]) {
    let Ok(object) = encrypted_object::decode(body) else {
        return;
    };
    let encoded = encrypted_object::encode(&object).expect("a valid object encodes");
    assert_eq!(encrypted_object::decode(&encoded).ok(), Some(object.clone()));
    assert!(encrypted_object::cache_key(&object).is_ok(), "{object:?}");
}

fn built_value(built: Built<'_>) {
    let Built {
        provider,
        encrypted_data,
        key_id,
        encrypted_dek_source,
        annotations,
        encrypted_dek_source_type,
    } = built;
    // Provider names end at the first ':' and are not empty.
    if provider.is_empty() || provider.contains(&b':') {
        return;
    }
    let object = EncryptedObject {
        encrypted_data,
        key_id,
        encrypted_dek_source,
        annotations,
        encrypted_dek_source_type,
    };
    let mut value = PREFIX_V2.as_bytes().to_vec();
    value.extend_from_slice(provider);
    value.push(b':');
    value.extend_from_slice(&encrypted_object::marshal(&object));
    let Class::KmsV2(v) = classify(&value) else {
        panic!("not classified as KMS v2: {:?}", classify(&value));
    };
    assert_eq!(v.provider, String::from_utf8_lossy(provider));
    assert_eq!(v.key_id, object.key_id);
    assert_eq!(v.annotations, object.annotations);
    assert_eq!(v.encrypted_data_len, object.encrypted_data.len());
    assert_eq!(v.wrapped_len, object.encrypted_dek_source.len());
    let seed_type = match object.encrypted_dek_source_type {
        0 => SeedType::AesGcmKey,
        1 => SeedType::HkdfSha256XnonceAesGcmSeed,
        n => SeedType::Unknown(n),
    };
    assert_eq!(v.seed_type, seed_type);
    assert_eq!(v.problem, encrypted_object::validate(&object).err());
}
