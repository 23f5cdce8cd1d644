//! The whole storage path with real components: a real etcd, a SoftHSM token made by
//! `kleidi pkcs11 init`, and `kleidi serve` as its own process, spoken to over its Unix socket by the
//! harness's apiserver envelope. What a cluster owner relies on: Secrets read back exactly, etcd never
//! holds a byte of them in clear, rotation keeps old Secrets readable, tampering in etcd is caught, and a
//! plugin crash between write and read loses nothing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test helpers outside #[test] functions

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use kleidi_harness::apiserver::object::{self, Encoding, Keys};
use kleidi_harness::apiserver::{Authority, Envelope, Error, GrpcKms, Storage, StoreError, connect_unix};
use kleidi_harness::audit::{self, Audit};
use kleidi_harness::runtime::{Etcd, KleidiPlugin, SoftHsmToken, kleidi_bin};
use rand::RngCore;
use rstest::rstest;

const PROVIDER: &str = "kleidi";
const KEK_1: &str = "kek-1";
const KEK_2: &str = "kek-2";

/// etcd, a token with `KEK_1`, kleidi serving it, and an apiserver envelope that has probed once.
struct Cluster {
    kleidi: PathBuf,
    etcd: Etcd,
    token: SoftHsmToken,
    plugin: KleidiPlugin,
    storage: Storage,
}

impl Cluster {
    async fn start() -> Self {
        let kleidi = kleidi_bin().unwrap();
        let etcd = Etcd::start().await.unwrap();
        let token = SoftHsmToken::create(&kleidi, "harness", KEK_1).unwrap();
        let plugin = KleidiPlugin::start(&kleidi, &token, KEK_1, &[]).await.unwrap();
        let envelope = apiserver(&plugin).await;
        let storage = Storage::new(etcd.client().await.unwrap(), envelope);
        Cluster {
            kleidi,
            etcd,
            token,
            plugin,
            storage,
        }
    }

    /// A second kube-apiserver (or this one after a restart): same etcd and plugin, empty caches.
    async fn cold_apiserver(&self) -> Storage {
        Storage::new(self.storage.etcd.clone(), apiserver(&self.plugin).await)
    }

    async fn raw(&self, key: &str) -> Vec<u8> {
        self.storage.etcd.get(key.as_bytes()).await.unwrap().unwrap()
    }

    async fn everything(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.storage.etcd.range(b"/").await.unwrap()
    }
}

async fn kms(plugin: &KleidiPlugin) -> GrpcKms {
    connect_unix(&plugin.socket, Authority::Localhost).await.unwrap()
}

async fn apiserver(plugin: &KleidiPlugin) -> Arc<Envelope> {
    let envelope = Envelope::new(PROVIDER, Arc::new(kms(plugin).await)).unwrap();
    envelope.refresh().await.unwrap();
    Arc::new(envelope)
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    rand::rng().fill_bytes(&mut b);
    b
}

/// A Secret with `n` random values, stored as `encoding`; returns its etcd key and plaintext bytes.
fn secret(name: &str, values: &[Vec<u8>], encoding: Encoding) -> (String, Vec<u8>) {
    let data: BTreeMap<String, Vec<u8>> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (format!("key-{i}"), v.clone()))
        .collect();
    let secret = object::new_secret("default", name, data);
    (
        Keys::default().secret("default", name),
        object::encode_secret(&secret, encoding).unwrap(),
    )
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[rstest]
#[case::protobuf_small(Encoding::Protobuf, 1, 16)]
#[case::protobuf_many_keys(Encoding::Protobuf, 50, 64)]
#[case::protobuf_one_mebibyte(Encoding::Protobuf, 1, 1 << 20)]
#[case::json(Encoding::Json, 3, 32)]
#[case::no_data(Encoding::Protobuf, 0, 0)]
#[tokio::test]
async fn secrets_read_back_exactly_through_kleidi_and_etcd(
    #[case] encoding: Encoding,
    #[case] keys: usize,
    #[case] len: usize,
) {
    let c = Cluster::start().await;
    let values: Vec<Vec<u8>> = (0..keys).map(|_| random_bytes(len)).collect();
    let (key, plaintext) = secret("round-trip", &values, encoding);
    c.storage.put(&key, &plaintext).await.unwrap();

    let (read, stale) = c.storage.get(&key).await.unwrap();
    assert_eq!(*read, plaintext);
    assert!(!stale);
    // A cold apiserver has to unwrap the seed through the plugin: one Decrypt, then the same bytes.
    let cold = c.cold_apiserver().await;
    let (read, _) = cold.get(&key).await.unwrap();
    assert_eq!(*read, plaintext);
    assert_eq!(cold.envelope().unwrap().stats().decrypt_calls, 1);
    let parsed = object::parse_secret(&read).unwrap();
    assert_eq!(parsed.data.unwrap_or_default().len(), keys);
}

