//! `--metrics-addr`: the real `kleidi serve` on a SoftHSM token, scraped over HTTP and parsed with an
//! independent Prometheus text parser (`prometheus-parse`); `/livez` and `/readyz` through a token
//! outage; garbage HTTP; and the refusal of a non-loopback address.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // tests
// `support` and `vault_support` each include common/private.rs (the credential-file writer).
#![cfg_attr(feature = "vault", allow(clippy::duplicate_mod))]

mod support;
#[cfg(feature = "vault")]
mod vault_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use kleidi::proto::v2;
use prometheus_parse::{Sample, Scrape, Value};
use sha2::{Digest, Sha256};
use support::{KEK, Kleidi, Token, seed};
use tonic::Code;

/// The address `kleidi serve` logged for its metrics listener (it was given port 0).
fn metrics_addr(k: &Kleidi) -> SocketAddr {
    metrics_addr_in(&k.log)
}

fn metrics_addr_in(log: &Path) -> SocketAddr {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        let logs = std::fs::read_to_string(log).unwrap_or_default();
        // The listener's own line: the startup line's `metrics_addr` is the flag (port 0).
        let listening = logs.lines().find(|l| l.contains("endpoints listening"));
        if let Some(rest) = listening.and_then(|l| l.split("metrics_addr=").nth(1)) {
            let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
            return addr.parse().unwrap_or_else(|e| panic!("{addr:?}: {e}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "no metrics_addr in the log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// Sends `request` as is and returns the status code and body of the answer (the connection is
/// closed by `Connection: close` or by the server).
fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    conn.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let code = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: kleidi\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

fn scrape(addr: SocketAddr) -> (String, Scrape) {
    let (code, body) = get(addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.ends_with("# EOF\n"),
        "not a complete OpenMetrics exposition:\n{body}"
    );
    let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    (body, scrape)
}

/// The one sample named `name` whose labels include all of `labels`, if any.
fn sample<'s>(scrape: &'s Scrape, name: &str, labels: &[(&str, &str)]) -> Option<&'s Sample> {
    let found: Vec<&Sample> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert!(
        found.len() <= 1,
        "{name} {labels:?} matches {} samples",
        found.len()
    );
    found.first().copied()
}

/// The value of the sample named `name` with `labels`; 0 if none.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(scrape, name, labels).map(|s| &s.value) {
        None => 0.0,
        Some(Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v)) => *v,
        Some(other) => panic!("{name}: unexpected {other:?}"),
    }
}

/// The `+Inf` bucket of the histogram `name` with `labels`: how many observations it has.
fn histogram_count(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(scrape, name, labels).map(|s| &s.value) {
        None => 0.0,
        Some(Value::Histogram(buckets)) => buckets
            .iter()
            .find(|b| b.less_than.is_infinite())
            .map(|b| b.count)
            .unwrap(),
        Some(other) => panic!("{name}: not a histogram: {other:?}"),
    }
}

fn short_hash(key_id: &str) -> String {
    hex::encode(&Sha256::digest(key_id.as_bytes())[..4])
}

