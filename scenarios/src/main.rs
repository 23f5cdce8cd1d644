//! `kleidi-scenarios`: list the scenarios, run one, run all, or run the randomized nemesis; prints a
//! summary table and exits non-zero when any run is invalid. Seeds come from `SCENARIO_SEED` (one
//! seed for every run of the invocation) or are drawn and printed.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kleidi_harness::runtime::RuntimeKind;
use kleidi_harness::scenario::{
    BackendKind, RunOptions, Scenario, Verdict, VerdictFile, run, seed_from_env, summary_table,
};

#[derive(Parser)]
#[command(
    name = "kleidi-scenarios",
    about = "kleidi's chaos scenarios against real etcd, OpenBao and SoftHSM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every scenario with its backends and what it proves.
    List,
    /// One scenario, on every backend it applies to (or those given).
    Run {
        /// The scenario's name (`list` shows them).
        name: String,
        /// Only these backends (pkcs11, vault, tpm, aws-kms).
        #[arg(long)]
        backend: Vec<String>,
        /// Run against a plugin of your own instead: the command that starts it, with `{socket}`
        /// for the socket path (only scenarios that need no control over its backend).
        #[arg(long)]
        plugin_command: Option<String>,
    },
    /// Every scenario on every backend it applies to.
    All {
        /// Only scenarios whose workload runs at most this long (e.g. `30s`).
        #[arg(long, value_parser = humantime_secs)]
        max_length: Option<Duration>,
    },
    /// The randomized nemesis.
    Random {
        /// How long the faults go on.
        #[arg(long, default_value = "300s", value_parser = humantime_secs)]
        length: Duration,
        /// Only these backends.
        #[arg(long)]
        backend: Vec<String>,
    },
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    let secs = s.strip_suffix('s').unwrap_or(s);
    secs.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| format!("{s:?}: expected seconds, e.g. 300s"))
}

fn main() -> ExitCode {
    let args = Cli::parse();
    if let Err(e) = point_at_engine() {
        eprintln!("kleidi-scenarios: {e:#}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kleidi-scenarios: {e}");
            return ExitCode::from(2);
        }
    };
    // Dropping the run drops its cluster: every process is killed, every container and network
    // removed. The select drops it before `outcome` is bound.
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = cli(args) => Some(outcome),
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    match outcome {
        Some(Ok(true)) => ExitCode::SUCCESS,
        Some(Ok(false)) => ExitCode::FAILURE,
        Some(Err(e)) => {
            eprintln!("kleidi-scenarios: {e:#}");
            ExitCode::from(2)
        }
        None => {
            // A task the run spawned (a container still starting, a client mid-call) may hold a
            // container its owner would remove only after the runtime is gone, when no engine call
            // completes. So: stop every task, then remove by label, not by owner.
            runtime.shutdown_timeout(Duration::from_secs(2));
            remove_leftovers();
            eprintln!("kleidi-scenarios: interrupted; everything the run started is removed");
            ExitCode::from(130)
        }
    }
}

/// Removes what this process's interrupted runs left on the engine: twice, a second apart, for
/// a container or network whose creation the engine was finishing during the first pass.
fn remove_leftovers() {
    if kleidi_harness::images::own_networks().is_empty() {
        return; // a process run: its processes died with their owners
    }
    let sweep = async {
        let mut late = Vec::new();
        for pass in 0..2 {
            if pass > 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            late.extend(kleidi_harness::runtime::container::remove_own_runs().await?);
        }
        anyhow::Ok(late)
    };
    let late = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(sweep));
    match late {
        Ok(late) if late.is_empty() => {}
        Ok(late) => eprintln!(
            "kleidi-scenarios: removed {} container(s) their owners still held: {}",
            late.len(),
            late.join(" ")
        ),
        Err(e) => eprintln!("kleidi-scenarios: cleaning up after the interrupt: {e:#}"),
    }
}

/// On the container runtime, points testcontainers at the API relay when the engine is older than
/// its client. Before the async runtime starts: no other thread reads the environment yet.
#[allow(unsafe_code)]
fn point_at_engine() -> Result<()> {
    let (runtime, _) = RuntimeKind::choose()?;
    if runtime == RuntimeKind::Container
        && let Some(host) = kleidi_harness::images::engine::docker_host()?
    {
        // SAFETY: single-threaded here (the relay thread never reads the environment).
        unsafe { std::env::set_var("DOCKER_HOST", host) };
    }
    Ok(())
}

