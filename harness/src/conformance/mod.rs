//! The KMS v2 contract (spec sections 1, 2 and 8) as checks against any running plugin, kleidi or
//! not: `kleidi-harness conformance --plugin unix:///path/to.sock` prints one line per check,
//! `pass`, `FAIL` or `unknown` with the figure or reason, and exits 0 only if every check passes.
//! [`run`] is the same suite as a library call returning a [`Report`].
//!
//! What it checks: Status (version `v2`/`v2beta1` and never changing, healthz `ok`, key_id of 1 to
//! 1024 bytes) over every Status reply of the run; Status latency (p50/p99 of 50 calls; FAIL if any
//! call misses the apiserver's 3 s per-call deadline); Encrypt/Decrypt round trips of 32, 64 and
//! 256 bytes; the three `:authority` forms (socket path, %-encoded path, `localhost`); the
//! apiserver's limits on every Encrypt answer (key_id and ciphertext ≤ 1 KiB, annotation keys
//! FQDNs, annotations ≤ 32 KiB) and distinct answers for distinct plaintexts; every Encrypt's key_id
//! equal to the Status key_id just before it (8 tasks × 25 rounds at once); unknown key_ids,
//! tampered ciphertexts and tampered annotations refused; 64 concurrent Decrypts all right.
//!
//! Where the spec is silent the suite decides, and says so in the line: a Decrypt that returns bytes
//! other than those encrypted is always FAIL. Returning the original plaintext for an unknown key_id
//! is FAIL (spec 8: Decrypt checks it recognises the key_id); for a changed ciphertext or a changed
//! or removed annotation it is `unknown`: the plaintext is right, but those bytes are evidently not
//! authenticated, which the spec asks for only in passing. Added annotations are not tried: they
//! reach the plugin only from someone who can write etcd, and ignoring them is harmless. A size
//! other than 32 bytes that Encrypt refuses is `unknown`: the apiserver only sends 32-byte seeds.
//! A key_id that changes during the agreement run in one step (A → B) with at most one straddling
//! Encrypt per task is a rotation, `unknown` ("rerun"), not a failure. Every call has the 3 s
//! deadline, every check a 30 s budget, so a hung plugin ends the run in bounded time.

mod authority;
mod decrypt;
mod encrypt;
mod status;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::RngCore;
use zeroize::Zeroizing;

use crate::apiserver::kms::{DecryptRequest, EncryptResponse, StatusResponse};
use crate::apiserver::{Authority, GrpcKms, KmsClient, connect_unix};
use authority::Form;
use encrypt::ROUND_TRIPS;

/// The seed size the apiserver sends to Encrypt (spec 2.3).
const SEED_LEN: usize = 32;
/// How long one check may take before it is `unknown`.
const CHECK_BUDGET: Duration = Duration::from_secs(30);
/// Longest plugin text (error message, key_id) quoted in a line.
const QUOTE_MAX: usize = 120;

/// A check's outcome; `Unknown` when the suite could not tell (an unexpected error, a budget spent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The contract holds.
    Pass,
    /// The contract is broken.
    Fail,
    /// Not proven either way; the detail says why.
    Unknown,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "FAIL",
            Verdict::Unknown => "unknown",
        })
    }
}

/// One check: what it is, its verdict and the figure or reason behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// Stable name, e.g. `encrypt.key-id-matches-status`.
    pub name: &'static str,
    /// The verdict.
    pub verdict: Verdict,
    /// Figures for a pass, the reason for anything else.
    pub detail: String,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Self {
        Self::new(name, Verdict::Pass, detail)
    }

    fn fail(name: &'static str, detail: impl Into<String>) -> Self {
        Self::new(name, Verdict::Fail, detail)
    }

    fn unknown(name: &'static str, detail: impl Into<String>) -> Self {
        Self::new(name, Verdict::Unknown, detail)
    }

    fn new(name: &'static str, verdict: Verdict, detail: impl Into<String>) -> Self {
        Self {
            name,
            verdict,
            detail: detail.into(),
        }
    }
}

/// Every check of one run, in the order they print.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The checks.
    pub checks: Vec<Check>,
}

impl Report {
    /// True when every check passed (the CLI's exit 0).
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.verdict == Verdict::Pass)
    }

    /// The check called `name`.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &self.checks {
            writeln!(f, "{:<7}  {:<width$}  {}", c.verdict, c.name, c.detail)?;
        }
        let count = |v| self.checks.iter().filter(|c| c.verdict == v).count();
        writeln!(
            f,
            "verdict: {} of {} checks pass, {} FAIL, {} unknown",
            count(Verdict::Pass),
            self.checks.len(),
            count(Verdict::Fail),
            count(Verdict::Unknown)
        )
    }
}

