//! The few Vault HTTP endpoints kleidi calls that vaultrs lacks or types too loosely: transit
//! read-key, encrypt with `key_version` and `associated_data`, decrypt (one ciphertext, or a
//! `batch_input` of several), token lookup-self, and capabilities-self.
//! Secret fields (plaintext, the decrypted answer) are zeroized when the request or response drops;
//! the serialized HTTP body inside reqwest is not (a limit of the HTTP stack, noted in the README).

use std::collections::BTreeMap;

use rustify_derive::Endpoint;
use secrecy::SecretString;
use serde::{Deserialize, Deserializer, Serialize};
use zeroize::Zeroize;

/// `GET {mount}/keys/{name}`: the key's versions and type. Needs `read` on `transit/keys/<key>`.
#[derive(Endpoint)]
#[endpoint(path = "{self.mount}/keys/{self.name}", response = "KeyInfo")]
pub(super) struct ReadKey {
    #[endpoint(skip)]
    pub mount: String,
    #[endpoint(skip)]
    pub name: String,
}

/// What kleidi needs from a transit key.
#[derive(Debug, Deserialize)]
pub(super) struct KeyInfo {
    /// Key type, e.g. `aes256-gcm96`.
    #[serde(rename = "type")]
    pub key_type: String,
    /// Whether the key derives per-context keys (kleidi needs `false`: it binds with associated data).
    #[serde(default)]
    pub derived: bool,
    /// The version new data is encrypted with.
    pub latest_version: u64,
    /// Versions still held; for symmetric keys the value is the version's creation time (unix s).
    #[serde(default)]
    pub keys: BTreeMap<String, serde_json::Value>,
}

/// `POST {mount}/encrypt/{name}` with an explicit version and associated data. Needs `update` on
/// `transit/encrypt/<key>` only; without `create` on the key path it can never create a key.
#[derive(Endpoint)]
#[endpoint(
    path = "{self.mount}/encrypt/{self.name}",
    method = "POST",
    response = "Ciphertext"
)]
pub(super) struct Encrypt {
    #[endpoint(skip)]
    pub mount: String,
    #[endpoint(skip)]
    pub name: String,
    /// Base64 of the seed.
    pub plaintext: String,
    /// Base64 of the binding (see `associated_data` in mod.rs).
    pub associated_data: String,
    /// The version the last Status reported.
    pub key_version: u64,
}

impl Drop for Encrypt {
    fn drop(&mut self) {
        self.plaintext.zeroize();
    }
}

/// Transit's answer to encrypt.
#[derive(Debug, Deserialize)]
pub(super) struct Ciphertext {
    /// `vault:v<N>:<base64>`.
    pub ciphertext: String,
}

/// `POST {mount}/decrypt/{name}`. Needs `update` on `transit/decrypt/<key>`.
#[derive(Endpoint)]
#[endpoint(
    path = "{self.mount}/decrypt/{self.name}",
    method = "POST",
    response = "Plaintext"
)]
pub(super) struct Decrypt {
    #[endpoint(skip)]
    pub mount: String,
    #[endpoint(skip)]
    pub name: String,
    /// `vault:v<N>:<base64>`, as encrypt returned it.
    pub ciphertext: String,
    /// Base64 of the binding; must equal what encrypt was given.
    pub associated_data: String,
}

/// Transit's answer to decrypt: base64 of the seed, held as a secret from the moment it is parsed.
#[derive(Deserialize)]
pub(super) struct Plaintext {
    /// Base64 of the seed.
    #[serde(deserialize_with = "secret_string")]
    pub plaintext: SecretString,
}

/// `POST {mount}/decrypt/{name}` with `batch_input`: several ciphertexts, each with its own
/// associated data, in one request; results come back in the same order. With
/// `partial_failure_response_code` = 207 a batch where only some items fail answers 207 with
/// per-item errors; one where every item fails still answers 400 (and servers that predate the
/// parameter answer 400 for any failure).
#[derive(Endpoint)]
#[endpoint(
    path = "{self.mount}/decrypt/{self.name}",
    method = "POST",
    response = "BatchPlaintexts"
)]
pub(super) struct BatchDecrypt {
    #[endpoint(skip)]
    pub mount: String,
    #[endpoint(skip)]
    pub name: String,
    /// The ciphertexts.
    pub batch_input: Vec<BatchItem>,
    /// 207: see above.
    pub partial_failure_response_code: u16,
}

/// One ciphertext to decrypt (alone or in a batch).
#[derive(Clone, Serialize)]
pub(super) struct BatchItem {
    /// `vault:v<N>:<base64>`, as encrypt returned it.
    pub ciphertext: String,
    /// Base64 of the binding; must equal what encrypt was given.
    pub associated_data: String,
}

/// Transit's answer to a batch decrypt.
#[derive(Deserialize)]
pub(crate) struct BatchPlaintexts {
    /// One result per item, in order.
    pub batch_results: Vec<BatchResult>,
}

/// One item's base64 plaintext (a secret from the moment it is parsed), or why it failed.
#[derive(Deserialize)]
pub(crate) struct BatchResult {
    /// Base64 of the seed; absent or empty when the item failed.
    #[serde(default, deserialize_with = "optional_secret")]
    pub plaintext: Option<SecretString>,
    /// Vault's reason this item failed (never secret: it quotes no plaintext).
    #[serde(default)]
    pub error: String,
}

/// `GET auth/token/lookup-self`: the token's remaining TTL. vaultrs' own response type carries the
/// token itself (`id`) in a Debug-able struct, so kleidi reads only what it needs.
#[derive(Endpoint)]
#[endpoint(path = "auth/token/lookup-self", response = "TokenInfo")]
pub(super) struct LookupSelf {}

/// What kleidi needs from lookup-self.
#[derive(Debug, Deserialize)]
pub(super) struct TokenInfo {
    /// Seconds left; 0 for a token that never expires (root, periodic tokens report their period).
    #[serde(default)]
    pub ttl: u64,
    /// Whether renew-self can extend it.
    #[serde(default)]
    pub renewable: Option<bool>,
}

/// `POST sys/capabilities-self`: what our own token may do on `paths`. Vault's built-in `default`
/// policy grants it. kleidi asks once, at start, whether it could create keys through encrypt.
#[derive(Endpoint)]
#[endpoint(path = "sys/capabilities-self", method = "POST", response = "Capabilities")]
pub(super) struct CapabilitiesSelf {
    /// The paths to ask about; with one path, the answer's `capabilities` are that path's.
    pub paths: Vec<String>,
}

/// The capabilities on the one path asked about (`create`, `update`, `root`, `deny`, …).
#[derive(Debug, Deserialize)]
pub(super) struct Capabilities {
    /// Capability names.
    #[serde(default)]
    pub capabilities: Vec<String>,
}

fn secret_string<'de, D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
    String::deserialize(d).map(SecretString::from)
}

fn optional_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SecretString>, D::Error> {
    Ok(Option::<String>::deserialize(d)?
        .filter(|s| !s.is_empty())
        .map(SecretString::from))
}