#[tokio::test]
async fn a_scrape_counts_exactly_the_calls_made() {
    let token = Token::new();
    let k = Kleidi::start(&token, KEK, &["--metrics-addr", "127.0.0.1:0"]);
    let addr = metrics_addr(&k);
    let mut client = k.v2().await;

    let mut key_id = String::new();
    for i in 0..5 {
        let s = seed();
        let e = client
            .encrypt(v2::EncryptRequest {
                plaintext: s.clone(),
                uid: format!("ok-{i}"),
            })
            .await
            .unwrap()
            .into_inner();
        let plain = client
            .decrypt(v2::DecryptRequest {
                ciphertext: e.ciphertext,
                uid: format!("ok-{i}"),
                key_id: e.key_id.clone(),
                annotations: e.annotations,
            })
            .await
            .unwrap()
            .into_inner()
            .plaintext;
        assert_eq!(plain, s);
        key_id = e.key_id;
    }
    // Bad input: stopped by the guard layer (empty plaintext, empty ciphertext) before the backend.
    for _ in 0..2 {
        let err = client
            .encrypt(v2::EncryptRequest {
                plaintext: vec![],
                uid: "empty".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    let err = client
        .decrypt(v2::DecryptRequest {
            ciphertext: vec![],
            uid: "empty".into(),
            key_id: key_id.clone(),
            annotations: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let st = client.status(v2::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.healthz, "ok");

    let (body, scrape) = scrape(addr);
    let rpc = |method, code| {
        value(
            &scrape,
            "kleidi_rpc_requests_total",
            &[("service", "v2"), ("method", method), ("code", code)],
        )
    };
    assert_eq!(rpc("encrypt", "ok"), 5.0, "{body}");
    assert_eq!(rpc("decrypt", "ok"), 5.0, "{body}");
    assert_eq!(rpc("encrypt", "invalid_argument"), 2.0, "{body}");
    assert_eq!(rpc("decrypt", "invalid_argument"), 1.0, "{body}");
    assert_eq!(rpc("status", "ok"), 1.0, "{body}");
    for (method, code, n) in [
        ("encrypt", "ok", 5.0),
        ("decrypt", "ok", 5.0),
        ("encrypt", "invalid_argument", 2.0),
    ] {
        let labels = [("service", "v2"), ("method", method), ("code", code)];
        assert_eq!(
            histogram_count(&scrape, "kleidi_rpc_duration_seconds", &labels),
            n,
            "{method} {code}: {body}"
        );
        assert_eq!(
            value(&scrape, "kleidi_rpc_duration_seconds_count", &labels),
            n,
            "{method} {code}"
        );
    }

    // Backend calls: only what passed the guard, by caller; the startup probe is a probe.
    let backend = |op, caller| {
        value(
            &scrape,
            "kleidi_backend_calls_total",
            &[
                ("backend", "pkcs11"),
                ("op", op),
                ("caller", caller),
                ("class", "ok"),
            ],
        )
    };
    assert_eq!(backend("encrypt", "rpc"), 5.0, "{body}");
    assert_eq!(backend("decrypt", "rpc"), 5.0, "{body}");
    assert_eq!(backend("current_key_id", "rpc"), 0.0, "{body}");
    assert!(backend("current_key_id", "probe") >= 1.0, "{body}");
    assert!(
        !scrape
            .samples
            .iter()
            .any(|s| s.metric == "kleidi_backend_calls_total" && s.labels.get("class") != Some("ok")),
        "a failed backend call was counted: {body}"
    );
    assert_eq!(
        histogram_count(
            &scrape,
            "kleidi_backend_call_duration_seconds",
            &[("op", "encrypt"), ("caller", "rpc"), ("class", "ok")]
        ),
        5.0
    );

    // The key as a short hash only.
    assert_eq!(
        value(
            &scrape,
            "kleidi_current_key_info",
            &[("key_id_hash", &short_hash(&key_id))]
        ),
        1.0,
        "{body}"
    );
    assert!(!body.contains(&key_id), "the raw key_id is exposed:\n{body}");
    assert_eq!(value(&scrape, "kleidi_health_healthy", &[]), 1.0, "{body}");
    let age = value(&scrape, "kleidi_health_verdict_age_seconds", &[]);
    assert!((0.0..60.0).contains(&age), "verdict age {age}");
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "kleidi_authority_rewrites_total"),
        "{body}"
    );
    // SoftHSM has no expiring credential.
    assert!(!body.contains("kleidi_credential_expiry_seconds{"), "{body}");

    let (code, _) = get(addr, "/livez");
    assert_eq!(code, 200);
    let (code, body) = get(addr, "/readyz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
}

/// Polls `path` until it answers `code`; the last answer.
fn wait_for(addr: SocketAddr, path: &str, code: u16, within: Duration) -> (u16, String) {
    let started = Instant::now();
    loop {
        let answer = get(addr, path);
        if answer.0 == code || started.elapsed() > within {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test]
async fn livez_ignores_a_backend_outage_that_readyz_reports() {
    let token = Token::new();
    // Short TTLs so /readyz's own probes follow the token quickly.
    let k = Kleidi::start(
        &token,
        KEK,
        &[
            "--metrics-addr",
            "127.0.0.1:0",
            "--health-ok-ttl",
            "1s",
            "--health-err-ttl",
            "1s",
            "--health-roundtrip-interval",
            "1s",
        ],
    );
    let addr = metrics_addr(&k);
    assert_eq!(wait_for(addr, "/readyz", 200, Duration::from_secs(10)).0, 200);

    let dir = token.token_dir();
    let away = token.dir.path().join("away");
    std::fs::rename(&dir, &away).unwrap();
    // No client calls: /readyz alone must notice, by the probes it starts when the verdict is stale.
    let (code, reason) = wait_for(addr, "/readyz", 503, Duration::from_secs(20));
    assert_eq!(code, 503, "/readyz still says {reason:?} with the token gone");
    assert!(
        reason.contains("unavailable") || reason.contains("denied") || reason.contains("backend"),
        "{reason}"
    );
    assert_eq!(
        get(addr, "/livez"),
        (200, "ok\n".to_string()),
        "liveness must ignore the backend"
    );
    let (_, scrape) = scrape(addr);
    assert_eq!(value(&scrape, "kleidi_health_healthy", &[]), 0.0);
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "kleidi_backend_calls_total"
                && s.labels.get("caller") == Some("probe")
                && s.labels.get("class") != Some("ok")),
        "the failed probe's backend call is not counted"
    );

    std::fs::rename(&away, &dir).unwrap();
    let (code, body) = wait_for(addr, "/readyz", 200, Duration::from_secs(20));
    assert_eq!(code, 200, "/readyz did not recover: {body}\n{}", k.logs());
    assert_eq!(get(addr, "/livez").0, 200);
}

/// grpcio sends the socket path as `:authority`, as kube-apiserver <= 1.31 does; kleidi rewrites it
/// (tests/serve.rs proves the rewrite itself) and counts it.
#[test]
fn authority_rewrites_are_counted() {
    let token = Token::new();
    let k = Kleidi::start(&token, KEK, &["--metrics-addr", "127.0.0.1:0"]);
    let addr = metrics_addr(&k);
    let before = value(&scrape(addr).1, "kleidi_authority_rewrites_total", &[]);
    assert_eq!(before, 0.0);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/grpcio_client.py");
    let out = std::process::Command::new("python3")
        .args([
            script,
            "--socket",
            k.socket.to_str().unwrap(),
            "--authority",
            "path",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = value(&scrape(addr).1, "kleidi_authority_rewrites_total", &[]);
    assert!(after >= 1.0, "{after}");
}

#[tokio::test]
async fn garbage_http_neither_panics_nor_stops_the_listener() {
    let token = Token::new();
    let mut k = Kleidi::start(&token, KEK, &["--metrics-addr", "127.0.0.1:0"]);
    let addr = metrics_addr(&k);
    let garbage: Vec<Vec<u8>> = vec![
        b"\x00\xff\xfe garbage\r\n\r\n".to_vec(),
        b"GET\r\n\r\n".to_vec(),
        b"GET /metrics HTTP/9.9\r\n\r\n".to_vec(),
        // A request head larger than the listener's buffer.
        format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(64 * 1024)).into_bytes(),
        // HTTP/2 preface, as a gRPC client sent to the wrong port would.
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc".to_vec(),
        b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
    ];
    for request in &garbage {
        let (code, _) = exchange(addr, request);
        assert!(
            code == 0 || code >= 400,
            "{code} for {:?}",
            String::from_utf8_lossy(request)
        );
    }
    // A connection that never finishes its headers, and more connections than the listener keeps.
    let idle: Vec<TcpStream> = (0..40).filter_map(|_| TcpStream::connect(addr).ok()).collect();
    std::thread::sleep(Duration::from_millis(200));
    drop(idle);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        k.child.try_wait().unwrap().is_none(),
        "kleidi exited:\n{}",
        k.logs()
    );
    assert_eq!(wait_for(addr, "/livez", 200, Duration::from_secs(10)).0, 200);
    assert!(!k.logs().contains("panicked"), "{}", k.logs());
    // And the socket still serves.
    let st = k
        .v2()
        .await
        .status(v2::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.healthz, "ok");
}

#[test]
fn a_non_loopback_metrics_address_is_refused_unless_allowed() {
    let token = Token::new();
    let socket = token.dir.path().join("run/refused.sock");
    let log = token.dir.path().join("refused.log");
    let mut child = Kleidi::spawn(&token, KEK, &socket, &log, &["--metrics-addr", "0.0.0.0:0"]);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "kleidi did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success());
    assert!(
        logs.contains("not a loopback address") && logs.contains("--metrics-allow-non-loopback"),
        "{logs}"
    );
    assert!(!socket.exists(), "the socket was bound before the refusal");

    // Opted in, it serves.
    let k = Kleidi::start(
        &token,
        KEK,
        &["--metrics-addr", "0.0.0.0:0", "--metrics-allow-non-loopback"],
    );
    let port = metrics_addr(&k).port();
    assert_eq!(get(SocketAddr::from(([127, 0, 0, 1], port)), "/livez").0, 200);
}

/// The token's remaining lease, as kleidi last learned it (login or renewal), counts down from the
/// TTL it was created with; the token itself appears nowhere.
#[cfg(feature = "vault")]
#[tokio::test(flavor = "multi_thread")]
async fn the_vault_token_lease_is_exposed_as_seconds_left() {
    let bao = vault_support::Bao::dev();
    let token = bao.kleidi_token("kek", "1h");
    let file = bao.file("token", &token);
    let k = vault_support::serve::Kleidi::start(
        &bao.addr,
        "kek",
        &[
            "--vault-auth",
            "token",
            "--vault-token-file",
            file.to_str().unwrap(),
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    );
    let addr = metrics_addr_in(&k.log);
    let wrapped = k.encrypt(&seed()).await.unwrap();
    let (body, scrape) = scrape(addr);
    let left = value(
        &scrape,
        "kleidi_credential_expiry_seconds",
        &[("credential", "vault_token")],
    );
    assert!((3000.0..=3600.0).contains(&left), "{left}: {body}");
    assert!(!body.contains(&token), "the token is exposed");
    assert!(!body.contains(&wrapped.key_id), "the raw key_id is exposed");
    assert_eq!(
        value(
            &scrape,
            "kleidi_backend_calls_total",
            &[
                ("backend", "vault"),
                ("op", "encrypt"),
                ("caller", "rpc"),
                ("class", "ok")
            ]
        ),
        1.0,
        "{body}"
    );
    assert_eq!(
        value(
            &scrape,
            "kleidi_current_key_info",
            &[("key_id_hash", &short_hash(&wrapped.key_id))]
        ),
        1.0,
        "{body}"
    );
}

/// `--vault-client-cert`'s notAfter, read from the file (a one-day certificate here).
#[cfg(feature = "vault")]
#[tokio::test(flavor = "multi_thread")]
async fn the_client_certificate_expiry_is_exposed_as_seconds_left() {
    let bao = vault_support::Bao::dev();
    let token = bao.kleidi_token("kek", "1h");
    let file = bao.file("token", &token);
    let cert = vault_support::identity::self_signed_cert(bao.dir.path(), "client");
    let key = bao.dir.path().join("client-key.pem");
    let k = vault_support::serve::Kleidi::start(
        &bao.addr,
        "kek",
        &[
            "--vault-auth",
            "token",
            "--vault-token-file",
            file.to_str().unwrap(),
            "--vault-client-cert",
            cert.to_str().unwrap(),
            "--vault-client-key",
            key.to_str().unwrap(),
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    );
    let addr = metrics_addr_in(&k.log);
    let (body, scrape) = scrape(addr);
    let left = value(
        &scrape,
        "kleidi_credential_expiry_seconds",
        &[("credential", "client_certificate")],
    );
    assert!((86_000.0..=86_400.0).contains(&left), "{left}: {body}");
}
