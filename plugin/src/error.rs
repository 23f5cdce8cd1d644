//! One error type for the whole plugin and its single mapping to a gRPC status.
//!
//! Backends classify their own failures into these variants once (see each backend's
//! `classify`); nothing else decides a status code. Error text never carries key material,
//! plaintext, PINs or tokens: variants hold only static class names and non-secret detail.

use std::time::Duration;

/// Result with the plugin's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong answering a KMS call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request itself is unusable: empty or oversized plaintext, a wrong protocol version, a
    /// malformed field. The caller's fault; does not affect health.
    #[error("invalid request: {0}")]
    InvalidRequest(String),

    /// The ciphertext (or its key_id / annotations) was not produced by this plugin, names a key the
    /// backend does not have, or failed authentication. Never retried; does not affect health.
    #[error("cannot decrypt: {0}")]
    BadCiphertext(String),

    /// The backend could not be reached or is not serving (token gone, server sealed or down,
    /// network). `class` is a stable name for logs and alerts, e.g. `token_lost`, `sealed`.
    #[error("backend {backend} unavailable ({class}): {detail}")]
    Unavailable {
        /// Which backend: `pkcs11`, `vault`, `tpm`.
        backend: &'static str,
        /// Stable failure class.
        class: &'static str,
        /// Non-secret detail (return code, HTTP status).
        detail: String,
    },

    /// The backend refused our credentials or permissions (wrong PIN, denied policy). Not retried
    /// automatically where retrying could lock the token.
    #[error("backend {backend} denied access ({class}): {detail}")]
    Denied {
        /// Which backend.
        backend: &'static str,
        /// Stable failure class, e.g. `pin_incorrect`, `permission_denied`.
        class: &'static str,
        /// Non-secret detail.
        detail: String,
    },

    /// The backend did not answer within the per-call bound (kept well below the apiserver's 3 s).
    #[error("backend did not answer within {0:?}")]
    Timeout(Duration),

    /// The backend answered something it must not (a lie): wrong length, an unknown key_id for the
    /// current key, a decrypt that does not round-trip.
    #[error("backend misbehaved: {0}")]
    Backend(String),

    /// A configured feature that this build or version does not have yet.
    #[error("not implemented: {0}")]
    NotImplemented(String),

    /// Configuration that cannot work (unreadable PIN file, unknown key label at startup).
    #[error("configuration: {0}")]
    Config(String),
}

impl Error {
    /// Whether this failure says something about the backend's health. Bad input does not:
    /// a tampered ciphertext must not make the plugin look down to the apiserver.
    pub fn affects_health(&self) -> bool {
        !matches!(self, Error::InvalidRequest(_) | Error::BadCiphertext(_))
    }

    /// A stable one-word class for logs and metrics.
    pub fn class(&self) -> &'static str {
        match self {
            Error::InvalidRequest(_) => "invalid_request",
            Error::BadCiphertext(_) => "bad_ciphertext",
            Error::Unavailable { class, .. } | Error::Denied { class, .. } => class,
            Error::Timeout(_) => "timeout",
            Error::Backend(_) => "backend_misbehaved",
            Error::NotImplemented(_) => "not_implemented",
            Error::Config(_) => "config",
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let msg = err.to_string();
        match err {
            Error::InvalidRequest(_) | Error::BadCiphertext(_) => tonic::Status::invalid_argument(msg),
            Error::Unavailable { .. } => tonic::Status::unavailable(msg),
            Error::Denied { .. } => tonic::Status::permission_denied(msg),
            Error::Timeout(_) => tonic::Status::deadline_exceeded(msg),
            Error::Backend(_) => tonic::Status::internal(msg),
            Error::NotImplemented(_) => tonic::Status::unimplemented(msg),
            Error::Config(_) => tonic::Status::failed_precondition(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_maps_to_invalid_argument_and_spares_health() {
        for err in [
            Error::InvalidRequest("x".into()),
            Error::BadCiphertext("y".into()),
        ] {
            assert!(!err.affects_health());
            assert_eq!(tonic::Status::from(err).code(), tonic::Code::InvalidArgument);
        }
    }

    #[test]
    fn unreachable_backend_maps_to_unavailable_and_counts_against_health() {
        let err = Error::Unavailable {
            backend: "pkcs11",
            class: "token_lost",
            detail: "CKR_X".into(),
        };
        assert!(err.affects_health());
        assert_eq!(err.class(), "token_lost");
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    }
}
