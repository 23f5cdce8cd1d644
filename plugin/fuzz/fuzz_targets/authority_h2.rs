//! Differential target for the `:authority` layer: connections as an h2 client writes them. Each
//! request's header list (any method, path, `:authority` string, header fields, sensitive values)
//! is encoded by h2's own HPACK encoder and framing (dynamic table, Huffman, table size updates,
//! CONTINUATION at the chosen frame size), between SETTINGS, DATA and PING frames, then fed through
//! `AuthorityFix` at arbitrary read boundaries. h2's own frame codec, the server kleidi runs,
//! reads both the client's bytes and what the layer hands on (an HPACK decoder independent of the
//! layer's), and the header lists must be the same, except that each `:authority` the `http` crate
//! cannot parse became one it can; a block with no such `:authority` must pass byte for byte, and
//! the layer must count exactly the replaced fields. The layer never fails on these streams.

#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll, Waker};

use arbitrary::Arbitrary;
use bytes::Bytes;
use futures_core::Stream;
use h2::frame::{BytesStr, Data, Frame, Headers, Ping, Pseudo, Settings, StreamId};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use kleidi::authority::AuthorityFix;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

#[path = "common/client.rs"]
mod client;
use client::Client;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// One runtime for every input (the layer's timers need one).
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime")
});

#[derive(Arbitrary, Debug)]
struct Connection {
    /// The frame size the client's codec splits header blocks at (64 to 16,384).
    max_frame_size: u16,
    requests: Vec<Request>,
    /// Read boundaries on the server side, cycled.
    cuts: Vec<u16>,
}

#[derive(Arbitrary, Debug)]
struct Request {
    method: u8,
    https: bool,
    authority: AuthorityChoice,
    path: String,
    fields: Vec<Field>,
    end_stream: bool,
    data: Option<Vec<u8>>,
    ping: bool,
    /// A new HPACK table size (at most 4096, what h2 servers allow) before this request.
    table_size: Option<u16>,
}

#[derive(Arbitrary, Debug)]
enum AuthorityChoice {
    /// What kube-apiserver before 1.32 and grpcio send, or a valid one, by index.
    Known(u8),
    /// A known one with a suffix, so near-misses of the rules are tried.
    Suffixed(u8, String),
    /// Anything an h2 client can carry (any UTF-8).
    Any(String),
    /// No `:authority` at all.
    Absent,
}

#[derive(Arbitrary, Debug)]
struct Field {
    name: NameChoice,
    value: Vec<u8>,
    sensitive: bool,
}

#[derive(Arbitrary, Debug)]
enum NameChoice {
    Known(u8),
    Any(String),
}

const KNOWN_AUTHORITIES: [&str; 10] = [
    "/var/run/kms.sock",
    "tmp%2Fprobe%2Fx.sock",
    "localhost",
    "localhost:50051",
    "kms.example.org:443",
    "[::1]:8080",
    "kms.sock",
    "a b",
    "@",
    "unix:///tmp/kms.sock",
];

const KNOWN_NAMES: [&str; 8] = [
    "content-type",
    "user-agent",
    "te",
    "grpc-timeout",
    "grpc-accept-encoding",
    "authorization",
    "x-request-id",
    "cookie",
];

const METHODS: [&str; 4] = ["POST", "GET", "PUT", "OPTIONS"];

impl AuthorityChoice {
    fn value(&self) -> Option<String> {
        let known = |i: &u8| KNOWN_AUTHORITIES[usize::from(*i) % KNOWN_AUTHORITIES.len()];
        match self {
            Self::Known(i) => Some(known(i).to_owned()),
            Self::Suffixed(i, s) => Some(format!("{}{s}", known(i))),
            Self::Any(s) => Some(s.clone()),
            Self::Absent => None,
        }
    }
}

/// A socket as a codec sees it: writes collect; reads give `input`, then end.
#[derive(Default)]
struct Wire(Vec<u8>, io::Cursor<Vec<u8>>);

impl Wire {
    fn reading(input: &[u8]) -> Self {
        Self(Vec::new(), io::Cursor::new(input.to_vec()))
    }
}

impl AsyncRead for Wire {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().1).poll_read(cx, buf)
    }
}

