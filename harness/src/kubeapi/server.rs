//! The HTTP side: kube-apiserver's routes for Secrets and the discovery documents clients read first,
//! on plain HTTP on loopback (no authentication: anyone who can reach the port can read every Secret,
//! so only loopback addresses are accepted). [`ApiServer`] runs it as a task — the `apiserver`
//! subcommand, the tests and the demo all start it the same way.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::DeleteOptions;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::secrets::Secrets;
use super::status::ApiError;
use crate::apiserver::object::ObjectError;

/// kube-apiserver's request body limit (3 MiB): a 1 MiB Secret in base64 with metadata fits.
const BODY_LIMIT: usize = 3 * 1024 * 1024;
/// Name of the cluster, user and context in the kubeconfig written for this server.
pub const KUBECONFIG_NAME: &str = "kleidi-harness";
/// The Kubernetes version `/version` reports: the API these routes follow.
const KUBE_VERSION: (&str, &str) = ("1", "34");

/// The Secrets API serving on a loopback port, with the envelope's background probe (every minute,
/// as kube-apiserver's, so the write state never expires while it serves). Stops on drop.
pub struct ApiServer {
    addr: SocketAddr,
    secrets: Secrets,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
    probes: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ApiServer {
    /// Binds `listen` (a loopback address; port 0 picks a free one) and serves `secrets`, probing
    /// its envelope in the background. The envelope should have probed once already (the apiserver
    /// does so before it serves).
    pub async fn start(secrets: Secrets, listen: SocketAddr) -> Result<Self> {
        let envelope = secrets.storage().envelope()?;
        let mut server = Self::start_unprobed(secrets, listen).await?;
        server.probes = Some(tokio::spawn(async move { envelope.run_probes().await }));
        Ok(server)
    }

    /// As [`start`](Self::start), without the probes: for a storage whose envelope its owner
    /// already probes (a scenario's nodes, whose probes are part of the recorded history).
    pub async fn start_unprobed(secrets: Secrets, listen: SocketAddr) -> Result<Self> {
        if !listen.ip().is_loopback() {
            bail!("the Secrets API has no authentication: it listens on loopback only, not {listen}");
        }
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let addr = listener.local_addr()?;
        let app = router(secrets.clone(), addr);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
        });
        Ok(Self {
            addr,
            secrets,
            shutdown: Some(tx),
            server: Some(server),
            probes: None,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The registry it serves (its storage and envelope: tests refresh the envelope after a rotation).
    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }

    /// A kubeconfig that points any client (kube-rs, client-go, the Python client, kubectl) here, in
    /// namespace `default`, without credentials.
    pub fn kubeconfig(&self) -> String {
        kubeconfig(&self.url())
    }

    /// Writes [`kubeconfig`](Self::kubeconfig) to `path`, whole or not at all (a client polling for
    /// the file never reads half of it).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("partial");
        std::fs::write(&tmp, self.kubeconfig()).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }

    /// Serves until the server fails (it only returns on an error) — for the `apiserver` command,
    /// which races it against Ctrl-C.
    pub async fn serve(&mut self) -> Result<()> {
        match self.server.as_mut() {
            Some(server) => server.await.context("the HTTP server task")?.context("serving"),
            None => Ok(()),
        }
    }

    /// Stops accepting, finishes requests in flight, stops the probes.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(probes) = self.probes.take() {
            probes.abort();
        }
        if let Some(server) = self.server.take() {
            server.await.context("the HTTP server task")??;
        }
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(probes) = &self.probes {
            probes.abort();
        }
        if let Some(server) = &self.server {
            server.abort();
        }
    }
}

/// A kubeconfig for a server at `url` without authentication.
pub fn kubeconfig(url: &str) -> String {
    let n = KUBECONFIG_NAME;
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {n}\n  cluster:\n    server: {url}\nusers:\n- name: {n}\n  user: {{}}\ncontexts:\n- name: {n}\n  context:\n    cluster: {n}\n    user: {n}\n    namespace: default\ncurrent-context: {n}\npreferences: {{}}\n"
    )
}

