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
async fn a_rotated_transit_key_shows_in_status_within_one_health_interval_and_old_seeds_decrypt() {
    let bao = Bao::dev();
    let interval = Duration::from_millis(500);
    let (k, _) = start_with_token(&bao, &["--health-ok-ttl", "500ms"]);
    let before = k.status().await;
    let s = seed();
    let old = k.encrypt(&s).await.unwrap();
    bao.run(&["write", "-f", "transit/keys/kek/rotate"]);
    // One interval after the rotation every cached answer predates it: the next Status probes.
    tokio::time::sleep(interval + Duration::from_millis(50)).await;
    let after = k.status().await;
    assert_ne!(after.key_id, before.key_id, "Status missed the rotation");
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
async fn status_polls_cost_one_key_read_per_health_interval_and_a_round_trip_per_roundtrip_interval() {
    let bao = Bao::dev_audited();
    let (k, _) = start_with_token(
        &bao,
        &["--health-ok-ttl", "2s", "--health-roundtrip-interval", "6s"],
    );
    assert_eq!(k.status().await.healthz, "ok"); // the probe kleidi makes at start is done
    let vault_requests = || bao.audited_requests("/");
    let polls = || async {
        let before = vault_requests();
        for _ in 0..20 {
            assert_eq!(k.status().await.healthz, "ok");
        }
        vault_requests() - before
    };
    assert_eq!(polls().await, 0, "Status polls inside the interval");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // The verdict is stale, but encrypt and decrypt were proven 2 s ago: reading the key suffices.
    assert_eq!(polls().await, 1, "20 Status polls after the interval ran out");
    tokio::time::sleep(Duration::from_millis(4100)).await;
    // Past the round-trip interval: read the key, encrypt and decrypt a random value with it.
    assert_eq!(
        polls().await,
        3,
        "20 Status polls after the round-trip interval ran out"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_server_makes_encrypt_unavailable_and_status_name_the_class() {
    let mut bao = Bao::dev();
    let (mut k, _) = start_with_token(&bao, &[]);
    assert_eq!(k.status().await.healthz, "ok");
    k.encrypt(&seed()).await.unwrap();
    bao.kill();
    // UNAVAILABLE, not DEADLINE_EXCEEDED: the answer came inside --call-timeout and says why.
    let err = k.encrypt(&seed()).await.unwrap_err();
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
async fn an_invalid_token_at_start_keeps_kleidi_serving_until_the_file_holds_a_valid_one() {
    let bao = Bao::dev();
    let file = bao.file("token", "s.NotATokenVaultEverIssued");
    let mut k = Kleidi::start(
        &bao.addr,
        "kek",
        &[
            "--vault-auth",
            "token",
            "--vault-token-file",
            file.to_str().unwrap(),
            "--health-err-ttl",
            "200ms",
        ],
    );
    let status = k.status().await;
    assert!(status.healthz.contains("auth_failed"), "{}", status.healthz);
    let err = k.encrypt(&seed()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(k.running(), "an invalid token must not make kleidi exit");

    std::fs::write(&file, bao.kleidi_token("kek", "1h")).unwrap();
    let s = seed();
    let wrapped = eventually(|| k.encrypt(&s)).await;
    assert_eq!(k.decrypt(&wrapped).await.unwrap(), s);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(k.status().await.healthz, "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn kleidi_started_before_vault_serves_once_vault_is_up_and_unsealed() {
    // A cold start of everything: kleidi comes up first, Vault later, sealed, then unsealed.
    let mut bao = Bao::persistent();
    let file = bao.file("token", &bao.kleidi_token("kek", "1h"));
    bao.kill();
    let flags = [
        "--vault-auth",
        "token",
        "--vault-token-file",
        file.to_str().unwrap(),
        "--health-err-ttl",
        "200ms",
    ];
    let mut k = Kleidi::start(&bao.addr, "kek", &flags);
    let status = k.status().await;
    assert!(status.healthz.contains("network"), "{}", status.healthz);
    assert_eq!(k.encrypt(&seed()).await.unwrap_err().code(), Code::Unavailable);
    bao.restart();
    // A login failed a moment ago (network) is answered for up to a second before kleidi asks
    // again; then the class follows the server.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let healthz = k.status().await.healthz;
        if healthz.contains("sealed") {
            break;
        }
        assert_ne!(healthz, "ok", "healthy while sealed");
        assert!(Instant::now() < deadline, "still {healthz}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bao.unseal();
    let s = seed();
    let wrapped = eventually(|| k.encrypt(&s)).await;
    assert!(
        wrapped.key_id.starts_with("vault:transit/kek:v1:"),
        "{}",
        wrapped.key_id
    );
    assert_eq!(k.decrypt(&wrapped).await.unwrap(), s);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let status = k.status().await;
    assert_eq!(
        (status.healthz.as_str(), status.key_id.as_str()),
        ("ok", wrapped.key_id.as_str())
    );
    assert!(k.running());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_that_could_create_keys_is_warned_about_at_start() {
    let bao = Bao::dev();
    let (least, _) = start_with_token(&bao, &[]);
    let root_file = bao.file("root-token", vault_support::ROOT);
    let root = Kleidi::start(
        &bao.addr,
        "kek",
        &[
            "--vault-auth",
            "token",
            "--vault-token-file",
            root_file.to_str().unwrap(),
        ],
    );
    for k in [&least, &root] {
        k.status().await; // start-up is over
    }
    let warning = "may create transit keys";
    assert!(root.logs().contains(warning), "{}", root.logs());
    assert!(!least.logs().contains(warning), "{}", least.logs());
}

/// Retries `call` until it succeeds: for recoveries that happen in the background (a file
/// re-read, a reconnect). Gives up after 10 s, far beyond any recovery's expected time.
async fn eventually<T, F, Fut>(mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match call().await {
            Ok(value) => return value,
            Err(err) => assert!(Instant::now() < deadline, "never recovered: {err:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_vault_is_reported_by_class_within_a_short_call_timeout() {
    let bao = Bao::dev();
    // Below the backend's default 1.75 s budget: Vault must get 7/8 of this, not its default, or
    // the guard's bare DEADLINE_EXCEEDED would answer first and hide why.
    let (k, _) = start_with_token(&bao, &["--call-timeout", "800ms"]);
    assert_eq!(k.status().await.healthz, "ok");
    bao.pause();
    let err = k.encrypt(&seed()).await.unwrap_err();
    bao.resume();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("(network)"), "{}", err.message());
}

/// At the default log level an outage gives an operator a few lines per failed call, each one line,
/// all from kleidi (none from the Vault client crates), and a healthy minute of load gives none
/// per call. After the token is replaced, Status says ok as soon as real calls succeed again,
/// not a health-err-ttl later.
#[tokio::test(flavor = "multi_thread")]
async fn an_outage_logs_few_single_line_events_from_kleidi_only_and_status_follows_recovery() {
    let bao = Bao::dev();
    // A failed probe is trusted for a minute: only a successful real call can end it early.
    let (k, token) = start_with_token_logging("", &bao, &["--health-err-ttl", "60s"]);
    for _ in 0..20 {
        k.encrypt(&seed()).await.unwrap();
    }
    let healthy_lines = k.logs().lines().count();

    bao.run(&["token", "revoke", &token]);
    let failed_calls = 10;
    for _ in 0..failed_calls {
        assert_eq!(
            k.encrypt(&seed()).await.unwrap_err().code(),
            Code::PermissionDenied
        );
    }
    assert_ne!(k.status().await.healthz, "ok");
    let new_token = bao.kleidi_token("kek", "1h");
    bao.file("token", &new_token);
    let started = Instant::now();
    while k.encrypt(&seed()).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the new token was not used"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        k.status().await.healthz,
        "ok",
        "a successful Encrypt with the current key is a good probe"
    );

    let logs = k.logs();
    let lines: Vec<&str> = logs.lines().collect();
    assert!(
        healthy_lines <= 8,
        "20 healthy Encrypts logged {healthy_lines} lines at the default level:\n{logs}"
    );
    for line in &lines {
        assert!(
            line.starts_with("20"),
            "not one line per event (no timestamp): {line:?}"
        );
        assert!(
            !line.contains(" vaultrs") && !line.contains(" rustify"),
            "a dependency's log line: {line}"
        );
    }
    let outage_lines = lines.len() - healthy_lines;
    assert!(
        outage_lines <= 3 * failed_calls + 10,
        "{outage_lines} lines for {failed_calls} failed calls:\n{logs}"
    );
}
