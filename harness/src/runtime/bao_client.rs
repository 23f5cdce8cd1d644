//! A plain-HTTP client for the OpenBao API, just enough for the runtime's admin calls and a test's
//! transit round trip. One HTTP/1.0 request per connection: the server closes after answering, so
//! the body is everything up to EOF (no chunking, no pool that would hide a fault proxy's effect
//! on new connections). No TLS: the harness's servers listen on 127.0.0.1 only.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

/// Bound on an answer; OpenBao's are a few KiB.
const MAX_ANSWER: u64 = 4 << 20;

/// One OpenBao server (or a proxy in front of it) at `http://host:port`.
#[derive(Clone, Debug)]
pub struct BaoClient {
    /// `host:port`.
    authority: String,
    /// Bound on a whole request: connect, send, read the answer.
    timeout: Duration,
}

/// An answer: the HTTP status and the JSON body (`Null` when empty).
#[derive(Debug)]
pub struct BaoResponse {
    /// HTTP status code (200, 204, 403, 503, …).
    pub status: u16,
    /// The parsed body.
    pub body: serde_json::Value,
}

impl BaoResponse {
    /// The answer if its status is 2xx, else an error naming the status and OpenBao's `errors`.
    pub fn ok(self) -> Result<Self> {
        if (200..300).contains(&self.status) {
            return Ok(self);
        }
        let errors = self.body.get("errors").unwrap_or(&serde_json::Value::Null);
        bail!("OpenBao answered {}: {errors}", self.status)
    }

    /// The string at JSON `pointer` (`/data/ciphertext`), or an error naming it.
    pub fn str_at(&self, pointer: &str) -> Result<&str> {
        self.body
            .pointer(pointer)
            .and_then(serde_json::Value::as_str)
            .with_context(|| format!("OpenBao answer without {pointer}"))
    }
}

impl BaoClient {
    /// A client for `url` (`http://127.0.0.1:PORT`), each request bounded by `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<Self> {
        let authority = url
            .strip_prefix("http://")
            .with_context(|| format!("{url}: only http:// is supported"))?
            .trim_end_matches('/')
            .to_string();
        Ok(BaoClient { authority, timeout })
    }

    /// `METHOD /v1/<path>` with `token` (as X-Vault-Token) and a JSON `body`.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&SecretString>,
        body: Option<&serde_json::Value>,
    ) -> Result<BaoResponse> {
        tokio::time::timeout(self.timeout, self.exchange(method, path, token, body))
            .await
            .map_err(|_| anyhow::anyhow!("no answer from {} within {:?}", self.authority, self.timeout))?
            .with_context(|| format!("{method} {} /v1/{path}", self.authority))
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        token: Option<&SecretString>,
        body: Option<&serde_json::Value>,
    ) -> Result<BaoResponse> {
        // Request and answer may carry tokens, unseal keys and plaintext: zeroized when done.
        let payload = Zeroizing::new(match body {
            Some(b) => serde_json::to_vec(b)?,
            None => Vec::new(),
        });
        let mut request = Zeroizing::new(format!(
            "{method} /v1/{path} HTTP/1.0\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.authority,
            payload.len()
        ));
        if let Some(token) = token {
            request.push_str("X-Vault-Token: ");
            request.push_str(token.expose_secret());
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        let mut stream = TcpStream::connect(&self.authority).await?;
        stream.write_all(request.as_bytes()).await?;
        stream.write_all(&payload).await?;
        let mut answer = Zeroizing::new(Vec::new());
        (&mut stream).take(MAX_ANSWER).read_to_end(&mut answer).await?;
        parse(&answer)
    }

    /// Transit encrypt of `plaintext` with key `key` on `mount`; the `vault:v<N>:…` ciphertext.
    pub async fn encrypt(
        &self,
        token: &SecretString,
        mount: &str,
        key: &str,
        plaintext: &[u8],
    ) -> Result<String> {
        let body = serde_json::json!({ "plaintext": STANDARD.encode(plaintext) });
        let answer = self
            .request(
                "POST",
                &format!("{mount}/encrypt/{key}"),
                Some(token),
                Some(&body),
            )
            .await?
            .ok()?;
        Ok(answer.str_at("/data/ciphertext")?.to_string())
    }

    /// Transit decrypt of `ciphertext` with key `key` on `mount`.
    pub async fn decrypt(
        &self,
        token: &SecretString,
        mount: &str,
        key: &str,
        ciphertext: &str,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let body = serde_json::json!({ "ciphertext": ciphertext });
        let answer = self
            .request(
                "POST",
                &format!("{mount}/decrypt/{key}"),
                Some(token),
                Some(&body),
            )
            .await?
            .ok()?;
        Ok(Zeroizing::new(
            STANDARD.decode(answer.str_at("/data/plaintext")?)?,
        ))
    }
}

/// Splits `HTTP/1.x CODE …\r\n headers \r\n\r\n body`.
fn parse(answer: &[u8]) -> Result<BaoResponse> {
    let Some(split) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!(
            "no complete HTTP answer ({} bytes before the connection ended)",
            answer.len()
        );
    };
    let head = std::str::from_utf8(answer.get(..split).unwrap_or_default())?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status in {:?}", head.lines().next().unwrap_or_default()))?;
    let body = answer.get(split + 4..).unwrap_or_default();
    let length = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    });
    if let Some(length) = length.filter(|&l| l > body.len()) {
        bail!("answer cut after {} of {length} body bytes", body.len());
    }
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(body).context("answer body is not JSON")?
    };
    Ok(BaoResponse { status, body })
}
