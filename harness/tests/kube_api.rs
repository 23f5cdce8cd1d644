//! The harness's Kubernetes API for Secrets, driven by real clients: kube-rs `Api<Secret>` (what
//! `verify` and `rewrite` use) and the official Python `kubernetes` client. What a user relies on:
//! the API behaves as kube-apiserver's does (resourceVersions from etcd, 409 on a stale one, Status
//! objects, paged lists), every Secret lands in etcd as a protobuf Secret in the KMS v2 envelope, and
//! `verify` / `rewrite` tell the truth about what is stored.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test helpers outside #[test] functions

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kleidi_harness::apiserver::object::{self, Keys};
use kleidi_harness::apiserver::{Apiservers, Authority, Envelope, Storage, connect_unix, encrypted_object};
use kleidi_harness::audit::{Audit, Class, classify};
use kleidi_harness::kubeapi::{ApiServer, Secrets};
use kleidi_harness::runtime::{Etcd, KleidiPlugin, SoftHsmToken, kleidi_bin};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use tokio::process::Command;

const PROVIDER: &str = "kleidi";
const KEK_1: &str = "kek-1";
const KEK_2: &str = "kek-2";
const HARNESS: &str = env!("CARGO_BIN_EXE_kleidi-harness");

/// etcd, a SoftHSM token, `kleidi serve`, and the Secrets API over them on a free loopback port.
struct Cluster {
    kleidi: PathBuf,
    etcd: Etcd,
    token: SoftHsmToken,
    plugin: KleidiPlugin,
    api: ApiServer,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Self {
        let kleidi = kleidi_bin().unwrap();
        let etcd = Etcd::start().await.unwrap();
        let token = SoftHsmToken::create(&kleidi, "kubeapi", KEK_1).unwrap();
        let plugin = KleidiPlugin::start(&kleidi, &token, KEK_1, &[]).await.unwrap();
        let kms = connect_unix(&plugin.socket, Authority::Localhost).await.unwrap();
        let envelope = Envelope::new(PROVIDER, Arc::new(kms)).unwrap();
        envelope.refresh().await.unwrap();
        let storage = Storage::new(etcd.client().await.unwrap(), Arc::new(envelope));
        let api = ApiServer::start(
            Secrets::new(storage, Keys::default()),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        api.write_kubeconfig(&dir.path().join("kubeconfig")).unwrap();
        Cluster {
            kleidi,
            etcd,
            token,
            plugin,
            api,
            dir,
        }
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    async fn client(&self) -> Client {
        kleidi_harness::cluster::client(Some(&self.kubeconfig()))
            .await
            .unwrap()
    }

    fn envelope(&self) -> Arc<Envelope> {
        self.api.secrets().storage().envelope().unwrap()
    }

    async fn raw(&self, ns: &str, name: &str) -> Option<(Vec<u8>, i64)> {
        let etcd = self.etcd.client().await.unwrap();
        etcd.get_versioned(Keys::default().secret(ns, name).as_bytes())
            .await
            .unwrap()
            .map(|v| (v.value, v.mod_revision))
    }

    async fn audit(&self) -> Audit {
        self.etcd
            .client()
            .await
            .unwrap()
            .range(b"/registry/secrets/")
            .await
            .unwrap()
            .into_iter()
            .collect()
    }

    /// KEK rotation: a second key on the token, kleidi restarted on it, the apiserver's probe.
    async fn rotate(&mut self) -> String {
        self.token.add_key(&self.kleidi, KEK_2).unwrap();
        self.plugin.process.stop(Duration::from_secs(5)).await.unwrap();
        self.plugin = KleidiPlugin::start(&self.kleidi, &self.token, KEK_2, &[])
            .await
            .unwrap();
        let probe = self.envelope().refresh().await.unwrap();
        assert!(probe.rotated);
        probe.key_id
    }

    /// Runs the harness binary against this cluster's API (asynchronously: the API is served by
    /// this test's own runtime).
    async fn harness(&self, args: &[&str]) -> Output {
        Command::new(HARNESS)
            .args(args)
            .args(["--kubeconfig", self.kubeconfig().to_str().unwrap()])
            .output()
            .await
            .unwrap()
    }
}

fn secret(name: &str, value: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "password".into(),
            ByteString(value.as_bytes().to_vec()),
        )])),
        ..Default::default()
    }
}

