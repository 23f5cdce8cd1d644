//! HPACK (RFC 7541) as far as the `:authority` fix needs it: follow the client's dynamic table by
//! entry sizes alone, find each `:authority` field h2 would reject, and patch only that field.
//!
//! Why sizes are enough: the layer hands h2 every representation as the client sent it (indexes,
//! insertions, Huffman strings), so h2's decoder builds the same dynamic table as the client's
//! encoder. The layer only has to know which entries hold `:authority` and how large each is, to
//! follow insertions and evictions. A value it replaces inside an insertion keeps its decoded
//! length, so both tables keep the same sizes and evict the same entries, whatever comes later.
//! Nothing is re-encoded, so a small block can never become a large one (the amplification
//! defect of re-encoding without the table), and a block's decoded size is bounded before h2
//! reads it.

use std::collections::VecDeque;

use httlib_huffman::encoder::table::ENCODE_TABLE;
use httlib_huffman::{DecoderSpeed, decode as huffman_decode};
use tonic::codegen::http::uri::Authority;

/// The dynamic table size h2 allows a client (SETTINGS_HEADER_TABLE_SIZE, default, never changed).
pub(super) const TABLE_SIZE: usize = 4096;
/// Per-entry overhead in table and header-list sizes (RFC 7541 §4.1, RFC 9113 §6.5.2).
const ENTRY_OVERHEAD: usize = 32;
/// Largest decoded header list (names + values + 32 per field) a block may carry: twice the
/// 16 KiB SETTINGS_MAX_HEADER_LIST_SIZE hyper gives h2, so anything h2 would serve passes and a
/// block of cheap references to large entries is refused before h2 reads it.
pub(super) const MAX_DECODED_BLOCK: usize = 32 * 1024;
/// What an unparsable `:authority` becomes where its length is free to change.
const REPLACEMENT: &[u8] = b"localhost";
/// The pseudo-header the layer exists for.
const AUTHORITY: &[u8] = b":authority";

/// One dynamic-table entry as the layer sees it.
#[derive(Clone, Copy)]
struct Entry {
    name_len: usize,
    value_len: usize,
    /// Its name is `:authority` (its value, as h2 holds it, always parses: see [`Table::rewrite`]).
    authority: bool,
}

impl Entry {
    fn size(&self) -> usize {
        self.name_len + self.value_len + ENTRY_OVERHEAD
    }
}

/// The client encoder's dynamic table, by sizes: newest entry first, as HPACK indexes it.
pub(super) struct Table {
    entries: VecDeque<Entry>,
    size: usize,
    max_size: usize,
    /// Huffman output lands here; reused so a block costs no allocation once warm.
    scratch: Vec<u8>,
    /// Fields replaced so far on this connection.
    pub(super) rewritten: u64,
}

/// A field's name: where it came from, as far as the layer cares.
struct Name {
    len: usize,
    authority: bool,
}

