//! Talking to Vault: one HTTP client per configured address (rustls with ring, verification always
//! on, rebuilt when the CA or client certificate files change), failover between them inside one
//! time budget, and [`classify`], the one place a Vault failure becomes an [`Error`].

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use vaultrs::api::EndpointMiddleware;
use vaultrs::client::{VaultClient, VaultClientSettings};
use vaultrs::error::ClientError;
use zeroize::Zeroize;

use crate::config::VaultArgs;
use crate::{Error, Result};

/// How long to wait for a TCP + TLS connection to one address: short, so a black-holed address
/// fails fast and the next starts at once instead of at its hedge time.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// The most one kleidi call spends on Vault, every address, login and retry included, unless
/// `kleidi serve` derives another from `--call-timeout`: 7/8 of the default 2 s, so a call Vault
/// cannot answer ends with its class (`network`, `sealed`) instead of the guard's bare timeout,
/// which says nothing about why.
pub const DEFAULT_CALL_BUDGET: Duration = Duration::from_millis(1750);
/// An attempt with less time than this left is not started: it could not get an answer.
const MIN_ATTEMPT: Duration = Duration::from_millis(20);

/// What a Vault call was doing, for [`classify`]: the same status means different things.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    /// Reading the transit key (connect, Status).
    ReadKey,
    /// Transit encrypt.
    Encrypt,
    /// Transit decrypt.
    Decrypt,
    /// Logging in, looking up or renewing our own token.
    Auth,
}

/// A boxed, sendable future, so one closure type can be retried on each address.
pub(super) type BoxFut<T> = Pin<Box<dyn Future<Output = Result<T, ClientError>> + Send>>;

/// Every configured address, tried in order starting with the last one that answered.
pub(super) struct Nodes {
    /// One client per address, rebuilt whole when the TLS files change (in-flight calls keep
    /// the clients they started with; their pooled connections close with them).
    nodes: RwLock<Arc<[Node]>>,
    preferred: AtomicUsize,
    namespace: Option<String>,
    /// The flags, to rebuild the clients from.
    args: VaultArgs,
    /// Digest of the CA bundle, client certificate and key the clients were built from.
    tls_files: Mutex<Option<[u8; 32]>>,
    /// How long one kleidi call may spend on Vault in all.
    budget: Duration,
}

struct Node {
    addr: String,
    http: rustify::clients::reqwest::Client,
    settings: VaultClientSettings,
}

impl Nodes {
    /// Builds one client per address; fails only on configuration that cannot work.
    pub(super) fn new(args: &VaultArgs, budget: Duration) -> Result<Self> {
        if args.vault_addr.is_empty() {
            return Err(Error::Config("--vault-addr is required".into()));
        }
        refuse_credentials(&args.vault_addr)?;
        refuse_plain_http(&args.vault_addr, args.vault_allow_plain_http)?;
        // Read before building: a change while building shows at the next check.
        let tls_files = tls_files_digest(args);
        let nodes = build_nodes(args, budget)?;
        Ok(Self {
            nodes: RwLock::new(nodes.into()),
            preferred: AtomicUsize::new(0),
            namespace: args.vault_namespace.clone(),
            args: args.clone(),
            tls_files: Mutex::new(tls_files),
            budget,
        })
    }

    /// The configured addresses, in order.
    pub(super) fn addresses(&self) -> &[String] {
        &self.args.vault_addr
    }

    /// When a call starting now must be done with Vault.
    pub(super) fn deadline(&self) -> Instant {
        Instant::now() + self.budget
    }

    /// Rebuilds the clients if the CA bundle, client certificate or key changed on disk (a
    /// renewed short-lived certificate, a rotated CA), so new connections present and trust what
    /// the files now hold. Returns whether it did. Files that do not parse (half written, key and
    /// certificate not matching yet) keep the current clients until the files change again.
    pub(super) fn reload_tls_if_changed(&self) -> bool {
        let Some(now) = tls_files_digest(&self.args) else {
            return false;
        };
        {
            let mut seen = self
                .tls_files
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *seen == Some(now) {
                return false;
            }
            *seen = Some(now);
        }
        match build_nodes(&self.args, self.budget) {
            Ok(nodes) => {
                *self
                    .nodes
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = nodes.into();
                tracing::info!("vault: TLS files changed; new connections use them");
                true
            }
            Err(err) => {
                tracing::warn!(class = err.class(), error = %err, "vault: TLS files changed but cannot be used; keeping the previous ones");
                false
            }
        }
    }

