//! The Secrets registry: what kube-apiserver's generic store does for `secrets` between the HTTP
//! handler and etcd — defaulting and validation, `uid`/`creationTimestamp` on create, optimistic
//! concurrency on etcd's `mod_revision` (the `resourceVersion`), the no-op update that still rewrites a
//! value stored under an old key (the storage migration), consistent paged lists with `continue`
//! tokens. Values go through [`Storage`] (protobuf `k8s\0` Secret, then the KMS v2 envelope).

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Preconditions;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::status::ApiError;
use crate::apiserver::object::{self, Keys};
use crate::apiserver::{Storage, StoreError, Versioned};

/// Largest sum of a Secret's data (`MaxSecretSize`, 1 MiB).
const MAX_SECRET_SIZE: usize = 1024 * 1024;
/// How many values one etcd read of an unlimited list takes at a time.
const LIST_PAGE: i64 = 500;
/// Update and delete retry a lost race (the key moved between read and write) this often.
const RETRIES: usize = 10;

/// A page of Secrets: the `SecretList` body without its framing.
#[derive(Debug)]
pub struct ListPage {
    /// The Secrets, each with its `resourceVersion`.
    pub items: Vec<Secret>,
    /// The revision the whole list was read at.
    pub resource_version: i64,
    /// Token for the next page, if any.
    pub continue_token: Option<String>,
    /// How many Secrets the next pages hold (set only when a next page exists).
    pub remaining: Option<i64>,
}

/// kube-apiserver's continue token: base64url (no padding) of this JSON.
#[derive(Debug, Serialize, Deserialize)]
struct ContinueToken {
    v: String,
    rv: i64,
    start: String,
}

const CONTINUE_VERSION: &str = "meta.k8s.io/v1";

/// Secrets over [`Storage`].
#[derive(Clone, Debug)]
pub struct Secrets {
    storage: Storage,
    keys: Keys,
}

impl Secrets {
    /// The registry over `storage`, with keys under `keys` (`--etcd-prefix`).
    pub fn new(storage: Storage, keys: Keys) -> Self {
        Self { storage, keys }
    }

