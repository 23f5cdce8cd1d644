//! The `:authority` fix: a byte-level layer between an accepted Unix-socket connection and tonic
//! that replaces HTTP/2 `:authority` values the `http` crate cannot parse with `localhost`.
//!
//! Why it exists: kube-apiserver before 1.32 (grpc-go dialling `unix://…`) sends the socket
//! *path* as `:authority` (`/var/run/kms.sock`), and Python/C-core grpcio sends it %-encoded
//! (`tmp%2Fprobe%2Fx.sock`). hyperium/h2, under tonic, parses `:authority` with
//! `http::uri::Authority` and answers anything it rejects with RST_STREAM(PROTOCOL_ERROR) before
//! any service code runs; h2 has no option to relax that. On a Unix socket the authority carries
//! no meaning, so `localhost` loses nothing.
//!
//! What it does: [`AuthorityFix`] wraps the connection. Writes (server → client) pass through
//! untouched. Reads (client → server) are followed frame by frame: the connection preface and
//! every frame other than HEADERS/CONTINUATION pass byte for byte (payloads are streamed, never
//! buffered whole). Each header block is reassembled, HPACK-decoded with a decoder that mirrors
//! the client's encoder, every unparsable `:authority` is replaced, and the block is re-encoded
//! without the dynamic table (static-table indexes and literals only) into one HEADERS frame and
//! CONTINUATION frames of at most 16 KiB each.
//!
//! What it does not touch: other header fields keep their names, values, order and
//! never-indexed marking; stream ids, frame order, END_STREAM and PRIORITY are kept; only the
//! HEADERS padding is dropped. A connection that does not start with the HTTP/2 client preface is
//! passed through unchanged (h2 rejects it itself).
//!
//! This parses untrusted bytes: a header block may carry at most 64 KiB of frame payload and
//! re-encode to at most 256 KiB, and any framing or HPACK violation fails the read with
//! `InvalidData`, which ends the connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use loona_hpack::Decoder;
use loona_hpack::encoder::encode_integer_into;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::codegen::http::uri::Authority;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// Stream dependency (4 bytes) and weight (1 byte) of a HEADERS frame with PRIORITY.
const PRIORITY_LEN: usize = 5;
/// Most frame payload one client header block may carry (HEADERS + CONTINUATIONs, with padding).
const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Most bytes one re-encoded block may take: dynamic-table references expand, and a few bytes of
/// input must not become megabytes for h2 to parse.
const MAX_REENCODED_BLOCK: usize = 256 * 1024;
/// Largest frame payload we emit: the minimum SETTINGS_MAX_FRAME_SIZE, so legal whatever h2
/// advertised.
const MAX_EMITTED_PAYLOAD: usize = 16_384;
/// h2's default SETTINGS_HEADER_TABLE_SIZE (tonic does not change it): the client's encoder may
/// never use a larger dynamic table, so neither may the decoder mirroring it.
const HPACK_TABLE_SIZE: usize = 4096;
/// How much is read from the socket at once when the bytes need parsing.
const READ_CHUNK: usize = 8 * 1024;
/// What an unparsable `:authority` becomes.
const REPLACEMENT: &[u8] = b"localhost";

/// A connection wrapper that makes client requests with an unparsable HTTP/2 `:authority` (a
/// socket path, a %-encoded path) acceptable to h2 by replacing that value with `localhost`.
pub struct AuthorityFix<S> {
    inner: S,
    parser: Parser,
    /// Bytes the parser produced that the reader (h2) has not taken yet.
    out: BytesMut,
    /// Where socket reads land when the bytes need parsing (allocated on first use).
    scratch: Vec<u8>,
    /// Set once the client broke the protocol; every later read fails the same way.
    failed: Option<String>,
}

impl<S> AuthorityFix<S> {
    /// Wraps a freshly accepted connection; must see the client's bytes from the very first one.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            parser: Parser::new(),
            out: BytesMut::new(),
            scratch: Vec::new(),
            failed: None,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// How many `:authority` values this connection has had replaced so far.
    pub fn rewritten(&self) -> u64 {
        self.parser.rewritten
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(message) = &this.failed {
                return Poll::Ready(Err(invalid_data(message)));
            }
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(this.out.get(..n).unwrap_or_default());
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if let Some(limit) = this.parser.passthrough_limit() {
                // Bytes that pass untouched (a DATA payload, say) go straight into h2's buffer.
                let dst = buf.initialize_unfilled_to(limit.min(buf.remaining()));
                let mut direct = ReadBuf::new(dst);
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut direct))?;
                let n = direct.filled().len();
                buf.advance(n);
                this.parser.passed_through(n);
                return Poll::Ready(Ok(()));
            }
            if this.scratch.is_empty() {
                this.scratch = vec![0; READ_CHUNK];
            }
            let mut chunk = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk))?;
            let n = chunk.filled().len();
            if n == 0 {
                // End of stream: a half-received frame is dropped, h2 sees the connection end.
                return Poll::Ready(Ok(()));
            }
            let input = this.scratch.get(..n).unwrap_or_default();
            if let Err(message) = this.parser.feed(input, &mut this.out) {
                tracing::warn!(error = %message, "closing client connection: malformed HTTP/2");
                let err = invalid_data(&message);
                this.failed = Some(message);
                return Poll::Ready(Err(err));
            }
            // The input may have produced nothing yet (a header block in progress): read more
            // rather than return an empty read, which would mean end of stream.
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

