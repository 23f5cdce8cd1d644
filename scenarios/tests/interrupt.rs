//! Ctrl-C on a container run: `kleidi-scenarios` stops, and every container and network the run
//! created is gone afterwards — nothing is left for the next run or the user to clean up.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `docker …` output lines (the CLI, independent of the harness's own engine client).
fn docker(args: &[&str]) -> Vec<String> {
    let out = Command::new("docker").args(args).output().expect("docker CLI");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect()
}

fn harness_containers() -> Vec<String> {
    docker(&["ps", "-aq", "--filter", "label=io.kleidi.harness.run"])
}

fn harness_networks() -> Vec<String> {
    docker(&["network", "ls", "--format", "{{.Name}}"])
        .into_iter()
        .filter(|n| n.starts_with("kleidi-"))
        .collect()
}

#[test]
#[ignore = "needs Docker and the images (just e2e)"]
fn ctrl_c_on_a_container_run_removes_every_container_and_network() {
    let networks_before = harness_networks();
    let out = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kleidi-scenarios"))
        .args(["run", "etcd_member_lost_under_load", "--backend", "pkcs11"])
        .env("KLEIDI_RUNTIME", "container")
        .env("SCENARIO_OUT", out.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait (bounded) until the cluster is up: etcd members and kleidi containers exist.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("  | {line}");
            if line.contains("cluster up") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(180))
        .expect("the run never reported its cluster up");
    let running = harness_containers();
    assert!(
        running.len() >= 6,
        "3 etcd + 3 kleidi containers expected: {running:?}"
    );
    assert!(
        harness_networks().len() > networks_before.len(),
        "no network of its own"
    );

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "still running 120 s after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("exited {status:?} {:?} after Ctrl-C", started.elapsed());
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert_eq!(
        harness_containers(),
        Vec::<String>::new(),
        "containers left behind"
    );
    let left: Vec<String> = harness_networks()
        .into_iter()
        .filter(|n| !networks_before.contains(n))
        .collect();
    assert!(left.is_empty(), "networks left behind: {left:?}");
}
