//! kleidi: a Kubernetes KMS plugin. kube-apiserver asks it, over gRPC on a Unix socket, to wrap and
//! unwrap its data-encryption seeds with a key-encryption key that never leaves an external key
//! service (a PKCS#11 HSM, Vault/OpenBao transit, a TPM, AWS KMS).
//!
//! Reading order: [`service`] (the backend trait every backend implements) → [`backend`] (the key
//! services) → [`guard`] and [`health`] (layers around any backend) → [`grpc`] (proto ↔ service
//! types, nothing else) → [`server`] (the socket) → [`config`] (flags); [`check`] is the
//! `kleidi check` preflight. Errors live in [`error`]; what logs look like, in [`logging`].

#![forbid(unsafe_code)]

pub mod authority;
pub mod backend;
pub mod check;
pub mod config;
pub mod credfile;
pub mod error;
pub mod grpc;
pub mod guard;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod process;
pub mod server;
pub mod service;

pub use error::{Error, Result};
pub use service::{Encrypted, KeyService};

/// Generated protobuf and gRPC code (server and client) for the services kube-apiserver calls.
pub mod proto {
    /// `v2.KeyManagementService` (kubernetes/kms apis/v2).
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod v2 {
        tonic::include_proto!("v2");
    }
    /// `v1beta1.KeyManagementService` (kubernetes/kms apis/v1beta1), deprecated upstream.
    #[allow(missing_docs, deprecated, clippy::all, clippy::pedantic)]
    pub mod v1beta1 {
        tonic::include_proto!("v1beta1");
    }
    /// Debug for the messages that carry a seed in clear (build.rs skips prost's derive for them):
    /// every other field as prost would print it, the seed as its length only.
    mod redacted {
        use std::fmt;

        use super::{v1beta1, v2};

        /// Stands in for a plaintext in Debug output.
        struct Redacted(usize);

        impl fmt::Debug for Redacted {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "[REDACTED {} bytes]", self.0)
            }
        }

        impl fmt::Debug for v2::EncryptRequest {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct("EncryptRequest")
                    .field("plaintext", &Redacted(self.plaintext.len()))
                    .field("uid", &self.uid)
                    .finish()
            }
        }

        impl fmt::Debug for v2::DecryptResponse {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct("DecryptResponse")
                    .field("plaintext", &Redacted(self.plaintext.len()))
                    .finish()
            }
        }

        impl fmt::Debug for v1beta1::EncryptRequest {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct("EncryptRequest")
                    .field("version", &self.version)
                    .field("plain", &Redacted(self.plain.len()))
                    .finish()
            }
        }

        impl fmt::Debug for v1beta1::DecryptResponse {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct("DecryptResponse")
                    .field("plain", &Redacted(self.plain.len()))
                    .finish()
            }
        }

        #[cfg(test)]
        mod tests {
            use super::{v1beta1, v2};

            const SEED: [u8; 32] = [
                0xc3, 0x11, 0xfe, 0x42, 0x00, 0x9a, 0x7b, 0x5e, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24,
            ];

            /// The seed as Debug of a `Vec<u8>` (what prost's derive printed), hex, and raw text.
            fn forms() -> Vec<String> {
                let list: Vec<String> = SEED.iter().take(8).map(u8::to_string).collect();
                vec![
                    list.join(", "),
                    hex::encode(SEED),
                    hex::encode_upper(SEED),
                    String::from_utf8_lossy(&SEED).into_owned(),
                ]
            }

            fn assert_redacted(what: &str, debug: String) {
                for form in forms() {
                    assert!(!debug.contains(&form), "{what} prints the seed: {debug}");
                }
                assert!(debug.contains("[REDACTED 32 bytes]"), "{what}: {debug}");
            }

            #[test]
            fn messages_that_carry_a_seed_print_its_length_only() {
                let shown = [
                    (
                        "v2 EncryptRequest",
                        format!(
                            "{:?}",
                            v2::EncryptRequest {
                                plaintext: SEED.to_vec(),
                                uid: "u-1".into()
                            }
                        ),
                    ),
                    (
                        "v2 DecryptResponse",
                        format!(
                            "{:#?}",
                            v2::DecryptResponse {
                                plaintext: SEED.to_vec()
                            }
                        ),
                    ),
                    (
                        "v1beta1 EncryptRequest",
                        format!(
                            "{:?}",
                            v1beta1::EncryptRequest {
                                version: "v1beta1".into(),
                                plain: SEED.to_vec()
                            }
                        ),
                    ),
                    (
                        "v1beta1 DecryptResponse",
                        format!("{:#?}", v1beta1::DecryptResponse { plain: SEED.to_vec() }),
                    ),
                ];
                for (what, debug) in shown {
                    assert_redacted(what, debug);
                }
                // What is not secret still shows, so logs of a request stay useful.
                let req = v2::EncryptRequest {
                    plaintext: SEED.to_vec(),
                    uid: "u-1".into(),
                };
                assert!(format!("{req:?}").contains("u-1"));
            }
        }
    }
    /// kleidi's own wrapping of a KMS v1 `cipher` (key_id and annotations travel inside it).
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod envelope {
        tonic::include_proto!("kleidi.v1beta1");
    }
}

/// Entry points for fuzz/ only; not API. The parsers of bytes a client or a stored value controls
/// that live in private backend modules, re-exported (or, where their types are private, wrapped)
/// so the fuzz targets call exactly what a decrypt runs. Everything else they need is public.
#[doc(hidden)]
pub mod fuzzing {
    /// The PKCS#11 backend's key_ids and ciphertext layout.
    #[cfg(feature = "pkcs11")]
    pub mod pkcs11 {
        pub use crate::backend::pkcs11::format::{key_id_for, parse_key_id, split_ciphertext};
    }

    /// The TPM backend's key_ids, ciphertext (a sealed object) and the object encoding its state
    /// directory stores.
    #[cfg(feature = "tpm")]
    pub mod tpm {
        pub use crate::backend::tpm::format::{Blob, key_id, open_ciphertext, parse_key_id, sealed_template};
    }

    /// The Vault backend's checks before a decrypt reaches Vault, and its reading of transit's
    /// batch-decrypt answer.
    #[cfg(feature = "vault")]
    pub mod vault {
        use crate::backend::vault::{api, batch};
        use crate::service::Encrypted;
        use crate::{Error, Result};

        /// The transit ciphertext a decrypt would send, or why it is refused; `key_id_prefix` is
        /// `vault:<mount>/<key>:v`.
        pub fn check_decrypt(key_id_prefix: &str, encrypted: &Encrypted) -> Result<String> {
            crate::backend::vault::check_decrypt(key_id_prefix, encrypted)
        }

        /// The `data` of a batch-decrypt answer read as kleidi reads it: each item's plaintext
        /// length, or why it failed.
        pub fn batch_answer(json: &[u8]) -> Result<Vec<Result<usize>>> {
            let answer: api::BatchPlaintexts =
                serde_json::from_slice(json).map_err(|e| Error::Backend(e.to_string()))?;
            Ok(answer
                .batch_results
                .into_iter()
                .map(|r| batch::plaintext_of(r).map(|p| secrecy::ExposeSecret::expose_secret(&*p).len()))
                .collect())
        }
    }
}
