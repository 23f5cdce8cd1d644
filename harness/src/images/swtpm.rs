//! A TPM 2.0 in a container (`kleidi-swtpm`, Debian's swtpm): `swtpm socket --tpm2` powered on and
//! started (`TPM2_Startup(CLEAR)` by swtpm itself), the command port on 2321 and the control port
//! on 2322 of the container's network address. Ready when a `TPM2_GetCapability` sent to the
//! command port comes back `TPM_RC_SUCCESS`.

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

/// `TPM2_GetCapability(TPM_CAP_TPM_PROPERTIES, TPM_PT_MANUFACTURER, 1)`, no sessions.
const GET_CAPABILITY: [u8; 22] = [
    0x80, 0x01, 0x00, 0x00, 0x00, 0x16, 0x00, 0x00, 0x01, 0x7a, 0x00, 0x00, 0x00, 0x06, 0x00, 0x00, 0x01,
    0x05, 0x00, 0x00, 0x00, 0x01,
];

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

    /// Waits up to `limit` for a `TPM2_GetCapability` round trip answered with success.
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        poll("swtpm", limit, || async {
            let mut stream = TcpStream::connect(self.command_addr()).await?;
            stream.write_all(&GET_CAPABILITY).await?;
            // The response header: tag (2), size (4), response code (4).
            let mut header = [0u8; 10];
            tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut header)).await??;
            let [_, _, _, _, _, _, rc @ ..] = header;
            match u32::from_be_bytes(rc) {
                0 => Ok(()),
                rc => bail!("TPM2_GetCapability answered TPM_RC {rc:#x}"),
            }
        })
        .await
    }

    /// The container, for its verbs (stop, start, pause, unpause) and logs.
    pub fn container(&self) -> &ContainerAsync<SwtpmImage> {
        &self.container
    }
}