    /// The storage underneath.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    fn resource_prefix(&self) -> String {
        format!("{}/secrets/", self.keys.prefix())
    }

    async fn read(&self, key: &str) -> Result<Option<Stored>, ApiError> {
        let Some(raw) = self
            .storage
            .etcd
            .get_versioned(key.as_bytes())
            .await
            .map_err(internal)?
        else {
            return Ok(None);
        };
        Stored::decode(&self.storage, key, raw).await.map(Some)
    }

    /// GET one Secret.
    pub async fn get(&self, namespace: &str, name: &str) -> Result<Secret, ApiError> {
        match self.read(&self.keys.secret(namespace, name)).await? {
            Some(stored) => Ok(stored.secret),
            None => Err(ApiError::not_found(name)),
        }
    }

    /// LIST, in one namespace or all, `limit` per page (0: all), from a `continue` token.
    pub async fn list(
        &self,
        namespace: Option<&str>,
        limit: i64,
        continue_token: Option<&str>,
    ) -> Result<ListPage, ApiError> {
        let base = self.resource_prefix();
        let prefix = match namespace {
            Some(ns) => format!("{base}{ns}/"),
            None => base.clone(),
        };
        let (start, revision) = match continue_token.filter(|t| !t.is_empty()) {
            Some(token) => {
                let token = decode_continue(token)?;
                let start = format!("{base}{}", token.start);
                if !start.starts_with(&prefix) {
                    return Err(ApiError::bad_request(
                        "continue key is not valid: the token is for another namespace",
                    ));
                }
                (start, token.rv)
            }
            None => (prefix.clone(), 0),
        };
        let limit = limit.max(0);
        let mut items = Vec::new();
        let mut from = start.into_bytes();
        let mut revision = revision;
        loop {
            let want = if limit == 0 {
                LIST_PAGE
            } else {
                limit - i64::try_from(items.len()).unwrap_or(i64::MAX)
            };
            let page = self
                .storage
                .etcd
                .page(prefix.as_bytes(), &from, want, revision)
                .await
                .map_err(|e| {
                    if e.is_compacted() {
                        ApiError::expired()
                    } else {
                        internal(e)
                    }
                })?;
            // Every later page reads the snapshot the first one saw.
            revision = page.revision;
            let last = page.items.last().map(|v| v.key.clone());
            for raw in page.items {
                let key = String::from_utf8_lossy(&raw.key).into_owned();
                items.push(Stored::decode(&self.storage, &key, raw).await?.secret);
            }
            let Some(mut last) = last else {
                return Ok(ListPage {
                    items,
                    resource_version: revision,
                    continue_token: None,
                    remaining: None,
                });
            };
            last.push(0);
            if page.remaining == 0 {
                return Ok(ListPage {
                    items,
                    resource_version: revision,
                    continue_token: None,
                    remaining: None,
                });
            }
            if limit != 0 && i64::try_from(items.len()).unwrap_or(i64::MAX) >= limit {
                let start = String::from_utf8_lossy(&last)
                    .strip_prefix(base.as_str())
                    .unwrap_or_default()
                    .to_owned();
                let token = ContinueToken {
                    v: CONTINUE_VERSION.into(),
                    rv: revision,
                    start,
                };
                let json = serde_json::to_vec(&token).map_err(internal)?;
                return Ok(ListPage {
                    items,
                    resource_version: revision,
                    continue_token: Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)),
                    remaining: Some(page.remaining),
                });
            }
            from = last;
        }
    }

    /// POST: a new Secret in `namespace` (the URL's).
    pub async fn create(&self, namespace: &str, mut secret: Secret) -> Result<(Secret, i64), ApiError> {
        check_namespace(&secret, namespace)?;
        let meta = &mut secret.metadata;
        if meta.name.as_deref().unwrap_or_default().is_empty() {
            match meta.generate_name.as_deref().filter(|g| !g.is_empty()) {
                Some(base) => meta.name = Some(generate_name(base)),
                None => {
                    return Err(ApiError::invalid(
                        "",
                        vec![(
                            "metadata.name".into(),
                            "Required value: name or generateName is required".into(),
                        )],
                    ));
                }
            }
        }
        let name = meta.name.clone().unwrap_or_default();
        // System fields are the server's, whatever the client sent (`FillObjectMetaSystemFields`).
        meta.uid = None;
        meta.creation_timestamp = None;
        meta.deletion_timestamp = None;
        meta.deletion_grace_period_seconds = None;
        meta.self_link = None;
        meta.generation = None;
        let key = self.keys.secret(namespace, &name);
        let mut secret = object::for_key(secret, &key).map_err(|e| ApiError::bad_request(e.to_string()))?;
        default_and_validate(&mut secret, namespace)?;
        let plaintext = Zeroizing::new(object::secret_to_protobuf(&secret));
        match self.storage.put_if(&key, &plaintext, 0).await.map_err(internal)? {
            Some(revision) => {
                secret.metadata.resource_version = Some(revision.to_string());
                Ok((secret, revision))
            }
            None => Err(ApiError::already_exists(&name)),
        }
    }

    /// PUT: replace `name`. With a `resourceVersion` the write happens only on that version (409
    /// otherwise); without, it is unconditional (Secrets allow that). An update that changes nothing
    /// writes nothing — unless the stored value is stale (another key ID), which is then rewritten
    /// under the current one: kube-apiserver's storage migration.
    pub async fn update(&self, namespace: &str, name: &str, secret: Secret) -> Result<Secret, ApiError> {
        check_namespace(&secret, namespace)?;
        match secret.metadata.name.as_deref() {
            Some(n) if n == name => {}
            Some(n) if !n.is_empty() => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
            _ => {}
        }
        let wanted = match secret
            .metadata
            .resource_version
            .as_deref()
            .filter(|v| !v.is_empty())
        {
            None => None,
            Some(v) => Some(
                v.parse::<i64>()
                    .ok()
                    .filter(|v| *v > 0)
                    .ok_or_else(|| ApiError::bad_request(format!("invalid resourceVersion {v:?}")))?,
            ),
        };
        let key = self.keys.secret(namespace, name);
        for _ in 0..RETRIES {
            let Some(old) = self.read(&key).await? else {
                return Err(ApiError::not_found(name));
            };
            if wanted.is_some_and(|w| w != old.revision) {
                return Err(ApiError::conflict(name, ApiError::MODIFIED));
            }
            let mut new = secret.clone();
            let mut causes = Vec::new();
            let (old_uid, new_uid) = (old.secret.metadata.uid.clone(), new.metadata.uid.take());
            if new_uid.as_deref().is_some_and(|u| !u.is_empty()) && new_uid != old_uid {
                causes.push((
                    "metadata.uid".to_owned(),
                    "Invalid value: field is immutable".to_owned(),
                ));
            }
            new.metadata.uid = old_uid;
            new.metadata.creation_timestamp = old.secret.metadata.creation_timestamp.clone();
            new.metadata.self_link = None;
            new.metadata.generation = None;
            if old.secret.immutable == Some(true)
                && (new.immutable != Some(true)
                    || merged_data(&new) != old.secret.data.clone().unwrap_or_default())
            {
                causes.push((
                    "data".to_owned(),
                    "Forbidden: field is immutable when `immutable` is set".to_owned(),
                ));
            }
            if !causes.is_empty() {
                return Err(ApiError::invalid(name, causes));
            }
            let mut new = object::for_key(new, &key).map_err(|e| ApiError::bad_request(e.to_string()))?;
            default_and_validate(&mut new, namespace)?;
            let plaintext = Zeroizing::new(object::secret_to_protobuf(&new));
            if *plaintext == *old.plaintext && !old.stale {
                return Ok(old.secret);
            }
            if let Some(revision) = self
                .storage
                .put_if(&key, &plaintext, old.revision)
                .await
                .map_err(internal)?
            {
                new.metadata.resource_version = Some(revision.to_string());
                return Ok(new);
            }
            if wanted.is_some() {
                return Err(ApiError::conflict(name, ApiError::MODIFIED));
            }
            // Unconditional update that lost a race: read again, as the apiserver's GuaranteedUpdate does.
        }
        Err(ApiError::conflict(name, "too many concurrent writes; try again"))
    }

    /// DELETE `name`, if `preconditions` (uid, resourceVersion) hold; the deleted object.
    pub async fn delete(
        &self,
        namespace: &str,
        name: &str,
        preconditions: Option<Preconditions>,
    ) -> Result<Secret, ApiError> {
        let key = self.keys.secret(namespace, name);
        let preconditions = preconditions.unwrap_or_default();
        for _ in 0..RETRIES {
            let Some(old) = self.read(&key).await? else {
                return Err(ApiError::not_found(name));
            };
            if let Some(uid) = preconditions.uid.as_deref()
                && old.secret.metadata.uid.as_deref() != Some(uid)
            {
                return Err(ApiError::conflict(
                    name,
                    &format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        old.secret.metadata.uid.as_deref().unwrap_or_default()
                    ),
                ));
            }
            if let Some(rv) = preconditions.resource_version.as_deref()
                && rv != old.revision.to_string()
            {
                return Err(ApiError::conflict(
                    name,
                    &format!(
                        "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                        old.revision
                    ),
                ));
            }
            if self
                .storage
                .etcd
                .delete_if(key.as_bytes(), old.revision)
                .await
                .map_err(internal)?
                .is_some()
            {
                return Ok(old.secret);
            }
        }
        Err(ApiError::conflict(name, "too many concurrent writes; try again"))
    }
}

