//! The `:authority` fix: a byte-level layer between an accepted Unix-socket connection and tonic
//! that replaces HTTP/2 `:authority` values the `http` crate cannot parse.
//!
//! Why it exists: kube-apiserver before 1.32 (grpc-go dialling `unix://…`) sends the socket
//! *path* as `:authority` (`/var/run/kms.sock`), and Python/C-core grpcio sends it %-encoded
//! (`tmp%2Fprobe%2Fx.sock`). hyperium/h2, under tonic, parses `:authority` with
//! `http::uri::Authority` and answers anything it rejects with RST_STREAM(PROTOCOL_ERROR) before
//! any service code runs; h2 has no option to relax that. On a Unix socket the authority carries
//! no meaning, so replacing it loses nothing.
//!
//! What it does: [`AuthorityFix`] wraps the connection. Writes (server → client) pass through
//! untouched. Reads (client → server) are followed frame by frame: the connection preface and
//! every frame other than HEADERS/CONTINUATION pass byte for byte (payloads are streamed, never
//! buffered whole). Each header block is collected and walked by [`hpack`], which follows the
//! client's dynamic table by sizes. A block with no unparsable `:authority` — every block a
//! modern client sends — is then handed on exactly as its frames came. In a block that has one,
//! only that field changes (to `localhost`, or to a valid value of the same length where the
//! field enters the dynamic table), and the block is re-framed as one HEADERS frame and
//! CONTINUATION frames of at most 16 KiB, without padding.
//!
//! This parses untrusted bytes, so everything is bounded: a header block may carry at most
//! 64 KiB of frames and decode to at most 32 KiB (h2's own limit is 16 KiB), must be finished
//! within [`HEADER_BLOCK_TIMEOUT`], and the layer reads from the socket only once h2 has taken
//! all it produced. Any framing or HPACK violation fails the read with `InvalidData`, which ends
//! the connection. A connection that does not start with the HTTP/2 client preface is passed
//! through unchanged (h2 rejects it itself).
//!
//! The layer also closes idle connections ([`AuthorityFix::with_idle_timeout`]), since it sees
//! every byte and hyper has no idle timeout: once no byte has moved either way for the timeout,
//! it hands h2 a GOAWAY as if the client had sent one, at a frame boundary. h2 answers that as
//! it does any peer leaving: its own GOAWAY(NO_ERROR) naming the last stream it processed, then,
//! once no stream is open, a clean close. A client that stays silent for another timeout after
//! that, or that stalls mid-frame or stops reading, is cut off.

mod hpack;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use hpack::Table;

/// `:authority` values replaced on every connection of this process, for metrics.
static REWRITTEN_TOTAL: AtomicU64 = AtomicU64::new(0);

/// How many `:authority` values this process has replaced, over all connections.
pub fn rewritten_total() -> u64 {
    REWRITTEN_TOTAL.load(Ordering::Relaxed)
}

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// Stream dependency (4) and weight (1) of a HEADERS frame with PRIORITY.
const PRIORITY_LEN: usize = 5;
/// Most bytes one header block may take on the wire, frame headers included (so a block kept
/// open by empty CONTINUATION frames is bounded too).
const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Largest frame payload the layer emits: SETTINGS_MAX_FRAME_SIZE's initial value, which h2 uses.
const MAX_EMITTED_PAYLOAD: usize = 16_384;
/// How long a header block may stay open (HEADERS seen, END_HEADERS not yet): a client that
/// holds one open holds the connection's parser and its buffer.
pub const HEADER_BLOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket reads that need parsing are made in pieces of this size.
const READ_CHUNK: usize = 8 * 1024;
/// What an idle connection's client is made to have said: GOAWAY (type 0x7) on stream 0, last
/// stream 0 (the client accepts no pushed streams, which h2 never sends anyway), NO_ERROR.
const IDLE_GOAWAY: [u8; FRAME_HEADER_LEN + 8] = [0, 0, 8, 0x7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// A connection wrapper that makes client requests with an unparsable HTTP/2 `:authority` (a
/// socket path, a %-encoded path) acceptable to h2 by replacing that value.
pub struct AuthorityFix<S> {
    inner: S,
    parser: Parser,
    /// Bytes the parser produced that the reader (h2) has not taken yet.
    out: BytesMut,
    /// Where socket reads land when the bytes need parsing (allocated on first use).
    scratch: Vec<u8>,
    /// Runs while a header block is open; the connection fails when it fires.
    block_deadline: Option<Pin<Box<Sleep>>>,
    /// The idle timeout, if one is set.
    idle: Option<Idle>,
    /// Set once the connection is to end (the client broke the protocol, or idled past its
    /// GOAWAY); every later read fails the same way.
    failed: Option<(io::ErrorKind, String)>,
}

impl<S> AuthorityFix<S> {
    /// Wraps a freshly accepted connection; must see the client's bytes from the very first one.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            parser: Parser::new(),
            out: BytesMut::new(),
            scratch: Vec::new(),
            block_deadline: None,
            idle: None,
            failed: None,
        }
    }

    /// As [`AuthorityFix::new`], and closes the connection once no byte has moved either way for
    /// `timeout`: gracefully (a GOAWAY h2 answers) when it is between frames, at once otherwise.
    pub fn with_idle_timeout(inner: S, timeout: Duration) -> Self {
        Self {
            idle: Some(Idle::new(timeout)),
            ..Self::new(inner)
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// How many `:authority` values this connection has had replaced so far.
    pub fn rewritten(&self) -> u64 {
        self.parser.table.rewritten
    }

    /// Fails the connection if a header block has been open for too long; arms the timer when
    /// one is open, drops it when none is.
    fn check_block_deadline(&mut self, cx: &mut Context<'_>) -> Result<(), String> {
        let Some(stream) = self.parser.open_block() else {
            self.block_deadline = None;
            return Ok(());
        };
        let deadline = self
            .block_deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(HEADER_BLOCK_TIMEOUT)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Err(format!(
                "header block on stream {stream} still open after {} s",
                HEADER_BLOCK_TIMEOUT.as_secs()
            )),
            Poll::Pending => Ok(()),
        }
    }

    fn fail(&mut self, message: String) -> io::Error {
        tracing::warn!(error = %message, "closing client connection: malformed HTTP/2");
        let err = invalid_data(&message);
        self.failed = Some((io::ErrorKind::InvalidData, message));
        err
    }

    /// Called when a socket read or write is pending. Ready once the idle timeout has fired and
    /// been acted on: either the GOAWAY waits in `out` for h2, or the connection has failed.
    fn poll_idle(&mut self, cx: &mut Context<'_>, reading: bool) -> Poll<()> {
        let Some(idle) = &mut self.idle else {
            return Poll::Pending;
        };
        ready!(idle.poll_expired(cx));
        let timeout = humantime::format_duration(idle.timeout);
        // Only between frames, after the client's SETTINGS, with nothing pending for h2: there a
        // frame of the client's own could have come, and h2 takes it as one.
        if reading && !idle.goaway_sent && self.out.is_empty() && self.parser.between_frames() {
            tracing::debug!(%timeout, "idle connection: asking the client to go away");
            idle.goaway_sent = true;
            idle.touch();
            self.out.extend_from_slice(&IDLE_GOAWAY);
            return Poll::Ready(());
        }
        let why = if idle.goaway_sent {
            "still open a timeout after its GOAWAY"
        } else if reading {
            "stalled mid-frame or before its SETTINGS"
        } else {
            "not reading what it is sent"
        };
        tracing::info!(%timeout, "closing idle client connection: {why}");
        self.failed = Some((io::ErrorKind::TimedOut, format!("idle for {timeout}: {why}")));
        Poll::Ready(())
    }

    fn touch(&mut self) {
        if let Some(idle) = &mut self.idle {
            idle.touch();
        }
    }
}

