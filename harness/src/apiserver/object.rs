//! What kube-apiserver encrypts: the storage serialization of an object, and the etcd key it lives
//! under (the AAD). Secrets are built and parsed as the protobuf `k8s\0` + `runtime.Unknown` envelope
//! (the apiserver's default storage media type) or as JSON. Not here: encryption ([`super::envelope`]).
//!
//! The protobuf writer sets every field Go's generated marshallers always write (empty strings,
//! zero generation, a `creationTimestamp` message), so re-encoding a stored object gives its bytes back.
//! One known difference: a map entry with an empty value (`data: {k: ""}`) loses its `12 00` with prost.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::jiff::Timestamp;
use k8s_pb::api::core::v1 as pb_core;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as pb_meta;
use k8s_pb::apimachinery::pkg::runtime::{TypeMeta, Unknown};
use prost::Message;

/// The magic in front of every protobuf-encoded object in etcd.
pub const PROTOBUF_MAGIC: &[u8] = b"k8s\0";
/// `--etcd-prefix` default.
pub const DEFAULT_PREFIX: &str = "/registry";

/// How an object is serialized for storage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encoding {
    /// `application/vnd.kubernetes.protobuf` (the default for core types).
    #[default]
    Protobuf,
    /// `application/json`.
    Json,
}

/// Why bytes are not a stored Secret. Never carries object contents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectError {
    /// Neither `k8s\0` protobuf nor a JSON object.
    #[error("not a stored object: neither the k8s\\0 protobuf magic nor a JSON object")]
    NotAnObject,
    /// The protobuf envelope or the object inside does not decode.
    #[error("protobuf does not decode: {0}")]
    Protobuf(#[from] prost::DecodeError),
    /// The object is not a v1 Secret.
    #[error("expected v1 Secret, found apiVersion {api_version:?} kind {kind:?}")]
    WrongKind {
        /// apiVersion found.
        api_version: String,
        /// kind found.
        kind: String,
    },
    /// The JSON does not parse as a Secret (position and category only: the text may hold secrets).
    #[error("JSON Secret does not parse: {category:?} error at line {line} column {column}")]
    Json {
        /// serde_json's error category.
        category: serde_json::error::Category,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
    },
    /// The etcd key is not `…/secrets/<namespace>/<name>`, or names another object than the Secret.
    #[error("key {0:?} is not <prefix>/secrets/<namespace>/<name> of this Secret")]
    Key(String),
    /// A timestamp is outside the representable range.
    #[error("timestamp {0} s is out of range")]
    Time(i64),
}

impl From<serde_json::Error> for ObjectError {
    fn from(e: serde_json::Error) -> Self {
        Self::Json {
            category: e.classify(),
            line: e.line(),
            column: e.column(),
        }
    }
}

/// Builds etcd keys: `<prefix>/<resource>/<namespace>/<name>`, the prefix normalised like the
/// apiserver's `path.Join("/", prefix)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl Keys {
    /// Keys under `prefix` (`--etcd-prefix`).
    pub fn new(prefix: &str) -> Self {
        let parts: Vec<&str> = prefix.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
        Self {
            prefix: format!("/{}", parts.join("/")).trim_end_matches('/').to_owned(),
        }
    }

    /// The normalised prefix (`/registry`; empty for the root).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Key of a namespaced object.
    pub fn object(&self, resource: &str, namespace: &str, name: &str) -> String {
        format!("{}/{resource}/{namespace}/{name}", self.prefix)
    }

    /// Key of a Secret.
    pub fn secret(&self, namespace: &str, name: &str) -> String {
        self.object("secrets", namespace, name)
    }
}

/// A Secret as the apiserver would store it after a create: type `Opaque`, a fresh UID and the
/// creation time in whole seconds.
pub fn new_secret(namespace: &str, name: &str, data: BTreeMap<String, Vec<u8>>) -> Secret {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    let now = Timestamp::from_second(seconds).unwrap_or(Timestamp::UNIX_EPOCH);
    Secret {
        metadata: meta::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            uid: Some(uuid::Uuid::new_v4().to_string()),
            creation_timestamp: Some(meta::Time(now)),
            ..Default::default()
        },
        data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
        type_: Some("Opaque".to_owned()),
        ..Default::default()
    }
}