/// A Secret read from etcd and decrypted.
struct Stored {
    secret: Secret,
    plaintext: Zeroizing<Vec<u8>>,
    stale: bool,
    revision: i64,
}

impl Stored {
    async fn decode(storage: &Storage, key: &str, raw: Versioned) -> Result<Self, ApiError> {
        let (plaintext, stale) = storage
            .envelope()?
            .read(key, &raw.value)
            .await
            .map_err(|e| internal(format!("reading {key}: {e}")))?;
        let mut secret =
            object::parse_secret(&plaintext).map_err(|e| internal(format!("decoding {key}: {e}")))?;
        secret.metadata.resource_version = Some(raw.mod_revision.to_string());
        Ok(Self {
            secret,
            plaintext,
            stale,
            revision: raw.mod_revision,
        })
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(e)
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        internal(e)
    }
}

fn decode_continue(token: &str) -> Result<ContinueToken, ApiError> {
    let bad = |why: &str| ApiError::bad_request(format!("continue key is not valid: {why}"));
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|_| bad("not base64"))?;
    let token: ContinueToken = serde_json::from_slice(&json).map_err(|_| bad("not a continue token"))?;
    if token.v != CONTINUE_VERSION {
        return Err(bad(
            "incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
        ));
    }
    if token.rv <= 0 || token.start.is_empty() || token.start.contains("..") || token.start.starts_with('/') {
        return Err(bad("invalid start or resourceVersion"));
    }
    Ok(token)
}

