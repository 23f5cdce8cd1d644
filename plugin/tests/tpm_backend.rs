//! The tpm backend in process against a real swtpm: sealing round trips, key_ids from the TPM Name,
//! rotation by `init`, refusing altered or foreign ciphertexts, a TPM that restarts or loses its
//! state, a refused owner auth, concurrency. Needs `apt-get install swtpm swtpm-tools libtss2-dev`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // tests

#[path = "common/swtpm.rs"]
mod swtpm;

use std::sync::Arc;
use std::time::Instant;

use kleidi::backend::FORMAT_ANNOTATION;
use kleidi::backend::tpm::{self, FORMAT, TpmBackend, TpmConfig};
use kleidi::{Encrypted, Error, KeyService};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretSlice};
use swtpm::Node;

impl Node {
    async fn init(&self) -> String {
        tpm::init(&self.config()).await.unwrap()
    }
}

fn seed() -> SecretSlice<u8> {
    let mut s = vec![0u8; 32];
    rand::rng().fill_bytes(&mut s);
    SecretSlice::from(s)
}

async fn round_trip(backend: &TpmBackend) -> Encrypted {
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

#[tokio::test]
async fn a_32_byte_seed_round_trips_sealed_under_the_current_key() {
    let node = Node::new();
    let key_id = node.init().await;
    assert!(key_id.starts_with("tpm:000b"), "{key_id}");
    assert_eq!(key_id.len(), 4 + 68, "tpm: + hex of a 34-byte SHA-256 Name");
    let backend = node.backend().await;
    assert_eq!(backend.name(), "tpm");
    assert_eq!(backend.current_key_id().await.unwrap(), key_id);
    let started = Instant::now();
    let encrypted = round_trip(&backend).await;
    println!(
        "first round trip {:?}, ciphertext {} bytes",
        started.elapsed(),
        encrypted.ciphertext.len()
    );
    assert_eq!(encrypted.key_id, key_id);
    assert!(encrypted.ciphertext.len() <= 1024);
    assert_eq!(encrypted.ciphertext[0], tpm::VERSION);
    assert_eq!(
        encrypted.annotations.get(FORMAT_ANNOTATION).map(Vec::as_slice),
        Some(FORMAT.as_bytes())
    );
}

#[track_caller]
fn assert_unavailable<T>(result: kleidi::Result<T>, class: &str, what: &str) -> String {
    match result {
        Err(err @ Error::Unavailable { backend: "tpm", .. }) if err.class() == class => err.to_string(),
        Err(other) => panic!("{what}: expected Unavailable {class}, got {other:?}"),
        Ok(_) => panic!("{what}: succeeded"),
    }
}

#[tokio::test]
async fn every_altered_byte_truncation_or_extension_is_a_bad_ciphertext() {
    let node = Node::new();
    node.init().await;
    let backend = node.backend().await;
    let good = round_trip(&backend).await;
    for i in 0..good.ciphertext.len() {
        let mut bad = good.clone();
        bad.ciphertext[i] ^= 0x5a;
        assert_bad_ciphertext(backend.decrypt("uid", &bad).await, &format!("byte {i}"));
    }
    for len in 0..good.ciphertext.len() {
        let mut bad = good.clone();
        bad.ciphertext.truncate(len);
        assert_bad_ciphertext(backend.decrypt("uid", &bad).await, &format!("{len} bytes"));
    }
    for tail in [vec![0u8], vec![0u8; 2048 - good.ciphertext.len()]] {
        let mut bad = good.clone();
        bad.ciphertext.extend(tail);
        assert_bad_ciphertext(backend.decrypt("uid", &bad).await, "extended");
    }
    // Failed loads leave no object behind (swtpm holds 3): the good one still unseals, many times.
    for _ in 0..4 {
        backend.decrypt("uid", &good).await.unwrap();
    }
}

#[tokio::test]
async fn rotation_by_init_changes_the_key_id_without_a_restart_and_old_seeds_still_decrypt() {
    let node = Node::new();
    let first = node.init().await;
    let backend = node.backend().await;
    let old = round_trip(&backend).await;
    assert_eq!(old.key_id, first);

    let second = node.init().await;
    assert_ne!(second, first);
    assert_eq!(
        backend.current_key_id().await.unwrap(),
        second,
        "Status sees the new key"
    );
    let new = round_trip(&backend).await;
    assert_eq!(new.key_id, second, "Encrypt follows Status");
    backend.decrypt("uid", &old).await.unwrap();

    // A restarted kleidi reports the same current key and reads both.
    drop(backend);
    let restarted = node.backend().await;
    assert_eq!(restarted.current_key_id().await.unwrap(), second);
    restarted.decrypt("uid", &old).await.unwrap();
    restarted.decrypt("uid", &new).await.unwrap();

    // A seed sealed under one key, presented under the other: the TPM's integrity check refuses it.
    for (sealed, other) in [(&old, &second), (&new, &first)] {
        let moved = Encrypted {
            key_id: other.clone(),
            ..sealed.clone()
        };
        let msg = assert_bad_ciphertext(restarted.decrypt("uid", &moved).await, "moved");
        assert!(msg.contains("rejected the sealed seed"), "{msg}");
    }
    let files = std::fs::read_dir(node.config().state_dir).unwrap().count();
    assert_eq!(files, 3, "two .kek files and current");
}

#[tokio::test]
async fn every_bad_input_is_refused_and_the_backend_keeps_working() {
    let node = Node::new();
    node.init().await;
    let backend = node.backend().await;
    let good = round_trip(&backend).await;

    for len in [0, tpm::MAX_PLAINTEXT + 1, 512] {
        let plaintext = SecretSlice::from(vec![1u8; len]);
        match backend.encrypt("uid", &plaintext).await {
            Err(Error::InvalidRequest(_)) => {}
            other => panic!("{len}-byte plaintext: {other:?}"),
        }
    }
    let largest = SecretSlice::from(vec![7u8; tpm::MAX_PLAINTEXT]);
    let e = backend.encrypt("uid", &largest).await.unwrap();
    assert!(e.ciphertext.len() <= 1024, "{}", e.ciphertext.len());
    assert_eq!(
        backend.decrypt("uid", &e).await.unwrap().expose_secret(),
        largest.expose_secret()
    );

    let unknown_but_well_formed = format!("tpm:000b{}", "ab".repeat(32));
    for key_id in [
        "",
        "kleidi-kms-plugin",
        "tpm:",
        "tpm:000b",
        "pkcs11:kek:ab",
        "\u{0}\u{1}",
        &good.key_id.to_uppercase(),
        &unknown_but_well_formed,
    ] {
        let bad = Encrypted {
            key_id: key_id.into(),
            ..good.clone()
        };
        assert_bad_ciphertext(backend.decrypt("uid", &bad).await, key_id);
    }
    let bad = Encrypted {
        key_id: unknown_but_well_formed,
        ..good.clone()
    };
    let msg = assert_bad_ciphertext(backend.decrypt("uid", &bad).await, "unknown key");
    assert!(msg.contains("unknown key"), "{msg}");

    let mut missing = good.clone();
    missing.annotations.clear();
    let msg = assert_bad_ciphertext(backend.decrypt("uid", &missing).await, "no annotation");
    assert!(msg.contains(FORMAT_ANNOTATION), "{msg}");
    let mut unknown = good.clone();
    unknown
        .annotations
        .insert(FORMAT_ANNOTATION.into(), b"tpm-sealed-v9".to_vec());
    let msg = assert_bad_ciphertext(backend.decrypt("uid", &unknown).await, "unknown format");
    assert!(msg.contains("tpm-sealed-v9"), "{msg}");
    let mut extra = good.clone();
    extra
        .annotations
        .insert("version.encryption.remote.io".into(), b"1".to_vec());
    backend.decrypt("uid", &extra).await.unwrap();
    let empty = Encrypted {
        ciphertext: vec![],
        ..good.clone()
    };
    assert_bad_ciphertext(backend.decrypt("uid", &empty).await, "empty");
    round_trip(&backend).await;
}

#[tokio::test]
async fn a_restarted_tpm_is_picked_up_again_without_restarting_kleidi() {
    let mut node = Node::new();
    let key_id = node.init().await;
    let backend = node.backend().await;
    let before = round_trip(&backend).await;

    // Rebooted between two calls: the next call reconnects, re-creates the primary, reloads the key.
    node.tpm.restart();
    backend.decrypt("uid", &before).await.unwrap();
    round_trip(&backend).await;

    // Down for a while: calls say so; once it is back, the same backend works again.
    node.tpm.kill();
    let msg = assert_unavailable(
        backend.encrypt("uid", &seed()).await,
        "tpm_unreachable",
        "encrypt",
    );
    assert!(msg.contains(&node.tpm.tcti()), "names the TCTI: {msg}");
    assert_unavailable(
        backend.decrypt("uid", &before).await,
        "tpm_unreachable",
        "decrypt",
    );
    node.tpm.launch();
    backend.decrypt("uid", &before).await.unwrap();
    assert_eq!(round_trip(&backend).await.key_id, key_id);
}

#[tokio::test]
async fn a_tpm_that_lost_its_state_is_unavailable_naming_the_key_and_nothing_is_recreated() {
    let mut node = Node::new();
    let key_id = node.init().await;
    let backend = node.backend().await;
    let before = round_trip(&backend).await;
    let state_dir = node.config().state_dir;
    let files = || std::fs::read_dir(&state_dir).unwrap().count();
    let count = files();

    node.tpm.wipe();
    let msg = assert_unavailable(backend.decrypt("uid", &before).await, "key_lost", "decrypt");
    assert!(
        msg.contains(&key_id) && msg.contains("cannot be decrypted"),
        "{msg}"
    );
    assert_unavailable(backend.encrypt("uid", &seed()).await, "key_lost", "encrypt");
    assert_unavailable(backend.encrypt("uid", &seed()).await, "key_lost", "encrypt again");
    assert_eq!(files(), count, "no key was created");
    // A kleidi started now serves (and reports the same reason) rather than crash-looping.
    let restarted = node.backend().await;
    assert_unavailable(
        restarted.decrypt("uid", &before).await,
        "key_lost",
        "after restart",
    );

    // Only an explicit init makes a new key; the lost one stays lost.
    let fresh = node.init().await;
    assert_ne!(fresh, key_id);
    assert_eq!(backend.current_key_id().await.unwrap(), fresh);
    assert_eq!(round_trip(&backend).await.key_id, fresh);
    assert_unavailable(backend.decrypt("uid", &before).await, "key_lost", "old seed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_callers_all_round_trip() {
    let node = Node::new();
    let key_id = node.init().await;
    let backend = Arc::new(node.backend().await);
    let started = Instant::now();
    let tasks: Vec<_> = (0..16)
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
    let ops = 16.0 * 8.0 * 2.0 / started.elapsed().as_secs_f64();
    println!("16 callers: {ops:.0} ops/s (encrypt or decrypt)");
}

/// Sets the owner hierarchy's auth on the swtpm, as an administrator taking ownership would.
fn set_owner_auth(node: &Node, auth: &[u8]) {
    use std::str::FromStr;
    use tss_esapi::interface_types::session_handles::AuthSession;
    use tss_esapi::{Context, structures::Auth, tcti_ldr::TctiNameConf};
    let mut ctx = Context::new(TctiNameConf::from_str(&node.tpm.tcti()).unwrap()).unwrap();
    ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
        ctx.hierarchy_change_auth(
            tss_esapi::handles::AuthHandle::Owner,
            Auth::try_from(auth.to_vec()).unwrap(),
        )
    })
    .unwrap();
}