    fn snapshot(&self) -> Arc<[Node]> {
        // Replaced whole under the lock, never left half-written: a poisoned lock is usable.
        self.nodes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Runs `f` against the preferred address and, if that gives no answer for a while, against
    /// each next address too, all in flight together (a hedged request): the first success wins,
    /// the others are dropped. An answer that says its server cannot serve (network, 5xx, sealed,
    /// standby) starts the next address at once; any other answer is final. Every attempt may run
    /// until `deadline`, so three addresses all answering slowly within the budget still answer
    /// (behind a Raft cluster every node forwards to one leader: when it is slow, all are); the
    /// next address starts after `budget / addresses`, so two hung addresses out of three still
    /// leave the third a third of the budget.
    pub(super) async fn send<T>(
        &self,
        op: Op,
        token: Option<&SecretString>,
        deadline: Instant,
        f: &(dyn Fn(Call) -> BoxFut<T> + Send + Sync),
    ) -> Result<T> {
        use futures_util::StreamExt as _;

        let nodes = self.snapshot();
        let count = nodes.len();
        let start = self.preferred.load(Ordering::Relaxed) % count.max(1);
        // `count` >= 1 (checked at construction); the division is safe either way.
        let hedge_after = self.budget / u32::try_from(count.max(1)).unwrap_or(u32::MAX);
        let mut started = 0;
        let mut next_at = Instant::now();
        let mut in_flight = futures_util::stream::FuturesUnordered::new();
        let mut last = None;
        loop {
            let now = Instant::now();
            if started < count && now >= next_at && deadline.saturating_duration_since(now) >= MIN_ATTEMPT {
                let index = (start + started) % count;
                if let Some(node) = nodes.get(index) {
                    if started > 0 && last.is_none() {
                        tracing::debug!(addr = %node.addr, "vault: no answer yet; asking this address as well");
                    }
                    let call = Call::new(node, token, self.namespace.clone());
                    let answer = tokio::time::timeout_at(deadline.into(), f(call));
                    in_flight.push(async move { (index, answer.await) });
                }
                started += 1;
                next_at = now + hedge_after;
            }
            if in_flight.is_empty() {
                break;
            }
            let hedge = async {
                match started < count {
                    true => tokio::time::sleep_until(next_at.into()).await,
                    false => std::future::pending().await,
                }
            };
            let (index, answer) = tokio::select! {
                Some(done) = in_flight.next() => done,
                () = hedge => continue,
                else => break,
            };
            let addr = nodes.get(index).map(|n| n.addr.as_str()).unwrap_or_default();
            let answer = match answer {
                Ok(answer) => answer.map_err(|e| classify(op, e)),
                Err(_) => Err(unavailable(
                    "network",
                    format!(
                        "timeout: no answer within the {} ms budget",
                        self.budget.as_millis()
                    ),
                )),
            };
            match answer {
                Ok(value) => {
                    if index != start {
                        self.preferred.store(index, Ordering::Relaxed);
                        tracing::info!(addr = %addr, "vault: now using this address");
                    }
                    return Ok(value);
                }
                Err(err) if fails_over(&err) && count > 1 => {
                    tracing::warn!(addr = %addr, class = err.class(), error = %err, "vault address failed; trying the next");
                    last = Some(err);
                    // Its share is not waited out: the next address starts now.
                    next_at = Instant::now();
                }
                Err(err) => return Err(err),
            }
        }
        Err(last.unwrap_or_else(|| {
            unavailable(
                "network",
                format!(
                    "no time left to ask Vault (budget {} ms)",
                    self.budget.as_millis()
                ),
            )
        }))
    }
}

/// Refuses an address with `user:password@` in it. Vault ignores it (kleidi logs in with
/// `--vault-auth`, from files), and every log line, span and error naming the address would show it.
/// The refusal itself names the address without it.
fn refuse_credentials(addrs: &[String]) -> Result<()> {
    for addr in addrs {
        let Ok(mut url) = reqwest::Url::parse(addr.trim()) else {
            continue; // refused where it is parsed, below
        };
        if url.username().is_empty() && url.password().is_none() {
            continue;
        }
        let _ = url.set_username("");
        let _ = url.set_password(None);
        return Err(Error::Config(format!(
            "--vault-addr {url}: drop the user:password@ part; kleidi authenticates with --vault-auth \
             and its credential files, and an address is logged"
        )));
    }
    Ok(())
}

/// Refuses an `http://` address whose host is not loopback unless `--vault-allow-plain-http` says
/// so (then warns, once, at start): the token, the login credentials and every seed and plaintext
/// would cross the network unencrypted, readable and replayable by anyone on the path.
fn refuse_plain_http(addrs: &[String], allowed: bool) -> Result<()> {
    for addr in addrs {
        let addr = addr.trim().trim_end_matches('/');
        let url =
            reqwest::Url::parse(addr).map_err(|e| Error::Config(format!("--vault-addr {addr:?}: {e}")))?;
        if url.scheme() != "http" || is_loopback(&url) {
            continue;
        }
        if !allowed {
            return Err(Error::Config(format!(
                "--vault-addr {addr:?}: plain http to a host that is not loopback would send the Vault \
                 token, the login credentials and every seed across the network unencrypted; use \
                 https (with --vault-ca-file for a private CA), or pass --vault-allow-plain-http if \
                 the path is protected otherwise (a mesh with mTLS, a tunnel)"
            )));
        }
        tracing::warn!(
            addr = %addr,
            "vault: PLAIN HTTP to a host that is not loopback (--vault-allow-plain-http): the token, \
             credentials and every seed cross the network unencrypted"
        );
    }
    Ok(())
}

/// 127.0.0.0/8, ::1 or `localhost`: traffic that never leaves the machine.
fn is_loopback(url: &reqwest::Url) -> bool {
    // The URL parser has normalised the host already (`127.1` is `127.0.0.1`, IPv6 is bracketed).
    let Some(host) = url.host_str() else {
        return false;
    };
    let ip = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match ip.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

/// One client per address, all with the TLS configuration the flags' files hold now; no exchange
/// outlives `budget` (the caller's deadline usually ends it sooner).
fn build_nodes(args: &VaultArgs, budget: Duration) -> Result<Vec<Node>> {
    let tls = tls_config(args)?;
    let mut nodes = Vec::new();
    for addr in &args.vault_addr {
        let addr = addr.trim().trim_end_matches('/').to_string();
        let url =
            reqwest::Url::parse(&addr).map_err(|e| Error::Config(format!("--vault-addr {addr:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::Config(format!(
                "--vault-addr {addr:?}: scheme must be http or https"
            )));
        }
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls.clone())
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(budget)
            .pool_idle_timeout(Duration::from_secs(30))
            .no_proxy()
            .build()
            .map_err(|e| Error::Config(format!("HTTP client for {addr}: {e}")))?;
        // Written out in full: the vaultrs builder would fill gaps from VAULT_* variables
        // (VAULT_SKIP_VERIFY among them); kleidi takes its settings from its flags only.
        let settings = VaultClientSettings {
            address: url,
            ca_certs: Vec::new(),
            identity: None,
            timeout: Some(budget),
            token: String::new(),
            verify: true,
            version: 1,
            wrapping: false,
            namespace: args.vault_namespace.clone(),
            proxy: None,
        };
        nodes.push(Node {
            http: rustify::clients::reqwest::Client::new(&addr, http),
            addr,
            settings,
        });
    }
    Ok(nodes)
}