#[tokio::test]
async fn no_byte_run_of_any_written_secret_appears_in_etcd() {
    let c = Cluster::start().await;
    let mut written = Vec::new();
    for i in 0..20 {
        let encoding = if i % 2 == 0 {
            Encoding::Protobuf
        } else {
            Encoding::Json
        };
        let (key, plaintext) = secret(
            &format!("s-{i}"),
            &[random_bytes(24), b"hunter2-hunter2".to_vec()],
            encoding,
        );
        c.storage.put(&key, &plaintext).await.unwrap();
        written.push(plaintext);
    }
    let everything = c.everything().await;
    assert_eq!(everything.len(), 20);
    let audit: Audit = everything.iter().map(|(k, v)| (k, v)).collect();
    assert!(audit.all_encrypted(), "{audit}");
    assert_eq!(audit.count("kms-v2"), 20, "{audit}");
    // Any 12-byte run of any plaintext (data values, metadata, the protobuf or JSON framing) in any
    // stored value would be a leak; 12 random bytes match by chance with probability ~2^-96.
    for plaintext in &written {
        for run in plaintext.windows(12) {
            for (key, value) in &everything {
                assert!(
                    !contains(value, run),
                    "{:?} of a Secret is in clear in {}",
                    String::from_utf8_lossy(run),
                    String::from_utf8_lossy(key)
                );
            }
        }
    }
}

#[tokio::test]
async fn rotation_makes_a_new_seed_and_old_secrets_still_read() {
    let mut c = Cluster::start().await;
    let old_key_id = c.storage.envelope().unwrap().key_id().unwrap();
    let (old, old_plain) = secret("before-rotation", &[random_bytes(32)], Encoding::Protobuf);
    c.storage.put(&old, &old_plain).await.unwrap();

    // The operator adds a key and restarts kleidi with it as current (README "Rotation").
    c.token.add_key(&c.kleidi, KEK_2).unwrap();
    c.plugin
        .process
        .stop(std::time::Duration::from_secs(5))
        .await
        .unwrap();
    c.plugin = KleidiPlugin::start(&c.kleidi, &c.token, KEK_2, &[])
        .await
        .unwrap();

    let encrypts_before = c.storage.envelope().unwrap().stats().encrypt_calls;
    let probe = c.storage.envelope().unwrap().refresh().await.unwrap();
    assert!(probe.rotated, "a new key_id must make a new seed");
    assert_ne!(probe.key_id, old_key_id);
    assert_eq!(
        c.storage.envelope().unwrap().stats().encrypt_calls,
        encrypts_before + 1
    );
    // The same key_id again makes no Encrypt call.
    assert!(!c.storage.envelope().unwrap().refresh().await.unwrap().rotated);
    assert_eq!(
        c.storage.envelope().unwrap().stats().encrypt_calls,
        encrypts_before + 1
    );

    let (new, new_plain) = secret("after-rotation", &[random_bytes(32)], Encoding::Protobuf);
    c.storage.put(&new, &new_plain).await.unwrap();
    let ids = [&old, &new].map(|k| k.to_string());
    let mut key_ids = Vec::new();
    for key in &ids {
        match audit::classify(&c.raw(key).await) {
            audit::Class::KmsV2(v) => key_ids.push(v.key_id),
            other => panic!("{key}: {other}"),
        }
    }
    assert_eq!(key_ids, [old_key_id.clone(), probe.key_id.clone()]);

    // Both read, from this apiserver and from a cold one (Decrypt with the old key_id, old key on token).
    for storage in [c.storage.clone(), c.cold_apiserver().await] {
        let (read, stale) = storage.get(&old).await.unwrap();
        assert_eq!(*read, old_plain);
        assert!(stale, "the old Secret is due for rewriting under the new key");
        let (read, stale) = storage.get(&new).await.unwrap();
        assert_eq!(*read, new_plain);
        assert!(!stale);
    }
}

