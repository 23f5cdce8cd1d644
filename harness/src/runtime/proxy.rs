//! A TCP fault proxy of the harness's own, put between a plugin and its backend (OpenBao): it
//! listens on 127.0.0.1 (or a harness network's gateway), forwards each connection to one target, and applies the [`Fault`] set on
//! its handle at that moment — to connections already open as well as new ones. It counts
//! connections and bytes, and stops (closing every connection) when the handle drops.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Bound on connecting to the target; a target that does not accept by then is treated as down.
const CONNECT_LIMIT: Duration = Duration::from_secs(5);

/// Which way bytes flow through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to target: requests.
    ToServer,
    /// Target to client: answers.
    ToClient,
    /// Each way, counted and delayed separately.
    Both,
}

impl Direction {
    fn includes(self, way: Direction) -> bool {
        self == Direction::Both || self == way
    }
}

/// What the proxy does to traffic; switch with [`FaultProxy::set`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything as it comes.
    Pass,
    /// Hold each chunk read `delay` before forwarding it, in `direction`: a request and its answer
    /// with [`Direction::Both`] take at least 2 × `delay` longer.
    Latency {
        /// Added to each chunk.
        delay: Duration,
        /// Which way it applies.
        direction: Direction,
    },
    /// Accept and read, but forward and answer nothing, as a partitioned network. An open
    /// connection that lost bytes to it stays a black hole until its client closes it (a stream
    /// with a hole in it is of no use to anyone); new connections after [`Fault::Pass`] work.
    Blackhole,
    /// Close every connection, open or new, with a TCP reset (SO_LINGER 0): callers fail at once.
    Reset,
    /// Close a connection (both sides) once `bytes` were forwarded on it in `direction`, counted
    /// per direction. With [`Direction::ToClient`] the request arrives whole and is acted upon,
    /// but the caller never sees the whole answer: the outcome is unknown to it.
    CloseAfter {
        /// Bytes let through before the cut.
        bytes: u64,
        /// Which way is counted.
        direction: Direction,
    },
}

/// What the proxy has seen since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted.
    pub connections: u64,
    /// Connections open now.
    pub active: u64,
    /// Bytes forwarded to the target.
    pub bytes_to_server: u64,
    /// Bytes forwarded to clients.
    pub bytes_to_client: u64,
    /// Bytes read and dropped by [`Fault::Blackhole`].
    pub bytes_swallowed: u64,
}

struct Shared {
    fault: watch::Sender<Fault>,
    connections: AtomicU64,
    active: AtomicU64,
    to_server: AtomicU64,
    to_client: AtomicU64,
    swallowed: AtomicU64,
}

/// A running proxy; stops on drop.
pub struct FaultProxy {
    addr: SocketAddr,
    target: Arc<watch::Sender<SocketAddr>>,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("target", &*self.target.borrow())
            .field("fault", &self.fault())
            .finish_non_exhaustive()
    }
}

