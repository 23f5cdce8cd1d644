//! One control-plane node's TPM as a container (`kleidi-swtpm`) on the run's network, named so the
//! node's kleidi container reaches it by name whatever address a restart gives it; the host (the
//! harness as the operator: `kleidi tpm init`, enrolment, rotation) reaches it at its current
//! address, re-read after every start. The TPM's NVRAM lives in the container's filesystem, which
//! kill and start keep (a rebooted TPM, its keys intact); kleidi's TPM-wrapped keys live in a host
//! directory the node's kleidi container mounts at the same path, as on a node's own disk.

use anyhow::{Context, Result};
use testcontainers::ImageExt as _;

use super::{ContainerHandle, RUN_LABEL};
use crate::images::READY_LIMIT;
use crate::images::swtpm::{COMMAND_PORT, SwtpmContainer, SwtpmImage};
use crate::runtime::TpmAccess;

/// A node's swtpm container; removed on drop, with kleidi's state directory.
pub struct SwtpmNode {
    tpm: SwtpmContainer,
    handle: ContainerHandle,
    name: String,
    kleidi_state: tempfile::TempDir,
}

impl SwtpmNode {
    /// Starts `name` on `network` and waits until the TPM answers a command.
    pub async fn start(network: &str, name: &str) -> Result<Self> {
        let request = SwtpmImage::default()
            .with_network(network)
            .with_container_name(name)
            .with_label(RUN_LABEL, network);
        let tpm = SwtpmContainer::start(request)
            .await
            .with_context(|| format!("starting {name}"))?;
        let handle = ContainerHandle::new(tpm.container().id(), name)?;
        let kleidi_state = tempfile::Builder::new().prefix("kleidi-tpm-state-").tempdir()?;
        Ok(SwtpmNode {
            tpm,
            handle,
            name: name.into(),
            kleidi_state,
        })
    }

    /// How the host reaches it (its current address) and kleidi's state directory on the host.
    pub fn access(&self) -> TpmAccess {
        TpmAccess {
            tcti: self.tpm.tcti(),
            state_dir: self.kleidi_state.path().to_path_buf(),
        }
    }

    /// The backend flags of `kleidi serve` in a container on the same network: the TPM by name.
    pub fn kleidi_flags(&self) -> Vec<String> {
        vec![
            "--backend".into(),
            "tpm".into(),
            "--tpm-tcti".into(),
            format!("swtpm:host={},port={COMMAND_PORT}", self.name),
            "--tpm-state-dir".into(),
            self.kleidi_state.path().display().to_string(),
        ]
    }

    /// The fault verbs on the container.
    pub fn handle(&self) -> &ContainerHandle {
        &self.handle
    }

    /// Starts it again after a kill (same NVRAM: a rebooted TPM) and waits until it answers.
    pub async fn start_again(&mut self) -> Result<()> {
        self.handle.start().await?;
        self.tpm.refresh_address().await?;
        self.tpm.wait_ready(READY_LIMIT).await
    }
}