/// How a value in etcd is changed behind the apiserver's back.
#[derive(Debug, Clone, Copy)]
enum Tamper {
    /// Another provider's prefix.
    Prefix,
    /// The `EncryptedObject` bytes cut short.
    Protobuf,
    /// One bit of `encryptedData` flipped (the Secret's ciphertext).
    Ciphertext,
    /// One bit of the wrapped seed flipped.
    WrappedSeed,
    /// The key ID edited.
    KeyId,
    /// The value copied to another key: the AAD no longer matches.
    Moved,
}

#[rstest]
#[case::prefix(Tamper::Prefix, "does not start with \"k8s:enc:kms:v2:kleidi:\"")]
#[case::protobuf(Tamper::Protobuf, "does not decode")]
#[case::ciphertext(Tamper::Ciphertext, "AES-GCM authentication failed")]
#[case::wrapped_seed(Tamper::WrappedSeed, "Decrypt RPC failed with InvalidArgument")]
#[case::key_id(Tamper::KeyId, "Decrypt RPC failed with InvalidArgument")]
#[case::moved(Tamper::Moved, "AES-GCM authentication failed")]
#[tokio::test]
async fn values_tampered_in_etcd_fail_to_read_with_a_clear_error(
    #[case] tamper: Tamper,
    #[case] expected: &str,
) {
    let c = Cluster::start().await;
    let (key, plaintext) = secret("victim", &[random_bytes(32)], Encoding::Protobuf);
    let value = c.storage.put(&key, &plaintext).await.unwrap();
    let prefix = b"k8s:enc:kms:v2:kleidi:".len();
    let mut object = kleidi_harness::apiserver::encrypted_object::decode(&value[prefix..]).unwrap();
    let reencode = |o: &kleidi_harness::apiserver::encrypted_object::EncryptedObject| {
        [
            &value[..prefix],
            &kleidi_harness::apiserver::encrypted_object::encode(o).unwrap()[..],
        ]
        .concat()
    };
    let (target, bad) = match tamper {
        Tamper::Prefix => (key.clone(), [b"k8s:enc:kms:v2:other:", &value[prefix..]].concat()),
        Tamper::Protobuf => (key.clone(), value[..value.len() - 7].to_vec()),
        Tamper::Ciphertext => {
            let last = object.encrypted_data.len() - 20;
            object.encrypted_data[last] ^= 1;
            (key.clone(), reencode(&object))
        }
        Tamper::WrappedSeed => {
            object.encrypted_dek_source[20] ^= 1;
            (key.clone(), reencode(&object))
        }
        Tamper::KeyId => {
            object.key_id.push('x');
            (key.clone(), reencode(&object))
        }
        Tamper::Moved => (Keys::default().secret("default", "elsewhere"), value.clone()),
    };
    c.storage.etcd.put(target.as_bytes(), bad).await.unwrap();

    // A cold apiserver must go to the plugin for the seed: nothing cached hides the damage.
    let cold = c.cold_apiserver().await;
    let err = cold.get(&target).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains(expected), "{tamper:?}: {text}");
    assert!(matches!(err, StoreError::Envelope(_)), "{tamper:?}: {err:?}");
    assert!(
        !text.contains(&hex::encode(&plaintext[plaintext.len() - 16..])),
        "{text}"
    );
    // The plugin stays healthy: bad ciphertext is the caller's problem, not the backend's.
    cold.envelope().unwrap().refresh().await.unwrap();
    if !matches!(tamper, Tamper::Moved) {
        return;
    }
    // The original, untouched, still reads.
    let (read, _) = cold.get(&key).await.unwrap();
    assert_eq!(*read, plaintext);
}

