//! The `kleidi` binary: parse flags, build the backend and its layers, serve on the socket until
//! SIGTERM/SIGINT. Everything with logic lives in the library.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use kleidi::config::{Cli, Command, Pkcs11Command, RuntimeKind, ServeArgs};
use kleidi::grpc::{KmsV1, KmsV2};
use kleidi::guard::Guarded;
use kleidi::health::Healthy;
use kleidi::metrics::{self, Metrics, Observed};
use kleidi::proto::{v1beta1, v2};
use kleidi::server::{ConnLimits, Listener};
use kleidi::{KeyService, backend};

/// tokio's blocking pool (PKCS#11 and TPM calls, file reads): PKCS#11's session limit plus room for
/// the rest. tokio's default (512) lets the pool creep upward under load, a thread at a time,
/// since it starts one whenever none is idle at that instant (BENCHMARKS.md, Memory).
const MAX_BLOCKING_THREADS: usize = backend::pkcs11::MAX_SESSIONS + 8;

/// Largest request accepted on the wire: a 1 KiB ciphertext plus 32 KiB of annotations, with room.
const MAX_MESSAGE: usize = 64 * 1024;

fn main() -> ExitCode {
    let arena_refused = !one_malloc_arena();
    let cli = Cli::parse();
    kleidi::logging::init(cli.log_format);
    if arena_refused {
        tracing::warn!("glibc refused M_ARENA_MAX=1; RSS may creep up under load");
    }
    kleidi::process::forbid_core_dumps();
    kleidi::credfile::allow_insecure(cli.allow_insecure_credential_files);
    // Built by hand so `serve --runtime` / `--worker-threads` can choose it (benches/README.md).
    let (kind, workers) = match &cli.command {
        Command::Serve(args) => (args.runtime, args.worker_threads),
        _ => (RuntimeKind::MultiThread, None),
    };
    let mut builder = match kind {
        RuntimeKind::MultiThread => tokio::runtime::Builder::new_multi_thread(),
        RuntimeKind::CurrentThread => tokio::runtime::Builder::new_current_thread(),
    };
    if let (RuntimeKind::MultiThread, Some(n)) = (kind, workers) {
        builder.worker_threads(usize::from(n));
    }
    builder.max_blocking_threads(MAX_BLOCKING_THREADS);
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!("cannot start the tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // `kleidi check` prints its own report and picks its own exit code.
    let command = match cli.command {
        Command::Check(args) => return runtime.block_on(kleidi::check::run(*args)),
        command => command,
    };
    let result = runtime.block_on(async {
        match command {
            Command::Serve(args) => serve(*args).await,
            Command::Pkcs11(Pkcs11Command::Init {
                pkcs11,
                pkcs11_so_pin_file,
            }) => backend::pkcs11_init(&pkcs11, &pkcs11_so_pin_file).await,
            Command::Tpm(command) => backend::tpm_command(command).await,
            Command::Check(_) => Ok(()), // returned above
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(class = err.class(), "{err}");
            ExitCode::FAILURE
        }
    }
}

/// glibc's malloc gives each new thread an arena of its own (up to 8 per core) and keeps what is
/// freed in each: under load RSS crept up by ~1 MiB over 40 load runs with nothing leaked, while one
/// arena stayed flat (BENCHMARKS.md, Memory). Small allocations still go through each thread's own
/// cache (tcache) without the arena's lock. Runs first in `main`, before any other thread exists;
/// an operator's `MALLOC_ARENA_MAX` (read by glibc before `main`) is kept. False if glibc refused.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // the binary's only unsafe call: libc has no safe mallopt
fn one_malloc_arena() -> bool {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return true;
    }
    // SAFETY: mallopt(3) only sets one of malloc's tunables, under malloc's own lock; it touches no
    // memory of ours.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) == 1 }
}

/// Other C libraries have their own allocators and knobs.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn one_malloc_arena() -> bool {
    true
}

async fn serve(args: ServeArgs) -> kleidi::Result<()> {
    kleidi::logging::log_effective_config(&args);
    // Bound first, so a refused or busy --metrics-addr stops the start before the backend is touched.
    let metrics_listener = match args.metrics_addr {
        Some(addr) => Some(metrics::http::bind(addr, args.metrics_allow_non_loopback).await?),
        None => None,
    };
    let metrics = metrics_listener.as_ref().map(|_| Arc::new(Metrics::new()));
    let backend: Arc<dyn KeyService> = backend::build(&args).await?;
    let mut guarded = Guarded::new(backend, args.call_timeout);
    if let Some(m) = &metrics {
        guarded = guarded.with_metrics(Arc::clone(m));
    }
    let svc = Arc::new(Healthy::new(guarded, args.health_ttl()));
    let mut kms_v2 = KmsV2::new(svc.clone(), args.status_version);
    let mut kms_v1 = KmsV1::new(svc.clone());
    if let Some(m) = &metrics {
        kms_v2 = kms_v2.with_metrics(Arc::clone(m));
        kms_v1 = kms_v1.with_metrics(Arc::clone(m));
    }
    let v2 = v2::key_management_service_server::KeyManagementServiceServer::new(kms_v2)
        .max_decoding_message_size(MAX_MESSAGE);
    let v1 = v1beta1::key_management_service_server::KeyManagementServiceServer::new(kms_v1)
        .max_decoding_message_size(MAX_MESSAGE);
    let listener = Listener::bind(&args.listen, args.socket_mode)?.with_limits(ConnLimits {
        max_connections: usize::from(args.max_connections),
        idle_timeout: args.idle_timeout,
    });
    // Its own task: it never holds up the socket, and ends with the process; /readyz says
    // "no health verdict yet" until the probe below has one.
    if let (Some(tcp), Some(m)) = (metrics_listener, &metrics) {
        let state: Arc<dyn Observed> = svc.clone();
        let registry = m.registry(Arc::clone(&state));
        let readiness = metrics::http::Readiness {
            max_age: args.ready_max_age(),
        };
        tokio::spawn(metrics::http::serve(tcp, registry, state, readiness));
    }
    // Probe once before the first poll, so the log says at startup whether the backend works.
    let health = svc.health().await;
    tracing::info!(healthz = %health.healthz, key_id = %health.key_id, "initial health");
    let router = tonic::transport::Server::builder()
        .add_service(v2)
        .add_service(v1);
    listener
        .serve(router, shutdown_signal(), args.shutdown_grace)
        .await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}