fn status(err: kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(s) => (s.code, s.reason.clone()),
        other => panic!("not an API Status: {other}"),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn kube_rs_creates_reads_lists_updates_and_deletes_secrets_stored_as_kube_apiserver_stores_them() {
    let c = Cluster::start().await;
    let client = c.client().await;
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");
    let a: Api<Secret> = Api::namespaced(client.clone(), "team-a");
    let b: Api<Secret> = Api::namespaced(client.clone(), "team-b");
    let pp = PostParams::default();

    let created = a.create(&pp, &secret("db", "hunter2-db")).await.unwrap();
    let rv: i64 = created
        .metadata
        .resource_version
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    assert!(created.metadata.uid.as_deref().is_some_and(|u| u.len() == 36));
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(created.type_.as_deref(), Some("Opaque"));
    // resourceVersion is etcd's mod_revision; the value is the KMS v2 envelope of a protobuf Secret.
    let (raw, mod_revision) = c.raw("team-a", "db").await.unwrap();
    assert_eq!(rv, mod_revision);
    assert!(raw.starts_with(b"k8s:enc:kms:v2:kleidi:"), "{:?}", classify(&raw));
    assert!(!contains(&raw, b"hunter2-db"));
    let (plain, stale) = c
        .envelope()
        .read("/registry/secrets/team-a/db", &raw)
        .await
        .unwrap();
    assert!(plain.starts_with(object::PROTOBUF_MAGIC) && !stale);
    assert_eq!(
        object::parse_secret(&plain).unwrap().metadata.uid,
        created.metadata.uid
    );

    let (code, reason) = status(a.create(&pp, &secret("db", "again")).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));
    let (code, reason) = status(a.create(&pp, &secret("Not_A_Name", "x")).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    let (code, reason) = status(a.get("missing").await.unwrap_err());
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
    // Not a general apiserver: other resources answer 404.
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "team-a");
    assert_eq!(
        status(maps.list(&ListParams::default()).await.unwrap_err()).0,
        404
    );

    let read = a.get("db").await.unwrap();
    assert_eq!(read.data.as_ref().unwrap()["password"].0, b"hunter2-db");
    assert_eq!(read.metadata.resource_version, created.metadata.resource_version);

    // Update at the current version, then a stale one: 409 Conflict.
    let mut changed = read.clone();
    changed
        .data
        .as_mut()
        .unwrap()
        .insert("password".into(), ByteString(b"rotated-pw".to_vec()));
    let updated = a.replace("db", &pp, &changed).await.unwrap();
    let new_rv: i64 = updated
        .metadata
        .resource_version
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    assert!(new_rv > rv);
    assert_eq!(updated.metadata.uid, created.metadata.uid);
    let (code, reason) = status(a.replace("db", &pp, &changed).await.unwrap_err());
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    assert_eq!(
        a.get("db").await.unwrap().data.unwrap()["password"].0,
        b"rotated-pw"
    );
    // An update that changes nothing writes nothing (same resourceVersion), as kube-apiserver.
    let same = a.replace("db", &pp, &updated).await.unwrap();
    assert_eq!(same.metadata.resource_version, updated.metadata.resource_version);

    for i in 0..4 {
        a.create(&pp, &secret(&format!("s-{i}"), "v")).await.unwrap();
    }
    b.create(&pp, &secret("other", "v")).await.unwrap();
    // Pages of 2: continue tokens, remainingItemCount, one consistent resourceVersion.
    let mut names = Vec::new();
    let mut params = ListParams::default().limit(2);
    let first = a.list(&params).await.unwrap();
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    let list_rv = first.metadata.resource_version.clone();
    let mut page = first;
    loop {
        assert_eq!(page.metadata.resource_version, list_rv);
        names.extend(page.items.iter().map(|s| s.metadata.name.clone().unwrap()));
        match page.metadata.continue_.clone().filter(|t| !t.is_empty()) {
            Some(token) => {
                params = params.continue_token(&token);
                page = a.list(&params).await.unwrap();
            }
            None => break,
        }
    }
    assert_eq!(names, ["db", "s-0", "s-1", "s-2", "s-3"]);
    let all: Api<Secret> = Api::all(client.clone());
    let everything = all.list(&ListParams::default()).await.unwrap();
    assert_eq!(everything.items.len(), 6);
    // The list's resourceVersion is etcd's current revision.
    let (_, last_write) = c.raw("team-b", "other").await.unwrap();
    assert_eq!(
        everything.metadata.resource_version.as_deref(),
        Some(last_write.to_string().as_str())
    );

    let deleted = a.delete("db", &DeleteParams::default()).await.unwrap();
    assert!(deleted.is_left());
    assert_eq!(status(a.get("db").await.unwrap_err()).0, 404);
    assert!(c.raw("team-a", "db").await.is_none());
    assert_eq!(
        status(a.delete("db", &DeleteParams::default()).await.unwrap_err()).0,
        404
    );

    let audit = c.audit().await;
    assert_eq!((audit.total(), audit.count("kms-v2")), (5, 5));
}

