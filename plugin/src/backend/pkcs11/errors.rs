//! Error classification: the one place a PKCS#11 return code becomes a [`crate::Error`], plus the
//! few failures that have no return code (a token that is simply not there, a bad ciphertext).

use cryptoki::error::{Error as CkError, RvError};

use super::BACKEND;
use crate::Error;

pub(super) const TOKEN_LOST: &str = "token_lost";

/// Classifies a cryptoki failure of `function` (our operation, e.g. `"encrypt"`) into the plugin's
/// [`Error`], once, and logs it with its class and return code. The detail names the operation,
/// the C function and the CKR code; never key material or PINs.
///
/// The one context-dependent case is decided by the caller, not here: SoftHSM 2.6 reports a GCM
/// authentication failure in `C_Decrypt` as `CKR_GENERAL_ERROR` (measured), so the decrypt path
/// checks that the token is still present and then reports a bad ciphertext instead.
pub(super) fn classify(function: &str, err: CkError) -> Error {
    let (rv, call) = match &err {
        CkError::Pkcs11(rv, call) => (*rv, *call),
        _ => {
            let error = classify_library(function, &err);
            log_failure(&error, "-");
            return error;
        }
    };
    let rc = rc_name(rv);
    let detail = format!("{function}: C_{call:?} returned {rc}");
    let unavailable = |class: &'static str| Error::Unavailable {
        backend: BACKEND,
        class,
        detail: detail.clone(),
    };
    let denied = |class: &'static str| Error::Denied {
        backend: BACKEND,
        class,
        detail: detail.clone(),
    };
    use RvError as R;
    let error = match rv {
        // The token, its slot, our session or our handles are gone: drop everything and reconnect.
        R::DeviceRemoved
        | R::DeviceError
        | R::GeneralError
        | R::TokenNotPresent
        | R::TokenNotRecognized
        | R::SlotIdInvalid
        | R::SessionHandleInvalid
        | R::SessionClosed
        | R::ObjectHandleInvalid
        | R::KeyHandleInvalid
        | R::UserNotLoggedIn
        | R::CryptokiNotInitialized => unavailable(TOKEN_LOST),
        R::HostMemory | R::DeviceMemory | R::SessionCount => unavailable("resources"),
        R::FunctionFailed | R::FunctionCanceled | R::Cancel => unavailable("function_failed"),
        R::PinIncorrect | R::PinInvalid | R::PinLenRange => denied("pin_incorrect"),
        R::PinLocked => denied("pin_locked"),
        R::PinExpired => denied("pin_expired"),
        R::EncryptedDataInvalid | R::EncryptedDataLenRange => {
            Error::BadCiphertext(format!("the token rejected the ciphertext ({detail})"))
        }
        R::DataInvalid | R::DataLenRange => {
            Error::InvalidRequest(format!("the token rejected the plaintext ({detail})"))
        }
        R::UserPinNotInitialized => Error::Config(format!(
            "{detail}: the token has no user PIN yet; run `kleidi pkcs11 init`"
        )),
        R::MechanismInvalid
        | R::MechanismParamInvalid
        | R::KeyTypeInconsistent
        | R::KeySizeRange
        | R::KeyFunctionNotPermitted
        | R::FunctionNotSupported
        | R::TokenWriteProtected
        | R::TemplateIncomplete
        | R::TemplateInconsistent
        | R::AttributeTypeInvalid
        | R::AttributeValueInvalid
        | R::ActionProhibited => Error::Config(format!(
            "{detail}: the token or key cannot do AES-256-GCM as kleidi needs (an AES key with CKA_ENCRYPT and CKA_DECRYPT)"
        )),
        R::ArgumentsBad | R::BufferTooSmall | R::OperationActive | R::OperationNotInitialized => {
            Error::Backend(detail.clone())
        }
        _ => unavailable("pkcs11_error"),
    };
    log_failure(&error, &rc);
    error
}

/// Failures that are not a PKCS#11 return code: the module itself is unusable, or a conversion.
pub(super) fn classify_library(function: &str, err: &CkError) -> Error {
    match err {
        CkError::LibraryLoading(_)
        | CkError::NullFunctionPointer
        | CkError::MissingSymbol(_)
        | CkError::NotSupported => {
            Error::Config(format!("{function}: the PKCS#11 module cannot do this: {err}"))
        }
        _ => Error::Backend(format!("{function}: {err}")),
    }
}

/// `RvError::SlotIdInvalid` → `CKR_SLOT_ID_INVALID`.
pub(super) fn rc_name(rv: RvError) -> String {
    match rv {
        RvError::VendorDefined(code) => format!("CKR_VENDOR_DEFINED({code:#x})"),
        RvError::UnknownErrorCode(code) => format!("CKR_UNKNOWN({code:#x})"),
        other => {
            let camel = format!("{other:?}");
            let mut name = String::from("CKR_");
            for (i, c) in camel.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    name.push('_');
                }
                name.push(c.to_ascii_uppercase());
            }
            name
        }
    }
}

/// Debug level: the guard layer logs every failed call once, with this error's class and text.
pub(super) fn log_failure(error: &Error, rc: &str) {
    tracing::debug!(backend = BACKEND, class = error.class(), rc, "{error}");
}

/// A client-supplied key_id for an error message: escaped and cut short.
pub(super) fn shown(key_id: &str) -> crate::logging::Client<'_> {
    crate::logging::Client(key_id)
}

pub(super) fn is_lost(err: &Error) -> bool {
    matches!(err, Error::Unavailable { class, .. } if *class == TOKEN_LOST)
}

/// A token_lost failure that has no return code (the token is simply not there); logged like
/// [`classify`]'s.
pub(super) fn token_lost(detail: String) -> Error {
    let error = Error::Unavailable {
        backend: BACKEND,
        class: TOKEN_LOST,
        detail,
    };
    log_failure(&error, "-");
    error
}

pub(super) fn bad_ciphertext(detail: String) -> Error {
    let error = Error::BadCiphertext(detail);
    log_failure(&error, "-");
    error
}

#[cfg(test)]
mod tests {
    use cryptoki::context::Function;

    use super::*;

    #[test]
    fn return_codes_map_to_stable_classes() {
        let c = |rv| classify("op", CkError::Pkcs11(rv, Function::Encrypt));
        for rv in [
            RvError::DeviceRemoved,
            RvError::TokenNotPresent,
            RvError::SessionHandleInvalid,
            RvError::ObjectHandleInvalid,
            RvError::GeneralError,
            RvError::DeviceError,
        ] {
            assert_eq!(c(rv).class(), "token_lost", "{rv:?}");
            assert!(is_lost(&c(rv)));
        }
        assert_eq!(c(RvError::PinIncorrect).class(), "pin_incorrect");
        assert_eq!(c(RvError::PinLocked).class(), "pin_locked");
        assert!(matches!(c(RvError::PinIncorrect), Error::Denied { .. }));
        assert!(matches!(
            c(RvError::EncryptedDataInvalid),
            Error::BadCiphertext(_)
        ));
        assert!(matches!(
            c(RvError::EncryptedDataLenRange),
            Error::BadCiphertext(_)
        ));
        assert!(matches!(c(RvError::DataLenRange), Error::InvalidRequest(_)));
        assert!(matches!(c(RvError::MechanismInvalid), Error::Config(_)));
        let detail = c(RvError::ObjectHandleInvalid).to_string();
        assert!(
            detail.contains("op: C_Encrypt returned CKR_OBJECT_HANDLE_INVALID"),
            "{detail}"
        );
    }
}
