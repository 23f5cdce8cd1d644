//! `kleidi serve` end to end: the real binary, a real SoftHSM token, a real Unix socket, the gRPC
//! services kube-apiserver calls. What a cluster operator relies on, one test each.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // tests

mod support;

use std::collections::HashMap;
use std::time::Duration;

use kleidi::proto::{v1beta1, v2};
use support::{KEK, Kleidi, PIN, Token, seed};
use tonic::Code;

async fn encrypt(k: &Kleidi, plaintext: Vec<u8>) -> Result<v2::EncryptResponse, tonic::Status> {
    k.v2()
        .await
        .encrypt(v2::EncryptRequest {
            plaintext,
            uid: "test".into(),
        })
        .await
        .map(|r| r.into_inner())
}

async fn decrypt(k: &Kleidi, e: &v2::EncryptResponse) -> Result<Vec<u8>, tonic::Status> {
    decrypt_parts(k, e.ciphertext.clone(), e.key_id.clone(), e.annotations.clone()).await
}

async fn decrypt_parts(
    k: &Kleidi,
    ciphertext: Vec<u8>,
    key_id: String,
    annotations: HashMap<String, Vec<u8>>,
) -> Result<Vec<u8>, tonic::Status> {
    k.v2()
        .await
        .decrypt(v2::DecryptRequest {
            ciphertext,
            uid: "test".into(),
            key_id,
            annotations,
        })
        .await
        .map(|r| r.into_inner().plaintext)
}

#[tokio::test]
async fn v2_seed_round_trips_through_the_socket_with_the_status_key_id() {
    let token = Token::new();
    let k = Kleidi::start(&token, KEK, &[]);
    let st = k.status().await;
    assert_eq!((st.version.as_str(), st.healthz.as_str()), ("v2", "ok"));
    assert!(st.key_id.starts_with("pkcs11:kek-1:"), "{}", st.key_id);

    let s = seed();
    let enc = encrypt(&k, s.clone()).await.unwrap();
    assert_eq!(
        enc.key_id, st.key_id,
        "Encrypt and Status must agree or the apiserver discards the seed"
    );
    assert!(
        !enc.ciphertext.windows(s.len()).any(|w| w == s),
        "seed visible in ciphertext"
    );
    assert!(enc.ciphertext.len() <= 1024);
    assert!(enc.annotations.contains_key("format.kleidi.dev"));
    assert_eq!(decrypt(&k, &enc).await.unwrap(), s);

    let again = encrypt(&k, s.clone()).await.unwrap();
    assert_ne!(again.ciphertext, enc.ciphertext, "a fresh IV per call");
}

