//! `kleidi-bench`: `kleidi serve` as a separate process, measured over its Unix socket beside a
//! trivial KMS v2 server, the raw backend and an optional peer plugin (benches/README.md).
//!
//! `kleidi-bench [--quick] [--peer-bin PATH]` runs everything and writes target/bench/crossproc.{json,md}
//! and benches/plots/crossproc-*.png; `kleidi-bench trivial-server --socket PATH` is the trivial
//! server it starts; `kleidi-bench plot-scale` draws kleidi-scale's results.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kleidi_benches::crossproc::{self, Config, report};

#[derive(Parser)]
#[command(about = "Cross-process benchmarks of `kleidi serve` (issue #11)")]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    /// The kleidi binary to serve with.
    #[arg(long, env = "KLEIDI_BENCH_KLEIDI", default_value = "target/release/kleidi")]
    kleidi: PathBuf,
    /// A built peer plugin server (Ruddickmg/vault-kms-provider) to measure on the same OpenBao.
    #[arg(long, env = "KLEIDI_BENCH_PEER_BIN")]
    peer_bin: Option<PathBuf>,
    /// 10x fewer calls: a smoke run.
    #[arg(long)]
    quick: bool,
    /// Backends to measure: pkcs11, vault, tpm (two swtpm processes).
    #[arg(long, value_delimiter = ',', default_value = "pkcs11,vault,tpm")]
    backends: Vec<String>,
    /// Where crossproc.json and crossproc.md go.
    #[arg(long, default_value = "target/bench")]
    out_dir: PathBuf,
    /// Where the PNG charts go.
    #[arg(long, default_value = "benches/plots")]
    plots_dir: PathBuf,
    /// Skip the instruction counts (callgrind; about 1 min per backend).
    #[arg(long)]
    no_instructions: bool,
}

#[derive(Subcommand)]
enum Sub {
    /// A KMS v2 server that answers at once (echo), on a Unix socket; runs until killed.
    TrivialServer {
        /// Socket path.
        #[arg(long)]
        socket: PathBuf,
        /// Encrypt and Decrypt through transit on this OpenBao (the bench's root token and key).
        #[arg(long, conflicts_with = "pkcs11")]
        vault_addr: Option<String>,
        /// Encrypt and Decrypt on the bench's SoftHSM token (SOFTHSM2_CONF of this process).
        #[arg(long)]
        pkcs11: bool,
    },
    /// Sequential calls of one method to any KMS v2 server on a Unix socket, from this process's
    /// current-thread runtime: p50/p99/p999 on stdout. For profiling a server by hand (perf, strace).
    CallLoop {
        /// Socket path.
        #[arg(long)]
        socket: PathBuf,
        /// Encrypt | Decrypt | Status.
        #[arg(long, default_value = "Decrypt")]
        method: String,
        /// Calls.
        #[arg(long, default_value_t = 5000)]
        n: u64,
    },
    /// The raw side's loop, run under callgrind by the instruction counts (not for direct use).
    #[command(hide = true)]
    RawLoop {
        /// pkcs11 | vault.
        #[arg(long)]
        backend: String,
        /// Encrypt | Decrypt.
        #[arg(long)]
        method: String,
        /// Calls.
        #[arg(long)]
        n: u64,
        /// OpenBao's address (vault).
        #[arg(long)]
        vault_addr: Option<String>,
    },
    /// Draw "Decrypt RPCs and backend calls against N" from kleidi-scale's JSON.
    PlotScale {
        /// kleidi-scale's output.
        #[arg(long, default_value = "target/bench/scale.json")]
        input: PathBuf,
        /// The PNG.
        #[arg(long, default_value = "benches/plots/decrypt-calls-vs-n.png")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Some(Sub::TrivialServer {
            socket,
            vault_addr,
            pkcs11,
        }) => trivial(socket, vault_addr.as_deref(), *pkcs11),
        Some(Sub::CallLoop { socket, method, n }) => call_loop(socket, method, *n),
        Some(Sub::PlotScale { input, out }) => kleidi_benches::plot::plot_scale(input, out),
        Some(Sub::RawLoop {
            backend,
            method,
            n,
            vault_addr,
        }) => crossproc::instructions::raw_loop(backend, method, *n, vault_addr.as_deref()),
        None => bench(&cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kleidi-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn trivial(socket: &std::path::Path, vault_addr: Option<&str>, pkcs11: bool) -> anyhow::Result<()> {
    let behind = crossproc::behind(vault_addr, pkcs11)?;
    // Like `kleidi serve`'s default: the multi-thread runtime, one worker per core.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(crossproc::trivial::serve(socket, behind))
}

fn call_loop(socket: &std::path::Path, method: &str, n: u64) -> anyhow::Result<()> {
    use crossproc::measure::Method;
    let Some(method) = Method::ALL
        .into_iter()
        .find(|m| m.name().eq_ignore_ascii_case(method))
    else {
        anyhow::bail!("unknown method {method:?} (Encrypt, Decrypt, Status)");
    };
    let (lat, _) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(crossproc::sequential_calls(socket, method, n, None))?;
    println!(
        "{} × {}: p50 {:.0} µs, p99 {:.0} µs, p999 {:.0} µs, {} errors",
        n,
        method.name(),
        lat.p50_us,
        lat.p99_us,
        lat.p999_us,
        lat.errors
    );
    anyhow::ensure!(lat.errors == 0, "{} calls failed", lat.errors);
    Ok(())
}

fn bench(cli: &Cli) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let work = tempfile::Builder::new().prefix("kleidi-bench").tempdir()?;
    let tokens = work.path().join("tokens");
    std::fs::create_dir(&tokens)?;
    let conf = work.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )?;
    set_softhsm_conf(&conf);
    let kleidi = std::fs::canonicalize(&cli.kleidi).with_context(|| {
        format!(
            "{} (build it: cargo build --release -p kleidi)",
            cli.kleidi.display()
        )
    })?;
    let cfg = Config {
        kleidi,
        self_exe: std::env::current_exe()?,
        peer: cli.peer_bin.clone().filter(|p| !p.as_os_str().is_empty()),
        n: if cli.quick { 500 } else { 5000 },
        conc_total: if cli.quick { 800 } else { 8000 },
        backends: cli.backends.clone(),
        work: work.path().to_path_buf(),
        instructions: !cli.no_instructions,
    };
    let report = crossproc::run(&cfg)?;
    let md = report::write(&report, &cli.out_dir, &cli.plots_dir)?;
    println!("{md}");
    println!(
        "wrote {0}/crossproc.json, {0}/crossproc.md, {1}/crossproc-latency.png, {1}/crossproc-throughput.png",
        cli.out_dir.display(),
        cli.plots_dir.display()
    );
    println!("elapsed: {:.1} s", start.elapsed().as_secs_f64());
    if report.errors > 0 {
        anyhow::bail!("{} calls failed", report.errors);
    }
    Ok(())
}

/// Points this process (its in-process cryptoki) and the `kleidi` children at the bench's token store.
#[allow(unsafe_code)]
fn set_softhsm_conf(conf: &std::path::Path) {
    // SAFETY: called before any other thread exists (the runtimes are built later) and before the
    // PKCS#11 module, which reads it, is loaded.
    unsafe { std::env::set_var("SOFTHSM2_CONF", conf) }
}
