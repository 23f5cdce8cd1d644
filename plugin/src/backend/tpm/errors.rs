//! The one place a TSS or TPM response code becomes a [`crate::Error`]. What a failure means depends
//! on what the TPM was doing, so the caller names its [`Subject`]: a load that fails on a ciphertext
//! is the caller's bad input; the same code on our own KEK means the key is gone from this TPM.

use tss_esapi::Error as TssError;
use tss_esapi::constants::response_code::{Tss2ResponseCode, Tss2ResponseCodeKind as K};

use crate::Error;

pub const BACKEND: &str = "tpm";

/// What the failing command was working on.
#[derive(Clone, Copy, Debug)]
pub enum Subject<'a> {
    /// A ciphertext presented for Decrypt (TPM2_Load of the sealed object, TPM2_Unseal).
    Ciphertext,
    /// Our KEK `key_id` (TPM2_Load from the state directory).
    Kek(&'a str),
    /// Duplicating a shareable KEK under an admin approval (TPM2_VerifySignature,
    /// TPM2_PolicyAuthorize, TPM2_Duplicate): a refusal means the approval does not hold.
    Approval,
    /// TPM2_Import of an export file under this TPM's parent.
    Import,
    /// Anything else: the connection, the primary, sessions, TPM2_Create.
    Tpm,
}

/// Classifies `err` from `op` (our operation, e.g. `"load kek"`) and logs it at debug (the guard
/// layer logs every failed call once). Detail: the operation and the response code, nothing secret.
pub fn classify(op: &str, subject: Subject<'_>, err: TssError) -> Error {
    let error = match err {
        TssError::WrapperError(kind) => Error::Backend(format!("{op}: tss-esapi: {kind}")),
        TssError::Tss2Error(rc) => classify_rc(op, subject, rc),
    };
    tracing::debug!(backend = BACKEND, class = error.class(), "{error}");
    error
}

/// A tss-esapi failure that involves no TPM (building a template, marshalling).
pub fn library(op: &str, err: TssError) -> Error {
    Error::Backend(format!("{op}: tss-esapi: {err}"))
}

pub fn unavailable(class: &'static str, detail: String) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        class,
        detail,
    }
}

/// The classes after which the connection, primary and loaded keys are thrown away and rebuilt on
/// the next call (a restarted TPM forgets every transient object and session).
pub fn needs_reconnect(err: &Error) -> bool {
    matches!(err, Error::Unavailable { .. })
}

fn classify_rc(op: &str, subject: Subject<'_>, rc: Tss2ResponseCode) -> Error {
    let code = raw(rc);
    let layer = code >> 16;
    if layer != 0 {
        // TCTI (10), ESYS (7), SYS (8), MU (9): the TPM did not answer, or answered nonsense.
        return unavailable(
            "tpm_unreachable",
            format!("{op}: TSS layer {layer} returned {code:#x} (is the TPM or swtpm reachable?)"),
        );
    }
    let detail = format!("{op}: TPM returned {code:#x} ({})", kind_name(rc));
    let denied = |class| Error::Denied {
        backend: BACKEND,
        class,
        detail: detail.clone(),
    };
    // TPM_RC_P: a format-one code about a command parameter (not a handle or session).
    let on_parameter = matches!(rc, Tss2ResponseCode::FormatOne(_)) && code & 0x40 != 0;
    match rc.kind() {
        Some(K::Lockout) => denied("lockout"),
        Some(K::AuthFail | K::BadAuth | K::AuthMissing | K::AuthUnavailable) => denied("auth_failed"),
        Some(K::Hierarchy | K::Disabled) => {
            Error::Config(format!("{detail}: the owner hierarchy is disabled on this TPM"))
        }
        Some(K::Initialize) => unavailable("tpm_not_started", detail),
        Some(K::Failure) => unavailable("tpm_failure", detail),
        Some(K::Retry | K::Yielded | K::Testing | K::NvRate | K::NvUnavailable | K::Canceled) => {
            unavailable("tpm_busy", detail)
        }
        Some(
            K::ObjectMemory
            | K::SessionMemory
            | K::Memory
            | K::ObjectHandles
            | K::SessionHandles
            | K::TooManyContexts
            | K::ContextGap,
        ) => unavailable("tpm_resources", detail),
        Some(
            K::ReferenceH0
            | K::ReferenceH1
            | K::ReferenceH2
            | K::ReferenceH3
            | K::ReferenceH4
            | K::ReferenceH5
            | K::ReferenceH6
            | K::ReferenceS0
            | K::ReferenceS1
            | K::ReferenceS2
            | K::ReferenceS3
            | K::ReferenceS4
            | K::ReferenceS5
            | K::ReferenceS6
            | K::Handle
            | K::BadContext
            | K::Sequence,
        ) => unavailable("tpm_reset", detail),
        kind => match subject {
            // The sealed object the client sent does not unmarshal, decrypt or pass its integrity
            // check under this KEK: altered, truncated, or sealed under another key.
            Subject::Ciphertext
                if on_parameter || matches!(kind, Some(K::Integrity | K::Sensitive | K::Private)) =>
            {
                Error::BadCiphertext(format!(
                    "the TPM rejected the sealed seed ({detail}): altered, or sealed under another key"
                ))
            }
            Subject::Kek(key_id) => unavailable(
                "key_lost",
                format!(
                    "{detail}: key {key_id} no longer loads under this TPM's owner primary (TPM \
                     cleared, its state lost, or another TPM); seeds it wrapped cannot be \
                     decrypted here. Restore the TPM's state; kleidi never re-creates a key \
                     (`kleidi tpm init` makes a new one)"
                ),
            ),
            Subject::Approval => Error::Denied {
                backend: BACKEND,
                class: "approval_refused",
                detail: format!(
                    "{detail}: the TPM refused to duplicate the key: the approval is not signed by \
                     the admin key this KEK names (`kleidi tpm init --shareable`), or not for this \
                     target parent"
                ),
            },
            Subject::Import => Error::Config(format!(
                "{detail}: the TPM refused the export file: it was made for another node's parent \
                 (`kleidi tpm export-parent` on this node), or altered"
            )),
            _ => unavailable("tpm_error", detail),
        },
    }
}