const PYTHON_CLIENT: &str = r#"
import base64, sys
from kubernetes import client, config
from kubernetes.client.rest import ApiException
config.load_kube_config(config_file=sys.argv[1])
v1 = client.CoreV1Api()
def body(name, value):
    return client.V1Secret(metadata=client.V1ObjectMeta(name=name),
                           data={"token": base64.b64encode(value.encode()).decode()})
for i in range(5):
    v1.create_namespaced_secret("py", body(f"py-{i}", f"python-secret-{i}"))
v1.create_namespaced_secret("py-other", body("elsewhere", "python-secret-x"))
listed = v1.list_namespaced_secret("py")
assert [s.metadata.name for s in listed.items] == [f"py-{i}" for i in range(5)], listed.items
assert len(v1.list_secret_for_all_namespaces().items) == 6
s = v1.read_namespaced_secret("py-2", "py")
s.data["token"] = base64.b64encode(b"python-secret-2-updated").decode()
v1.replace_namespaced_secret("py-2", "py", s)
try:
    v1.replace_namespaced_secret("py-2", "py", s)  # the resourceVersion it read is stale now
    raise SystemExit("stale update accepted")
except ApiException as e:
    assert e.status == 409, e
read = v1.read_namespaced_secret("py-2", "py")
assert base64.b64decode(read.data["token"]) == b"python-secret-2-updated"
v1.delete_namespaced_secret("py-4", "py")
try:
    v1.read_namespaced_secret("py-4", "py")
    raise SystemExit("deleted secret still readable")
except ApiException as e:
    assert e.status == 404, e
print("ok", len(v1.list_secret_for_all_namespaces().items))
"#;

#[tokio::test]
async fn the_python_kubernetes_client_drives_the_api_and_the_audit_finds_every_secret_encrypted() {
    let c = Cluster::start().await;
    let out = Command::new("python3")
        .args(["-c", PYTHON_CLIENT, c.kubeconfig().to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok 5",
        "the Python client (PyPI `kubernetes`, installed by `just deps`): {}",
        text(&out)
    );
    let audit = Command::new(HARNESS)
        .args(["audit", "--etcd", &c.etcd.url, "--verbose"])
        .output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&audit.stdout);
    assert!(audit.status.success(), "{}", text(&audit));
    assert!(report.contains("5 values: kms-v2 5"), "{report}");
    assert!(report.contains("verdict: every value under /registry/secrets/ is encrypted"));
    for (ns, name) in [("py", "py-0"), ("py", "py-2"), ("py-other", "elsewhere")] {
        let key = format!("/registry/secrets/{ns}/{name}  kms-v2 provider=kleidi");
        assert!(report.contains(&key), "{key} in {report}");
    }
    for (_, value) in c.etcd.client().await.unwrap().range(b"/").await.unwrap() {
        assert!(!contains(&value, b"python-secret"));
    }
}

