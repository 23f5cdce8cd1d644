//! `kleidi serve --backend vault` end to end: the real binary, a real OpenBao server, the real Unix
//! socket and the v2 gRPC calls kube-apiserver makes. What an operator relies on, one test each.

#![cfg(feature = "vault")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // tests

mod vault_support;

use std::time::{Duration, Instant};

use base64::Engine as _;
use tonic::Code;
use vault_support::Bao;
use vault_support::serve::Kleidi;

/// A random 32-byte seed, as kube-apiserver sends.
fn seed() -> Vec<u8> {
    use rand::RngCore;
    let mut s = vec![0u8; 32];
    rand::rng().fill_bytes(&mut s);
    s
}

/// kleidi with a least-privilege token (the fixture policy) in a file; returns the token too.
fn start_with_token(bao: &Bao, extra: &[&str]) -> (Kleidi, String) {
    start_with_token_logging("debug", bao, extra)
}

fn start_with_token_logging(filter: &str, bao: &Bao, extra: &[&str]) -> (Kleidi, String) {
    let token = bao.kleidi_token("kek", "1h");
    let file = bao.file("token", &token);
    let mut flags = vec![
        "--vault-auth",
        "token",
        "--vault-token-file",
        file.to_str().unwrap(),
    ];
    flags.extend_from_slice(extra);
    (Kleidi::start_logging(filter, &bao.addr, "kek", &flags), token)
}

