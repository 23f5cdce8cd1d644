//! Soak (#14 point 5): three `kleidi serve` at once, one per backend, each with 64 clients on
//! connections of their own doing Encrypt then Decrypt of a random seed and pausing, and the
//! apiserver's Status poll, for 30 minutes (`KLEIDI_SOAK_SECS`). Every decrypt must give back its
//! seed, every ciphertext of a client's first minute must still decrypt at the end, nothing may
//! fail, and the plugins' RSS and fds, sampled every 30 s, must stay flat:
//!
//! - **RSS**: the run's first sixth is warm-up (5 minutes of 30). The highest RSS over the last
//!   third may lie at most [`RSS_SLACK_KIB`] (2 MiB) above the highest over the reference window,
//!   from the end of warm-up to the end of the first third. Between the windows lie at least 20 of
//!   30 minutes: at this pace ~77,000 PKCS#11 or OpenBao calls and ~9,600 TPM calls, so a leak of
//!   27 bytes per PKCS#11/OpenBao call (218 per TPM call) fails, while the allocator's own
//!   settling (arenas and freed blocks reused, not returned) stays well inside 2 MiB once warm.
//! - **fds**: at every sample the plugin's own fds (Unix sockets, files, pipes, epoll) are at most
//!   those at rest plus the 65 connections (64 clients and the poller) plus [`FD_SLACK`] (a
//!   client reconnecting, a file open for a moment), and its backend TCP connections at most
//!   [`backend_connections`]: none for SoftHSM (in process), one and a closing one for the swtpm
//!   TCTI (it connects for each command, one at a time), and for OpenBao reqwest's pool, which
//!   keeps one per call that was in flight at once, so up to the 64 clients and
//!   [`VAULT_CONNECTIONS_BEYOND_CLIENTS`] of kleidi's own (it reached 68 while CI ran the load
//!   tests beside the soak). At the end, once the clients are gone,
//!   exactly the fds at rest again (OpenBao's pooled connections within [`POOL_REAPED`]).
//!
//! The soak is paced, not saturating: CI runs it beside the rest of `just e2e` on 2 cores, so each
//! client pauses after each round trip, longer for the TPM, whose calls cost ~30 times more CPU
//! (salted ESAPI sessions), and the whole soak (the three plugins, OpenBao, swtpm and these
//! clients) must use under half of one core. It prints what it used.
//!
//! It runs only with `KLEIDI_SOAK=1`: `just e2e` starts it in the background with that set, and
//! its own foreground `cargo test -- --include-ignored` then passes over it (printing SKIPPED)
//! instead of running it a second time. Alone: `KLEIDI_SOAK=1 cargo test -p kleidi --test soak
//! -- --ignored --nocapture`.

// Needs every backend; `vault_support` reads the vault feature's configuration types.
#![cfg(feature = "vault")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // tests
// support, swtpm and vault_support each write credential files with common/private.rs.
#![allow(clippy::duplicate_mod)]

mod load_support;
mod support;
#[path = "common/swtpm.rs"]
mod swtpm;
mod vault_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use load_support::{
    Backend, Sample, Served, VAULT_CONNECTIONS_BEYOND_CLIENTS, Workload, cpu, fd_kinds, idle, mib, run,
    sample, secs_from_env, settle,
};

/// Clients per plugin, each on a connection of its own.
const CLIENTS: usize = 64;
/// `--max-connections`: the clients, the Status poller and a slot of slack (see load.rs).
const MAX_CONNECTIONS: &str = "66";
/// `--call-timeout`: the soak looks for leaks over time beside the rest of `just e2e`, which on
/// 2 cores saturates both (the load tests, builds): at the default 2 s, OpenBao calls starved of
/// CPU timed out (27 of 113,673 in one run, all in two such moments). A call that is slow but
/// answered is not lost; zero errors at the default timeout is the load tests' assertion.
const CALL_TIMEOUT: &str = "10s";
/// How far the last third's highest RSS may lie above the reference window's highest.
const RSS_SLACK_KIB: u64 = 2048;
/// Own fds beyond those at rest and the 65 connections that may be open at a sample.
const FD_SLACK: usize = 4;
/// Longest wait, at the end, for the clients' connections and OpenBao's pooled ones to be
/// closed: reqwest's 30 s idle timeout plus one period of its reaper.
const POOL_REAPED: Duration = Duration::from_secs(90);
/// Part of a core the whole soak may use.
const CPU_BUDGET: f64 = 0.5;

