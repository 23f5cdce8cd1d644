//! How the harness reaches a KMS v2 plugin: the [`KmsClient`] trait (the shape of upstream kms
//! `service.Service`), the real gRPC client over a Unix socket ([`connect_unix`]), and [`Base64Kek`], the
//! deterministic test KEK of upstream's integration tests that the golden vectors were written with.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use kleidi::proto::v2 as wire;
use kleidi::proto::v2::key_management_service_client::KeyManagementServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};
use zeroize::Zeroizing;

use super::Error;

/// Annotations as stored and sent back: sorted, so encodings and cache keys are deterministic.
pub type Annotations = BTreeMap<String, Vec<u8>>;

/// `StatusResponse` of the plugin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusResponse {
    /// `"v2"` or `"v2beta1"`.
    pub version: String,
    /// `"ok"` when healthy; anything else is the error text.
    pub healthz: String,
    /// The current KEK's key ID.
    pub key_id: String,
}

/// `EncryptResponse` of the plugin: the wrapped seed and what must be sent back to unwrap it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncryptResponse {
    /// The wrapped seed (`encryptedDEKSource`).
    pub ciphertext: Vec<u8>,
    /// The KEK's key ID; must equal Status's.
    pub key_id: String,
    /// Stored in clear next to the data.
    pub annotations: Annotations,
}

/// What the apiserver sends to Decrypt: the **stored** ciphertext, key ID and annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecryptRequest {
    /// The stored `encryptedDEKSource`.
    pub ciphertext: Vec<u8>,
    /// The stored key ID (not the current one).
    pub key_id: String,
    /// The stored annotations.
    pub annotations: Annotations,
}

/// A KMS v2 plugin as the apiserver sees it. Errors are gRPC statuses so their codes survive.
#[async_trait]
pub trait KmsClient: Send + Sync {
    /// `Status`: version, health and current key ID.
    async fn status(&self) -> Result<StatusResponse, tonic::Status>;
    /// `Encrypt`: wrap a seed; `uid` is a fresh UUIDv4 for log correlation.
    async fn encrypt(&self, uid: &str, plaintext: &[u8]) -> Result<EncryptResponse, tonic::Status>;
    /// `Decrypt`: unwrap a stored seed or DEK; `uid` is a fresh UUIDv4.
    async fn decrypt(&self, uid: &str, request: &DecryptRequest)
    -> Result<Zeroizing<Vec<u8>>, tonic::Status>;
}

/// The apiserver's default per-call deadline (provider config `timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// The HTTP/2 `:authority` the client sends (spec 1.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Authority {
    /// `localhost`, as kube-apiserver ≥ 1.32 sends. (≤ 1.31 sends the socket path, which h2 clients
    /// cannot send; that case is covered outside this crate.)
    #[default]
    Localhost,
}

/// The real plugin, over gRPC on its Unix socket.
#[derive(Clone, Debug)]
pub struct GrpcKms {
    client: KeyManagementServiceClient<Channel>,
    timeout: Duration,
}

/// Connects to a plugin socket (a path, `unix:` prefix optional) with the given `:authority` and the
/// default 3 s per-call deadline. Fails if nothing listens there now.
pub async fn connect_unix(path: impl AsRef<Path>, authority: Authority) -> Result<GrpcKms, Error> {
    let (path, endpoint) = endpoint(path.as_ref(), authority)?;
    let channel = endpoint.connect().await.map_err(|e| Error::Connect {
        path,
        reason: format!("{e}: {}", source_chain(&e)),
    })?;
    Ok(GrpcKms::new(channel))
}

/// Like [`connect_unix`], but connects on the first call and reconnects after failures, as grpc-go
/// with `WaitForReady`: for an apiserver that starts before its plugin, or outlives a plugin crash.
pub fn connect_unix_lazy(path: impl AsRef<Path>, authority: Authority) -> Result<GrpcKms, Error> {
    let (_, endpoint) = endpoint(path.as_ref(), authority)?;
    Ok(GrpcKms::new(endpoint.connect_lazy()))
}