#[derive(Clone)]
struct Shared {
    secrets: Secrets,
    addr: SocketAddr,
}

/// The routes: discovery, Secrets, and a `Status` 404/405 for everything else.
pub fn router(secrets: Secrets, addr: SocketAddr) -> Router {
    let state = Arc::new(Shared { secrets, addr });
    Router::new()
        .route("/version", get(version))
        .route("/api", get(api_versions))
        .route("/api/v1", get(core_v1_resources))
        .route("/apis", get(api_groups))
        .route("/api/v1/secrets", get(list_all))
        .route(
            "/api/v1/namespaces/{namespace}/secrets",
            get(list_namespaced).post(create),
        )
        .route(
            "/api/v1/namespaces/{namespace}/secrets/{name}",
            get(read).put(replace).delete(delete),
        )
        .fallback(|| async { failure(&ApiError::no_such_resource()) })
        .method_not_allowed_fallback(|method: Method| async move {
            failure(&ApiError::method_not_allowed(method.as_str()))
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

type Ctx = State<Arc<Shared>>;

fn reply(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn failure(e: &ApiError) -> Response {
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    reply(code, &e.to_status())
}

fn object(code: StatusCode, secret: &Secret) -> Response {
    match serde_json::to_value(secret) {
        Ok(v) => reply(code, &v),
        Err(e) => failure(&ApiError::internal(e)),
    }
}

fn outcome(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(|e| failure(&e))
}

async fn version() -> Response {
    let (major, minor) = KUBE_VERSION;
    reply(
        StatusCode::OK,
        &json!({
            "major": major, "minor": minor,
            "gitVersion": format!("v{major}.{minor}.0-kleidi-harness"),
            "gitCommit": "", "gitTreeState": "", "buildDate": "1970-01-01T00:00:00Z",
            "goVersion": "", "compiler": "rustc", "platform": format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
        }),
    )
}

async fn api_versions(State(s): Ctx) -> Response {
    reply(
        StatusCode::OK,
        &json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": s.addr.to_string()}],
        }),
    )
}

async fn core_v1_resources() -> Response {
    reply(
        StatusCode::OK,
        &json!({
            "kind": "APIResourceList", "groupVersion": "v1",
            "resources": [{
                "name": "secrets", "singularName": "secret", "namespaced": true, "kind": "Secret",
                "verbs": ["create", "delete", "get", "list", "update"],
            }],
        }),
    )
}

async fn api_groups() -> Response {
    reply(
        StatusCode::OK,
        &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
    )
}

/// The list query parameters this server reads (serde ignores the rest: `timeoutSeconds`, …).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    limit: Option<i64>,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
    label_selector: Option<String>,
    field_selector: Option<String>,
    watch: Option<String>,
}

/// Query parameters of writes.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WriteQuery {
    dry_run: Option<String>,
}

async fn list_all(State(s): Ctx, q: Result<Query<ListQuery>, QueryRejection>) -> Response {
    outcome(list(&s, None, q).await)
}

async fn list_namespaced(
    State(s): Ctx,
    UrlPath(namespace): UrlPath<String>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    outcome(list(&s, Some(&namespace), q).await)
}

