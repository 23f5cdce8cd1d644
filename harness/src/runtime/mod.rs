//! Starting and stopping the real components a run needs — etcd, a SoftHSM token, OpenBao,
//! `kleidi serve`, a TCP fault proxy — as local processes (or tasks) on 127.0.0.1 with their own
//! temp dirs, or in [`container`]s on the run's own Docker network ([`RuntimeKind`] picks), and the
//! fault verbs on their handles (stop, kill, restart, pause, resume; OpenBao's
//! seal, token and key verbs; the proxy's faults). Everything started is stopped on drop, also on
//! panic. What the components are for (envelope, audit) lives elsewhere.

mod bao_client;
pub mod container;
mod etcd;
mod kleidi;
mod openbao;
mod process;
mod proxy;
mod select;
mod softhsm;
mod swtpm;

pub use bao_client::{BaoClient, BaoResponse};
pub use etcd::{Etcd, EtcdServerTls};
pub use kleidi::{KleidiPlugin, kleidi_bin};
pub use openbao::{KLEIDI_POLICY, OpenBao, OpenBaoSpec, TokenLease};
pub use process::Process;
pub use proxy::{Direction, Fault, FaultProxy, ProxyStats};
pub use select::{RUNTIME_ENV, RuntimeKind};
pub use softhsm::SoftHsmToken;
pub use swtpm::{SharedKek, Swtpm};

/// A free TCP port on 127.0.0.1 (bound and released; the OS does not hand it out again at once).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
