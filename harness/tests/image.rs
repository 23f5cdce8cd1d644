//! The `kleidi:<version>` image (`just image`) run the way the static pod in
//! `fixtures/kubernetes/` runs it: `kleidi pkcs11 init` then `kleidi serve` in containers with no
//! network, the token directory and the socket directory bind-mounted from the host. The harness's
//! apiserver envelope then writes and reads a Secret through the containerized plugin and a real
//! etcd, and `docker stop` must stop kleidi cleanly. Needs Docker and the image: `just e2e` builds it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // tests

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kleidi_harness::apiserver::object::{self, Encoding, Keys};
use kleidi_harness::apiserver::{Authority, Envelope, Storage, connect_unix};
use kleidi_harness::audit::Audit;
use kleidi_harness::runtime::{Etcd, write_private};

const IMAGE: &str = concat!("kleidi:", env!("CARGO_PKG_VERSION"));

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker").args(args).output().expect("docker CLI")
}

/// Removes the container however the test ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.0]);
    }
}

fn mounts(dir: &Path) -> Vec<String> {
    [
        ("etc", "/etc/kleidi:ro"),
        ("tokens", "/var/lib/softhsm/tokens"),
        ("run", "/run/kleidi"),
    ]
    .iter()
    .flat_map(|(host, inside)| ["-v".to_owned(), format!("{}:{inside}", dir.join(host).display())])
    .collect()
}

#[tokio::test]
#[ignore = "needs Docker and the kleidi image (`just image`; `just e2e` builds it)"]
async fn the_image_serves_the_static_pod_command_line_to_the_apiserver_envelope() {
    assert!(
        docker(&["image", "inspect", IMAGE]).status.success(),
        "image {IMAGE} is missing: run `just image`"
    );
    let dir = tempfile::tempdir().unwrap();
    for sub in ["etc", "tokens", "run"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
    }
    // The pod's config: fixtures/softhsm/softhsm2.conf, PINs in files (random here).
    let conf = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/softhsm/softhsm2.conf"
    ))
    .unwrap();
    std::fs::write(dir.path().join("etc/softhsm2.conf"), conf).unwrap();
    // 0600, as the README tells operators: kleidi refuses PIN files others can read.
    for pin in ["etc/pkcs11-pin", "etc/pkcs11-so-pin"] {
        write_private(
            &dir.path().join(pin),
            format!("{}\n", uuid::Uuid::new_v4().simple()),
        )
        .unwrap();
    }
    let mounts = mounts(dir.path());
    let mounts: Vec<&str> = mounts.iter().map(String::as_str).collect();
    let pin = ["--pkcs11-pin-file", "/etc/kleidi/pkcs11-pin"];

    let init = docker(
        &[
            &["run", "--rm", "--network", "none"][..],
            &mounts,
            &[
                IMAGE,
                "pkcs11",
                "init",
                "--pkcs11-so-pin-file",
                "/etc/kleidi/pkcs11-so-pin",
            ],
            &pin,
        ]
        .concat(),
    );
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));

    let name = format!("kleidi-e2e-{}", uuid::Uuid::new_v4().simple());
    let run = docker(
        &[
            &["run", "-d", "--name", &name, "--network", "none", "--read-only"][..],
            &mounts,
            &[
                IMAGE,
                "serve",
                "--listen",
                "unix:///run/kleidi/kms.sock",
                "--backend",
                "pkcs11",
            ],
            &pin,
        ]
        .concat(),
    );
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let container = Container(name);
    let socket = dir.path().join("run/kms.sock");
    let started = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        let logs = docker(&["logs", &container.0]);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "kleidi in the container did not listen: {}",
            String::from_utf8_lossy(&logs.stderr)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // kube-apiserver's side, on the host: a Secret through the containerized plugin into etcd.
    let etcd = Etcd::start().await.unwrap();
    let envelope = Arc::new(
        Envelope::new(
            "kleidi",
            Arc::new(connect_unix(&socket, Authority::Localhost).await.unwrap()),
        )
        .unwrap(),
    );
    let probe = envelope.refresh().await.unwrap();
    assert!(probe.key_id.starts_with("pkcs11:kleidi-kek:"), "{}", probe.key_id);
    let storage = Storage::new(etcd.client().await.unwrap(), envelope);
    let secret = object::new_secret(
        "default",
        "from-the-image",
        BTreeMap::from([("k".to_owned(), b"v-1234567890".to_vec())]),
    );
    let plaintext = object::encode_secret(&secret, Encoding::Protobuf).unwrap();
    let key = Keys::default().secret("default", "from-the-image");
    storage.put(&key, &plaintext).await.unwrap();
    let (read, _) = storage.get(&key).await.unwrap();
    assert_eq!(*read, plaintext);
    let audit: Audit = storage
        .etcd
        .range(b"/registry/")
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert!(audit.all_encrypted() && audit.count("kms-v2") == 1, "{audit}");

    // `docker stop` sends SIGTERM: kleidi exits 0 and removes its socket from the host directory.
    assert!(docker(&["stop", "-t", "10", &container.0]).status.success());
    let code = docker(&["inspect", "-f", "{{.State.ExitCode}}", &container.0]);
    assert_eq!(String::from_utf8_lossy(&code.stdout).trim(), "0");
    assert!(!socket.exists(), "socket left behind on the host");
}