async fn list(
    s: &Shared,
    namespace: Option<&str>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if q.watch.as_deref().is_some_and(|w| w == "true" || w == "1") {
        return Err(ApiError::bad_request(
            "watch is not served by the kleidi harness's Secrets API",
        ));
    }
    for (name, selector) in [
        ("labelSelector", &q.label_selector),
        ("fieldSelector", &q.field_selector),
    ] {
        if selector.as_deref().is_some_and(|v| !v.is_empty()) {
            return Err(ApiError::bad_request(format!(
                "{name} is not served by the kleidi harness's Secrets API"
            )));
        }
    }
    let page = s
        .secrets
        .list(namespace, q.limit.unwrap_or(0), q.continue_token.as_deref())
        .await?;
    let mut items = Vec::with_capacity(page.items.len());
    for secret in &page.items {
        let mut item = serde_json::to_value(secret).map_err(ApiError::internal)?;
        // Items of a typed list carry no apiVersion/kind on the wire; the list does.
        if let Some(map) = item.as_object_mut() {
            map.remove("apiVersion");
            map.remove("kind");
        }
        items.push(item);
    }
    let mut metadata = serde_json::Map::new();
    metadata.insert("resourceVersion".into(), json!(page.resource_version.to_string()));
    if let Some(token) = page.continue_token {
        metadata.insert("continue".into(), json!(token));
    }
    if let Some(remaining) = page.remaining {
        metadata.insert("remainingItemCount".into(), json!(remaining));
    }
    Ok(reply(
        StatusCode::OK,
        &json!({"kind": "SecretList", "apiVersion": "v1", "metadata": metadata, "items": items}),
    ))
}

/// The Secret in a request body: JSON only, parse errors without the text (it may hold the secret).
fn body_secret(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Secret, ApiError> {
    let body = json_body(headers, body)?;
    let value: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(ObjectError::from(e).to_string()))?;
    let field = |name: &str| {
        value
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    if (!api_version.is_empty() && api_version != "v1") || (!kind.is_empty() && kind != "Secret") {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) or kind ({kind}) does not match v1 Secret"
        )));
    }
    serde_json::from_value(value).map_err(|e| ApiError::bad_request(ObjectError::from(e).to_string()))
}

fn json_body(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError {
                code: 413,
                reason: "RequestEntityTooLarge",
                message: format!("the request body exceeds {BODY_LIMIT} bytes"),
                name: None,
                causes: Vec::new(),
            }
        } else {
            ApiError::bad_request(e.body_text())
        }
    })?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let media = content_type.split(';').next().unwrap_or_default().trim();
    if media != "application/json" && !body.is_empty() {
        return Err(ApiError::unsupported_media_type(media));
    }
    Ok(body)
}

fn no_dry_run(q: Result<Query<WriteQuery>, QueryRejection>) -> Result<(), ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if q.dry_run.is_some() {
        return Err(ApiError::bad_request(
            "dryRun is not served by the kleidi harness's Secrets API",
        ));
    }
    Ok(())
}

async fn create(
    State(s): Ctx,
    UrlPath(namespace): UrlPath<String>,
    q: Result<Query<WriteQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    outcome(
        async {
            no_dry_run(q)?;
            let secret = body_secret(&headers, body)?;
            let (created, _) = s.secrets.create(&namespace, secret).await?;
            Ok(object(StatusCode::CREATED, &created))
        }
        .await,
    )
}

async fn read(State(s): Ctx, UrlPath((namespace, name)): UrlPath<(String, String)>) -> Response {
    outcome(
        s.secrets
            .get(&namespace, &name)
            .await
            .map(|secret| object(StatusCode::OK, &secret)),
    )
}

async fn replace(
    State(s): Ctx,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
    q: Result<Query<WriteQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    outcome(
        async {
            no_dry_run(q)?;
            let secret = body_secret(&headers, body)?;
            let updated = s.secrets.update(&namespace, &name, secret).await?;
            Ok(object(StatusCode::OK, &updated))
        }
        .await,
    )
}

async fn delete(
    State(s): Ctx,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
    q: Result<Query<WriteQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    outcome(
        async {
            no_dry_run(q)?;
            let body = json_body(&headers, body)?;
            let options: Option<DeleteOptions> = if body.iter().all(u8::is_ascii_whitespace) {
                None
            } else {
                Some(
                    serde_json::from_slice(&body)
                        .map_err(|e| ApiError::bad_request(ObjectError::from(e).to_string()))?,
                )
            };
            let preconditions = options.and_then(|o| o.preconditions);
            let deleted = s.secrets.delete(&namespace, &name, preconditions).await?;
            Ok(object(StatusCode::OK, &deleted))
        }
        .await,
    )
}
