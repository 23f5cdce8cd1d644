//! The `--metrics-addr` listener: `/metrics` (OpenMetrics text), `/livez` and `/readyz`, over plain
//! HTTP/1.1 on its own tasks, so a slow or hostile scraper never touches the gRPC socket.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] at once (one more is closed on accept), request headers
//! within [`HEADER_TIMEOUT`], a connection for at most [`CONNECTION_LIFETIME`], headers in
//! [`MAX_BUF`] bytes; only GET and HEAD. Malformed HTTP ends its connection, nothing more.
//!
//! - `/livez` answers 200 while the process serves. It never looks at the backend or at client
//!   errors (as aws-encryption-provider's), so a backend outage never gets the plugin restarted:
//!   a restart would not bring the backend back, and would drop the connections and the warm
//!   state of a plugin that recovers by itself when the backend returns.
//! - `/readyz` answers 200 when the cached health verdict is healthy and younger than
//!   [`Readiness::max_age`]; else 503 with the reason Status's healthz gives. It never waits for
//!   the backend: when the verdict has outlived its TTL it starts the same single probe Status
//!   would start (shared with Status, so no more backend calls than Status alone makes) and
//!   answers from the verdict it has.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::Observed;
use crate::{Error, Result};

/// Connections served at once: a kubelet's two probes and a scraper or two, with room.
pub const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection is kept, keep-alive included.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// hyper's read buffer, hence the largest request head (hyper's own minimum).
pub const MAX_BUF: usize = 8 * 1024;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What `/readyz` accepts.
#[derive(Clone, Copy, Debug)]
pub struct Readiness {
    /// Oldest verdict still taken as current.
    pub max_age: Duration,
}

/// Checks `--metrics-addr` and binds it. A non-loopback address is refused unless
/// `allow_non_loopback`: the endpoints have neither authentication nor TLS.
pub async fn bind(addr: SocketAddr, allow_non_loopback: bool) -> Result<TcpListener> {
    if !addr.ip().is_loopback() && !allow_non_loopback {
        return Err(Error::Config(format!(
            "--metrics-addr {addr} is not a loopback address; metrics reveal the current key's hash, \
             call rates, error classes and credential lifetimes to whoever can connect, without \
             authentication: use 127.0.0.1 or [::1], or add --metrics-allow-non-loopback"
        )));
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Config(format!("--metrics-addr {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Config(format!("--metrics-addr {addr}: {e}")))?;
    tracing::info!(metrics_addr = %bound, "metrics and health endpoints listening");
    Ok(listener)
}

/// Serves the endpoints on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    state: Arc<dyn Observed>,
    readiness: Readiness,
) {
    let shared = Arc::new(Endpoints {
        registry,
        state,
        readiness,
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and the like: back off rather than spin.
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(shared.answer(&req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_BUF)
                .serve_connection(TokioIo::new(stream), service);
            // Errors are the client's (bad HTTP, a reset): nothing to log at warn.
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

struct Endpoints {
    registry: Registry,
    state: Arc<dyn Observed>,
    readiness: Readiness,
}

impl Endpoints {
    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n".into());
        }
        match req.uri().path() {
            "/metrics" => {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &self.registry) {
                    Ok(()) => {
                        let mut resp = Response::new(Full::new(Bytes::from(body)));
                        resp.headers_mut()
                            .insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
                        resp
                    }
                    Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n".into()),
                }
            }
            "/livez" => text(StatusCode::OK, "ok\n".into()),
            "/readyz" => match self.ready() {
                Ok(()) => text(StatusCode::OK, "ok\n".into()),
                Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
            },
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }

    fn ready(&self) -> std::result::Result<(), String> {
        self.state.refresh();
        let verdict = self.state.verdict().ok_or("no health verdict yet")?;
        if let Some(failure) = verdict.failure {
            return Err(failure);
        }
        if verdict.age > self.readiness.max_age {
            return Err(format!(
                "health verdict is {}s old (at most {}s accepted)",
                verdict.age.as_secs(),
                self.readiness.max_age.as_secs()
            ));
        }
        Ok(())
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::metrics::Verdict;
    use crate::service::Credential;

    /// A cache whose verdict the test sets, counting refresh requests.
    struct Fixed(Mutex<(Option<Verdict>, usize)>);

    impl Observed for Fixed {
        fn verdict(&self) -> Option<Verdict> {
            self.0.lock().unwrap().0.clone()
        }
        fn refresh(&self) {
            self.0.lock().unwrap().1 += 1;
        }
        fn key_id(&self) -> String {
            String::new()
        }
        fn credentials(&self) -> Vec<(Credential, f64)> {
            Vec::new()
        }
    }

    #[test]
    fn readyz_needs_a_healthy_verdict_young_enough() {
        let state = Arc::new(Fixed(Mutex::new((None, 0))));
        let endpoints = Endpoints {
            registry: Registry::default(),
            state: state.clone(),
            readiness: Readiness {
                max_age: Duration::from_secs(90),
            },
        };
        let set = |failure: Option<&str>, age: u64| {
            state.0.lock().unwrap().0 = Some(Verdict {
                failure: failure.map(str::to_string),
                age: Duration::from_secs(age),
            });
        };
        assert_eq!(endpoints.ready(), Err("no health verdict yet".to_string()));
        set(None, 10);
        assert_eq!(endpoints.ready(), Ok(()));
        set(None, 90);
        assert_eq!(endpoints.ready(), Ok(()));
        set(None, 91);
        assert!(endpoints.ready().unwrap_err().contains("91s old"));
        set(Some("backend pkcs11 unavailable (token_lost): gone"), 1);
        assert_eq!(
            endpoints.ready(),
            Err("backend pkcs11 unavailable (token_lost): gone".to_string())
        );
        // Each /readyz asks the cache to refresh itself if stale; it never waits for that.
        assert_eq!(state.0.lock().unwrap().1, 5);
    }
}
