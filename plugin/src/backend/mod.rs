//! The key services kleidi can wrap seeds with, one file each, each behind a cargo feature, and
//! [`build`], which picks one from the flags. Nothing here knows about gRPC.

use std::path::Path;
use std::sync::Arc;

use crate::config::{AwsArgs, BackendKind, Pkcs11Args, ServeArgs, TpmArgs, TpmCommand, VaultArgs};
use crate::service::KeyService;
use crate::{Error, Result};

#[cfg(feature = "aws-kms")]
pub mod aws;
#[cfg(feature = "pkcs11")]
pub mod pkcs11;
#[cfg(feature = "tpm")]
pub mod tpm;
#[cfg(feature = "vault")]
pub mod vault;

/// The annotation key every backend uses to record its ciphertext format, so a format change is
/// detected before any key is touched. A DNS name with more than two labels, as the apiserver requires.
pub const FORMAT_ANNOTATION: &str = "format.kleidi.dev";

/// Builds the backend the flags name.
pub async fn build(args: &ServeArgs) -> Result<Arc<dyn KeyService>> {
    match args.backend {
        BackendKind::Pkcs11 => build_pkcs11(&args.pkcs11).await,
        BackendKind::Vault => build_vault(&args.vault, args.call_timeout).await,
        BackendKind::Tpm => build_tpm(&args.tpm).await,
        BackendKind::AwsKms => build_aws(&args.aws, args.call_timeout).await,
    }
}

/// AWS KMS gets 7/8 of `--call-timeout` (retries of a throttled call included), so a call it
/// cannot answer in time ends with its class a little before the guard's bare timeout would.
#[cfg(feature = "aws-kms")]
async fn build_aws(args: &AwsArgs, call_timeout: std::time::Duration) -> Result<Arc<dyn KeyService>> {
    let budget = call_timeout.mul_f64(7.0 / 8.0);
    Ok(Arc::new(aws::AwsKmsBackend::connect(args, budget).await?))
}

#[cfg(not(feature = "aws-kms"))]
async fn build_aws(_: &AwsArgs, _: std::time::Duration) -> Result<Arc<dyn KeyService>> {
    Err(Error::NotImplemented(
        "this build has no aws-kms backend: build kleidi with `--features aws-kms`".into(),
    ))
}

#[cfg(feature = "pkcs11")]
fn pkcs11_config(args: &Pkcs11Args) -> Result<pkcs11::Pkcs11Config> {
    let pin_file = args
        .pkcs11_pin_file
        .clone()
        .ok_or_else(|| Error::Config("--pkcs11-pin-file is required".into()))?;
    Ok(pkcs11::Pkcs11Config {
        module: args.pkcs11_module.clone(),
        token_label: args.pkcs11_token_label.clone(),
        pin_file,
        key_label: args.pkcs11_key_label.clone(),
    })
}

#[cfg(feature = "pkcs11")]
async fn build_pkcs11(args: &Pkcs11Args) -> Result<Arc<dyn KeyService>> {
    Ok(Arc::new(
        pkcs11::Pkcs11Backend::connect(pkcs11_config(args)?).await?,
    ))
}

/// `kleidi pkcs11 init`.
#[cfg(feature = "pkcs11")]
pub async fn pkcs11_init(args: &Pkcs11Args, so_pin_file: &Path) -> Result<()> {
    let cfg = pkcs11_config(args)?;
    let outcome = pkcs11::init(&cfg, so_pin_file).await?;
    tracing::info!(token = %cfg.token_label, key = %cfg.key_label, ?outcome, "pkcs11 init done");
    Ok(())
}

#[cfg(not(feature = "pkcs11"))]
async fn build_pkcs11(_: &Pkcs11Args) -> Result<Arc<dyn KeyService>> {
    Err(Error::NotImplemented(
        "this build has no pkcs11 backend (cargo feature `pkcs11`)".into(),
    ))
}

