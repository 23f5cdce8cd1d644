//! The bridge between testcontainers and an older Docker engine. testcontainers 0.25 talks to the
//! engine through bollard 0.19, which prefixes every path with API version 1.48 and never
//! negotiates; an engine that speaks less (Debian bookworm's docker.io 20.10 speaks 1.41) refuses
//! every such request. [`docker_host`] answers `None` when the engine is new enough, else starts
//! (once per process) a Unix-socket relay that rewrites the version in each request line to the
//! engine's own and forwards every byte else unchanged, and answers its `unix://` address for
//! `DOCKER_HOST`.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};

/// The API minor version testcontainers' bollard sends (`/v1.48/…` for bollard 0.19).
const CLIENT_MINOR: usize = testcontainers::bollard::API_DEFAULT_VERSION.minor_version;

/// `Some(unix:///…/docker.sock)` to put in `DOCKER_HOST` before the first container starts, or
/// `None` when the engine speaks testcontainers' API version itself.
pub fn docker_host() -> Result<Option<String>> {
    static RELAY: OnceLock<Result<Option<String>, String>> = OnceLock::new();
    RELAY
        .get_or_init(|| start_relay().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn engine_socket() -> PathBuf {
    match std::env::var("DOCKER_HOST") {
        Ok(host) if host.starts_with("unix://") => PathBuf::from(host.trim_start_matches("unix://")),
        _ => PathBuf::from("/var/run/docker.sock"),
    }
}

/// The engine's API version (`1.41`), from an unversioned `GET /version` on its socket (`DOCKER_HOST`
/// when it is `unix://…`, else the default), bounded by a second each way: whether an engine
/// answers at all is also how a run picks its runtime.
pub fn api_version() -> Result<String> {
    let socket = engine_socket();
    let mut stream = StdUnixStream::connect(&socket)
        .with_context(|| format!("no Docker engine at {}", socket.display()))?;
    let limit = Some(std::time::Duration::from_secs(1));
    stream.set_read_timeout(limit)?;
    stream.set_write_timeout(limit)?;
    stream.write_all(b"GET /version HTTP/1.0\r\nHost: docker\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    let version: serde_json::Value = serde_json::from_str(body).context("engine /version is not JSON")?;
    version
        .get("ApiVersion")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .context("engine /version has no ApiVersion")
}

/// The engine's highest API minor version.
fn engine_minor() -> Result<u8> {
    let api = api_version()?;
    api.strip_prefix("1.")
        .and_then(|minor| minor.parse().ok())
        .with_context(|| format!("engine API version {api:?} is not 1.NN"))
}

fn start_relay() -> Result<Option<String>> {
    let engine = engine_socket();
    let minor = engine_minor()?;
    if usize::from(minor) >= CLIENT_MINOR {
        return Ok(None);
    }
    if minor < 10 {
        bail!("Docker engine API 1.{minor} is too old for testcontainers");
    }
    // Lives as long as the process: the relay serves every container the process starts.
    let dir = tempfile::Builder::new()
        .prefix("kleidi-docker-")
        .tempdir()?
        .keep();
    let path = dir.join("docker.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    std::thread::Builder::new()
        .name("docker-api-relay".into())
        .spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = UnixListener::from_std(listener) else {
                    return;
                };
                while let Ok((client, _)) = listener.accept().await {
                    tokio::spawn(relay(client, engine.clone(), minor));
                }
            });
        })?;
    Ok(Some(format!("unix://{}", path.display())))
}

async fn relay(client: UnixStream, engine: PathBuf, minor: u8) {
    let Ok(server) = UnixStream::connect(&engine).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async move {
        let mut rewriter = Rewriter::new(minor);
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = client_read.read(&mut buf).await {
            let Some(chunk) = buf.get(..n).filter(|c| !c.is_empty()) else {
                break;
            };
            if server_write.write_all(&rewriter.feed(chunk)).await.is_err() {
                return;
            }
        }
        let _ = server_write.write_all(&rewriter.rest()).await;
        let _ = server_write.shutdown().await;
    };
    let downstream = async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upstream, downstream);
}

/// Rewrites ` /v1.NN/` (NN above the engine's) to the engine's version in a byte stream; the same
/// length, so no Content-Length changes. Holds back only a tail that could start such a pattern.
struct Rewriter {
    minor: [u8; 2],
    held: Vec<u8>,
}

/// ` /v1.NN/`: a request line's path start.
const PATTERN_LEN: usize = 8;

impl Rewriter {
    fn new(minor: u8) -> Self {
        Rewriter {
            minor: [b'0' + minor / 10, b'0' + minor % 10],
            held: Vec::new(),
        }
    }

    fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut data = std::mem::take(&mut self.held);
        data.extend_from_slice(chunk);
        for start in 0..data.len() {
            let Some(window) = data.get_mut(start..start + PATTERN_LEN) else {
                break;
            };
            if let [b' ', b'/', b'v', b'1', b'.', tens, ones, b'/'] = window
                && tens.is_ascii_digit()
                && ones.is_ascii_digit()
                && [*tens, *ones] > self.minor
            {
                [*tens, *ones] = self.minor;
            }
        }
        let keep = (1..PATTERN_LEN)
            .rev()
            .find(|&n| data.len() >= n && data.get(data.len() - n..).is_some_and(could_start_pattern))
            .unwrap_or(0);
        self.held = data.split_off(data.len() - keep);
        data
    }

    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }
}

/// Whether `tail` (shorter than the pattern) is how ` /v1.NN/` begins.
fn could_start_pattern(tail: &[u8]) -> bool {
    tail.iter().zip(b" /v1.00/").all(|(&got, &want)| {
        if want == b'0' {
            got.is_ascii_digit()
        } else {
            got == want
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_above_the_engine_version_are_rewritten_across_chunks() {
        let mut rewriter = Rewriter::new(41);
        let mut out = rewriter.feed(b"GET /v1.48/containers/json HTTP/1.1\r\n\r\nPOST /v");
        out.extend(rewriter.feed(b"1.48/exec HTTP/1.1\r\n\r\nGET /v1.40/x HTTP/1.1\r\n"));
        out.extend(rewriter.rest());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /v1.41/containers/json HTTP/1.1\r\n\r\nPOST /v1.41/exec HTTP/1.1\r\n\r\nGET /v1.40/x HTTP/1.1\r\n"
        );
    }

    #[test]
    fn a_complete_request_is_never_held_back() {
        let mut rewriter = Rewriter::new(41);
        let request = b"GET /v1.48/_ping HTTP/1.1\r\nHost: docker\r\n\r\n";
        assert_eq!(rewriter.feed(request).len(), request.len());
    }
}
