//! `kleidi-harness demo` (what `just demo` runs): the whole KMS v2 path on this machine with real
//! components. etcd, a SoftHSM token made by `kleidi pkcs11 init` (or, with `--backend tpm`, a swtpm
//! and a KEK made by `kleidi tpm init`), and `kleidi serve` run as separate processes in temp dirs; a Secret goes through the envelope into etcd; the raw value is shown and
//! audited; a cold "apiserver" (empty cache) reads it back through the plugin. Everything started is
//! stopped and removed on success, failure or Ctrl-C (the handles kill and clean up on drop).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use kleidi_harness::apiserver::object::{self, Encoding, Keys};
use kleidi_harness::apiserver::{Authority, Envelope, Storage, connect_unix};
use kleidi_harness::audit::{self, Audit};
use kleidi_harness::kubeapi::{ApiServer, Secrets};
use kleidi_harness::runtime::{Etcd, KleidiPlugin, SoftHsmToken, Swtpm, kleidi_bin};
use rand::RngCore;

/// `demo` flags.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The `kleidi` binary (default: `$KLEIDI_BIN`, else the one cargo built beside this one).
    #[arg(long)]
    kleidi: Option<PathBuf>,
    /// Provider name in the EncryptionConfiguration.
    #[arg(long, default_value = "kleidi")]
    provider: String,
    /// Leave etcd and kleidi running after the last step, until Ctrl-C, to look around with etcdctl,
    /// and serve the Kubernetes API for Secrets over them (a kubeconfig is printed) for any client.
    #[arg(long)]
    keep_running: bool,
    /// Where the KEK lives: a SoftHSM token, or a software TPM (swtpm).
    #[arg(long, value_enum, default_value_t = DemoBackend::Pkcs11)]
    backend: DemoBackend,
}

/// The key services the demo can start by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DemoBackend {
    /// A SoftHSM2 token through PKCS#11.
    Pkcs11,
    /// TPM 2.0: a swtpm process.
    Tpm,
}

/// The key service under the plugin; dropping it stops it and removes its files.
enum KeyService {
    Pkcs11(SoftHsmToken),
    Tpm(Box<Swtpm>),
}

/// Creates the key with the command a user runs, then starts `kleidi serve` on it.
async fn start_backend(kleidi: &Path, backend: DemoBackend) -> Result<(KeyService, KleidiPlugin)> {
    match backend {
        DemoBackend::Pkcs11 => {
            step("creating a SoftHSM token and an AES-256 key with `kleidi pkcs11 init`");
            let token = SoftHsmToken::create(kleidi, "kleidi-demo", "kleidi-kek")?;
            step("starting `kleidi serve --backend pkcs11`");
            let plugin = KleidiPlugin::start(kleidi, &token, "kleidi-kek", &[]).await?;
            Ok((KeyService::Pkcs11(token), plugin))
        }
        DemoBackend::Tpm => {
            step("starting a software TPM (swtpm on 127.0.0.1, its own state dir)");
            let tpm = Swtpm::start().await?;
            println!("    {}", tpm.tcti());
            step("creating a TPM-wrapped key-encryption key with `kleidi tpm init`");
            println!("    key_id {}", tpm.init_key(kleidi).await?);
            step("starting `kleidi serve --backend tpm`");
            // Under the swtpm's temp dir, so its removal takes the socket along.
            let run = tpm.dir().join("run");
            std::fs::create_dir_all(&run)?;
            let env = [("TSS2_LOG".to_string(), "all+none".to_string())];
            let log = tpm.dir().join("kleidi.log");
            let plugin =
                KleidiPlugin::launch(kleidi, run.join("kms.sock"), tpm.kleidi_flags(), &env, &log, &[])
                    .await?;
            Ok((KeyService::Tpm(Box::new(tpm)), plugin))
        }
    }
}

/// Runs the demo; Ctrl-C stops it (and everything it started) at any step.
pub async fn run(args: DemoArgs) -> Result<ExitCode> {
    tokio::select! {
        result = steps(args) => result,
        _ = tokio::signal::ctrl_c() => {
            // Dropping `steps` kills etcd and kleidi and removes their temp dirs.
            eprintln!("\ninterrupted: stopping etcd and kleidi");
            Ok(ExitCode::from(130))
        }
    }
}

