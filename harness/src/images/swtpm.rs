//! A TPM 2.0 in a container (`kleidi-swtpm`, Debian's swtpm): `swtpm socket --tpm2` powered on and
//! started (`TPM2_Startup(CLEAR)` by swtpm itself), the command port on 2321 and the control port
//! on 2322 of the container's network address. Ready when the TPM answers a command ([`answers`],
//! also what the process runtime's swtpm waits for).

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Result, bail};
use testcontainers::core::WaitFor;
use testcontainers::{ContainerAsync, ContainerRequest, Image};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::{READY_LIMIT, poll, start_on_network};

/// The image `fixtures/images/swtpm.sh` builds.
pub const NAME: &str = "kleidi-swtpm";
/// Its pinned tag (`fixtures/images/tags`): the swtpm version.
pub const TAG: &str = "0.7.1";
/// The TPM command port inside the container.
pub const COMMAND_PORT: u16 = 2321;
/// The swtpm control port (power, reset) inside the container.
pub const CTRL_PORT: u16 = 2322;

/// TPM2_GetRandom(8) with no sessions: tag TPM_ST_NO_SESSIONS, size 12, TPM_CC_GetRandom.
const GET_RANDOM: [u8; 12] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8];
/// CMD_GET_TPMESTABLISHED on the control channel: answered by the TPM library, also while a
/// client holds the data channel.
const GET_ESTABLISHED: [u8; 4] = [0, 0, 0, 0x04];
/// How long one probe waits for an answer (a paused swtpm never answers).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// `swtpm socket --tpm2` keeping its state in a directory of the container.
#[derive(Clone, Debug)]
pub struct SwtpmImage {
    args: Vec<String>,
}

impl Default for SwtpmImage {
    /// State in `/tmp` (lost with the container: a fresh TPM each time).
    fn default() -> Self {
        SwtpmImage { args: Vec::new() }.with_state_dir("/tmp")
    }
}

impl SwtpmImage {
    /// The TPM state directory inside the container (a mounted volume keeps it across containers).
    pub fn with_state_dir(mut self, dir: &str) -> Self {
        self.args = [
            "socket",
            "--tpm2",
            "--tpmstate",
            &format!("dir={dir}"),
            "--server",
            &format!("type=tcp,port={COMMAND_PORT},bindaddr=0.0.0.0"),
            "--ctrl",
            &format!("type=tcp,port={CTRL_PORT},bindaddr=0.0.0.0"),
            "--flags",
            "not-need-init,startup-clear",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        self
    }
}

impl Image for SwtpmImage {
    fn name(&self) -> &str {
        NAME
    }

    fn tag(&self) -> &str {
        TAG
    }

    fn ready_conditions(&self) -> Vec<WaitFor> {
        // swtpm says nothing when it listens; SwtpmContainer::start asks the TPM itself.
        vec![WaitFor::Nothing]
    }

    fn cmd(&self) -> impl IntoIterator<Item = impl Into<Cow<'_, str>>> {
        &self.args
    }
}

/// A started swtpm that answered a TPM command; removed on drop.
pub struct SwtpmContainer {
    container: ContainerAsync<SwtpmImage>,
    ip: IpAddr,
}

impl SwtpmContainer {
    /// Starts `request` (a [`SwtpmImage`] `.with_network(…)`) and waits until the TPM answers.
    pub async fn start(request: impl Into<ContainerRequest<SwtpmImage>>) -> Result<Self> {
        let (container, ip) = start_on_network(request.into()).await?;
        let tpm = SwtpmContainer { container, ip };
        tpm.wait_ready(READY_LIMIT).await?;
        Ok(tpm)
    }

    /// The command port's address on the network.
    pub fn command_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, COMMAND_PORT)
    }

    /// The tpm2-tss TCTI string reaching it (`swtpm:host=…,port=2321`; ctrl is port + 1).
    pub fn tcti(&self) -> String {
        format!("swtpm:host={},port={COMMAND_PORT}", self.ip)
    }

    /// Waits up to `limit` until the TPM answers ([`answers`]).
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        poll("swtpm", limit, || answers(self.command_addr())).await
    }

    /// Reads its address again: a container started again may get another one on its network.
    pub async fn refresh_address(&mut self) -> Result<IpAddr> {
        self.ip = self.container.get_bridge_ip_address().await?;
        Ok(self.ip)
    }

    /// The container, for its verbs (stop, start, pause, unpause) and logs.
    pub fn container(&self) -> &ContainerAsync<SwtpmImage> {
        &self.container
    }
}

/// One TPM round trip: TPM2_GetRandom on the command port `command`, answered with success. swtpm
/// serves one data connection at a time, so when a client holds it (kleidi reconnecting after a
/// restart) the answer comes from the control channel on the next port instead:
/// CMD_GET_TPMESTABLISHED, which also needs a running TPM. A paused swtpm answers neither; each
/// probe gives up after a second.
pub async fn answers(command: SocketAddr) -> Result<()> {
    let control = SocketAddr::new(command.ip(), command.port() + 1);
    match bounded(get_random(command)).await {
        Ok(()) => Ok(()),
        Err(data) => bounded(tpm_established(control))
            .await
            .map_err(|ctrl| anyhow::anyhow!("data channel: {data:#}; control channel: {ctrl:#}")),
    }
}

async fn bounded(probe: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(PROBE_TIMEOUT, probe)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {PROBE_TIMEOUT:?}")))
}

/// One TPM2_GetRandom round trip; Ok only for TPM_RC_SUCCESS.
async fn get_random(addr: SocketAddr) -> Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(&GET_RANDOM).await?;
    // The response header: tag (2), size (4), response code (4).
    let mut header = [0u8; 10];
    stream.read_exact(&mut header).await?;
    let [_, _, _, _, _, _, rc @ ..] = header;
    match u32::from_be_bytes(rc) {
        0 => Ok(()),
        rc => bail!("TPM2_GetRandom answered TPM_RC {rc:#x}"),
    }
}

/// CMD_GET_TPMESTABLISHED on the control port; Ok only for TPM_SUCCESS.
async fn tpm_established(addr: SocketAddr) -> Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(&GET_ESTABLISHED).await?;
    let mut answer = [0u8; 8];
    stream.read_exact(&mut answer).await?;
    let [a, b, c, d, ..] = answer;
    match u32::from_be_bytes([a, b, c, d]) {
        0 => Ok(()),
        rc => bail!("CMD_GET_TPMESTABLISHED answered {rc:#x}"),
    }
}
