//! `authority.*`: Status, Encrypt and Decrypt sent with each `:authority` a plugin meets on its
//! socket (spec 1.3), over a minimal HTTP/2 gRPC client of our own, because hyper/h2 clients cannot
//! send two of them: `http::uri::Authority` rejects `/` and `%`, so neither the socket path
//! (kube-apiserver ≤ 1.31, grpc-go) nor the %-encoded path (C-core, e.g. Python grpcio) goes out.
//!
//! The client ([`RawGrpc`]): unary calls one after another on one connection; header fields as
//! HPACK literals without indexing (no Huffman, no dynamic table); nothing of the response's header
//! blocks decoded: a call succeeds when its stream carries one whole gRPC message that decodes. A
//! gRPC error (a trailers-only response) is therefore reported without its status code, which
//! these checks do not need: any error fails them.

use std::path::Path;
use std::time::Duration;

use kleidi::proto::v2 as wire;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::{Check, Probe, SEED_LEN, random_bytes, uid};
use crate::apiserver::kms::{DEFAULT_TIMEOUT, EncryptResponse, StatusResponse};

/// The `:authority` forms clients send on a Unix socket (spec 1.3).
#[derive(Clone, Copy)]
pub(super) enum Form {
    /// kube-apiserver ≤ 1.31 (grpc-go): the socket path.
    SocketPath,
    /// C-core (e.g. Python grpcio): the path without its leading `/`, %-encoded.
    PercentEncoded,
    /// kube-apiserver ≥ 1.32.
    Localhost,
}

impl Form {
    pub(super) fn name(self) -> &'static str {
        match self {
            Form::SocketPath => "authority.socket-path",
            Form::PercentEncoded => "authority.percent-encoded",
            Form::Localhost => "authority.localhost",
        }
    }

    fn value(self, socket: &Path) -> String {
        let path = socket.to_string_lossy();
        match self {
            Form::SocketPath => path.into_owned(),
            Form::PercentEncoded => percent_encoded_authority(&path),
            Form::Localhost => "localhost".into(),
        }
    }
}