#[tokio::test]
async fn verify_passes_on_the_expected_key_and_fails_with_the_reason_otherwise() {
    let c = Cluster::start().await;
    let key_id = c.envelope().key_id().unwrap();
    let ok = c
        .harness(&[
            "verify",
            "--etcd",
            &c.etcd.url,
            "--provider",
            PROVIDER,
            "--key-id",
            &key_id,
        ])
        .await;
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(stdout.contains("kms-v2 provider=kleidi key_id="), "{stdout}");
    assert!(
        stdout.contains("read back through the API: the same value"),
        "{stdout}"
    );
    assert!(stdout.contains("verified"), "{stdout}");

    let wrong_key = c
        .harness(&["verify", "--etcd", &c.etcd.url, "--key-id", "some-other-key"])
        .await;
    assert_eq!(wrong_key.status.code(), Some(1), "{}", text(&wrong_key));
    assert!(
        String::from_utf8_lossy(&wrong_key.stdout)
            .contains(&format!("key_id is {key_id:?}, expected \"some-other-key\"")),
        "{}",
        text(&wrong_key)
    );
    let wrong_provider = c
        .harness(&["verify", "--etcd", &c.etcd.url, "--provider", "vault"])
        .await;
    assert_eq!(wrong_provider.status.code(), Some(1), "{}", text(&wrong_provider));
    assert!(
        String::from_utf8_lossy(&wrong_provider.stdout)
            .contains("provider is \"kleidi\", expected \"vault\"")
    );
    // Every canary was deleted, pass or fail.
    assert_eq!(c.audit().await.total(), 0);
    // No API at all is an error, not a verdict.
    let nothing = Command::new(HARNESS)
        .args([
            "verify",
            "--etcd",
            &c.etcd.url,
            "--kubeconfig",
            "/nonexistent/kubeconfig",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(nothing.status.code(), Some(2), "{}", text(&nothing));
}

/// The scenarios' Secrets API: it keeps serving while the node's apiserver is restarted cold under
/// it, and every request after the restart goes through the new envelope (new seed for writes,
/// an empty cache for reads), none through the old one.
#[tokio::test]
async fn a_secrets_api_over_a_node_uses_whichever_apiserver_the_node_has_now() {
    let c = Cluster::start().await;
    let apiserver = || async {
        let kms = connect_unix(&c.plugin.socket, Authority::Localhost)
            .await
            .unwrap();
        let envelope = Arc::new(Envelope::new(PROVIDER, Arc::new(kms)).unwrap());
        envelope.refresh().await.unwrap();
        envelope
    };
    let (before, after) = (apiserver().await, apiserver().await);
    let node: Apiservers = Arc::new(RwLock::new(vec![before.clone()]));
    let storage = Storage::following(c.etcd.client().await.unwrap(), node.clone(), 0);
    let api = ApiServer::start_unprobed(
        Secrets::new(storage, Keys::default()),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let client = Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap();
    let secrets: Api<Secret> = Api::namespaced(client, "default");
    let secret = |name: &str| Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "v".to_string(),
            ByteString(name.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    };
    let seed_of = |raw: Vec<u8>| {
        let prefix = format!("k8s:enc:kms:v2:{PROVIDER}:").len();
        encrypted_object::decode(&raw[prefix..])
            .unwrap()
            .encrypted_dek_source
    };

    secrets
        .create(&PostParams::default(), &secret("one"))
        .await
        .unwrap();
    node.write().unwrap()[0] = after.clone();
    secrets
        .create(&PostParams::default(), &secret("two"))
        .await
        .unwrap();
    let read = secrets.get("one").await.unwrap();

    let (one, _) = c.raw("default", "one").await.unwrap();
    let (two, _) = c.raw("default", "two").await.unwrap();
    assert_ne!(
        seed_of(one),
        seed_of(two),
        "the write after the restart used the old seed"
    );
    assert_eq!(read.data.unwrap()["v"].0, b"one");
    // The old Secret's seed was not in the new apiserver's cache: one Decrypt, by the new one.
    assert_eq!(after.stats().decrypt_calls, 1);
    assert_eq!(before.stats().decrypt_calls, 0);
    api.stop().await.unwrap();
}

#[tokio::test]
async fn the_apiserver_command_serves_on_loopback_and_writes_a_kubeconfig_clients_use() {
    let c = Cluster::start().await;
    let kubeconfig = c.dir.path().join("command-kubeconfig");
    let socket = c.plugin.socket.to_str().unwrap().to_owned();
    let mut server = Command::new(HARNESS)
        .args([
            "apiserver",
            "--etcd",
            &c.etcd.url,
            "--plugin",
            &socket,
            "--provider",
            PROVIDER,
        ])
        .args([
            "--listen",
            "127.0.0.1:0",
            "--write-kubeconfig",
            kubeconfig.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !kubeconfig.exists() {
        assert!(Instant::now() < deadline, "no kubeconfig within 30 s");
        assert!(
            server.try_wait().unwrap().is_none(),
            "the apiserver command exited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = kleidi_harness::cluster::client(Some(&kubeconfig)).await.unwrap();
    let api: Api<Secret> = Api::default_namespaced(client);
    api.create(&PostParams::default(), &secret("via-command", "cli-secret-value"))
        .await
        .unwrap();
    let read = api.get("via-command").await.unwrap();
    assert_eq!(read.data.unwrap()["password"].0, b"cli-secret-value");
    let (raw, _) = c.raw("default", "via-command").await.unwrap();
    assert!(raw.starts_with(b"k8s:enc:kms:v2:kleidi:") && !contains(&raw, b"cli-secret-value"));
    // SIGTERM stops it cleanly, as a service manager would.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(server.id().unwrap()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), server.wait_with_output())
        .await
        .expect("stops within 10 s on SIGTERM")
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("serving the Secrets API on http://127.0.0.1:"));

    // No authentication, so never on a non-loopback address.
    let exposed = Command::new(HARNESS)
        .args([
            "apiserver",
            "--etcd",
            &c.etcd.url,
            "--plugin",
            &socket,
            "--provider",
            PROVIDER,
        ])
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .await
        .unwrap();
    assert_eq!(exposed.status.code(), Some(2), "{}", text(&exposed));
    assert!(String::from_utf8_lossy(&exposed.stderr).contains("loopback only"));
}

/// How many Secrets the rewrite test migrates.
const MANY: usize = 2_000;

async fn create_many(c: &Cluster, n: usize) {
    let client = c.client().await;
    let mut tasks = tokio::task::JoinSet::new();
    let workers = 16;
    for w in 0..workers {
        let api: Api<Secret> = Api::namespaced(client.clone(), if w % 2 == 0 { "ns-even" } else { "ns-odd" });
        tasks.spawn(async move {
            for i in (w..n).step_by(workers) {
                api.create(
                    &PostParams::default(),
                    &secret(&format!("s-{i:05}"), &format!("value-{i}")),
                )
                .await
                .unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

fn checkpoint_done(path: &Path) -> u64 {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["done"].as_u64())
        .unwrap_or(0)
}

#[tokio::test]
async fn rewrite_after_a_rotation_survives_an_interruption_and_leaves_every_secret_under_the_new_key() {
    let mut c = Cluster::start().await;
    let started = Instant::now();
    create_many(&c, MANY).await;
    let created = started.elapsed();
    let old_key = c.envelope().key_id().unwrap();
    let new_key = c.rotate().await;
    assert_ne!(old_key, new_key);
    assert_eq!(c.audit().await.kms_v2_key_ids().get(&old_key), Some(&MANY));

    let checkpoint = c.dir.path().join("rewrite.checkpoint");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "rewrite",
            "--kubeconfig",
            c.kubeconfig().to_str().unwrap(),
            "--checkpoint",
            checkpoint.to_str().unwrap(),
            "--page",
            "100",
            "--qps",
            "5000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    // First run, killed (SIGKILL: no chance to tidy up) once about half is done.
    let mut first = Command::new(HARNESS)
        .args(args(&[]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while checkpoint_done(&checkpoint) < MANY as u64 / 2 {
        assert!(
            Instant::now() < deadline,
            "the rewrite did not get half-way in 120 s"
        );
        assert!(
            first.try_wait().unwrap().is_none(),
            "the rewrite ended before it was interrupted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().await.unwrap();
    let done_before = checkpoint_done(&checkpoint);
    assert!(
        done_before < MANY as u64,
        "interrupted before the end: {done_before}"
    );
    let audit = c.audit().await;
    let migrated = audit.kms_v2_key_ids().get(&new_key).copied().unwrap_or(0);
    assert!(
        migrated as u64 >= done_before && migrated < MANY,
        "half-way: {audit}"
    );

    // Second run: resumes from the checkpoint, finishes, and audits etcd.
    let second = Command::new(HARNESS)
        .args(args(&["--etcd", &c.etcd.url]))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(second.status.success(), "{}", text(&second));
    assert!(stdout.contains("resumed after ns-"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "the apiserver writes under provider kleidi key_id {new_key}"
        )),
        "{stdout}"
    );
    let replaced: u64 = stdout
        .split("replaced ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(
        replaced,
        MANY as u64 - done_before,
        "only what was left: {stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "verdict: all {MANY} Secrets under /registry/secrets/ are KMS v2 under key_id {new_key}"
        )),
        "{stdout}"
    );
    assert!(!checkpoint.exists(), "a finished rewrite removes its checkpoint");
    let audit = c.audit().await;
    assert_eq!(audit.kms_v2_key_ids().len(), 1, "{audit}");
    assert_eq!(audit.kms_v2_key_ids().get(&new_key), Some(&MANY));
    // Every Secret still reads back as written.
    let a: Api<Secret> = Api::namespaced(c.client().await, "ns-odd");
    assert_eq!(
        a.get("s-01999").await.unwrap().data.unwrap()["password"].0,
        b"value-1999"
    );
    if let Class::KmsV2(v) = classify(&c.raw("ns-even", "s-00000").await.unwrap().0) {
        assert_eq!(v.key_id, new_key);
    } else {
        panic!("not KMS v2");
    }
    eprintln!(
        "created {MANY} in {created:?}; whole test {:?}",
        started.elapsed()
    );
}
