//! The v2 calls the `kleidi serve` tests make, on any client: one shape for each request, a fresh
//! uid per call as the apiserver sends.
#![allow(dead_code, clippy::unwrap_used)]

use kleidi::proto::v2;
use kleidi::proto::v2::key_management_service_client::KeyManagementServiceClient;
use tonic::transport::Channel;

type Client = KeyManagementServiceClient<Channel>;

/// A Status that must answer.
pub async fn status(mut client: Client) -> v2::StatusResponse {
    client.status(v2::StatusRequest {}).await.unwrap().into_inner()
}

/// An Encrypt of `plaintext`.
pub async fn encrypt(mut client: Client, plaintext: &[u8]) -> Result<v2::EncryptResponse, tonic::Status> {
    client
        .encrypt(v2::EncryptRequest {
            plaintext: plaintext.to_vec(),
            uid: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// A Decrypt of what Encrypt answered.
pub async fn decrypt(mut client: Client, wrapped: &v2::EncryptResponse) -> Result<Vec<u8>, tonic::Status> {
    client
        .decrypt(v2::DecryptRequest {
            ciphertext: wrapped.ciphertext.clone(),
            uid: uuid::Uuid::new_v4().to_string(),
            key_id: wrapped.key_id.clone(),
            annotations: wrapped.annotations.clone(),
        })
        .await
        .map(|r| r.into_inner().plaintext)
}
