//! The pkcs11 backend in process against a real SoftHSM2 token: what `kleidi serve` relies on from
//! it (wrapping, key ids, rotation, refusing foreign ciphertexts, recovering from token loss,
//! concurrency, never hammering a wrong PIN). Needs `apt-get install softhsm2`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // tests

#[path = "common/softhsm.rs"]
mod softhsm;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kleidi::backend::FORMAT_ANNOTATION;
use kleidi::backend::pkcs11::{FORMAT, Pkcs11Backend, Pkcs11Config};
use kleidi::{Encrypted, Error, KeyService};
use secrecy::{ExposeSecret, SecretSlice};
use softhsm::{PIN, Token, seed, store, token_dir};

async fn round_trip(backend: &Pkcs11Backend) -> Encrypted {
    let plaintext = seed();
    let encrypted = backend.encrypt("uid", &plaintext).await.unwrap();
    let decrypted = backend.decrypt("uid", &encrypted).await.unwrap();
    assert_eq!(decrypted.expose_secret(), plaintext.expose_secret());
    encrypted
}

#[track_caller]
fn assert_bad_ciphertext(result: kleidi::Result<SecretSlice<u8>>, what: &str) -> String {
    match result {
        Err(err @ Error::BadCiphertext(_)) => err.to_string(),
        Err(other) => panic!("{what}: expected BadCiphertext, got {other:?}"),
        Ok(_) => panic!("{what}: decrypted"),
    }
}

#[track_caller]
fn assert_token_lost<T>(result: kleidi::Result<T>, what: &str) {
    match result {
        Err(Error::Unavailable {
            backend: "pkcs11",
            class: "token_lost",
            ..
        }) => {}
        Err(other) => panic!("{what}: expected Unavailable token_lost, got {other:?}"),
        Ok(_) => panic!("{what}: succeeded while the token is gone"),
    }
}

#[track_caller]
fn assert_pin_denied<T>(result: kleidi::Result<T>) -> String {
    match result {
        Err(
            err @ Error::Denied {
                backend: "pkcs11",
                class: "pin_incorrect",
                ..
            },
        ) => err.to_string(),
        Err(other) => panic!("expected Denied pin_incorrect, got {other:?}"),
        Ok(_) => panic!("succeeded with a wrong PIN"),
    }
}

#[tokio::test]
async fn init_is_idempotent_and_a_second_run_creates_nothing() {
    let token = Token::new("idempotent");
    let first = token.init("kek").await;
    assert!(first.token_created && first.key_created, "{first:?}");
    assert!(first.key_id.starts_with("pkcs11:kek:"), "{first:?}");
    assert_eq!(
        first.key_id.len(),
        "pkcs11:kek:".len() + 32,
        "16-byte CKA_ID in hex"
    );

    let second = token.init("kek").await;
    assert!(!second.token_created && !second.key_created, "{second:?}");
    assert_eq!(second.key_id, first.key_id);

    // A second key on the existing token: only the key is created.
    let third = token.init("kek-2").await;
    assert!(!third.token_created && third.key_created, "{third:?}");
    assert_ne!(third.key_id, first.key_id);
}

#[tokio::test]
async fn keys_made_under_the_same_label_get_different_key_ids() {
    let a = Token::new("same-label-a").init("kek").await;
    let b = Token::new("same-label-b").init("kek").await;
    assert_ne!(
        a.key_id, b.key_id,
        "a new key under a used label must get a new key_id"
    );
}

#[tokio::test]
async fn a_32_byte_seed_round_trips() {
    let token = Token::new("round-trip");
    let backend = token.backend("kek").await;
    let encrypted = round_trip(&backend).await;
    assert_eq!(encrypted.ciphertext.len(), 1 + 12 + 32 + 16);
    assert_eq!(encrypted.ciphertext[0], 0x01, "format version byte");
    assert_eq!(
        encrypted.annotations.get(FORMAT_ANNOTATION).map(Vec::as_slice),
        Some(FORMAT.as_bytes())
    );
    assert_eq!(FORMAT, "pkcs11-aes-256-gcm-v1");
    assert_eq!(backend.name(), "pkcs11");
}