impl Table {
    pub(super) fn new() -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            max_size: TABLE_SIZE,
            scratch: Vec::new(),
            rewritten: 0,
        }
    }

    /// Follows one complete header block through the table. Returns `None` when h2 can read the
    /// block as it came, or the block with each unparsable `:authority` replaced.
    pub(super) fn rewrite(&mut self, stream: u32, block: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let error = |e: &str| format!("HPACK error in header block of stream {stream}: {e}");
        // Bytes of `block` already copied to `patched` (only used once a field needs a change).
        let mut copied = 0;
        let mut patched: Option<Vec<u8>> = None;
        let mut decoded = 0usize;
        let mut seen_field = false;
        let mut pos = 0;
        while let Some(rest) = block.get(pos..).filter(|rest| !rest.is_empty()) {
            let start = pos;
            let first = rest.first().copied().unwrap_or_default();
            let replace_with: Option<Vec<u8>>;
            let field_size;
            if first & 0x80 != 0 {
                // Indexed field (§6.1).
                let (index, used) = integer(rest, 7).map_err(error)?;
                pos += used;
                let (name_len, value_len, authority) = self.lookup(index).map_err(error)?;
                field_size = name_len + value_len + ENTRY_OVERHEAD;
                // Only static entry 1 (`:authority` with an empty value) can be unparsable here.
                replace_with = (authority && value_len == 0).then(|| {
                    let mut field = vec![0x01]; // literal without indexing, name = static index 1
                    push_raw_string(&mut field, REPLACEMENT);
                    field
                });
            } else if first & 0xe0 == 0x20 {
                // Dynamic table size update (§6.3): only before the first field (h2 agrees).
                if seen_field {
                    return Err(error("dynamic table size update after a header field"));
                }
                let (new_max, used) = integer(rest, 5).map_err(error)?;
                pos += used;
                if new_max > TABLE_SIZE {
                    return Err(error("dynamic table size update above 4096"));
                }
                self.max_size = new_max;
                self.evict_to(new_max);
                continue;
            } else {
                // Literal field (§6.2): with incremental indexing (01), without (0000), never
                // indexed (0001).
                let inserts = first & 0x40 != 0;
                let (name_index, used) = integer(rest, if inserts { 6 } else { 4 }).map_err(error)?;
                pos += used;
                let name = if name_index == 0 {
                    let (raw, huffman, used) = string(block.get(pos..).unwrap_or_default()).map_err(error)?;
                    pos += used;
                    let text = self.decode(raw, huffman).map_err(error)?;
                    Name {
                        len: text.len(),
                        authority: text == AUTHORITY,
                    }
                } else {
                    let (len, _, authority) = self.lookup(name_index).map_err(error)?;
                    Name { len, authority }
                };
                let value_start = pos;
                let (raw, huffman, used) = string(block.get(pos..).unwrap_or_default()).map_err(error)?;
                pos += used;
                let value = self.decode(raw, huffman).map_err(error)?;
                let value_len = value.len();
                let unparsable = name.authority && Authority::try_from(value).is_err();
                if unparsable {
                    log_replaced(stream, value);
                }
                field_size = name.len + value_len + ENTRY_OVERHEAD;
                replace_with = match (unparsable, inserts) {
                    (false, _) => None,
                    // Not inserted: any value will do.
                    (true, false) => Some(replaced_value(block, start, value_start, REPLACEMENT)),
                    // Inserted: the same decoded length keeps h2's table the size of the client's.
                    (true, true) if value_len > 0 => Some(replaced_value(
                        block,
                        start,
                        value_start,
                        &same_length_replacement(value_len),
                    )),
                    (true, true) => {
                        return Err(error(
                            "an empty :authority is added to the dynamic table; it cannot be replaced without the tables diverging",
                        ));
                    }
                };
                if inserts {
                    self.insert(Entry {
                        name_len: name.len,
                        value_len,
                        authority: name.authority,
                    });
                }
            }
            seen_field = true;
            decoded = decoded.saturating_add(field_size);
            if decoded > MAX_DECODED_BLOCK {
                return Err(format!(
                    "header block on stream {stream} decodes to more than {MAX_DECODED_BLOCK} bytes"
                ));
            }
            if let Some(field) = replace_with {
                self.rewritten = self.rewritten.saturating_add(1);
                let out = patched.get_or_insert_with(|| Vec::with_capacity(block.len() + 16));
                out.extend_from_slice(block.get(copied..start).unwrap_or_default());
                out.extend_from_slice(&field);
                copied = pos;
            }
        }
        Ok(patched.map(|mut out| {
            out.extend_from_slice(block.get(copied..).unwrap_or_default());
            out
        }))
    }

    /// (name length, value length, name is `:authority`) of a 1-based HPACK index.
    fn lookup(&self, index: usize) -> Result<(usize, usize, bool), &'static str> {
        if index == 0 {
            return Err("index 0");
        }
        if let Some(&(name, value)) = STATIC_TABLE.get(index - 1) {
            return Ok((name.len(), value.len(), index == 1));
        }
        let entry = self
            .entries
            .get(index - 1 - STATIC_TABLE.len())
            .ok_or("index beyond the dynamic table")?;
        Ok((entry.name_len, entry.value_len, entry.authority))
    }

    /// RFC 7541 §4.4: evict until the entry fits; an entry larger than the table empties it.
    fn insert(&mut self, entry: Entry) {
        let size = entry.size();
        if size > self.max_size {
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max_size - size);
        self.entries.push_front(entry);
        self.size += size;
    }

    fn evict_to(&mut self, limit: usize) {
        while self.size > limit {
            match self.entries.pop_back() {
                Some(old) => self.size -= old.size(),
                None => self.size = 0,
            }
        }
    }

    /// The string's octets: raw as sent, or Huffman-decoded into the scratch buffer.
    fn decode<'a>(&'a mut self, raw: &'a [u8], huffman: bool) -> Result<&'a [u8], &'static str> {
        if !huffman {
            return Ok(raw);
        }
        self.scratch.clear();
        huffman_decode(raw, &mut self.scratch, DecoderSpeed::FourBits)
            .map_err(|_| "invalid Huffman string")?;
        check_huffman_padding(raw, &self.scratch)?;
        Ok(&self.scratch)
    }
}

/// RFC 7541 §5.2, which httlib-huffman's decoder does not fully check: the padding is shorter
/// than a byte and is all ones (the EOS prefix). h2 refuses anything else, and the table must
/// count exactly what h2 counts.
fn check_huffman_padding(raw: &[u8], decoded: &[u8]) -> Result<(), &'static str> {
    let bits: usize = decoded
        .iter()
        .map(|&b| {
            ENCODE_TABLE
                .get(usize::from(b))
                .map_or(0, |&(len, _)| usize::from(len))
        })
        .sum();
    let padding = (raw.len() * 8).checked_sub(bits).filter(|&p| p < 8);
    let ones = |p: usize| {
        p == 0
            || raw
                .last()
                .is_some_and(|&last| last & ((1u8 << p) - 1) == (1u8 << p) - 1)
    };
    match padding {
        Some(p) if ones(p) => Ok(()),
        _ => Err("invalid Huffman padding"),
    }
}

