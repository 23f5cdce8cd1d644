//! The Unix socket kleidi serves on: endpoint parsing (`unix:///path`, a bare path, or
//! `unix:///@name` for a Linux abstract socket, as kubernetes/kms `ParseEndpoint`), stale-socket
//! removal without stealing a live one, permissions, the `:authority` fix on every connection, and a
//! bounded graceful shutdown that removes the socket. Nothing here knows about keys.

use std::fs::DirBuilder;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{SocketAddr, UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::{Connected, Router};

use crate::authority::AuthorityFix;
use crate::{Error, Result};

/// Where to listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A socket file.
    Path(PathBuf),
    /// A Linux abstract socket (no file; any process in the network namespace may connect).
    Abstract(String),
}

impl FromStr for Endpoint {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let path = match s.strip_prefix("unix://") {
            Some(rest) => rest,
            None if s.starts_with('/') => s,
            None => {
                return Err(Error::Config(format!(
                    "listen endpoint {s:?} must be unix:///path/to/socket or an absolute path"
                )));
            }
        };
        if let Some(name) = path.strip_prefix("/@") {
            if name.is_empty() {
                return Err(Error::Config("abstract socket name is empty".into()));
            }
            return Ok(Endpoint::Abstract(name.into()));
        }
        if !path.starts_with('/') || path.len() < 2 {
            return Err(Error::Config(format!(
                "listen endpoint {s:?} needs an absolute socket path"
            )));
        }
        Ok(Endpoint::Path(PathBuf::from(path)))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Path(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Abstract(n) => write!(f, "unix:///@{n}"),
        }
    }
}

/// A bound socket. Dropping it does not remove the file; [`Listener::serve`] does on shutdown.
pub struct Listener {
    inner: UnixListener,
    endpoint: Endpoint,
    /// Inode of the socket file we created, so we never remove somebody else's.
    inode: Option<u64>,
}

impl Listener {
    /// Binds `endpoint`: creates the parent directory (0750), removes a stale socket left by a crash,
    /// refuses one another live process serves, and sets the socket's mode (no window where it is
    /// wider: it is bound under a temporary name, chmod-ed, then renamed into place).
    pub fn bind(endpoint: &Endpoint, mode: u32) -> Result<Self> {
        let io = |what: &str, path: &Path, e: std::io::Error| {
            Error::Config(format!("{what} {}: {e}", path.display()))
        };
        let std_listener = match endpoint {
            Endpoint::Abstract(name) => {
                let addr = SocketAddr::from_abstract_name(name.as_bytes())
                    .map_err(|e| Error::Config(format!("abstract socket @{name}: {e}")))?;
                tracing::warn!(
                    name,
                    "abstract socket: file permissions do not apply; any process in this network namespace can connect"
                );
                StdUnixListener::bind_addr(&addr).map_err(|e| Error::Config(format!("bind @{name}: {e}")))?
            }
            Endpoint::Path(path) => {
                if let Some(parent) = path.parent() {
                    DirBuilder::new()
                        .recursive(true)
                        .mode(0o750)
                        .create(parent)
                        .map_err(|e| io("create", parent, e))?;
                }
                remove_if_stale(path)?;
                let tmp = path.with_file_name(format!(
                    ".{}.{}.tmp",
                    path.file_name().and_then(|n| n.to_str()).unwrap_or("kleidi"),
                    std::process::id()
                ));
                let _ = std::fs::remove_file(&tmp);
                let listener = StdUnixListener::bind(&tmp).map_err(|e| io("bind", &tmp, e))?;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| io("chmod", &tmp, e))?;
                std::fs::rename(&tmp, path).map_err(|e| io("rename into", path, e))?;
                listener
            }
        };
        std_listener
            .set_nonblocking(true)
            .map_err(|e| Error::Config(format!("socket: {e}")))?;
        let inner =
            UnixListener::from_std(std_listener).map_err(|e| Error::Config(format!("socket: {e}")))?;
        let inode = match endpoint {
            Endpoint::Path(p) => std::fs::metadata(p).ok().map(|m| m.ino()),
            Endpoint::Abstract(_) => None,
        };
        tracing::info!(%endpoint, mode = format!("{mode:o}"), "listening");
        Ok(Self {
            inner,
            endpoint: endpoint.clone(),
            inode,
        })
    }

    /// Serves `router` until `shutdown` resolves, then lets in-flight calls finish for at most
    /// `grace` and removes the socket file.
    pub async fn serve(
        self,
        router: Router,
        shutdown: impl Future<Output = ()>,
        grace: Duration,
    ) -> Result<()> {
        let Listener {
            inner,
            endpoint,
            inode,
        } = self;
        let incoming = UnixListenerStream::new(inner).map(|conn| conn.map(AuthorityFix::new));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = router.serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        });
        tokio::pin!(server);
        let result = tokio::select! {
            r = &mut server => r.map_err(|e| Error::Config(format!("server: {e}"))),
            () = shutdown => {
                tracing::info!(grace_ms = grace.as_millis(), "shutting down; letting in-flight calls finish");
                let _ = stop_tx.send(());
                match tokio::time::timeout(grace, &mut server).await {
                    Ok(r) => r.map_err(|e| Error::Config(format!("server: {e}"))),
                    Err(_) => {
                        tracing::warn!("in-flight calls did not finish within the grace period; closing");
                        Ok(())
                    }
                }
            }
        };
        if let (Endpoint::Path(path), Some(ino)) = (&endpoint, inode) {
            // Only our own socket: never remove one a successor bound meanwhile.
            if std::fs::metadata(path).is_ok_and(|m| m.ino() == ino) {
                let _ = std::fs::remove_file(path);
            }
        }
        tracing::info!(%endpoint, "stopped");
        result
    }
}