/// Whether every run was valid.
async fn cli(cli: Cli) -> Result<bool> {
    let mut foreign = None;
    let runs: Vec<(Scenario, Vec<BackendKind>)> = match cli.command {
        Command::List => {
            for s in kleidi_scenarios::all() {
                let backends: Vec<&str> = s.backends.iter().map(|b| b.name()).collect();
                // The runtimes that can run its timeline.
                let runtimes: Vec<&str> = [RuntimeKind::Process, RuntimeKind::Container]
                    .into_iter()
                    .filter(|r| s.unsupported_on(*r).is_none())
                    .map(RuntimeKind::name)
                    .collect();
                println!(
                    "{:<40} {:>4}s  {:<26} {:<18} {}",
                    s.name,
                    s.length.as_secs(),
                    backends.join(","),
                    runtimes.join(","),
                    s.about
                );
            }
            let (name, backends, runtimes) = ("random", "pkcs11,vault", "process,container");
            println!(
                "{name:<40}  300s  {backends:<26} {runtimes:<18} randomized nemesis (`random --length 300s`)"
            );
            return Ok(true);
        }
        Command::Run {
            name,
            backend,
            plugin_command,
        } => {
            let s = kleidi_scenarios::named(&name)
                .with_context(|| format!("no scenario {name:?}; see `list`"))?;
            let backends = match plugin_command {
                Some(command) => {
                    anyhow::ensure!(
                        s.backends.contains(&BackendKind::Foreign),
                        "{name} needs control over the backend; it runs on kleidi's own backends only"
                    );
                    foreign = Some(command);
                    vec![BackendKind::Foreign]
                }
                None => pick(&s, &backend)?,
            };
            vec![(s, backends)]
        }
        Command::All { max_length } => kleidi_scenarios::all()
            .into_iter()
            .filter(|s| max_length.is_none_or(|max| s.length <= max))
            .map(|s| {
                let backends = own_backends(&s);
                (s, backends)
            })
            .collect(),
        Command::Random { length, backend } => {
            let seed = seed_from_env()?;
            let opts = RunOptions::from_env()?;
            let template = kleidi_scenarios::random::scenario(BackendKind::Vault, opts.runtime, seed, length);
            let backends = pick(&template, &backend)?;
            let mut verdicts = Vec::new();
            for b in backends {
                let s = kleidi_scenarios::random::scenario(b, opts.runtime, seed, length);
                verdicts.push(run(&s, b, seed, &opts).await?);
            }
            return Ok(report(&verdicts));
        }
    };
    let seed = seed_from_env()?;
    let opts = RunOptions {
        foreign_command: foreign,
        ..RunOptions::from_env()?
    };
    let mut verdicts = Vec::new();
    for (s, backends) in &runs {
        for b in backends {
            // A backend the runtime cannot start (aws-kms in containers) runs as processes.
            let opts = match b.unsupported_on(opts.runtime) {
                Some(why) => RunOptions {
                    runtime: RuntimeKind::Process,
                    runtime_reason: why,
                    ..opts.clone()
                },
                None => opts.clone(),
            };
            verdicts.push(run(s, *b, seed, &opts).await?);
        }
    }
    Ok(report(&verdicts))
}

/// The backends the harness starts itself (a foreign plugin needs `--plugin-command`).
fn own_backends(s: &Scenario) -> Vec<BackendKind> {
    s.backends
        .iter()
        .copied()
        .filter(|b| *b != BackendKind::Foreign)
        .collect()
}

fn pick(s: &Scenario, names: &[String]) -> Result<Vec<BackendKind>> {
    if names.is_empty() {
        return Ok(own_backends(s));
    }
    names
        .iter()
        .map(|n| {
            let b = BackendKind::parse(n)?;
            anyhow::ensure!(s.backends.contains(&b), "{} does not apply to {n}", s.name);
            Ok(b)
        })
        .collect()
}

fn report(verdicts: &[VerdictFile]) -> bool {
    println!("{}", summary_table(verdicts));
    verdicts.iter().all(|v| v.verdict == Verdict::Valid)
}
