//! The images `just image` builds. `kleidi:<version>-softhsm` run the way the static pod in
//! `fixtures/kubernetes/` runs it: `kleidi pkcs11 init` then `kleidi serve` in containers with no
//! network, as the image's non-root user, the token directory and the socket directory
//! bind-mounted from the host. The harness's apiserver envelope then writes and reads a Secret
//! through the containerized plugin and a real etcd, and `docker stop` must stop kleidi cleanly.
//! `kleidi:<version>` (no SoftHSM): its size, its user, `--version`, no shell, and the TPM backend
//! through the TCTI module tctildr loads at run time. Needs Docker, root (the mounted files belong
//! to the image's user) and the images: `just e2e` builds them from its debug binary, stripped of
//! debug info, so the size bound holds for that build (a release build's image is smaller).
//! `KLEIDI_IMAGE=<repository>` tests images built under another name (`fixtures/images/build.sh`
//! takes the same variable).

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
use kleidi_harness::runtime::{Etcd, Swtpm, write_private};

/// The images' default user (fixtures/images/build.sh).
const USER: u32 = 65532;
/// The bound issue #12 set for the plain image.
const MAX_PLAIN_BYTES: u64 = 40 * 1000 * 1000;

/// `<repository>:<version><suffix>`.
fn image(suffix: &str) -> String {
    let repo = std::env::var("KLEIDI_IMAGE").unwrap_or_else(|_| "kleidi".to_owned());
    let image = format!("{repo}:{}{suffix}", env!("CARGO_PKG_VERSION"));
    assert!(
        docker(&["image", "inspect", &image]).status.success(),
        "image {image} is missing: run `just image`"
    );
    image
}

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker").args(args).output().expect("docker CLI")
}

/// `docker image inspect -f FORMAT`, trimmed.
fn inspect(image: &str, format: &str) -> String {
    let out = docker(&["image", "inspect", "-f", format, image]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Gives `path` to the images' user, as an operator does on the node.
fn give_to_user(path: &Path) {
    std::os::unix::fs::chown(path, Some(USER), Some(USER))
        .unwrap_or_else(|e| panic!("chown {}: {e} (the image tests run as root)", path.display()));
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
async fn the_softhsm_image_serves_the_static_pod_command_line_as_non_root() {
    let image = image("-softhsm");
    let image = image.as_str();
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
    // The node's preparation for a non-root kleidi: it owns its PIN files, tokens and socket dir.
    for path in ["etc/pkcs11-pin", "etc/pkcs11-so-pin", "tokens", "run"] {
        give_to_user(&dir.path().join(path));
    }
    let mounts = mounts(dir.path());
    let mounts: Vec<&str> = mounts.iter().map(String::as_str).collect();
    let conf = ["-e", "SOFTHSM2_CONF=/etc/kleidi/softhsm2.conf"];
    let pin = ["--pkcs11-pin-file", "/etc/kleidi/pkcs11-pin"];

    let init = docker(
        &[
            &["run", "--rm", "--network", "none"][..],
            &mounts,
            &conf,
            &[
                image,
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
            &conf,
            &[
                image,
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
    // No `--user` was given: the image's default user runs kleidi.
    let pid = docker(&["inspect", "-f", "{{.State.Pid}}", &container.0]);
    let pid = String::from_utf8_lossy(&pid.stdout).trim().to_owned();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uid.split_whitespace().nth(1),
        Some(USER.to_string().as_str()),
        "kleidi in the container: {uid}"
    );

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

#[test]
#[ignore = "needs Docker and the kleidi image (`just image`; `just e2e` builds it)"]
fn the_plain_image_is_small_runs_as_non_root_and_has_no_shell() {
    let softhsm = image("-softhsm");
    let image = image("");
    let size: u64 = inspect(&image, "{{.Size}}").parse().unwrap();
    eprintln!("{image}: {size} bytes");
    assert!(
        size <= MAX_PLAIN_BYTES,
        "{image} is {size} bytes, over {MAX_PLAIN_BYTES}"
    );
    assert_eq!(inspect(&image, "{{.Config.User}}"), format!("{USER}:{USER}"));

    let version = docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--read-only",
        &image,
        "--version",
    ]);
    assert!(
        version.status.success(),
        "{}",
        String::from_utf8_lossy(&version.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        concat!("kleidi ", env!("CARGO_PKG_VERSION"))
    );
    // Only what kleidi needs: nothing to run a command with, no SoftHSM (which the variant has).
    assert!(has_file(&image, "/etc/ssl/certs/ca-certificates.crt"));
    assert!(has_file(&softhsm, "/usr/lib/softhsm/libsofthsm2.so"));
    assert!(!has_file(&image, "/usr/lib/softhsm/libsofthsm2.so"));
    for image in [&image, &softhsm] {
        assert!(!has_file(image, "/bin/sh"), "{image} has a shell");
    }
}

/// Whether `path` exists in `image` (`docker cp` out of a container never started).
fn has_file(image: &str, path: &str) -> bool {
    let created = docker(&["create", "--network", "none", image]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let container = Container(String::from_utf8_lossy(&created.stdout).trim().to_owned());
    docker(&["cp", &format!("{}:{path}", container.0), "-"])
        .status
        .success()
}

#[tokio::test]
#[ignore = "needs Docker, root, swtpm and the kleidi image (`just image`; `just e2e` builds it)"]
async fn the_plain_image_reaches_a_tpm_through_the_tcti_module_it_loads_at_run_time() {
    let image = image("");
    let tpm = Swtpm::start().await.unwrap();
    // The swtpm listens on the host's loopback: the container shares the host's network.
    let state = tpm.kleidi_state_dir();
    std::fs::create_dir_all(&state).unwrap();
    give_to_user(&state);
    let volume = format!("{}:/var/lib/kleidi/tpm", state.display());
    let tcti = tpm.tcti();
    let init = docker(&[
        "run",
        "--rm",
        "--network",
        "host",
        "--read-only",
        "-e",
        "TSS2_LOG=all+none",
        "-v",
        &volume,
        &image,
        "tpm",
        "init",
        "--tpm-tcti",
        &tcti,
    ]);
    let stderr = String::from_utf8_lossy(&init.stderr);
    assert!(init.status.success(), "{stderr}");
    let key_id = String::from_utf8_lossy(&init.stdout).trim().to_owned();
    assert!(key_id.starts_with("tpm:"), "{key_id} {stderr}");
    assert!(
        state.join("current").exists(),
        "no key written to the state directory"
    );
}