impl AsyncWrite for Wire {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().0.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Writes one frame through h2's codec (the wire is always ready, so no waker is needed).
fn send(codec: &mut h2::Codec<Wire, Bytes>, frame: Frame<Bytes>) {
    let mut cx = Context::from_waker(Waker::noop());
    assert!(codec.poll_ready(&mut cx).is_ready());
    codec.buffer(frame).expect("h2 accepts the frame");
    while codec.flush(&mut cx).is_pending() {}
}

/// A request's header list as h2 encodes it, or `None` if h2 could not carry it.
fn header_list(req: &Request) -> Option<(Pseudo, HeaderMap)> {
    let mut fields = HeaderMap::new();
    let mut size = 0;
    for f in req.fields.iter().take(12) {
        let name = match &f.name {
            NameChoice::Known(i) => HeaderName::from_static(KNOWN_NAMES[usize::from(*i) % KNOWN_NAMES.len()]),
            // h2 sends lower-case names only; pseudo-headers are not fields.
            NameChoice::Any(s) => HeaderName::from_lowercase(s.as_bytes()).ok()?,
        };
        // What h2 refuses in a request, as a malformed stream (the client's too): a connection-level
        // field or a `te` other than "trailers".
        let connection_level = [
            "connection",
            "transfer-encoding",
            "upgrade",
            "keep-alive",
            "proxy-connection",
        ];
        if connection_level.contains(&name.as_str()) || (name == "te" && f.value != b"trailers") {
            continue;
        }
        let mut value = HeaderValue::from_bytes(&f.value).ok()?;
        value.set_sensitive(f.sensitive);
        size += name.as_str().len() + f.value.len() + 32;
        fields.append(name, value);
    }
    let authority = req.authority.value();
    // h2's client takes `:authority` from an `http::Uri`, which cannot hold an empty one; and the
    // layer refuses, by design, an empty one entering the dynamic table (which h2's encoder does
    // for it), since no replacement of the same length exists.
    if authority.as_deref() == Some("") {
        return None;
    }
    size += req.path.len() + authority.as_ref().map_or(0, String::len);
    // Well inside the 16 KiB header list h2 servers accept (the layer refuses over 32 KiB).
    if size > 12 * 1024 {
        return None;
    }
    let bytes = |s: &str| BytesStr::try_from(Bytes::copy_from_slice(s.as_bytes())).ok();
    let pseudo = Pseudo {
        method: Some(
            http::Method::from_bytes(METHODS[usize::from(req.method) % METHODS.len()].as_bytes()).ok()?,
        ),
        scheme: bytes(if req.https { "https" } else { "http" }),
        authority: match authority {
            Some(a) => Some(bytes(&a)?),
            None => None,
        },
        path: Some(bytes(&req.path)?),
        protocol: None,
        status: None,
    };
    Some((pseudo, fields))
}

/// (stream, HPACK block) of every header block in a connection's bytes after the preface.
fn header_blocks(mut rest: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut blocks = Vec::new();
    let mut open: Option<(u32, Vec<u8>)> = None;
    while !rest.is_empty() {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let (kind, flags) = (rest[3], rest[4]);
        let stream = u32::from_be_bytes([rest[5] & 0x7f, rest[6], rest[7], rest[8]]);
        let payload = &rest[9..9 + len];
        rest = &rest[9 + len..];
        match kind {
            TYPE_HEADERS => {
                assert!(open.is_none(), "HEADERS inside a header block");
                let mut p = payload;
                let mut pad = 0;
                if flags & FLAG_PADDED != 0 {
                    pad = usize::from(p[0]);
                    p = &p[1..];
                }
                if flags & FLAG_PRIORITY != 0 {
                    p = &p[5..];
                }
                open = Some((stream, p[..p.len() - pad].to_vec()));
            }
            TYPE_CONTINUATION => {
                let o = open.as_mut().expect("CONTINUATION after HEADERS");
                assert_eq!(o.0, stream);
                o.1.extend_from_slice(payload);
            }
            _ => {
                assert!(open.is_none(), "a frame inside a header block");
                continue;
            }
        }
        if flags & FLAG_END_HEADERS != 0 {
            blocks.push(open.take().expect("an open block"));
        }
    }
    assert!(open.is_none(), "unterminated header block");
    blocks
}

/// Each header block's list as h2's server-side codec decodes it from `frames` (a connection's
/// bytes after the preface): pseudo-headers in a fixed order, then the fields, as (name, value).
/// The order within a block follows h2's `HeaderMap` (values of one name together, in order),
/// which is the same for both sides of the comparison.
fn decode_all(frames: &[u8]) -> Vec<(u32, Vec<(Vec<u8>, Vec<u8>)>)> {
    let mut codec: h2::Codec<Wire, Bytes> = h2::Codec::new(Wire::reading(frames));
    let mut cx = Context::from_waker(Waker::noop());
    let mut lists = Vec::new();
    loop {
        let frame = match Stream::poll_next(Pin::new(&mut codec), &mut cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => panic!("h2 cannot read the connection: {e:?}"),
            Poll::Ready(None) => return lists,
            Poll::Pending => panic!("an in-memory connection never waits"),
        };
        let Frame::Headers(headers) = frame else {
            continue;
        };
        assert!(!headers.is_over_size(), "a header list h2 refuses as too large");
        let stream = u32::from(headers.stream_id());
        let (pseudo, fields) = headers.into_parts();
        let mut list = Vec::new();
        let mut pseudo_field = |name: &str, value: Option<&[u8]>| {
            if let Some(value) = value {
                list.push((name.as_bytes().to_vec(), value.to_vec()));
            }
        };
        pseudo_field(":method", pseudo.method.as_ref().map(|m| m.as_str().as_bytes()));
        pseudo_field(":scheme", pseudo.scheme.as_ref().map(AsRef::as_ref));
        pseudo_field(":authority", pseudo.authority.as_ref().map(AsRef::as_ref));
        pseudo_field(":path", pseudo.path.as_ref().map(AsRef::as_ref));
        for (name, value) in &fields {
            list.push((name.as_str().as_bytes().to_vec(), value.as_bytes().to_vec()));
        }
        lists.push((stream, list));
    }
}

fuzz_target!(|conn: Connection| {
    let mut codec = h2::Codec::new(Wire::default());
    codec.set_max_send_frame_size(usize::from(conn.max_frame_size).clamp(64, 16_384));
    send(&mut codec, Settings::default().into());
    let mut sent = 0;
    for (i, req) in conn.requests.iter().take(12).enumerate() {
        let Some((pseudo, fields)) = header_list(req) else {
            continue;
        };
        if let Some(size) = req.table_size {
            codec.set_send_header_table_size(usize::from(size).min(4096));
        }
        let stream = StreamId::from(2 * i as u32 + 1);
        let mut headers = Headers::new(stream, pseudo, fields);
        let data = req.data.as_ref().filter(|_| !req.end_stream);
        if req.end_stream || data.is_none() {
            headers.set_end_stream();
        }
        send(&mut codec, headers.into());
        if let Some(payload) = data {
            let mut frame = Data::new(stream, Bytes::copy_from_slice(&payload[..payload.len().min(64)]));
            frame.set_end_stream(true);
            send(&mut codec, frame.into());
        }
        if req.ping {
            send(&mut codec, Ping::new([i as u8; 8]).into());
        }
        sent += 1;
    }
    if sent == 0 {
        return;
    }
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(&codec.get_ref().0);
    let sizes: Vec<usize> = conn.cuts.iter().take(32).map(|&c| usize::from(c) + 1).collect();

    let (output, rewritten) = RUNTIME.block_on(async {
        let mut fix = AuthorityFix::new(Client::new(&input, &sizes));
        let mut out = Vec::new();
        let mut piece = vec![0u8; 1 << 16];
        loop {
            match fix.read(&mut piece).await {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&piece[..n]),
                Err(e) => panic!("the layer failed an h2 client's connection: {e}"),
            }
        }
        (out, fix.rewritten())
    });

    let sent_frames = &input[PREFACE.len()..];
    let got_frames = output.strip_prefix(PREFACE).expect("the preface passes");
    let sent_blocks = header_blocks(sent_frames);
    let got_blocks = header_blocks(got_frames);
    assert_eq!(sent_blocks.len(), got_blocks.len());
    let (sent_lists, got_lists) = (decode_all(sent_frames), decode_all(got_frames));
    assert_eq!(sent_lists.len(), sent_blocks.len());
    assert_eq!(got_lists.len(), got_blocks.len());
    let (mut bad, mut changed) = (0u64, 0u64);
    for ((sent_list, got_list), (sent_block, got_block)) in sent_lists
        .iter()
        .zip(&got_lists)
        .zip(sent_blocks.iter().zip(&got_blocks))
    {
        assert_eq!(sent_block.0, got_block.0, "stream ids");
        assert_eq!(
            (sent_list.0, got_list.0),
            (sent_block.0, got_block.0),
            "stream ids"
        );
        let (sent_list, got_list) = (&sent_list.1, &got_list.1);
        assert_eq!(
            sent_list.len(),
            got_list.len(),
            "{sent_list:?} became {got_list:?}"
        );
        let mut block_bad = false;
        for ((name, value), (got_name, got_value)) in sent_list.iter().zip(got_list) {
            assert_eq!(name, got_name);
            if name == b":authority" && Authority::try_from(value.as_slice()).is_err() {
                block_bad = true;
                bad += 1;
                assert!(
                    Authority::try_from(got_value.as_slice()).is_ok(),
                    "{value:?} became the unparsable {got_value:?}"
                );
            } else {
                assert_eq!(value, got_value, "{:?}", String::from_utf8_lossy(name));
            }
        }
        if sent_block.1 != got_block.1 {
            assert!(block_bad, "a block without a bad :authority changed");
            changed += 1;
        }
    }
    // A bad value the client indexed is replaced once, where it enters the table; later blocks
    // that refer to it pass unchanged and decode to the replacement.
    assert!(
        changed <= rewritten && rewritten <= bad,
        "{changed} <= {rewritten} <= {bad}"
    );
});