/// SHA-256 over the TLS files' contents; `None` when no file is configured or one cannot be read
/// right now (then nothing is reloaded).
fn tls_files_digest(args: &VaultArgs) -> Option<[u8; 32]> {
    let files = [
        &args.vault_ca_file,
        &args.vault_client_cert,
        &args.vault_client_key,
    ];
    if files.iter().all(|f| f.is_none()) {
        return None;
    }
    let mut hash = Sha256::new();
    for file in files {
        if let Some(path) = file {
            // The key file's bytes go into the hash and are wiped; the digest reveals nothing.
            let mut bytes = std::fs::read(path).ok()?;
            hash.update(&bytes);
            bytes.zeroize();
        }
        hash.update([0]);
    }
    Some(hash.finalize().into())
}

/// Whether another address might answer where this one could not.
fn fails_over(err: &Error) -> bool {
    matches!(
        err,
        Error::Unavailable {
            class: "network" | "server_error" | "sealed" | "standby",
            ..
        }
    )
}

/// One request's client: a vaultrs [`VaultClient`] bound to one address and the current token,
/// which is wiped from memory when the call ends.
pub(super) struct Call(VaultClient);

impl Call {
    fn new(node: &Node, token: Option<&SecretString>, namespace: Option<String>) -> Self {
        Self(VaultClient {
            http: rustify::clients::reqwest::Client {
                http: node.http.http.clone(),
                base: node.http.base.clone(),
            },
            middle: EndpointMiddleware {
                token: token.map(|t| t.expose_secret().to_owned()).unwrap_or_default(),
                version: "v1".into(),
                wrap: None,
                namespace,
            },
            settings: node.settings.clone(),
        })
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.0.middle.token.zeroize();
        self.0.settings.token.zeroize();
    }
}