fn endpoint(path: &Path, authority: Authority) -> Result<(String, Endpoint), Error> {
    let path = path.to_string_lossy();
    let path = path
        .strip_prefix("unix://")
        .or_else(|| path.strip_prefix("unix:"))
        .unwrap_or(&path)
        .to_owned();
    let origin = match authority {
        Authority::Localhost => Uri::from_static("http://localhost"),
    };
    let endpoint = Endpoint::from_shared(format!("unix:{path}"))
        .map_err(|e| Error::Connect {
            path: path.clone(),
            reason: e.to_string(),
        })?
        .origin(origin)
        .connect_timeout(DEFAULT_TIMEOUT);
    Ok((path, endpoint))
}

fn source_chain(error: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut next = error.source();
    while let Some(e) = next {
        parts.push(e.to_string());
        next = e.source();
    }
    parts.join(": ")
}

impl GrpcKms {
    fn new(channel: Channel) -> Self {
        Self {
            client: KeyManagementServiceClient::new(channel),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Replaces the per-call deadline (the provider config's `timeout`).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends `grpc-timeout` like grpc-go and enforces the deadline locally. As with grpc-go, a call that
    /// fails once the deadline has passed reports `DEADLINE_EXCEEDED` (a tonic server answers its own
    /// expired `grpc-timeout` with `CANCELLED`, which can arrive just before the local timer fires).
    async fn call<T, R, F>(
        &self,
        message: T,
        rpc: impl FnOnce(KeyManagementServiceClient<Channel>, tonic::Request<T>) -> F,
    ) -> Result<R, tonic::Status>
    where
        F: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        let started = Instant::now();
        let expired = || tonic::Status::deadline_exceeded(format!("no answer within {:?}", self.timeout));
        match tokio::time::timeout(self.timeout, rpc(self.client.clone(), request)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) if started.elapsed() >= self.timeout => Err(tonic::Status::deadline_exceeded(
                format!("{}; plugin said: {}", expired().message(), status.message()),
            )),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(expired()),
        }
    }
}

#[async_trait]
impl KmsClient for GrpcKms {
    async fn status(&self) -> Result<StatusResponse, tonic::Status> {
        let r = self
            .call(
                wire::StatusRequest {},
                |mut c, r| async move { c.status(r).await },
            )
            .await?;
        Ok(StatusResponse {
            version: r.version,
            healthz: r.healthz,
            key_id: r.key_id,
        })
    }

    async fn encrypt(&self, uid: &str, plaintext: &[u8]) -> Result<EncryptResponse, tonic::Status> {
        let request = wire::EncryptRequest {
            plaintext: plaintext.to_vec(),
            uid: uid.to_owned(),
        };
        let r = self
            .call(request, |mut c, r| async move { c.encrypt(r).await })
            .await?;
        Ok(EncryptResponse {
            ciphertext: r.ciphertext,
            key_id: r.key_id,
            annotations: r.annotations.into_iter().collect(),
        })
    }

    async fn decrypt(
        &self,
        uid: &str,
        request: &DecryptRequest,
    ) -> Result<Zeroizing<Vec<u8>>, tonic::Status> {
        let request = wire::DecryptRequest {
            ciphertext: request.ciphertext.clone(),
            uid: uid.to_owned(),
            key_id: request.key_id.clone(),
            annotations: request.annotations.clone().into_iter().collect(),
        };
        let r = self
            .call(request, |mut c, r| async move { c.decrypt(r).await })
            .await?;
        Ok(Zeroizing::new(r.plaintext))
    }
}

/// Upstream's `Base64Plugin` (apiserver `envelope/testing/v2/kms_plugin_mock.go`): the "ciphertext" is
/// base64 of the plaintext, key ID `"1"`, one annotation `local-kek.kms.kubernetes.io`. It protects
/// nothing; it exists because the golden vectors V3/V4 were written through it, so they decrypt end to
/// end. Counts calls, and can change key ID or fail like the mock.
#[derive(Debug)]
pub struct Base64Kek {
    state: Mutex<Base64State>,
    status_calls: AtomicUsize,
    encrypt_calls: AtomicUsize,
    decrypt_calls: AtomicUsize,
}

#[derive(Debug)]
struct Base64State {
    key_id: String,
    failed: bool,
}

impl Base64Kek {
    /// The annotation key the mock returns from Encrypt.
    pub const ANNOTATION_KEY: &'static str = "local-kek.kms.kubernetes.io";
    /// Its value.
    pub const ANNOTATION_VALUE: &'static [u8] = b"encrypted-local-kek";