#[tokio::test]
async fn two_encryptions_of_the_same_seed_differ() {
    let token = Token::new("distinct");
    let backend = token.backend("kek").await;
    let plaintext = seed();
    let a = backend.encrypt("uid", &plaintext).await.unwrap();
    let b = backend.encrypt("uid", &plaintext).await.unwrap();
    assert_ne!(a.ciphertext, b.ciphertext);
    assert_ne!(a.ciphertext[1..13], b.ciphertext[1..13], "fresh IV per call");
    for e in [a, b] {
        let p = backend.decrypt("uid", &e).await.unwrap();
        assert_eq!(p.expose_secret(), plaintext.expose_secret());
    }
}

#[tokio::test]
async fn encrypt_returns_the_key_id_that_current_key_id_reports() {
    let token = Token::new("key-id");
    let outcome = token.init("kek").await;
    let backend = Pkcs11Backend::connect(token.config("kek")).await.unwrap();
    let current = backend.current_key_id().await.unwrap();
    assert_eq!(current, outcome.key_id);
    let encrypted = backend.encrypt("uid", &seed()).await.unwrap();
    assert_eq!(encrypted.key_id, current);
    assert_eq!(backend.current_key_id().await.unwrap(), current, "stable");
    assert!(
        !format!("{backend:?}").contains(PIN),
        "Debug must not show the PIN"
    );
}

#[tokio::test]
async fn rotation_to_a_new_key_label_changes_the_key_id_and_old_ciphertexts_still_decrypt() {
    let token = Token::new("rotation");
    let old = token.backend("kek-1").await;
    let old_ciphertext = round_trip(&old).await;

    let new = token.backend("kek-2").await;
    let new_key_id = new.current_key_id().await.unwrap();
    assert_ne!(new_key_id, old_ciphertext.key_id);
    let new_ciphertext = round_trip(&new).await;
    assert_eq!(new_ciphertext.key_id, new_key_id);

    // The new backend still holds (on the token) the key the old ciphertext names.
    let plaintext = new.decrypt("uid", &old_ciphertext).await.unwrap();
    assert_eq!(
        plaintext.expose_secret(),
        old.decrypt("uid", &old_ciphertext).await.unwrap().expose_secret()
    );
    // And the old backend reads the new key's ciphertexts too (same token).
    old.decrypt("uid", &new_ciphertext).await.unwrap();
}

#[tokio::test]
async fn tampering_with_any_byte_region_is_a_bad_ciphertext() {
    let token = Token::new("tamper");
    let backend = token.backend("kek").await;
    let good = round_trip(&backend).await;
    let regions = |i: usize| match i {
        0 => "version",
        1..=12 => "iv",
        13..=44 => "ciphertext",
        _ => "tag",
    };
    for i in 0..good.ciphertext.len() {
        let mut bad = good.clone();
        bad.ciphertext[i] ^= 0x5a;
        assert_bad_ciphertext(
            backend.decrypt("uid", &bad).await,
            &format!("byte {i} ({})", regions(i)),
        );
    }
    let mut longer = good.clone();
    longer.ciphertext.push(0);
    assert_bad_ciphertext(backend.decrypt("uid", &longer).await, "appended byte");
    // Failed authentications leave the sessions usable.
    round_trip(&backend).await;
}

#[tokio::test]
async fn a_ciphertext_under_another_key_id_is_refused() {
    let token = Token::new("wrong-key-id");
    let backend = token.backend("kek").await;
    let other = token.init("kek-other").await;
    let good = round_trip(&backend).await;

    // Another key that exists on the token: the AAD (and the key) differ, authentication fails.
    let moved = Encrypted {
        key_id: other.key_id.clone(),
        ..good.clone()
    };
    let msg = assert_bad_ciphertext(backend.decrypt("uid", &moved).await, "other key");
    assert!(msg.contains("authentication failed"), "{msg}");

    for key_id in [
        "",
        "kleidi-kms-plugin",
        "pkcs11:kek",
        "pkcs11:kek:not-hex",
        "vault:v1:kek",
    ] {
        let bad = Encrypted {
            key_id: key_id.into(),
            ..good.clone()
        };
        assert_bad_ciphertext(backend.decrypt("uid", &bad).await, key_id);
    }
    round_trip(&backend).await;
}

