//! `kleidi-bench trivial-server`: the same KMS v2 proto, answered at once (Encrypt and Decrypt echo,
//! Status "ok"), on a plain tonic Unix listener. What gRPC over the socket costs with nothing behind it.

use std::path::Path;

use kleidi::proto::v2::key_management_service_server::{KeyManagementService, KeyManagementServiceServer};
use kleidi::proto::v2::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

struct Echo;

#[tonic::async_trait]
impl KeyManagementService for Echo {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            version: "v2".into(),
            healthz: "ok".into(),
            key_id: "trivial".into(),
        }))
    }

    async fn encrypt(&self, req: Request<EncryptRequest>) -> Result<Response<EncryptResponse>, Status> {
        Ok(Response::new(EncryptResponse {
            ciphertext: req.into_inner().plaintext,
            key_id: "trivial".into(),
            annotations: Default::default(),
        }))
    }

    async fn decrypt(&self, req: Request<DecryptRequest>) -> Result<Response<DecryptResponse>, Status> {
        Ok(Response::new(DecryptResponse {
            plaintext: req.into_inner().ciphertext,
        }))
    }
}

/// Serves until killed (the bench kills it by pid).
pub async fn serve(socket: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(KeyManagementServiceServer::new(Echo))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
