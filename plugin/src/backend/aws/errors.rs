//! The one place an AWS SDK failure becomes an [`Error`], with stable class names:
//! `throttled`, `server_error`, `network` (unavailable, retried by the SDK within the call budget);
//! `key_disabled`, `key_pending_deletion`, `key_unavailable`, `key_missing` (the key cannot be used:
//! never healthy); `permission_denied`, `auth_failed` (denied); bad ciphertext on decrypt.
//! KMS error messages never echo plaintext or credentials; they are kept, cut short.

use std::time::Duration;

use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use super::BACKEND;
use crate::Error;

/// What the failed call was doing: the same code means different things.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    Describe,
    ListRotations,
    Encrypt,
    Decrypt,
}

/// Classifies a failed SDK call; `budget` is the bound the SDK's operation timeout enforced.
pub(super) fn classify<E>(op: Op, budget: Duration, err: SdkError<E>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status().as_u16();
            service(
                op,
                status,
                ctx.err().code().unwrap_or(""),
                ctx.err().message().unwrap_or(""),
            )
        }
        SdkError::TimeoutError(_) => Error::Timeout(budget),
        SdkError::DispatchFailure(failure) if failure.is_timeout() => Error::Timeout(budget),
        // No credentials in the chain, an unreadable profile: found before anything is sent.
        SdkError::DispatchFailure(failure) if failure.is_user() => {
            denied("auth_failed", cut(&DisplayErrorContext(&err).to_string()))
        }
        SdkError::DispatchFailure(_) => unavailable("network", cut(&DisplayErrorContext(&err).to_string())),
        SdkError::ResponseError(_) => Error::Backend(format!(
            "aws-kms: unreadable answer: {}",
            cut(&DisplayErrorContext(&err).to_string())
        )),
        // Identity resolution (the credential chain) fails here in some SDK versions.
        SdkError::ConstructionFailure(_) => {
            let text = cut(&DisplayErrorContext(&err).to_string());
            if text.contains("credential") || text.contains("identity") {
                denied("auth_failed", text)
            } else {
                Error::Backend(format!("aws-kms: cannot build the request: {text}"))
            }
        }
        _ => Error::Backend(format!(
            "aws-kms: {}",
            cut(&DisplayErrorContext(&err).to_string())
        )),
    }
}

/// A KMS error answer by its code (`__type`), HTTP status and message.
pub(super) fn service(op: Op, status: u16, code: &str, message: &str) -> Error {
    let detail = cut(&format!("{code}: {message}"));
    match code {
        "ThrottlingException" | "LimitExceededException" | "TooManyRequestsException" => {
            unavailable("throttled", detail)
        }
        "DisabledException" => unavailable("key_disabled", detail),
        "KMSInvalidStateException" if message.to_ascii_lowercase().contains("pending") => {
            unavailable("key_pending_deletion", detail)
        }
        "KMSInvalidStateException" | "KeyUnavailableException" => unavailable("key_unavailable", detail),
        "NotFoundException" if op != Op::Decrypt => unavailable("key_missing", detail),
        "AccessDeniedException" => denied("permission_denied", detail),
        "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "ExpiredTokenException" => denied("auth_failed", detail),
        // The blob, its key or its encryption context is not what decrypt was given.
        "InvalidCiphertextException"
        | "IncorrectKeyException"
        | "NotFoundException"
        | "ValidationException"
            if op == Op::Decrypt =>
        {
            Error::BadCiphertext(format!("aws-kms: {detail}"))
        }
        "UnsupportedOperationException" | "InvalidKeyUsageException" => Error::Config(format!(
            "the KMS key cannot wrap seeds (kleidi needs a SYMMETRIC_DEFAULT ENCRYPT_DECRYPT key): {detail}"
        )),
        "KMSInternalException" | "DependencyTimeoutException" | "InternalFailure" | "ServiceUnavailable" => {
            unavailable("server_error", detail)
        }
        _ if status >= 500 => unavailable("server_error", format!("HTTP {status}: {detail}")),
        _ if status == 429 => unavailable("throttled", format!("HTTP {status}: {detail}")),
        _ => Error::Backend(format!("aws-kms rejected the request: HTTP {status}: {detail}")),
    }
}

/// The class of a key state DescribeKey reported, when the key cannot encrypt in it.
pub(super) fn key_state_class(state: &str) -> Option<&'static str> {
    match state {
        "Enabled" => None,
        "Disabled" => Some("key_disabled"),
        "PendingDeletion" | "PendingReplicaDeletion" => Some("key_pending_deletion"),
        // PendingImport, Unavailable (custom key store disconnected), Creating, Updating, newer ones.
        _ => Some("key_unavailable"),
    }
}

pub(super) fn unavailable(class: &'static str, detail: String) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        class,
        detail,
    }
}

fn denied(class: &'static str, detail: String) -> Error {
    Error::Denied {
        backend: BACKEND,
        class,
        detail,
    }
}

/// At most 300 bytes of a message, on a character boundary.
fn cut(s: &str) -> String {
    let mut s = s.replace('\n', " ");
    if s.len() > 300 {
        let end = (0..=300).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_and_server_errors_are_unavailable_and_count_against_health() {
        for (code, status, class) in [
            ("ThrottlingException", 400, "throttled"),
            ("KMSInternalException", 500, "server_error"),
            ("SomethingNew", 503, "server_error"),
            ("", 429, "throttled"),
        ] {
            let err = service(Op::Encrypt, status, code, "m");
            assert_eq!(err.class(), class, "{code}");
            assert!(err.affects_health());
            assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
        }
    }

    #[test]
    fn an_unusable_key_is_never_bad_input() {
        let disabled = service(Op::Decrypt, 400, "DisabledException", "key is disabled");
        let pending = service(
            Op::Encrypt,
            400,
            "KMSInvalidStateException",
            "arn:aws:kms:eu-west-1:1:key/k is pending deletion.",
        );
        assert_eq!(
            (disabled.class(), pending.class()),
            ("key_disabled", "key_pending_deletion")
        );
        assert!(disabled.affects_health() && pending.affects_health());
        assert_eq!(key_state_class("PendingDeletion"), Some("key_pending_deletion"));
        assert_eq!(key_state_class("Unavailable"), Some("key_unavailable"));
        assert_eq!(key_state_class("Enabled"), None);
    }

    #[test]
    fn a_refused_ciphertext_is_bad_input_on_decrypt_only() {
        for code in [
            "InvalidCiphertextException",
            "IncorrectKeyException",
            "NotFoundException",
        ] {
            let err = service(Op::Decrypt, 400, code, "");
            assert!(matches!(err, Error::BadCiphertext(_)), "{code}: {err}");
            assert!(!err.affects_health());
        }
        assert_eq!(
            service(Op::Describe, 400, "NotFoundException", "").class(),
            "key_missing"
        );
        assert_eq!(
            service(Op::Decrypt, 400, "AccessDeniedException", "").class(),
            "permission_denied"
        );
        assert_eq!(
            service(Op::Encrypt, 400, "UnrecognizedClientException", "").class(),
            "auth_failed"
        );
    }

    #[test]
    fn messages_are_cut_to_one_short_line() {
        let long = format!("a\nb{}", "é".repeat(400));
        let err = service(Op::Encrypt, 400, "Odd", &long);
        let text = err.to_string();
        assert!(!text.contains('\n'));
        assert!(text.len() < 400, "{}", text.len());
    }
}