/// Runs every check against the plugin on `socket` (`unix:///path` or a path). Never panics on what
/// the plugin does; a plugin nobody serves gives one failed `connect` check.
pub async fn run(socket: &str) -> Report {
    let path = socket_path(socket);
    let kms = match connect_unix(&path, Authority::Localhost).await {
        Ok(kms) => kms,
        Err(err) => {
            return Report {
                checks: vec![Check::fail("connect", err.to_string())],
            };
        }
    };
    let probe = Arc::new(Probe {
        kms,
        seen: Mutex::default(),
    });
    // The active checks record every Status and Encrypt answer, so the shape and limit checks
    // after them judge all of the run's answers, not one sample.
    let latency = bounded("status.latency", status::latency(&probe)).await;
    let mut round_trips = Vec::new();
    for (size, name) in ROUND_TRIPS {
        round_trips.push(bounded(name, encrypt::round_trip(&probe, size, name)).await);
    }
    let mut authorities = Vec::new();
    for form in [Form::SocketPath, Form::PercentEncoded, Form::Localhost] {
        authorities.push(bounded(form.name(), authority::check(&probe, &path, form)).await);
    }
    let agreement = bounded(encrypt::AGREEMENT, encrypt::key_id_agreement(&probe)).await;
    let unknown_key = bounded(decrypt::UNKNOWN_KEY_ID, decrypt::unknown_key_id(&probe)).await;
    let ciphertext = bounded(decrypt::TAMPERED_CIPHERTEXT, decrypt::tampered_ciphertext(&probe)).await;
    let annotations = bounded(
        decrypt::TAMPERED_ANNOTATIONS,
        decrypt::tampered_annotations(&probe),
    )
    .await;
    let storm = bounded(decrypt::STORM, decrypt::storm(&probe)).await;

    let seen = probe.seen();
    let mut checks = status::shape(&seen);
    checks.push(latency);
    checks.extend(round_trips);
    checks.extend(authorities);
    checks.push(agreement);
    checks.extend(encrypt::limits(&seen.encrypts));
    checks.extend([unknown_key, ciphertext, annotations, storm]);
    Report { checks }
}

fn socket_path(socket: &str) -> PathBuf {
    let path = socket
        .strip_prefix("unix://")
        .or_else(|| socket.strip_prefix("unix:"))
        .unwrap_or(socket);
    PathBuf::from(path)
}

async fn bounded(name: &'static str, check: impl Future<Output = Check>) -> Check {
    tokio::time::timeout(CHECK_BUDGET, check)
        .await
        .unwrap_or_else(|_| Check::unknown(name, format!("did not finish within {CHECK_BUDGET:?}")))
}

/// The plugin client, recording what the plugin answered for the checks that judge all answers.
struct Probe {
    kms: GrpcKms,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    statuses: Vec<StatusResponse>,
    status_errors: usize,
    first_status_error: Option<String>,
    encrypts: Vec<EncryptResponse>,
}

impl Probe {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn status(&self) -> Result<StatusResponse, String> {
        let status = self.kms.status().await.map_err(|e| rpc_error(&e));
        let mut seen = self.seen();
        match &status {
            Ok(s) => seen.statuses.push(s.clone()),
            Err(e) => {
                seen.status_errors += 1;
                seen.first_status_error.get_or_insert_with(|| e.clone());
            }
        }
        status
    }

    async fn encrypt(&self, plaintext: &[u8]) -> Result<EncryptResponse, tonic::Status> {
        let encrypted = self.kms.encrypt(&uid(), plaintext).await?;
        self.seen().encrypts.push(encrypted.clone());
        Ok(encrypted)
    }

    async fn decrypt(&self, request: &DecryptRequest) -> Result<Zeroizing<Vec<u8>>, tonic::Status> {
        self.kms.decrypt(&uid(), request).await
    }

    /// Encrypts fresh random bytes; a failure is the reason a check could not run.
    async fn sample(&self, len: usize) -> Result<(Vec<u8>, DecryptRequest), String> {
        let plaintext = random_bytes(len);
        let encrypted = self
            .encrypt(&plaintext)
            .await
            .map_err(|e| format!("no ciphertext to work with: Encrypt failed: {}", rpc_error(&e)))?;
        Ok((plaintext, decrypt_request(encrypted)))
    }
}

fn decrypt_request(encrypted: EncryptResponse) -> DecryptRequest {
    DecryptRequest {
        ciphertext: encrypted.ciphertext,
        key_id: encrypted.key_id,
        annotations: encrypted.annotations,
    }
}

/// A fresh UUIDv4, as the apiserver sends with every call (spec 2.5).
fn uid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// A plugin's error as one short line: its text is foreign input.
fn rpc_error(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), quote(status.message()))
}

/// Plugin text (a key_id, a healthz, an error) in quotes, escaped and cut short: foreign input
/// must not break the one-line-per-check output.
fn quote(text: &str) -> String {
    let mut out = String::from("\"");
    out.extend(text.chars().take(QUOTE_MAX).flat_map(char::escape_debug));
    out.push('"');
    if text.chars().count() > QUOTE_MAX {
        out.push('…');
    }
    out
}

fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.saturating_sub(1)).copied().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_argument_takes_every_form_the_apiserver_config_does() {
        assert_eq!(socket_path("unix:///run/k.sock"), PathBuf::from("/run/k.sock"));
        assert_eq!(socket_path("unix:/run/k.sock"), PathBuf::from("/run/k.sock"));
        assert_eq!(socket_path("/run/k.sock"), PathBuf::from("/run/k.sock"));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples: Vec<Duration> = (1..=50).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 0.50), Duration::from_millis(25));
        assert_eq!(percentile(&samples, 0.99), Duration::from_millis(50));
        assert_eq!(percentile(&[], 0.99), Duration::ZERO);
    }

    #[test]
    fn the_report_prints_one_line_per_check_and_a_verdict() {
        let report = Report {
            checks: vec![Check::pass("a.b", "fine"), Check::unknown("c", "why")],
        };
        assert!(!report.passed());
        let text = report.to_string();
        assert_eq!(text.lines().count(), 3);
        assert!(
            text.starts_with("pass     a.b  fine\nunknown  c    why\n"),
            "{text}"
        );
    }
}