#[tokio::test]
async fn v1beta1_dek_round_trips_for_clusters_still_on_kms_v1() {
    let token = Token::new();
    let k = Kleidi::start(&token, KEK, &[]);
    let mut v1 = k.v1().await;
    let version = v1
        .version(v1beta1::VersionRequest {
            version: "v1beta1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (version.version.as_str(), version.runtime_name.as_str()),
        ("v1beta1", "kleidi")
    );
    let dek = seed();
    let enc = v1
        .encrypt(v1beta1::EncryptRequest {
            version: "v1beta1".into(),
            plain: dek.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let dec = v1
        .decrypt(v1beta1::DecryptRequest {
            version: "v1beta1".into(),
            cipher: enc.cipher.clone(),
        })
        .await;
    assert_eq!(dec.unwrap().into_inner().plain, dek);

    let wrong = v1
        .encrypt(v1beta1::EncryptRequest {
            version: "v2".into(),
            plain: dek,
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::InvalidArgument);
    let mut cipher = enc.cipher;
    *cipher.last_mut().unwrap() ^= 1;
    let bad = v1
        .decrypt(v1beta1::DecryptRequest {
            version: "v1beta1".into(),
            cipher,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn status_version_flag_serves_1_27_and_1_28_clusters() {
    let token = Token::new();
    let k = Kleidi::start(&token, KEK, &["--status-version", "v2beta1"]);
    assert_eq!(k.status().await.version, "v2beta1");
}

#[tokio::test]
async fn rotation_to_a_new_key_label_changes_key_id_and_old_seeds_still_decrypt() {
    let token = Token::new();
    let mut k = Kleidi::start(&token, KEK, &[]);
    let old_status = k.status().await;
    let s = seed();
    let old = encrypt(&k, s.clone()).await.unwrap();

    token.init_key("kek-2");
    k.signal("TERM");
    assert_eq!(k.wait(Duration::from_secs(10)), Some(0));
    let k2 = Kleidi::start(&token, "kek-2", &[]);
    let new_status = k2.status().await;
    assert_ne!(new_status.key_id, old_status.key_id);
    assert_eq!(encrypt(&k2, seed()).await.unwrap().key_id, new_status.key_id);
    assert_eq!(
        decrypt(&k2, &old).await.unwrap(),
        s,
        "a seed wrapped by the previous key must still unwrap"
    );
}

#[tokio::test]
async fn pkcs11_init_is_idempotent() {
    let token = Token::new();
    let k = Kleidi::start(&token, KEK, &[]);
    let before = k.status().await.key_id;
    token.init_key(KEK); // again: must neither re-initialize the token nor replace the key
    drop(k);
    let k = Kleidi::start(&token, KEK, &[]);
    assert_eq!(k.status().await.key_id, before);
}

/// One bad request to either service.
enum Bad {
    V2Encrypt(v2::EncryptRequest),
    V2Decrypt(v2::DecryptRequest),
    V1Encrypt(v1beta1::EncryptRequest),
    V1Decrypt(v1beta1::DecryptRequest),
}

type V2Client = v2::key_management_service_client::KeyManagementServiceClient<tonic::transport::Channel>;
type V1Client = v1beta1::key_management_service_client::KeyManagementServiceClient<tonic::transport::Channel>;

impl Bad {
    /// Sends it on the one connection each service's client holds, as the apiserver does.
    async fn send(self, v2: &mut V2Client, v1: &mut V1Client) -> Result<(), tonic::Status> {
        match self {
            Bad::V2Encrypt(r) => v2.encrypt(r).await.map(drop),
            Bad::V2Decrypt(r) => v2.decrypt(r).await.map(drop),
            Bad::V1Encrypt(r) => v1.encrypt(r).await.map(drop),
            Bad::V1Decrypt(r) => v1.decrypt(r).await.map(drop),
        }
    }
}

/// The bad-input table: every field empty, oversized (plaintext, ciphertext and key_id over the
/// apiserver's limits, annotations over 32 KiB, a message over the 64 KiB gRPC limit), malformed
/// (annotation keys that are not DNS names, unknown format, unknown or another key's key_id, wrong
/// v1 version) and every byte of a valid ciphertext flipped, on both services. Each gets its status
/// (INVALID_ARGUMENT, or OUT_OF_RANGE from the gRPC layer for an oversized message), a log line and
/// no panic; afterwards the plugin is healthy and the good ciphertexts still decrypt.
#[tokio::test]
async fn bad_input_table_over_both_services_gets_clear_statuses_and_loses_nothing() {
    let token = Token::new();
    token.init_key("kek-2");
    let mut k = Kleidi::start(&token, KEK, &[]);
    let s = seed();
    let good = encrypt(&k, s.clone()).await.unwrap();
    let other_key = {
        let k2 = Kleidi::start_on(&token, "kek-2", "other.sock");
        encrypt(&k2, seed()).await.unwrap()
    };
    let v1_good = k
        .v1()
        .await
        .encrypt(v1beta1::EncryptRequest {
            version: "v1beta1".into(),
            plain: s.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .cipher;

    let v2_enc = |plaintext: Vec<u8>| {
        Bad::V2Encrypt(v2::EncryptRequest {
            plaintext,
            uid: "test".into(),
        })
    };
    let v2_dec = |ciphertext: Vec<u8>, key_id: String, annotations: HashMap<String, Vec<u8>>| {
        Bad::V2Decrypt(v2::DecryptRequest {
            ciphertext,
            uid: "test".into(),
            key_id,
            annotations,
        })
    };
    let v1_enc = |version: &str, plain: Vec<u8>| {
        Bad::V1Encrypt(v1beta1::EncryptRequest {
            version: version.into(),
            plain,
        })
    };
    let v1_dec = |version: &str, cipher: Vec<u8>| {
        Bad::V1Decrypt(v1beta1::DecryptRequest {
            version: version.into(),
            cipher,
        })
    };
    let annotated = |key: &str, value: Vec<u8>| {
        let mut a = good.annotations.clone();
        a.insert(key.into(), value);
        a
    };
    let (ct, id, ann) = (
        good.ciphertext.clone(),
        good.key_id.clone(),
        good.annotations.clone(),
    );
    let over_limit = vec![1u8; 100 * 1024];

    let mut table: Vec<(String, Bad, Code)> = vec![
        (
            "v2 encrypt: empty plaintext".into(),
            v2_enc(vec![]),
            Code::InvalidArgument,
        ),
        (
            "v2 encrypt: 513-byte plaintext".into(),
            v2_enc(vec![1; 513]),
            Code::InvalidArgument,
        ),
        (
            "v2 encrypt: message over 64 KiB".into(),
            v2_enc(over_limit.clone()),
            Code::OutOfRange,
        ),
        (
            "v2 decrypt: everything empty".into(),
            v2_dec(vec![], String::new(), HashMap::new()),
            Code::InvalidArgument,
        ),
        (
            "v2 decrypt: empty ciphertext".into(),
            v2_dec(vec![], id.clone(), ann.clone()),
            Code::InvalidArgument,
        ),
        (
            "v2 decrypt: truncated ciphertext".into(),
            v2_dec(ct[..ct.len() - 1].to_vec(), id.clone(), ann.clone()),
            Code::InvalidArgument,
        ),
        (
            "v2 decrypt: 1025-byte ciphertext".into(),
            v2_dec(vec![7; 1025], id.clone(), ann.clone()),
            Code::InvalidArgument,
        ),
        (
            "v2 decrypt: empty key_id".into(),
            v2_dec(ct.clone(), String::new(), ann.clone()),
            Code::InvalidArgument,
        ),
        (
            "v2 decrypt: 1025-byte key_id".into(),
            v2_dec(ct.clone(), "k".repeat(1025), ann.clone()),
            Code::InvalidArgument,
        ),
        (
            "v2 decrypt: garbage key_id".into(),
            v2_dec(ct.clone(), "\u{0}\u{1}".into(), ann.clone()),
            Code::InvalidArgument,
        ),
        (
            "v2 decrypt: unknown key_id".into(),
            v2_dec(ct.clone(), "pkcs11:kek-9:00112233".into(), ann.clone()),
            Code::InvalidArgument,
        ),
        (
            "v2 decrypt: another key's key_id".into(),
            v2_dec(ct.clone(), other_key.key_id.clone(), ann.clone()),
            Code::InvalidArgument,
        ),
        (
            "v2 decrypt: no annotations".into(),
            v2_dec(ct.clone(), id.clone(), HashMap::new()),
            Code::InvalidArgument,
        ),
        (
            "v2 decrypt: unknown format version".into(),
            v2_dec(
                ct.clone(),
                id.clone(),
                annotated("format.kleidi.dev", b"pkcs11-aes-256-gcm-v9".to_vec()),
            ),
            Code::InvalidArgument,
        ),
        (
            "v2 decrypt: annotation key not a DNS name".into(),
            v2_dec(ct.clone(), id.clone(), annotated("Not_A_Domain", b"x".to_vec())),
            Code::InvalidArgument,
        ),
        (
            "v2 decrypt: single-label annotation key".into(),
            v2_dec(ct.clone(), id.clone(), annotated("format", b"x".to_vec())),
            Code::InvalidArgument,
        ),
        (
            "v2 decrypt: annotations over 32 KiB".into(),
            v2_dec(
                ct.clone(),
                id.clone(),
                annotated("big.example.com", vec![b'a'; 33 * 1024]),
            ),
            Code::InvalidArgument,
        ),
        (
            "v2 decrypt: message over 64 KiB".into(),
            v2_dec(over_limit.clone(), id.clone(), ann.clone()),
            Code::OutOfRange,
        ),
        (
            "v1 encrypt: empty plain".into(),
            v1_enc("v1beta1", vec![]),
            Code::InvalidArgument,
        ),
        (
            "v1 encrypt: empty version".into(),
            v1_enc("", s.clone()),
            Code::InvalidArgument,
        ),
        (
            "v1 encrypt: wrong version".into(),
            v1_enc("v2", s.clone()),
            Code::InvalidArgument,
        ),
        (
            "v1 encrypt: 513-byte plain".into(),
            v1_enc("v1beta1", vec![1; 513]),
            Code::InvalidArgument,
        ),
        (
            "v1 encrypt: message over 64 KiB".into(),
            v1_enc("v1beta1", over_limit.clone()),
            Code::OutOfRange,
        ),
        (
            "v1 decrypt: everything empty".into(),
            v1_dec("", vec![]),
            Code::InvalidArgument,
        ),
        (
            "v1 decrypt: empty cipher".into(),
            v1_dec("v1beta1", vec![]),
            Code::InvalidArgument,
        ),
        (
            "v1 decrypt: wrong version".into(),
            v1_dec("v2", v1_good.clone()),
            Code::InvalidArgument,
        ),
        (
            "v1 decrypt: truncated cipher".into(),
            v1_dec("v1beta1", v1_good[..v1_good.len() - 1].to_vec()),
            Code::InvalidArgument,
        ),
        (
            "v1 decrypt: 4 KiB of garbage".into(),
            v1_dec("v1beta1", vec![0x5a; 4096]),
            Code::InvalidArgument,
        ),
        (
            "v1 decrypt: message over 64 KiB".into(),
            v1_dec("v1beta1", over_limit.clone()),
            Code::OutOfRange,
        ),
    ];
    for i in 0..ct.len() {
        let mut c = ct.clone();
        c[i] ^= 0x80;
        table.push((
            format!("v2 decrypt: ciphertext byte {i} flipped"),
            v2_dec(c, id.clone(), ann.clone()),
            Code::InvalidArgument,
        ));
    }
    for i in 0..v1_good.len() {
        let mut c = v1_good.clone();
        c[i] ^= 0x80;
        table.push((
            format!("v1 decrypt: cipher byte {i} flipped"),
            v1_dec("v1beta1", c),
            Code::InvalidArgument,
        ));
    }

    let (mut v2_client, mut v1_client) = (k.v2().await, k.v1().await);
    let mut wrong = Vec::new();
    for (what, request, expected) in table {
        match request.send(&mut v2_client, &mut v1_client).await {
            Err(status) if status.code() == expected => {}
            other => wrong.push(format!("{what}: expected {expected:?}, got {other:?}")),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} cases wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    assert!(
        k.child.try_wait().unwrap().is_none(),
        "kleidi exited on bad input; log:\n{}",
        k.logs()
    );
    assert_eq!(
        k.status().await.healthz,
        "ok",
        "bad input must not make the plugin unhealthy"
    );
    assert_eq!(
        decrypt(&k, &good).await.unwrap(),
        s,
        "the good v2 ciphertext still decrypts"
    );
    let v1_plain = k
        .v1()
        .await
        .decrypt(v1beta1::DecryptRequest {
            version: "v1beta1".into(),
            cipher: v1_good,
        })
        .await
        .unwrap()
        .into_inner()
        .plain;
    assert_eq!(v1_plain, s, "the good v1 cipher still decrypts");
    let logs = k.logs();
    assert!(logs.contains("decrypt failed"), "each bad call logs a line");
    assert!(!logs.contains("panicked"), "{logs}");
}

#[tokio::test]
async fn many_concurrent_callers_all_round_trip() {
    let token = Token::new();
    let k = Kleidi::start(&token, KEK, &[]);
    let channel = k.channel().await;
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let mut client = v2::key_management_service_client::KeyManagementServiceClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                let s = seed();
                let e = client
                    .encrypt(v2::EncryptRequest {
                        plaintext: s.clone(),
                        uid: "c".into(),
                    })
                    .await?
                    .into_inner();
                let d = client
                    .decrypt(v2::DecryptRequest {
                        ciphertext: e.ciphertext,
                        uid: "c".into(),
                        key_id: e.key_id,
                        annotations: e.annotations,
                    })
                    .await?
                    .into_inner();
                assert_eq!(d.plaintext, s);
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn token_loss_is_unavailable_and_the_same_process_recovers_when_it_returns() {
    let token = Token::new();
    let k = Kleidi::start(
        &token,
        KEK,
        &["--health-ok-ttl", "200ms", "--health-err-ttl", "200ms"],
    );
    let s = seed();
    let before = encrypt(&k, s.clone()).await.unwrap();

    let dir = token.token_dir();
    let away = token.dir.path().join("away");
    std::fs::rename(&dir, &away).unwrap();
    let err = encrypt(&k, seed()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let err = decrypt(&k, &before).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::Unavailable,
        "a lost token is not bad ciphertext: {err:?}"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    let st = k.status().await;
    assert_ne!(st.healthz, "ok");
    assert_eq!(st.key_id, before.key_id, "the last known key_id stays in Status");

    std::fs::rename(&away, &dir).unwrap();
    // SoftHSM only rescans its token directory on C_Initialize, so the backend reloads the module
    // (at most once a second): recovery takes about a second, with no restart.
    let back = std::time::Instant::now();
    let plain = loop {
        match decrypt(&k, &before).await {
            Ok(p) => break p,
            Err(e) if back.elapsed() < Duration::from_secs(5) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no recovery within 5 s of the token's return: {e:?}"),
        }
    };
    assert_eq!(plain, s);
    assert_eq!(encrypt(&k, seed()).await.unwrap().key_id, before.key_id);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(k.status().await.healthz, "ok");
    assert!(k.logs().contains("token_lost"));
}

#[tokio::test]
async fn sigterm_stops_gracefully_and_removes_the_socket() {
    let token = Token::new();
    let mut k = Kleidi::start(&token, KEK, &[]);
    assert_eq!(k.status().await.healthz, "ok");
    k.signal("TERM");
    assert_eq!(k.wait(Duration::from_secs(10)), Some(0));
    assert!(!k.socket.exists(), "socket left behind");
}

#[tokio::test]
async fn core_dumps_are_off_for_the_serving_process() {
    let token = Token::new();
    let k = Kleidi::start(&token, KEK, &[]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", k.child.id())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    // Soft and hard: a crash writes nothing, and the process could not raise it again.
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
}

/// The heaps of glibc's malloc arenas beyond the first, as /proc/PID/maps shows them: anonymous
/// reservations of exactly 64 MiB (HEAP_MAX_SIZE on 64-bit) at a 64 MiB-aligned address, a
/// read-write part followed by the rest kept PROT_NONE. Thread stacks and mmap'd blocks are not
/// 64 MiB-aligned spans of that size.
fn extra_malloc_arenas(pid: u32) -> usize {
    const HEAP: u64 = 64 << 20;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    // (start, end, perms) of every anonymous mapping, in address order.
    let anon: Vec<(u64, u64, String)> = maps
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() != 5 {
                return None; // has a path: a file, [heap], [stack], ...
            }
            let (start, end) = f[0].split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            Some((start, end, f[1].to_string()))
        })
        .collect();
    anon.iter()
        .enumerate()
        .filter(|(i, (start, end, perms))| {
            if perms != "rw-p" || start % HEAP != 0 {
                return false;
            }
            let span_end = match anon.get(i + 1) {
                Some((next, next_end, p)) if next == end && p == "---p" => *next_end,
                _ => *end,
            };
            span_end - start == HEAP
        })
        .count()
}

/// `kleidi serve` keeps glibc's malloc to one arena: with an arena per thread (glibc's default, up
/// to 8 per core) RSS crept up under load with nothing leaked (BENCHMARKS.md, Memory). An
/// operator's own `MALLOC_ARENA_MAX` is kept, which also shows the arenas are seen when present.
#[tokio::test]
async fn serve_keeps_one_malloc_arena_under_load_unless_the_operator_chose() {
    let token = Token::new();
    for (given, name) in [(None, "arenas-kleidi"), (Some("8"), "arenas-operator")] {
        let socket = token.dir.path().join(format!("{name}.sock"));
        let log = token.dir.path().join(format!("{name}.log"));
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kleidi"));
        command
            .arg("serve")
            .arg("--listen")
            .arg(format!("unix://{}", socket.display()))
            .args(["--backend", "pkcs11"])
            .args(token.flags(KEK))
            .env("SOFTHSM2_CONF", token.conf())
            .env_remove("MALLOC_ARENA_MAX")
            .stdin(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(value) = given {
            command.env("MALLOC_ARENA_MAX", value);
        }
        let k = std::sync::Arc::new(Kleidi {
            child: command.spawn().unwrap(),
            socket,
            log,
        });
        k.wait_ready();
        // 16 callers at once, so runtime workers and blocking threads all allocate.
        let plain = seed();
        let wrapped = encrypt(&k, plain.clone()).await.unwrap();
        let mut callers = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let (k, wrapped, plain) = (k.clone(), wrapped.clone(), plain.clone());
            callers.spawn(async move {
                for _ in 0..8 {
                    assert_eq!(decrypt(&k, &wrapped).await.unwrap(), plain);
                }
            });
        }
        while let Some(caller) = callers.join_next().await {
            caller.unwrap();
        }
        let extra = extra_malloc_arenas(k.child.id());
        match given {
            None => assert_eq!(extra, 0, "arenas beyond the first; log:\n{}", k.logs()),
            Some(_) => assert!(extra > 0, "the operator's MALLOC_ARENA_MAX=8 was not kept"),
        }
    }
}

#[tokio::test]
async fn a_crashed_instance_socket_is_replaced_but_a_live_one_is_not_stolen() {
    let token = Token::new();
    let mut first = Kleidi::start(&token, KEK, &[]);

    let log = token.dir.path().join("second.log");
    let mut second = Kleidi::spawn(&token, KEK, &first.socket, &log, &[]);
    let code = second.wait().unwrap().code();
    assert_ne!(code, Some(0));
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("another process is serving")
    );
    assert_eq!(
        first.status().await.healthz,
        "ok",
        "the live instance keeps its socket"
    );

    first.signal("KILL");
    first.wait(Duration::from_secs(10));
    assert!(first.socket.exists(), "a crash leaves the socket file behind");
    let again = Kleidi::start(&token, KEK, &[]);
    assert_eq!(again.status().await.healthz, "ok");
}

#[tokio::test]
async fn a_pin_file_other_users_can_read_stops_kleidi_unless_allowed_then_warns_once() {
    use std::os::unix::fs::PermissionsExt as _;
    let token = Token::new();
    std::fs::set_permissions(token.pin_file(), std::fs::Permissions::from_mode(0o644)).unwrap();

    // Refused at start: the file, its mode and the fix are named; the PIN is not.
    let socket = token.dir.path().join("run/refused.sock");
    let log = token.dir.path().join("refused.log");
    let child = Kleidi::spawn(&token, KEK, &socket, &log, &[]);
    let mut refused = Kleidi { child, socket, log };
    assert_eq!(refused.wait(Duration::from_secs(20)), Some(1));
    let logs = refused.logs();
    for part in [
        "--pkcs11-pin-file",
        token.pin_file().to_str().unwrap(),
        "mode 0644",
        "chmod 600",
        "--allow-insecure-credential-files",
    ] {
        assert!(logs.contains(part), "{part:?} missing: {logs}");
    }
    assert!(!logs.contains(PIN), "{logs}");

    // With the flag: served, with one warning (not one per login).
    let k = Kleidi::start(&token, KEK, &["--allow-insecure-credential-files"]);
    // Concurrent calls open several sessions, each logging in with the PIN file.
    let client = k.v2().await;
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let request = v2::EncryptRequest {
                    plaintext: seed(),
                    uid: "test".into(),
                };
                client.encrypt(request).await
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let logs = k.logs();
    assert_eq!(logs.matches("reading it anyway").count(), 1, "{logs}");
    assert!(logs.contains("WARN") && logs.contains("mode 0644"), "{logs}");
    assert!(!logs.contains(PIN), "{logs}");
}

#[tokio::test]
async fn logs_carry_no_pin_and_no_key_material() {
    let token = Token::new();
    let k = Kleidi::start(&token, KEK, &[]);
    let s = seed();
    let e = encrypt(&k, s.clone()).await.unwrap();
    decrypt(&k, &e).await.unwrap();
    let mut c = e.ciphertext.clone();
    c[5] ^= 1;
    let _ = decrypt_parts(&k, c, e.key_id.clone(), e.annotations.clone()).await;
    let logs = k.logs();
    assert!(logs.contains("encrypt ok"), "debug logging was on: {logs}");
    assert!(!logs.contains(PIN));
    for needle in [hex::encode(&s), format!("{s:?}"), hex::encode(&e.ciphertext)] {
        assert!(!logs.contains(&needle));
    }
}

#[test]
fn grpcio_client_works_with_every_authority_kube_apiserver_and_c_core_send() {
    let token = Token::new();
    let k = Kleidi::start(&token, KEK, &[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/grpcio_client.py");
    for authority in ["path", "percent", "localhost"] {
        let out = std::process::Command::new("python3")
            .args([
                script,
                "--socket",
                k.socket.to_str().unwrap(),
                "--authority",
                authority,
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "grpcio with :authority {authority} failed: {stdout}\n{}\nkleidi log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            k.logs()
        );
        assert!(stdout.contains("\"ok\": true"), "{stdout}");
    }
    // Proof that grpcio really sent what kube-apiserver <= 1.31 and C-core send (h2 alone would have
    // reset those streams): kleidi logs each :authority it had to replace.
    let logs = k.logs();
    let socket = k.socket.to_str().unwrap();
    let percent = socket.trim_start_matches('/').replace('/', "%2F");
    for original in [socket.to_string(), percent] {
        let line = format!("original={original}\n");
        assert!(logs.contains(&line), "no rewrite of {original} logged:\n{logs}");
    }
}

/// What a client controls (key_id, uid) cannot write a line of its own into kleidi's log, nor make
/// one line huge, in either log format.
#[tokio::test]
async fn client_fields_cannot_forge_log_lines_or_flood_them() {
    for format in ["text", "json"] {
        let token = Token::new();
        let k = Kleidi::start(&token, KEK, &["--log-format", format]);
        let good = encrypt(&k, seed()).await.unwrap();
        let forged_key_ids = [
            format!("{}\nFORGED key_id line", good.key_id),
            "pkcs11:kek\r\nFORGED label line:ab".to_owned(),
            "x".repeat(60 * 1024),
        ];
        for key_id in forged_key_ids {
            let err = k
                .v2()
                .await
                .decrypt(v2::DecryptRequest {
                    ciphertext: good.ciphertext.clone(),
                    uid: "u\nFORGED uid line".into(),
                    key_id,
                    annotations: good.annotations.clone(),
                })
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{format}: {err:?}");
        }
        for uid in ["y".repeat(60 * 1024), "v\u{1b}[2J\nFORGED escape".into()] {
            k.v2()
                .await
                .encrypt(v2::EncryptRequest {
                    plaintext: seed(),
                    uid,
                })
                .await
                .unwrap();
        }
        let logs = k.logs();
        assert!(
            logs.contains("decrypt failed"),
            "{format}: calls were logged:\n{logs}"
        );
        for line in logs.lines() {
            assert!(!line.starts_with("FORGED"), "{format}: forged line {line:?}");
            assert!(!line.contains('\u{1b}'), "{format}: raw escape in {line:?}");
            assert!(line.len() < 2048, "{format}: a {} byte line", line.len());
            if format == "json" {
                serde_json::from_str::<serde_json::Value>(line)
                    .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line:?}"));
            }
        }
    }
}

/// A build without the `aws-kms` feature (the default) says which feature `--backend aws-kms`
/// needs, instead of starting or failing on a missing flag.
#[cfg(not(feature = "aws-kms"))]
#[test]
fn aws_kms_without_its_cargo_feature_fails_naming_the_feature() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kleidi"))
        .args(["serve", "--backend", "aws-kms", "--aws-kms-key-id", "alias/kek"])
        .args(["--aws-encryption-context-cluster", "c", "--listen"])
        .arg(dir.path().join("kms.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--features aws-kms"), "{stderr}");
    assert!(!dir.path().join("kms.sock").exists(), "serving without a backend");
}
