//! Every scripted scenario on every backend it applies to, each a test: the run's verdict must be
//! valid (the problems are printed when not). One run at a time: they share two cores, and their
//! timing is part of what they check. Scenarios longer than [`kleidi_scenarios::FAST`] are ignored by
//! `cargo test` and run by `just e2e` (`--include-ignored`), with the randomized nemesis.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests
#![allow(unsafe_code)] // std::env::set_var, see engine()

use std::time::Duration;

use kleidi_harness::runtime::RuntimeKind;
use kleidi_harness::scenario::{BackendKind, RunOptions, Scenario, Verdict, run, seed_from_env};
use rstest::rstest;

/// Serializes runs across the test threads of this binary.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn check(scenario: Scenario, backend: BackendKind) {
    check_seeded(scenario, backend, seed_from_env().unwrap()).await;
}

/// The run's options: the runtime `KLEIDI_RUNTIME` or the engine picked, or the other one when the
/// scenario (or backend) cannot run there (said on stderr); `None` when neither can (said why).
async fn options_for(scenario: &Scenario, backend: BackendKind) -> Option<RunOptions> {
    engine();
    let mut opts = RunOptions::from_env().unwrap();
    if backend == BackendKind::AwsKms
        && let Err(e) = kleidi_harness::runtime::kleidi_aws_kms_bin(&opts.kleidi)
    {
        // `cargo test --workspace` builds kleidi without the AWS SDK; `just test-aws` (which `just
        // test` and `just e2e` run) builds it and runs these cases. CI never skips them.
        assert!(std::env::var_os("CI").is_none(), "{e:#}");
        eprintln!("SKIPPED {} on {backend:?}: {e:#}", scenario.name);
        return None;
    }
    let unsupported = |runtime| {
        scenario
            .unsupported_on(runtime)
            .or_else(|| backend.unsupported_on(runtime))
    };
    let Some(why) = unsupported(opts.runtime) else {
        eprintln!("RUNTIME {} ({})", opts.runtime.name(), opts.runtime_reason);
        return Some(opts);
    };
    let other = match opts.runtime {
        RuntimeKind::Process => RuntimeKind::Container,
        RuntimeKind::Container => RuntimeKind::Process,
    };
    if other == RuntimeKind::Process && unsupported(other).is_none() {
        eprintln!("RUNTIME process for {} on {backend:?}: {why}", scenario.name);
        opts.runtime = other;
        return Some(opts);
    }
    // The refusal itself is part of the contract: a clear error naming the verb and runtime.
    let err = run(scenario, backend, 1, &opts)
        .await
        .expect_err("an unsupported run started");
    assert!(err.to_string().contains("not supported by the"), "{err:#}");
    eprintln!("SKIPPED {} on {backend:?}: {err}", scenario.name);
    None
}

/// Points testcontainers at the API relay when the engine is older than its client.
fn engine() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if RuntimeKind::choose().is_ok_and(|(r, _)| r == RuntimeKind::Container)
            && let Some(host) = kleidi_harness::images::engine::docker_host().unwrap()
        {
            // SAFETY: every test calls this before touching Docker and waits in `call_once`
            // while it runs; no test thread reads the environment meanwhile.
            unsafe { std::env::set_var("DOCKER_HOST", host) };
        }
    });
}

async fn check_seeded(scenario: Scenario, backend: BackendKind, seed: u64) {
    let _turn = ONE_AT_A_TIME.lock().await;
    assert!(
        scenario.backends.contains(&backend),
        "{} does not apply to {backend:?}",
        scenario.name
    );
    let Some(opts) = options_for(&scenario, backend).await else {
        return;
    };
    let verdict = run(&scenario, backend, seed, &opts).await.unwrap();
    let problems: Vec<String> = verdict
        .checkers
        .iter()
        .filter(|c| c.verdict != Verdict::Valid)
        .map(|c| format!("{} {:?}: {:?} {:?}", c.name, c.verdict, c.violations, c.unknowns))
        .collect();
    assert_eq!(
        verdict.verdict,
        Verdict::Valid,
        "{} on {backend:?}, seed {seed} (replay: SCENARIO_SEED={seed}):\n{}",
        verdict.scenario,
        problems.join("\n")
    );
}

#[rstest]
#[case::pkcs11(BackendKind::Pkcs11)]
#[case::vault(BackendKind::Vault)]
#[case::tpm(BackendKind::Tpm)]
#[case::aws_kms(BackendKind::AwsKms)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load(#[case] backend: BackendKind) {
    check(kleidi_scenarios::rotation_under_load::scenario(), backend).await;
}

