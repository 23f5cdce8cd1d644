//! The gRPC services kube-apiserver calls: `v2.KeyManagementService` and the deprecated
//! `v1beta1.KeyManagementService`. This module only translates between protobuf and the
//! [`KeyService`] types; limits, health and logging live in the layers it is handed. It does open
//! each call's `rpc` span (uid, method, service version), so every line logged while serving the
//! call, in any layer or backend, names the request it belongs to.

use std::sync::Arc;
use std::time::Instant;

use prost::Message;
use secrecy::{ExposeSecret, SecretSlice};
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::health::Healthy;
use crate::logging::Client;
use crate::metrics::{Method, Metrics, Service};
use crate::proto::envelope::WrappedKey;
use crate::proto::{v1beta1, v2};
use crate::service::{Encrypted, KeyService};
use crate::{Error, Result};

/// The version string KMS v1 requests carry and `Version` must answer.
pub const V1_VERSION: &str = "v1beta1";
/// Prefix of the KMS v1 `cipher` kleidi produces (see `proto/kleidi/v1beta1/envelope.proto`).
pub const V1_CIPHER_MAGIC: &[u8] = b"kleidi.v1:";

/// Which `StatusResponse.version` to answer: 1.27/1.28 accept only `v2beta1`, >= 1.29 both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum StatusVersion {
    /// For kube-apiserver >= 1.29.
    #[default]
    V2,
    /// For kube-apiserver 1.27 and 1.28.
    V2beta1,
}

impl StatusVersion {
    fn as_str(self) -> &'static str {
        match self {
            StatusVersion::V2 => "v2",
            StatusVersion::V2beta1 => "v2beta1",
        }
    }
}

/// A uid for a request that carries none (v1beta1 and Status never do), so the log lines of every
/// call can be told apart.
fn new_uid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The request's uid, or a new one when it is empty.
fn uid_or_new(uid: String) -> String {
    match uid.is_empty() {
        true => new_uid(),
        false => uid,
    }
}