/// `authority.*`: Status, Encrypt and Decrypt on one connection that sends this `:authority`.
pub(super) async fn check(probe: &Probe, socket: &Path, form: Form) -> Check {
    let name = form.name();
    let value = form.value(socket);
    let mut conn = match RawGrpc::connect(socket, DEFAULT_TIMEOUT).await {
        Ok(conn) => conn,
        Err(err) => return Check::unknown(name, format!("could not open a second connection: {err}")),
    };
    let failed =
        |step: &str, err: RawError| Check::fail(name, format!("{step} with :authority {value:?}: {err}"));
    let status: wire::StatusResponse = match conn.unary(&value, "Status", &wire::StatusRequest {}).await {
        Ok(s) => s,
        Err(err) => return failed("Status", err),
    };
    // Only answers are shared with the shape checks; a refused form is this check's failure alone.
    probe.seen().statuses.push(StatusResponse {
        version: status.version,
        healthz: status.healthz,
        key_id: status.key_id,
    });
    let seed = random_bytes(SEED_LEN);
    let request = wire::EncryptRequest {
        plaintext: seed.clone(),
        uid: uid(),
    };
    let encrypted: wire::EncryptResponse = match conn.unary(&value, "Encrypt", &request).await {
        Ok(e) => e,
        Err(err) => return failed("Encrypt", err),
    };
    probe.seen().encrypts.push(EncryptResponse {
        ciphertext: encrypted.ciphertext.clone(),
        key_id: encrypted.key_id.clone(),
        annotations: encrypted.annotations.clone().into_iter().collect(),
    });
    let request = wire::DecryptRequest {
        ciphertext: encrypted.ciphertext,
        uid: uid(),
        key_id: encrypted.key_id,
        annotations: encrypted.annotations,
    };
    let decrypted: wire::DecryptResponse = match conn.unary(&value, "Decrypt", &request).await {
        Ok(d) => d,
        Err(err) => return failed("Decrypt", err),
    };
    if decrypted.plaintext != seed {
        return Check::fail(
            name,
            format!("Decrypt with :authority {value:?} returned other bytes"),
        );
    }
    Check::pass(
        name,
        format!("Status, Encrypt, Decrypt answered with :authority {value:?}"),
    )
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const TYPE_DATA: u8 = 0x0;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_RST_STREAM: u8 = 0x3;
const TYPE_SETTINGS: u8 = 0x4;
const TYPE_PING: u8 = 0x6;
const TYPE_GOAWAY: u8 = 0x7;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
/// SETTINGS_MAX_FRAME_SIZE's default; we never raise it, so no peer may send more.
const MAX_FRAME: usize = 16_384;
/// Bound on one response's DATA: KMS answers are well under 2 KiB.
const MAX_RESPONSE: usize = 64 * 1024;
/// gRPC message header: compressed flag and a big-endian length.
const GRPC_HEADER: usize = 5;

/// Why a raw call did not give a message.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The peer reset our stream; h2 servers answer an `:authority` they cannot parse this way.
    #[error("the plugin reset the stream with {}", h2_error(*.0))]
    Reset(u32),
    /// The peer closed the connection before answering.
    #[error("the plugin closed the connection (GOAWAY {})", h2_error(*.0))]
    GoAway(u32),
    /// The stream ended without a message: a gRPC error status (not decoded here).
    #[error("the plugin answered with a gRPC error instead of a message")]
    NoMessage,
    /// Bytes that are not HTTP/2 or gRPC as the client expects them.
    #[error("malformed answer: {0}")]
    Malformed(&'static str),
    /// No answer within the per-call deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

fn h2_error(code: u32) -> String {
    let name = match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        _ => return format!("error code {code:#x}"),
    };
    name.to_owned()
}

/// One HTTP/2 connection to a plugin socket.
pub struct RawGrpc {
    stream: UnixStream,
    next_stream: u32,
    timeout: Duration,
}

impl RawGrpc {
    /// Connects and sends the preface and an empty SETTINGS frame.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, RawError> {
        let mut stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| RawError::Timeout(timeout))??;
        let mut hello = PREFACE.to_vec();
        push_frame(&mut hello, TYPE_SETTINGS, 0, 0, &[]);
        stream.write_all(&hello).await?;
        Ok(Self {
            stream,
            next_stream: 1,
            timeout,
        })
    }

    /// Calls `/v2.KeyManagementService/<method>` with `:authority` set to `authority`.
    pub async fn unary<Req: Message, Resp: Message + Default>(
        &mut self,
        authority: &str,
        method: &str,
        request: &Req,
    ) -> Result<Resp, RawError> {
        let timeout = self.timeout;
        let message = tokio::time::timeout(
            timeout,
            self.exchange(authority, method, &request.encode_to_vec()),
        )
        .await
        .map_err(|_| RawError::Timeout(timeout))??;
        Resp::decode(message.as_slice())
            .map_err(|_| RawError::Malformed("the message is not the expected protobuf"))
    }

    async fn exchange(&mut self, authority: &str, method: &str, message: &[u8]) -> Result<Vec<u8>, RawError> {
        let id = self.next_stream;
        self.next_stream += 2;
        let path = format!("/v2.KeyManagementService/{method}");
        let grpc_timeout = format!("{}m", self.timeout.as_millis());
        let fields = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path.as_str()),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-timeout", grpc_timeout.as_str()),
            ("user-agent", "kleidi-harness-conformance"),
        ];
        let mut block = Vec::new();
        for (name, value) in fields {
            block.push(0x00); // literal header field without indexing, new name
            push_string(&mut block, name.as_bytes());
            push_string(&mut block, value.as_bytes());
        }
        let length = u32::try_from(message.len()).map_err(|_| RawError::Malformed("request too large"))?;
        let mut body = Vec::with_capacity(GRPC_HEADER + message.len());
        body.push(0);
        body.extend_from_slice(&length.to_be_bytes());
        body.extend_from_slice(message);
        if block.len() > MAX_FRAME || body.len() > MAX_FRAME {
            return Err(RawError::Malformed("request does not fit one frame"));
        }
        let mut out = Vec::with_capacity(block.len() + body.len() + 18);
        push_frame(&mut out, TYPE_HEADERS, FLAG_END_HEADERS, id, &block);
        push_frame(&mut out, TYPE_DATA, FLAG_END_STREAM, id, &body);
        self.stream.write_all(&out).await?;

        let mut data = Vec::new();
        loop {
            let (kind, flags, stream, payload) = self.read_frame().await?;
            match kind {
                TYPE_SETTINGS if flags & FLAG_ACK == 0 => {
                    let mut ack = Vec::new();
                    push_frame(&mut ack, TYPE_SETTINGS, FLAG_ACK, 0, &[]);
                    self.stream.write_all(&ack).await?;
                }
                TYPE_PING if flags & FLAG_ACK == 0 => {
                    let mut pong = Vec::new();
                    push_frame(&mut pong, TYPE_PING, FLAG_ACK, 0, &payload);
                    self.stream.write_all(&pong).await?;
                }
                TYPE_GOAWAY => {
                    // A graceful GOAWAY that still covers our stream lets it finish.
                    let last = be_u32(payload.get(0..4)).map(|v| v & 0x7fff_ffff);
                    if last.is_none_or(|last| last < id) {
                        return Err(RawError::GoAway(be_u32(payload.get(4..8)).unwrap_or(0)));
                    }
                }
                TYPE_RST_STREAM if stream == id => {
                    return Err(RawError::Reset(be_u32(payload.get(0..4)).unwrap_or(0)));
                }
                TYPE_DATA if stream == id => {
                    data.extend_from_slice(unpadded(flags, &payload)?);
                    if data.len() > MAX_RESPONSE {
                        return Err(RawError::Malformed("response larger than 64 KiB"));
                    }
                    if flags & FLAG_END_STREAM != 0 {
                        break;
                    }
                }
                TYPE_HEADERS if stream == id && flags & FLAG_END_STREAM != 0 => break,
                _ => {}
            }
        }
        grpc_message(&data)
    }

    async fn read_frame(&mut self) -> Result<(u8, u8, u32, Vec<u8>), RawError> {
        let mut header = [0u8; 9];
        self.stream.read_exact(&mut header).await?;
        let [l0, l1, l2, kind, flags, s0, s1, s2, s3] = header;
        let length = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
        if length > MAX_FRAME {
            return Err(RawError::Malformed("frame larger than SETTINGS_MAX_FRAME_SIZE"));
        }
        let mut payload = vec![0; length];
        self.stream.read_exact(&mut payload).await?;
        let stream = u32::from_be_bytes([s0, s1, s2, s3]) & 0x7fff_ffff;
        Ok((kind, flags, stream, payload))
    }
}