impl vaultrs::client::Client for Call {
    fn http(&self) -> &rustify::clients::reqwest::Client {
        &self.0.http
    }
    fn middle(&self) -> &EndpointMiddleware {
        &self.0.middle
    }
    fn settings(&self) -> &VaultClientSettings {
        &self.0.settings
    }
    fn set_token(&mut self, token: &str) {
        self.0.middle.token.zeroize();
        self.0.set_token(token);
    }
}

/// The one mapping from a Vault failure to kleidi's [`Error`], with stable class names:
/// `sealed`, `standby`, `rate_limited`, `server_error`, `network` (unavailable, fail over);
/// `permission_denied`, `auth_failed` (denied); `key_missing`; bad ciphertext on decrypt.
/// Vault's error strings are not secret (they never echo tokens or plaintext) and are kept, cut short.
pub(super) fn classify(op: Op, err: ClientError) -> Error {
    let (code, msg) = match err {
        ClientError::APIError { code, errors } => (code, errors.join("; ")),
        ClientError::RestClientError { source } => match source {
            // Go's HTTP server answers a plain-HTTP request to its TLS port with this text.
            rustify::errors::ClientError::ServerResponseError {
                code: 400,
                content: Some(text),
            } if text.contains("HTTP request to an HTTPS server") => {
                return unavailable(
                    "network",
                    "tls: the server speaks HTTPS; use an https:// --vault-addr".into(),
                );
            }
            rustify::errors::ClientError::ServerResponseError { code, .. } => (code, String::new()),
            rustify::errors::ClientError::RequestError { source, .. } => {
                return unavailable("network", network_detail(&source));
            }
            other => return Error::Backend(format!("vault: unexpected answer ({other})")),
        },
        other => return Error::Backend(format!("vault: unexpected answer ({other})")),
    };
    let msg = cut(&msg);
    let lower = msg.to_ascii_lowercase();
    let detail = format!("HTTP {code}: {msg}");
    match code {
        400 if op == Op::Decrypt && !lower.contains("key not found") => Error::BadCiphertext(detail),
        400 | 404 if lower.contains("key not found") || (code == 404 && op == Op::ReadKey) => {
            unavailable("key_missing", detail)
        }
        400 | 401 | 403 if op == Op::Auth => denied("auth_failed", detail),
        403 if lower.contains("invalid token") => denied("auth_failed", detail),
        403 => denied("permission_denied", detail),
        429 => unavailable("rate_limited", detail),
        503 if lower.contains("sealed") => unavailable("sealed", detail),
        472 | 473 => unavailable("standby", detail),
        503 if lower.contains("standby") => unavailable("standby", detail),
        500..=599 => unavailable("server_error", detail),
        _ => Error::Backend(format!("vault rejected the request: {detail}")),
    }
}