fn check_namespace(secret: &Secret, namespace: &str) -> Result<(), ApiError> {
    match secret.metadata.namespace.as_deref() {
        Some(ns) if !ns.is_empty() && ns != namespace => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => Ok(()),
    }
}

/// `data` with `stringData` merged in, as it will be stored.
fn merged_data(secret: &Secret) -> std::collections::BTreeMap<String, k8s_openapi::ByteString> {
    let mut data = secret.data.clone().unwrap_or_default();
    for (k, v) in secret.string_data.iter().flatten() {
        data.insert(k.clone(), k8s_openapi::ByteString(v.clone().into_bytes()));
    }
    data
}

/// `generateName` + five random characters from the apiserver's alphabet (no vowels, no 0/1/3).
fn generate_name(base: &str) -> String {
    use rand::Rng as _;
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    let suffix: String = (0..5)
        .map(|_| {
            char::from(
                ALPHABET
                    .get(rng.random_range(0..ALPHABET.len()))
                    .copied()
                    .unwrap_or(b'x'),
            )
        })
        .collect();
    let base: String = base.chars().take(253 - 5).collect();
    format!("{base}{suffix}")
}

/// Type `Opaque` when unset; then the checks `ValidateSecret` makes that apply to any type: name and
/// namespace are DNS names, data keys are config keys, the data fits in 1 MiB.
fn default_and_validate(secret: &mut Secret, namespace: &str) -> Result<(), ApiError> {
    if secret.type_.as_deref().unwrap_or_default().is_empty() {
        secret.type_ = Some("Opaque".into());
    }
    let name = secret.metadata.name.clone().unwrap_or_default();
    let mut causes = Vec::new();
    if let Err(why) = dns_subdomain(&name) {
        causes.push((
            "metadata.name".to_owned(),
            format!("Invalid value: {name:?}: {why}"),
        ));
    }
    if let Err(why) = dns_label(namespace) {
        causes.push((
            "metadata.namespace".to_owned(),
            format!("Invalid value: {namespace:?}: {why}"),
        ));
    }
    let mut size = 0usize;
    for (key, value) in secret.data.iter().flatten() {
        if !is_config_key(key) {
            causes.push((
                format!("data[{key}]"),
                format!(
                    "Invalid value: {key:?}: a valid config key must consist of alphanumeric characters, '-', '_' or '.'"
                ),
            ));
        }
        size = size.saturating_add(value.0.len());
    }
    if size > MAX_SECRET_SIZE {
        causes.push((
            "data".to_owned(),
            format!("Too long: may not be more than {MAX_SECRET_SIZE} bytes"),
        ));
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(&name, causes))
    }
}

const RFC1123: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character";

fn dns_label(s: &str) -> Result<(), &'static str> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (at most 63)",
        )
    }
}

fn dns_subdomain(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 253 || s.split('.').any(|label| dns_label(label).is_err()) {
        Err(RFC1123)
    } else {
        Ok(())
    }
}

fn is_config_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key != "."
        && key != ".."
        && !key.starts_with("..")
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_rfc_1123() {
        assert!(dns_subdomain("db-password.v2").is_ok());
        for bad in ["", "Db", "-a", "a-", "a_b", "a..b", &"a".repeat(254)] {
            assert!(dns_subdomain(bad).is_err(), "{bad}");
        }
        assert!(dns_label("kube-system").is_ok());
        assert!(dns_label("a.b").is_err());
    }

    #[test]
    fn config_keys() {
        for good in ["password", "tls.crt", ".dockerconfigjson", "A_b-1"] {
            assert!(is_config_key(good), "{good}");
        }
        for bad in ["", ".", "..", "..a", "a/b", "a b"] {
            assert!(!is_config_key(bad), "{bad}");
        }
    }

    #[test]
    fn continue_tokens_are_kube_apiservers() {
        let json = br#"{"v":"meta.k8s.io/v1","rv":42,"start":"default/b\u0000"}"#;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
        let t = decode_continue(&token).unwrap();
        assert_eq!((t.rv, t.start.as_str()), (42, "default/b\0"));
        assert!(decode_continue("!!").is_err());
        let wrong =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"v":"x","rv":42,"start":"a"}"#);
        assert_eq!(decode_continue(&wrong).unwrap_err().code, 400);
    }

    #[test]
    fn generated_names_are_valid() {
        let n = generate_name("canary-");
        assert!(
            n.starts_with("canary-") && n.len() == 12 && dns_subdomain(&n).is_ok(),
            "{n}"
        );
    }
}
