//! The PKCS#11 backend's reading of a decrypt request: the key_id (`pkcs11:<label>:<hex CKA_ID>`),
//! the format annotation and the ciphertext layout (version ‖ IV ‖ GCM ciphertext ‖ tag). Never
//! panics; a key_id it accepts is exactly the one `key_id_for` makes from what it returns; an
//! accepted ciphertext splits into its parts without losing a byte.

#![no_main]

use arbitrary::Arbitrary;
use kleidi::fuzzing::pkcs11::{key_id_for, parse_key_id, split_ciphertext};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Request<'a> {
    key_id: &'a str,
    annotations: Vec<(&'a str, &'a [u8])>,
    /// Use the annotation the backend writes instead of (or besides) the ones above.
    ours: bool,
    ciphertext: &'a [u8],
}

fuzz_target!(|req: Request<'_>| {
    if let Some((label, id)) = parse_key_id(req.key_id) {
        // Longer key_ids never reach the backend: the guard refuses them (and `key_id_for` would).
        if req.key_id.len() <= 1024 {
            assert_eq!(key_id_for(label, Some(&id)).ok().as_deref(), Some(req.key_id));
        }
    }
    let mut annotations: kleidi::service::Annotations = req
        .annotations
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
        .collect();
    if req.ours {
        annotations.insert(
            kleidi::backend::FORMAT_ANNOTATION.into(),
            kleidi::backend::pkcs11::FORMAT.as_bytes().to_vec(),
        );
    }
    if let Ok((iv, body)) = split_ciphertext(&annotations, req.ciphertext) {
        assert_eq!(1 + iv.len() + body.len(), req.ciphertext.len());
        assert_eq!(req.ciphertext.get(1..13), Some(iv.as_slice()));
    }
});