fn unavailable(class: &'static str, detail: String) -> Error {
    Error::Unavailable {
        backend: "vault",
        class,
        detail,
    }
}

fn denied(class: &'static str, detail: String) -> Error {
    Error::Denied {
        backend: "vault",
        class,
        detail,
    }
}

/// A network failure's kind and innermost cause (`connection refused`), never a URL's secrets
/// (kleidi's URLs carry none) nor a body.
fn network_detail(err: &anyhow::Error) -> String {
    let kind = match err.downcast_ref::<reqwest::Error>() {
        _ if is_tls(err) => "tls",
        Some(e) if e.is_timeout() => "timeout",
        Some(e) if e.is_connect() => "connect",
        _ => "request",
    };
    let root = err.root_cause().to_string();
    format!("{kind}: {}", cut(&root))
}

/// Whether a request failed in the TLS handshake (an untrusted certificate, a wrong name, a
/// server that does not speak TLS). rustls's error reaches us inside an `io::Error` (measured:
/// inside one inside another), whose `source()` skips what it wraps, so each is opened.
fn is_tls(err: &anyhow::Error) -> bool {
    err.chain().any(|mut e| {
        loop {
            if e.is::<rustls::Error>() {
                return true;
            }
            match e
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
            {
                Some(inner) => e = inner,
                None => return false,
            }
        }
    })
}

/// `s` cut to at most 200 bytes (on a character boundary), for error details.
pub(super) fn cut(s: &str) -> String {
    let mut s = s.to_string();
    if s.len() > 200 {
        let end = (0..=200).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
        s.truncate(end);
    }
    s
}

