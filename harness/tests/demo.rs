//! `just demo` runs `kleidi-harness demo`: it must pass on a fresh machine (on SoftHSM, and with
//! `--backend tpm` on a swtpm), and stop everything it started, also when interrupted half-way.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test helpers

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn demo() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kleidi-harness"));
    cmd.arg("demo").stdin(Stdio::null());
    cmd
}

#[test]
fn demo_writes_audits_and_reads_back_a_secret() {
    let out = demo().output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "k8s:enc:km",
        "in clear: 0",
        "password bytes in the raw value: none",
        "(Decrypt calls: 1)",
        "ok: the Secret is in etcd only encrypted",
    ] {
        assert!(stdout.contains(step), "missing {step:?} in:\n{stdout}");
    }
}

#[test]
fn demo_on_a_software_tpm_writes_audits_and_reads_back_a_secret() {
    let out = demo().args(["--backend", "tpm"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "swtpm:host=127.0.0.1,port=",
        "`kleidi tpm init`",
        "`kleidi serve --backend tpm`",
        "key_id tpm:",
        "k8s:enc:km",
        "in clear: 0",
        "password bytes in the raw value: none",
        "(Decrypt calls: 1)",
        "stopping kleidi (SIGTERM), the TPM and etcd",
        "ok: the Secret is in etcd only encrypted",
    ] {
        assert!(stdout.contains(step), "missing {step:?} in:\n{stdout}");
    }
    // The key the plugin's Status named is the one `kleidi tpm init` printed.
    let ids: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("key_id "))
        .collect();
    assert_eq!(ids.len(), 2, "{stdout}");
    assert_eq!(ids[0], ids[1], "{stdout}");
}

#[test]
fn an_interrupted_demo_stops_etcd_and_kleidi_and_removes_their_files() {
    // --keep-running holds after the last step, so the interrupt always lands while all runs.
    let mut child = demo()
        .arg("--keep-running")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut etcd, mut socket) = (None, None);
    while socket.is_none() {
        let line = lines.next().expect("demo ended before kleidi started").unwrap();
        let line = line.trim();
        if let Some(url) = line.strip_prefix("http://") {
            etcd = Some(url.to_owned());
        }
        if let Some(path) = line.strip_prefix("socket ") {
            socket = Some(std::path::PathBuf::from(path));
        }
    }
    let (etcd, socket) = (etcd.unwrap(), socket.unwrap());
    let held = lines
        .by_ref()
        .any(|line| line.unwrap().contains("keep running until Ctrl-C"));
    assert!(held, "demo --keep-running ended by itself");
    // It serves the Secrets API and prints a kubeconfig: `verify` (kube-rs) goes through it.
    let kubeconfig = lines
        .by_ref()
        .find_map(|line| {
            line.unwrap()
                .trim()
                .strip_prefix("kubeconfig ")
                .map(str::to_owned)
        })
        .expect("demo --keep-running prints a kubeconfig");
    let verify = Command::new(env!("CARGO_BIN_EXE_kleidi-harness"))
        .args([
            "verify",
            "--kubeconfig",
            &kubeconfig,
            "--etcd",
            &format!("http://{etcd}"),
        ])
        .args(["--provider", "kleidi"])
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        std::net::TcpStream::connect(&etcd).is_ok(),
        "etcd should be up while the demo runs"
    );
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    let started = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "demo did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(130));
    // Its children die with their handles; give the kernel a moment to reap them.
    let started = Instant::now();
    while std::net::TcpStream::connect(&etcd).is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "etcd still answers at {etcd}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let token_dir = socket.parent().unwrap().parent().unwrap();
    assert!(!token_dir.exists(), "{} was left behind", token_dir.display());
}
