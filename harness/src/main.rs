//! `kleidi-harness`: the harness as a command. `audit` classifies every raw value under a prefix of
//! a real etcd (read-only) and exits non-zero if any is stored in clear; `dump` prints one raw value
//! like `etcdctl get KEY | hexdump -C`; `get` and `put` read and write one object through the KMS v2
//! envelope and a running plugin, as kube-apiserver would (disaster recovery, scripting); `demo` runs
//! the whole path on this machine and stops everything it started; `conformance` checks any running
//! KMS v2 plugin against the contract, one line per check; `apiserver` serves the Kubernetes API for
//! Secrets over the envelope; `verify` and `rewrite` work on any cluster through its API (kube-rs):
//! a canary proving what lands in etcd, and the storage migration after a rotation. Logic lives in
//! the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kleidi_harness::apiserver::object::Keys;
use kleidi_harness::apiserver::object::{self, Encoding};
use kleidi_harness::apiserver::{Authority, Envelope, EtcdStore, EtcdTls, Storage, connect_unix};
use kleidi_harness::audit::{self, Audit, Class};
use kleidi_harness::cluster::{self, rewrite, verify};
use kleidi_harness::conformance;
use kleidi_harness::kubeapi::{ApiServer, Secrets};

mod demo;
#[cfg(test)]
mod runbooks;

/// Exit code when `audit` finds a value in clear.
const EXIT_IN_CLEAR: u8 = 1;
/// Exit code when `conformance` finds a check that does not pass.
const EXIT_NONCONFORMANT: u8 = 1;
/// Exit code when `verify` finds the canary not stored as expected, or `rewrite`'s audit finds a
/// value in clear or under another key ID.
const EXIT_CHECK_FAILED: u8 = 1;
/// Exit code for any other failure (etcd unreachable, bad arguments, plugin errors).
const EXIT_ERROR: u8 = 2;

/// Plays kube-apiserver's KMS v2 storage role against a real etcd and a KMS plugin.
#[derive(Debug, Parser)]
#[command(name = "kleidi-harness", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Classify every raw value under a prefix; exit 1 if any is stored in clear. Read-only.
    Audit {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Key prefix to read (`--etcd-prefix` of the apiserver, plus a resource if wanted).
        #[arg(long, default_value = "/registry/secrets/")]
        prefix: String,
        /// One line per key (key and class), not just the summary.
        #[arg(long, short)]
        verbose: bool,
    },
    /// Print one raw value as `etcdctl get KEY | hexdump -C` shows it (key, newline, value, newline).
    Dump {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// etcd key, e.g. /registry/secrets/default/db-password.
        key: String,
    },
    /// Decrypt one value through the plugin and print the object (JSON).
    Get {
        #[command(flatten)]
        etcd: EtcdArgs,
        #[command(flatten)]
        plugin: PluginArgs,
        /// Provider name; by default the one in the value's `k8s:enc:kms:v2:<name>:` prefix.
        #[arg(long)]
        provider: Option<String>,
        /// Write the decrypted bytes as stored (protobuf or JSON) instead of a JSON rendering.
        #[arg(long)]
        raw: bool,
        /// etcd key.
        key: String,
    },
    /// Encrypt a Secret (JSON, as `kubectl get secret -o json` prints it) and write it to etcd.
    Put {
        #[command(flatten)]
        etcd: EtcdArgs,
        #[command(flatten)]
        plugin: PluginArgs,
        /// Provider name, as in the apiserver's EncryptionConfiguration.
        #[arg(long)]
        provider: String,
        /// Storage encoding.
        #[arg(long, value_enum, default_value_t = EncodingArg::Protobuf)]
        encoding: EncodingArg,
        /// etcd key: <prefix>/secrets/<namespace>/<name>.
        key: String,
        /// The Secret as JSON; `-` reads standard input.
        file: PathBuf,
    },
    /// Start etcd, a SoftHSM token (or with `--backend tpm` a swtpm) and `kleidi serve`, write a
    /// Secret through them, show the raw bytes, audit them, read the Secret back, and stop everything.
    Demo(demo::DemoArgs),
    /// Check a running KMS v2 plugin (any, not only kleidi) against the contract kube-apiserver
    /// relies on: one line per check (pass / FAIL / unknown); exit 0 only if every check passes.
    Conformance {
        #[command(flatten)]
        plugin: PluginArgs,
    },
    /// Serve the Kubernetes API for Secrets (create, get, list, update, delete) on plain HTTP on
    /// loopback, stored as kube-apiserver stores them: protobuf, KMS v2 envelope through the plugin,
    /// etcd. Until Ctrl-C or SIGTERM.
    Apiserver {
        #[command(flatten)]
        etcd: EtcdArgs,
        #[command(flatten)]
        plugin: PluginArgs,
        /// Provider name, as in an EncryptionConfiguration.
        #[arg(long)]
        provider: String,
        /// Loopback address to serve on (port 0: any free port; the line printed says which).
        #[arg(long, default_value = "127.0.0.1:6443")]
        listen: std::net::SocketAddr,
        /// The apiserver's `--etcd-prefix`.
        #[arg(long, default_value = object::DEFAULT_PREFIX)]
        etcd_prefix: String,
        /// Write a kubeconfig pointing at this server here.
        #[arg(long)]
        write_kubeconfig: Option<PathBuf>,
    },
    /// Write a canary Secret through a cluster's API, check its raw etcd value (KMS v2, provider,
    /// key ID, no canary byte in clear), read it back, delete it. Exit 0, or 1 with the reason.
    Verify {
        #[command(flatten)]
        cluster: ClusterArgs,
        #[command(flatten)]
        etcd: EtcdArgs,
        /// The provider name the value must carry.
        #[arg(long)]
        provider: Option<String>,
        /// The key ID the value must carry.
        #[arg(long)]
        key_id: Option<String>,
        /// Namespace of the canary.
        #[arg(long, default_value = "default")]
        namespace: String,
    },
    /// After a KEK rotation: replace every Secret with itself (its own resourceVersion), so the
    /// apiserver rewrites it under the current key; paced, resumable, with a progress bar. With
    /// `--etcd`, first a canary finds the current key ID, and at the end an audit proves no Secret is
    /// left in clear or under another key ID (exit 1 otherwise).
    Rewrite {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// One namespace; all by default.
        #[arg(long)]
        namespace: Option<String>,
        /// Requests per second at most.
        #[arg(long, default_value_t = 20.0)]
        qps: f64,
        /// Secrets per list page.
        #[arg(long, default_value_t = 250)]
        page: u32,
        /// Progress for a resume; removed when the rewrite finishes.
        #[arg(long, default_value = "kleidi-rewrite.checkpoint")]
        checkpoint: PathBuf,
        /// etcd endpoints, for the audit at the end (comma-separated); no audit without.
        #[arg(long, value_delimiter = ',')]
        etcd: Option<Vec<String>>,
        /// The key ID every Secret must end under (by default the one a canary write gets).
        #[arg(long, requires = "etcd")]
        key_id: Option<String>,
        #[command(flatten)]
        etcd_tls: EtcdTlsArgs,
    },
}