/// The idle timeout: when a byte last moved, and a timer re-armed only when it fires, so that a
/// byte costs a clock read rather than a timer update.
struct Idle {
    timeout: Duration,
    last: Instant,
    timer: Pin<Box<Sleep>>,
    /// The GOAWAY went to h2; the next expiry ends the connection outright.
    goaway_sent: bool,
}

impl Idle {
    fn new(timeout: Duration) -> Self {
        let now = Instant::now();
        Self {
            timeout,
            last: now,
            timer: Box::pin(tokio::time::sleep(timeout)),
            goaway_sent: false,
        }
    }

    fn touch(&mut self) {
        self.last = Instant::now();
    }

    /// Ready once no byte has moved for the timeout.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            ready!(self.timer.as_mut().poll(cx));
            // A timeout too large to add to the clock never expires.
            let Some(due) = self.last.checked_add(self.timeout) else {
                return Poll::Pending;
            };
            if due <= Instant::now() {
                return Poll::Ready(());
            }
            self.timer.as_mut().reset(due);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some((kind, message)) = &this.failed {
                return Poll::Ready(Err(io::Error::new(*kind, message.clone())));
            }
            // Everything produced goes to h2 before the socket is read again: what the layer
            // holds stays bounded by one read and one header block, whatever the client sends.
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
                let polled = Pin::new(&mut this.inner).poll_read(cx, &mut direct);
                let n = direct.filled().len();
                if polled.is_pending() {
                    ready!(this.poll_idle(cx, true));
                    continue;
                }
                ready!(polled)?;
                this.touch();
                buf.advance(n);
                this.parser.passed_through(n);
                return Poll::Ready(Ok(()));
            }
            if let Err(message) = this.check_block_deadline(cx) {
                return Poll::Ready(Err(this.fail(message)));
            }
            if this.scratch.is_empty() {
                this.scratch = vec![0; READ_CHUNK];
            }
            let mut chunk = ReadBuf::new(&mut this.scratch);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut chunk);
            let n = chunk.filled().len();
            if polled.is_pending() {
                ready!(this.poll_idle(cx, true));
                continue;
            }
            ready!(polled)?;
            this.touch();
            if n == 0 {
                // End of stream: a half-received frame is dropped, h2 sees the connection end.
                return Poll::Ready(Ok(()));
            }
            let input = this.scratch.get(..n).unwrap_or_default();
            let before = this.parser.table.rewritten;
            let fed = this.parser.feed(input, &mut this.out);
            let rewritten = this.parser.table.rewritten.saturating_sub(before);
            if rewritten > 0 {
                REWRITTEN_TOTAL.fetch_add(rewritten, Ordering::Relaxed);
            }
            if let Err(message) = fed {
                return Poll::Ready(Err(this.fail(message)));
            }
            // The input may have produced nothing yet (a header block in progress): read more
            // rather than return an empty read, which would mean end of stream.
        }
    }
}

