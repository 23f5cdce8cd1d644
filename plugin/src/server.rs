//! The Unix socket kleidi serves on: endpoint parsing (`unix:///path`, a bare path, or
//! `unix:///@name` for a Linux abstract socket, as kubernetes/kms `ParseEndpoint`), stale-socket
//! removal without stealing a live one, permissions, the `:authority` fix on every connection, a
//! bound on concurrent connections and on how long one may idle, and a bounded graceful shutdown
//! that removes the socket. Nothing here knows about keys.

use std::fs::DirBuilder;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{SocketAddr, UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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

/// Bounds on the connections [`Listener::serve`] keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections served at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// A connection that moves no byte either way for this long is closed (gracefully between
    /// frames: see [`AuthorityFix::with_idle_timeout`]).
    pub idle_timeout: Duration,
}

impl Default for ConnLimits {
    /// `kleidi serve`'s defaults (`--max-connections 64 --idle-timeout 5m`).
    fn default() -> Self {
        Self {
            max_connections: 64,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// A bound socket. Dropping it does not remove the file; [`Listener::serve`] does on shutdown.
pub struct Listener {
    inner: UnixListener,
    endpoint: Endpoint,
    /// Inode of the socket file we created, so we never remove somebody else's.
    inode: Option<u64>,
    limits: ConnLimits,
}

impl Listener {
    /// Binds `endpoint`: creates the parent directory (0750), removes a stale socket left by a crash,
    /// refuses one another live process serves, and sets the socket's mode. No other user can
    /// connect before the mode is set: the socket is bound in a fresh private directory beside
    /// the final path, chmod-ed, then renamed into place.
    pub fn bind(endpoint: &Endpoint, mode: u32) -> Result<Self> {
        Self::bind_observed(endpoint, mode, |_| Ok(()))
    }

    /// [`Listener::bind`], calling `bound` with the socket's first path right after bind(2), for
    /// tests to check who could reach it then.
    fn bind_observed(
        endpoint: &Endpoint,
        mode: u32,
        bound: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Self> {
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
                // bind(2) creates the file with the process umask (0777 & ~umask), so it is bound
                // where only this user can reach it: connecting needs search permission on every
                // directory of the path. A umask change would be process-wide, racing other threads.
                let private = PrivateDir::create(path)?;
                let tmp = private.socket();
                let listener = StdUnixListener::bind(&tmp).map_err(|e| io("bind", &tmp, e))?;
                bound(&tmp)?;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| io("chmod", &tmp, e))?;
                // Same directory as `path`'s, so the same filesystem: an atomic rename.
                std::fs::rename(&tmp, path).map_err(|e| io("rename into", path, e))?;
                drop(private);
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
            limits: ConnLimits::default(),
        })
    }

    /// Sets the connection bounds (default: [`ConnLimits::default`]).
    #[must_use]
    pub fn with_limits(self, limits: ConnLimits) -> Self {
        Self { limits, ..self }
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
            limits,
        } = self;
        let ConnLimits {
            max_connections,
            idle_timeout,
        } = limits;
        tracing::info!(
            max_connections,
            idle_timeout = %humantime::format_duration(idle_timeout),
            "connection limits"
        );
        // One permit per connection, released when hyper drops the connection.
        let slots = Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS)));
        let mut refusals = Refusals::default();
        let incoming = UnixListenerStream::new(inner).filter_map(move |conn| match conn {
            Err(e) => Some(Err(e)),
            Ok(stream) => match Arc::clone(&slots).try_acquire_owned() {
                Ok(permit) => Some(Ok(AuthorityFix::with_idle_timeout(
                    Slot {
                        stream,
                        _permit: permit,
                    },
                    idle_timeout,
                ))),
                // Closed at once (dropped): served connections keep their slots and their share
                // of the process, and the client sees a clear end rather than a hang.
                Err(_) => {
                    refusals.note(&stream, max_connections);
                    None
                }
            },
        });
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

/// A fresh directory (0700) beside a socket path, for binding where no other user can connect;
/// removed with anything left in it when dropped.
struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    fn create(socket: &Path) -> Result<Self> {
        let parent = socket.parent().unwrap_or(Path::new("/"));
        let name = socket.file_name().and_then(|n| n.to_str()).unwrap_or("kleidi");
        let mut last = None;
        // A random name, created (never reused) by us: one another user made first is skipped.
        for _ in 0..8 {
            let path = parent.join(format!(
                ".{name}.{}.{:016x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            match DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(Self { path }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(Error::Config(format!("create {}: {e}", path.display()))),
            }
        }
        Err(Error::Config(format!(
            "no private directory for binding in {}: {}",
            parent.display(),
            last.map_or_else(String::new, |e| e.to_string())
        )))
    }
}

