//! Logs an operator can alert on: one line per event in both formats, no line a client can forge,
//! and the Vault client crates kept quiet (kleidi logs each failed call itself, once, classified).
//!
//! Two guards make "one line per event" hold whatever a message contains. [`Client`] escapes and
//! cuts every client-supplied field (uid, key_id) where it is logged; [`OneLine`] escapes any line
//! break left inside a formatted event (an error text from a dependency, a path) before it reaches
//! stderr, so kubelet, journald and log shippers see exactly one record per event.

use std::fmt;
use std::io::{self, Write};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

/// What `kleidi serve` logs when `KLEIDI_LOG` is unset: kleidi's own events at info (no line per
/// successful call), nothing from vaultrs, rustify and tss_esapi, whose ERROR lines repeat what
/// kleidi reports once per call with its class.
pub const DEFAULT_FILTER: &str = "info,vaultrs=off,rustify=off,tss_esapi=off";

/// Longest client-supplied field logged, in characters (before escaping).
pub const MAX_CLIENT_FIELD: usize = 128;

/// Installs the global subscriber on stderr: `KLEIDI_LOG` (an `EnvFilter`) or [`DEFAULT_FILTER`],
/// text or JSON.
pub fn init(format: LogFormat) {
    let filter = match std::env::var("KLEIDI_LOG") {
        Ok(directives) if !directives.trim().is_empty() => {
            EnvFilter::try_new(&directives).unwrap_or_else(|e| {
                eprintln!("KLEIDI_LOG={directives:?} is not a valid filter ({e}); using {DEFAULT_FILTER}");
                EnvFilter::new(DEFAULT_FILTER)
            })
        }
        _ => EnvFilter::new(DEFAULT_FILTER),
    };
    // Colour only on a terminal: kubelet and journald store escape codes verbatim.
    let ansi = io::IsTerminal::is_terminal(&io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(OneLine { ansi });
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// A client-supplied string as a log field or in an error text: control characters and quotes
/// escaped (`escape_debug`), at most [`MAX_CLIENT_FIELD`] characters, and the full length noted
/// when cut.
#[derive(Clone, Copy)]
pub struct Client<'a>(pub &'a str);

impl fmt::Display for Client<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.char_indices();
        for (_, c) in chars.by_ref().take(MAX_CLIENT_FIELD) {
            write!(f, "{}", c.escape_debug())?;
        }
        if let Some((at, _)) = chars.next() {
            write!(f, "…({} more bytes)", self.0.len() - at)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Client<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// Writes each formatted event to stderr with inner line breaks (and, off a terminal, escape
/// codes) escaped, keeping only the final newline. tracing-subscriber hands over one whole event per
/// `write`, so each call is escaped as a unit.
#[derive(Clone, Copy)]
pub struct OneLine {
    /// Whether ANSI colour is on (then ESC is the formatter's own and passes through).
    pub ansi: bool,
}

impl<'a> MakeWriter<'a> for OneLine {
    type Writer = OneLineWriter<io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        OneLineWriter {
            inner: io::stderr(),
            ansi: self.ansi,
        }
    }
}

/// The writer [`OneLine`] makes; generic so tests can write to a buffer.
pub struct OneLineWriter<W> {
    /// Where escaped events go.
    pub inner: W,
    /// See [`OneLine::ansi`].
    pub ansi: bool,
}

impl<W: Write> Write for OneLineWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (body, end) = match buf.strip_suffix(b"\n") {
            Some(body) => (body, &b"\n"[..]),
            None => (buf, &b""[..]),
        };
        let clean = |b: &u8| *b != b'\n' && *b != b'\r' && (self.ansi || *b != 0x1b);
        if body.iter().all(clean) {
            self.inner.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                0x1b if !self.ansi => out.extend_from_slice(b"\\x1b"),
                b => out.push(b),
            }
        }
        out.extend_from_slice(end);
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_fields_are_escaped_and_cut() {
        assert_eq!(Client("a\nb\"c").to_string(), "a\\nb\\\"c");
        let long = "é".repeat(200);
        let shown = Client(&long).to_string();
        assert!(shown.starts_with(&"é".repeat(MAX_CLIENT_FIELD)));
        assert!(shown.ends_with("…(144 more bytes)"), "{shown}");
        assert_eq!(Client("short").to_string(), "short");
    }

    #[test]
    fn an_event_with_line_breaks_becomes_one_line() {
        let mut w = OneLineWriter {
            inner: Vec::new(),
            ansi: false,
        };
        w.write_all(b"WARN failed: first\nsecond\r\n\x1b[2Jthird\n")
            .unwrap();
        assert_eq!(
            String::from_utf8(w.inner).unwrap(),
            "WARN failed: first\\nsecond\\r\\n\\x1b[2Jthird\n"
        );
    }

    #[test]
    fn colour_passes_through_on_a_terminal() {
        let mut w = OneLineWriter {
            inner: Vec::new(),
            ansi: true,
        };
        w.write_all(b"\x1b[33mWARN\x1b[0m x\n").unwrap();
        assert_eq!(w.inner, b"\x1b[33mWARN\x1b[0m x\n");
    }
}
