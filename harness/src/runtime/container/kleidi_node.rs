//! One control-plane node's plugin as a container: `kleidi serve` in the `kleidi` image, its socket
//! directory bind-mounted from the host (where the harness plays kube-apiserver), as a static pod
//! shares it. The run's own `kleidi` binary is mounted over the image's, so a scenario tests the code
//! it was built from, not whatever the image was last built with; the image gives the runtime (libc,
//! tpm2-tss and its TCTI modules; SoftHSM in the `-softhsm` image the pkcs11 backend runs in). Backend state the host prepared (a SoftHSM token, a token file) is mounted
//! at the same path it has on the host, so the flags are the process runtime's.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use testcontainers::core::{AccessMode, Mount};
use testcontainers::runners::AsyncRunner as _;
use testcontainers::{ContainerAsync, ImageExt as _};

use super::{ContainerHandle, RUN_LABEL};
use crate::images::kleidi::SOCKET_DIR;
use crate::images::{KleidiImage, READY_LIMIT};

/// How `kleidi serve` runs in a node's container.
#[derive(Clone, Debug)]
pub struct KleidiNodeSpec {
    /// The harness network.
    pub network: String,
    /// The container's name there.
    pub name: String,
    /// The `kleidi` binary mounted over the image's.
    pub kleidi: PathBuf,
    /// The host directory the socket (`kms.sock`) appears in.
    pub socket_dir: PathBuf,
    /// `kleidi serve` flags after `--listen`.
    pub args: Vec<String>,
    /// Environment for `kleidi serve`.
    pub env: Vec<(String, String)>,
    /// Host paths mounted at the same path (read-write: SoftHSM writes its token files).
    pub mounts: Vec<PathBuf>,
}

/// A node's plugin container; removed on drop.
pub struct KleidiNode {
    container: ContainerAsync<KleidiImage>,
    handle: ContainerHandle,
    socket: PathBuf,
}

impl KleidiNode {
    /// Starts the container and waits until its socket accepts connections (not for a healthy
    /// Status: a node may start while its backend is down, as in the process runtime).
    pub async fn start(spec: &KleidiNodeSpec) -> Result<Self> {
        let args: Vec<&str> = spec.args.iter().map(String::as_str).collect();
        let mut image = KleidiImage::default().with_backend_args(&args);
        for (key, value) in &spec.env {
            image = image.with_env(key, value);
        }
        let binary = spec
            .kleidi
            .canonicalize()
            .with_context(|| spec.kleidi.display().to_string())?;
        // kleidi runs as the host user that made the files it is given (socket directory, PIN and
        // token files), as root when the harness is root: kleidi refuses credential files owned by
        // another user than its own or root, and the harness must reach the 0600 socket it creates.
        let owner =
            std::fs::metadata(&spec.socket_dir).with_context(|| spec.socket_dir.display().to_string())?;
        let mut request = image
            .with_user(format!("{}:{}", owner.uid(), owner.gid()))
            .with_network(spec.network.clone())
            .with_container_name(spec.name.clone())
            .with_label(RUN_LABEL, spec.network.clone())
            .with_mount(Mount::bind_mount(
                spec.socket_dir.display().to_string(),
                SOCKET_DIR,
            ))
            .with_mount(
                Mount::bind_mount(binary.display().to_string(), "/usr/local/bin/kleidi")
                    .with_access_mode(AccessMode::ReadOnly),
            );
        for path in &spec.mounts {
            let path = path.display().to_string();
            request = request.with_mount(Mount::bind_mount(path.clone(), path));
        }
        let container = request
            .start()
            .await
            .with_context(|| format!("starting {} (images built? `just images`)", spec.name))?;
        let handle = ContainerHandle::new(container.id(), &spec.name)?;
        let node = KleidiNode {
            container,
            handle,
            socket: spec.socket_dir.join("kms.sock"),
        };
        node.wait_listening(READY_LIMIT).await?;
        Ok(node)
    }

    /// The socket on the host.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The fault verbs.
    pub fn handle(&self) -> &ContainerHandle {
        &self.handle
    }

    /// Starts the stopped container again and waits until it listens.
    pub async fn restart(&self) -> Result<()> {
        self.handle.start().await?;
        self.wait_listening(READY_LIMIT).await
    }

    /// Waits until the socket accepts a connection (a stale socket file from a killed run refuses).
    pub async fn wait_listening(&self, limit: Duration) -> Result<()> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if tokio::net::UnixStream::connect(&self.socket).await.is_ok() {
                return Ok(());
            }
            if !self.handle.is_running().await.unwrap_or(true) {
                let logs = self.handle.logs().await.unwrap_or_default();
                bail!(
                    "{} exited before listening: {}",
                    self.handle.name(),
                    String::from_utf8_lossy(&logs)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("{} did not listen within {limit:?}", self.handle.name())
    }

    /// The container's id.
    pub fn id(&self) -> &str {
        self.container.id()
    }
}