impl PrivateDir {
    /// Where the socket is bound.
    fn socket(&self) -> PathBuf {
        self.path.join("kms.sock")
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        // After a failure between bind and rename the socket is still inside.
        let _ = std::fs::remove_file(self.socket());
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// An accepted connection holding one of the `--max-connections` slots until it is dropped.
pub struct Slot {
    stream: UnixStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Slot {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Slot {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Connections refused at the limit, logged at most once per [`Refusals::EVERY`] so a client
/// retrying in a loop cannot flood the log.
#[derive(Default)]
struct Refusals {
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl Refusals {
    const EVERY: Duration = Duration::from_secs(10);

    fn note(&mut self, stream: &UnixStream, max_connections: usize) {
        self.unlogged += 1;
        if self.last_logged.is_some_and(|t| t.elapsed() < Self::EVERY) {
            return;
        }
        // Who is connecting, so an operator can find the client filling the slots.
        let (uid, pid) = stream
            .peer_cred()
            .map_or((None, None), |c| (Some(c.uid()), c.pid()));
        tracing::warn!(
            max_connections,
            refused = self.unlogged,
            peer_uid = ?uid,
            peer_pid = ?pid,
            "connection limit reached; closing new connections (count since the last such line)"
        );
        self.last_logged = Some(Instant::now());
        self.unlogged = 0;
    }
}

impl Connected for AuthorityFix<UnixStream> {
    type ConnectInfo = <UnixStream as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.get_ref().connect_info()
    }
}

impl Connected for AuthorityFix<Slot> {
    type ConnectInfo = <UnixStream as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.get_ref().stream.connect_info()
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

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// Whether a user other than the owner (and outside its group) may connect to the socket at
    /// `path`: it needs search permission on every directory above it and write on the socket.
    fn reachable_by_others(path: &Path) -> bool {
        mode(path) & 0o002 != 0 && path.ancestors().skip(1).all(|dir| mode(dir) & 0o001 != 0)
    }

    /// Connects to `path` as user nobody, when this test runs as root and can switch users:
    /// `Some(true)` if the connection was accepted.
    fn nobody_connects(path: &Path) -> Option<bool> {
        let root = std::fs::metadata("/proc/self").ok()?.uid() == 0;
        if !root || !Path::new("/usr/bin/setpriv").exists() || !Path::new("/usr/bin/python3").exists() {
            return None;
        }
        let script = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect(sys.argv[1]); print('connected')\nexcept PermissionError:\n print('denied')\n";
        let out = std::process::Command::new("/usr/bin/setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
                script,
            ])
            .arg(path)
            .output()
            .ok()?;
        match String::from_utf8_lossy(&out.stdout).trim() {
            "connected" => Some(true),
            "denied" => Some(false),
            other => panic!(
                "probe as nobody: {other:?} {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// Between bind(2) and chmod the socket has the umask's mode (0777 with a umask of 0,
    /// simulated here by widening it at that moment), in a directory others may enter. It must
    /// still be out of their reach then, and nothing but the socket must be left afterwards.
    #[tokio::test]
    async fn the_socket_is_out_of_others_reach_until_its_mode_is_set() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let shared = dir.path().join("run");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let path = shared.join("kms.sock");
        let mut seen = None;
        let listener = Listener::bind_observed(&Endpoint::Path(path.clone()), 0o600, |tmp| {
            std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o777)).unwrap();
            seen = Some((tmp.to_owned(), reachable_by_others(tmp), nobody_connects(tmp)));
            Ok(())
        })
        .unwrap();
        let (tmp, reachable, nobody) = seen.unwrap();
        assert!(
            !reachable,
            "{} was reachable by others before its chmod",
            tmp.display()
        );
        assert_ne!(nobody, Some(true), "user nobody connected to {}", tmp.display());
        assert_eq!(
            tmp.parent().and_then(Path::parent),
            Some(shared.as_path()),
            "beside the socket"
        );
        assert_eq!(mode(&path), 0o600);
        let left: Vec<_> = std::fs::read_dir(&shared)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["kms.sock"], "the private directory is removed");
        drop(listener);

        // A failure after bind leaves nothing behind either.
        std::fs::remove_file(&path).unwrap();
        let err = Listener::bind_observed(&Endpoint::Path(path.clone()), 0o600, |_| {
            Err(Error::Config("stop here".into()))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0);
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