/// `kleidi pkcs11 init`.
#[cfg(not(feature = "pkcs11"))]
pub async fn pkcs11_init(_: &Pkcs11Args, _: &Path) -> Result<()> {
    Err(Error::NotImplemented(
        "this build has no pkcs11 backend (cargo feature `pkcs11`)".into(),
    ))
}

/// Vault gets 7/8 of `--call-timeout`, so a call it cannot answer in time ends with its class
/// (`network`, `sealed`) a little before the guard's bare timeout would.
#[cfg(feature = "vault")]
async fn build_vault(args: &VaultArgs, call_timeout: std::time::Duration) -> Result<Arc<dyn KeyService>> {
    let budget = call_timeout.mul_f64(7.0 / 8.0);
    Ok(Arc::new(
        vault::VaultBackend::connect_with_budget(args, budget).await?,
    ))
}

#[cfg(not(feature = "vault"))]
async fn build_vault(_: &VaultArgs, _: std::time::Duration) -> Result<Arc<dyn KeyService>> {
    Err(Error::NotImplemented(
        "this build has no vault backend (cargo feature `vault`)".into(),
    ))
}

#[cfg(feature = "tpm")]
fn tpm_config(args: &TpmArgs) -> Result<tpm::TpmConfig> {
    let tcti = args.tpm_tcti.clone().ok_or_else(|| {
        Error::Config("--tpm-tcti is required (device:/dev/tpmrm0, swtpm:host=127.0.0.1,port=2321)".into())
    })?;
    Ok(tpm::TpmConfig {
        tcti,
        state_dir: args.tpm_state_dir.clone(),
        owner_auth_file: args.tpm_owner_auth_file.clone(),
    })
}

#[cfg(feature = "tpm")]
async fn build_tpm(args: &TpmArgs) -> Result<Arc<dyn KeyService>> {
    Ok(Arc::new(tpm::TpmBackend::connect(tpm_config(args)?).await?))
}

/// `kleidi tpm …`: each command prints what it made (a key_id or a hex Name) on stdout.
#[cfg(feature = "tpm")]
pub async fn tpm_command(command: TpmCommand) -> Result<()> {
    let printed = match command {
        TpmCommand::Init {
            tpm,
            shareable: _,
            admin_pub,
        } => {
            let cfg = tpm_config(&tpm)?;
            let key_id = match admin_pub {
                Some(admin_pub) => tpm::init_shareable(&cfg, &admin_pub).await?,
                None => tpm::init(&cfg).await?,
            };
            tracing::info!(state_dir = %cfg.state_dir.display(), %key_id, "tpm init: new current key");
            key_id
        }
        TpmCommand::AdminKey { out } => tpm::admin_key(&out).await?,
        TpmCommand::ExportParent { tpm, out } => tpm::export_parent(&tpm_config(&tpm)?, &out).await?,
        TpmCommand::Approve { admin_key, to, out } => tpm::approve(&admin_key, &to, &out).await?,
        TpmCommand::Export {
            tpm,
            to,
            approval,
            out,
            key_id,
        } => tpm::export(&tpm_config(&tpm)?, key_id, &to, &approval, &out).await?,
        TpmCommand::Import { tpm, file } => tpm::import(&tpm_config(&tpm)?, &file).await?,
    };
    println!("{printed}");
    Ok(())
}

#[cfg(not(feature = "tpm"))]
async fn build_tpm(_: &TpmArgs) -> Result<Arc<dyn KeyService>> {
    Err(Error::NotImplemented(
        "this build has no tpm backend (cargo feature `tpm`)".into(),
    ))
}

/// `kleidi tpm …`.
#[cfg(not(feature = "tpm"))]
pub async fn tpm_command(_: TpmCommand) -> Result<()> {
    Err(Error::NotImplemented(
        "this build has no tpm backend (cargo feature `tpm`)".into(),
    ))
}