impl FaultProxy {
    /// Listens on a free 127.0.0.1 port and forwards to `target`, passing everything.
    pub async fn start(target: SocketAddr) -> Result<Self> {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST.into(), target).await
    }

    /// Listens on a free port of `ip` — 127.0.0.1, or the gateway address of the harness's own
    /// Docker network, where containers on it reach the host — and forwards to `target`.
    pub async fn start_on(ip: std::net::IpAddr, target: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            fault: watch::Sender::new(Fault::Pass),
            connections: AtomicU64::new(0),
            active: AtomicU64::new(0),
            to_server: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
            swallowed: AtomicU64::new(0),
        });
        let target = Arc::new(watch::Sender::new(target));
        let task = tokio::spawn(accept(listener, target.clone(), shared.clone()));
        Ok(FaultProxy {
            addr,
            target,
            shared,
            task,
        })
    }

    /// Forwards new connections to `target` from now on (a restarted container's new address).
    pub fn set_target(&self, target: SocketAddr) {
        self.target.send_replace(target);
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for a client that takes a URL (`--vault-addr`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switches the fault, for open connections (from their next chunk) and new ones.
    pub fn set(&self, fault: Fault) {
        self.shared.fault.send_replace(fault);
    }

    /// The fault in force.
    pub fn fault(&self) -> Fault {
        *self.shared.fault.borrow()
    }

    /// Counters since start.
    pub fn stats(&self) -> ProxyStats {
        let s = &self.shared;
        ProxyStats {
            connections: s.connections.load(Ordering::Relaxed),
            active: s.active.load(Ordering::Relaxed),
            bytes_to_server: s.to_server.load(Ordering::Relaxed),
            bytes_to_client: s.to_client.load(Ordering::Relaxed),
            bytes_swallowed: s.swallowed.load(Ordering::Relaxed),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The accept task owns the listener and the JoinSet of connections: aborting it drops all.
        self.task.abort();
    }
}

/// Accepts until the handle drops; each connection gets a task in `connections`.
async fn accept(listener: TcpListener, target: Arc<watch::Sender<SocketAddr>>, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else {
                    // Out of descriptors or the like: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                shared.connections.fetch_add(1, Ordering::Relaxed);
                match *shared.fault.borrow() {
                    Fault::Reset => {
                        let _ = client.set_zero_linger();
                        continue;
                    }
                    Fault::Blackhole => connections.spawn(swallow(client, shared.clone())),
                    _ => connections.spawn(relay(client, *target.borrow(), shared.clone())),
                };
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Counts a connection as open while it lives, also when its task is aborted.
struct Open(Arc<Shared>);

impl Open {
    fn new(shared: Arc<Shared>) -> Self {
        shared.active.fetch_add(1, Ordering::Relaxed);
        Open(shared)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection accepted during a blackhole: read and dropped until the client gives up, or reset.
async fn swallow(mut client: TcpStream, shared: Arc<Shared>) {
    let _open = Open::new(shared.clone());
    let mut reset = shared.fault.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            read = client.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    shared.swallowed.fetch_add(n as u64, Ordering::Relaxed);
                }
            },
            _ = reset.wait_for(|f| *f == Fault::Reset) => {
                let _ = client.set_zero_linger();
                return;
            }
        }
    }
}

/// How one direction of a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The sender closed its side; the close was forwarded.
    Eof,
    /// [`Fault::CloseAfter`] reached its count.
    Cut,
    /// A read or write failed, or a blackholed client left.
    Broken,
    /// [`Fault::Reset`] was set.
    Reset,
}

/// Forwards one connection both ways until both sides closed, or a fault ends it.
async fn relay(mut client: TcpStream, target: SocketAddr, shared: Arc<Shared>) {
    let _open = Open::new(shared.clone());
    let mut upstream = match tokio::time::timeout(CONNECT_LIMIT, TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        // As a refused connection looks to the client.
        _ => {
            let _ = client.set_zero_linger();
            return;
        }
    };
    let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
    let mut faults = shared.fault.subscribe();
    let poisoned = AtomicBool::new(false);
    let end = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let mut to_server = pin!(pump(
            client_read,
            upstream_write,
            Direction::ToServer,
            &shared,
            &poisoned
        ));
        let mut to_client = pin!(pump(
            upstream_read,
            client_write,
            Direction::ToClient,
            &shared,
            &poisoned
        ));
        let mut reset = pin!(faults.wait_for(|f| *f == Fault::Reset));
        let (mut server_done, mut client_done) = (false, false);
        loop {
            let end = tokio::select! {
                end = &mut to_server, if !server_done => { server_done = true; end }
                end = &mut to_client, if !client_done => { client_done = true; end }
                _ = &mut reset => End::Reset,
            };
            // One side closing is a half-close to pass on; anything else ends the connection.
            if end != End::Eof || (server_done && client_done) {
                break end;
            }
        }
    };
    if end == End::Reset {
        let _ = (client.set_zero_linger(), upstream.set_zero_linger());
    }
}

/// Copies `from` to `to`, applying the fault in force to each chunk.
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    way: Direction,
    shared: &Shared,
    poisoned: &AtomicBool,
) -> End {
    let counter = match way {
        Direction::ToServer => &shared.to_server,
        _ => &shared.to_client,
    };
    let mut buf = vec![0u8; 16 * 1024];
    let mut forwarded: u64 = 0;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) if poisoned.load(Ordering::Relaxed) => return End::Broken,
            Ok(0) => {
                let _ = to.shutdown().await;
                return End::Eof;
            }
            Ok(n) => n,
            Err(_) => return End::Broken,
        };
        let fault = *shared.fault.borrow();
        if fault == Fault::Blackhole {
            poisoned.store(true, Ordering::Relaxed);
        }
        if poisoned.load(Ordering::Relaxed) {
            shared.swallowed.fetch_add(n as u64, Ordering::Relaxed);
            continue;
        }
        let mut chunk = buf.get(..n).unwrap_or_default();
        let mut cut = false;
        match fault {
            Fault::Latency { delay, direction } if direction.includes(way) => {
                tokio::time::sleep(delay).await;
            }
            Fault::CloseAfter { bytes, direction } if direction.includes(way) => {
                let room = usize::try_from(bytes.saturating_sub(forwarded)).unwrap_or(usize::MAX);
                if room <= chunk.len() {
                    chunk = chunk.get(..room).unwrap_or_default();
                    cut = true;
                }
            }
            _ => {}
        }
        if to.write_all(chunk).await.is_err() {
            return End::Broken;
        }
        forwarded += chunk.len() as u64;
        counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        if cut {
            return End::Cut;
        }
    }
}
