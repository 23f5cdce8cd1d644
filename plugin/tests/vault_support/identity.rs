//! What Vault's JWT and Kubernetes auth methods check a login against, made locally: a JWT issuer
//! (an RSA key from `openssl`, RS256 tokens) and a kube-apiserver TokenReview endpoint on 127.0.0.1.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// An issuer's RS256 signing key, made with openssl in `dir`.
pub struct JwtIssuer {
    key: PathBuf,
    /// The public key (PEM) Vault verifies with.
    pub public_pem: PathBuf,
}

impl JwtIssuer {
    pub fn new(dir: &Path, name: &str) -> Self {
        let key = dir.join(format!("{name}.key.pem"));
        let public_pem = dir.join(format!("{name}.pub.pem"));
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            key.to_str().unwrap(),
        ]);
        openssl(&[
            "pkey",
            "-in",
            key.to_str().unwrap(),
            "-pubout",
            "-out",
            public_pem.to_str().unwrap(),
        ]);
        Self { key, public_pem }
    }

    /// A compact JWS (RS256) over `claims`.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let header = B64URL.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let payload = B64URL.encode(serde_json::to_vec(claims).unwrap());
        let input = format!("{header}.{payload}");
        let mut child = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&self.key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        format!("{input}.{}", B64URL.encode(out.stdout))
    }
}

/// Seconds since the epoch, for `iat`/`nbf`/`exp`.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A self-signed certificate (PEM) in `dir`, for configuration that insists on a CA.
pub fn self_signed_cert(dir: &Path, name: &str) -> PathBuf {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "1",
        "-subj",
        &format!("/CN={name}"),
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]);
    cert
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A ServiceAccount token as kube-apiserver's legacy issuer shapes it (Vault reads the namespace,
/// name and uid claims before asking TokenReview whether the token is real).
pub fn service_account_jwt(issuer: &JwtIssuer, namespace: &str, name: &str, uid: &str) -> String {
    issuer.sign(&serde_json::json!({
        "iss": "kubernetes/serviceaccount",
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "kubernetes.io/serviceaccount/namespace": namespace,
        "kubernetes.io/serviceaccount/service-account.name": name,
        "kubernetes.io/serviceaccount/service-account.uid": uid,
    }))
}

/// A kube-apiserver stand-in that answers `POST /apis/authentication.k8s.io/v1/tokenreviews` on
/// 127.0.0.1 over plain HTTP: authenticated as `system:serviceaccount:<ns>:<name>` for exactly the
/// token it was given, unauthenticated for any other. Runs on the test's runtime.
pub struct TokenReviewer {
    /// `http://127.0.0.1:PORT`, for `kubernetes_host`.
    pub url: String,
    reviews: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

struct Account {
    token: String,
    namespace: String,
    name: String,
    uid: String,
}

impl TokenReviewer {
    pub async fn start(token: &str, namespace: &str, name: &str, uid: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let reviews = Arc::new(AtomicUsize::new(0));
        let account = Arc::new(Mutex::new(Account {
            token: token.into(),
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
        }));
        let counter = reviews.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (account, counter) = (account.clone(), counter.clone());
                tokio::spawn(async move {
                    let _ = answer(stream, &account, &counter).await;
                });
            }
        });
        Self { url, reviews, task }
    }

    /// TokenReviews answered so far.
    pub fn reviews(&self) -> usize {
        self.reviews.load(Ordering::SeqCst)
    }
}

impl Drop for TokenReviewer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One HTTP/1.1 exchange, then close.
async fn answer(
    stream: tokio::net::TcpStream,
    account: &Mutex<Account>,
    counter: &AtomicUsize,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).await?;
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await?;
    let (status, reply) = if request_line.starts_with("POST /apis/authentication.k8s.io/v1/tokenreviews ") {
        counter.fetch_add(1, Ordering::SeqCst);
        let review: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let account = account.lock().unwrap();
        let user = if review["spec"]["token"].as_str() == Some(account.token.as_str()) {
            serde_json::json!({
                "authenticated": true,
                "user": {
                    "username": format!("system:serviceaccount:{}:{}", account.namespace, account.name),
                    "uid": account.uid,
                    "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", account.namespace)],
                },
            })
        } else {
            serde_json::json!({ "authenticated": false, "error": "invalid bearer token" })
        };
        let reply = serde_json::json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {},
            "spec": review["spec"],
            "status": user,
        });
        ("201 Created", reply.to_string())
    } else {
        ("404 Not Found", r#"{"kind":"Status","code":404}"#.to_string())
    };
    let mut stream = reader.into_inner();
    stream
        .write_all(
            format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                reply.len()
            )
            .as_bytes(),
        )
        .await?;
    stream.shutdown().await
}
