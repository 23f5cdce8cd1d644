//! `kleidi serve --backend aws-kms` end to end: the real binary against a real local KMS server
//! (moto, PyPI `moto[server]`, started by each test on 127.0.0.1 and a free port, stopped at its
//! end), over the Unix socket, with the calls kube-apiserver makes. Keys are made, rotated, moved
//! and disabled with boto3, an independent client. Built only with the `aws-kms` feature:
//! `cargo test -p kleidi --features aws-kms --test aws_kms` (`just test` runs it).
//!
//! moto differs from AWS KMS in two ways these tests work around, and say where: it encrypts with a
//! disabled key (AWS answers DisabledException), and its keys live in memory (a restarted server
//! has none), and its on-demand rotation records a rotation without new key material.

#![cfg(feature = "aws-kms")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // tests

mod support;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kleidi::proto::{v1beta1, v2};
use support::{Kleidi, seed};
use tonic::Code;

/// Dummy credentials moto accepts; the plugin reads them from its environment, as from any chain.
const DUMMY_CREDENTIALS: [(&str, &str); 2] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
];
const REGION: &str = "us-east-1";

/// A moto server of its own; killed on drop.
struct Moto {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Moto {
    fn start() -> Self {
        let mut moto = Self::not_started();
        moto.restart();
        moto
    }

