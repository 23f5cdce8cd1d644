//! Starting and stopping the real components a run needs — etcd, a SoftHSM token, OpenBao, moto (AWS KMS),
//! `kleidi serve`, a TCP fault proxy — as local processes (or tasks) on 127.0.0.1 with their own
//! temp dirs, or in [`container`]s on the run's own Docker network ([`RuntimeKind`] picks), and the
//! fault verbs on their handles (stop, kill, restart, pause, resume; OpenBao's
//! seal, token and key verbs; the proxy's faults). Everything started is stopped on drop, also on
//! panic. What the components are for (envelope, audit) lives elsewhere.

mod bao_client;
pub mod container;
mod etcd;
mod kleidi;
mod moto;
mod openbao;
mod process;
mod proxy;
mod select;
mod softhsm;
mod swtpm;

pub use bao_client::{BaoClient, BaoResponse};
pub use etcd::{Etcd, EtcdServerTls};
pub use kleidi::{AWS_KMS_BIN_MISSING, KleidiPlugin, kleidi_aws_kms_bin, kleidi_bin};
pub use moto::Moto;
pub use openbao::{KLEIDI_POLICY, OpenBao, OpenBaoSpec, TokenLease};
pub use process::Process;
pub use proxy::{Direction, Fault, FaultProxy, ProxyStats};
pub use select::{RUNTIME_ENV, RuntimeKind};
pub use softhsm::SoftHsmToken;
pub use swtpm::{SharedKek, Swtpm, TpmAccess};

/// Ports handed to servers that bind them later (etcd, OpenBao, swtpm): below Linux's ephemeral
/// range (32768–60999), which the OS draws from for every `:0` bind — a fault proxy's, a client's —
/// so a port released here is never given to someone else before its server binds it. (Seen on CI:
/// a proxy took OpenBao's port meanwhile, and a test paused one server while another answered.)
const HANDED_OUT: std::ops::Range<u16> = 20_000..32_000;

/// A free TCP port on 127.0.0.1 for a server to bind: drawn at random from [`HANDED_OUT`] and
/// checked bindable. Bounded: 1,000 draws.
pub fn free_port() -> std::io::Result<u16> {
    use rand::Rng as _;
    let mut rng = rand::rng();
    for _ in 0..1_000 {
        let port = rng.random_range(HANDED_OUT);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free port in 20000..32000 after 1000 draws",
    ))
}

/// Writes a credential file (PIN, token, auth value) as kleidi requires one: only its owner may
/// read it (0600), else kleidi refuses it. The mode is set on creation, and again for a file that
/// already existed (truncating keeps the old mode).
pub fn write_private(path: &std::path::Path, content: impl AsRef<[u8]>) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(content.as_ref())
}