#[tokio::test]
async fn a_key_id_of_a_key_not_on_the_token_is_an_unknown_key() {
    let token = Token::new("unknown-key");
    let backend = token.backend("kek").await;
    let good = round_trip(&backend).await;
    for key_id in [
        // Same label, another CKA_ID (e.g. a key that was deleted and recreated).
        "pkcs11:kek:00112233445566778899aabbccddeeff".to_owned(),
        // A label the token does not have.
        good.key_id.replacen("pkcs11:kek:", "pkcs11:gone:", 1),
    ] {
        let bad = Encrypted {
            key_id: key_id.clone(),
            ..good.clone()
        };
        let msg = assert_bad_ciphertext(backend.decrypt("uid", &bad).await, &key_id);
        assert!(msg.contains("unknown key"), "{msg}");
    }
}

#[tokio::test]
async fn a_missing_or_unknown_format_annotation_is_refused() {
    let token = Token::new("annotation");
    let backend = token.backend("kek").await;
    let good = round_trip(&backend).await;

    let mut missing = good.clone();
    missing.annotations.clear();
    let msg = assert_bad_ciphertext(backend.decrypt("uid", &missing).await, "missing");
    assert!(msg.contains(FORMAT_ANNOTATION), "{msg}");

    let mut unknown = good.clone();
    unknown
        .annotations
        .insert(FORMAT_ANNOTATION.into(), b"pkcs11-aes-256-gcm-v2".to_vec());
    let msg = assert_bad_ciphertext(backend.decrypt("uid", &unknown).await, "unknown");
    assert!(msg.contains("pkcs11-aes-256-gcm-v2"), "names the format: {msg}");

    // Other annotations are ignored.
    let mut extra = good.clone();
    extra
        .annotations
        .insert("version.encryption.remote.io".into(), b"1".to_vec());
    backend.decrypt("uid", &extra).await.unwrap();
}

#[tokio::test]
async fn truncated_ciphertexts_are_refused() {
    let token = Token::new("truncated");
    let backend = token.backend("kek").await;
    let good = round_trip(&backend).await;
    for len in 0..good.ciphertext.len() {
        let mut bad = good.clone();
        bad.ciphertext.truncate(len);
        assert_bad_ciphertext(backend.decrypt("uid", &bad).await, &format!("{len} bytes"));
    }
    let mut huge = good.clone();
    huge.ciphertext.resize(2048, 0);
    assert_bad_ciphertext(backend.decrypt("uid", &huge).await, "2048 bytes");
}

#[tokio::test]
async fn connect_fails_with_a_config_error_when_the_key_label_or_token_is_absent() {
    let token = Token::new("absent");
    token.init("kek").await;
    match Pkcs11Backend::connect(token.config("no-such-key")).await {
        Err(Error::Config(msg)) => assert!(msg.contains("no-such-key"), "{msg}"),
        other => panic!("expected Config, got {other:?}"),
    }
    let no_token = Pkcs11Config {
        token_label: "kt-never-initialized".into(),
        ..token.config("kek")
    };
    match Pkcs11Backend::connect(no_token).await {
        Err(Error::Config(msg)) => assert!(msg.contains("kt-never-initialized"), "{msg}"),
        other => panic!("expected Config, got {other:?}"),
    }
}