/// rustls with ring (no C build), verification always on: roots from --vault-ca-file or the system,
/// an optional fixed server name, an optional client certificate (for mTLS and `auth cert`).
fn tls_config(args: &VaultArgs) -> Result<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    match &args.vault_ca_file {
        Some(path) => {
            let certs =
                CertificateDer::pem_file_iter(path).map_err(|e| config_file("--vault-ca-file", path, e))?;
            for cert in certs {
                let cert = cert.map_err(|e| config_file("--vault-ca-file", path, e))?;
                roots
                    .add(cert)
                    .map_err(|e| config_file("--vault-ca-file", path, e))?;
            }
            if roots.is_empty() {
                return Err(Error::Config(format!(
                    "--vault-ca-file {}: no certificate in it",
                    path.display()
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // A system bundle may hold a certificate webpki cannot parse; skip it, as curl does.
                let _ = roots.add(cert);
            }
        }
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| Error::Config(format!("TLS verifier: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match &args.vault_server_name {
        Some(name) => Arc::new(FixedName {
            inner: webpki,
            name: ServerName::try_from(name.clone())
                .map_err(|e| Error::Config(format!("--vault-server-name {name:?}: {e}")))?,
        }),
        None => webpki,
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match (&args.vault_client_cert, &args.vault_client_key) {
        (Some(cert_path), Some(key_path)) => {
            let certs = CertificateDer::pem_file_iter(cert_path)
                .map_err(|e| config_file("--vault-client-cert", cert_path, e))?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| config_file("--vault-client-cert", cert_path, e))?;
            // Refused if other users can read or change it (crate::credfile). The key's parse
            // error never quotes the key.
            let pem = crate::credfile::read(key_path, "--vault-client-key")?;
            let key = PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|e| config_file("--vault-client-key", key_path, e))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| Error::Config(format!("client certificate: {e}")))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(Error::Config(
            "--vault-client-cert and --vault-client-key go together".into(),
        )),
    }
}

fn config_file(flag: &str, path: &Path, err: impl std::fmt::Display) -> Error {
    Error::Config(format!("{flag} {}: {err}", path.display()))
}

/// Verifies the server's certificate for a configured name instead of the address's host, with the
/// full webpki check otherwise (chain, validity, signatures).
#[derive(Debug)]
struct FixedName {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for FixedName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A copy of an error for a second caller (a shared decrypt, a remembered login failure).
/// [`Error`] holds no sources, so nothing is lost for the variants this backend produces.
pub(super) fn clone_error(err: &Error) -> Error {
    match err {
        Error::Unavailable {
            backend,
            class,
            detail,
        } => Error::Unavailable {
            backend,
            class,
            detail: detail.clone(),
        },
        Error::Denied {
            backend,
            class,
            detail,
        } => Error::Denied {
            backend,
            class,
            detail: detail.clone(),
        },
        Error::BadCiphertext(detail) => Error::BadCiphertext(detail.clone()),
        Error::Config(detail) => Error::Config(detail.clone()),
        Error::Timeout(bound) => Error::Timeout(*bound),
        other => Error::Backend(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(addrs: &[&str], allowed: bool) -> Result<()> {
        let addrs: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        refuse_plain_http(&addrs, allowed)
    }

    #[test]
    fn plain_http_to_a_host_that_is_not_loopback_is_refused_unless_allowed() {
        for addr in [
            "http://10.0.0.5:8200",
            "http://vault.example:8200/",
            "http://localhost.example:8200",
            "http://127.0.0.1.nip.io:8200",
            "http://[::ffff:127.0.0.1]:8200",
            "http://[2001:db8::1]:8200",
        ] {
            let err = check(&[addr], false).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{addr}: {err}");
            let text = err.to_string();
            assert!(
                text.contains("--vault-allow-plain-http") && text.contains("unencrypted"),
                "{text}"
            );
            check(&[addr], true).unwrap();
        }
    }

    #[test]
    fn loopback_and_https_addresses_need_no_flag() {
        for addr in [
            "http://127.0.0.1:8200",
            "http://127.3.4.5:8200",
            "http://127.1:8200",
            "http://[::1]:8200",
            "http://localhost:8200",
            "http://LOCALHOST:8200/",
            "https://10.0.0.5:8200",
            "https://vault.example",
        ] {
            check(&[addr], false).unwrap_or_else(|e| panic!("{addr}: {e}"));
        }
    }

    #[test]
    fn an_address_with_credentials_is_refused_without_showing_them() {
        for addr in [
            "https://kleidi:s3cret@vault.example:8200",
            "http://s3cret@127.0.0.1:8200",
        ] {
            let err = refuse_credentials(&[addr.to_string()]).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, Error::Config(_)), "{text}");
            assert!(
                text.contains("user:password@") && !text.contains("s3cret"),
                "{text}"
            );
        }
        refuse_credentials(&["https://vault.example:8200".into(), "not a url".into()]).unwrap();
    }

    #[test]
    fn every_address_is_checked() {
        let err = check(
            &["https://a.example", "http://127.0.0.1:8200", "http://b.example"],
            false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("b.example"), "{err}");
    }

    #[test]
    fn a_plain_http_request_to_a_tls_port_is_a_network_failure_that_names_tls() {
        let answer = |content: &str| ClientError::RestClientError {
            source: rustify::errors::ClientError::ServerResponseError {
                code: 400,
                content: Some(content.into()),
            },
        };
        // Op::Auth would otherwise read a 400 as refused credentials.
        let err = classify(
            Op::Auth,
            answer("Client sent an HTTP request to an HTTPS server.\n"),
        );
        assert_eq!(err.class(), "network", "{err}");
        assert!(err.to_string().contains("tls: the server speaks HTTPS"), "{err}");
        assert_eq!(classify(Op::Auth, answer("bad request")).class(), "auth_failed");
    }

    #[test]
    fn a_handshake_failure_inside_an_io_error_is_told_apart_from_a_refused_connection() {
        let handshake = std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        let err = anyhow::Error::new(handshake).context("connect");
        assert!(is_tls(&err));
        assert!(
            network_detail(&err).starts_with("tls: "),
            "{}",
            network_detail(&err)
        );
        let refused = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(!is_tls(&refused));
    }
}
