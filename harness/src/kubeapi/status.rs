//! The `Status` object kube-apiserver answers every failed request with (`metav1.Status`: reason, code,
//! details), so that clients map it to their own errors: kube-rs to `Error::Api`, the Python client to
//! `ApiException(status=…)`, `kubectl` to its `Error from server (NotFound): …` lines.

use serde_json::{Map, Value, json};

/// One failed request, as the `Status` it is answered with. Messages never hold Secret contents.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    /// HTTP status code (also the Status's `code`).
    pub code: u16,
    /// `StatusReason`: `NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, `BadRequest`, ….
    pub reason: &'static str,
    /// Human-readable, as kube-apiserver words it.
    pub message: String,
    /// The object named (`details.name`), when there is one.
    pub name: Option<String>,
    /// `details.causes` of an `Invalid`: field path and message.
    pub causes: Vec<(String, String)>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            name: None,
            causes: Vec::new(),
        }
    }

    fn named(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }

    /// 404: `secrets "NAME" not found`.
    pub fn not_found(name: &str) -> Self {
        Self::new(404, "NotFound", format!("secrets {name:?} not found")).named(name)
    }

    /// 404 for a path that is not the Secrets API (other resources, other groups).
    pub fn no_such_resource() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    /// 409 on create: the name is taken.
    pub fn already_exists(name: &str) -> Self {
        Self::new(409, "AlreadyExists", format!("secrets {name:?} already exists")).named(name)
    }

    /// 409 on update or delete: the object changed since the client read it.
    pub fn conflict(name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on secrets {name:?}: {why}"),
        )
        .named(name)
    }

    /// The `why` of a stale `resourceVersion`, word for word.
    pub const MODIFIED: &'static str =
        "the object has been modified; please apply your changes to the latest version and try again";

    /// 422: the object fails validation; `causes` are (field, message).
    pub fn invalid(name: &str, causes: Vec<(String, String)>) -> Self {
        let list: Vec<String> = causes.iter().map(|(f, m)| format!("{f}: {m}")).collect();
        let message = match list.as_slice() {
            [one] => format!("Secret {name:?} is invalid: {one}"),
            many => format!("Secret {name:?} is invalid: [{}]", many.join(", ")),
        };
        let mut e = Self::new(422, "Invalid", message).named(name);
        e.causes = causes;
        e
    }

    /// 400: the request itself is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 405: a verb this server does not serve on this path.
    pub fn method_not_allowed(method: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on this path by the kleidi harness's Secrets API"),
        )
    }

    /// 415: only JSON bodies are read.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json (got {content_type:?})"
            ),
        )
    }

    /// 410: a `continue` token whose revision etcd has compacted.
    pub fn expired() -> Self {
        Self::new(
            410,
            "Expired",
            "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
        )
    }

    /// 500: storage or the KMS plugin failed.
    pub fn internal(message: impl std::fmt::Display) -> Self {
        Self::new(
            500,
            "InternalError",
            format!("Internal error occurred: {message}"),
        )
    }

    /// The `Status` object.
    pub fn to_status(&self) -> Value {
        let mut status = Map::new();
        for (key, value) in [
            ("kind", json!("Status")),
            ("apiVersion", json!("v1")),
            ("metadata", json!({})),
            ("status", json!("Failure")),
            ("message", json!(self.message)),
            ("reason", json!(self.reason)),
        ] {
            status.insert(key.into(), value);
        }
        if self.name.is_some() || !self.causes.is_empty() {
            let mut details = Map::new();
            if let Some(name) = &self.name {
                details.insert("name".into(), json!(name));
            }
            details.insert("kind".into(), json!("secrets"));
            if !self.causes.is_empty() {
                let causes = self
                    .causes
                    .iter()
                    .map(|(field, message)| {
                        json!({"reason": "FieldValueInvalid", "message": message, "field": field})
                    })
                    .collect();
                details.insert("causes".into(), causes);
            }
            status.insert("details".into(), Value::Object(details));
        }
        status.insert("code".into(), json!(self.code));
        Value::Object(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_is_the_status_kube_apiserver_sends() {
        assert_eq!(
            ApiError::not_found("db").to_status(),
            json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "secrets \"db\" not found", "reason": "NotFound",
                "details": {"name": "db", "kind": "secrets"}, "code": 404
            })
        );
    }

    #[test]
    fn invalid_lists_its_causes() {
        let e = ApiError::invalid("Bad", vec![("metadata.name".into(), "Invalid value".into())]);
        let s = e.to_status();
        assert_eq!(s["code"], 422);
        assert_eq!(s["details"]["causes"][0]["field"], "metadata.name");
        assert_eq!(
            s["message"],
            "Secret \"Bad\" is invalid: metadata.name: Invalid value"
        );
    }
}