async fn steps(args: DemoArgs) -> Result<ExitCode> {
    let kleidi = match args.kleidi {
        Some(path) => path,
        None => kleidi_bin()?,
    };
    step("starting etcd (127.0.0.1, its own data dir)");
    let etcd = Etcd::start().await?;
    println!("    {}", etcd.url);

    let (service, mut plugin) = start_backend(&kleidi, args.backend).await?;
    println!("    socket {}", plugin.socket.display());

    step("apiserver start-up: Status, then a 32-byte seed wrapped once by Encrypt");
    let kms = Arc::new(connect_unix(&plugin.socket, Authority::Localhost).await?);
    let writer = Arc::new(Envelope::new(&args.provider, kms.clone())?);
    let probe = writer.refresh().await.context("the plugin is not healthy")?;
    println!("    key_id {}", probe.key_id);
    let storage = Storage::new(etcd.client().await?, writer);

    let mut password = [0u8; 12];
    rand::rng().fill_bytes(&mut password);
    let password = format!("demo-{}", hex::encode(password));
    let key = Keys::default().secret("default", "db-password");
    step(&format!(
        "writing Secret default/db-password (password={password}) through the envelope"
    ));
    let secret = object::new_secret(
        "default",
        "db-password",
        BTreeMap::from([("password".to_owned(), password.clone().into_bytes())]),
    );
    let plaintext = object::encode_secret(&secret, Encoding::Protobuf)?;
    storage.put(&key, &plaintext).await?;

    step(&format!(
        "raw etcd value, as `etcdctl get {key} | hexdump -C` shows it"
    ));
    let raw = storage
        .etcd
        .get(key.as_bytes())
        .await?
        .context("the Secret is not in etcd")?;
    print!("{}", audit::etcdctl_hexdump(key.as_bytes(), &raw));
    println!("    {}", audit::classify(&raw));

    step("audit of every value under /registry/");
    let audit: Audit = storage.etcd.range(b"/registry/").await?.into_iter().collect();
    print!("{audit}");
    let leaked = contains(&raw, password.as_bytes());
    println!(
        "    password bytes in the raw value: {}",
        if leaked { "FOUND" } else { "none" }
    );
    if leaked || !audit.all_encrypted() {
        bail!("a value is stored in clear");
    }

    step("a cold apiserver (empty cache) reads the Secret back: one Decrypt through the plugin");
    let reader = Arc::new(Envelope::new(&args.provider, kms)?);
    reader.refresh().await?;
    let (read, _) = Storage::new(storage.etcd.clone(), reader.clone())
        .get(&key)
        .await?;
    let read = object::parse_secret(&read)?;
    let value = read
        .data
        .as_ref()
        .and_then(|d| d.get("password"))
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        .unwrap_or_default();
    println!(
        "    password={value}  (Decrypt calls: {})",
        reader.stats().decrypt_calls
    );
    if value != password {
        bail!("the Secret read back differs from the one written");
    }

    if args.keep_running {
        // The API over the same storage: what a client writes lands beside the demo's Secret.
        let dir = tempfile::Builder::new().prefix("kleidi-demo-kube-").tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        let api = ApiServer::start(
            Secrets::new(storage.clone(), Keys::default()),
            "127.0.0.1:0".parse()?,
        )
        .await?;
        api.write_kubeconfig(&kubeconfig)?;
        step("etcd, kleidi and the Kubernetes API for Secrets keep running until Ctrl-C; try:");
        println!("    api {}", api.url());
        println!("    kubeconfig {}", kubeconfig.display());
        println!(
            "    KUBECONFIG={} kubectl get secret db-password -o yaml",
            kubeconfig.display()
        );
        println!(
            "    kleidi-harness verify --kubeconfig {} --etcd {}",
            kubeconfig.display(),
            etcd.url
        );
        println!(
            "    ETCDCTL_API=3 etcdctl --endpoints {} get {key} | hexdump -C",
            etcd.url
        );
        println!(
            "    kleidi-harness get --etcd {} --plugin {} {key}",
            etcd.url,
            plugin.socket.display()
        );
        std::future::pending::<()>().await;
    }

    match service {
        KeyService::Pkcs11(token) => {
            step("stopping kleidi (SIGTERM) and etcd");
            plugin.process.stop(Duration::from_secs(5)).await?;
            drop(token);
        }
        KeyService::Tpm(mut tpm) => {
            step("stopping kleidi (SIGTERM), the TPM and etcd");
            plugin.process.stop(Duration::from_secs(5)).await?;
            tpm.kill().await?;
        }
    }
    drop(etcd);
    println!("\nok: the Secret is in etcd only encrypted, and reads back through kleidi");
    Ok(ExitCode::SUCCESS)
}

fn step(what: &str) {
    println!("\n==> {what}");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