/// Which cluster API to talk to.
#[derive(Debug, Args)]
struct ClusterArgs {
    /// kubeconfig to use (its current context); by default $KUBECONFIG, ~/.kube/config or in-cluster.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The apiserver's `--etcd-prefix`.
    #[arg(long, default_value = object::DEFAULT_PREFIX)]
    etcd_prefix: String,
}

/// etcdctl's TLS flags, for commands where etcd is optional.
#[derive(Debug, Args)]
struct EtcdTlsArgs {
    /// CA bundle for etcd's serving certificate.
    #[arg(long, env = "ETCDCTL_CACERT")]
    cacert: Option<PathBuf>,
    /// Client certificate.
    #[arg(long, env = "ETCDCTL_CERT")]
    cert: Option<PathBuf>,
    /// Client key.
    #[arg(long = "key", env = "ETCDCTL_KEY")]
    key_file: Option<PathBuf>,
}

/// Where etcd is, and etcdctl's TLS flags.
#[derive(Debug, Args)]
struct EtcdArgs {
    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "ETCDCTL_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd: Vec<String>,
    #[command(flatten)]
    tls: EtcdTlsArgs,
}

impl EtcdArgs {
    async fn connect(&self) -> Result<EtcdStore> {
        Ok(EtcdStore::connect(&self.etcd, &self.tls.tls()).await?)
    }
}

impl EtcdTlsArgs {
    fn tls(&self) -> EtcdTls {
        EtcdTls {
            ca: self.cacert.clone(),
            cert: self.cert.clone(),
            key: self.key_file.clone(),
        }
    }
}

