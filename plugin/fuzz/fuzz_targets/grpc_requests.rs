//! The gRPC request messages kube-apiserver (or anything that can open the socket) sends: protobuf
//! decoding of every v2 and v1beta1 request, then the real services (`KmsV2`, `KmsV1`) over the real
//! layers (`Healthy`, `Guarded`) down to a backend that checks what reaches it. Never panics, and
//! the guard's promise holds: a decrypt reaches the backend only with a ciphertext and key_id of
//! 1 to 1024 bytes and annotations the apiserver accepts; an encrypt only with 1 to 512 bytes.
//! Logging runs at debug level into a sink, so client fields are escaped and cut as in production.

#![no_main]

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use kleidi::grpc::{KmsV1, KmsV2, StatusVersion};
use kleidi::guard::{Guarded, MAX_PLAINTEXT, MIN_PLAINTEXT, check_encrypted};
use kleidi::health::{HealthTtl, Healthy};
use kleidi::proto::v1beta1::key_management_service_server::KeyManagementService as _;
use kleidi::proto::v2::key_management_service_server::KeyManagementService as _;
use kleidi::proto::{v1beta1, v2};
use kleidi::service::{Annotations, Encrypted, KeyService};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use secrecy::{ExposeSecret, SecretSlice};
use tonic::Request;

/// One runtime for every input: building one per input would dominate the run.
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(std::io::sink)
        .finish();
    let _ = tracing::subscriber::set_global_default(subscriber);
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime")
});

/// Accepts anything the layers let through, after checking that they let through only what they
/// promise to.
struct Strict;

#[async_trait]
impl KeyService for Strict {
    fn name(&self) -> &'static str {
        "strict"
    }

    async fn encrypt(&self, _uid: &str, plaintext: &SecretSlice<u8>) -> kleidi::Result<Encrypted> {
        let plain = plaintext.expose_secret();
        assert!(
            (MIN_PLAINTEXT..=MAX_PLAINTEXT).contains(&plain.len()),
            "{}",
            plain.len()
        );
        Ok(Encrypted {
            ciphertext: plain.to_vec(),
            key_id: "fuzz:k".into(),
            annotations: Annotations::from([("format.kleidi.dev".to_owned(), b"echo".to_vec())]),
        })
    }

    async fn decrypt(&self, _uid: &str, encrypted: &Encrypted) -> kleidi::Result<SecretSlice<u8>> {
        assert_eq!(check_encrypted(encrypted), Ok(()), "{encrypted:?}");
        Ok(SecretSlice::from(encrypted.ciphertext.clone()))
    }

    async fn current_key_id(&self) -> kleidi::Result<String> {
        Ok("fuzz:k".into())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let svc = Arc::new(Healthy::new(
        Guarded::new(Strict, Duration::from_secs(1)),
        HealthTtl::default(),
    ));
    let v2 = KmsV2::new(Arc::clone(&svc), StatusVersion::V2);
    let v1 = KmsV1::new(svc);
    RUNTIME.block_on(async {
        match which % 6 {
            0 => {
                if let Ok(req) = v2::EncryptRequest::decode(body) {
                    let _ = v2.encrypt(Request::new(req)).await;
                }
            }
            1 => {
                if let Ok(req) = v2::DecryptRequest::decode(body) {
                    let _ = v2.decrypt(Request::new(req)).await;
                }
            }
            2 => {
                // Status carries nothing a client chooses; only its decoding is client input.
                let _ = v2::StatusRequest::decode(body);
            }
            3 => {
                if let Ok(req) = v1beta1::EncryptRequest::decode(body) {
                    let _ = v1.encrypt(Request::new(req)).await;
                }
            }
            4 => {
                if let Ok(req) = v1beta1::DecryptRequest::decode(body) {
                    let _ = v1.decrypt(Request::new(req)).await;
                }
            }
            _ => {
                if let Ok(req) = v1beta1::VersionRequest::decode(body) {
                    let _ = v1.version(Request::new(req)).await;
                }
            }
        }
    });
});
