//! Runs a [`Scenario`] against one backend from one seed: starts the cluster, the workload and the
//! fault timeline, heals everything, reads every key back through every node warm and cold, snapshots
//! raw etcd and the logs, runs the checkers, and writes the history, `verdict.json` and every process
//! log under `target/scenarios/<scenario>/<backend>/<seed>/`. The scenarios themselves live in the
//! top-level `scenarios/` crate.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::checker::{
    AcknowledgedWritesReadBack, Availability, Checker, ColdReadsDecryptOncePerSeed,
    EncryptKeyIdMatchesStatus, KeyIdConvergesAfterRotation, Log, NoPlaintextInEtcd, NoSecretInLogs,
    PluginNeverExited, Report, Secret,
};
use super::cluster::{Backend, BackendKind, Cluster, ClusterSpec, PREFIX, PROVIDER, Timing};
use super::fault::{Fault, Step};
use super::history::{self, Event, History, Outcome};
use super::verdict::{Run, VerdictFile};
use super::workload::{SecretsApis, Target, Via, Workload, final_reads};
use crate::runtime::RuntimeKind;

/// One scenario: the cluster it needs, the workload, the faults on a timeline, the checkers.
pub struct Scenario {
    /// Its name (its file name in `scenarios/src/`).
    pub name: &'static str,
    /// What it proves, in a sentence.
    pub about: &'static str,
    /// Control-plane nodes.
    pub nodes: usize,
    /// The backends it applies to.
    pub backends: Vec<BackendKind>,
    /// Apiserver timing (compressed: say by how much in `about`).
    pub timing: Timing,
    /// The clients.
    pub workload: Workload,
    /// Faults, in real seconds from the workload's start.
    pub timeline: Vec<Step>,
    /// How long the workload runs before the final heal.
    pub length: Duration,
    /// Extra `kleidi serve` flags.
    pub kleidi_flags: Vec<String>,
    /// Default checkers this scenario leaves out, with why (e.g. a KEK deleted on purpose).
    pub omit: Vec<(&'static str, &'static str)>,
    /// Checkers of its own, beside the defaults.
    pub extra: Vec<Arc<dyn Checker + Send + Sync>>,
    /// Also check that cold apiservers decrypt once per distinct seed in etcd.
    pub count_cold_decrypts: bool,
    /// The runtimes it runs on (those whose verbs its timeline uses).
    pub runtimes: Vec<RuntimeKind>,
}

impl Scenario {
    /// A scenario with the defaults: one node, every backend but TPM, upstream timing ÷10, the
    /// default workload, no faults, 20 s.
    pub fn new(name: &'static str, about: &'static str) -> Self {
        Self {
            name,
            about,
            nodes: 1,
            backends: vec![BackendKind::Pkcs11, BackendKind::Vault],
            timing: Timing::compressed(10),
            workload: Workload::default(),
            timeline: Vec::new(),
            length: Duration::from_secs(20),
            kleidi_flags: Vec::new(),
            omit: Vec::new(),
            extra: Vec::new(),
            count_cold_decrypts: false,
            runtimes: vec![RuntimeKind::Process, RuntimeKind::Container],
        }
    }

    /// Why it cannot run on `runtime`, if it cannot: the first step whose verb that runtime lacks.
    pub fn unsupported_on(&self, runtime: RuntimeKind) -> Option<String> {
        if let Some(step) = self.timeline.iter().find(|s| !s.fault.runs_on(runtime)) {
            let (verb, target, _) = step.fault.describe();
            return Some(format!(
                "{verb} on {target}: not supported by the {} runtime",
                runtime.name()
            ));
        }
        (!self.runtimes.contains(&runtime))
            .then(|| format!("{}: not supported by the {} runtime", self.name, runtime.name()))
    }
}

/// Where runs go and what they start.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Root of the output tree (`target/scenarios`).
    pub out: PathBuf,
    /// The `kleidi` binary.
    pub kleidi: PathBuf,
    /// Print progress to stderr.
    pub progress: bool,
    /// The command that starts a foreign plugin on `{socket}` (backend `foreign`).
    pub foreign_command: Option<String>,
    /// Local processes or containers.
    pub runtime: RuntimeKind,
    /// Why that runtime (forced, or whether a Docker engine answered).
    pub runtime_reason: String,
}

impl RunOptions {
    /// `$SCENARIO_OUT` or `<cargo target dir>/scenarios`, the kleidi binary beside this executable.
    pub fn from_env() -> Result<Self> {
        let out = match std::env::var_os("SCENARIO_OUT") {
            Some(dir) => PathBuf::from(dir),
            None => target_dir()?.join("scenarios"),
        };
        let (runtime, runtime_reason) = RuntimeKind::choose()?;
        Ok(Self {
            out,
            kleidi: crate::runtime::kleidi_bin()?,
            progress: true,
            foreign_command: None,
            runtime,
            runtime_reason,
        })
    }
}

fn target_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "target"))
        .map(Path::to_path_buf)
        .context("cannot find the target directory; set SCENARIO_OUT")
}