#[tokio::test]
async fn a_second_key_under_the_current_label_is_refused_as_ambiguous() {
    let token = Token::new("ambiguous");
    let backend = token.backend("kek").await;
    round_trip(&backend).await;
    let first = backend.current_key_id().await.unwrap();
    // Another process (softhsm2-util) adds an AES key with the same label and another CKA_ID.
    let key = token.files.path().join("aes.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    // softhsm2-util asks every slot of the store this process's tests share for its token info,
    // and fails when another test's token directory is just leaving or returning (seen on CI:
    // "Could not get info about the token in slot 0"): that case is tried again, nothing else.
    let mut tries = 0;
    let out = loop {
        let out = std::process::Command::new("softhsm2-util")
            .args(["--import"])
            .arg(&key)
            .args([
                "--aes",
                "--token",
                &token.label,
                "--label",
                "kek",
                "--id",
                "beef",
                "--pin",
                PIN,
            ])
            .output()
            .expect("softhsm2-util (package softhsm2)");
        tries += 1;
        let raced = String::from_utf8_lossy(&out.stderr).contains("Could not get info about the token");
        if out.status.success() || !raced || tries == 20 {
            break out;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // SoftHSM sees another process's new object when it re-indexes the token directory, which
    // is usually the next call but not always (once on CI the next call still saw one key):
    // the refusal must come within a few seconds, and no other key_id may show meanwhile.
    let started = std::time::Instant::now();
    let mut answer = backend.current_key_id().await;
    while answer.is_ok() && started.elapsed() < std::time::Duration::from_secs(5) {
        assert_eq!(answer.as_ref().ok(), Some(&first), "the key in use changed");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        answer = backend.current_key_id().await;
    }
    match answer {
        Err(Error::Config(msg)) => assert!(msg.contains("2 secret keys"), "{msg}"),
        other => panic!("expected Config within 5 s, got {other:?}"),
    }
}

#[tokio::test]
async fn the_same_backend_works_again_after_its_token_directory_leaves_and_returns() {
    let token = Token::new("loss");
    let earlier = token.backend("kek-earlier").await;
    let earlier_ciphertext = round_trip(&earlier).await;
    drop(earlier);
    let backend = token.backend("kek").await;
    let before = round_trip(&backend).await;
    let status = backend.token_status().await.unwrap();
    let dir = token_dir(&status.serial);
    let away = store().dir.join(format!("away-{}", token.label));

    std::fs::rename(&dir, &away).unwrap();
    // First call of the outage: a key this backend has not looked up yet. SoftHSM's FindObjects
    // finds nothing, which must not be reported as the caller's unknown key.
    assert_token_lost(
        backend.decrypt("uid", &earlier_ciphertext).await,
        "decrypt under a key not looked up yet",
    );
    assert_token_lost(backend.encrypt("uid", &seed()).await, "encrypt");
    assert_token_lost(backend.decrypt("uid", &before).await, "decrypt");
    assert_token_lost(backend.current_key_id().await, "current_key_id");

    std::fs::rename(&away, &dir).unwrap();
    let returned = Instant::now();
    loop {
        match backend.encrypt("uid", &seed()).await {
            Ok(_) => break,
            Err(err) => {
                assert!(
                    returned.elapsed() < Duration::from_secs(10),
                    "still failing 10 s after the token returned: {err:?}"
                );
                assert_token_lost(Err::<(), _>(err), "encrypt after return");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    println!("recovered {:?} after the token returned", returned.elapsed());
    let back = backend.decrypt("uid", &before).await.unwrap();
    assert_eq!(back.expose_secret().len(), 32);
    backend.decrypt("uid", &earlier_ciphertext).await.unwrap();
    assert_eq!(backend.current_key_id().await.unwrap(), before.key_id);
    round_trip(&backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_callers_all_round_trip() {
    let token = Token::new("concurrent");
    let backend = Arc::new(token.backend("kek").await);
    let key_id = backend.current_key_id().await.unwrap();
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let backend = Arc::clone(&backend);
            let key_id = key_id.clone();
            tokio::spawn(async move {
                for _ in 0..8 {
                    let plaintext = seed();
                    let e = backend.encrypt("uid", &plaintext).await.unwrap();
                    assert_eq!(e.key_id, key_id);
                    let p = backend.decrypt("uid", &e).await.unwrap();
                    assert_eq!(p.expose_secret(), plaintext.expose_secret());
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn a_wrong_pin_is_denied_and_never_retried_until_the_pin_file_changes() {
    let token = Token::new("wrong-pin");
    token.init("kek").await;
    let pin_file = token.files.path().join("wrong-pin");
    softhsm::write_private(&pin_file, "not-the-pin\n");
    let cfg = Pkcs11Config {
        pin_file: pin_file.clone(),
        ..token.config("kek")
    };

    // Starts anyway (a crash loop would present the wrong PIN on every restart), after one C_Login.
    let backend = Pkcs11Backend::connect(cfg).await.unwrap();
    let status = backend.token_status().await.unwrap();
    assert!(status.user_pin_count_low, "the one attempt was made: {status:?}");
    let msg = assert_pin_denied(backend.current_key_id().await);
    assert!(msg.contains("not presenting it again"), "{msg}");
    assert!(
        !msg.contains("not-the-pin"),
        "the PIN leaked into an error: {msg}"
    );

    // Clear CKF_USER_PIN_COUNT_LOW with one good login elsewhere, then log out (drop closes the
    // sessions): if the backend presented the wrong PIN again, SoftHSM would set the flag again.
    {
        let good = Pkcs11Backend::connect(token.config("kek")).await.unwrap();
        good.current_key_id().await.unwrap();
    }
    assert!(!backend.token_status().await.unwrap().user_pin_count_low);
    for _ in 0..20 {
        assert_pin_denied(backend.encrypt("uid", &seed()).await);
        assert_pin_denied(backend.current_key_id().await);
    }
    let status = backend.token_status().await.unwrap();
    assert!(
        !status.user_pin_count_low && !status.user_pin_final_try && !status.user_pin_locked,
        "the wrong PIN was presented again: {status:?}"
    );

    // Fixing the file is enough: the same backend logs in on its next call.
    softhsm::write_private(&pin_file, format!("{PIN}\n"));
    round_trip(&backend).await;
    assert!(!backend.token_status().await.unwrap().user_pin_count_low);
}

#[tokio::test]
async fn a_key_id_naming_a_key_that_cannot_decrypt_is_the_callers_bad_input() {
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, KeyType, ObjectClass};

    let token = Token::new("not-for-gcm");
    let backend = token.backend("kek").await;
    let good = round_trip(&backend).await;
    let key = |label: &str, id: &[u8], kind: KeyType, decrypt: bool| {
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(kind),
            Attribute::ValueLen(32.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Encrypt(true),
            Attribute::Decrypt(decrypt),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
        ]
    };
    softhsm::with_admin_session(&token.label, |s| {
        // Another key type under a label/CKA_ID a client names.
        s.generate_key(
            &Mechanism::GenericSecretKeyGen,
            &key("generic", &[0x01], KeyType::GENERIC_SECRET, true),
        )?;
        // An AES key that may not decrypt.
        s.generate_key(
            &Mechanism::AesKeyGen,
            &key("no-decrypt", &[0x02], KeyType::AES, false),
        )?;
        // Two AES keys sharing one label/CKA_ID pair.
        for _ in 0..2 {
            s.generate_key(&Mechanism::AesKeyGen, &key("twins", &[0x03], KeyType::AES, true))?;
        }
        Ok(())
    });
    for key_id in ["pkcs11:generic:01", "pkcs11:no-decrypt:02", "pkcs11:twins:03"] {
        let bad = Encrypted {
            key_id: key_id.into(),
            ..good.clone()
        };
        let result = backend.decrypt("uid", &bad).await;
        let err = result.as_ref().err().map(|e| e.to_string());
        let msg = assert_bad_ciphertext(result, key_id);
        assert!(msg.contains(key_id), "{err:?}");
        assert_eq!(
            tonic::Status::from(Error::BadCiphertext(msg)).code(),
            tonic::Code::InvalidArgument
        );
    }
    // The backend is not broken by any of it.
    round_trip(&backend).await;
}
