//! The TPM backend's reading of a decrypt request and of its state directory: the key_id
//! (`tpm:<hex Name>`), the ciphertext (version ‖ a sealed object as `u16 len ‖ TPMT_PUBLIC ‖
//! u16 len ‖ private`) and the object encoding KEK files use. Never panics; what decodes is the
//! one canonical encoding (re-encoding gives the input back); every key_id the backend makes from
//! a decoded object parses; and a ciphertext sealed with the backend's own templates opens.
//!
//! Input: a mode byte, then either raw bytes (mode even) or, for mode odd, the private part of a
//! ciphertext built around the sealed-object template (bit 1 picks the node-bound or shareable one).

#![no_main]

use kleidi::fuzzing::tpm::{Blob, key_id, open_ciphertext, parse_key_id, sealed_template};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        let Ok(public) = sealed_template(mode & 2 == 0) else {
            return;
        };
        let Ok(private) = rest.to_vec().try_into() else {
            return;
        };
        let Ok(body) = (Blob { public, private }).encode() else {
            return;
        };
        let ciphertext = [&[1u8][..], &body].concat();
        // Any private part the TPM might have made is accepted; the TPM judges it.
        let opened = open_ciphertext(&ciphertext);
        assert_eq!(opened.is_some(), !rest.is_empty() && ciphertext.len() <= 1024);
        return;
    }
    if let Ok(text) = std::str::from_utf8(rest) {
        let _ = parse_key_id(text);
    }
    if let Some(blob) = Blob::decode(rest) {
        assert_eq!(blob.encode().ok().as_deref(), Some(rest));
        if let Ok(name) = blob.name() {
            let id = key_id(&name);
            assert!(parse_key_id(&id).is_some(), "{id}");
        }
    }
    if let Some(sealed) = open_ciphertext(rest) {
        assert_eq!(sealed.encode().ok().as_deref(), rest.get(1..));
    }
});