fn invalid_data(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

/// Where the client → server byte stream stands.
enum State {
    /// Matching the client preface; `matched` bytes of it seen (and passed on) so far.
    Preface { matched: usize },
    /// Not HTTP/2 with prior knowledge: everything passes unchanged from here on.
    Passthrough,
    /// Collecting a 9-byte frame header.
    FrameHeader {
        bytes: [u8; FRAME_HEADER_LEN],
        have: usize,
    },
    /// Passing a frame payload through; `remaining` bytes of it still to come.
    Payload { remaining: usize },
    /// Collecting the payload of a HEADERS or CONTINUATION frame.
    HeaderFrame { header: FrameHeader, remaining: usize },
}

impl State {
    fn frame_header() -> Self {
        State::FrameHeader {
            bytes: [0; FRAME_HEADER_LEN],
            have: 0,
        }
    }
}

#[derive(Clone, Copy)]
struct FrameHeader {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHeader {
    fn parse(bytes: [u8; FRAME_HEADER_LEN]) -> Self {
        let [l0, l1, l2, kind, flags, s0, s1, s2, s3] = bytes;
        Self {
            len: usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2),
            kind,
            flags,
            // The top bit is reserved and must be ignored on receipt (RFC 9113 §4.1).
            stream: u32::from_be_bytes([s0 & 0x7f, s1, s2, s3]),
        }
    }
}

/// A header block whose HEADERS frame arrived and whose END_HEADERS has not.
struct PendingBlock {
    stream: u32,
    /// The HEADERS frame's flags.
    flags: u8,
    priority: Option<[u8; PRIORITY_LEN]>,
    /// HPACK bytes so far, padding removed.
    fragment: Vec<u8>,
    /// Frame payload bytes received for this block, padding included (bounded).
    received: usize,
}

/// The client → server half of the connection, without any I/O.
struct Parser {
    state: State,
    /// Mirrors the client's HPACK encoder, dynamic table included.
    decoder: Decoder<'static>,
    block: Option<PendingBlock>,
    /// Payload of the HEADERS/CONTINUATION frame being collected.
    frame_payload: Vec<u8>,
    rewritten: u64,
}

impl Parser {
    fn new() -> Self {
        let mut decoder = Decoder::new();
        // A client size update above this is a decoding error (its table starts at 4096).
        decoder.set_max_allowed_table_size(HPACK_TABLE_SIZE);
        Self {
            state: State::Preface { matched: 0 },
            decoder,
            block: None,
            frame_payload: Vec::new(),
            rewritten: 0,
        }
    }

    /// How many of the next bytes pass through unchanged without looking at them, if any.
    fn passthrough_limit(&self) -> Option<usize> {
        match self.state {
            State::Passthrough => Some(usize::MAX),
            State::Payload { remaining } => Some(remaining),
            _ => None,
        }
    }

    /// Records `n` bytes passed through directly (at most [`Self::passthrough_limit`]).
    fn passed_through(&mut self, n: usize) {
        if let State::Payload { remaining } = &mut self.state {
            *remaining = remaining.saturating_sub(n);
            if *remaining == 0 {
                self.state = State::frame_header();
            }
        }
    }

    /// Consumes client bytes, appending what h2 should read to `out`.
    fn feed(&mut self, mut input: &[u8], out: &mut BytesMut) -> Result<(), String> {
        while !input.is_empty() {
            match &mut self.state {
                State::Passthrough => {
                    out.extend_from_slice(input);
                    return Ok(());
                }
                State::Preface { matched } => {
                    let expected = PREFACE.get(*matched..).unwrap_or_default();
                    let got = take(&mut input, expected.len());
                    out.extend_from_slice(got);
                    if expected.starts_with(got) {
                        *matched += got.len();
                        if *matched == PREFACE.len() {
                            self.state = State::frame_header();
                        }
                    } else {
                        // Not HTTP/2 with prior knowledge: not ours to fix, h2 rejects it.
                        tracing::debug!("no HTTP/2 client preface; passing the connection through");
                        self.state = State::Passthrough;
                    }
                }
                State::FrameHeader { bytes, have } => {
                    let dst = bytes.get_mut(*have..).unwrap_or_default();
                    let got = take(&mut input, dst.len());
                    if let Some(dst) = dst.get_mut(..got.len()) {
                        dst.copy_from_slice(got);
                    }
                    *have += got.len();
                    if *have == FRAME_HEADER_LEN {
                        let raw = *bytes;
                        self.start_frame(raw, out)?;
                    }
                }
                State::Payload { remaining } => {
                    let got = take(&mut input, *remaining);
                    out.extend_from_slice(got);
                    *remaining -= got.len();
                    if *remaining == 0 {
                        self.state = State::frame_header();
                    }
                }
                State::HeaderFrame { header, remaining } => {
                    let got = take(&mut input, *remaining);
                    self.frame_payload.extend_from_slice(got);
                    *remaining -= got.len();
                    if *remaining == 0 {
                        let header = *header;
                        self.finish_header_frame(header, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A complete frame header arrived: pass the frame on or start collecting a header frame.
    fn start_frame(&mut self, raw: [u8; FRAME_HEADER_LEN], out: &mut BytesMut) -> Result<(), String> {
        let header = FrameHeader::parse(raw);
        let (kind, stream, len) = (header.kind, header.stream, header.len);
        // RFC 9113 §6.10: a header block is contiguous, nothing may come between its frames.
        match (&mut self.block, kind) {
            (Some(block), TYPE_CONTINUATION) if block.stream == stream => {
                block.received = block.received.saturating_add(len);
                if block.received > MAX_HEADER_BLOCK {
                    return Err(format!(
                        "header block on stream {stream} exceeds {MAX_HEADER_BLOCK} bytes"
                    ));
                }
            }
            (Some(block), _) => {
                return Err(format!(
                    "frame of type {kind:#x} on stream {stream} inside the header block of stream {}",
                    block.stream
                ));
            }
            (None, TYPE_HEADERS) => {
                if len > MAX_HEADER_BLOCK {
                    return Err(format!(
                        "header block on stream {stream} exceeds {MAX_HEADER_BLOCK} bytes"
                    ));
                }
            }
            (None, TYPE_CONTINUATION) => {
                return Err(format!(
                    "CONTINUATION on stream {stream} without a HEADERS frame before it"
                ));
            }
            (None, _) => {
                out.extend_from_slice(&raw);
                self.state = if len == 0 {
                    State::frame_header()
                } else {
                    State::Payload { remaining: len }
                };
                return Ok(());
            }
        }
        self.frame_payload.clear();
        if len == 0 {
            return self.finish_header_frame(header, out);
        }
        self.state = State::HeaderFrame {
            header,
            remaining: len,
        };
        Ok(())
    }

    /// A HEADERS or CONTINUATION payload is complete (in `frame_payload`).
    fn finish_header_frame(&mut self, header: FrameHeader, out: &mut BytesMut) -> Result<(), String> {
        self.state = State::frame_header();
        let payload = std::mem::take(&mut self.frame_payload);
        if header.kind == TYPE_HEADERS {
            let (priority, fragment) = split_headers_payload(&payload, header)?;
            self.block = Some(PendingBlock {
                stream: header.stream,
                flags: header.flags,
                priority,
                fragment: fragment.to_vec(),
                received: header.len,
            });
        } else if let Some(block) = &mut self.block {
            // CONTINUATION: `start_frame` only lets one through with a block pending.
            block.fragment.extend_from_slice(&payload);
        }
        self.frame_payload = payload;
        if header.flags & FLAG_END_HEADERS != 0 {
            if let Some(block) = self.block.take() {
                let encoded = self.reencode(block.stream, &block.fragment)?;
                emit_header_frames(out, &block, &encoded);
            }
        }
        Ok(())
    }

    /// Decodes one complete header block and re-encodes it without the dynamic table, replacing
    /// each `:authority` that h2 would reject.
    ///
    /// Every block goes through here, not only those needing a rewrite: the client's encoder
    /// indexes fields into its dynamic table in any block, and later blocks refer to them, so our
    /// decoder has to see every block to keep its table in step. Since what h2 reads never
    /// touches h2's dynamic table, the two can never diverge, whatever the client does.
    fn reencode(&mut self, stream: u32, fragment: &[u8]) -> Result<Vec<u8>, String> {
        let hpack_error =
            |e: &dyn std::fmt::Display| format!("HPACK error in header block of stream {stream}: {e}");
        let mut encoded = Vec::with_capacity(fragment.len().saturating_add(16));
        // Fields are decoded one at a time (together with any size updates before them) so we
        // know each one's representation: a never-indexed field must stay never-indexed.
        let mut start = 0;
        let mut pos = 0;
        let mut seen_field = false;
        while let Some(rest) = fragment.get(pos..).filter(|rest| !rest.is_empty()) {
            let (field, len) = field_extent(rest).map_err(|e| hpack_error(&e))?;
            pos += len;
            let never_indexed = match field {
                // RFC 7541 §4.2: size updates only at the start of a block (h2 agrees).
                Field::SizeUpdate if seen_field => {
                    return Err(hpack_error(&"dynamic table size update after a header field"));
                }
                Field::SizeUpdate => continue,
                Field::Header { never_indexed } => never_indexed,
            };
            seen_field = true;
            let one_field = fragment.get(start..pos).unwrap_or_default();
            start = pos;
            let rewritten = &mut self.rewritten;
            let mut result = Ok(());
            self.decoder
                .decode_with_cb(one_field, |name, value| {
                    if result.is_ok() {
                        result = write_field(&mut encoded, stream, &name, &value, never_indexed, rewritten);
                    }
                })
                .map_err(|e| hpack_error(&e))?;
            result.map_err(|e| hpack_error(&e))?;
            if encoded.len() > MAX_REENCODED_BLOCK {
                return Err(format!(
                    "header block on stream {stream} decodes to more than {MAX_REENCODED_BLOCK} bytes"
                ));
            }
        }
        if start < pos {
            return Err(hpack_error(&"header block ends with a dynamic table size update"));
        }
        Ok(encoded)
    }
}

/// Splits `n` bytes (or all there are) off the front of `input`.
fn take<'a>(input: &mut &'a [u8], n: usize) -> &'a [u8] {
    let whole: &'a [u8] = input;
    let (head, rest) = whole.split_at_checked(n.min(whole.len())).unwrap_or((whole, &[]));
    *input = rest;
    head
}

/// A HEADERS payload without its padding: the priority fields (if flagged) and the fragment.
fn split_headers_payload(
    payload: &[u8],
    header: FrameHeader,
) -> Result<(Option<[u8; PRIORITY_LEN]>, &[u8]), String> {
    let stream = header.stream;
    let too_short = || format!("HEADERS on stream {stream} too short for its PADDED/PRIORITY fields");
    let mut rest = payload;
    let pad = if header.flags & FLAG_PADDED != 0 {
        let (&pad, after) = rest.split_first().ok_or_else(too_short)?;
        rest = after;
        usize::from(pad)
    } else {
        0
    };
    let priority = if header.flags & FLAG_PRIORITY != 0 {
        let (fields, after) = rest.split_first_chunk::<PRIORITY_LEN>().ok_or_else(too_short)?;
        rest = after;
        Some(*fields)
    } else {
        None
    };
    let keep = rest
        .len()
        .checked_sub(pad)
        .ok_or_else(|| format!("HEADERS on stream {stream} has more padding ({pad}) than payload"))?;
    Ok((priority, rest.get(..keep).unwrap_or_default()))
}

/// Writes a re-encoded block as one HEADERS frame and as many CONTINUATION frames as needed.
fn emit_header_frames(out: &mut BytesMut, block: &PendingBlock, encoded: &[u8]) {
    let priority: &[u8] = block.priority.as_ref().map_or(&[], |p| p.as_slice());
    let mut rest = encoded;
    let first = take(&mut rest, MAX_EMITTED_PAYLOAD - priority.len());
    // END_STREAM, PRIORITY and unknown flags stay; padding is gone, END_HEADERS goes last.
    let mut flags = block.flags & !(FLAG_PADDED | FLAG_END_HEADERS);
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    put_frame_header(
        out,
        priority.len() + first.len(),
        TYPE_HEADERS,
        flags,
        block.stream,
    );
    out.extend_from_slice(priority);
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let chunk = take(&mut rest, MAX_EMITTED_PAYLOAD);
        let flags = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
        put_frame_header(out, chunk.len(), TYPE_CONTINUATION, flags, block.stream);
        out.extend_from_slice(chunk);
    }
}

fn put_frame_header(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    // `len` is at most MAX_EMITTED_PAYLOAD here, well inside 24 bits.
    let [_, l0, l1, l2] = u32::try_from(len).unwrap_or(0).to_be_bytes();
    out.extend_from_slice(&[l0, l1, l2, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// One decoded field, re-encoded (with `:authority` replaced if h2 would reject it).
fn write_field(
    out: &mut Vec<u8>,
    stream: u32,
    name: &[u8],
    value: &[u8],
    never_indexed: bool,
    rewritten: &mut u64,
) -> io::Result<()> {
    // The same check h2 applies (`Authority::from_maybe_shared`), so exactly what it would
    // reject is replaced and everything it accepts stays byte for byte.
    let value = if name == b":authority" && Authority::try_from(value).is_err() {
        *rewritten = rewritten.saturating_add(1);
        let shown = value.get(..128).unwrap_or(value);
        tracing::debug!(
            stream,
            original = %String::from_utf8_lossy(shown).escape_debug(),
            "replaced unparsable :authority with localhost"
        );
        REPLACEMENT
    } else {
        value
    };
    encode_field(out, name, value, never_indexed)
}

/// HPACK-encodes one field without touching the dynamic table: an indexed static entry, or a
/// literal "without indexing" (RFC 7541 §6.2.2) / "never indexed" (§6.2.3) with a static or
/// literal name. Strings are raw (no Huffman).
fn encode_field(out: &mut Vec<u8>, name: &[u8], value: &[u8], never_indexed: bool) -> io::Result<()> {
    let (exact, name_index) = static_lookup(name, value);
    if let (Some(index), false) = (exact, never_indexed) {
        return encode_integer_into(index, 7, 0x80, out);
    }
    let representation = if never_indexed { 0x10 } else { 0x00 };
    match name_index {
        Some(index) => encode_integer_into(index, 4, representation, out)?,
        None => {
            out.push(representation);
            encode_string(out, name)?;
        }
    }
    encode_string(out, value)
}

fn encode_string(out: &mut Vec<u8>, s: &[u8]) -> io::Result<()> {
    encode_integer_into(s.len(), 7, 0x00, out)?;
    out.extend_from_slice(s);
    Ok(())
}

/// 1-based static-table indexes: of the exact entry, and of the first entry with that name.
fn static_lookup(name: &[u8], value: &[u8]) -> (Option<usize>, Option<usize>) {
    let mut name_index = None;
    for (i, &(n, v)) in STATIC_TABLE.iter().enumerate() {
        if n == name {
            if v == value {
                return (Some(i + 1), Some(i + 1));
            }
            name_index = name_index.or(Some(i + 1));
        }
    }
    (None, name_index)
}

/// What an HPACK representation is, as far as re-encoding cares.
#[derive(Debug, PartialEq)]
enum Field {
    SizeUpdate,
    Header { never_indexed: bool },
}

/// The kind and length of the representation at the start of `buf` (RFC 7541 §6); checks only
/// that its integers and string lengths fit, the decoder checks the rest.
fn field_extent(buf: &[u8]) -> Result<(Field, usize), &'static str> {
    let first = *buf.first().ok_or("empty field")?;
    if first & 0x80 != 0 {
        let (_, len) = hpack_integer(buf, 7)?;
        return Ok((Field::Header { never_indexed: false }, len));
    }
    if first & 0xe0 == 0x20 {
        let (_, len) = hpack_integer(buf, 5)?;
        return Ok((Field::SizeUpdate, len));
    }
    let (prefix, never_indexed) = if first & 0x40 != 0 {
        (6, false)
    } else {
        (4, first & 0x10 != 0)
    };
    let (name_index, mut len) = hpack_integer(buf, prefix)?;
    if name_index == 0 {
        len += string_extent(buf.get(len..).unwrap_or_default())?;
    }
    len += string_extent(buf.get(len..).unwrap_or_default())?;
    Ok((Field::Header { never_indexed }, len))
}

/// Length of the string literal at the start of `buf`, length prefix included.
fn string_extent(buf: &[u8]) -> Result<usize, &'static str> {
    let (len, prefix) = hpack_integer(buf, 7)?;
    prefix
        .checked_add(len)
        .filter(|&total| total <= buf.len())
        .ok_or("truncated string")
}

/// An HPACK integer (RFC 7541 §5.1) with a `prefix_bits`-bit prefix: (value, bytes used). At most
/// four continuation bytes, as loona-hpack allows, so the value cannot overflow.
fn hpack_integer(buf: &[u8], prefix_bits: u8) -> Result<(usize, usize), &'static str> {
    let (&first, rest) = buf.split_first().ok_or("truncated integer")?;
    let mask = (1u8 << prefix_bits) - 1;
    let mut value = usize::from(first & mask);
    if value < usize::from(mask) {
        return Ok((value, 1));
    }
    for (i, &b) in rest.iter().take(4).enumerate() {
        value += usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((value, i + 2));
        }
    }
    Err(if rest.len() < 4 {
        "truncated integer"
    } else {
        "integer too long"
    })
}

/// RFC 7541 Appendix A (loona-hpack keeps its copy private).
static STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use loona_hpack::Encoder;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    const END_STREAM: u8 = 0x1;
    const TYPE_DATA: u8 = 0x0;
    const TYPE_RST_STREAM: u8 = 0x3;
    const TYPE_SETTINGS: u8 = 0x4;
    const TYPE_PING: u8 = 0x6;
    const TYPE_WINDOW_UPDATE: u8 = 0x8;

    /// Yields at most `chunk` bytes per read, and `Pending` before every other read.
    struct Chunked {
        data: Vec<u8>,
        pos: usize,
        chunk: usize,
        pend: bool,
    }

    impl Chunked {
        fn new(data: Vec<u8>, chunk: usize) -> Self {
            Self {
                data,
                pos: 0,
                chunk,
                pend: false,
            }
        }
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            this.pend = !this.pend;
            if this.pend {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let rest = &this.data[this.pos..];
            let n = rest.len().min(this.chunk).min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn connection(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        for f in frames {
            bytes.extend_from_slice(f);
        }
        bytes
    }

    /// Everything the layer lets h2 read, fed `chunk` bytes at a time and read in `read_size`
    /// pieces.
    async fn run_with(input: Vec<u8>, chunk: usize, read_size: usize) -> (io::Result<Vec<u8>>, u64) {
        let mut fix = AuthorityFix::new(Chunked::new(input, chunk));
        let mut out = Vec::new();
        let mut piece = vec![0u8; read_size];
        loop {
            match fix.read(&mut piece).await {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&piece[..n]),
                Err(e) => {
                    // A failed connection stays failed.
                    let again = fix.read(&mut piece).await.unwrap_err();
                    assert_eq!(again.kind(), io::ErrorKind::InvalidData);
                    return (Err(e), fix.rewritten());
                }
            }
        }
        (Ok(out), fix.rewritten())
    }

    async fn run(input: Vec<u8>) -> Vec<u8> {
        run_with(input, 64 * 1024, 64 * 1024).await.0.unwrap()
    }

    async fn run_err(input: Vec<u8>) -> String {
        let err = run_with(input, 64 * 1024, 64 * 1024).await.0.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        err.to_string()
    }

    #[derive(Debug, Clone, PartialEq)]
    struct Frame {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    }

    fn split_frames(output: &[u8]) -> Vec<Frame> {
        let mut rest = output.strip_prefix(PREFACE.as_slice()).expect("preface first");
        let mut frames = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            frames.push(Frame {
                kind: rest[3],
                flags: rest[4],
                stream: u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]),
                payload: rest[9..9 + len].to_vec(),
            });
            rest = &rest[9 + len..];
        }
        frames
    }

    /// (stream, HEADERS flags, priority fields, HPACK block) of one re-emitted header block.
    type Block = (u32, u8, Option<Vec<u8>>, Vec<u8>);

    /// Every header block in the output; checks the framing rules the layer promises on the way.
    fn header_blocks(output: &[u8]) -> Vec<Block> {
        let mut blocks = Vec::new();
        let mut open: Option<Block> = None;
        for f in split_frames(output) {
            assert!(f.payload.len() <= MAX_EMITTED_PAYLOAD, "frame too large");
            match f.kind {
                TYPE_HEADERS => {
                    assert!(open.is_none());
                    assert_eq!(f.flags & FLAG_PADDED, 0, "padding must be gone");
                    let (priority, block) = if f.flags & FLAG_PRIORITY != 0 {
                        (Some(f.payload[..5].to_vec()), f.payload[5..].to_vec())
                    } else {
                        (None, f.payload.clone())
                    };
                    open = Some((f.stream, f.flags, priority, block));
                }
                TYPE_CONTINUATION => {
                    let o = open.as_mut().expect("CONTINUATION after HEADERS");
                    assert_eq!(o.0, f.stream);
                    o.3.extend_from_slice(&f.payload);
                }
                _ => {
                    assert!(open.is_none());
                    continue;
                }
            }
            if f.flags & FLAG_END_HEADERS != 0 {
                blocks.push(open.take().unwrap());
            }
        }
        assert!(open.is_none(), "unterminated header block");
        blocks
    }

    /// Decodes with a fresh decoder, and checks the block neither inserts into nor refers to
    /// the dynamic table, so h2's table stays empty.
    fn decode_standalone(block: &[u8]) -> Vec<(String, String)> {
        let mut pos = 0;
        while pos < block.len() {
            let first = block[pos];
            assert_ne!(first & 0xc0, 0x40, "incremental indexing in output");
            assert_ne!(first & 0xe0, 0x20, "size update in output");
            if first & 0x80 != 0 {
                let (index, _) = hpack_integer(&block[pos..], 7).unwrap();
                assert!(index <= STATIC_TABLE.len(), "dynamic reference in output");
            }
            pos += field_extent(&block[pos..]).unwrap().1;
        }
        Decoder::new()
            .decode(block)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    fn owned(headers: &[(&str, &str)]) -> Vec<(String, String)> {
        headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn grpc_request(authority: &str) -> Vec<(&'static str, String)> {
        vec![
            (":method", "POST".into()),
            (":scheme", "http".into()),
            (":path", "/v2.KeyManagementService/Status".into()),
            (":authority", authority.into()),
            ("content-type", "application/grpc".into()),
            ("user-agent", "grpc-go/1.65.0".into()),
            ("te", "trailers".into()),
            ("grpc-timeout", "2999m".into()),
        ]
    }

    fn encode(encoder: &mut Encoder<'_>, headers: &[(&str, String)]) -> Vec<u8> {
        encoder.encode(headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    fn as_owned(headers: &[(&str, String)]) -> Vec<(String, String)> {
        headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), v.clone()))
            .collect()
    }

    fn lit_inc_indexed_name(index: u8, value: &str) -> Vec<u8> {
        assert!(index < 63 && value.len() < 127);
        let mut b = vec![0x40 | index, value.len() as u8];
        b.extend_from_slice(value.as_bytes());
        b
    }

    fn lit_inc_new_name(name: &str, value: &str) -> Vec<u8> {
        let mut b = vec![0x40, name.len() as u8];
        b.extend_from_slice(name.as_bytes());
        b.push(value.len() as u8);
        b.extend_from_slice(value.as_bytes());
        b
    }

    /// Plain HEADERS with END_HEADERS and END_STREAM.
    fn headers_frame(stream: u32, block: &[u8]) -> Vec<u8> {
        frame(TYPE_HEADERS, FLAG_END_HEADERS | END_STREAM, stream, block)
    }

    #[tokio::test]
    async fn socket_path_authority_becomes_localhost_and_other_headers_stay() {
        let request = grpc_request("/var/run/kms.sock");
        let block = encode(&mut Encoder::new(), &request);
        let (out, rewritten) = run_with(connection(&[headers_frame(1, &block)]), 1 << 16, 1 << 16).await;
        let blocks = header_blocks(&out.unwrap());
        assert_eq!(blocks.len(), 1);
        let (stream, flags, priority, block) = &blocks[0];
        assert_eq!(
            (*stream, *flags, priority),
            (1, FLAG_END_HEADERS | END_STREAM, &None)
        );
        let mut expected = as_owned(&request);
        expected[3].1 = "localhost".into();
        assert_eq!(decode_standalone(block), expected);
        assert_eq!(rewritten, 1);
    }

    #[tokio::test]
    async fn percent_encoded_and_empty_authorities_are_rewritten() {
        for bad in ["tmp%2Fprobe%2Fx.sock", "", "a b", "/tmp/x.sock"] {
            let block = encode(&mut Encoder::new(), &grpc_request(bad));
            let out = run(connection(&[headers_frame(1, &block)])).await;
            let headers = decode_standalone(&header_blocks(&out)[0].3);
            assert_eq!(headers[3], (":authority".into(), "localhost".into()), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn valid_authorities_are_kept_exactly() {
        for good in [
            "localhost:1234",
            "localhost",
            "kms.example.org:443",
            "[::1]:50051",
        ] {
            let request = grpc_request(good);
            let block = encode(&mut Encoder::new(), &request);
            let (out, rewritten) = run_with(connection(&[headers_frame(1, &block)]), 1 << 16, 1 << 16).await;
            let headers = decode_standalone(&header_blocks(&out.unwrap())[0].3);
            assert_eq!(headers, as_owned(&request), "{good:?}");
            assert_eq!(rewritten, 0);
        }
    }

    /// What grpc-go does and a naive in-place rewrite breaks: request 1 puts `:authority` and
    /// friends into the dynamic table, request 2 refers to them by index only.
    #[tokio::test]
    async fn dynamic_table_references_across_requests_decode_to_the_right_values() {
        let mut first = vec![0x83, 0x86]; // :method POST, :scheme http
        first.extend(lit_inc_indexed_name(4, "/v2.KeyManagementService/Encrypt")); // 65 after req 1
        first.extend(lit_inc_indexed_name(1, "/var/run/kms.sock")); // 64
        first.extend(lit_inc_indexed_name(31, "application/grpc")); // 63
        first.extend(lit_inc_new_name("x-request-id", "one")); // 62
        // Request 2: everything but the id by dynamic index; the new id pushes the others down.
        let mut second = vec![0x83, 0x86, 0x80 | 65, 0x80 | 64, 0x80 | 63];
        second.extend(lit_inc_new_name("x-request-id", "two"));
        // Request 3: only dynamic references, shifted by request 2's insertion.
        let third = vec![0x83, 0x86, 0x80 | 66, 0x80 | 65, 0x80 | 64, 0x80 | 62];

        let out = run(connection(&[
            headers_frame(1, &first),
            headers_frame(3, &second),
            headers_frame(5, &third),
        ]))
        .await;
        let blocks = header_blocks(&out);
        let expect = |id: &str| {
            owned(&[
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/v2.KeyManagementService/Encrypt"),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("x-request-id", id),
            ])
        };
        assert_eq!(blocks.iter().map(|b| b.0).collect::<Vec<_>>(), [1, 3, 5]);
        assert_eq!(decode_standalone(&blocks[0].3), expect("one"));
        assert_eq!(decode_standalone(&blocks[1].3), expect("two"));
        assert_eq!(decode_standalone(&blocks[2].3), expect("two"));
    }

    /// RFC 7541 C.4.1 and C.4.2: Huffman-coded strings and an indexed authority.
    #[tokio::test]
    async fn rfc7541_huffman_requests_decode_and_keep_valid_authority() {
        let first = hex::decode("828684418cf1e3c2e5f23a6ba0ab90f4ff").unwrap();
        let second = hex::decode("828684be5886a8eb10649cbf").unwrap();
        let out = run(connection(&[headers_frame(1, &first), headers_frame(3, &second)])).await;
        let blocks = header_blocks(&out);
        let base = [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
        ];
        assert_eq!(decode_standalone(&blocks[0].3), owned(&base));
        let mut with_cache = owned(&base);
        with_cache.push(("cache-control".into(), "no-cache".into()));
        assert_eq!(decode_standalone(&blocks[1].3), with_cache);
    }

    #[tokio::test]
    async fn never_indexed_fields_stay_never_indexed() {
        // authorization (static name 23), never indexed, and a never-indexed new name.
        let mut block = vec![0x82, 0x86, 0x84, 0x10 | 0x0f, 23 - 15, 6];
        block.extend_from_slice(b"secret");
        block.extend_from_slice(&[0x10, 5]);
        block.extend_from_slice(b"x-key");
        block.extend_from_slice(&[4]);
        block.extend_from_slice(b"abcd");
        let out = run(connection(&[headers_frame(1, &block)])).await;
        let out_block = &header_blocks(&out)[0].3;
        let kinds: Vec<Field> = {
            let mut pos = 0;
            let mut kinds = Vec::new();
            while pos < out_block.len() {
                let (kind, len) = field_extent(&out_block[pos..]).unwrap();
                kinds.push(kind);
                pos += len;
            }
            kinds
        };
        assert_eq!(kinds[3], Field::Header { never_indexed: true });
        assert_eq!(kinds[4], Field::Header { never_indexed: true });
        assert_eq!(
            decode_standalone(out_block)[3..],
            owned(&[("authorization", "secret"), ("x-key", "abcd")])[..]
        );
    }

    #[tokio::test]
    async fn size_updates_are_absorbed_and_above_4096_rejected() {
        let mut first = vec![0x83, 0x86, 0x84];
        first.extend(lit_inc_indexed_name(1, "/tmp/x.sock"));
        // Shrink to 0 (evicts everything), grow back to 4096, then index again.
        let mut second = vec![0x20, 0x3f, 0xe1, 0x1f, 0x83, 0x86, 0x84];
        second.extend(lit_inc_indexed_name(1, "/tmp/y.sock"));
        let third = vec![0x83, 0x86, 0x84, 0x80 | 62];
        let out = run(connection(&[
            headers_frame(1, &first),
            headers_frame(3, &second),
            headers_frame(5, &third),
        ]))
        .await;
        for (_, _, _, block) in header_blocks(&out) {
            assert_eq!(decode_standalone(&block)[3].1, "localhost");
        }
        // 4097 is more than h2 allowed the client.
        let err = run_err(connection(&[headers_frame(1, &[0x3f, 0xe2, 0x1f, 0x82])])).await;
        assert!(err.contains("HPACK"), "{err}");
        // A stale reference after the table was emptied is an error, not a guess.
        let err = run_err(connection(&[
            headers_frame(1, &first),
            headers_frame(3, &[0x20, 0x82, 0x86, 0x84, 0x80 | 62]),
        ]))
        .await;
        assert!(err.contains("stream 3"), "{err}");
    }

    #[tokio::test]
    async fn headers_split_across_continuation_frames_are_reassembled() {
        let request = grpc_request("/var/run/kms.sock");
        let block = encode(&mut Encoder::new(), &request);
        let (a, rest) = block.split_at(5);
        let (b, c) = rest.split_at(20);
        let input = connection(&[
            frame(TYPE_HEADERS, END_STREAM, 7, a),
            frame(TYPE_CONTINUATION, 0, 7, b),
            frame(TYPE_CONTINUATION, 0, 7, &[]),
            frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 7, c),
            frame(TYPE_PING, 0, 0, &[1; 8]),
        ]);
        let out = run(input).await;
        let frames = split_frames(&out);
        assert_eq!(frames.len(), 2, "one HEADERS frame and the PING");
        assert_eq!(
            frames[1],
            Frame {
                kind: TYPE_PING,
                flags: 0,
                stream: 0,
                payload: vec![1; 8]
            }
        );
        let blocks = header_blocks(&out);
        assert_eq!((blocks[0].0, blocks[0].1), (7, END_STREAM | FLAG_END_HEADERS));
        let mut expected = as_owned(&request);
        expected[3].1 = "localhost".into();
        assert_eq!(decode_standalone(&blocks[0].3), expected);
    }

    #[tokio::test]
    async fn padding_is_stripped_and_priority_kept() {
        let request = grpc_request("/var/run/kms.sock");
        let block = encode(&mut Encoder::new(), &request);
        let priority = [0x80, 0, 0, 3, 200]; // exclusive on stream 3, weight 201
        let mut payload = vec![7]; // pad length
        payload.extend_from_slice(&priority);
        payload.extend_from_slice(&block);
        payload.extend_from_slice(&[0; 7]);
        let flags = FLAG_PADDED | FLAG_PRIORITY | FLAG_END_HEADERS | END_STREAM;
        let out = run(connection(&[frame(TYPE_HEADERS, flags, 9, &payload)])).await;
        let blocks = header_blocks(&out);
        let (stream, out_flags, out_priority, out_block) = &blocks[0];
        assert_eq!(*stream, 9);
        assert_eq!(*out_flags, FLAG_PRIORITY | FLAG_END_HEADERS | END_STREAM);
        assert_eq!(out_priority.as_deref(), Some(priority.as_slice()));
        assert_eq!(decode_standalone(out_block)[3].1, "localhost");

        // Padded CONTINUATION-split block with an empty first fragment.
        let input = connection(&[
            frame(TYPE_HEADERS, FLAG_PADDED, 1, &[3, 0, 0, 0]),
            frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &block),
        ]);
        let out = run(input).await;
        assert_eq!(decode_standalone(&header_blocks(&out)[0].3)[3].1, "localhost");
    }

    #[tokio::test]
    async fn large_blocks_are_reemitted_in_legal_frames() {
        let mut request = grpc_request("/tmp/x.sock");
        request.push(("x-big", "v".repeat(40_000)));
        let block = encode(&mut Encoder::new(), &request);
        let mut frames = Vec::new();
        for (i, piece) in block.chunks(20_000).enumerate() {
            let last = (i + 1) * 20_000 >= block.len();
            let kind = if i == 0 { TYPE_HEADERS } else { TYPE_CONTINUATION };
            let flags = if last { FLAG_END_HEADERS } else { 0 };
            frames.push(frame(kind, flags, 1, piece));
        }
        let out = run(connection(&frames)).await;
        let split = split_frames(&out);
        assert!(split.len() >= 3);
        for (i, f) in split.iter().enumerate() {
            let last = i + 1 == split.len();
            assert_eq!(f.kind, if i == 0 { TYPE_HEADERS } else { TYPE_CONTINUATION });
            assert_eq!(f.flags & FLAG_END_HEADERS != 0, last);
            assert!(f.payload.len() <= 16_384);
        }
        let mut expected = as_owned(&request);
        expected[3].1 = "localhost".into();
        assert_eq!(decode_standalone(&header_blocks(&out)[0].3), expected);
    }

    #[tokio::test]
    async fn other_frames_pass_byte_for_byte_even_one_byte_at_a_time() {
        let frames = [
            frame(TYPE_SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100, 0, 4, 0, 1, 0, 0]),
            frame(TYPE_SETTINGS, 1, 0, &[]),
            frame(TYPE_WINDOW_UPDATE, 0, 0, &[0, 0xff, 0, 1]),
            frame(TYPE_PING, 0, 0, b"pingpong"),
            frame(TYPE_DATA, 0, 1, &[0xab; 1000]),
            frame(TYPE_DATA, END_STREAM, 1, &[]),
            frame(0xfa, 0xff, 0x8000_0005, b"unknown type, reserved bit"),
            frame(TYPE_RST_STREAM, 0, 1, &[0, 0, 0, 8]),
        ];
        let input = connection(&frames);
        for (chunk, read_size) in [(1, 1), (1, 4096), (7, 3), (4096, 1), (1 << 16, 1 << 16)] {
            let (out, _) = run_with(input.clone(), chunk, read_size).await;
            assert_eq!(out.unwrap(), input, "chunk {chunk}, read {read_size}");
        }
    }

    #[tokio::test]
    async fn mixed_traffic_is_the_same_however_it_is_chunked() {
        let block = encode(&mut Encoder::new(), &grpc_request("/var/run/kms.sock"));
        let input = connection(&[
            frame(TYPE_SETTINGS, 0, 0, &[]),
            frame(TYPE_HEADERS, 0, 1, &block[..10]),
            frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &block[10..]),
            frame(TYPE_DATA, END_STREAM, 1, &[5; 300]),
            headers_frame(3, &block),
        ]);
        let bulk = run(input.clone()).await;
        for (chunk, read_size) in [(1, 1), (1, 100), (5, 2), (13, 4096)] {
            let (out, rewritten) = run_with(input.clone(), chunk, read_size).await;
            assert_eq!(out.unwrap(), bulk, "chunk {chunk}, read {read_size}");
            assert_eq!(rewritten, 2);
        }
    }

    #[tokio::test]
    async fn data_payloads_are_streamed_not_buffered() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut fix = AuthorityFix::new(server);
        let mut sent = PREFACE.to_vec();
        sent.extend_from_slice(&frame(TYPE_DATA, 0, 1, &[])[..9]);
        sent[24..27].copy_from_slice(&[0x01, 0x86, 0xa0]); // declares 100 000 bytes
        sent.extend_from_slice(&[9; 10]);
        client.write_all(&sent).await.unwrap();
        let mut got = Vec::new();
        let mut piece = [0u8; 4096];
        while got.len() < sent.len() {
            let n = tokio::time::timeout(Duration::from_secs(5), fix.read(&mut piece))
                .await
                .expect("bytes of an unfinished DATA frame must be readable")
                .unwrap();
            got.extend_from_slice(&piece[..n]);
        }
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn connections_without_the_preface_pass_unchanged() {
        let http1 = b"GET / HTTP/1.1\r\nHost: /var/run/kms.sock\r\n\r\n".to_vec();
        assert_eq!(run(http1.clone()).await, http1);
        let mut almost = PREFACE[..10].to_vec();
        almost.extend_from_slice(b"garbage\x00\x01\x04");
        for chunk in [1, 3, 100] {
            assert_eq!(run_with(almost.clone(), chunk, 5).await.0.unwrap(), almost);
        }
    }

    #[tokio::test]
    async fn oversized_header_blocks_are_errors() {
        // One HEADERS frame declaring more than 64 KiB: refused from its header alone.
        let mut declared = PREFACE.to_vec();
        declared.extend_from_slice(&[0x01, 0x00, 0x01, TYPE_HEADERS, 0, 0, 0, 0, 1]);
        let err = run_err(declared).await;
        assert!(err.contains("exceeds 65536"), "{err}");

        // CONTINUATIONs that add up to more than 64 KiB.
        let mut frames = vec![frame(TYPE_HEADERS, 0, 1, &[0x82; 16_384])];
        for _ in 0..4 {
            frames.push(frame(TYPE_CONTINUATION, 0, 1, &[0x82; 16_384]));
        }
        let err = run_err(connection(&frames)).await;
        assert!(err.contains("stream 1 exceeds"), "{err}");

        // A small block whose dynamic references expand beyond the re-encoding bound.
        let mut first = vec![0x82, 0x86, 0x84];
        first.extend(lit_inc_new_name("x", &"y".repeat(100)));
        let mut second = vec![0x82, 0x86, 0x84];
        second.extend(std::iter::repeat_n(0x80 | 62, 3000));
        let err = run_err(connection(&[headers_frame(1, &first), headers_frame(3, &second)])).await;
        assert!(err.contains("decodes to more than"), "{err}");
    }

    #[tokio::test]
    async fn frames_inside_a_header_block_are_errors() {
        let block = encode(&mut Encoder::new(), &grpc_request("/tmp/x.sock"));
        let open = frame(TYPE_HEADERS, 0, 1, &block);
        let err = run_err(connection(&[open.clone(), frame(TYPE_PING, 0, 0, &[0; 8])])).await;
        assert!(err.contains("inside the header block of stream 1"), "{err}");
        let err = run_err(connection(&[open.clone(), headers_frame(3, &block)])).await;
        assert!(err.contains("inside the header block"), "{err}");
        let err = run_err(connection(&[
            open,
            frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, &[]),
        ]))
        .await;
        assert!(
            err.contains("stream 3 inside the header block of stream 1"),
            "{err}"
        );
        let err = run_err(connection(&[frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &[])])).await;
        assert!(err.contains("without a HEADERS"), "{err}");
    }

    #[tokio::test]
    async fn bad_padding_is_an_error() {
        for (flags, payload) in [
            (FLAG_PADDED, vec![]),
            (FLAG_PADDED, vec![5, 0x82]),
            (FLAG_PRIORITY, vec![0, 0, 0]),
            (FLAG_PADDED | FLAG_PRIORITY, vec![1, 0, 0, 0, 1, 16]),
        ] {
            let input = connection(&[frame(TYPE_HEADERS, flags | FLAG_END_HEADERS, 1, &payload)]);
            let err = run_err(input).await;
            assert!(err.contains("HEADERS on stream 1"), "{err}");
        }
    }

    #[tokio::test]
    async fn garbage_hpack_is_an_error() {
        let cases: [&[u8]; 9] = [
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],       // integer too long
            &[0xff, 0x80],                               // truncated integer
            &[0x80],                                     // index 0
            &[0xbe],                                     // dynamic index 62 in an empty table
            &[0x40, 0x05, b'a'],                         // truncated string
            &[0x41, 0x81, 0xff],                         // bad Huffman padding
            &[0x82, 0x20],                               // size update after a field
            &[0x20],                                     // block that is only a size update
            &[0x00, 0x00, 0x7f, 0xff, 0xff, 0xff, 0x7f], // absurd string length
        ];
        for case in cases {
            let err = run_err(connection(&[headers_frame(1, case)])).await;
            assert!(
                err.contains("HPACK error in header block of stream 1"),
                "{case:?}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn random_input_never_panics() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..400 {
            let len = (next() % 200) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Random HPACK inside a well-formed frame, and random frames after the preface.
            let flags = (next() as u8) | FLAG_END_HEADERS;
            let _ = run_with(connection(&[frame(TYPE_HEADERS, flags, 1, &bytes)]), 7, 5).await;
            let mut raw = PREFACE.to_vec();
            raw.extend_from_slice(&bytes);
            if round % 2 == 0 {
                raw.extend_from_slice(&frame(TYPE_CONTINUATION, 0, 1, &bytes));
            }
            let _ = run_with(raw, 1 + round % 17, 64).await;
        }
    }

    #[test]
    fn static_table_matches_loona_hpack() {
        let mut decoder = Decoder::new();
        for (i, entry) in STATIC_TABLE.iter().enumerate() {
            let index = u8::try_from(i + 1).unwrap();
            let decoded = decoder.decode(&[0x80 | index]).unwrap();
            assert_eq!(decoded, [(entry.0.to_vec(), entry.1.to_vec())]);
        }
    }

    /// Writes a client preface, SETTINGS and one request to an h2 server reading `server_io`;
    /// returns the authorities the server accepted and the first frame it sent on stream 1.
    async fn h2_exchange<T>(server_io: T, mut client: DuplexStream, block: &[u8]) -> (Vec<String>, Frame)
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server_io).await.unwrap();
            let mut seen = Vec::new();
            while let Some(Ok((request, mut respond))) = conn.accept().await {
                seen.push(request.uri().authority().unwrap().to_string());
                let response = tonic::codegen::http::Response::new(());
                respond.send_response(response, true).unwrap();
            }
            seen
        });
        let input = connection(&[frame(TYPE_SETTINGS, 0, 0, &[]), headers_frame(1, block)]);
        client.write_all(&input).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let mut header = [0u8; 9];
                client.read_exact(&mut header).await.unwrap();
                let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
                let mut payload = vec![0; len];
                client.read_exact(&mut payload).await.unwrap();
                let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
                if stream == 1 {
                    break Frame {
                        kind: header[3],
                        flags: header[4],
                        stream,
                        payload,
                    };
                }
            }
        })
        .await
        .expect("h2 answered stream 1");
        drop(client);
        let seen = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        (seen, reply)
    }

    #[tokio::test]
    async fn h2_accepts_a_socket_path_authority_only_through_the_fix() {
        let block = encode(&mut Encoder::new(), &grpc_request("/tmp/x.sock"));

        // Control: h2 alone resets the stream with PROTOCOL_ERROR.
        let (client, server) = tokio::io::duplex(1 << 16);
        let (seen, reply) = h2_exchange(server, client, &block).await;
        assert!(seen.is_empty());
        assert_eq!(
            (reply.kind, reply.payload.as_slice()),
            (TYPE_RST_STREAM, &[0, 0, 0, 1][..])
        );

        // Through the fix h2 serves the request, as for localhost.
        let (client, server) = tokio::io::duplex(1 << 16);
        let (seen, reply) = h2_exchange(AuthorityFix::new(server), client, &block).await;
        assert_eq!(seen, ["localhost"]);
        assert_eq!(reply.kind, TYPE_HEADERS);
        assert_eq!(decode_standalone(&reply.payload), owned(&[(":status", "200")]));
    }
}