/// The numeric TSS2_RC. tss-esapi 7 keeps it private; its Display shows it as `…: 0x…`.
fn raw(rc: Tss2ResponseCode) -> u32 {
    let shown = match rc {
        Tss2ResponseCode::Success => return 0,
        Tss2ResponseCode::FormatZero(z) => z.to_string(),
        Tss2ResponseCode::FormatOne(o) => o.to_string(),
    };
    shown
        .rsplit("0x")
        .next()
        .and_then(|h| u32::from_str_radix(h.trim(), 16).ok())
        .unwrap_or(u32::MAX)
}

fn kind_name(rc: Tss2ResponseCode) -> String {
    rc.kind()
        .map_or_else(|| "unknown".to_owned(), |k| format!("{k:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rc(code: u32) -> TssError {
        TssError::Tss2Error(Tss2ResponseCode::from(code))
    }

    #[test]
    fn response_codes_map_to_stable_classes() {
        let c = |code, subject| classify("op", subject, rc(code));
        // TPM_RC_LOCKOUT, TPM_RC_AUTH_FAIL + session 1, TPM_RC_BAD_AUTH + session 1.
        for code in [0x921, 0x98e, 0x9a2] {
            assert!(matches!(c(code, Subject::Tpm), Error::Denied { .. }), "{code:#x}");
        }
        assert_eq!(c(0x921, Subject::Tpm).class(), "lockout");
        // TSS2_TCTI_RC_IO_ERROR: swtpm gone.
        assert_eq!(c(0xa000a, Subject::Tpm).class(), "tpm_unreachable");
        // TPM_RC_REFERENCE_H0: a handle of ours is not loaded any more (TPM restarted).
        assert_eq!(c(0x910, Subject::Tpm).class(), "tpm_reset");
        assert_eq!(c(0x100, Subject::Tpm).class(), "tpm_not_started");
        // TPM_RC_INTEGRITY on parameter 1 of TPM2_Load.
        let integrity = 0x09f | 0x040 | 0x100;
        assert!(matches!(
            c(integrity, Subject::Ciphertext),
            Error::BadCiphertext(_)
        ));
        let lost = c(integrity, Subject::Kek("tpm:000bab"));
        assert_eq!(lost.class(), "key_lost");
        assert!(lost.to_string().contains("tpm:000bab"), "{lost}");
        assert!(lost.to_string().contains("0x1df"), "{lost}");
        assert!(needs_reconnect(&lost));
        assert!(!needs_reconnect(&c(integrity, Subject::Ciphertext)));
    }
}
