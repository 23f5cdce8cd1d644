//! The Vault backend's checks before a decrypt reaches Vault (format annotation, a key_id of its
//! key `vault:<mount>/<key>:v<N>:<8 hex>`, a transit ciphertext `vault:v<N>:…` of that version),
//! and its reading of transit's batch-decrypt answer. Never panics; a request built the way the
//! backend builds its own always passes, and what passes is a transit ciphertext of the key_id's
//! version.

#![no_main]

use arbitrary::Arbitrary;
use kleidi::backend::FORMAT_ANNOTATION;
use kleidi::fuzzing::vault::{batch_answer, check_decrypt};
use kleidi::service::{Annotations, Encrypted};
use libfuzzer_sys::fuzz_target;

/// The value of the format annotation the backend writes.
const FORMAT: &[u8] = b"vault-transit-aad/1";
const PREFIX: &str = "vault:transit/kleidi:v";

#[derive(Arbitrary, Debug)]
enum Input<'a> {
    /// A request as a client may send it.
    Request {
        key_id: &'a str,
        ciphertext: &'a [u8],
        annotations: Vec<(&'a str, &'a [u8])>,
        ours: bool,
    },
    /// A request as the backend would have written it, for any version and body.
    Own {
        version: u64,
        tag: [u8; 4],
        body: &'a str,
    },
    /// The `data` of transit's answer to a batch decrypt.
    BatchAnswer(&'a [u8]),
}

fn format_only() -> Annotations {
    Annotations::from([(FORMAT_ANNOTATION.to_owned(), FORMAT.to_vec())])
}

fuzz_target!(|input: Input<'_>| match input {
    Input::Request {
        key_id,
        ciphertext,
        annotations,
        ours,
    } => {
        let mut annotations: Annotations = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
            .collect();
        if ours {
            annotations.extend(format_only());
        }
        let encrypted = Encrypted {
            ciphertext: ciphertext.to_vec(),
            key_id: key_id.to_owned(),
            annotations,
        };
        if let Ok(transit) = check_decrypt(PREFIX, &encrypted) {
            assert_eq!(transit.as_bytes(), ciphertext);
            assert!(transit.starts_with("vault:v"));
            assert!(key_id.starts_with(PREFIX));
        }
    }
    Input::Own { version, tag, body } => {
        let encrypted = Encrypted {
            ciphertext: format!("vault:v{version}:{body}").into_bytes(),
            key_id: format!(
                "{PREFIX}{version}:{:02x}{:02x}{:02x}{:02x}",
                tag[0], tag[1], tag[2], tag[3]
            ),
            annotations: format_only(),
        };
        let transit = check_decrypt(PREFIX, &encrypted).unwrap_or_else(|e| panic!("{encrypted:?}: {e}"));
        assert_eq!(transit.as_bytes(), encrypted.ciphertext);
    }
    Input::BatchAnswer(json) => {
        let _ = batch_answer(json);
    }
});
