//! The backend contract: what every key service (PKCS#11, Vault, TPM) implements, mirroring the
//! upstream plugin interface (kubernetes/kms `pkg/service/interface.go`). Plain Rust types only;
//! protobuf stays in `grpc`, health and limits stay in the layers (`guard`, `health`).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use secrecy::SecretSlice;

use crate::Result;

/// Annotations the apiserver stores in clear beside the wrapped seed and hands back on Decrypt.
/// Keys must be DNS names with at least two labels (`format.kleidi.dev`).
pub type Annotations = BTreeMap<String, Vec<u8>>;

/// A wrapped secret exactly as the apiserver stores it and returns it for Decrypt. Not secret.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Encrypted {
    /// Opaque bytes only the backend understands; at most 1024 bytes.
    pub ciphertext: Vec<u8>,
    /// The key-encryption key that wrapped it; at most 1024 bytes, never secret.
    pub key_id: String,
    /// Format metadata, authenticated by the backend where it can.
    pub annotations: Annotations,
}

/// A key service that wraps and unwraps small secrets (seeds, DEKs) with a key it never releases.
///
/// Implementations classify their failures into [`crate::Error`] once. They may block on the
/// backend, but every call is bounded by the `guard` layer, so they need no timeouts of their own
/// beyond what keeps a blocked thread from piling up.
#[async_trait]
pub trait KeyService: Send + Sync + 'static {
    /// Short backend name for logs: `pkcs11`, `vault`, `tpm`.
    fn name(&self) -> &'static str;

    /// Wraps `plaintext` with the current key. The returned `key_id` must be the one the last
    /// [`KeyService::current_key_id`] returned, so Status and Encrypt agree.
    async fn encrypt(&self, uid: &str, plaintext: &SecretSlice<u8>) -> Result<Encrypted>;

    /// Unwraps what [`KeyService::encrypt`] produced, with the current or any earlier key the
    /// backend still holds. Checks key_id and annotations before touching the backend.
    async fn decrypt(&self, uid: &str, encrypted: &Encrypted) -> Result<SecretSlice<u8>>;

    /// Looks up which key is current now (a backend round trip at most). Called by the health
    /// layer once per health interval, never once per apiserver poll.
    async fn current_key_id(&self) -> Result<String>;

    /// Whether [`KeyService::current_key_id`] asks the backend itself (PKCS#11, Vault) rather than
    /// local state only (TPM: the state directory). The health layer lets that one call renew a
    /// healthy verdict only when it does; otherwise every probe is an encrypt + decrypt round trip.
    fn key_id_reaches_backend(&self) -> bool {
        true
    }

    /// Seconds until each expiring credential the backend holds expires (negative once expired),
    /// for metrics; read from state the backend already keeps, never a backend call. Default: none.
    fn credential_expiry(&self) -> Vec<(Credential, f64)> {
        Vec::new()
    }

    /// Non-secret facts about the backend's configuration and state, as `(name, value)` pairs, for
    /// `kleidi check` (module and token, transit key and login, TPM state directory). May ask the
    /// backend; never returns a PIN, token, secret_id or key material. Default: none.
    async fn describe(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
}

/// A backend credential whose lifetime kleidi knows.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Credential {
    /// The Vault/OpenBao token kleidi calls with (its lease).
    VaultToken,
    /// The TLS client certificate (`--vault-client-cert`; its notAfter).
    ClientCertificate,
}

#[async_trait]
impl<T: KeyService + ?Sized> KeyService for Arc<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    async fn encrypt(&self, uid: &str, plaintext: &SecretSlice<u8>) -> Result<Encrypted> {
        (**self).encrypt(uid, plaintext).await
    }
    async fn decrypt(&self, uid: &str, encrypted: &Encrypted) -> Result<SecretSlice<u8>> {
        (**self).decrypt(uid, encrypted).await
    }
    async fn current_key_id(&self) -> Result<String> {
        (**self).current_key_id().await
    }
    fn key_id_reaches_backend(&self) -> bool {
        (**self).key_id_reaches_backend()
    }
    fn credential_expiry(&self) -> Vec<(Credential, f64)> {
        (**self).credential_expiry()
    }
    async fn describe(&self) -> Vec<(&'static str, String)> {
        (**self).describe().await
    }
}
