//! kleidi in a container (`kleidi:<version>`, `just image`): `kleidi serve` on
//! `/run/kleidi/kms.sock`, that directory bind-mounted from the host as a static pod shares it with
//! kube-apiserver. The default backend is a SoftHSM token the container creates itself (`kleidi
//! pkcs11 init`, random PINs); [`KleidiImage::with_backend_args`] serves another backend instead.
//! Ready when Status over the shared socket answers `ok`.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use testcontainers::core::{Mount, WaitFor};
use testcontainers::{ContainerAsync, ContainerRequest, Image, ImageExt as _};

use super::{READY_LIMIT, poll, start_on_network};
use crate::apiserver::kms::{KmsClient as _, StatusResponse};
use crate::apiserver::{Authority, connect_unix};

/// The image `fixtures/images/build.sh` builds.
pub const NAME: &str = "kleidi";
/// Its tag: the workspace version, as the static pod names it.
pub const TAG: &str = env!("CARGO_PKG_VERSION");
/// The socket directory inside the container.
pub const SOCKET_DIR: &str = "/run/kleidi";

/// The SoftHSM token set-up, then `kleidi serve` with `$KLEIDI_BACKEND_ARGS`.
/// `umask 077` before the PIN files: kleidi refuses PIN files other users can read.
const PKCS11_INIT: &str = "mkdir -p /etc/kleidi /var/lib/softhsm/tokens && printf '%s\\n' \"$SOFTHSM_CONF\" >/etc/kleidi/softhsm2.conf \
    && umask 077 && printf '%s\\n' \"$PIN\" >/etc/kleidi/pkcs11-pin && printf '%s\\n' \"$SO_PIN\" >/etc/kleidi/pkcs11-so-pin \
    && /usr/local/bin/kleidi pkcs11 init --pkcs11-pin-file /etc/kleidi/pkcs11-pin --pkcs11-so-pin-file /etc/kleidi/pkcs11-so-pin && ";

/// `kleidi serve` on the shared socket directory.
#[derive(Clone, Debug)]
pub struct KleidiImage {
    socket_dir: Option<PathBuf>,
    script: String,
    env: Vec<(String, String)>,
}

impl Default for KleidiImage {
    /// The pkcs11 backend on a fresh SoftHSM token (label `kleidi`, key `kleidi-kek`).
    fn default() -> Self {
        // A throwaway development token's PINs; they live in this container only.
        let pin = || uuid::Uuid::new_v4().simple().to_string();
        KleidiImage {
            socket_dir: None,
            script: format!(
                "{PKCS11_INIT}exec /usr/local/bin/kleidi serve --listen unix://{SOCKET_DIR}/kms.sock $KLEIDI_BACKEND_ARGS"
            ),
            env: vec![
                (
                    "SOFTHSM_CONF".into(),
                    include_str!("../../../fixtures/softhsm/softhsm2.conf")
                        .trim()
                        .into(),
                ),
                ("PIN".into(), pin()),
                ("SO_PIN".into(), pin()),
                (
                    "KLEIDI_BACKEND_ARGS".into(),
                    "--backend pkcs11 --pkcs11-pin-file /etc/kleidi/pkcs11-pin".into(),
                ),
            ],
        }
    }
}

impl KleidiImage {
    /// The host directory holding the socket (default: a temp dir the started container owns).
    pub fn with_socket_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.socket_dir = Some(dir.into());
        self
    }

    /// `kleidi serve`'s backend flags (`--backend vault --vault-addr …`) instead of the SoftHSM
    /// token, which is then not created. Split on whitespace: no argument may contain any.
    pub fn with_backend_args(mut self, args: &[&str]) -> Self {
        self.script = format!(
            "exec /usr/local/bin/kleidi serve --listen unix://{SOCKET_DIR}/kms.sock $KLEIDI_BACKEND_ARGS"
        );
        self.env.retain(|(k, _)| k != "KLEIDI_BACKEND_ARGS");
        self.env.push(("KLEIDI_BACKEND_ARGS".into(), args.join(" ")));
        self
    }

    /// One more environment variable for `kleidi serve` (`SOFTHSM2_CONF`, `TSS2_LOG`, …).
    pub fn with_env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
        self
    }
}

impl Image for KleidiImage {
    fn name(&self) -> &str {
        NAME
    }

    fn tag(&self) -> &str {
        TAG
    }

    fn ready_conditions(&self) -> Vec<WaitFor> {
        // KleidiContainer::start asks Status over the socket.
        vec![WaitFor::Nothing]
    }

    fn entrypoint(&self) -> Option<&str> {
        Some("/bin/sh")
    }

    fn cmd(&self) -> impl IntoIterator<Item = impl Into<Cow<'_, str>>> {
        ["-c", self.script.as_str()]
    }

    fn env_vars(&self) -> impl IntoIterator<Item = (impl Into<Cow<'_, str>>, impl Into<Cow<'_, str>>)> {
        self.env.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// A started kleidi whose Status answered `ok` on the shared socket; removed on drop.
pub struct KleidiContainer {
    // Dropped first: the container goes before its socket directory.
    container: ContainerAsync<KleidiImage>,
    socket: PathBuf,
    _own_dir: Option<tempfile::TempDir>,
}

impl KleidiContainer {
    /// Starts `request` (a [`KleidiImage`] `.with_network(…)`) with the socket directory mounted
    /// and waits until Status answers `ok`.
    pub async fn start(request: impl Into<ContainerRequest<KleidiImage>>) -> Result<Self> {
        let request = request.into();
        let (dir, own_dir) = match request.image().socket_dir.clone() {
            Some(dir) => (dir, None),
            None => {
                let own = tempfile::Builder::new().prefix("kleidi-socket-").tempdir()?;
                (own.path().to_path_buf(), Some(own))
            }
        };
        let request = request.with_mount(Mount::bind_mount(dir.display().to_string(), SOCKET_DIR));
        let (container, _) = start_on_network(request).await?;
        let kleidi = KleidiContainer {
            container,
            socket: dir.join("kms.sock"),
            _own_dir: own_dir,
        };
        kleidi.wait_ready(READY_LIMIT).await?;
        Ok(kleidi)
    }

    /// The socket on the host, as kube-apiserver sees it.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Waits up to `limit` for Status over the socket to answer `ok`; its answer.
    pub async fn wait_ready(&self, limit: Duration) -> Result<StatusResponse> {
        poll("kleidi", limit, || async {
            let status = connect_unix(&self.socket, Authority::Localhost)
                .await?
                .status()
                .await?;
            if status.healthz != "ok" {
                bail!("Status healthz {:?}", status.healthz);
            }
            Ok(status)
        })
        .await
    }

    /// The container, for its verbs (stop, start, pause, unpause) and logs.
    pub fn container(&self) -> &ContainerAsync<KleidiImage> {
        &self.container
    }
}