/// Where the plugin is.
#[derive(Debug, Args)]
struct PluginArgs {
    /// The plugin's socket (`unix:///path` or a path).
    #[arg(long)]
    plugin: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EncodingArg {
    Protobuf,
    Json,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("kleidi-harness: {err:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

async fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Audit {
            etcd,
            prefix,
            verbose,
        } => audit(&etcd, &prefix, verbose).await,
        Command::Dump { etcd, key } => {
            let value = etcd.connect().await?.get(key.as_bytes()).await?;
            let value = value.with_context(|| format!("no value at {key}"))?;
            print!("{}", audit::etcdctl_hexdump(key.as_bytes(), &value));
            Ok(ExitCode::SUCCESS)
        }
        Command::Get {
            etcd,
            plugin,
            provider,
            raw,
            key,
        } => {
            get(&etcd, &plugin, provider, raw, &key).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Put {
            etcd,
            plugin,
            provider,
            encoding,
            key,
            file,
        } => {
            put(&etcd, &plugin, &provider, encoding, &key, &file).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => demo::run(args).await,
        Command::Apiserver {
            etcd,
            plugin,
            provider,
            listen,
            etcd_prefix,
            write_kubeconfig,
        } => apiserver(&etcd, &plugin, &provider, listen, &etcd_prefix, write_kubeconfig).await,
        Command::Verify {
            cluster,
            etcd,
            provider,
            key_id,
            namespace,
        } => {
            let expect = verify::Expect {
                namespace,
                keys: Keys::new(&cluster.etcd_prefix),
                provider,
                key_id,
            };
            let client = cluster::client(cluster.kubeconfig.as_deref()).await?;
            let verdict = verify::verify(client, &etcd.connect().await?, &expect).await?;
            for line in &verdict.lines {
                println!("{line}");
            }
            Ok(if verdict.passed() {
                println!("verified: Secrets written through the API are stored encrypted as expected");
                ExitCode::SUCCESS
            } else {
                println!("NOT verified: {}", verdict.failures.join("; "));
                ExitCode::from(EXIT_CHECK_FAILED)
            })
        }
        Command::Rewrite {
            cluster,
            namespace,
            qps,
            page,
            checkpoint,
            etcd,
            key_id,
            etcd_tls,
        } => {
            let etcd = match etcd {
                Some(endpoints) => Some(EtcdStore::connect(&endpoints, &etcd_tls.tls()).await?),
                None => None,
            };
            let options = rewrite::Options {
                namespace,
                qps,
                page,
                checkpoint,
            };
            run_rewrite(&cluster, etcd.as_ref(), key_id, &options).await
        }
        Command::Conformance { plugin } => {
            println!("conformance of {} to the KMS v2 contract", plugin.plugin);
            let report = conformance::run(&plugin.plugin).await;
            print!("{report}");
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_NONCONFORMANT)
            })
        }
    }
}

async fn audit(etcd: &EtcdArgs, prefix: &str, verbose: bool) -> Result<ExitCode> {
    let mut audit = Audit::new();
    etcd.connect()
        .await?
        .scan(prefix.as_bytes(), |key, value| {
            let class = audit.add(key, value);
            if verbose {
                println!("{}  {class}", String::from_utf8_lossy(key));
            }
        })
        .await?;
    print!("{audit}");
    if audit.all_encrypted() {
        println!("verdict: every value under {prefix} is encrypted");
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "verdict: {} value(s) under {prefix} stored IN CLEAR",
            audit.in_clear().len()
        );
        Ok(ExitCode::from(EXIT_IN_CLEAR))
    }
}

/// An envelope for `provider` over the plugin, with a write state (the apiserver needs one to read).
async fn envelope(plugin: &PluginArgs, provider: &str) -> Result<Arc<Envelope>> {
    let kms = connect_unix(&plugin.plugin, Authority::Localhost).await?;
    let envelope = Envelope::new(provider, Arc::new(kms))?;
    if let Err(err) = envelope.refresh().await {
        // Like the apiserver: an unhealthy Status still installs a state when the key ID is valid.
        if envelope.key_id().is_none() {
            return Err(err).context("the plugin gave no usable Status + Encrypt");
        }
        eprintln!("warning: plugin probe: {err}");
    }
    Ok(Arc::new(envelope))
}

async fn get(
    etcd: &EtcdArgs,
    plugin: &PluginArgs,
    provider: Option<String>,
    raw: bool,
    key: &str,
) -> Result<()> {
    let etcd = etcd.connect().await?;
    let value = etcd
        .get(key.as_bytes())
        .await?
        .with_context(|| format!("no value at {key}"))?;
    let provider = match (provider, audit::classify(&value)) {
        (Some(p), _) => p,
        (None, Class::KmsV2(v)) => v.provider,
        (None, other) => bail!("{key} is not a KMS v2 value ({other}); nothing to decrypt"),
    };
    let storage = Storage::new(etcd, envelope(plugin, &provider).await?);
    let (plaintext, stale) = storage.get(key).await?;
    if stale {
        eprintln!(
            "note: {key} was written under another key ID; the apiserver rewrites it on its next update"
        );
    }
    if raw {
        use std::io::Write as _;
        std::io::stdout().write_all(&plaintext)?;
        return Ok(());
    }
    match object::detect(&plaintext) {
        Some(Encoding::Json) => println!("{}", String::from_utf8_lossy(&plaintext).trim_end()),
        Some(Encoding::Protobuf) => {
            let secret = object::parse_secret(&plaintext)
                .context("only Secrets are rendered as JSON; use --raw for other kinds")?;
            println!("{}", serde_json::to_string_pretty(&secret)?);
        }
        None => bail!("the decrypted value is neither protobuf nor JSON; use --raw"),
    }
    Ok(())
}

