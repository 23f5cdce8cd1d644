//! The KMS v1 `cipher` a client sends back (`kleidi.v1:` ‖ a `WrappedKey` protobuf): decoding never
//! panics, and whatever decodes re-encodes to a cipher that decodes to the same wrapped key.

#![no_main]

use kleidi::grpc::{decode_v1_cipher, encode_v1_cipher};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(encrypted) = decode_v1_cipher(data) else {
        return;
    };
    // What the guard then checks: never panics either.
    let _ = kleidi::guard::check_encrypted(&encrypted);
    let again = encode_v1_cipher(encrypted.clone());
    assert_eq!(decode_v1_cipher(&again).ok(), Some(encrypted));
});