#[rstest]
#[case::pkcs11(BackendKind::Pkcs11)]
#[case::vault(BackendKind::Vault)]
#[case::tpm(BackendKind::Tpm)]
#[case::aws_kms(BackendKind::AwsKms)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_killed_under_load(#[case] backend: BackendKind) {
    check(kleidi_scenarios::plugin_killed_under_load::scenario(), backend).await;
}

#[rstest]
#[case::pkcs11(BackendKind::Pkcs11)]
#[case::vault(BackendKind::Vault)]
#[case::tpm(BackendKind::Tpm)]
#[case::aws_kms(BackendKind::AwsKms)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiservers_restarted_cold(#[case] backend: BackendKind) {
    check(kleidi_scenarios::apiservers_restarted_cold::scenario(), backend).await;
}

#[rstest]
#[case::pkcs11(BackendKind::Pkcs11)]
#[case::vault(BackendKind::Vault)]
#[case::tpm(BackendKind::Tpm)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarted(#[case] backend: BackendKind) {
    check(kleidi_scenarios::etcd_restarted::scenario(), backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_kms_unreachable() {
    check(
        kleidi_scenarios::aws_kms_unreachable::scenario(),
        BackendKind::AwsKms,
    )
    .await;
}

#[rstest]
#[case::pkcs11(BackendKind::Pkcs11)]
#[case::vault(BackendKind::Vault)]
#[case::tpm(BackendKind::Tpm)]
#[case::aws_kms(BackendKind::AwsKms)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_one_plugin_killed(#[case] backend: BackendKind) {
    check(
        kleidi_scenarios::three_nodes_one_plugin_killed::scenario(),
        backend,
    )
    .await;
}

#[rstest]
#[case::pkcs11(BackendKind::Pkcs11)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_token_lost_and_restored(#[case] backend: BackendKind) {
    check(kleidi_scenarios::hsm_token_lost_and_restored::scenario(), backend).await;
}

#[rstest]
#[case::vault(BackendKind::Vault)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_sealed_then_unsealed(#[case] backend: BackendKind) {
    check(
        kleidi_scenarios::openbao_sealed_then_unsealed::scenario(),
        backend,
    )
    .await;
}

#[rstest]
#[case::vault(BackendKind::Vault)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_revoked_then_replaced(#[case] backend: BackendKind) {
    check(kleidi_scenarios::token_revoked_then_replaced::scenario(), backend).await;
}

#[rstest]
#[case::vault(BackendKind::Vault)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_token_ttl(#[case] backend: BackendKind) {
    check(kleidi_scenarios::short_token_ttl::scenario(), backend).await;
}

#[rstest]
#[case::vault(BackendKind::Vault)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_blackholed(#[case] backend: BackendKind) {
    check(kleidi_scenarios::openbao_blackholed::scenario(), backend).await;
}

#[rstest]
#[case::vault(BackendKind::Vault)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_latency_near_call_timeout(#[case] backend: BackendKind) {
    check(
        kleidi_scenarios::backend_latency_near_call_timeout::scenario(),
        backend,
    )
    .await;
}

#[rstest]
#[case::tpm(BackendKind::Tpm)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_reset(#[case] backend: BackendKind) {
    check(kleidi_scenarios::tpm_reset::scenario(), backend).await;
}

#[rstest]
#[case::vault(BackendKind::Vault)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kek_deleted(#[case] backend: BackendKind) {
    check(kleidi_scenarios::kek_deleted::scenario(), backend).await;
}

#[rstest]
#[case::vault(BackendKind::Vault)]
#[ignore = "e2e: 40 s of workload (just e2e)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_hung_30s(#[case] backend: BackendKind) {
    check(kleidi_scenarios::openbao_hung_30s::scenario(), backend).await;
}

#[rstest]
#[case::vault(BackendKind::Vault)]
#[ignore = "e2e: 70 s of workload (just e2e)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_stopped_60s(#[case] backend: BackendKind) {
    check(kleidi_scenarios::openbao_stopped_60s::scenario(), backend).await;
}