    /// A port and directory for a server started later with [`Moto::restart`].
    fn not_started() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Moto {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on its port and waits until it answers.
    fn restart(&mut self) {
        self.stop();
        // The interpreter itself, not pyenv's shim, so the kill reaches the server.
        let python = python();
        let child = Command::new(&python)
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("moto.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{python}: {e}; install moto with `pip install 'moto[server]'`"));
        self.child = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "moto_server exited ({status}): {}",
                    std::fs::read_to_string(self.dir.path().join("moto.log")).unwrap_or_default()
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "moto did not listen within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Requests the server has answered so far (its access log, one line each).
    fn requests(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("moto.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"POST / HTTP"))
            .count()
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs boto3 against the server: `kms` is a KMS client; the script prints its answer.
    fn boto(&self, script: &str) -> String {
        let out = Command::new(python())
            .args(["-c", &format!("import boto3\nkms = boto3.client('kms', endpoint_url='{}', region_name='{REGION}')\n{script}", self.url())])
            .envs(DUMMY_CREDENTIALS)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "boto3: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// A new symmetric key; its ARN.
    fn create_key(&self) -> String {
        self.boto("print(kms.create_key()['KeyMetadata']['Arn'])")
    }

    /// A new key named by `alias/kek`; its ARN.
    fn create_key_with_alias(&self) -> String {
        let arn = self.create_key();
        self.boto(&format!(
            "kms.create_alias(AliasName='alias/kek', TargetKeyId='{arn}')"
        ));
        arn
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The key's id (moto's DisableKey, EnableKey and ScheduleKeyDeletion take no ARN).
fn key_uuid(arn: &str) -> &str {
    arn.rsplit_once('/').unwrap().1
}

fn python() -> String {
    static EXE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    EXE.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys, moto.server; print(sys.executable)"])
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "moto is missing: `python3 -m pip install 'moto[server]'` (just deps): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
    .clone()
}

/// `kleidi serve --backend aws-kms` on the server, for cluster `cluster`, plus `extra` flags.
fn kleidi(moto: &Moto, key: &str, cluster: &str, extra: &[&str]) -> Kleidi {
    let mut args: Vec<String> = [
        "--backend",
        "aws-kms",
        "--aws-kms-key-id",
        key,
        "--aws-region",
        REGION,
        "--aws-endpoint-url",
        &moto.url(),
        "--aws-encryption-context-cluster",
        cluster,
        "--call-timeout",
        "1s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    Kleidi::serve(
        moto.dir.path(),
        &format!("kleidi-{cluster}-{}", unique()),
        &args,
        &env(moto),
    )
}

/// The child's AWS environment: dummy credentials, no shared files, no instance metadata.
fn env(moto: &Moto) -> Vec<(&'static str, PathBuf)> {
    let none = moto.dir.path().join("no-such-file");
    let mut env: Vec<(&str, PathBuf)> = DUMMY_CREDENTIALS
        .iter()
        .map(|(k, v)| (*k, PathBuf::from(v)))
        .collect();
    env.extend([
        ("AWS_CONFIG_FILE", none.clone()),
        ("AWS_SHARED_CREDENTIALS_FILE", none),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ]);
    env
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Polls Status until `done` holds for it, for at most `limit`.
async fn status_until(
    k: &Kleidi,
    limit: Duration,
    done: impl Fn(&v2::StatusResponse) -> bool,
) -> v2::StatusResponse {
    let started = Instant::now();
    loop {
        let s = k.status().await;
        if done(&s) {
            return s;
        }
        assert!(
            started.elapsed() < limit,
            "Status still {s:?} after {limit:?}; log:\n{}",
            k.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn v2_and_v1beta1_round_trip_and_status_and_encrypt_agree_on_the_key_id() {
    let moto = Moto::start();
    let arn = moto.create_key_with_alias();
    let k = kleidi(&moto, "alias/kek", "prod-eu", &[]);
    let s = k.status().await;
    assert_eq!((s.version.as_str(), s.healthz.as_str()), ("v2", "ok"));
    assert_eq!(
        s.key_id,
        format!("aws-kms:{arn}:v1"),
        "the alias's target ARN, first material"
    );

    let plain = seed();
    let wrapped = k.encrypt(&plain).await.unwrap();
    assert_eq!(wrapped.key_id, s.key_id, "Encrypt and Status must agree");
    assert!(wrapped.ciphertext.len() <= 1024 && !wrapped.ciphertext.windows(32).any(|w| w == plain));
    assert_eq!(
        wrapped.annotations.get("format.kleidi.dev").map(Vec::as_slice),
        Some(&b"aws-kms-ec/1"[..])
    );
    assert_eq!(k.decrypt(&wrapped).await.unwrap(), plain);

    // Tampered blob, a key_id naming no KMS key, another backend's format: bad input, not an outage.
    let mut flipped = wrapped.clone();
    let at = flipped.ciphertext.len() - 5;
    flipped.ciphertext[at] ^= 1;
    let mut relabelled = wrapped.clone();
    relabelled.key_id = "vault:transit/kek:v1:00000000".into();
    let mut reformatted = wrapped.clone();
    reformatted
        .annotations
        .insert("format.kleidi.dev".into(), b"vault-transit-aad/1".to_vec());
    for bad in [&flipped, &relabelled, &reformatted] {
        let err = k.decrypt(bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    assert_eq!(
        k.status().await.healthz,
        "ok",
        "bad input must not make the plugin unhealthy"
    );

    // v1beta1 (kleidi's own envelope around the same ciphertext).
    let mut v1 = k.v1().await;
    let cipher = v1
        .encrypt(v1beta1::EncryptRequest {
            version: "v1beta1".into(),
            plain: plain.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .cipher;
    let back = v1
        .decrypt(v1beta1::DecryptRequest {
            version: "v1beta1".into(),
            cipher,
        })
        .await
        .unwrap()
        .into_inner()
        .plain;
    assert_eq!(back, plain);
}

/// moto's RotateKeyOnDemand records a rotation (ListKeyRotations shows it) but keeps the key
/// material; AWS KMS makes new material and keeps the old for decrypt. The key_id follows the
/// rotation either way, which is what this shows.
/// Each KMS call costs money: the apiserver's polls are answered from the health cache.
#[tokio::test(flavor = "multi_thread")]
async fn status_polls_within_the_health_interval_make_no_kms_call() {
    let moto = Moto::start();
    moto.create_key_with_alias();
    let k = kleidi(&moto, "alias/kek", "prod-eu", &["--health-ok-ttl", "30s"]);
    assert_eq!(k.status().await.healthz, "ok");
    let before = moto.requests();
    for _ in 0..40 {
        assert_eq!(k.status().await.healthz, "ok");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(moto.requests(), before, "a Status poll reached KMS");
    // And the counter counts: one Encrypt is one request.
    k.encrypt(&seed()).await.unwrap();
    let logged = Instant::now();
    while moto.requests() == before && logged.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(moto.requests(), before + 1);
    assert!(!k.logs().contains("testing"), "credentials in the log");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_changes_the_key_id_within_one_health_interval_and_old_seeds_decrypt() {
    let moto = Moto::start();
    let arn = moto.create_key_with_alias();
    let k = kleidi(&moto, "alias/kek", "prod-eu", &["--health-ok-ttl", "500ms"]);
    let before = k.status().await;
    let plain = seed();
    let old = k.encrypt(&plain).await.unwrap();
    moto.boto(&format!("kms.rotate_key_on_demand(KeyId='{arn}')"));
    let after = status_until(&k, Duration::from_secs(5), |s| s.key_id != before.key_id).await;
    assert_eq!(after.key_id, format!("aws-kms:{arn}:v2"));
    assert_eq!(after.healthz, "ok");
    let new = k.encrypt(&plain).await.unwrap();
    assert_eq!(new.key_id, after.key_id);
    assert_eq!(
        k.decrypt(&old).await.unwrap(),
        plain,
        "a seed wrapped before the rotation"
    );
    assert_eq!(k.decrypt(&new).await.unwrap(), plain);
}

#[tokio::test(flavor = "multi_thread")]
async fn moving_the_alias_switches_the_key_and_seeds_of_the_previous_key_still_decrypt() {
    let moto = Moto::start();
    let first = moto.create_key_with_alias();
    let second = moto.create_key();
    let k = kleidi(&moto, "alias/kek", "prod-eu", &["--health-ok-ttl", "500ms"]);
    let plain = seed();
    let old = k.encrypt(&plain).await.unwrap();
    assert_eq!(old.key_id, format!("aws-kms:{first}:v1"));
    moto.boto(&format!(
        "kms.update_alias(AliasName='alias/kek', TargetKeyId='{second}')"
    ));
    let moved = status_until(&k, Duration::from_secs(5), |s| s.key_id != old.key_id).await;
    assert_eq!(moved.key_id, format!("aws-kms:{second}:v1"));
    let new = k.encrypt(&plain).await.unwrap();
    assert_eq!(new.key_id, moved.key_id);
    assert_eq!(
        k.decrypt(&old).await.unwrap(),
        plain,
        "decrypted with the key that wrapped it"
    );
    assert_eq!(k.decrypt(&new).await.unwrap(), plain);
}

/// AWS KMS refuses Encrypt with a disabled key (DisabledException); moto does not, so what this
/// shows of Encrypt is kleidi's own refusal once Status has seen the key disabled.
#[tokio::test(flavor = "multi_thread")]
async fn a_disabled_key_is_never_healthy_encrypt_fails_with_its_class_and_enabling_recovers() {
    let moto = Moto::start();
    let arn = moto.create_key_with_alias();
    let k = kleidi(
        &moto,
        "alias/kek",
        "prod-eu",
        &["--health-ok-ttl", "500ms", "--health-err-ttl", "300ms"],
    );
    let plain = seed();
    let wrapped = k.encrypt(&plain).await.unwrap();
    moto.boto(&format!("kms.disable_key(KeyId='{}')", key_uuid(&arn)));
    let down = status_until(&k, Duration::from_secs(5), |s| s.healthz != "ok").await;
    assert!(down.healthz.contains("key_disabled"), "{}", down.healthz);
    let err = k.encrypt(&plain).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("key_disabled"), "{}", err.message());
    // Still unhealthy on every later poll: nothing but the key coming back makes it ok.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_ne!(k.status().await.healthz, "ok");
    }

    moto.boto(&format!("kms.enable_key(KeyId='{}')", key_uuid(&arn)));
    status_until(&k, Duration::from_secs(5), |s| s.healthz == "ok").await;
    let again = k.encrypt(&plain).await.unwrap();
    assert_eq!(k.decrypt(&again).await.unwrap(), plain);
    assert_eq!(k.decrypt(&wrapped).await.unwrap(), plain);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_seed_wrapped_for_one_cluster_does_not_decrypt_in_another() {
    let moto = Moto::start();
    moto.create_key_with_alias();
    let a = kleidi(&moto, "alias/kek", "cluster-a", &[]);
    let b = kleidi(&moto, "alias/kek", "cluster-b", &[]);
    let plain = seed();
    let wrapped = a.encrypt(&plain).await.unwrap();
    let err = b.decrypt(&wrapped).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        b.status().await.healthz,
        "ok",
        "a foreign seed is bad input, not an outage"
    );
    assert_eq!(a.decrypt(&wrapped).await.unwrap(), plain);

    // The same cluster, another provider name: also refused.
    let other_provider = kleidi(
        &moto,
        "alias/kek",
        "cluster-a",
        &["--aws-encryption-context-provider", "kms-2"],
    );
    let err = other_provider.decrypt(&wrapped).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

/// moto keeps keys in memory: the restarted server has a new key under the same alias (as after
/// a restore to another key), so what must hold is that kleidi recovers without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn kms_stopped_makes_calls_unavailable_and_a_restarted_kms_is_used_again_without_a_restart() {
    let mut moto = Moto::start();
    moto.create_key_with_alias();
    let k = kleidi(
        &moto,
        "alias/kek",
        "prod-eu",
        &["--health-ok-ttl", "500ms", "--health-err-ttl", "300ms"],
    );
    let plain = seed();
    k.encrypt(&plain).await.unwrap();

    moto.stop();
    let started = Instant::now();
    let err = k.encrypt(&plain).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("network"), "{}", err.message());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "within the call timeout: {:?}",
        started.elapsed()
    );
    let down = status_until(&k, Duration::from_secs(5), |s| s.healthz != "ok").await;
    assert!(down.healthz.contains("network"), "{}", down.healthz);

    moto.restart();
    let arn = moto.create_key_with_alias();
    let up = status_until(&k, Duration::from_secs(10), |s| s.healthz == "ok").await;
    assert_eq!(up.key_id, format!("aws-kms:{arn}:v1"));
    let wrapped = k.encrypt(&plain).await.unwrap();
    assert_eq!(k.decrypt(&wrapped).await.unwrap(), plain);
}

/// A node that boots before KMS answers (network down, endpoint not up yet) serves anyway and
/// uses KMS as soon as it answers.
#[tokio::test(flavor = "multi_thread")]
async fn kleidi_started_before_kms_serves_unavailable_then_works_without_a_restart() {
    let mut moto = Moto::not_started();
    let k = kleidi(
        &moto,
        "alias/kek",
        "prod-eu",
        &["--health-ok-ttl", "500ms", "--health-err-ttl", "300ms"],
    );
    let down = k.status().await;
    assert!(down.healthz.contains("network"), "{}", down.healthz);
    assert_eq!(k.encrypt(&seed()).await.unwrap_err().code(), Code::Unavailable);
    moto.restart();
    let arn = moto.create_key_with_alias();
    let up = status_until(&k, Duration::from_secs(10), |s| s.healthz == "ok").await;
    assert_eq!(up.key_id, format!("aws-kms:{arn}:v1"));
    let plain = seed();
    let wrapped = k.encrypt(&plain).await.unwrap();
    assert_eq!(wrapped.key_id, up.key_id);
    assert_eq!(k.decrypt(&wrapped).await.unwrap(), plain);
}

#[tokio::test(flavor = "multi_thread")]
async fn sixteen_concurrent_callers_round_trip_without_an_error() {
    let moto = Moto::start();
    moto.create_key_with_alias();
    let k = std::sync::Arc::new(kleidi(&moto, "alias/kek", "prod-eu", &[]));
    let mut callers = Vec::new();
    for _ in 0..16 {
        let k = k.clone();
        callers.push(tokio::spawn(async move {
            let mut client = k.v2().await;
            for _ in 0..10 {
                let plain = seed();
                let wrapped = client
                    .encrypt(v2::EncryptRequest {
                        plaintext: plain.clone(),
                        uid: uuid::Uuid::new_v4().to_string(),
                    })
                    .await?
                    .into_inner();
                let back = client
                    .decrypt(v2::DecryptRequest {
                        ciphertext: wrapped.ciphertext,
                        uid: uuid::Uuid::new_v4().to_string(),
                        key_id: wrapped.key_id,
                        annotations: wrapped.annotations,
                    })
                    .await?
                    .into_inner()
                    .plaintext;
                assert_eq!(back, plain);
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    let mut errors = Vec::new();
    for caller in callers {
        if let Err(err) = caller.await.unwrap() {
            errors.push(err);
        }
    }
    assert!(
        errors.is_empty(),
        "{} of 16 callers failed: {errors:?}",
        errors.len()
    );
    assert_eq!(k.status().await.healthz, "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn kleidi_check_describes_the_key_and_names_a_disabled_one() {
    let moto = Moto::start();
    let arn = moto.create_key_with_alias();
    let dir = tempfile::tempdir().unwrap();
    let check = || {
        let out = Command::new(env!("CARGO_BIN_EXE_kleidi"))
            .args([
                "check",
                "--output",
                "json",
                "--backend",
                "aws-kms",
                "--aws-kms-key-id",
                "alias/kek",
            ])
            .args(["--aws-region", REGION, "--aws-endpoint-url", &moto.url()])
            .args([
                "--aws-encryption-context-cluster",
                "prod-eu",
                "--call-timeout",
                "1s",
            ])
            .arg("--listen")
            .arg(dir.path().join("kms.sock"))
            .envs(env(&moto))
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        (out.status.success(), report)
    };
    let (ok, report) = check();
    assert!(ok, "{report:#}");
    assert_eq!(report["backend"], "aws-kms");
    assert_eq!(report["key_id"], format!("aws-kms:{arn}:v1"));
    let details = &report["details"];
    assert_eq!(details["key_arn"], arn.as_str(), "{report:#}");
    assert_eq!(details["key_state"], "Enabled");
    assert_eq!(details["region"], REGION);
    assert_eq!(details["endpoint"], moto.url().as_str());
    assert_eq!(
        details["encryption_context"],
        "kleidi.dev/cluster=prod-eu, kleidi.dev/provider=kleidi"
    );

    moto.boto(&format!(
        "kms.schedule_key_deletion(KeyId='{}', PendingWindowInDays=7)",
        key_uuid(&arn)
    ));
    let (ok, report) = check();
    assert!(!ok);
    let failed = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["ok"] == false)
        .unwrap();
    assert_eq!(
        (failed["name"].as_str(), failed["problem"].as_str()),
        (Some("key_id"), Some("key_disabled")),
        "{report:#}"
    );
    assert_eq!(report["details"]["key_state"], "PendingDeletion");
}

/// At trace level the SDK prints whole requests (the session token header among them) and, with
/// `LOG_SIGNABLE_BODY`, what it signs; kleidi drops those events, so no credential and no form of
/// the seed reaches the log whatever `KLEIDI_LOG` asks for.
#[tokio::test(flavor = "multi_thread")]
async fn trace_logging_carries_no_seed_and_no_credential() {
    use base64::Engine as _;
    const SECRET: &str = "dummy-secret-7f3a90";
    const SESSION_TOKEN: &str = "dummy-session-token-c41e";
    let moto = Moto::start();
    moto.create_key_with_alias();
    let socket = moto.dir.path().join("trace.sock");
    let log = moto.dir.path().join("trace.log");
    let child = Command::new(env!("CARGO_BIN_EXE_kleidi"))
        .args(["serve", "--backend", "aws-kms", "--aws-kms-key-id", "alias/kek"])
        .args(["--aws-region", REGION, "--aws-endpoint-url", &moto.url()])
        .args(["--aws-encryption-context-cluster", "prod-eu", "--listen"])
        .arg(&socket)
        .envs(env(&moto))
        .env("KLEIDI_LOG", "trace")
        // Asks the SDK to print what it signs (the body, with the seed in base64).
        .env("LOG_SIGNABLE_BODY", "true")
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_SESSION_TOKEN", SESSION_TOKEN)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let k = Kleidi { child, socket, log };
    let started = Instant::now();
    while std::os::unix::net::UnixStream::connect(&k.socket).is_err() {
        assert!(started.elapsed() < Duration::from_secs(20), "{}", k.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let plain = seed();
    let wrapped = k.encrypt(&plain).await.unwrap();
    assert_eq!(k.decrypt(&wrapped).await.unwrap(), plain);
    let logs = k.logs();
    assert!(logs.contains("TRACE"), "not at trace level: {logs}");
    let b64 = base64::engine::general_purpose::STANDARD.encode(&plain);
    for form in [
        b64.as_str(),
        &hex::encode(&plain),
        &format!("{:?}", &plain[..8]).replace(['[', ']'], ""),
    ] {
        assert!(!logs.contains(form), "the seed as {form} in the log");
    }
    assert!(
        !logs.contains(SECRET) && !logs.contains(SESSION_TOKEN),
        "a credential in the log"
    );
}

/// A KMS stand-in on 127.0.0.1 that answers Encrypt with ThrottlingException for the first
/// `throttled` Encrypt requests (moto never throttles); everything else as KMS would. Counts the
/// Encrypt requests.
async fn throttling_kms(throttled: usize) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
    const ARN: &str = "arn:aws:kms:us-east-1:111122223333:key/0a1b2c3d-0000-4000-8000-000000000001";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let encrypts = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = encrypts.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let (mut target, mut length) = (String::new(), 0usize);
                    loop {
                        let mut line = String::new();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("x-amz-target:") {
                            target = v.trim().to_string();
                        } else if let Some(v) = lower.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap();
                        } else if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; length];
                    stream.read_exact(&mut body).await.unwrap();
                    let (status, answer) = match target.as_str() {
                        "trentservice.describekey" => (
                            "200 OK",
                            format!(
                                r#"{{"KeyMetadata":{{"KeyId":"k","Arn":"{ARN}","KeyState":"Enabled","Enabled":true,"KeySpec":"SYMMETRIC_DEFAULT","KeyUsage":"ENCRYPT_DECRYPT"}}}}"#
                            ),
                        ),
                        "trentservice.listkeyrotations" => {
                            ("200 OK", r#"{"Rotations":[],"Truncated":false}"#.into())
                        }
                        "trentservice.encrypt" if seen.fetch_add(1, Ordering::SeqCst) < throttled => (
                            "400 Bad Request",
                            r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#.into(),
                        ),
                        "trentservice.encrypt" => (
                            "200 OK",
                            format!(r#"{{"CiphertextBlob":"AQIDBA==","KeyId":"{ARN}"}}"#),
                        ),
                        _ => (
                            "400 Bad Request",
                            r#"{"__type":"UnsupportedOperationException"}"#.into(),
                        ),
                    };
                    let reply = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if stream.get_mut().write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, encrypts)
}

/// Throttling is retried with backoff inside the call's deadline; throttling that outlasts it is
/// UNAVAILABLE with its class, within `--call-timeout`.
#[tokio::test(flavor = "multi_thread")]
async fn throttled_encrypts_are_retried_within_the_call_timeout() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    for (throttled, succeeds) in [(2, true), (usize::MAX, false)] {
        let (url, encrypts) = throttling_kms(throttled).await;
        let args: Vec<String> = [
            "--backend",
            "aws-kms",
            "--aws-kms-key-id",
            "alias/kek",
            "--aws-region",
            REGION,
            "--aws-endpoint-url",
            &url,
            "--aws-encryption-context-cluster",
            "prod-eu",
            "--call-timeout",
            "1s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let env = [
            ("AWS_ACCESS_KEY_ID", PathBuf::from("testing")),
            ("AWS_SECRET_ACCESS_KEY", PathBuf::from("testing")),
            ("AWS_CONFIG_FILE", dir.path().join("none")),
            ("AWS_SHARED_CREDENTIALS_FILE", dir.path().join("none")),
            ("AWS_EC2_METADATA_DISABLED", PathBuf::from("true")),
        ];
        let k = Kleidi::serve(dir.path(), &format!("throttle-{succeeds}"), &args, &env);
        // Served only once the start-up probe (whose round trip encrypts too) is done.
        k.status().await;
        encrypts.store(0, Ordering::SeqCst);
        let started = Instant::now();
        let answer = k.encrypt(&seed()).await;
        let took = started.elapsed();
        let sent = encrypts.load(Ordering::SeqCst);
        if succeeds {
            assert!(answer.is_ok(), "{answer:?}");
            assert_eq!(sent, 3, "two throttled attempts, then the one that worked");
        } else {
            let err = answer.unwrap_err();
            assert_eq!(err.code(), Code::Unavailable, "{err:?}");
            assert!(err.message().contains("throttled"), "{}", err.message());
            assert!(sent >= 2, "not retried: {sent} attempt(s)");
        }
        assert!(took < Duration::from_secs(1), "beyond --call-timeout: {took:?}");
    }
}

#[test]
fn a_missing_key_stops_the_start_with_its_name() {
    let moto = Moto::start();
    let out = Command::new(env!("CARGO_BIN_EXE_kleidi"))
        .args(["serve", "--backend", "aws-kms", "--aws-kms-key-id", "alias/nope"])
        .args(["--aws-region", REGION, "--aws-endpoint-url", &moto.url()])
        .args(["--aws-encryption-context-cluster", "prod-eu"])
        .arg("--listen")
        .arg(moto.dir.path().join("kms.sock"))
        .envs(env(&moto))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("alias/nope") && stderr.contains("never creates keys"),
        "{stderr}"
    );
    assert!(!stderr.contains("testing"), "credentials in the log: {stderr}");
}