#[tokio::test(flavor = "multi_thread")]
async fn status_encrypt_and_decrypt_agree_on_the_key_id_and_tampering_is_invalid_argument() {
    let bao = Bao::dev();
    let (k, _) = start_with_token(&bao, &[]);
    let status = k.status().await;
    assert_eq!((status.version.as_str(), status.healthz.as_str()), ("v2", "ok"));
    assert!(
        status.key_id.starts_with("vault:transit/kek:v1:"),
        "{}",
        status.key_id
    );

    let s = seed();
    let wrapped = k.encrypt(&s).await.unwrap();
    assert_eq!(wrapped.key_id, status.key_id, "Encrypt and Status must agree");
    assert!(wrapped.ciphertext.starts_with(b"vault:v1:"));
    assert_eq!(k.decrypt(&wrapped).await.unwrap(), s);

    let mut flipped = wrapped.clone();
    let at = flipped.ciphertext.len() - 3;
    flipped.ciphertext[at] = if flipped.ciphertext[at] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let mut relabelled = wrapped.clone();
    relabelled.key_id = relabelled.key_id.replace(":v1:", ":v2:");
    for bad in [&flipped, &relabelled] {
        let err = k.decrypt(bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    assert_eq!(
        k.status().await.healthz,
        "ok",
        "bad input must not make the plugin unhealthy"
    );
    assert_eq!(k.decrypt(&wrapped).await.unwrap(), s);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_transit_key_shows_in_status_within_the_health_ttl_and_old_seeds_decrypt() {
    let bao = Bao::dev();
    let (k, _) = start_with_token(&bao, &["--health-ok-ttl", "500ms"]);
    let before = k.status().await;
    let s = seed();
    let old = k.encrypt(&s).await.unwrap();
    bao.run(&["write", "-f", "transit/keys/kek/rotate"]);
    let rotated = Instant::now();
    let after = loop {
        let status = k.status().await;
        if status.key_id != before.key_id {
            break status;
        }
        assert!(
            rotated.elapsed() < Duration::from_secs(3),
            "Status still reports {} after {:?}",
            status.key_id,
            rotated.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The health TTL plus one probe (three Vault calls), with slack for a busy 2-core machine.
    assert!(
        rotated.elapsed() < Duration::from_millis(1500),
        "{:?}",
        rotated.elapsed()
    );
    assert_eq!(after.healthz, "ok");
    assert!(
        after.key_id.starts_with("vault:transit/kek:v2:"),
        "{}",
        after.key_id
    );
    let new = k.encrypt(&s).await.unwrap();
    assert_eq!(new.key_id, after.key_id);
    assert!(new.ciphertext.starts_with(b"vault:v2:"));
    assert_eq!(
        k.decrypt(&old).await.unwrap(),
        s,
        "the old version still decrypts"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_server_makes_encrypt_unavailable_and_status_name_the_class() {
    let mut bao = Bao::dev();
    let (mut k, _) = start_with_token(&bao, &[]);
    assert_eq!(k.status().await.healthz, "ok");
    k.encrypt(&seed()).await.unwrap();
    bao.kill();
    let started = Instant::now();
    let err = k.encrypt(&seed()).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("(network)"), "{}", err.message());
    let status = k.status().await;
    assert_ne!(status.healthz, "ok");
    assert!(status.healthz.contains("network"), "{}", status.healthz);
    assert!(
        status.key_id.starts_with("vault:transit/kek:v1:"),
        "the last known key_id"
    );
    assert!(k.running(), "kleidi must keep serving while Vault is down");
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_carry_no_token_no_secret_id_and_no_plaintext() {
    let mut bao = Bao::dev();
    let mut seeds = Vec::new();

    // AppRole: the role_id and secret_id are read from files at each login.
    bao.kleidi_token("kek", "1h"); // installs the policy
    bao.run(&["auth", "enable", "approle"]);
    bao.run(&[
        "write",
        "auth/approle/role/kleidi",
        "token_policies=kleidi",
        "token_ttl=1h",
    ]);
    let role_id = bao.run(&["read", "-field=role_id", "auth/approle/role/kleidi/role-id"]);
    let secret_id = bao.run(&[
        "write",
        "-f",
        "-field=secret_id",
        "auth/approle/role/kleidi/secret-id",
    ]);
    let (role_id_file, secret_id_file) = (bao.file("role-id", &role_id), bao.file("secret-id", &secret_id));
    // Trace level: every dependency's logging too (HTTP client, gRPC server), not only kleidi's.
    let approle = Kleidi::start_logging(
        "trace",
        &bao.addr,
        "kek",
        &[
            "--vault-auth",
            "approle",
            "--vault-role-id-file",
            role_id_file.to_str().unwrap(),
            "--vault-secret-id-file",
            secret_id_file.to_str().unwrap(),
        ],
    );
    // Token auth, whose token is then revoked (denied calls are logged too).
    let (with_token, token) = start_with_token_logging("trace", &bao, &[]);
    for k in [&approle, &with_token] {
        let s = seed();
        let wrapped = k.encrypt(&s).await.unwrap();
        assert_eq!(k.decrypt(&wrapped).await.unwrap(), s);
        seeds.push(s);
    }
    bao.run(&["token", "revoke", &token]);
    let s = seed();
    assert_eq!(
        with_token.encrypt(&s).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    seeds.push(s);
    // And Vault gone: failures and health probes are logged at warn.
    bao.kill();
    for k in [&approle, &with_token] {
        let s = seed();
        assert_eq!(k.encrypt(&s).await.unwrap_err().code(), Code::Unavailable);
        k.status().await;
        seeds.push(s);
    }

    let logs = approle.logs() + &with_token.logs();
    assert!(logs.contains("vault: logged in"), "debug logs expected:\n{logs}");
    assert!(
        logs.contains("encrypt failed"),
        "failures expected in the logs:\n{logs}"
    );
    for (what, secret) in [
        ("token", &token),
        ("secret_id", &secret_id),
        ("role_id", &role_id),
    ] {
        assert!(!logs.contains(secret.as_str()), "the {what} is in the logs");
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    for s in &seeds {
        for form in [
            hex::encode(s),
            hex::encode_upper(s),
            b64.encode(s),
            format!("{s:?}"),
        ] {
            assert!(!logs.contains(&form), "a plaintext seed is in the logs");
        }
    }
}