/// The one gRPC message of a unary response.
fn grpc_message(data: &[u8]) -> Result<Vec<u8>, RawError> {
    let Some((&compressed, rest)) = data.split_first() else {
        return Err(RawError::NoMessage);
    };
    if compressed != 0 {
        return Err(RawError::Malformed("compressed message, though none was offered"));
    }
    let length = be_u32(rest.get(0..4)).ok_or(RawError::Malformed("truncated gRPC message header"))?;
    let length = usize::try_from(length).map_err(|_| RawError::Malformed("gRPC message too large"))?;
    rest.get(4..)
        .and_then(|m| m.get(..length))
        .map(<[u8]>::to_vec)
        .ok_or(RawError::Malformed("truncated gRPC message"))
}

fn unpadded(flags: u8, payload: &[u8]) -> Result<&[u8], RawError> {
    if flags & FLAG_PADDED == 0 {
        return Ok(payload);
    }
    let (&pad, rest) = payload
        .split_first()
        .ok_or(RawError::Malformed("empty padded frame"))?;
    rest.len()
        .checked_sub(usize::from(pad))
        .and_then(|end| rest.get(..end))
        .ok_or(RawError::Malformed("padding longer than the frame"))
}

fn be_u32(bytes: Option<&[u8]>) -> Option<u32> {
    bytes
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
}

fn push_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    // Callers keep payloads within MAX_FRAME, so the length fits 24 bits.
    let [_, l0, l1, l2] = (payload.len() as u32).to_be_bytes();
    out.extend_from_slice(&[l0, l1, l2, kind, flags]);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

/// An HPACK string literal, raw (not Huffman-coded): a 7-bit-prefix length, then the bytes.
fn push_string(out: &mut Vec<u8>, s: &[u8]) {
    const PREFIX_MAX: usize = 0x7f;
    if s.len() < PREFIX_MAX {
        out.push(s.len() as u8);
    } else {
        out.push(PREFIX_MAX as u8);
        let mut rest = s.len() - PREFIX_MAX;
        while rest >= 0x80 {
            out.push((rest & 0x7f) as u8 | 0x80);
            rest >>= 7;
        }
        out.push(rest as u8);
    }
    out.extend_from_slice(s);
}

/// The `:authority` C-core derives from a `unix:` target: the path without its leading `/`,
/// %-encoded except for RFC 3986 unreserved and sub-delimiter characters (so `/` becomes `%2F`).
pub fn percent_encoded_authority(path: &str) -> String {
    let path = path.strip_prefix('/').unwrap_or(path);
    let mut out = String::with_capacity(path.len() * 2);
    for byte in path.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@[]".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_matches_what_grpcio_sends() {
        assert_eq!(
            percent_encoded_authority("/tmp/probe/x.sock"),
            "tmp%2Fprobe%2Fx.sock"
        );
        assert_eq!(percent_encoded_authority("/run/a b.sock"), "run%2Fa%20b.sock");
    }

    #[test]
    fn long_strings_use_hpack_integer_continuation() {
        let mut out = Vec::new();
        push_string(&mut out, &[b'a'; 200]);
        // 200 = 127 + 73: prefix all ones, then 73 in one byte.
        assert_eq!(&out[..2], &[0x7f, 73]);
        assert_eq!(out.len(), 202);
    }

    #[test]
    fn a_grpc_message_is_unframed_and_an_empty_stream_is_no_message() {
        assert_eq!(grpc_message(&[0, 0, 0, 0, 2, 7, 8]).unwrap(), vec![7, 8]);
        assert!(matches!(grpc_message(&[]), Err(RawError::NoMessage)));
        assert!(matches!(
            grpc_message(&[0, 0, 0, 0, 3, 7]),
            Err(RawError::Malformed(_))
        ));
    }
}