/// Each client's pause after a round trip: 32 round trips a second per plugin for PKCS#11 and
/// OpenBao, 4 for the TPM.
fn pace(backend: Backend) -> Duration {
    match backend {
        Backend::Pkcs11 | Backend::Vault => Duration::from_secs(2),
        Backend::Tpm => Duration::from_secs(16),
    }
}

/// Most backend TCP connections the plugin may hold at a sample (see the module docs).
fn backend_connections(backend: Backend) -> usize {
    match backend {
        Backend::Pkcs11 => 0,
        Backend::Tpm => 2,
        Backend::Vault => CLIENTS + VAULT_CONNECTIONS_BEYOND_CLIENTS,
    }
}

/// The highest RSS among `samples` taken within (`from`, `to`] of the start.
fn highest(samples: &[(Duration, Sample)], from: Duration, to: Duration) -> u64 {
    let window: Vec<u64> = samples
        .iter()
        .filter(|(at, _)| *at > from && *at <= to)
        .map(|(_, s)| s.rss_kib)
        .collect();
    assert!(!window.is_empty(), "no sample within {from:?}..{to:?}");
    window.into_iter().max().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "30-minute soak: `just e2e` runs it in the background with KLEIDI_SOAK=1"]
async fn soak_three_backends_64_paced_clients_each_zero_errors_flat_rss_and_fds() {
    // Not in the foreground `--include-ignored` of `just e2e`: see the module docs.
    if std::env::var("KLEIDI_SOAK").as_deref() != Ok("1") {
        eprintln!("SKIPPED: the soak runs only with KLEIDI_SOAK=1 (`just e2e` starts it in the background)");
        return;
    }
    let length = secs_from_env("KLEIDI_SOAK_SECS", 1800);
    let every = (length / 10).min(Duration::from_secs(30));
    let mut plugins = Vec::new();
    for backend in [Backend::Pkcs11, Backend::Vault, Backend::Tpm] {
        let served = Arc::new(
            Served::start(
                backend,
                &[
                    "--max-connections",
                    MAX_CONNECTIONS,
                    "--call-timeout",
                    CALL_TIMEOUT,
                ],
            )
            .await,
        );
        let key_id = served.warm_up().await;
        let rest = idle(served.pid()).await;
        eprintln!(
            "soak {backend} at rest: RSS {}, {}, {} threads",
            mib(rest.rss_kib),
            rest.fds,
            rest.threads
        );
        plugins.push((served, key_id, rest));
    }
    // Everything the soak runs: the plugins, OpenBao, swtpm, and this process (the clients).
    let mut processes: Vec<(String, u32)> = Vec::new();
    for (served, _, _) in &plugins {
        processes.push((format!("kleidi {}", served.backend), served.pid()));
        if let Some(pid) = served.backend_pid() {
            let name = if served.backend == Backend::Vault {
                "OpenBao"
            } else {
                "swtpm"
            };
            processes.push((name.to_owned(), pid));
        }
    }
    processes.push(("the clients".to_owned(), std::process::id()));
    let cpu_before: Vec<Duration> = processes.iter().map(|(_, pid)| cpu(*pid)).collect();
    let started = Instant::now();
    let workloads: Vec<_> = plugins
        .iter()
        .map(|(served, key_id, _)| {
            let (served, key_id) = (Arc::clone(served), key_id.clone());
            let load = Workload {
                clients: CLIENTS,
                length,
                pace: Some(pace(served.backend)),
                status_every: Duration::from_secs(10),
            };
            tokio::spawn(async move { run(&served, &key_id, load).await })
        })
        .collect();

    let mut samples: Vec<Vec<(Duration, Sample)>> = vec![Vec::new(); plugins.len()];
    let mut next = every;
    // Only while the clients are at their pace: at the deadline they all decrypt their first
    // ciphertext again at once, a burst no longer in step with the rest of the run.
    while next < length {
        tokio::time::sleep_until((started + next).into()).await;
        for ((served, _, rest), taken) in plugins.iter().zip(&mut samples) {
            let s = sample(served.pid());
            eprintln!(
                "soak {} at {:>4} s: RSS {}, {}, {} threads",
                served.backend,
                next.as_secs(),
                mib(s.rss_kib),
                s.fds,
                s.threads
            );
            let most = rest.fds.own() + CLIENTS + 1 + FD_SLACK;
            assert!(
                s.fds.own() <= most && s.fds.tcp <= backend_connections(served.backend),
                "{}: {} at {next:?}, more than {most} of its own or {} to the backend: {:?}",
                served.backend,
                s.fds,
                backend_connections(served.backend),
                fd_kinds(served.pid())
            );
            taken.push((next, s));
        }
        next += every;
    }
    let mut tallies = Vec::new();
    for w in workloads {
        tallies.push(w.await.unwrap());
    }
    let elapsed = started.elapsed();
    let used: Vec<Duration> = processes
        .iter()
        .zip(&cpu_before)
        .map(|((_, pid), before)| cpu(*pid).saturating_sub(*before))
        .collect();
    let share = |d: Duration| d.as_secs_f64() / elapsed.as_secs_f64();
    let total = share(used.iter().sum());
    let each: Vec<String> = processes
        .iter()
        .zip(&used)
        .map(|((name, _), d)| format!("{name} {:.1}%", 100.0 * share(*d)))
        .collect();
    eprintln!(
        "soak CPU: {:.1}% of one core over {:.0} s ({})",
        100.0 * total,
        elapsed.as_secs_f64(),
        each.join(", ")
    );

    let warm = length / 6;
    for (((served, _, rest), tally), taken) in plugins.iter().zip(&tallies).zip(&samples) {
        let backend = served.backend;
        let pid = served.pid();
        let (end, took) = settle(pid, POOL_REAPED, |s| {
            s.fds.own() == rest.fds.own() && s.fds.tcp <= rest.fds.tcp
        })
        .await;
        let reference = highest(taken, warm, length / 3);
        let last = highest(taken, length * 2 / 3, length);
        eprintln!(
            "soak {backend}: {} RPCs = {:.0} RPC/s, p50 {:?}, p99 {:?}, max {:?}, {} errors; highest \
             RSS {} after warm-up, {} in the last third; at the end RSS {}, {} ({took:?} after the \
             clients)",
            tally.rpcs,
            tally.rpcs as f64 / elapsed.as_secs_f64(),
            tally.latency(0.50),
            tally.latency(0.99),
            tally.latency(1.0),
            tally.errors,
            mib(reference),
            mib(last),
            mib(end.rss_kib),
            end.fds,
        );
        assert_eq!(tally.errors, 0, "{backend} errors: {:#?}", tally.first_errors);
        let complaints = served.complaints();
        assert!(
            complaints.is_empty(),
            "{backend} logged:\n{}",
            complaints.join("\n")
        );
        assert!(
            last <= reference + RSS_SLACK_KIB,
            "{backend}: RSS grew from {reference} KiB to {last} KiB"
        );
        assert!(
            end.fds.own() == rest.fds.own() && end.fds.tcp <= rest.fds.tcp,
            "{backend}: {} at the end, {} at rest: {:?}",
            end.fds,
            rest.fds,
            fd_kinds(pid)
        );
    }
    assert!(
        total < CPU_BUDGET,
        "the soak used {:.0}% of a core",
        100.0 * total
    );
}
