//! The logs as an operator gets them, per backend (PKCS#11 on SoftHSM, Vault on a real OpenBao dev
//! server, TPM on swtpm), in both formats: the real `kleidi serve` with every target on (text at
//! debug, JSON at trace, dependencies included, since an operator may turn them on) serves a full
//! session, is stopped, and then every line is checked: no secret the session used in any encoding,
//! the uid of every call on each of its lines, the health probe never under a call's uid, and one
//! startup line with the effective configuration.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // tests
// Each backend's test support includes the credential-file helper as its own module.
#![allow(clippy::duplicate_mod)]

#[path = "common/private.rs"]
mod private;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use kleidi::proto::{v1beta1, v2};
use rand::RngCore;
use tonic::Code;
use tonic::transport::Channel;

type V2 = v2::key_management_service_client::KeyManagementServiceClient<Channel>;
type V1 = v1beta1::key_management_service_client::KeyManagementServiceClient<Channel>;

/// How one backend is served: its flags and environment, the secrets kleidi holds for it, and the
/// settings its startup line must show.
struct Backend {
    name: &'static str,
    dir: tempfile::TempDir,
    flags: Vec<String>,
    env: Vec<(&'static str, String)>,
    /// More environment for the JSON run only.
    json_env: Vec<(&'static str, String)>,
    /// (what, value): credentials kleidi reads (PIN, token, owner auth).
    secrets: Vec<(&'static str, String)>,
    /// (field, value) the "effective configuration" line must hold.
    config: Vec<(&'static str, String)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Format {
    Text,
    Json,
}

impl Format {
    fn flag(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Json => "json",
        }
    }

    /// Every target on, kleidi's and its dependencies' (the default filter silences vaultrs,
    /// rustify and tss_esapi; an operator chasing a problem turns them on).
    fn filter(self) -> &'static str {
        match self {
            Format::Text => "debug",
            Format::Json => "trace",
        }
    }
}

/// What a session did: the plaintexts it sent and got back, and the calls it made with a uid.
#[derive(Default)]
struct Session {
    plaintexts: Vec<Vec<u8>>,
    /// (uid, the guard's line for that call).
    calls: Vec<(String, &'static str)>,
    /// The uid of the decrypt of a tampered ciphertext: it reaches the backend and fails there.
    tampered: String,
    /// The uids of the decrypts sent at once while the key service was frozen (Vault only).
    burst: Vec<String>,
}

/// Freezes (`true`) or thaws (`false`) the key service, so that calls pile up in kleidi.
type Freeze<'a> = &'a dyn Fn(bool);

fn seed() -> Vec<u8> {
    let mut s = vec![0u8; 32];
    rand::rng().fill_bytes(&mut s);
    s
}

fn uid(what: &str) -> String {
    format!("logs-{what}-{}", uuid::Uuid::new_v4())
}

/// Status, v2 Encrypt and Decrypt of distinct random seeds, v1beta1 Version, Encrypt and Decrypt,
/// a tampered ciphertext, an unknown key_id, Status again (each one a fresh health probe: the
/// server runs with a zero health TTL) and, given a `freeze`, a burst of concurrent decrypts.
async fn session(socket: &Path, log: &Path, freeze: Option<Freeze<'_>>) -> Session {
    let channel = tonic::transport::Endpoint::from_shared(format!("unix:{}", socket.display()))
        .unwrap()
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let (mut v2, mut v1) = (V2::new(channel.clone()), V1::new(channel));
    let mut s = Session::default();
    let status = v2.status(v2::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.healthz, "ok");

    let mut last = None;
    for _ in 0..2 {
        let plaintext = seed();
        let encrypt_uid = uid("encrypt");
        let wrapped = v2
            .encrypt(v2::EncryptRequest {
                plaintext: plaintext.clone(),
                uid: encrypt_uid.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let decrypt_uid = uid("decrypt");
        let back = v2
            .decrypt(v2::DecryptRequest {
                ciphertext: wrapped.ciphertext.clone(),
                uid: decrypt_uid.clone(),
                key_id: wrapped.key_id.clone(),
                annotations: wrapped.annotations.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(back.plaintext, plaintext);
        s.calls.push((encrypt_uid, "encrypt ok"));
        s.calls.push((decrypt_uid, "decrypt ok"));
        s.plaintexts.push(plaintext);
        last = Some(wrapped);
    }
    let wrapped = last.unwrap();

    let version = v1
        .version(v1beta1::VersionRequest {
            version: "v1beta1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(version.version, "v1beta1");
    let dek = seed();
    let cipher = v1
        .encrypt(v1beta1::EncryptRequest {
            version: "v1beta1".into(),
            plain: dek.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .cipher;
    let plain = v1
        .decrypt(v1beta1::DecryptRequest {
            version: "v1beta1".into(),
            cipher,
        })
        .await
        .unwrap()
        .into_inner()
        .plain;
    assert_eq!(plain, dek);
    s.plaintexts.push(dek);

    // One character near the end: inside the GCM tag (PKCS#11), the base64 of transit's ciphertext
    // (Vault), the sealed object (TPM); every backend must ask its key service to find out.
    let mut tampered = wrapped.ciphertext.clone();
    let at = tampered.len() - 3;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    s.tampered = uid("tampered");
    let err = v2
        .decrypt(v2::DecryptRequest {
            ciphertext: tampered,
            uid: s.tampered.clone(),
            key_id: wrapped.key_id.clone(),
            annotations: wrapped.annotations.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    s.calls.push((s.tampered.clone(), "decrypt failed"));

    let unknown = uid("unknown-key");
    let mut key_id = wrapped.key_id.clone();
    key_id.truncate(key_id.len() - 4);
    key_id.push_str("0000");
    let err = v2
        .decrypt(v2::DecryptRequest {
            ciphertext: wrapped.ciphertext.clone(),
            uid: unknown.clone(),
            key_id,
            annotations: wrapped.annotations.clone(),
        })
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::Ok, "{err:?}");
    s.calls.push((unknown, "decrypt failed"));

    let status = v2.status(v2::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.healthz, "ok");
    if let Some(freeze) = freeze {
        burst(&v2, log, freeze, &mut s).await;
    }
    s
}

/// Decrypts that reach Vault together: with the server frozen, four decrypts take every call slot
/// and the ones sent after them queue, to go as one batch call when it thaws (`vault::batch`),
/// which runs on a task of its own and must still say whose decrypts it carries.
async fn burst(v2: &V2, log: &Path, freeze: Freeze<'_>, s: &mut Session) {
    let mut wrapped = Vec::new();
    for _ in 0..12 {
        let plaintext = seed();
        let uid = uid("burst-encrypt");
        let request = v2::EncryptRequest {
            plaintext: plaintext.clone(),
            uid: uid.clone(),
        };
        let w = v2.clone().encrypt(request).await.unwrap().into_inner();
        s.calls.push((uid, "encrypt ok"));
        s.plaintexts.push(plaintext.clone());
        wrapped.push((plaintext, w));
    }
    let decrypt = |(plaintext, w): (Vec<u8>, v2::EncryptResponse)| {
        let uid = uid("burst-decrypt");
        let mut client = v2.clone();
        let request = v2::DecryptRequest {
            ciphertext: w.ciphertext,
            uid: uid.clone(),
            key_id: w.key_id,
            annotations: w.annotations,
        };
        let call = tokio::spawn(async move { client.decrypt(request).await });
        (uid, plaintext, call)
    };
    freeze(true);
    let mut calls: Vec<_> = wrapped.drain(..4).map(decrypt).collect();
    // The four hold every call slot once their requests are on the way to Vault.
    let started = Instant::now();
    while !calls.iter().all(|(uid, ..)| {
        read(log)
            .lines()
            .any(|l| l.contains(uid.as_str()) && l.contains("Sending Request"))
    }) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the first decrypts never reached Vault"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    calls.extend(wrapped.into_iter().map(decrypt));
    // Time for the rest to queue. One that arrives later is still served, alone or in a smaller
    // batch: the checks hold either way, they only exercise the batch less.
    tokio::time::sleep(Duration::from_millis(500)).await;
    freeze(false);
    for (uid, plaintext, call) in calls {
        let back = call.await.unwrap().unwrap().into_inner();
        assert_eq!(back.plaintext, plaintext);
        s.calls.push((uid.clone(), "decrypt ok"));
        s.burst.push(uid);
    }
}

/// Serves `backend` with `format`, runs a session, stops kleidi with SIGTERM; the session and the
/// whole log.
async fn run(backend: &Backend, format: Format, freeze: Option<Freeze<'_>>) -> (Session, Vec<u8>) {
    let socket = backend.dir.path().join(format!("kms-{}.sock", format.flag()));
    let log = backend.dir.path().join(format!("kleidi-{}.log", format.flag()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_kleidi"))
        .args(["--log-format", format.flag(), "serve", "--listen"])
        .arg(format!("unix://{}", socket.display()))
        // Every Status probes, so the session's Status calls run probes beside its calls; a
        // generous call timeout outlasts the frozen Vault of the burst.
        .args(["--health-ok-ttl", "0s", "--health-roundtrip-interval", "0s"])
        .args(["--call-timeout", "10s"])
        .args(&backend.flags)
        .envs(backend.env.iter().cloned())
        .envs(match format {
            Format::Json => backend.json_env.clone(),
            Format::Text => Vec::new(),
        })
        .env("KLEIDI_LOG", format.filter())
        .env_remove("VAULT_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("kleidi exited ({status}):\n{}", read(&log));
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "kleidi did not listen within 30 s:\n{}",
            read(&log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let session = session(&socket, &log, freeze).await;
    stop(&mut child);
    (session, std::fs::read(&log).unwrap())
}

fn stop(child: &mut Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "kleidi exited with {status}");
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "kleidi still runs after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read(log: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned()
}

/// Every way a secret could be written as text: hex, base64 (transit gets plaintexts that way),
/// Rust's Debug of the bytes, and for a text secret itself; for a random binary secret also every
/// 8-byte piece of it in hex, so a cut or partial leak is found too.
fn needles(secret: &[u8], binary: bool) -> Vec<String> {
    let mut out = vec![
        hex::encode(secret),
        hex::encode_upper(secret),
        STANDARD.encode(secret),
        URL_SAFE_NO_PAD.encode(secret),
        format!("{secret:?}"),
    ];
    match binary {
        true => out.extend(secret.windows(8).map(hex::encode)),
        false => out.push(String::from_utf8_lossy(secret).into_owned()),
    }
    out
}

/// `log` is the file's bytes: a secret written raw (not valid UTF-8 on its own) is looked for as
/// bytes, every text form in the text.
fn assert_no_secret(backend: &Backend, format: Format, session: &Session, log: &[u8]) {
    let text = String::from_utf8_lossy(log);
    let raw = |secret: &[u8]| log.windows(secret.len()).any(|w| w == secret);
    let secrets = backend
        .secrets
        .iter()
        .map(|(what, s)| (what.to_string(), s.as_bytes(), false));
    let plaintexts =
        (session.plaintexts.iter().enumerate()).map(|(i, p)| (format!("plaintext {i}"), p.as_slice(), true));
    for (what, secret, binary) in secrets.chain(plaintexts) {
        assert!(
            !raw(secret),
            "{} {format:?}: the {what} is in the log",
            backend.name
        );
        for needle in needles(secret, binary) {
            assert!(
                !text.contains(&needle),
                "{} {format:?}: the {what} is in the log as {needle:?}",
                backend.name
            );
        }
    }
}

/// One log line as the checks need it, from either format.
struct Line<'a> {
    raw: &'a str,
    /// The uid of the `rpc` span the line is in, if any.
    rpc_uid: Option<String>,
    /// The `rpc` span's service version, if any.
    service: Option<String>,
    /// Whether the line is in the health probe's span.
    probe: bool,
    /// The callers' uids of the Vault decrypt batch the line is logged for, if any.
    batch_uids: Option<Vec<String>>,
    /// rustify's line for a request to Vault's transit decrypt.
    sends_decrypt: bool,
    /// From the guard layer (`kleidi::guard`), which logs once per backend call.
    from_guard: bool,
    /// The guard layer's message (`encrypt ok`, `decrypt failed`…), or empty.
    message: String,
}

fn parse(raw: &str, format: Format) -> Line<'_> {
    match format {
        Format::Json => {
            let v: serde_json::Value = serde_json::from_str(raw)
                .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {raw:?}"));
            let spans = v["spans"].as_array().cloned().unwrap_or_default();
            let named = |name: &str| spans.iter().find(|s| s["name"] == name).cloned();
            let rpc = named("rpc");
            let field = |key: &str| rpc.as_ref().and_then(|s| s[key].as_str().map(str::to_owned));
            let from_guard = v["target"] == "kleidi::guard";
            let batch = named("vault_batch");
            let uids = batch.and_then(|b| b["uids"].as_str().map(str::to_owned));
            Line {
                raw,
                rpc_uid: field("uid"),
                service: field("service"),
                probe: named("health_probe").is_some(),
                batch_uids: uids.map(|u| u.split(',').map(str::to_owned).collect()),
                sends_decrypt: v["fields"]["message"] == "Sending Request"
                    && spans
                        .iter()
                        .any(|s| s["uri"].as_str().is_some_and(|u| u.contains("/transit/decrypt/"))),
                from_guard,
                message: match from_guard {
                    true => v["fields"]["message"].as_str().unwrap_or_default().to_owned(),
                    false => String::new(),
                },
            }
        }
        Format::Text => {
            // `<time> <LEVEL> rpc{uid=U method=M service=S}:<inner spans>: <target>: <message> …`
            let after = |key: &str| {
                raw.find(key)
                    .map(|at| &raw[at + key.len()..])
                    .and_then(|rest| rest.split([' ', '}']).next())
                    .map(str::to_owned)
            };
            Line {
                raw,
                rpc_uid: after("rpc{uid="),
                service: after(" service="),
                probe: raw.contains("health_probe{uid="),
                batch_uids: after(" uids=").map(|u| u.split(',').map(str::to_owned).collect()),
                sends_decrypt: raw.contains("/transit/decrypt/")
                    && raw.contains("rustify::client: Sending Request"),
                from_guard: raw.contains(" kleidi::guard: "),
                message: ["encrypt ok", "decrypt ok", "encrypt failed", "decrypt failed"]
                    .into_iter()
                    .find(|m| raw.contains(&format!("kleidi::guard: {m}")))
                    .unwrap_or_default()
                    .to_owned(),
            }
        }
    }
}

fn assert_uids(backend: &Backend, format: Format, session: &Session, log: &str) {
    let name = backend.name;
    let lines: Vec<Line<'_>> = log.lines().map(|l| parse(l, format)).collect();
    for (uid, message) in &session.calls {
        assert!(
            (lines.iter()).any(|l| l.rpc_uid.as_deref() == Some(uid) && l.message == *message),
            "{name} {format:?}: no {message:?} line under uid {uid}:\n{log}"
        );
    }
    // The backend's own work for a call (a blocking thread for PKCS#11 and TPM, the HTTP client
    // for Vault) logs under the call's uid too, not only the guard layer around it.
    assert!(
        lines
            .iter()
            .any(|l| l.rpc_uid.as_deref() == Some(&session.tampered) && !l.from_guard),
        "{name} {format:?}: the backend's lines for {} carry no uid:\n{log}",
        session.tampered
    );
    // KMS v1 requests carry no uid: kleidi makes one up for each call.
    let v1: Vec<&Line<'_>> = lines
        .iter()
        .filter(|l| l.service.as_deref() == Some("v1beta1") && !l.message.is_empty())
        .collect();
    assert!(v1.len() >= 2, "{name} {format:?}: v1beta1 calls logged:\n{log}");
    for line in v1 {
        let uid = line.rpc_uid.as_deref().unwrap_or_default();
        assert!(
            uuid::Uuid::parse_str(uid).is_ok(),
            "{name} {format:?}: {}",
            line.raw
        );
    }
    // Every line of the guard layer (one per backend call) names its call or the probe, and the
    // shared probe never runs under the uid of a call that waited for it.
    let mut probe_lines = 0;
    for line in &lines {
        if line.from_guard {
            assert!(
                line.rpc_uid.is_some() || line.probe,
                "{name} {format:?}: a call's line without its uid: {}",
                line.raw
            );
        }
        if line.probe {
            probe_lines += 1;
            assert!(
                line.rpc_uid.is_none(),
                "{name} {format:?}: a probe line under a call's uid: {}",
                line.raw
            );
        }
    }
    assert!(
        probe_lines > 0,
        "{name} {format:?}: the probes logged nothing:\n{log}"
    );

    // Every decrypt of the burst reached Vault under its own uid, or in a batch naming it; a batch
    // names only calls of this session.
    let known: Vec<&str> = session.calls.iter().map(|(uid, _)| uid.as_str()).collect();
    let mut sent: Vec<&str> = Vec::new();
    let mut batches = 0;
    for line in lines.iter().filter(|l| l.sends_decrypt) {
        match (&line.rpc_uid, &line.batch_uids) {
            (Some(uid), None) => sent.push(uid),
            (None, Some(uids)) => {
                batches += 1;
                for uid in uids {
                    assert!(known.contains(&uid.as_str()), "{name} {format:?}: {}", line.raw);
                    sent.push(uid);
                }
            }
            _ => assert!(line.probe, "{name} {format:?}: whose decrypt? {}", line.raw),
        }
    }
    for uid in &session.burst {
        assert!(
            sent.contains(&uid.as_str()),
            "{name} {format:?}: the Vault request for {uid} names no uid:\n{log}"
        );
    }
    if !session.burst.is_empty() {
        println!("{name} {format:?}: {batches} batch call(s) for the burst");
    }
}

fn assert_startup_line(backend: &Backend, format: Format, log: &str) {
    let name = backend.name;
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("effective configuration"))
        .collect();
    assert_eq!(lines.len(), 1, "{name} {format:?}: one startup line:\n{log}");
    let line = lines[0];
    let mut expected = backend.config.clone();
    expected.extend([
        ("backend", name.to_owned()),
        ("call_timeout", "10s".to_owned()),
        ("health_ok_ttl", "0s".to_owned()),
        ("socket_mode", "0600".to_owned()),
        ("max_connections", "64".to_owned()),
        ("runtime", "multi-thread".to_owned()),
    ]);
    for (field, value) in expected {
        let shown = match format {
            Format::Text => line.contains(&format!(" {field}={value}")),
            Format::Json => {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                let got = &v["fields"][field];
                got.as_str() == Some(value.as_str()) || (got.is_u64() && got.as_u64() == value.parse().ok())
            }
        };
        assert!(shown, "{name} {format:?}: no {field}={value} in {line}");
    }
    for (what, secret) in &backend.secrets {
        assert!(
            !line.contains(secret.as_str()),
            "{name} {format:?}: the {what} in {line}"
        );
    }
}

async fn check_backend(backend: Backend, freeze: Option<Freeze<'_>>) {
    for format in [Format::Text, Format::Json] {
        let (session, raw) = run(&backend, format, freeze).await;
        assert_no_secret(&backend, format, &session, &raw);
        let log = String::from_utf8(raw).expect("the log is UTF-8");
        assert_uids(&backend, format, &session, &log);
        assert_startup_line(&backend, format, &log);
    }
}

#[cfg(feature = "pkcs11")]
#[tokio::test(flavor = "multi_thread")]
async fn pkcs11_logs_name_each_call_and_hold_no_secret() {
    const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
    const PIN: &str = "user-pin-4c81e2a7";
    const SO_PIN: &str = "so-pin-d93f0b6e";
    assert!(Path::new(MODULE).exists(), "apt-get install softhsm2");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("tokens")).unwrap();
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            dir.path().join("tokens").display()
        ),
    )
    .unwrap();
    let pin_file = dir.path().join("pin");
    private::write_private(&pin_file, format!("{PIN}\n"));
    private::write_private(&dir.path().join("so-pin"), SO_PIN);
    let flags: Vec<String> = [
        "--backend",
        "pkcs11",
        "--pkcs11-module",
        MODULE,
        "--pkcs11-token-label",
        "logs-test",
        "--pkcs11-key-label",
        "kek-logs",
        "--pkcs11-pin-file",
        pin_file.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    let init = Command::new(env!("CARGO_BIN_EXE_kleidi"))
        .args(["pkcs11", "init"])
        .args(&flags[2..])
        .arg("--pkcs11-so-pin-file")
        .arg(dir.path().join("so-pin"))
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    check_backend(
        Backend {
            name: "pkcs11",
            flags,
            env: vec![("SOFTHSM2_CONF", conf.display().to_string())],
            json_env: vec![],
            secrets: vec![("PIN", PIN.into()), ("SO PIN", SO_PIN.into())],
            config: vec![
                ("pkcs11_module", MODULE.into()),
                ("pkcs11_token_label", "logs-test".into()),
                ("pkcs11_key_label", "kek-logs".into()),
                ("pkcs11_pin_file", pin_file.display().to_string()),
            ],
            dir,
        },
        None,
    )
    .await;
}

#[cfg(feature = "vault")]
mod vault_support;

#[cfg(feature = "vault")]
#[tokio::test(flavor = "multi_thread")]
async fn vault_logs_name_each_call_and_hold_no_secret() {
    let bao = vault_support::Bao::dev();
    let token = bao.kleidi_token("kek", "1h");
    let token_file = bao.file("token", &token);
    let flags: Vec<String> = [
        "--backend",
        "vault",
        "--vault-addr",
        &bao.addr,
        "--vault-key",
        "kek",
        "--vault-auth",
        "token",
        "--vault-token-file",
        token_file.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    let backend = Backend {
        name: "vault",
        dir: tempfile::tempdir().unwrap(),
        flags,
        env: vec![],
        json_env: vec![],
        secrets: vec![("Vault token", token)],
        config: vec![
            ("vault_addr", bao.addr.clone()),
            ("vault_key", "kek".into()),
            ("vault_transit_mount", "transit".into()),
            ("vault_auth", "token".into()),
            ("vault_token_file", token_file.display().to_string()),
        ],
    };
    let freeze = |on: bool| if on { bao.pause() } else { bao.resume() };
    check_backend(backend, Some(&freeze)).await;
}

#[cfg(feature = "tpm")]
#[path = "common/swtpm.rs"]
mod swtpm;

#[cfg(feature = "tpm")]
#[tokio::test(flavor = "multi_thread")]
async fn tpm_logs_name_each_call_and_hold_no_secret() {
    use std::str::FromStr;
    use tss_esapi::interface_types::session_handles::AuthSession;
    use tss_esapi::{Context, structures::Auth, tcti_ldr::TctiNameConf};

    const OWNER_AUTH: &str = "owner-auth-6d2e90c1";
    let tpm = swtpm::Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("tpm");
    let auth_file = dir.path().join("owner-auth");
    private::write_private(&auth_file, OWNER_AUTH);
    let mut flags: Vec<String> = vec![
        "--tpm-tcti".into(),
        tpm.tcti(),
        "--tpm-state-dir".into(),
        state_dir.display().to_string(),
    ];
    let init = Command::new(env!("CARGO_BIN_EXE_kleidi"))
        .args(["tpm", "init"])
        .args(&flags)
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    // The owner takes ownership after init, as an administrator would: kleidi then needs the auth.
    let mut ctx = Context::new(TctiNameConf::from_str(&tpm.tcti()).unwrap()).unwrap();
    ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
        ctx.hierarchy_change_auth(
            tss_esapi::handles::AuthHandle::Owner,
            Auth::try_from(OWNER_AUTH.as_bytes().to_vec()).unwrap(),
        )
    })
    .unwrap();
    drop(ctx);
    flags.extend(["--tpm-owner-auth-file".into(), auth_file.display().to_string()]);
    flags.splice(0..0, ["--backend".to_string(), "tpm".to_string()]);
    let backend = Backend {
        name: "tpm",
        flags,
        env: vec![],
        // The tpm2-tss C library writes its own `WARNING:esys:…` lines straight to stderr (the
        // tampered ciphertext makes it): not JSON, so a JSON deployment silences them (README).
        // The text run keeps them, and the secret scan reads them too.
        json_env: vec![("TSS2_LOG", "all+none".into())],
        secrets: vec![("owner auth", OWNER_AUTH.into())],
        config: vec![
            ("tpm_tcti", tpm.tcti()),
            ("tpm_state_dir", state_dir.display().to_string()),
            ("tpm_owner_auth_file", auth_file.display().to_string()),
        ],
        dir,
    };
    check_backend(backend, None).await;
}