    /// Key ID `"1"`, healthy.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(Base64State {
                key_id: "1".into(),
                failed: false,
            }),
            status_calls: AtomicUsize::new(0),
            encrypt_calls: AtomicUsize::new(0),
            decrypt_calls: AtomicUsize::new(0),
        }
    }

    /// Reports and encrypts under another key ID from now on (upstream `UpdateKeyID`).
    pub fn set_key_id(&self, key_id: impl Into<String>) {
        self.lock().key_id = key_id.into();
    }

    /// While failed, every call answers `FAILED_PRECONDITION` (upstream `EnterFailedState`).
    pub fn set_failed(&self, failed: bool) {
        self.lock().failed = failed;
    }

    /// Status calls so far.
    pub fn status_calls(&self) -> usize {
        self.status_calls.load(Ordering::SeqCst)
    }

    /// Encrypt calls so far.
    pub fn encrypt_calls(&self) -> usize {
        self.encrypt_calls.load(Ordering::SeqCst)
    }

    /// Decrypt calls so far.
    pub fn decrypt_calls(&self) -> usize {
        self.decrypt_calls.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Base64State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn check(&self) -> Result<String, tonic::Status> {
        let state = self.lock();
        if state.failed {
            return Err(tonic::Status::failed_precondition(
                "failed precondition - key disabled",
            ));
        }
        Ok(state.key_id.clone())
    }
}

impl Default for Base64Kek {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl KmsClient for Base64Kek {
    async fn status(&self) -> Result<StatusResponse, tonic::Status> {
        self.status_calls.fetch_add(1, Ordering::SeqCst);
        let key_id = self.check()?;
        Ok(StatusResponse {
            version: "v2".into(),
            healthz: "ok".into(),
            key_id,
        })
    }

    async fn encrypt(&self, _uid: &str, plaintext: &[u8]) -> Result<EncryptResponse, tonic::Status> {
        self.encrypt_calls.fetch_add(1, Ordering::SeqCst);
        let key_id = self.check()?;
        Ok(EncryptResponse {
            ciphertext: STANDARD.encode(plaintext).into_bytes(),
            key_id,
            annotations: BTreeMap::from([(Self::ANNOTATION_KEY.to_owned(), Self::ANNOTATION_VALUE.to_vec())]),
        })
    }

    async fn decrypt(
        &self,
        uid: &str,
        request: &DecryptRequest,
    ) -> Result<Zeroizing<Vec<u8>>, tonic::Status> {
        self.decrypt_calls.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        if uid.is_empty() {
            return Err(tonic::Status::invalid_argument("uid is required"));
        }
        STANDARD
            .decode(&request.ciphertext)
            .map(Zeroizing::new)
            .map_err(|_| tonic::Status::invalid_argument("ciphertext is not base64"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn base64_kek_round_trips_and_counts_calls() {
        let kek = Base64Kek::new();
        let wrapped = kek.encrypt("uid", b"seed").await.unwrap();
        assert_eq!(wrapped.ciphertext, b"c2VlZA==");
        assert_eq!(wrapped.key_id, "1");
        let request = DecryptRequest {
            ciphertext: wrapped.ciphertext,
            key_id: "1".into(),
            annotations: wrapped.annotations,
        };
        assert_eq!(kek.decrypt("uid", &request).await.unwrap().as_slice(), b"seed");
        assert_eq!((kek.encrypt_calls(), kek.decrypt_calls()), (1, 1));
    }

    #[tokio::test]
    async fn base64_kek_fails_like_the_upstream_mock() {
        let kek = Base64Kek::new();
        kek.set_failed(true);
        assert_eq!(
            kek.status().await.unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
        kek.set_failed(false);
        let request = DecryptRequest {
            ciphertext: b"!!".to_vec(),
            key_id: "1".into(),
            annotations: Annotations::new(),
        };
        assert_eq!(
            kek.decrypt("", &request).await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[tokio::test]
    async fn connecting_to_a_missing_socket_names_the_path() {
        let err = connect_unix("/nonexistent/kleidi-harness.sock", Authority::Localhost)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/kleidi-harness.sock"),
            "{err}"
        );
    }
}
