//! Counting what one plugin asked OpenBao for, from OpenBao's file audit log: every request entry
//! made with a token carrying the `kleidi` policy (the harness's own admin calls use the root token
//! and are left out).

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

/// Backend calls seen in the audit log, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Calls {
    /// Every request the plugin's token made.
    pub total: u64,
    /// `POST <mount>/decrypt/<key>` requests (one HTTP call each, batched or not).
    pub decrypt_requests: u64,
    /// Ciphertexts those requests carried: `batch_input` items, or 1 for a single decrypt.
    pub decrypt_items: u64,
    /// `POST <mount>/encrypt/<key>` requests.
    pub encrypt_requests: u64,
    /// `GET <mount>/keys/<key>` (the key_id lookup of each health probe).
    pub key_reads: u64,
    /// `auth/token/*` (lookup-self, renew-self) and logins.
    pub token_calls: u64,
    /// Anything else (capabilities checks at start, …).
    pub other: u64,
}

impl Calls {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Calls) -> Calls {
        Calls {
            total: self.total.saturating_sub(earlier.total),
            decrypt_requests: self.decrypt_requests.saturating_sub(earlier.decrypt_requests),
            decrypt_items: self.decrypt_items.saturating_sub(earlier.decrypt_items),
            encrypt_requests: self.encrypt_requests.saturating_sub(earlier.encrypt_requests),
            key_reads: self.key_reads.saturating_sub(earlier.key_reads),
            token_calls: self.token_calls.saturating_sub(earlier.token_calls),
            other: self.other.saturating_sub(earlier.other),
        }
    }
}

/// Counts the plugin's requests in the audit log at `path` so far (a missing file counts nothing:
/// OpenBao creates it on the first audited request).
pub fn count(path: &Path) -> Result<Calls> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Calls::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut calls = Calls::default();
    // A line still being written does not parse yet; it is counted on the next read.
    for entry in text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
        if entry.get("type").and_then(Value::as_str) != Some("request") || !by_plugin(&entry) {
            continue;
        }
        let path = entry
            .pointer("/request/path")
            .and_then(Value::as_str)
            .unwrap_or_default();
        calls.total += 1;
        if path.contains("/decrypt/") {
            calls.decrypt_requests += 1;
            calls.decrypt_items += entry
                .pointer("/request/data/batch_input")
                .and_then(Value::as_array)
                .map_or(1, |items| items.len() as u64);
        } else if path.contains("/encrypt/") {
            calls.encrypt_requests += 1;
        } else if path.contains("/keys/") {
            calls.key_reads += 1;
        } else if path.starts_with("auth/") {
            calls.token_calls += 1;
        } else {
            calls.other += 1;
        }
    }
    Ok(calls)
}

fn by_plugin(entry: &Value) -> bool {
    entry
        .pointer("/auth/policies")
        .and_then(Value::as_array)
        .is_some_and(|policies| policies.iter().any(|p| p.as_str() == Some("kleidi")))
}