/// The field at `block[start..]` with its value (at `value_start`) replaced by `value`, raw.
fn replaced_value(block: &[u8], start: usize, value_start: usize, value: &[u8]) -> Vec<u8> {
    let mut field = block.get(start..value_start).unwrap_or_default().to_vec();
    push_raw_string(&mut field, value);
    field
}

/// An authority h2 accepts, `len` bytes long: `localhost` cut or padded with `x`.
fn same_length_replacement(len: usize) -> Vec<u8> {
    let mut value: Vec<u8> = REPLACEMENT.iter().copied().take(len).collect();
    value.resize(len, b'x');
    value
}

fn log_replaced(stream: u32, value: &[u8]) {
    let shown = value.get(..128).unwrap_or(value);
    tracing::debug!(
        stream,
        original = %String::from_utf8_lossy(shown).escape_debug(),
        "replaced unparsable :authority"
    );
}

/// An HPACK string literal without Huffman coding (§5.2).
fn push_raw_string(out: &mut Vec<u8>, s: &[u8]) {
    push_integer(out, s.len(), 7, 0x00);
    out.extend_from_slice(s);
}

/// An HPACK integer (§5.1) with a `prefix_bits`-bit prefix after the `flags` bits.
pub(super) fn push_integer(out: &mut Vec<u8>, mut value: usize, prefix_bits: u8, flags: u8) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        // Fits the prefix, so fits a byte.
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    value -= max;
    while value >= 0x80 {
        out.push(0x80 | (value & 0x7f) as u8);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A string literal at the start of `buf`: (its octets as sent, Huffman-coded?, bytes used).
fn string(buf: &[u8]) -> Result<(&[u8], bool, usize), &'static str> {
    let huffman = buf.first().ok_or("truncated string")? & 0x80 != 0;
    let (len, prefix) = integer(buf, 7)?;
    let end = prefix.checked_add(len).ok_or("truncated string")?;
    let raw = buf.get(prefix..end).ok_or("truncated string")?;
    Ok((raw, huffman, end))
}

/// An HPACK integer (§5.1) with a `prefix_bits`-bit prefix: (value, bytes used). At most four
/// continuation bytes, so the value cannot overflow (h2 allows no more).
pub(super) fn integer(buf: &[u8], prefix_bits: u8) -> Result<(usize, usize), &'static str> {
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

/// RFC 7541 Appendix A.
pub(super) static STATIC_TABLE: [(&[u8], &[u8]); 61] = [
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
    use loona_hpack::Decoder;

    use super::*;

    #[test]
    fn static_table_matches_loona_hpack() {
        let mut decoder = Decoder::new();
        for (i, entry) in STATIC_TABLE.iter().enumerate() {
            let index = u8::try_from(i + 1).unwrap();
            let decoded = decoder.decode(&[0x80 | index]).unwrap();
            assert_eq!(decoded, [(entry.0.to_vec(), entry.1.to_vec())]);
        }
    }

    #[test]
    fn same_length_replacements_parse_as_authorities() {
        for len in (1..=64).chain([1000, 30_000]) {
            let value = same_length_replacement(len);
            assert_eq!(value.len(), len);
            assert!(Authority::try_from(value.as_slice()).is_ok(), "{len}");
        }
    }

    #[test]
    fn integers_round_trip() {
        for prefix in [4u8, 5, 6, 7] {
            for value in [0, 1, 14, 15, 16, 30, 31, 62, 63, 64, 126, 127, 128, 4096, 1 << 20] {
                let mut out = Vec::new();
                push_integer(&mut out, value, prefix, 0);
                assert_eq!(integer(&out, prefix), Ok((value, out.len())), "{prefix} {value}");
            }
        }
    }

    /// The Huffman decoder against loona-hpack's (slow, but independent) on every byte value
    /// and on random strings, valid and corrupted.
    #[test]
    fn huffman_decoding_agrees_with_loona_hpack() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut table = Table::new();
        for round in 0..3000 {
            let len = (next() % 40) as usize;
            let text: Vec<u8> = if round < 256 {
                vec![round as u8]
            } else {
                (0..len).map(|_| next() as u8).collect()
            };
            let mut coded = Vec::new();
            httlib_huffman::encode(&text, &mut coded).unwrap();
            if round % 3 == 0 && !coded.is_empty() {
                let at = (next() as usize) % coded.len();
                coded[at] ^= 1 << (next() % 8);
            }
            // As a literal header value with a static name, Huffman flag set.
            let mut field = vec![0x0f, 0x2b - 15]; // name index 43: if-unmodified-since
            push_integer(&mut field, coded.len(), 7, 0x80);
            field.extend_from_slice(&coded);
            let theirs = Decoder::new().decode(&field).map(|mut h| h.remove(0).1);
            let ours = table.decode(&coded, true).map(<[u8]>::to_vec);
            match (&theirs, &ours) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{coded:02x?}"),
                (Err(_), Err(_)) => {}
                _ => panic!("disagree on {coded:02x?}: loona {theirs:?}, ours {ours:?}"),
            }
        }
    }
}
