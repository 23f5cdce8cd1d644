//! The `:authority` layer (`AuthorityFix`) on arbitrary client byte streams, split at arbitrary
//! read boundaries and read by h2 in arbitrary sizes. Never panics; what it hands h2 does not
//! depend on how the bytes were split (same verdict, same output, or one output a prefix of the
//! other when the connection fails part way); a failed connection stays failed; and the output is
//! at most 11 times the input (a 1-byte static `:authority ""` becomes an 11-byte literal) plus
//! frame headers: no amplification.
//!
//! Input: `flags ‖ n ‖ n × u16 read boundaries ‖ stream`. Flag bit 0 puts the HTTP/2 client
//! preface in front (so the fuzzer need not find it), bit 1 makes every other read Pending.

#![no_main]

use std::io;
use std::sync::LazyLock;

use kleidi::authority::AuthorityFix;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncReadExt;

#[path = "common/client.rs"]
mod client;
use client::Client;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One runtime for every input (the layer's timers need one); building one per input would
/// dominate the run.
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime")
});

/// Everything the layer hands h2, read in pieces of `read_sizes` (cycled), and whether it failed.
async fn drive(client: Client<'_>, read_sizes: &[usize]) -> (Vec<u8>, bool) {
    let mut fix = AuthorityFix::new(client);
    let mut out = Vec::new();
    let mut piece = vec![0u8; 1 << 16];
    for i in 0.. {
        let size = read_sizes
            .get(i % read_sizes.len().max(1))
            .copied()
            .unwrap_or(1 << 16);
        match fix.read(&mut piece[..size]).await {
            Ok(0) => return (out, false),
            Ok(n) => out.extend_from_slice(&piece[..n]),
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
                let again = fix
                    .read(&mut piece[..size])
                    .await
                    .expect_err("a failed connection stays failed");
                assert_eq!(again.kind(), io::ErrorKind::InvalidData);
                return (out, true);
            }
        }
    }
    unreachable!()
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((&n, rest)) = rest.split_first() else {
        return;
    };
    let n = usize::from(n % 32);
    let Some((cuts, body)) = rest.split_at_checked(2 * n) else {
        return;
    };
    // Sizes 1..=65536: reads of a single byte up to whole frames.
    let sizes: Vec<usize> = cuts
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) + 1)
        .collect();
    let mut input = Vec::with_capacity(PREFACE.len() + body.len());
    if flags & 1 != 0 {
        input.extend_from_slice(PREFACE);
    }
    input.extend_from_slice(body);
    let pend = flags & 2 != 0;

    RUNTIME.block_on(async {
        let whole = Client {
            data: &input,
            sizes: &[],
            next: 0,
            pend: false,
            pending_now: false,
        };
        let (whole_out, whole_failed) = drive(whole, &[]).await;
        // h2 reads into its own buffer; the same boundaries in reverse order stand in for its sizes.
        let read_sizes: Vec<usize> = sizes.iter().rev().copied().collect();
        let split = Client {
            data: &input,
            sizes: &sizes,
            next: 0,
            pend,
            pending_now: false,
        };
        let (split_out, split_failed) = drive(split, &read_sizes).await;

        assert_eq!(
            whole_failed, split_failed,
            "the verdict depends on read boundaries"
        );
        if whole_failed {
            let (short, long) = if whole_out.len() <= split_out.len() {
                (&whole_out, &split_out)
            } else {
                (&split_out, &whole_out)
            };
            assert!(long.starts_with(short), "outputs of a failed connection diverge");
        } else {
            assert!(whole_out == split_out, "the output depends on read boundaries");
        }
        for out in [&whole_out, &split_out] {
            let frames = out.len() / 16_384 + 1;
            assert!(
                out.len() <= 11 * input.len() + 9 * frames,
                "{} bytes out of {} in",
                out.len(),
                input.len()
            );
        }
    });
});
