//! Prometheus metrics, off unless `--metrics-addr` is given, and the `/livez` and `/readyz`
//! endpoints served beside them ([`http`]).
//!
//! The gRPC path only touches [`Metrics`]: a counter and a histogram per call, keyed by label sets
//! made of static enums and `&'static str` (no label string is built per call). Everything that is
//! state rather than an event — health, the age of its verdict, the current key's hash, credential
//! lifetimes, `:authority` rewrites — is read at scrape time by a [`Collector`] from the layers
//! themselves ([`Observed`]), so a rotation leaves no stale key series behind and nothing is kept
//! up to date on the call path.
//!
//! Nothing secret reaches a metric: no plaintext, key material or token; the key_id only as the
//! first 8 hex digits of its SHA-256 (the key_id is long and client-visible, and a label of its own
//! per key would grow without bound).

pub mod http;

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};

use crate::Result;
use crate::service::Credential;

/// Latency buckets, seconds: a SoftHSM call takes well under a millisecond, a Vault call a few
/// milliseconds to the call timeout (2 s by default), a hung backend the timeout itself.
const BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Writes a label value from a static name.
macro_rules! label_value {
    ($ty:ty) => {
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
                encoder.write_str(self.as_str())
            }
        }
    };
}

/// Which gRPC service a call came in on.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Service {
    /// `v2.KeyManagementService`.
    V2,
    /// `v1beta1.KeyManagementService`.
    V1beta1,
}

impl Service {
    /// The label value, also the `service` field of a call's log span.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Service::V2 => "v2",
            Service::V1beta1 => "v1beta1",
        }
    }
}
label_value!(Service);

/// Which RPC.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Method {
    /// v2 Status.
    Status,
    /// v1beta1 Version.
    Version,
    /// Encrypt.
    Encrypt,
    /// Decrypt.
    Decrypt,
}

impl Method {
    /// The label value, also the `method` field of a call's log span.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Method::Status => "status",
            Method::Version => "version",
            Method::Encrypt => "encrypt",
            Method::Decrypt => "decrypt",
        }
    }
}
label_value!(Method);

/// The gRPC code a call ended with: the codes [`crate::Error`] maps to, and `other` for the rest
/// (which kleidi's handlers never return; tonic may, for a message it cannot decode).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Code {
    /// OK.
    Ok,
    /// Bad request or ciphertext (the caller's fault).
    InvalidArgument,
    /// The backend is unreachable.
    Unavailable,
    /// The backend refused kleidi's credential.
    PermissionDenied,
    /// The backend did not answer within the call timeout.
    DeadlineExceeded,
    /// The backend answered something it must not.
    Internal,
    /// Not implemented.
    Unimplemented,
    /// Configuration that cannot work.
    FailedPrecondition,
    /// Any other code.
    Other,
}

impl Code {
    fn as_str(self) -> &'static str {
        match self {
            Code::Ok => "ok",
            Code::InvalidArgument => "invalid_argument",
            Code::Unavailable => "unavailable",
            Code::PermissionDenied => "permission_denied",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::Internal => "internal",
            Code::Unimplemented => "unimplemented",
            Code::FailedPrecondition => "failed_precondition",
            Code::Other => "other",
        }
    }

    fn of<T>(result: &std::result::Result<T, tonic::Status>) -> Self {
        let Err(status) = result else {
            return Code::Ok;
        };
        match status.code() {
            tonic::Code::Ok => Code::Ok,
            tonic::Code::InvalidArgument => Code::InvalidArgument,
            tonic::Code::Unavailable => Code::Unavailable,
            tonic::Code::PermissionDenied => Code::PermissionDenied,
            tonic::Code::DeadlineExceeded => Code::DeadlineExceeded,
            tonic::Code::Internal => Code::Internal,
            tonic::Code::Unimplemented => Code::Unimplemented,
            tonic::Code::FailedPrecondition => Code::FailedPrecondition,
            _ => Code::Other,
        }
    }
}
label_value!(Code);

/// Which backend operation.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Op {
    /// Wrap with the current key.
    Encrypt,
    /// Unwrap.
    Decrypt,
    /// Look up the current key.
    CurrentKeyId,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::CurrentKeyId => "current_key_id",
        }
    }
}
label_value!(Op);

/// Who made a backend call: a client's RPC, or the health layer's probe.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Caller {
    /// An Encrypt or Decrypt from a client.
    Rpc,
    /// A health probe.
    Probe,
}

impl Caller {
    fn as_str(self) -> &'static str {
        match self {
            Caller::Rpc => "rpc",
            Caller::Probe => "probe",
        }
    }
}
label_value!(Caller);

tokio::task_local! {
    static CALLER: Caller;
}

/// Runs `probe` with its backend calls counted as `caller="probe"`.
pub fn as_probe<F: Future>(probe: F) -> impl Future<Output = F::Output> {
    CALLER.scope(Caller::Probe, probe)
}

fn caller() -> Caller {
    CALLER.try_with(|c| *c).unwrap_or(Caller::Rpc)
}

