//! kleidi in a container (`kleidi:<version>` and `kleidi:<version>-softhsm`, `just image`): `kleidi
//! serve` on `/run/kleidi/kms.sock`, that directory bind-mounted from the host as a static pod
//! shares it with kube-apiserver. The images hold no shell: the container's command is kleidi's own
//! argv. The default backend is a fresh SoftHSM token (`kleidi pkcs11 init` on the host, random
//! PINs, mounted at its host path) served from the `-softhsm` image;
//! [`KleidiImage::with_backend_args`] serves another backend instead, from the plain image unless
//! it is pkcs11. Ready when Status over the shared socket answers `ok`.

use std::borrow::Cow;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use testcontainers::core::{Mount, WaitFor};
use testcontainers::{ContainerAsync, ContainerRequest, Image, ImageExt as _};

use super::{READY_LIMIT, poll, start_on_network};
use crate::apiserver::kms::{KmsClient as _, StatusResponse};
use crate::apiserver::{Authority, connect_unix};
use crate::runtime::{SoftHsmToken, kleidi_bin};

/// The image `fixtures/images/build.sh` builds.
pub const NAME: &str = "kleidi";
/// Its tag: the workspace version, as the manifests name it. No SoftHSM in it.
pub const TAG: &str = env!("CARGO_PKG_VERSION");
/// The variant with the SoftHSM module, for the pkcs11 backend with a development token.
pub const SOFTHSM_TAG: &str = concat!(env!("CARGO_PKG_VERSION"), "-softhsm");
/// The socket directory inside the container.
pub const SOCKET_DIR: &str = "/run/kleidi";

/// `kleidi serve` on the shared socket directory.
#[derive(Clone, Debug)]
pub struct KleidiImage {
    socket_dir: Option<PathBuf>,
    tag: &'static str,
    /// `kleidi serve --listen unix:///run/kleidi/kms.sock` and the backend flags.
    cmd: Vec<String>,
    env: Vec<(String, String)>,
    /// The default: `KleidiContainer::start` makes a SoftHSM token and serves it.
    own_token: bool,
}

impl Default for KleidiImage {
    /// The pkcs11 backend on a fresh SoftHSM token (label `kleidi`, key `kleidi-kek`).
    fn default() -> Self {
        KleidiImage {
            socket_dir: None,
            tag: SOFTHSM_TAG,
            cmd: serve(&[]),
            env: Vec::new(),
            own_token: true,
        }
    }
}

/// kleidi's argv for `serve` on the shared socket with `args` after `--listen`.
fn serve(args: &[&str]) -> Vec<String> {
    let listen = format!("unix://{SOCKET_DIR}/kms.sock");
    ["serve", "--listen", &listen]
        .into_iter()
        .chain(args.iter().copied())
        .map(str::to_owned)
        .collect()
}

impl KleidiImage {
    /// The host directory holding the socket (default: a temp dir the started container owns).
    pub fn with_socket_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.socket_dir = Some(dir.into());
        self
    }

    /// `kleidi serve`'s backend flags (`--backend vault --vault-addr …`) instead of the SoftHSM
    /// token, which is then not created. Only `--backend pkcs11` needs the `-softhsm` image.
    pub fn with_backend_args(mut self, args: &[&str]) -> Self {
        let pkcs11 =
            args.windows(2).any(|w| w == ["--backend", "pkcs11"]) || args.contains(&"--backend=pkcs11");
        self.tag = if pkcs11 { SOFTHSM_TAG } else { TAG };
        self.cmd = serve(args);
        self.own_token = false;
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
        self.tag
    }

    fn ready_conditions(&self) -> Vec<WaitFor> {
        // KleidiContainer::start asks Status over the socket.
        vec![WaitFor::Nothing]
    }

    fn cmd(&self) -> impl IntoIterator<Item = impl Into<Cow<'_, str>>> {
        self.cmd.iter().map(String::as_str)
    }

    fn env_vars(&self) -> impl IntoIterator<Item = (impl Into<Cow<'_, str>>, impl Into<Cow<'_, str>>)> {
        self.env.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// A started kleidi whose Status answered `ok` on the shared socket; removed on drop.
pub struct KleidiContainer {
    // Dropped first: the container goes before its socket directory and its token.
    container: ContainerAsync<KleidiImage>,
    socket: PathBuf,
    _own_dir: Option<tempfile::TempDir>,
    _token: Option<SoftHsmToken>,
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
        let mut request = request.with_mount(Mount::bind_mount(dir.display().to_string(), SOCKET_DIR));
        let mut token = None;
        if request.image().own_token {
            // Made on the host by the run's kleidi, mounted at the same path; served as the user
            // that owns its PIN files (kleidi refuses PIN files of another user but root).
            let made = SoftHsmToken::create(&kleidi_bin()?, "kleidi", "kleidi-kek")?;
            let owner = std::fs::metadata(made.dir())?;
            let flags = made.flags("kleidi-kek");
            let args: Vec<&str> = ["--backend", "pkcs11"]
                .into_iter()
                .chain(flags.iter().map(String::as_str))
                .collect();
            let host_dir = made.dir().display().to_string();
            request = request
                .with_cmd(serve(&args))
                .with_env_var("SOFTHSM2_CONF", made.conf().display().to_string())
                .with_mount(Mount::bind_mount(host_dir.clone(), host_dir))
                .with_user(format!("{}:{}", owner.uid(), owner.gid()));
            token = Some(made);
        }
        let (container, _) = start_on_network(request).await?;
        let kleidi = KleidiContainer {
            container,
            socket: dir.join("kms.sock"),
            _own_dir: own_dir,
            _token: token,
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