/// `$SCENARIO_SEED` (decimal or 0x-hex) if set, else a fresh random seed. Printed either way.
pub fn seed_from_env() -> Result<u64> {
    let seed = match std::env::var("SCENARIO_SEED") {
        Ok(s) => {
            let s = s.trim();
            match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            }
            .with_context(|| format!("SCENARIO_SEED={s:?} is not a number"))?
        }
        Err(_) => rand::rng().random(),
    };
    eprintln!("scenario seed {seed} (replay with SCENARIO_SEED={seed})");
    Ok(seed)
}

/// Runs `scenario` on `backend` from `seed`; the verdict file is written before it returns.
pub async fn run(
    scenario: &Scenario,
    backend: BackendKind,
    seed: u64,
    opts: &RunOptions,
) -> Result<VerdictFile> {
    let meta = Run {
        scenario: scenario.name.into(),
        backend: backend.name().into(),
        runtime: opts.runtime.name().into(),
        seed,
    };
    if let Some(why) = scenario
        .unsupported_on(opts.runtime)
        .or_else(|| backend.unsupported_on(opts.runtime))
    {
        anyhow::bail!("{}: {why}", scenario.name);
    }
    let dir = meta.dir(&opts.out);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let history = History::with_file(&dir.join("history.jsonl"))?;
    let say = |line: String| {
        if opts.progress {
            eprintln!(
                "[{}/{} {:>5.1}s] {line}",
                scenario.name,
                backend.name(),
                history.now_ms() as f64 / 1000.0
            );
        }
    };
    say(format!("{} — seed {seed}", scenario.about));
    say(format!(
        "runtime: {} ({})",
        opts.runtime.name(),
        opts.runtime_reason
    ));
    let spec = ClusterSpec {
        nodes: scenario.nodes,
        backend,
        timing: scenario.timing,
        kleidi_flags: scenario.kleidi_flags.clone(),
        foreign_command: opts.foreign_command.clone(),
        seed,
        dir: dir.join("nodes"),
        runtime: opts.runtime,
    };
    let mut cluster = Cluster::start(spec, opts.kleidi.clone(), history.clone()).await?;
    say(format!(
        "cluster up: {} node(s), etcd, {}",
        scenario.nodes,
        backend.name()
    ));

    let apis = match scenario.workload.via {
        Via::Envelope => None,
        Via::SecretsApi => {
            let apis = SecretsApis::start(&cluster).await?;
            say("Secrets API on every node: the workload uses kube-rs".into());
            Some(apis)
        }
    };
    let target = Target::new(&cluster, apis.as_ref());
    let preloaded = scenario
        .workload
        .preload(target.clone(), history.clone(), seed)
        .await;
    let clients = scenario.workload.start(target, history.clone(), seed);
    let started = Instant::now();
    let mut steps: Vec<&Step> = scenario.timeline.iter().collect();
    steps.sort_by_key(|s| s.at);
    let mut steps = steps.into_iter().peekable();
    let mut last_progress = Instant::now();
    // Bounded by `length` (each turn sleeps at most 100 ms) plus the time the steps take.
    while started.elapsed() < scenario.length || steps.peek().is_some() {
        cluster.watch_exits().await;
        if let Some(step) = steps.next_if(|s| s.at <= started.elapsed()) {
            let (verb, target, _) = step.fault.describe_for(backend);
            say(format!("{verb} {target}"));
            if let Err(e) = cluster.apply(&step.fault).await {
                say(format!("step failed: {e:#}"));
                anyhow::bail!("{}: step {verb} {target} failed: {e:#}", scenario.name);
            }
            continue;
        }
        if opts.progress && last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            say(progress(&history));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.watch_exits().await;
    say("heal all".into());
    cluster.heal_all().await?;
    let unhealthy = cluster.wait_healthy(Duration::from_secs(15)).await;
    if !unhealthy.is_empty() {
        say(format!("nodes {unhealthy:?} not healthy 15 s after the heal"));
    }
    // A little load after the heal, so the time to the first good write is measured.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut plaintexts = clients.stop().await;
    plaintexts.extend(preloaded);
    cluster.watch_exits().await;

    let keys: BTreeSet<String> = history::ops(&history.events())
        .filter(|op| op.op == history::Op::Write)
        .map(|op| op.key.clone())
        .collect();
    say(format!(
        "final reads of {} keys through {} node(s), warm and cold",
        keys.len(),
        scenario.nodes
    ));
    final_reads(&cluster, apis.as_ref(), &keys, scenario.workload.op_timeout).await?;
    if let Some(apis) = apis {
        apis.stop().await?;
    }
    cluster.watch_exits().await;
    history.flush()?;

    let snapshot = cluster.store.range(b"/").await?;
    let logs = collect_logs(&cluster, &dir).await?;
    let secrets = secrets(&cluster, &plaintexts, seed);
    let events = history.events();
    let report = check(scenario, &cluster, &events, snapshot, plaintexts, logs, secrets);
    let problems = report.problems();
    let verdict = VerdictFile::new(meta, &events, report);
    verdict.write(&dir)?;
    say(format!("verdict {:?} — {}", verdict.verdict, dir.display()));
    if opts.progress {
        eprintln!("{}", super::summary_table(std::slice::from_ref(&verdict)));
    }
    // The first few name the checker and the operation; verdict.json has them all.
    for line in problems.iter().take(10) {
        say(line.chars().take(400).collect());
    }
    if problems.len() > 10 {
        say(format!("… and {} more in verdict.json", problems.len() - 10));
    }
    Ok(verdict)
}

fn progress(history: &History) -> String {
    let events = history.events();
    let (mut ok, mut fail, mut unknown) = (0, 0, 0);
    for op in history::ops(&events) {
        match op.outcome {
            Outcome::Ok => ok += 1,
            Outcome::Fail { .. } => fail += 1,
            Outcome::Unknown { .. } => unknown += 1,
        }
    }
    let rpcs = history::rpcs(&events).count();
    format!("ops ok {ok}, fail {fail}, unknown {unknown}; plugin RPCs {rpcs}")
}

/// Copies every log of the run into the run directory and returns their contents.
async fn collect_logs(cluster: &Cluster, dir: &Path) -> Result<Vec<Log>> {
    let logs_dir = dir.join("logs");
    std::fs::create_dir_all(&logs_dir)?;
    let mut logs = Vec::new();
    for (name, contents) in cluster.logs().await {
        std::fs::write(logs_dir.join(format!("{name}.log")), &contents)?;
        logs.push(Log { name, contents });
    }
    Ok(logs)
}

/// What must never reach a log: a sample of the plaintexts, the PIN, kleidi's Vault token.
fn secrets(cluster: &Cluster, plaintexts: &[Vec<u8>], seed: u64) -> Vec<Secret> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut secrets: Vec<Secret> = (0..plaintexts.len().min(200))
        .filter_map(|_| plaintexts.get(rng.random_range(0..plaintexts.len())))
        .map(|p| Secret {
            label: "a written plaintext".into(),
            bytes: p.clone(),
        })
        .collect();
    match &cluster.backend {
        Backend::Pkcs11 { token, .. } => {
            if let Ok(pin) = std::fs::read_to_string(token.dir().join("pin")) {
                secrets.push(Secret {
                    label: "the PKCS#11 user PIN".into(),
                    bytes: pin.trim_end().as_bytes().to_vec(),
                });
            }
        }
        Backend::AwsKms { moto, .. } => secrets.push(Secret {
            label: "kleidi's AWS secret access key".into(),
            bytes: moto.secret_access_key().as_bytes().to_vec(),
        }),
        Backend::Tpm { .. } | Backend::Foreign { .. } => {}
        Backend::Vault { bao, .. } => {
            if let Ok(token) = bao.kleidi_token() {
                use secrecy::ExposeSecret;
                secrets.push(Secret {
                    label: "kleidi's OpenBao token".into(),
                    bytes: token.expose_secret().as_bytes().to_vec(),
                });
            }
        }
    }
    secrets
}