#[tokio::test]
async fn a_plugin_killed_between_write_and_read_loses_nothing() {
    let mut c = Cluster::start().await;
    let (key, plaintext) = secret("survivor", &[random_bytes(32)], Encoding::Protobuf);
    c.storage.put(&key, &plaintext).await.unwrap();

    // SIGKILL: no cleanup, the socket file stays behind.
    c.plugin.process.kill().await.unwrap();
    assert!(c.plugin.socket.exists());
    // The running apiserver still reads from its seed cache, without the plugin.
    let (read, _) = c.storage.get(&key).await.unwrap();
    assert_eq!(*read, plaintext);
    // A cold one cannot unwrap the seed while the plugin is down, and says so.
    let cold = Storage::new(
        c.storage.etcd.clone(),
        Arc::new(Envelope::new(PROVIDER, Arc::new(kms_lazy(&c.plugin.socket).await)).unwrap()),
    );
    let err = cold.envelope().unwrap().refresh().await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Rpc {
                code: tonic::Code::Unavailable,
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(
        cold.get(&key).await,
        Err(StoreError::Envelope(Error::NoState))
    ));

    // kleidi starts again on the stale socket; the same cold apiserver recovers and reads.
    c.plugin.restart().await.unwrap();
    cold.envelope().unwrap().refresh().await.unwrap();
    let (read, _) = cold.get(&key).await.unwrap();
    assert_eq!(*read, plaintext);
    assert_eq!(cold.envelope().unwrap().stats().decrypt_calls, 1);
}

/// A client whose first connection attempt may fail (the plugin is down): tonic reconnects lazily.
async fn kms_lazy(socket: &std::path::Path) -> GrpcKms {
    kleidi_harness::apiserver::kms::connect_unix_lazy(socket, Authority::Localhost).unwrap()
}

#[tokio::test]
async fn audit_command_exits_non_zero_when_any_value_is_in_clear() {
    let c = Cluster::start().await;
    let (key, plaintext) = secret("encrypted", &[random_bytes(32)], Encoding::Protobuf);
    c.storage.put(&key, &plaintext).await.unwrap();
    let audit_cmd = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kleidi-harness"))
            .args([
                "audit",
                "--verbose",
                "--etcd",
                &c.etcd.url,
                "--prefix",
                "/registry/secrets/",
            ])
            .output()
            .unwrap()
    };
    let out = audit_cmd();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("in clear: 0"), "{stdout}");
    assert!(
        stdout.contains("/registry/secrets/default/encrypted  kms-v2 provider=kleidi"),
        "{stdout}"
    );

    // What the identity provider (or a forgotten EncryptionConfiguration) leaves behind.
    let (clear_key, clear) = secret("forgotten", &[random_bytes(32)], Encoding::Protobuf);
    c.storage.etcd.put(clear_key.as_bytes(), clear).await.unwrap();
    let out = audit_cmd();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("in clear: 1\n  /registry/secrets/default/forgotten"),
        "{stdout}"
    );
    assert!(stdout.contains("IN CLEAR"), "{stdout}");
}