impl<S: AsyncWrite + Unpin> AuthorityFix<S> {
    /// A write's outcome, counted as activity; a write blocked past the idle timeout fails.
    fn written(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.touch();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                ready!(self.poll_idle(cx, false));
                // A write never sends the GOAWAY: `poll_idle` has failed the connection.
                let message = self.failed.as_ref().map_or("idle", |(_, m)| m.as_str());
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, message.to_owned())))
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.written(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.written(cx, polled)
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
    /// The 9 bytes as they came.
    raw: [u8; FRAME_HEADER_LEN],
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHeader {
    fn parse(bytes: [u8; FRAME_HEADER_LEN]) -> Self {
        let [l0, l1, l2, kind, flags, s0, s1, s2, s3] = bytes;
        Self {
            raw: bytes,
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
    /// The block's frames exactly as they came, passed on as they are if nothing changes.
    raw: Vec<u8>,
}

/// The client → server half of the connection, without any I/O.
struct Parser {
    state: State,
    /// Follows the client's HPACK encoder, dynamic table included.
    table: Table,
    block: Option<PendingBlock>,
    /// Payload of the HEADERS/CONTINUATION frame being collected.
    frame_payload: Vec<u8>,
    /// A frame header has come after the preface.
    frames_seen: bool,
}

impl Parser {
    fn new() -> Self {
        Self {
            state: State::Preface { matched: 0 },
            table: Table::new(),
            block: None,
            frame_payload: Vec::new(),
            frames_seen: false,
        }
    }

    /// Whether the next client byte would start a frame, and the client's first frame (its
    /// SETTINGS, which must come before any other) has been seen.
    fn between_frames(&self) -> bool {
        self.frames_seen && self.block.is_none() && matches!(self.state, State::FrameHeader { have: 0, .. })
    }

    /// The stream of the header block in progress, if one is.
    fn open_block(&self) -> Option<u32> {
        match (&self.block, &self.state) {
            (Some(block), _) => Some(block.stream),
            (None, State::HeaderFrame { header, .. }) => Some(header.stream),
            _ => None,
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
        self.frames_seen = true;
        let (kind, stream, len) = (header.kind, header.stream, header.len);
        let too_large = || format!("header block on stream {stream} exceeds {MAX_HEADER_BLOCK} bytes");
        // RFC 9113 §6.10: a header block is contiguous, nothing may come between its frames.
        match (&mut self.block, kind) {
            (Some(block), TYPE_CONTINUATION) if block.stream == stream => {
                if block.raw.len() + FRAME_HEADER_LEN + len > MAX_HEADER_BLOCK {
                    return Err(too_large());
                }
                block.raw.extend_from_slice(&raw);
            }
            (Some(block), _) => {
                return Err(format!(
                    "frame of type {kind:#x} on stream {stream} inside the header block of stream {}",
                    block.stream
                ));
            }
            (None, TYPE_HEADERS) => {
                if FRAME_HEADER_LEN + len > MAX_HEADER_BLOCK {
                    return Err(too_large());
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
            let mut raw = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
            raw.extend_from_slice(&header.raw);
            raw.extend_from_slice(&payload);
            self.block = Some(PendingBlock {
                stream: header.stream,
                flags: header.flags,
                priority,
                fragment: fragment.to_vec(),
                raw,
            });
        } else if let Some(block) = &mut self.block {
            // CONTINUATION: `start_frame` only lets one through with a block pending, and has
            // added its frame header to `raw` already.
            block.fragment.extend_from_slice(&payload);
            block.raw.extend_from_slice(&payload);
        }
        self.frame_payload = payload;
        if header.flags & FLAG_END_HEADERS != 0 {
            if let Some(block) = self.block.take() {
                // Every block goes through the table, not only those with an `:authority`: the
                // client indexes fields in any block and later blocks refer to them.
                match self.table.rewrite(block.stream, &block.fragment)? {
                    None => out.extend_from_slice(&block.raw),
                    Some(patched) => emit_header_frames(out, &block, &patched),
                }
            }
        }
        Ok(())
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

/// Writes a patched block as one HEADERS frame and as many CONTINUATION frames as needed.
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use loona_hpack::{Decoder, Encoder};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tonic::codegen::http::uri::Authority;

    use super::hpack::{MAX_DECODED_BLOCK, push_integer as integer};
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

    /// Decodes the output's blocks in order with one decoder, as h2 does (loona-hpack mirrors
    /// h2's decoder: dynamic table, Huffman, size updates).
    fn decode_all(blocks: &[Block]) -> Vec<Vec<(String, String)>> {
        let mut decoder = Decoder::new();
        blocks
            .iter()
            .map(|b| {
                decoder
                    .decode(&b.3)
                    .unwrap()
                    .into_iter()
                    .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
                    .collect()
            })
            .collect()
    }

    fn decode_one(block: &[u8]) -> Vec<(String, String)> {
        decode_all(&[(0, 0, None, block.to_vec())]).remove(0)
    }

    /// What an unparsable `:authority` of `len` bytes becomes when it entered the dynamic table.
    fn same_length(len: usize) -> String {
        let mut v: String = "localhost".chars().take(len).collect();
        while v.len() < len {
            v.push('x');
        }
        v
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
        // loona-hpack's encoder sends `:authority` without indexing: any value will do.
        expected[3].1 = "localhost".into();
        assert_eq!(decode_one(block), expected);
        assert_eq!(rewritten, 1);
    }

    #[tokio::test]
    async fn percent_encoded_and_empty_authorities_are_rewritten() {
        for bad in ["tmp%2Fprobe%2Fx.sock", "", "a b", "/tmp/x.sock"] {
            let block = encode(&mut Encoder::new(), &grpc_request(bad));
            let out = run(connection(&[headers_frame(1, &block)])).await;
            let headers = decode_one(&header_blocks(&out)[0].3);
            // "" is static entry 1, sent as an index: it becomes a literal "localhost" too.
            assert_eq!(headers[3], (":authority".into(), "localhost".into()), "{bad:?}");
        }
        // Not added to the table (literal without indexing, never indexed): plain "localhost".
        for first in [0x01, 0x11] {
            let mut block = vec![0x83, 0x86, 0x84, first, 11];
            block.extend_from_slice(b"/tmp/x.sock");
            let out = run(connection(&[headers_frame(1, &block)])).await;
            let out_block = &header_blocks(&out)[0].3;
            assert_eq!(decode_one(out_block)[3].1, "localhost");
            assert_eq!(out_block[3], first, "the representation is kept");
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
            let input = connection(&[headers_frame(1, &block)]);
            let (out, rewritten) = run_with(input.clone(), 1 << 16, 1 << 16).await;
            assert_eq!(out.unwrap(), input, "{good:?}: passed byte for byte");
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
        let replaced = same_length("/var/run/kms.sock".len());
        let expect = |id: &str| {
            owned(&[
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/v2.KeyManagementService/Encrypt"),
                (":authority", &replaced),
                ("content-type", "application/grpc"),
                ("x-request-id", id),
            ])
        };
        assert_eq!(blocks.iter().map(|b| b.0).collect::<Vec<_>>(), [1, 3, 5]);
        assert_eq!(decode_all(&blocks), [expect("one"), expect("two"), expect("two")]);
        // Only the first block had the field itself; the others pass as they came.
        assert_eq!(blocks[1].3, second);
        assert_eq!(blocks[2].3, third);
    }

    /// RFC 7541 C.4.1 and C.4.2: Huffman-coded strings and an indexed authority.
    #[tokio::test]
    async fn rfc7541_huffman_requests_decode_and_keep_valid_authority() {
        let first = hex::decode("828684418cf1e3c2e5f23a6ba0ab90f4ff").unwrap();
        let second = hex::decode("828684be5886a8eb10649cbf").unwrap();
        let input = connection(&[headers_frame(1, &first), headers_frame(3, &second)]);
        let out = run(input.clone()).await;
        assert_eq!(out, input, "valid authority: byte for byte");
        let blocks = header_blocks(&out);
        let base = [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
        ];
        let mut with_cache = owned(&base);
        with_cache.push(("cache-control".into(), "no-cache".into()));
        assert_eq!(decode_all(&blocks), [owned(&base), with_cache]);
    }

    #[tokio::test]
    async fn never_indexed_fields_stay_never_indexed() {
        // authorization (static name 23), never indexed, a never-indexed new name, and a bad
        // never-indexed authority, which is replaced but stays never indexed.
        let mut block = vec![0x82, 0x86, 0x84, 0x10 | 0x0f, 23 - 15, 6];
        block.extend_from_slice(b"secret");
        block.extend_from_slice(&[0x10, 5]);
        block.extend_from_slice(b"x-key");
        block.extend_from_slice(&[4]);
        block.extend_from_slice(b"abcd");
        let unchanged = block.clone();
        block.extend_from_slice(&[0x11, 3]);
        block.extend_from_slice(b"a b");
        let out = run(connection(&[headers_frame(1, &block)])).await;
        let out_block = &header_blocks(&out)[0].3;
        let mut expected = unchanged;
        expected.extend_from_slice(&[0x11, 9]);
        expected.extend_from_slice(b"localhost");
        assert_eq!(out_block, &expected);
        assert_eq!(
            decode_one(out_block)[3..],
            owned(&[
                ("authorization", "secret"),
                ("x-key", "abcd"),
                (":authority", "localhost")
            ])[..]
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
        let decoded = decode_all(&header_blocks(&out));
        assert_eq!(decoded[0][3].1, same_length(11));
        assert_eq!(decoded[1][3].1, same_length(11));
        assert_eq!(decoded[2][3].1, same_length(11));
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
        assert_eq!(decode_one(&blocks[0].3), expected);
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
        assert_eq!(decode_one(out_block)[3].1, "localhost");

        // Padded CONTINUATION-split block with an empty first fragment.
        let input = connection(&[
            frame(TYPE_HEADERS, FLAG_PADDED, 1, &[3, 0, 0, 0]),
            frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &block),
        ]);
        let out = run(input).await;
        assert_eq!(decode_one(&header_blocks(&out)[0].3)[3].1, "localhost");

        // Without a replacement the padded, prioritised frame passes as it came.
        let block = encode(&mut Encoder::new(), &grpc_request("localhost"));
        let mut payload = vec![2];
        payload.extend_from_slice(&priority);
        payload.extend_from_slice(&block);
        payload.extend_from_slice(&[0; 2]);
        let input = connection(&[frame(TYPE_HEADERS, flags, 9, &payload)]);
        assert_eq!(run(input.clone()).await, input);
    }

    #[tokio::test]
    async fn large_blocks_are_reemitted_in_legal_frames() {
        let mut request = grpc_request("/tmp/x.sock");
        request.push(("x-big", "v".repeat(MAX_DECODED_BLOCK - 1000)));
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
        assert!(split.len() >= 2);
        for (i, f) in split.iter().enumerate() {
            let last = i + 1 == split.len();
            assert_eq!(f.kind, if i == 0 { TYPE_HEADERS } else { TYPE_CONTINUATION });
            assert_eq!(f.flags & FLAG_END_HEADERS != 0, last);
            assert!(f.payload.len() <= 16_384);
        }
        let mut expected = as_owned(&request);
        expected[3].1 = "localhost".into();
        assert_eq!(decode_one(&header_blocks(&out)[0].3), expected);
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
            &[0x3f, 0xe2, 0x1f],                         // size update above 4096
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

    /// Writes a client preface, SETTINGS and one request to an h2 server reading `server_io`;
    /// returns the authorities the server accepted and the first frame it sent on stream 1.
    async fn h2_exchange<T>(server_io: T, client: DuplexStream, block: &[u8]) -> (Vec<String>, Frame)
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (seen, mut replies) = h2_exchange_all(server_io, client, &[block]).await;
        (seen, replies.remove(0))
    }

    /// As [`h2_exchange`], with one request per block on streams 1, 3, 5, …; returns the first
    /// frame the server sent on each.
    async fn h2_exchange_all<T>(
        server_io: T,
        mut client: DuplexStream,
        blocks: &[&[u8]],
    ) -> (Vec<String>, Vec<Frame>)
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
        let mut frames = vec![frame(TYPE_SETTINGS, 0, 0, &[])];
        for (i, block) in blocks.iter().enumerate() {
            frames.push(headers_frame(2 * i as u32 + 1, block));
        }
        client.write_all(&connection(&frames)).await.unwrap();
        let mut replies: Vec<Option<Frame>> = vec![None; blocks.len()];
        tokio::time::timeout(Duration::from_secs(5), async {
            while replies.iter().any(Option::is_none) {
                let mut header = [0u8; 9];
                client.read_exact(&mut header).await.unwrap();
                let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
                let mut payload = vec![0; len];
                client.read_exact(&mut payload).await.unwrap();
                let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
                if stream % 2 == 1 {
                    let slot = &mut replies[(stream as usize - 1) / 2];
                    slot.get_or_insert(Frame {
                        kind: header[3],
                        flags: header[4],
                        stream,
                        payload,
                    });
                }
            }
        })
        .await
        .expect("h2 answered every stream");
        let replies = replies.into_iter().map(Option::unwrap).collect();
        drop(client);
        let seen = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        (seen, replies)
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
        assert_eq!(decode_one(&reply.payload), owned(&[(":status", "200")]));
    }

    /// What grpc-go-style encoders do: the bad authority enters the dynamic table in request 1
    /// and request 2 refers to it by index alone. h2 serves both, and its table stays the
    /// client's (the `x-id` entry after it still resolves).
    #[tokio::test]
    async fn h2_serves_requests_that_index_a_replaced_authority() {
        let mut first = vec![0x83, 0x86];
        first.extend(lit_inc_indexed_name(4, "/v2.KeyManagementService/Status")); // 64 after req 1
        first.extend(lit_inc_indexed_name(1, "/var/run/kms.sock")); // 63
        first.extend(lit_inc_new_name("x-id", "1")); // 62
        let second = vec![0x83, 0x86, 0x80 | 64, 0x80 | 63, 0x80 | 62];
        let (client, server) = tokio::io::duplex(1 << 16);
        let (seen, replies) = h2_exchange_all(AuthorityFix::new(server), client, &[&first, &second]).await;
        assert_eq!(seen, [same_length(17), same_length(17)]);
        assert!(replies.iter().all(|r| r.kind == TYPE_HEADERS), "{replies:?}");
    }

    /// The amplification stream of the hardening issue: one block adds a 4,000-byte entry, then
    /// 71-byte blocks refer to it 62 times each. Re-encoding made each ~250 KB; now the first
    /// such block is refused and the layer has handed on no more than the client sent.
    #[tokio::test]
    async fn references_to_a_large_entry_are_refused_not_amplified() {
        let mut first = vec![0x83, 0x86, 0x84, 0x40, 0x01, b'x', 0x7f, 0xa1, 0x1e];
        first.extend(std::iter::repeat_n(b'y', 4000));
        let mut frames = vec![frame(TYPE_HEADERS, 0x05, 1, &first)];
        let mut small = vec![0x83, 0x86, 0x84];
        small.extend(std::iter::repeat_n(0xbe, 62));
        for i in 0..2000u32 {
            frames.push(frame(TYPE_HEADERS, 0x05, 3 + 2 * i, &small));
        }
        let input = connection(&frames);
        assert_eq!(input.len(), 24 + 9 + 4009 + 2000 * 74);
        let mut fix = AuthorityFix::new(Chunked::new(input, 8 * 1024));
        let mut handed = 0;
        let mut piece = vec![0u8; 16 * 1024];
        let err = loop {
            match fix.read(&mut piece).await {
                Ok(0) => panic!("the connection must be refused"),
                Ok(n) => handed += n,
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("decodes to more than"), "{err}");
        // At most the preface and the first block, nothing of what followed.
        assert!(handed <= 24 + 9 + 4009, "{handed}");
    }

    const IDLE: Duration = Duration::from_secs(60);
    const TYPE_GOAWAY: u8 = 0x7;

    /// What a reader of `fix` got, and when: bytes, then the error that ended it.
    type Timeline = (
        Vec<(tokio::time::Instant, Vec<u8>)>,
        tokio::time::Instant,
        io::Error,
    );

    async fn read_until_error(mut reader: impl AsyncRead + Unpin) -> Timeline {
        let mut got = Vec::new();
        let mut piece = [0u8; 4096];
        let read_all = async {
            loop {
                match reader.read(&mut piece).await {
                    Ok(0) => panic!("end of stream instead of an error"),
                    Ok(n) => got.push((tokio::time::Instant::now(), piece[..n].to_vec())),
                    Err(e) => return (tokio::time::Instant::now(), e),
                }
            }
        };
        // On the paused clock: fails at once, rather than hangs, if the connection never ends.
        let (at, err) = tokio::time::timeout(100 * IDLE, read_all)
            .await
            .expect("the connection ends");
        (got, at, err)
    }

    /// Reads and writes each keep a connection open; once neither happens for the timeout the
    /// client is handed a GOAWAY, and after another timeout of silence the connection ends.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_asked_to_go_away_then_cut_off() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let (reader, mut writer) = tokio::io::split(AuthorityFix::with_idle_timeout(server, IDLE));
        let reading = tokio::spawn(read_until_error(reader));
        let hello = connection(&[frame(TYPE_SETTINGS, 0, 0, &[])]);
        client.write_all(&hello).await.unwrap();
        let ping = frame(TYPE_PING, 0, 0, &[7; 8]);
        for _ in 0..6 {
            tokio::time::sleep(IDLE / 2).await;
            client.write_all(&ping).await.unwrap();
        }
        let pong = frame(TYPE_PING, 0x1, 0, &[7; 8]);
        for _ in 0..6 {
            tokio::time::sleep(IDLE / 2).await;
            writer.write_all(&pong).await.unwrap();
        }
        let quiet_from = tokio::time::Instant::now();
        let (got, failed_at, err) = reading.await.unwrap();

        let mut expected = hello.clone();
        for _ in 0..6 {
            expected.extend_from_slice(&ping);
        }
        expected.extend_from_slice(&IDLE_GOAWAY);
        assert_eq!(
            got.concat_bytes(),
            expected,
            "nothing but the client's bytes, then the GOAWAY"
        );
        let (goaway_at, last) = got.last().unwrap();
        assert_eq!(last.as_slice(), &IDLE_GOAWAY[..]);
        assert!(
            *goaway_at >= quiet_from + IDLE,
            "GOAWAY while the connection was busy"
        );
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(err.to_string().contains("after its GOAWAY"), "{err}");
        assert!(failed_at >= *goaway_at + IDLE);

        let mut out = vec![0u8; 6 * pong.len()];
        client.read_exact(&mut out).await.unwrap();
        assert_eq!(out, pong.repeat(6), "writes pass untouched");
    }

    trait ConcatBytes {
        fn concat_bytes(&self) -> Vec<u8>;
    }

    impl ConcatBytes for Vec<(tokio::time::Instant, Vec<u8>)> {
        fn concat_bytes(&self) -> Vec<u8> {
            self.iter().flat_map(|(_, b)| b.iter().copied()).collect()
        }
    }

    /// A GOAWAY is only handed over where a client frame could start, after the client's
    /// SETTINGS: anywhere else it would corrupt the stream, so the connection just ends.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_stalled_mid_frame_or_before_settings_is_cut_off() {
        let settings = frame(TYPE_SETTINGS, 0, 0, &[]);
        let mut mid_header = connection(std::slice::from_ref(&settings));
        mid_header.extend_from_slice(&[0, 0, 8, TYPE_PING]);
        let mut mid_payload = connection(std::slice::from_ref(&settings));
        mid_payload.extend_from_slice(&frame(TYPE_PING, 0, 0, &[1; 8])[..12]);
        let mut mid_block = connection(&[settings]);
        mid_block.extend(frame(TYPE_HEADERS, 0, 1, &[0x83]));
        for (name, input) in [
            ("mid-preface", PREFACE[..10].to_vec()),
            ("preface only", PREFACE.to_vec()),
            ("mid-header", mid_header),
            ("mid-payload", mid_payload),
            ("mid-block", mid_block),
        ] {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let fix = AuthorityFix::with_idle_timeout(server, IDLE);
            client.write_all(&input).await.unwrap();
            let (got, _, err) = read_until_error(fix).await;
            let got = got.concat_bytes();
            assert!(!got.ends_with(&IDLE_GOAWAY), "{name}: GOAWAY handed over");
            assert!(input.starts_with(&got), "{name}");
            // The open header block has its own, shorter deadline.
            let expected = if name == "mid-block" {
                "still open"
            } else {
                "idle for 1m"
            };
            assert!(err.to_string().contains(expected), "{name}: {err}");
        }
    }

    /// A client that stops reading what it is sent cannot hold the connection either.
    #[tokio::test(start_paused = true)]
    async fn a_write_blocked_for_the_idle_timeout_fails() {
        let (client, server) = tokio::io::duplex(64);
        let mut fix = AuthorityFix::with_idle_timeout(server, IDLE);
        let started = tokio::time::Instant::now();
        let written = tokio::time::timeout(100 * IDLE, fix.write_all(&[0; 4096]))
            .await
            .expect("the write ends");
        let err = written.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(err.to_string().contains("not reading"), "{err}");
        assert!(started.elapsed() >= IDLE);
        let read = fix.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(read.kind(), io::ErrorKind::TimedOut, "reads fail the same way");
        drop(client);
    }

    /// h2 takes the handed-over GOAWAY as the client leaving: it answers with its own GOAWAY
    /// naming the last stream it served, and ends the connection without an error.
    #[tokio::test(start_paused = true)]
    async fn h2_answers_the_idle_goaway_with_its_own_and_closes_cleanly() {
        let (mut client, server_io) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(AuthorityFix::with_idle_timeout(server_io, IDLE))
                .await
                .unwrap();
            let mut served = 0;
            while let Some(request) = conn.accept().await {
                let (_, mut respond) = request.unwrap();
                respond
                    .send_response(tonic::codegen::http::Response::new(()), true)
                    .unwrap();
                served += 1;
            }
            served
        });
        let block = encode(&mut Encoder::new(), &grpc_request("localhost"));
        let input = connection(&[frame(TYPE_SETTINGS, 0, 0, &[]), headers_frame(1, &block)]);
        client.write_all(&input).await.unwrap();
        let mut frames = Vec::new();
        let read_all = async {
            loop {
                let mut header = [0u8; 9];
                if client.read_exact(&mut header).await.is_err() {
                    break; // end of stream
                }
                let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
                let mut payload = vec![0; len];
                client.read_exact(&mut payload).await.unwrap();
                frames.push((header[3], payload));
            }
        };
        tokio::time::timeout(10 * IDLE, read_all)
            .await
            .expect("the connection ends");
        assert!(
            frames.iter().any(|(kind, _)| *kind == TYPE_HEADERS),
            "the request was served"
        );
        let (kind, payload) = frames.last().unwrap();
        assert_eq!(*kind, TYPE_GOAWAY);
        assert_eq!(
            payload.as_slice(),
            &[0, 0, 0, 1, 0, 0, 0, 0],
            "last stream 1, NO_ERROR"
        );
        assert_eq!(server.await.unwrap(), 1);
    }

    #[tokio::test]
    async fn an_empty_authority_entering_the_table_is_refused_clearly() {
        let err = run_err(connection(&[headers_frame(1, &[0x83, 0x86, 0x84, 0x41, 0x00])])).await;
        assert!(err.contains("empty :authority"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_header_block_left_open_is_closed_after_the_timeout() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut fix = AuthorityFix::new(server);
        let block = encode(&mut Encoder::new(), &grpc_request("localhost"));
        let mut input = connection(&[frame(TYPE_HEADERS, 0, 1, &block)]);
        // Empty CONTINUATIONs keep it open without END_HEADERS.
        input.extend(frame(TYPE_CONTINUATION, 0, 1, &[]));
        client.write_all(&input).await.unwrap();
        let mut piece = [0u8; 4096];
        let started = tokio::time::Instant::now();
        let mut handed = 0;
        let err = loop {
            match fix.read(&mut piece).await {
                Ok(n) => handed += n,
                Err(e) => break e,
            }
        };
        assert_eq!(handed, PREFACE.len(), "the open block is held back");
        assert!(err.to_string().contains("still open after 10 s"), "{err}");
        assert!(started.elapsed() >= HEADER_BLOCK_TIMEOUT);
        drop(client);
    }

    /// An HPACK encoder for the tests that uses every representation (indexes, insertions,
    /// literals without and never indexed, Huffman or raw strings, size updates), with a
    /// dynamic table of its own.
    struct RandomEncoder {
        table: std::collections::VecDeque<(Vec<u8>, Vec<u8>)>,
        max: usize,
    }

    impl RandomEncoder {
        fn size(&self) -> usize {
            self.table.iter().map(|(n, v)| n.len() + v.len() + 32).sum()
        }

        fn evict(&mut self) {
            while self.size() > self.max {
                self.table.pop_back();
            }
        }

        fn string(out: &mut Vec<u8>, s: &[u8], huffman: bool) {
            let mut coded = Vec::new();
            if huffman {
                httlib_huffman::encode(s, &mut coded).unwrap();
            } else {
                coded = s.to_vec();
            }
            integer(out, coded.len(), 7, if huffman { 0x80 } else { 0 });
            out.extend_from_slice(&coded);
        }

        fn block(&mut self, headers: &[(Vec<u8>, Vec<u8>)], next: &mut impl FnMut() -> u64) -> Vec<u8> {
            let mut out = Vec::new();
            if next() % 8 == 0 {
                self.max = (next() % 4097) as usize;
                self.evict();
                integer(&mut out, self.max, 5, 0x20);
            }
            for (name, value) in headers {
                let exact = self.table.iter().position(|(n, v)| n == name && v == value);
                let named = self.table.iter().position(|(n, _)| n == name);
                match (exact, next() % 4) {
                    (Some(i), 0 | 1) => integer(&mut out, 62 + i, 7, 0x80),
                    (_, kind) => {
                        let (flags, prefix) = [(0x40, 6), (0x40, 6), (0x00, 4), (0x10, 4)][kind as usize];
                        match named.filter(|_| next() % 2 == 0) {
                            Some(i) => integer(&mut out, 62 + i, prefix, flags),
                            None => {
                                out.push(flags);
                                Self::string(&mut out, name, next() % 2 == 0);
                            }
                        }
                        Self::string(&mut out, value, next() % 2 == 0);
                        if flags == 0x40 {
                            self.table.push_front((name.clone(), value.clone()));
                            if name.len() + value.len() + 32 > self.max {
                                self.table.clear();
                            }
                            self.evict();
                        }
                    }
                }
            }
            out
        }
    }

    /// The layer's central promise, on random traffic from an encoder that uses every HPACK
    /// feature: what h2 decodes is what the client sent, except that each unparsable
    /// `:authority` became a parsable one; blocks without one pass byte for byte.
    #[tokio::test]
    async fn random_hpack_traffic_decodes_to_what_was_sent() {
        let mut state = 0x1234_5678_9abc_def1_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let authorities = [
            "/var/run/kms.sock",
            "tmp%2Fprobe%2Fx.sock",
            "localhost",
            "kms:443",
            "a b",
            "@",
            "/x",
        ];
        for connection_no in 0..40 {
            let mut encoder = RandomEncoder {
                table: Default::default(),
                max: 4096,
            };
            let mut sent = Vec::new();
            let mut frames = Vec::new();
            for request in 0..30u32 {
                let authority = authorities[(next() % authorities.len() as u64) as usize];
                let mut headers: Vec<(Vec<u8>, Vec<u8>)> = grpc_request(authority)
                    .into_iter()
                    .map(|(n, v)| (n.as_bytes().to_vec(), v.into_bytes()))
                    .collect();
                headers.push((b"x-request".to_vec(), format!("{}", next() % 50).into_bytes()));
                if next() % 3 == 0 {
                    headers.push((b"x-pad".to_vec(), vec![b'p'; (next() % 600) as usize]));
                }
                let block = encoder.block(&headers, &mut next);
                frames.push(headers_frame(2 * request + 1, &block));
                sent.push((headers, block));
            }
            let chunk = 1 + (next() % 300) as usize;
            let (out, _) = run_with(connection(&frames), chunk, 1 + (next() % 5000) as usize).await;
            let out = out.unwrap_or_else(|e| panic!("connection {connection_no}: {e}"));
            let blocks = header_blocks(&out);
            let decoded = decode_all(&blocks);
            assert_eq!(decoded.len(), sent.len());
            for ((headers, block), (got, out_block)) in sent.iter().zip(decoded.iter().zip(&blocks)) {
                let mut any_bad = false;
                assert_eq!(got.len(), headers.len());
                for ((name, value), (got_name, got_value)) in headers.iter().zip(got) {
                    assert_eq!(name.as_slice(), got_name.as_bytes());
                    let bad = name == b":authority" && Authority::try_from(value.as_slice()).is_err();
                    if bad {
                        any_bad = true;
                        assert!(Authority::try_from(got_value.as_str()).is_ok(), "{got_value:?}");
                        assert!(got_value == "localhost" || *got_value == same_length(value.len()));
                    } else {
                        assert_eq!(value.as_slice(), got_value.as_bytes());
                    }
                }
                if !any_bad {
                    assert_eq!(
                        &out_block.3, block,
                        "a block without a bad authority is unchanged"
                    );
                }
            }
        }
    }
}

/// Cost of the layer per request header block, for the performance notes: run with
/// `cargo test --release -p kleidi --lib authority::cost -- --ignored --nocapture`, or under
/// `valgrind --tool=callgrind` for an instruction count that machine noise does not move.
/// Prints, asserts nothing about speed.
#[cfg(test)]
mod cost {
    use super::*;

    /// A grpc-go request block as kube-apiserver ≥ 1.32 sends it after the first request:
    /// static and dynamic indexes, one fresh Huffman-coded grpc-timeout.
    fn workload(requests: usize) -> Vec<u8> {
        let mut input = PREFACE.to_vec();
        let mut first = vec![0x83, 0x86];
        // :path, :authority (localhost), content-type, user-agent, te: inserted once.
        for (name_index, value) in [
            (4u8, "/v2.KeyManagementService/Decrypt"),
            (1, "localhost"),
            (31, "application/grpc"),
            (58, "grpc-go/1.65.0"),
        ] {
            first.push(0x40 | name_index);
            first.push(value.len() as u8);
            first.extend_from_slice(value.as_bytes());
        }
        let push_frame = |input: &mut Vec<u8>, stream: u32, block: &[u8]| {
            let len = (block.len() as u32).to_be_bytes();
            input.extend_from_slice(&[len[1], len[2], len[3], TYPE_HEADERS, FLAG_END_HEADERS]);
            input.extend_from_slice(&stream.to_be_bytes());
            input.extend_from_slice(block);
        };
        push_frame(&mut input, 1, &first);
        for i in 1..requests {
            let mut block = vec![0x83, 0x86, 0x80 | 65, 0x80 | 64, 0x80 | 63, 0x80 | 62];
            // grpc-timeout: a literal with a new name, Huffman value, as grpc-go sends it.
            block.extend_from_slice(&[0x00, 0x0c]);
            block.extend_from_slice(b"grpc-timeout");
            let mut coded = Vec::new();
            let _ = httlib_huffman::encode(format!("{}m", 1000 + i % 9000).as_bytes(), &mut coded);
            block.push(0x80 | coded.len() as u8);
            block.extend_from_slice(&coded);
            push_frame(&mut input, 2 * i as u32 + 1, &block);
        }
        input
    }

    #[test]
    #[ignore = "a measurement, not a check"]
    fn cost_per_header_block() {
        const REQUESTS: usize = 100_000;
        let input = workload(REQUESTS);
        let mut parser = Parser::new();
        let mut out = BytesMut::with_capacity(READ_CHUNK * 2);
        let started = std::time::Instant::now();
        for chunk in input.chunks(READ_CHUNK) {
            parser.feed(chunk, &mut out).unwrap_or_else(|e| panic!("{e}"));
            out.clear();
        }
        let elapsed = started.elapsed();
        println!(
            "{REQUESTS} header blocks in {elapsed:?}: {:.0} ns per block",
            elapsed.as_nanos() as f64 / REQUESTS as f64
        );
    }
}