impl Credential {
    fn as_str(self) -> &'static str {
        match self {
            Credential::VaultToken => "vault_token",
            Credential::ClientCertificate => "client_certificate",
        }
    }
}
label_value!(Credential);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    service: Service,
    method: Method,
    code: Code,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: &'static str,
    op: Op,
    caller: Caller,
    /// `ok`, or [`crate::Error::class`]: the same word the logs carry (a static string per error
    /// kind and backend, so a bounded set).
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    key_id_hash: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CredentialLabels {
    credential: Credential,
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// The event metrics the call path updates.
#[derive(Debug)]
pub struct Metrics {
    rpcs: Family<RpcLabels, Counter>,
    rpc_seconds: Family<RpcLabels, Histogram, fn() -> Histogram>,
    backend_calls: Family<BackendLabels, Counter>,
    backend_seconds: Family<BackendLabels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Empty counters and histograms.
    pub fn new() -> Self {
        Self {
            rpcs: Family::default(),
            rpc_seconds: Family::new_with_constructor(histogram),
            backend_calls: Family::default(),
            backend_seconds: Family::new_with_constructor(histogram),
        }
    }

    /// Counts an RPC that started at `started` and ended with `result`.
    pub fn rpc<T>(
        &self,
        service: Service,
        method: Method,
        started: Instant,
        result: &std::result::Result<T, tonic::Status>,
    ) {
        let labels = RpcLabels {
            service,
            method,
            code: Code::of(result),
        };
        self.rpcs.get_or_create(&labels).inc();
        self.rpc_seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
    }

    /// Counts a backend call that took `took` and ended with `result`.
    pub fn backend<T>(&self, backend: &'static str, op: Op, took: Duration, result: &Result<T>) {
        let labels = BackendLabels {
            backend,
            op,
            caller: caller(),
            class: result.as_ref().map_or_else(|e| e.class(), |_| "ok"),
        };
        self.backend_calls.get_or_create(&labels).inc();
        self.backend_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// A registry holding these metrics and the scrape-time ones `state` answers.
    pub fn registry(&self, state: Arc<dyn Observed>) -> Registry {
        let mut registry = Registry::default();
        registry.register(
            "kleidi_rpc_requests",
            "gRPC calls by service, method and resulting gRPC code",
            self.rpcs.clone(),
        );
        registry.register(
            "kleidi_rpc_duration_seconds",
            "gRPC call latency by service, method and resulting gRPC code",
            self.rpc_seconds.clone(),
        );
        registry.register(
            "kleidi_backend_calls",
            "Backend calls by backend, operation, caller (rpc or probe) and outcome class",
            self.backend_calls.clone(),
        );
        registry.register(
            "kleidi_backend_call_duration_seconds",
            "Backend call latency by backend, operation, caller and outcome class",
            self.backend_seconds.clone(),
        );
        registry.register_collector(Box::new(StateCollector { state }));
        registry
    }
}

/// The health verdict as the health layer holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// `None` when healthy, else the healthz reason.
    pub failure: Option<String>,
    /// How long ago it was reached.
    pub age: Duration,
}

/// What the scrape and `/readyz` read from the running service, never calling the backend.
pub trait Observed: Send + Sync + 'static {
    /// The last verdict, if any.
    fn verdict(&self) -> Option<Verdict>;
    /// Starts a probe in the background if the verdict has outlived its TTL, exactly as Status
    /// would (at most one at a time, shared with Status); never waits for it.
    fn refresh(&self);
    /// The current key_id as last seen; empty if none was.
    fn key_id(&self) -> String;
    /// Seconds until each expiring credential the backend holds expires (negative: expired).
    fn credentials(&self) -> Vec<(Credential, f64)>;
}

/// The first 8 hex digits of the SHA-256 of `key_id`: the only form a key_id takes in metrics.
pub fn key_id_hash(key_id: &str) -> String {
    let digest = Sha256::digest(key_id.as_bytes());
    hex::encode(digest.get(..4).unwrap_or_default())
}

/// Scrape-time metrics read from [`Observed`].
struct StateCollector {
    state: Arc<dyn Observed>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let verdict = self.state.verdict();
        let healthy = verdict.as_ref().is_some_and(|v| v.failure.is_none());
        let gauge = ConstGauge::new(i64::from(healthy));
        gauge.encode(encoder.encode_descriptor(
            "kleidi_health_healthy",
            "1 when the last health verdict (probe or real call) is healthy, else 0.",
            None,
            gauge.metric_type(),
        )?)?;
        if let Some(v) = &verdict {
            let gauge = ConstGauge::new(v.age.as_secs_f64());
            gauge.encode(encoder.encode_descriptor(
                "kleidi_health_verdict_age_seconds",
                "Age of the cached health verdict at scrape time.",
                None,
                gauge.metric_type(),
            )?)?;
        }
        let key_id = self.state.key_id();
        if !key_id.is_empty() {
            let info = Info::new(KeyLabels {
                key_id_hash: key_id_hash(&key_id),
            });
            info.encode(encoder.encode_descriptor(
                "kleidi_current_key",
                "The current key: first 8 hex digits of the SHA-256 of its key_id.",
                None,
                MetricType::Info,
            )?)?;
        }
        let credentials = self.state.credentials();
        if !credentials.is_empty() {
            let mut family = encoder.encode_descriptor(
                "kleidi_credential_expiry_seconds",
                "Seconds until a backend credential expires (negative: expired), where known.",
                None,
                MetricType::Gauge,
            )?;
            for (credential, seconds) in credentials {
                ConstGauge::new(seconds).encode(family.encode_family(&CredentialLabels { credential })?)?;
            }
        }
        let counter = ConstCounter::new(crate::authority::rewritten_total());
        counter.encode(encoder.encode_descriptor(
            "kleidi_authority_rewrites",
            "gRPC requests whose :authority header kleidi rewrote to one the server accepts.",
            None,
            counter.metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_hash_is_8_hex_digits_of_sha256() {
        // sha256("abc") = ba7816bf…
        assert_eq!(key_id_hash("abc"), "ba7816bf");
    }

    #[test]
    fn probe_scope_sets_the_caller() {
        assert_eq!(caller(), Caller::Rpc);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert_eq!(rt.block_on(as_probe(async { caller() })), Caller::Probe);
    }
}
