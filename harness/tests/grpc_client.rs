//! The real gRPC client ([`connect_unix`]) against a tonic KMS v2 server on a Unix socket: the envelope
//! works through it end to end, every call carries `:authority: localhost` and a `grpc-timeout`, and
//! the per-call deadline is enforced. The server side only translates to upstream's Base64 test KEK.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test helpers outside #[test] functions

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kleidi::proto::v2 as wire;
use kleidi::proto::v2::key_management_service_server::{KeyManagementService, KeyManagementServiceServer};
use kleidi_harness::apiserver::kms::{DecryptRequest, KmsClient};
use kleidi_harness::apiserver::{Authority, Base64Kek, Envelope, Error, connect_unix};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::codegen::http;
use tonic::{Request, Response, Status};

#[derive(Default)]
struct Plugin {
    kek: Base64Kek,
    status_delay: Mutex<Duration>,
    timeouts: Mutex<Vec<String>>,
}

/// What the server holds; the test keeps another handle to the same plugin.
struct Served(Arc<Plugin>);

impl std::ops::Deref for Served {
    type Target = Plugin;
    fn deref(&self) -> &Plugin {
        &self.0
    }
}

impl Plugin {
    fn record<T>(&self, request: &Request<T>) {
        let timeout = request
            .metadata()
            .get("grpc-timeout")
            .map(|v| v.to_str().unwrap().to_owned());
        self.timeouts.lock().unwrap().push(timeout.unwrap_or_default());
    }
}

#[tonic::async_trait]
impl KeyManagementService for Served {
    async fn status(
        &self,
        request: Request<wire::StatusRequest>,
    ) -> Result<Response<wire::StatusResponse>, Status> {
        self.record(&request);
        let delay = *self.status_delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        let s = self.kek.status().await?;
        Ok(Response::new(wire::StatusResponse {
            version: s.version,
            healthz: s.healthz,
            key_id: s.key_id,
        }))
    }

    async fn encrypt(
        &self,
        request: Request<wire::EncryptRequest>,
    ) -> Result<Response<wire::EncryptResponse>, Status> {
        self.record(&request);
        let r = request.into_inner();
        assert_eq!(uuid::Uuid::parse_str(&r.uid).unwrap().get_version_num(), 4);
        let e = self.kek.encrypt(&r.uid, &r.plaintext).await?;
        Ok(Response::new(wire::EncryptResponse {
            ciphertext: e.ciphertext,
            key_id: e.key_id,
            annotations: e.annotations.into_iter().collect(),
        }))
    }

    async fn decrypt(
        &self,
        request: Request<wire::DecryptRequest>,
    ) -> Result<Response<wire::DecryptResponse>, Status> {
        self.record(&request);
        let r = request.into_inner();
        let request = DecryptRequest {
            ciphertext: r.ciphertext,
            key_id: r.key_id,
            annotations: r.annotations.into_iter().collect(),
        };
        let plaintext = self.kek.decrypt(&r.uid, &request).await?;
        Ok(Response::new(wire::DecryptResponse {
            plaintext: plaintext.to_vec(),
        }))
    }
}

/// Serves `plugin` on `<dir>/kms.sock`; returns the socket path and the `:authority` values seen.
async fn serve(dir: &tempfile::TempDir, plugin: Arc<Plugin>) -> (String, Arc<Mutex<Vec<String>>>) {
    let path = dir.path().join("kms.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let authorities = Arc::new(Mutex::new(Vec::new()));
    let seen = authorities.clone();
    let record =
        tower::ServiceBuilder::new().map_request(move |request: http::Request<tonic::body::Body>| {
            let authority = request
                .uri()
                .authority()
                .map(ToString::to_string)
                .unwrap_or_default();
            seen.lock().unwrap().push(authority);
            request
        });
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(record)
            .add_service(KeyManagementServiceServer::new(Served(plugin)))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    (path.to_string_lossy().into_owned(), authorities)
}

#[tokio::test]
async fn envelope_round_trips_through_the_grpc_client_with_localhost_authority() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = Arc::new(Plugin::default());
    let (socket, authorities) = serve(&dir, plugin.clone()).await;

    let writer = Envelope::new(
        "kleidi",
        Arc::new(connect_unix(&socket, Authority::Localhost).await.unwrap()),
    )
    .unwrap();
    writer.refresh().await.unwrap();
    let value = writer
        .write("/registry/secrets/default/db", b"k8s\0 secret")
        .unwrap();

    let client = connect_unix(format!("unix://{socket}"), Authority::Localhost)
        .await
        .unwrap();
    let reader = Envelope::new("kleidi", Arc::new(client)).unwrap();
    reader.refresh().await.unwrap();
    let (plaintext, stale) = reader.read("/registry/secrets/default/db", &value).await.unwrap();
    assert_eq!((plaintext.as_slice(), stale), (&b"k8s\0 secret"[..], false));

    // Status + Encrypt per envelope, one Decrypt for the reader's cache miss.
    assert_eq!(
        (
            plugin.kek.status_calls(),
            plugin.kek.encrypt_calls(),
            plugin.kek.decrypt_calls()
        ),
        (2, 2, 1)
    );
    let authorities = authorities.lock().unwrap().clone();
    assert_eq!(authorities.len(), 5);
    assert!(authorities.iter().all(|a| a == "localhost"), "{authorities:?}");
    let timeouts = plugin.timeouts.lock().unwrap().clone();
    assert!(
        timeouts.iter().all(|t| !t.is_empty()),
        "every call carries grpc-timeout: {timeouts:?}"
    );
}

#[tokio::test]
async fn a_plugin_slower_than_the_deadline_gives_deadline_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = Arc::new(Plugin::default());
    *plugin.status_delay.lock().unwrap() = Duration::from_secs(5);
    let (socket, _) = serve(&dir, plugin).await;
    let client = connect_unix(&socket, Authority::Localhost)
        .await
        .unwrap()
        .with_timeout(Duration::from_millis(200));
    let started = Instant::now();
    let status = client.status().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    let envelope = Envelope::new("kleidi", Arc::new(client)).unwrap();
    let err = envelope.refresh().await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Rpc {
                method: "Status",
                code: tonic::Code::DeadlineExceeded,
                ..
            }
        ),
        "{err}"
    );
}
