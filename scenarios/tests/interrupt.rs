//! Ctrl-C on a container run: `kleidi-scenarios` stops, and every container and network the run
//! created is gone afterwards — nothing is left for the next run or the user to clean up. Once with
//! the cluster up and its workload running, once while its containers are still starting.

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

/// The containers of the runs on `networks` (each carries its run's network as this label's
/// value): name and status. Scoped to the run, so what another test left cannot be counted.
fn run_containers(networks: &[String]) -> Vec<String> {
    networks
        .iter()
        .flat_map(|network| {
            let label = format!("label=io.kleidi.harness.run={network}");
            docker(&[
                "ps",
                "-a",
                "--filter",
                &label,
                "--format",
                "{{.Names}} {{.Status}}",
            ])
        })
        .collect()
}

fn harness_networks() -> Vec<String> {
    docker(&["network", "ls", "--format", "{{.Name}}"])
        .into_iter()
        .filter(|n| n.starts_with("kleidi-"))
        .collect()
}

/// When the Ctrl-C comes.
#[derive(Clone, Copy, PartialEq)]
enum When {
    /// After the run reported its cluster up (3 etcd + 3 kleidi containers, workload started).
    ClusterUp,
    /// As soon as the run's first container exists: the others are still being created.
    FirstContainer,
}

/// Starts a container run, sends SIGINT at `when`, and checks the exit (130, bounded) and that
/// nothing of the run is left on the engine.
fn interrupt(when: When) {
    // One run at a time: a run's networks are those that appeared while it ran.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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
    let new_networks = || -> Vec<String> {
        harness_networks()
            .into_iter()
            .filter(|n| !networks_before.contains(n))
            .collect()
    };
    let networks = match when {
        When::ClusterUp => {
            rx.recv_timeout(Duration::from_secs(180))
                .expect("the run never reported its cluster up");
            let networks = new_networks();
            assert!(!networks.is_empty(), "no network of its own");
            let running = run_containers(&networks);
            assert!(
                running.len() >= 6,
                "3 etcd + 3 kleidi containers expected: {running:?}"
            );
            networks
        }
        When::FirstContainer => {
            let started = Instant::now();
            loop {
                let networks = new_networks();
                if !run_containers(&networks).is_empty() {
                    break networks;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(180),
                    "no container of the run within 180 s"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    if when == When::FirstContainer {
        assert!(
            rx.try_recv().is_err(),
            "the cluster was up before the first container was seen: nothing was starting"
        );
    }

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
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("still running 120 s after Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("exited {status:?} {:?} after Ctrl-C", started.elapsed());
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert_eq!(
        run_containers(&networks),
        Vec::<String>::new(),
        "containers left behind"
    );
    let left: Vec<String> = harness_networks()
        .into_iter()
        .filter(|n| networks.contains(n))
        .collect();
    assert!(left.is_empty(), "networks left behind: {left:?}");
}

#[test]
#[ignore = "needs Docker and the images (just e2e)"]
fn ctrl_c_on_a_container_run_removes_every_container_and_network() {
    interrupt(When::ClusterUp);
}

#[test]
#[ignore = "needs Docker and the images (just e2e)"]
fn ctrl_c_while_the_containers_start_removes_them_all_and_exits() {
    interrupt(When::FirstContainer);
}
