//! `kleidi-bench trivial-server`: the same KMS v2 proto on a plain tonic Unix listener, with nothing
//! of kleidi's. Alone it answers at once (Encrypt and Decrypt echo, Status "ok"): what gRPC over the
//! socket costs with nothing behind it. Given a backend (`--vault-addr`, `--pkcs11`), Encrypt and
//! Decrypt make the raw side's own call in the handler, inline, and nothing else (no limits, no
//! checks, no time bound, no hand-off to another thread): the plainest plugin there can be, gRPC and
//! the backend composed in one process, so the cost of composing them is measured rather than
//! assumed zero.

use std::path::Path;
use std::sync::{Mutex, PoisonError};

use kleidi::proto::v2::key_management_service_server::{KeyManagementService, KeyManagementServiceServer};
use kleidi::proto::v2::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

use super::raw::{RawHsm, RawSession, RawVault};

/// What answers Encrypt and Decrypt.
pub enum Behind {
    /// Nobody: echo.
    Echo,
    /// transit on this OpenBao, through the raw side's client.
    Vault(RawVault),
    /// The bench's SoftHSM token, through raw sessions: one per call in flight, kept for the next.
    Hsm(Mutex<Vec<RawSession>>, RawHsm),
}

struct Plain(Behind);

/// Runs `op` on an idle session of `pool`, opening one when none is idle, and keeps it for the next.
fn with_session<T>(
    pool: &Mutex<Vec<RawSession>>,
    hsm: &RawHsm,
    op: impl FnOnce(&mut RawSession) -> anyhow::Result<T>,
) -> Result<T, Status> {
    let idle = pool.lock().unwrap_or_else(PoisonError::into_inner).pop();
    let mut session = match idle {
        Some(session) => session,
        None => hsm.session().map_err(failed)?,
    };
    let out = op(&mut session).map_err(failed);
    pool.lock().unwrap_or_else(PoisonError::into_inner).push(session);
    out
}

fn failed(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

#[tonic::async_trait]
impl KeyManagementService for Plain {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            version: "v2".into(),
            healthz: "ok".into(),
            key_id: "trivial".into(),
        }))
    }

    async fn encrypt(&self, req: Request<EncryptRequest>) -> Result<Response<EncryptResponse>, Status> {
        let plaintext = req.into_inner().plaintext;
        let ciphertext = match &self.0 {
            Behind::Echo => plaintext,
            Behind::Vault(vault) => vault.seal(&plaintext).await.map_err(failed)?.into_bytes(),
            Behind::Hsm(pool, hsm) => {
                let (iv, ct) = with_session(pool, hsm, |s| s.seal(&plaintext))?;
                [&iv[..], &ct].concat()
            }
        };
        Ok(Response::new(EncryptResponse {
            ciphertext,
            key_id: "trivial".into(),
            annotations: Default::default(),
        }))
    }

    async fn decrypt(&self, req: Request<DecryptRequest>) -> Result<Response<DecryptResponse>, Status> {
        let ciphertext = req.into_inner().ciphertext;
        let plaintext = match &self.0 {
            Behind::Echo => ciphertext,
            Behind::Vault(vault) => {
                let ct = String::from_utf8(ciphertext).map_err(failed)?;
                vault.open(&ct).await.map_err(failed)?
            }
            Behind::Hsm(pool, hsm) => {
                let (iv, ct) = ciphertext
                    .split_first_chunk::<12>()
                    .ok_or_else(|| Status::invalid_argument("ciphertext shorter than its IV"))?;
                with_session(pool, hsm, |s| s.open(iv, ct))?
            }
        };
        Ok(Response::new(DecryptResponse { plaintext }))
    }
}

/// Serves until killed (the bench kills it by pid).
pub async fn serve(socket: &Path, behind: Behind) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(KeyManagementServiceServer::new(Plain(behind)))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