/// Makes a Secret someone hands in (say `kubectl get secret -o json`) what the apiserver would store at
/// `key` (`…/secrets/<namespace>/<name>`): name and namespace from the key where absent (a mismatch is an
/// error), a UID and creation time where absent, `stringData` merged into `data`, and no
/// `resourceVersion` (etcd's revision is the resource version; it is never stored).
pub fn for_key(mut secret: Secret, key: &str) -> Result<Secret, ObjectError> {
    let mut parts = key.rsplit('/');
    let (name, namespace, resource) = (parts.next(), parts.next(), parts.next());
    let (Some(name), Some(namespace), Some("secrets")) = (name, namespace, resource) else {
        return Err(ObjectError::Key(key.to_owned()));
    };
    if name.is_empty() || namespace.is_empty() {
        return Err(ObjectError::Key(key.to_owned()));
    }
    let meta = &mut secret.metadata;
    for (field, want) in [(&mut meta.name, name), (&mut meta.namespace, namespace)] {
        match field.as_deref() {
            None | Some("") => *field = Some(want.to_owned()),
            Some(have) if have == want => {}
            Some(_) => return Err(ObjectError::Key(key.to_owned())),
        }
    }
    let template = new_secret(namespace, name, BTreeMap::new()).metadata;
    meta.uid = meta.uid.take().filter(|u| !u.is_empty()).or(template.uid);
    meta.creation_timestamp = meta.creation_timestamp.take().or(template.creation_timestamp);
    meta.resource_version = None;
    if let Some(strings) = secret.string_data.take() {
        let data = secret.data.get_or_insert_with(BTreeMap::new);
        data.extend(strings.into_iter().map(|(k, v)| (k, ByteString(v.into_bytes()))));
    }
    Ok(secret)
}

/// Serializes a Secret for storage.
pub fn encode_secret(secret: &Secret, encoding: Encoding) -> Result<Vec<u8>, ObjectError> {
    match encoding {
        Encoding::Protobuf => Ok(secret_to_protobuf(secret)),
        Encoding::Json => secret_to_json(secret),
    }
}

/// `k8s\0` ‖ `runtime.Unknown{typeMeta{v1, Secret}, raw = Secret, contentEncoding "", contentType ""}`.
pub fn secret_to_protobuf(secret: &Secret) -> Vec<u8> {
    let raw = pb_core::Secret {
        metadata: Some(meta_to_pb(&secret.metadata)),
        data: secret
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect(),
        string_data: secret.string_data.clone().unwrap_or_default(),
        r#type: Some(secret.type_.clone().unwrap_or_default()),
        immutable: secret.immutable,
    };
    let unknown = Unknown {
        type_meta: Some(TypeMeta {
            api_version: Some("v1".into()),
            kind: Some("Secret".into()),
        }),
        raw: Some(raw.encode_to_vec()),
        content_encoding: Some(String::new()),
        content_type: Some(String::new()),
    };
    [PROTOBUF_MAGIC, unknown.encode_to_vec().as_slice()].concat()
}

/// The JSON form, with `apiVersion`/`kind` and the trailing newline Go's JSON serializer writes.
pub fn secret_to_json(secret: &Secret) -> Result<Vec<u8>, ObjectError> {
    let mut out = serde_json::to_vec(secret)?;
    out.push(b'\n');
    Ok(out)
}

/// Which encoding `bytes` are in, if any.
pub fn detect(bytes: &[u8]) -> Option<Encoding> {
    if bytes.starts_with(PROTOBUF_MAGIC) {
        return Some(Encoding::Protobuf);
    }
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Some(Encoding::Json),
        _ => None,
    }
}

/// Parses a stored Secret in either encoding.
pub fn parse_secret(bytes: &[u8]) -> Result<Secret, ObjectError> {
    match detect(bytes) {
        Some(Encoding::Protobuf) => parse_protobuf(bytes.get(PROTOBUF_MAGIC.len()..).unwrap_or_default()),
        Some(Encoding::Json) => {
            let value: serde_json::Value = serde_json::from_slice(bytes)?;
            let field = |name: &str| {
                value
                    .get(name)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned()
            };
            let (api_version, kind) = (field("apiVersion"), field("kind"));
            if api_version != "v1" || kind != "Secret" {
                return Err(ObjectError::WrongKind { api_version, kind });
            }
            Ok(serde_json::from_value(value)?)
        }
        None => Err(ObjectError::NotAnObject),
    }
}