/// Removes `path` if it is a socket nobody serves; refuses a live socket or a non-socket file.
fn remove_if_stale(path: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(Error::Config(format!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        )));
    }
    match StdUnixStream::connect(path) {
        Ok(_) => Err(Error::Config(format!(
            "another process is serving {}; refusing to take its socket",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing stale socket left by a previous run");
            std::fs::remove_file(path)
                .map_err(|e| Error::Config(format!("remove stale {}: {e}", path.display())))
        }
        Err(e) => Err(Error::Config(format!(
            "cannot tell whether {} is in use: {e}",
            path.display()
        ))),
    }
}

impl Connected for AuthorityFix<UnixStream> {
    type ConnectInfo = <UnixStream as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.get_ref().connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_like_kubernetes_parse_endpoint() {
        assert_eq!(
            "unix:///run/kleidi/kms.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Path("/run/kleidi/kms.sock".into())
        );
        assert_eq!(
            "/tmp/k.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Path("/tmp/k.sock".into())
        );
        assert_eq!(
            "unix:///@kleidi".parse::<Endpoint>().unwrap(),
            Endpoint::Abstract("kleidi".into())
        );
        for bad in [
            "tcp://127.0.0.1:1",
            "unix://relative",
            "kms.sock",
            "unix:///",
            "unix:///@",
            "",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn bind_replaces_a_stale_socket_but_refuses_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/kms.sock");
        let ep = Endpoint::Path(path.clone());
        let live = Listener::bind(&ep, 0o600).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let err = Listener::bind(&ep, 0o600).err().unwrap();
        assert!(err.to_string().contains("another process is serving"), "{err}");
        drop(live); // the file stays behind, as after a crash
        assert!(path.exists());
        let again = Listener::bind(&ep, 0o660).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o660
        );
        drop(again);
    }

    #[test]
    fn bind_refuses_to_replace_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.sock");
        std::fs::write(&path, b"data").unwrap();
        assert!(Listener::bind(&Endpoint::Path(path.clone()), 0o600).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }
}