#[tokio::test]
async fn put_get_and_dump_commands_round_trip_a_secret_like_the_apiserver() {
    let c = Cluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("secret.json");
    // As `kubectl get secret -o json` prints it (resourceVersion included: it must not be stored).
    std::fs::write(
        &manifest,
        r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"cli","namespace":"prod","resourceVersion":"42"},
            "data":{"token":"c2VjcmV0LXZhbHVlLTE="},"stringData":{"user":"admin-user"},"type":"Opaque"}"#,
    )
    .unwrap();
    let key = "/registry/secrets/prod/cli";
    let harness = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kleidi-harness"))
            .args(args)
            .output()
            .unwrap()
    };
    let socket = c.plugin.socket.display().to_string();
    let manifest = manifest.to_str().unwrap();
    let put = |key: &str| {
        harness(&[
            "put",
            "--etcd",
            &c.etcd.url,
            "--plugin",
            &socket,
            "--provider",
            PROVIDER,
            key,
            manifest,
        ])
    };
    let out = put(key);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // What landed is an apiserver-readable value: the harness's own envelope reads it.
    let (plain, _) = c.cold_apiserver().await.get(key).await.unwrap();
    let stored = object::parse_secret(&plain).unwrap();
    assert_eq!(object::detect(&plain), Some(Encoding::Protobuf));
    let data = stored.data.unwrap();
    assert_eq!(data["token"].0, b"secret-value-1");
    assert_eq!(data["user"].0, b"admin-user");
    assert_eq!(stored.metadata.resource_version, None);
    assert!(stored.metadata.uid.is_some());

    let out = harness(&["get", "--etcd", &c.etcd.url, "--plugin", &socket, key]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["data"]["token"], "c2VjcmV0LXZhbHVlLTE=");
    assert_eq!(json["metadata"]["namespace"], "prod");

    let out = harness(&["dump", "--etcd", &c.etcd.url, key]);
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        dump.starts_with("00000000  2f 72 65 67 69 73 74 72  79 2f 73 65 63 72 65 74  |/registry/secret|"),
        "{dump}"
    );
    // etcdctl's newline after the key, then the value's prefix.
    assert!(
        dump.contains("  73 2f 70 72 6f 64 2f 63  6c 69 0a 6b 38 73 3a 65  |s/prod/cli.k8s:e|"),
        "{dump}"
    );
    assert!(
        !dump.contains("admin-user") && !String::from_utf8_lossy(&c.raw(key).await).contains("admin-user")
    );

    // A key that does not match the manifest is refused before anything is written.
    let out = put("/registry/secrets/prod/other");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        c.storage
            .etcd
            .get(b"/registry/secrets/prod/other")
            .await
            .unwrap()
            .is_none()
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with `openssl` as an
/// operator would for a kubeadm-style etcd.
fn etcd_certificates(dir: &std::path::Path) -> kleidi_harness::runtime::EtcdServerTls {
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=etcd-ca",
            ],
        ]
        .concat(),
    );
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth",
        ),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        openssl(
            &[
                &["req", "-new"][..],
                &ec,
                &["-keyout", &key, "-out", &csr, "-subj", &format!("/CN={name}")],
            ]
            .concat(),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ]);
    }
    kleidi_harness::runtime::EtcdServerTls {
        ca: dir.join("ca.crt"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
        client: kleidi_harness::apiserver::EtcdTls {
            ca: Some(dir.join("ca.crt")),
            cert: Some(dir.join("client.crt")),
            key: Some(dir.join("client.key")),
        },
    }
}

#[tokio::test]
async fn audit_reads_an_etcd_that_demands_client_certificates_like_etcdctl() {
    let dir = tempfile::tempdir().unwrap();
    let tls = etcd_certificates(dir.path());
    let etcd = Etcd::start_tls(&tls).await.unwrap();
    let (key, clear) = secret("tls-clear", &[random_bytes(32)], Encoding::Json);
    etcd.client()
        .await
        .unwrap()
        .put(key.as_bytes(), clear)
        .await
        .unwrap();
    let client = &tls.client;
    let audit = |with_certs: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kleidi-harness"));
        cmd.args([
            "audit",
            "--etcd",
            &etcd.url,
            "--cacert",
            client.ca.as_ref().unwrap().to_str().unwrap(),
        ]);
        if with_certs {
            cmd.arg("--cert")
                .arg(client.cert.as_ref().unwrap())
                .arg("--key")
                .arg(client.key.as_ref().unwrap());
        }
        cmd.output().unwrap()
    };
    let out = audit(true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("plaintext-json 1") && stdout.contains("/registry/secrets/default/tls-clear"),
        "{stdout}"
    );
    // Without a client certificate etcd refuses, and the audit says it could not read (exit 2), not
    // that everything is fine.
    let out = audit(false);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn range_and_audit_read_every_value_across_pages() {
    let etcd = Etcd::start().await.unwrap();
    let store = etcd.client().await.unwrap();
    // More than two 500-value pages, and keys on both sides of the prefix that must not be read.
    for i in 0..1203 {
        store
            .put(format!("/registry/secrets/ns/s{i:05}").as_bytes(), b"{}".to_vec())
            .await
            .unwrap();
    }
    store.put(b"/registry/secretz", b"{}".to_vec()).await.unwrap();
    store
        .put(b"/registry/configmaps/ns/c", b"{}".to_vec())
        .await
        .unwrap();
    let all = store.range(b"/registry/secrets/").await.unwrap();
    assert_eq!(all.len(), 1203);
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "not in key order");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kleidi-harness"))
        .args(["audit", "--etcd", &etcd.url, "--prefix", "/registry/secrets/"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.starts_with("1203 values: plaintext-json 1203\n"),
        "{stdout}"
    );
}