/// One five-minute run per `just e2e`; the seed picks the backend too, so runs alternate.
#[ignore = "e2e: 5 minutes of randomized faults (just e2e)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_nemesis_for_five_minutes() {
    let seed = seed_from_env().unwrap();
    let backend = [BackendKind::Pkcs11, BackendKind::Vault][(seed % 2) as usize];
    eprintln!("randomized nemesis on {backend:?} (seed {seed})");
    // The schedule is drawn for the runtime the run will use (containers add partitions, a Raft
    // leader and etcd members; processes the fault proxy).
    engine();
    let (runtime, _) = RuntimeKind::choose().unwrap();
    check_seeded(
        kleidi_scenarios::random::scenario(backend, runtime, seed, Duration::from_secs(300)),
        backend,
        seed,
    )
    .await;
}

#[test]
fn every_scenario_is_tested_here_and_the_fast_ones_fit_in_a_minute() {
    let source = include_str!("scenarios.rs");
    for s in kleidi_scenarios::all() {
        assert!(
            source.contains(&format!("async fn {}(", s.name)),
            "{} has no test",
            s.name
        );
        let ignored = source.contains(&format!(
            "just e2e)\"]\n#[tokio::test(flavor = \"multi_thread\", worker_threads = 2)]\nasync fn {}(",
            s.name
        ));
        assert_eq!(
            ignored,
            s.length > kleidi_scenarios::FAST,
            "{}: ignored in `just test` iff slow",
            s.name
        );
        assert!(!s.timeline.is_empty(), "{} has no faults", s.name);
    }
    assert!(kleidi_scenarios::all().len() >= 12);
}

/// The backend-free scenarios against a plugin the harness did not configure: kleidi on a SoftHSM
/// token, started by a command line as a user would give `--plugin-command` for their own plugin.
async fn foreign(scenario: Scenario) {
    let kleidi = kleidi_harness::runtime::kleidi_bin().unwrap();
    let label = format!("fr-{}", std::process::id());
    let token = kleidi_harness::runtime::SoftHsmToken::create(&kleidi, &label, "kek-1").unwrap();
    let command = format!(
        "env SOFTHSM2_CONF={} {} serve --listen unix://{{socket}} --backend pkcs11 {}",
        token.conf().display(),
        kleidi.display(),
        token.flags("kek-1").join(" ")
    );
    let _turn = ONE_AT_A_TIME.lock().await;
    let seed = seed_from_env().unwrap();
    let opts = RunOptions {
        foreign_command: Some(command),
        ..RunOptions::from_env().unwrap()
    };
    let verdict = run(&scenario, BackendKind::Foreign, seed, &opts).await.unwrap();
    assert_eq!(
        verdict.verdict,
        Verdict::Valid,
        "{} on a foreign plugin, seed {seed}",
        scenario.name
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_plugin_survives_being_killed_under_load() {
    foreign(kleidi_scenarios::plugin_killed_under_load::scenario()).await;
}

#[ignore = "e2e: three more foreign-plugin runs (just e2e)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_plugin_runs_every_backend_free_scenario() {
    for s in kleidi_scenarios::all() {
        if s.backends.contains(&BackendKind::Foreign) && s.name != "plugin_killed_under_load" {
            foreign(s).await;
        }
    }
}

#[rstest]
#[case::vault(BackendKind::Vault)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_leader_killed_under_load(#[case] backend: BackendKind) {
    check(
        kleidi_scenarios::openbao_leader_killed_under_load::scenario(),
        backend,
    )
    .await;
}

#[rstest]
#[case::vault(BackendKind::Vault)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_leader_killed_during_cold_start(#[case] backend: BackendKind) {
    check(
        kleidi_scenarios::openbao_leader_killed_during_cold_start::scenario(),
        backend,
    )
    .await;
}

#[rstest]
#[case::vault(BackendKind::Vault)]
#[ignore = "e2e: 42 s (just e2e)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_partitioned_from_openbao(#[case] backend: BackendKind) {
    check(
        kleidi_scenarios::node_partitioned_from_openbao::scenario(),
        backend,
    )
    .await;
}

#[rstest]
#[case::pkcs11(BackendKind::Pkcs11)]
#[case::vault(BackendKind::Vault)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_plugins(#[case] backend: BackendKind) {
    check(kleidi_scenarios::rolling_restart_of_plugins::scenario(), backend).await;
}

#[rstest]
#[case::pkcs11(BackendKind::Pkcs11)]
#[case::vault(BackendKind::Vault)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_member_lost_under_load(#[case] backend: BackendKind) {
    check(kleidi_scenarios::etcd_member_lost_under_load::scenario(), backend).await;
}