async fn put(
    etcd: &EtcdArgs,
    plugin: &PluginArgs,
    provider: &str,
    encoding: EncodingArg,
    key: &str,
    file: &std::path::Path,
) -> Result<()> {
    let text = if file == std::path::Path::new("-") {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let secret = object::parse_secret(text.as_bytes())?;
    let secret = object::for_key(secret, key)?;
    let encoding = match encoding {
        EncodingArg::Protobuf => Encoding::Protobuf,
        EncodingArg::Json => Encoding::Json,
    };
    let plaintext = zeroize::Zeroizing::new(object::encode_secret(&secret, encoding)?);
    let storage = Storage::new(etcd.connect().await?, envelope(plugin, provider).await?);
    let stored = storage.put(key, &plaintext).await?;
    println!("{key}: {}", audit::classify(&stored));
    Ok(())
}

async fn apiserver(
    etcd: &EtcdArgs,
    plugin: &PluginArgs,
    provider: &str,
    listen: std::net::SocketAddr,
    etcd_prefix: &str,
    write_kubeconfig: Option<PathBuf>,
) -> Result<ExitCode> {
    let storage = Storage::new(etcd.connect().await?, envelope(plugin, provider).await?);
    let secrets = Secrets::new(storage, Keys::new(etcd_prefix));
    let mut server = ApiServer::start(secrets, listen).await?;
    println!(
        "serving the Secrets API on {} (provider {provider}, etcd {})",
        server.url(),
        etcd.etcd.join(",")
    );
    if let Some(path) = write_kubeconfig {
        server.write_kubeconfig(&path)?;
        println!("kubeconfig: {}", path.display());
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        served = server.serve() => served?,
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    server.stop().await?;
    Ok(ExitCode::SUCCESS)
}

async fn run_rewrite(
    cluster: &ClusterArgs,
    etcd: Option<&EtcdStore>,
    key_id: Option<String>,
    options: &rewrite::Options,
) -> Result<ExitCode> {
    let client = cluster::client(cluster.kubeconfig.as_deref()).await?;
    let keys = Keys::new(&cluster.etcd_prefix);
    // The key ID the apiserver writes under now: what every Secret must end under.
    let expected = match (etcd, key_id) {
        (Some(_), Some(id)) => Some(id),
        (Some(etcd), None) => {
            let expect = verify::Expect {
                namespace: options.namespace.clone().unwrap_or_else(|| "default".into()),
                keys: keys.clone(),
                provider: None,
                key_id: None,
            };
            let verdict = verify::verify(client.clone(), etcd, &expect).await?;
            let Some(stored) = verdict.stored.clone().filter(|_| verdict.passed()) else {
                println!("canary: {}", verdict.failures.join("; "));
                bail!("a Secret written now is not stored as KMS v2: rewriting would not help");
            };
            println!(
                "the apiserver writes under provider {} key_id {}",
                stored.provider, stored.key_id
            );
            Some(stored.key_id)
        }
        (None, _) => None,
    };
    let progress = indicatif::ProgressBar::new(0);
    let report = rewrite::rewrite(client, options, &progress).await?;
    if let Some(after) = &report.resumed_after {
        println!("resumed after {after}");
    }
    println!("rewrite: {report}");
    let (Some(etcd), Some(expected)) = (etcd, expected) else {
        return Ok(ExitCode::SUCCESS);
    };
    let prefix = match &options.namespace {
        Some(ns) => format!("{}/secrets/{ns}/", keys.prefix()),
        None => format!("{}/secrets/", keys.prefix()),
    };
    let mut audit = Audit::new();
    etcd.scan(prefix.as_bytes(), |key, value| {
        audit.add(key, value);
    })
    .await?;
    print!("{audit}");
    let others: usize = audit
        .kms_v2_key_ids()
        .iter()
        .filter(|(id, _)| **id != expected)
        .map(|(_, n)| n)
        .sum();
    let not_kms = audit.total() - audit.count("kms-v2");
    if others == 0 && not_kms == 0 {
        println!(
            "verdict: all {} Secrets under {prefix} are KMS v2 under key_id {expected}",
            audit.total()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "verdict: {others} Secret(s) under another key_id, {not_kms} not KMS v2 ({} in clear)",
            audit.in_clear().len()
        );
        Ok(ExitCode::from(EXIT_CHECK_FAILED))
    }
}
