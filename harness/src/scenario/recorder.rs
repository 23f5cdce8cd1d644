//! The plugin connection of one simulated apiserver, recording every RPC it makes into the history:
//! method, key_id, gRPC code, latency; and what each Status reported. Wraps any [`KmsClient`], so the
//! same recording serves kleidi and any other plugin.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use zeroize::Zeroizing;

use super::history::{Event, History, Method, RpcRecord, StatusRecord};
use crate::apiserver::kms::{DecryptRequest, EncryptResponse, KmsClient, StatusResponse};

/// A [`KmsClient`] that records into a [`History`] as node `node`.
pub struct Recording {
    inner: Arc<dyn KmsClient>,
    history: History,
    node: usize,
}

impl Recording {
    /// Records `inner`'s calls as node `node`.
    pub fn new(inner: Arc<dyn KmsClient>, history: History, node: usize) -> Self {
        Self { inner, history, node }
    }

    fn record<T>(
        &self,
        method: Method,
        key_id: &str,
        at_ms: u64,
        started: Instant,
        result: &Result<T, tonic::Status>,
    ) {
        let code = match result {
            Ok(_) => "OK".to_owned(),
            Err(status) => code_name(status.code()),
        };
        self.history.record(Event::Rpc(RpcRecord {
            node: self.node,
            method,
            key_id: key_id.to_owned(),
            code,
            at_ms,
            latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }));
    }
}

/// `UNAVAILABLE`, `DEADLINE_EXCEEDED`, …: the names grpc-go logs.
pub fn code_name(code: tonic::Code) -> String {
    let camel = format!("{code:?}");
    let mut name = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    if name == "OK" { "OK".into() } else { name }
}

#[async_trait]
impl KmsClient for Recording {
    async fn status(&self) -> Result<StatusResponse, tonic::Status> {
        let (at_ms, started) = (self.history.now_ms(), Instant::now());
        let result = self.inner.status().await;
        let key_id = result.as_ref().map(|r| r.key_id.clone()).unwrap_or_default();
        self.record(Method::Status, &key_id, at_ms, started, &result);
        if let Ok(r) = &result {
            self.history.record(Event::Status(StatusRecord {
                node: self.node,
                at_ms: self.history.now_ms(),
                key_id: r.key_id.clone(),
                healthz: r.healthz.clone(),
            }));
        }
        result
    }

    async fn encrypt(&self, uid: &str, plaintext: &[u8]) -> Result<EncryptResponse, tonic::Status> {
        let (at_ms, started) = (self.history.now_ms(), Instant::now());
        let result = self.inner.encrypt(uid, plaintext).await;
        let key_id = result.as_ref().map(|r| r.key_id.clone()).unwrap_or_default();
        self.record(Method::Encrypt, &key_id, at_ms, started, &result);
        result
    }

    async fn decrypt(
        &self,
        uid: &str,
        request: &DecryptRequest,
    ) -> Result<Zeroizing<Vec<u8>>, tonic::Status> {
        let (at_ms, started) = (self.history.now_ms(), Instant::now());
        let result = self.inner.decrypt(uid, request).await;
        self.record(Method::Decrypt, &request.key_id, at_ms, started, &result);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_named_as_grpc_go_logs_them() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(code_name(tonic::Code::Unavailable), "UNAVAILABLE");
        assert_eq!(code_name(tonic::Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
        assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
    }
}