fn parse_protobuf(bytes: &[u8]) -> Result<Secret, ObjectError> {
    let unknown = Unknown::decode(bytes)?;
    let type_meta = unknown.type_meta.unwrap_or_default();
    let (api_version, kind) = (
        type_meta.api_version.unwrap_or_default(),
        type_meta.kind.unwrap_or_default(),
    );
    if api_version != "v1" || kind != "Secret" {
        return Err(ObjectError::WrongKind { api_version, kind });
    }
    let raw = pb_core::Secret::decode(unknown.raw.unwrap_or_default().as_slice())?;
    let maybe_map = |m: BTreeMap<String, String>| (!m.is_empty()).then_some(m);
    Ok(Secret {
        metadata: meta_from_pb(raw.metadata.unwrap_or_default())?,
        data: (!raw.data.is_empty()).then(|| raw.data.into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
        string_data: maybe_map(raw.string_data),
        type_: non_empty(raw.r#type),
        immutable: raw.immutable,
    })
}

/// Go value fields (always written) become `Some(default)`; pointer fields stay optional.
fn meta_to_pb(m: &meta::ObjectMeta) -> pb_meta::ObjectMeta {
    let text = |s: &Option<String>| Some(s.clone().unwrap_or_default());
    pb_meta::ObjectMeta {
        name: text(&m.name),
        generate_name: text(&m.generate_name),
        namespace: text(&m.namespace),
        self_link: text(&m.self_link),
        uid: text(&m.uid),
        resource_version: text(&m.resource_version),
        generation: Some(m.generation.unwrap_or_default()),
        // A zero metav1.Time marshals to an empty message.
        creation_timestamp: Some(m.creation_timestamp.as_ref().map(time_to_pb).unwrap_or_default()),
        deletion_timestamp: m.deletion_timestamp.as_ref().map(time_to_pb),
        deletion_grace_period_seconds: m.deletion_grace_period_seconds,
        labels: m.labels.clone().unwrap_or_default(),
        annotations: m.annotations.clone().unwrap_or_default(),
        owner_references: m
            .owner_references
            .iter()
            .flatten()
            .map(|o| pb_meta::OwnerReference {
                api_version: Some(o.api_version.clone()),
                kind: Some(o.kind.clone()),
                name: Some(o.name.clone()),
                uid: Some(o.uid.clone()),
                controller: o.controller,
                block_owner_deletion: o.block_owner_deletion,
            })
            .collect(),
        finalizers: m.finalizers.clone().unwrap_or_default(),
        managed_fields: m
            .managed_fields
            .iter()
            .flatten()
            .map(|f| pb_meta::ManagedFieldsEntry {
                manager: text(&f.manager),
                operation: text(&f.operation),
                api_version: text(&f.api_version),
                time: f.time.as_ref().map(time_to_pb),
                fields_type: text(&f.fields_type),
                fields_v1: f.fields_v1.as_ref().map(|v| pb_meta::FieldsV1 {
                    raw: serde_json::to_vec(&v.0).ok(),
                }),
                subresource: text(&f.subresource),
            })
            .collect(),
    }
}

fn meta_from_pb(m: pb_meta::ObjectMeta) -> Result<meta::ObjectMeta, ObjectError> {
    let maybe_vec = |v: Vec<String>| (!v.is_empty()).then_some(v);
    let maybe_map = |m: BTreeMap<String, String>| (!m.is_empty()).then_some(m);
    let mut managed = Vec::with_capacity(m.managed_fields.len());
    for f in m.managed_fields {
        managed.push(meta::ManagedFieldsEntry {
            manager: non_empty(f.manager),
            operation: non_empty(f.operation),
            api_version: non_empty(f.api_version),
            time: time_from_pb(f.time)?,
            fields_type: non_empty(f.fields_type),
            fields_v1: match f.fields_v1.and_then(|v| v.raw) {
                Some(raw) => Some(meta::FieldsV1(serde_json::from_slice(&raw)?)),
                None => None,
            },
            subresource: non_empty(f.subresource),
        });
    }
    Ok(meta::ObjectMeta {
        name: non_empty(m.name),
        generate_name: non_empty(m.generate_name),
        namespace: non_empty(m.namespace),
        self_link: non_empty(m.self_link),
        uid: non_empty(m.uid),
        resource_version: non_empty(m.resource_version),
        generation: m.generation.filter(|g| *g != 0),
        creation_timestamp: time_from_pb(m.creation_timestamp)?,
        deletion_timestamp: time_from_pb(m.deletion_timestamp)?,
        deletion_grace_period_seconds: m.deletion_grace_period_seconds,
        labels: maybe_map(m.labels),
        annotations: maybe_map(m.annotations),
        owner_references: (!m.owner_references.is_empty()).then(|| {
            m.owner_references
                .into_iter()
                .map(|o| meta::OwnerReference {
                    api_version: o.api_version.unwrap_or_default(),
                    kind: o.kind.unwrap_or_default(),
                    name: o.name.unwrap_or_default(),
                    uid: o.uid.unwrap_or_default(),
                    controller: o.controller,
                    block_owner_deletion: o.block_owner_deletion,
                })
                .collect()
        }),
        finalizers: maybe_vec(m.finalizers),
        managed_fields: (!managed.is_empty()).then_some(managed),
    })
}

/// metav1.Time keeps whole seconds on the wire (nanos always 0).
fn time_to_pb(t: &meta::Time) -> pb_meta::Time {
    pb_meta::Time {
        seconds: Some(t.0.as_second()),
        nanos: Some(0),
    }
}

/// An empty message is the zero time, i.e. unset.
fn time_from_pb(t: Option<pb_meta::Time>) -> Result<Option<meta::Time>, ObjectError> {
    match t {
        None | Some(pb_meta::Time { seconds: None, .. }) => Ok(None),
        Some(pb_meta::Time { seconds: Some(s), .. }) => Timestamp::from_second(s)
            .map(|t| Some(meta::Time(t)))
            .map_err(|_| ObjectError::Time(s)),
    }
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        let mut s = new_secret(
            "default",
            "db",
            BTreeMap::from([("password".to_owned(), b"hunter2".to_vec())]),
        );
        s.metadata.labels = Some(BTreeMap::from([("app".to_owned(), "db".to_owned())]));
        s
    }

    #[test]
    fn keys_follow_the_etcd_prefix_like_path_join() {
        assert_eq!(
            Keys::default().secret("default", "db"),
            "/registry/secrets/default/db"
        );
        assert_eq!(Keys::new("registry/").secret("a", "b"), "/registry/secrets/a/b");
        assert_eq!(
            Keys::new("/43da1478-5e9c-4ef3-a92a-2b19d540c8a5/registry").object("secrets", "ns", "n"),
            "/43da1478-5e9c-4ef3-a92a-2b19d540c8a5/registry/secrets/ns/n"
        );
        assert_eq!(Keys::new("/").secret("a", "b"), "/secrets/a/b");
    }

    #[test]
    fn protobuf_secret_round_trips_and_starts_with_the_magic() {
        let s = secret();
        let bytes = secret_to_protobuf(&s);
        assert!(bytes.starts_with(b"k8s\0\x0a\x0c\x0a\x02v1\x12\x06Secret\x12"));
        assert!(
            bytes.ends_with(b"\x1a\x00\x22\x00"),
            "empty contentEncoding and contentType are written"
        );
        assert_eq!(detect(&bytes), Some(Encoding::Protobuf));
        assert_eq!(parse_secret(&bytes).unwrap(), s);
        assert_eq!(secret_to_protobuf(&parse_secret(&bytes).unwrap()), bytes);
    }

    #[test]
    fn json_secret_round_trips_with_kind_and_api_version() {
        let s = secret();
        let bytes = secret_to_json(&s).unwrap();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(
            text.contains(r#""apiVersion":"v1""#) && text.contains(r#""kind":"Secret""#),
            "{text}"
        );
        assert!(
            text.contains(r#""password":"aHVudGVyMg==""#),
            "data is base64 in JSON"
        );
        assert_eq!(detect(&bytes), Some(Encoding::Json));
        assert_eq!(parse_secret(&bytes).unwrap(), s);
    }

    #[test]
    fn other_kinds_and_garbage_are_refused_without_echoing_content() {
        let config_map = br#"{"apiVersion":"v1","kind":"ConfigMap","data":{"k":"hunter2"}}"#;
        assert!(matches!(
            parse_secret(config_map),
            Err(ObjectError::WrongKind { .. })
        ));
        assert!(matches!(parse_secret(b"hunter2"), Err(ObjectError::NotAnObject)));
        let err =
            parse_secret(br#"{"apiVersion":"v1","kind":"Secret","data":{"k":"hunter2!"}}"#).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(matches!(
            parse_secret(b"k8s\0\xff\xff"),
            Err(ObjectError::Protobuf(_))
        ));
    }
}
