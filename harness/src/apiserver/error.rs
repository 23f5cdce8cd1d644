//! The one error type of the envelope role. Messages name the rule or step that failed and never carry
//! plaintext, seeds, DEKs or wrapped keys; key IDs and annotation keys are not secret (spec 2.3) and may
//! appear.

use std::time::Duration;

use super::encrypted_object::Violation;

/// Everything that can go wrong while playing kube-apiserver's KMS v2 envelope role.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The provider name is empty or contains `:` (apiserver config validation).
    #[error("invalid KMS provider name {0:?}: must be non-empty and contain no ':'")]
    ProviderName(String),
    /// The etcd value does not start with this provider's `k8s:enc:kms:v2:<name>:`.
    #[error("value does not start with {expected:?}; it looks like: {found}")]
    WrongPrefix {
        /// The prefix this envelope reads and writes.
        expected: String,
        /// What the value looks like instead (an audit class label, never its bytes).
        found: &'static str,
    },
    /// The bytes after the prefix are not a protobuf `EncryptedObject`.
    #[error("EncryptedObject does not decode as protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A stored object or a plugin response breaks one of the apiserver's rules (spec 2.1).
    #[error("apiserver validation failed: {0}")]
    Invalid(#[from] Violation),
    /// No write state yet: the plugin has not answered a good Status + Encrypt since start.
    #[error(
        "no KMS v2 write state: the plugin has not been healthy since start (got unexpected nil transformer)"
    )]
    NoState,
    /// Writes are refused once the last good key check is more than 3 minutes old.
    #[error(
        "encryptedDEKSource with keyID hash {key_id_hash} expired {ago:?} ago (3 min after the last good Status)"
    )]
    Expired {
        /// `sha256:<hex>` of the write state's key ID, as the apiserver logs it.
        key_id_hash: String,
        /// How long ago the state expired.
        ago: Duration,
    },
    /// The plugin could not be reached over its Unix socket.
    #[error("cannot connect to the KMS plugin at {path}: {reason}")]
    Connect {
        /// Socket path.
        path: String,
        /// Transport error text.
        reason: String,
    },
    /// A Status, Encrypt or Decrypt RPC returned a gRPC error (or timed out).
    #[error("{method} RPC failed with {code:?}: {message}")]
    Rpc {
        /// `Status`, `Encrypt` or `Decrypt`.
        method: &'static str,
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message sent by the plugin.
        message: String,
    },
    /// Encrypt answered with a key ID other than the one Status reported.
    #[error(
        "Encrypt returned keyID hash {encrypt_hash} but Status reported {status_hash}; keeping the old state"
    )]
    KeyIdMismatch {
        /// `sha256:<hex>` of Status's key ID.
        status_hash: String,
        /// `sha256:<hex>` of Encrypt's key ID.
        encrypt_hash: String,
    },
    /// Status's `healthz` is not `"ok"`; the text is the plugin's.
    #[error("got unexpected healthz status: {0}")]
    Healthz(String),
    /// Status's version is neither `"v2"` nor `"v2beta1"`.
    #[error("expected KMSv2 API version v2 or v2beta1, got {0:?}")]
    Version(String),
    /// Status's version changed after the first accepted reply.
    #[error(
        "KMSv2 API version should not change after the initial status response version {first}, got {got}"
    )]
    VersionChanged {
        /// The first accepted version.
        first: String,
        /// The version now.
        got: String,
    },
    /// Status was answered but the plugin is not healthy; every problem found is listed.
    #[error("kms v2 provider {provider} is not healthy: {}", join(.problems))]
    Unhealthy {
        /// Provider name.
        provider: String,
        /// Each failed check, in the apiserver's order.
        problems: Vec<Error>,
    },
    /// The plaintext Decrypt returned has the wrong length for the stored type.
    #[error("decrypted DEK source is {len} bytes; {mode} needs {need}")]
    DekSourceLength {
        /// `AES_GCM_KEY` or `HKDF_SHA256_XNONCE_AES_GCM_SEED`.
        mode: &'static str,
        /// The accepted lengths.
        need: &'static str,
        /// The length received.
        len: usize,
    },
    /// `encryptedData` is too short for its layout.
    #[error("encryptedData is {len} bytes, shorter than the {need} bytes its layout needs")]
    TooShort {
        /// Minimum length of the layout.
        need: usize,
        /// Length found.
        len: usize,
    },
    /// AES-GCM refused the data: wrong key, wrong AAD (the value was moved to another etcd key) or a
    /// modified ciphertext, nonce or tag.
    #[error(
        "AES-GCM authentication failed: wrong key, wrong AAD (value moved to another etcd key?) or tampered data"
    )]
    Authentication,
    /// Seed mode derives keys per etcd key; an empty key is refused (upstream panics).
    #[error("the etcd key (AAD) is empty")]
    EmptyAad,
    /// AES-GCM could not seal (the plaintext exceeds GCM's limit).
    #[error("AES-GCM seal failed: plaintext too long")]
    Seal,
}

impl Error {
    /// An RPC failure, keeping the gRPC code.
    pub(crate) fn rpc(method: &'static str, status: &tonic::Status) -> Self {
        Self::Rpc {
            method,
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

fn join(problems: &[Error]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