/// The default checkers (less the scenario's omissions) and its own, over the run.
fn check(
    scenario: &Scenario,
    cluster: &Cluster,
    events: &[Event],
    snapshot: Vec<(Vec<u8>, Vec<u8>)>,
    plaintexts: Vec<Vec<u8>>,
    logs: Vec<Log>,
    secrets: Vec<Secret>,
) -> Report {
    let plugin_logs: Vec<Log> = logs
        .iter()
        .filter(|l| l.name.starts_with("kleidi"))
        .cloned()
        .collect();
    let cold = ColdReadsDecryptOncePerSeed {
        value_prefix: format!("k8s:enc:kms:v2:{PROVIDER}:").into_bytes(),
        snapshot: if scenario.count_cold_decrypts {
            snapshot.clone()
        } else {
            Vec::new()
        },
    };
    let no_plaintext = NoPlaintextInEtcd {
        prefix: PREFIX.as_bytes().to_vec(),
        snapshot,
        plaintexts,
    };
    let availability = Availability {
        write_ttl_ms: u64::try_from(cluster.timing().write_ttl().as_millis()).unwrap_or(u64::MAX),
        ..Availability::default()
    };
    let never_exited = PluginNeverExited { logs: plugin_logs };
    let no_secret = NoSecretInLogs { logs, secrets };
    let rotates = scenario.timeline.iter().any(|s| s.fault == Fault::RotateKey);
    let mut checkers: Vec<&dyn Checker> = vec![
        &no_plaintext,
        &AcknowledgedWritesReadBack,
        &EncryptKeyIdMatchesStatus,
        &availability,
        &never_exited,
        &no_secret,
    ];
    if rotates {
        checkers.push(&KeyIdConvergesAfterRotation);
    }
    if scenario.count_cold_decrypts {
        checkers.push(&cold);
    }
    checkers.retain(|c| !scenario.omit.iter().any(|(name, _)| *name == c.name()));
    checkers.extend(scenario.extra.iter().map(|c| c.as_ref() as &dyn Checker));
    Report::run(events, &checkers)
}