#[tokio::test]
async fn a_refused_owner_auth_is_denied_and_not_presented_again_until_the_file_changes() {
    let node = Node::new();
    node.init().await;
    set_owner_auth(&node, b"owner-secret-7f1c");
    let auth_file = node.dir.path().join("owner-auth");
    swtpm::write_private(&auth_file, "not-the-owner-secret\n");
    let cfg = TpmConfig {
        owner_auth_file: Some(auth_file.clone()),
        ..node.config()
    };

    // Starts anyway (a crash loop would present the wrong auth on every restart).
    let backend = TpmBackend::connect(cfg).await.unwrap();
    for attempt in 0..10 {
        let err = backend.encrypt("uid", &seed()).await.unwrap_err();
        assert!(matches!(err, Error::Denied { backend: "tpm", .. }), "{err:?}");
        assert_eq!(
            tonic::Status::from(Error::Denied {
                backend: "tpm",
                class: "x",
                detail: String::new()
            })
            .code(),
            tonic::Code::PermissionDenied
        );
        let msg = err.to_string();
        assert!(
            msg.contains("not presenting this owner auth again"),
            "attempt {attempt}: {msg}"
        );
        assert!(
            !msg.contains("not-the-owner-secret") && !msg.contains("owner-secret-7f1c"),
            "{msg}"
        );
    }

    swtpm::write_private(&auth_file, "owner-secret-7f1c\n");
    round_trip(&backend).await;
}

#[tokio::test]
async fn connect_needs_a_key_made_by_init_and_never_makes_one() {
    let node = Node::new();
    match TpmBackend::connect(node.config()).await {
        Err(Error::Config(msg)) => assert!(msg.contains("kleidi tpm init"), "{msg}"),
        other => panic!("expected Config, got {other:?}"),
    }
    assert!(!node.config().state_dir.join("current").exists());
}
