//! The client's side of the socket for the `:authority` targets, shared by both.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Yields `data` in pieces of `sizes` (cycled; all of it at once when empty), and if `pend`,
/// `Pending` before every other piece, as a socket does when the client is slower.
pub struct Client<'a> {
    pub data: &'a [u8],
    pub sizes: &'a [usize],
    pub next: usize,
    pub pend: bool,
    pub pending_now: bool,
}

impl<'a> Client<'a> {
    /// `data` in pieces of `sizes`, never `Pending`.
    #[allow(dead_code)] // authority_stream builds its clients with `pend` set per input
    pub fn new(data: &'a [u8], sizes: &'a [usize]) -> Self {
        Self {
            data,
            sizes,
            next: 0,
            pend: false,
            pending_now: false,
        }
    }
}

impl AsyncRead for Client<'_> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pend {
            this.pending_now = !this.pending_now;
            if this.pending_now {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        let size = this
            .sizes
            .get(this.next % this.sizes.len().max(1))
            .copied()
            .unwrap_or(usize::MAX);
        this.next += 1;
        let n = this.data.len().min(size).min(buf.remaining());
        let (head, rest) = this.data.split_at(n);
        buf.put_slice(head);
        this.data = rest;
        Poll::Ready(Ok(()))
    }
}