/// Runs a call inside its `rpc` span and counts it in `metrics`, if any, once it has its result.
///
/// The span is at ERROR level so that any filter that shows kleidi's warnings (`KLEIDI_LOG=warn`)
/// keeps it, and with it the uid on a failed call's line. The uid is the client's: escaped and cut.
async fn served<T>(
    metrics: Option<&Metrics>,
    service: Service,
    method: Method,
    uid: &str,
    call: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<Response<T>, Status> {
    let span = tracing::error_span!(
        "rpc",
        uid = %Client(uid),
        method = %method.as_str(),
        service = %service.as_str()
    );
    let started = Instant::now();
    let result = call.instrument(span).await;
    if let Some(metrics) = metrics {
        metrics.rpc(service, method, started, &result);
    }
    result
}

/// `v2.KeyManagementService` over any [`KeyService`] stack.
pub struct KmsV2<S> {
    svc: Arc<Healthy<S>>,
    version: StatusVersion,
    metrics: Option<Arc<Metrics>>,
}

impl<S> KmsV2<S> {
    /// Serves `svc`, answering Status with `version`.
    pub fn new(svc: Arc<Healthy<S>>, version: StatusVersion) -> Self {
        Self {
            svc,
            version,
            metrics: None,
        }
    }

    /// Counts and times every call in `metrics`.
    #[must_use]
    pub fn with_metrics(self, metrics: Arc<Metrics>) -> Self {
        Self {
            metrics: Some(metrics),
            ..self
        }
    }
}

#[tonic::async_trait]
impl<S: KeyService> v2::key_management_service_server::KeyManagementService for KmsV2<S> {
    async fn status(&self, _: Request<v2::StatusRequest>) -> Result<Response<v2::StatusResponse>, Status> {
        let uid = new_uid();
        served(
            self.metrics.as_deref(),
            Service::V2,
            Method::Status,
            &uid,
            async {
                let health = self.svc.health().await;
                Ok(Response::new(v2::StatusResponse {
                    version: self.version.as_str().into(),
                    healthz: health.healthz,
                    key_id: health.key_id,
                }))
            },
        )
        .await
    }

    async fn decrypt(
        &self,
        request: Request<v2::DecryptRequest>,
    ) -> Result<Response<v2::DecryptResponse>, Status> {
        let req = request.into_inner();
        let uid = uid_or_new(req.uid);
        served(
            self.metrics.as_deref(),
            Service::V2,
            Method::Decrypt,
            &uid,
            async {
                let encrypted = Encrypted {
                    ciphertext: req.ciphertext,
                    key_id: req.key_id,
                    annotations: req.annotations.into_iter().collect(),
                };
                let plain = self.svc.decrypt(&uid, &encrypted).await?;
                Ok(Response::new(v2::DecryptResponse {
                    plaintext: plain.expose_secret().to_vec(),
                }))
            },
        )
        .await
    }

    async fn encrypt(
        &self,
        request: Request<v2::EncryptRequest>,
    ) -> Result<Response<v2::EncryptResponse>, Status> {
        let req = request.into_inner();
        let uid = uid_or_new(req.uid);
        served(
            self.metrics.as_deref(),
            Service::V2,
            Method::Encrypt,
            &uid,
            async {
                // Moved, not copied: the seed is zeroized when the secret drops.
                let plaintext = SecretSlice::from(req.plaintext);
                let out = self.svc.encrypt(&uid, &plaintext).await?;
                Ok(Response::new(v2::EncryptResponse {
                    ciphertext: out.ciphertext,
                    key_id: out.key_id,
                    annotations: out.annotations.into_iter().collect(),
                }))
            },
        )
        .await
    }
}

/// `v1beta1.KeyManagementService` over the same stack. KMS v1 has no key_id or annotations, so they
/// travel inside the `cipher` bytes as a [`WrappedKey`].
pub struct KmsV1<S> {
    svc: Arc<Healthy<S>>,
    metrics: Option<Arc<Metrics>>,
}

impl<S> KmsV1<S> {
    /// Serves `svc` to KMS v1 clients.
    pub fn new(svc: Arc<Healthy<S>>) -> Self {
        Self { svc, metrics: None }
    }

    /// Counts and times every call in `metrics`.
    #[must_use]
    pub fn with_metrics(self, metrics: Arc<Metrics>) -> Self {
        Self {
            metrics: Some(metrics),
            ..self
        }
    }
}

fn check_v1_version(version: &str) -> Result<()> {
    if version == V1_VERSION {
        return Ok(());
    }
    Err(Error::InvalidRequest(format!(
        "KMS v1 version {version:?} is not supported; expected {V1_VERSION:?}"
    )))
}

/// Packs a wrapped key into a KMS v1 `cipher`.
pub fn encode_v1_cipher(e: Encrypted) -> Vec<u8> {
    let msg = WrappedKey {
        key_id: e.key_id,
        ciphertext: e.ciphertext,
        annotations: e.annotations.into_iter().collect(),
    };
    let mut out = V1_CIPHER_MAGIC.to_vec();
    out.extend(msg.encode_to_vec());
    out
}

/// Unpacks a KMS v1 `cipher` produced by [`encode_v1_cipher`].
pub fn decode_v1_cipher(cipher: &[u8]) -> Result<Encrypted> {
    let body = cipher.strip_prefix(V1_CIPHER_MAGIC).ok_or_else(|| {
        Error::BadCiphertext("KMS v1 cipher was not produced by kleidi (no kleidi.v1: prefix)".into())
    })?;
    let msg = WrappedKey::decode(body)
        .map_err(|e| Error::BadCiphertext(format!("KMS v1 cipher does not decode: {e}")))?;
    Ok(Encrypted {
        ciphertext: msg.ciphertext,
        key_id: msg.key_id,
        annotations: msg.annotations.into_iter().collect(),
    })
}

#[tonic::async_trait]
impl<S: KeyService> v1beta1::key_management_service_server::KeyManagementService for KmsV1<S> {
    async fn version(
        &self,
        request: Request<v1beta1::VersionRequest>,
    ) -> Result<Response<v1beta1::VersionResponse>, Status> {
        let uid = new_uid();
        served(
            self.metrics.as_deref(),
            Service::V1beta1,
            Method::Version,
            &uid,
            async {
                check_v1_version(&request.into_inner().version)?;
                Ok(Response::new(v1beta1::VersionResponse {
                    version: V1_VERSION.into(),
                    runtime_name: "kleidi".into(),
                    runtime_version: env!("CARGO_PKG_VERSION").into(),
                }))
            },
        )
        .await
    }

    async fn decrypt(
        &self,
        request: Request<v1beta1::DecryptRequest>,
    ) -> Result<Response<v1beta1::DecryptResponse>, Status> {
        let uid = new_uid();
        served(
            self.metrics.as_deref(),
            Service::V1beta1,
            Method::Decrypt,
            &uid,
            async {
                let req = request.into_inner();
                check_v1_version(&req.version)?;
                let encrypted = decode_v1_cipher(&req.cipher)?;
                let plain = self.svc.decrypt(&uid, &encrypted).await?;
                Ok(Response::new(v1beta1::DecryptResponse {
                    plain: plain.expose_secret().to_vec(),
                }))
            },
        )
        .await
    }

    async fn encrypt(
        &self,
        request: Request<v1beta1::EncryptRequest>,
    ) -> Result<Response<v1beta1::EncryptResponse>, Status> {
        let uid = new_uid();
        served(
            self.metrics.as_deref(),
            Service::V1beta1,
            Method::Encrypt,
            &uid,
            async {
                let req = request.into_inner();
                check_v1_version(&req.version)?;
                let plaintext = SecretSlice::from(req.plain);
                let out = self.svc.encrypt(&uid, &plaintext).await?;
                Ok(Response::new(v1beta1::EncryptResponse {
                    cipher: encode_v1_cipher(out),
                }))
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_cipher_round_trips_key_id_and_annotations() {
        let e = Encrypted {
            ciphertext: vec![1, 2, 3],
            key_id: "pkcs11:k:00".into(),
            annotations: [("format.kleidi.dev".to_string(), b"x".to_vec())].into(),
        };
        assert_eq!(decode_v1_cipher(&encode_v1_cipher(e.clone())).unwrap(), e);
    }

    #[test]
    fn v1_cipher_from_elsewhere_is_bad_ciphertext() {
        for junk in [&b""[..], b"kleidi.v1:\xff\xff\xff", b"k8s:enc:kms:v1:x:"] {
            assert!(matches!(decode_v1_cipher(junk), Err(Error::BadCiphertext(_))));
        }
    }
}
