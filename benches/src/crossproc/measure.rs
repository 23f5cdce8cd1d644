//! The client side: a tonic channel to a KMS v2 socket (`:authority` localhost, as kube-apiserver
//! ≥ 1.32 sends), fixed-count call loops, and their latency histograms.

use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use kleidi::proto::v2::key_management_service_client::KeyManagementServiceClient;
use kleidi::proto::v2::{DecryptRequest, EncryptRequest, EncryptResponse, StatusRequest};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint, Uri};

/// A KMS v2 client over one channel.
pub type KmsClient = KeyManagementServiceClient<Channel>;

/// The seed every Encrypt wraps: kube-apiserver's 32-byte DEK seed.
pub const SEED: [u8; 32] = [0x5e; 32];
/// Bound on one RPC; a call that takes longer counts as an error.
const RPC_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `socket` with `:authority` localhost (the peer plugin accepts nothing else).
pub async fn connect(socket: &Path) -> anyhow::Result<KmsClient> {
    let channel = Endpoint::from_shared(format!("unix:{}", socket.display()))?
        .origin(Uri::from_static("http://localhost"))
        .timeout(RPC_TIMEOUT)
        .connect()
        .await?;
    Ok(KeyManagementServiceClient::new(channel))
}

/// A latency histogram in nanoseconds and an error count.
pub struct Hist {
    h: Histogram<u64>,
    /// Calls that failed (not recorded in the histogram).
    pub errors: u64,
}

impl Hist {
    /// Empty; 1 ns to 60 s, 3 significant digits.
    pub fn new() -> Self {
        Self {
            // Fixed, valid bounds: cannot fail.
            #[allow(clippy::expect_used)]
            h: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds"),
            errors: 0,
        }
    }

    /// Records one call's outcome.
    pub fn record(&mut self, took: Duration, ok: bool) {
        if ok {
            self.h
                .saturating_record(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX).max(1));
        } else {
            self.errors += 1;
        }
    }

    /// Merges the callers' histograms; a caller that panicked counts all its `each` calls as errors.
    pub async fn gather(tasks: Vec<tokio::task::JoinHandle<Hist>>, each: u64) -> Hist {
        let mut hist = Hist::new();
        for task in tasks {
            match task.await {
                Ok(h) => hist.merge(&h),
                Err(_) => hist.errors += each,
            }
        }
        hist
    }

    /// Adds another histogram's calls.
    pub fn merge(&mut self, other: &Hist) {
        // Same bounds on both sides: add cannot fail.
        let _ = self.h.add(&other.h);
        self.errors += other.errors;
    }

    /// The summary.
    pub fn lat(&self) -> Lat {
        let us = |q: f64| self.h.value_at_quantile(q) as f64 / 1000.0;
        Lat {
            calls: self.h.len(),
            errors: self.errors,
            p50_us: us(0.5),
            p99_us: us(0.99),
            p999_us: us(0.999),
        }
    }
}

impl Default for Hist {
    fn default() -> Self {
        Self::new()
    }
}

/// Latency summary of one loop.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Lat {
    /// Successful calls.
    pub calls: u64,
    /// Failed calls.
    pub errors: u64,
    /// Median, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
}

/// A KMS v2 method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Encrypt of [`SEED`].
    Encrypt,
    /// Decrypt of one ciphertext of [`SEED`], checked.
    Decrypt,
    /// Status.
    Status,
}

impl Method {
    /// All three, in report order.
    pub const ALL: [Method; 3] = [Method::Encrypt, Method::Decrypt, Method::Status];

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Encrypt => "Encrypt",
            Method::Decrypt => "Decrypt",
            Method::Status => "Status",
        }
    }
}

/// One RPC; true when it succeeded (a Decrypt also must give [`SEED`] back).
pub async fn call(client: &mut KmsClient, method: Method, wrapped: &EncryptResponse) -> bool {
    match method {
        Method::Encrypt => client
            .encrypt(EncryptRequest {
                plaintext: SEED.to_vec(),
                uid: "bench".into(),
            })
            .await
            .is_ok(),
        Method::Decrypt => client
            .decrypt(DecryptRequest {
                ciphertext: wrapped.ciphertext.clone(),
                uid: "bench".into(),
                key_id: wrapped.key_id.clone(),
                annotations: wrapped.annotations.clone(),
            })
            .await
            .is_ok_and(|r| r.get_ref().plaintext == SEED),
        Method::Status => client
            .status(StatusRequest {})
            .await
            .is_ok_and(|r| r.get_ref().healthz == "ok"),
    }
}

/// One Encrypt of [`SEED`], for the Decrypt loops.
pub async fn wrap(client: &mut KmsClient) -> anyhow::Result<EncryptResponse> {
    Ok(client
        .encrypt(EncryptRequest {
            plaintext: SEED.to_vec(),
            uid: "bench".into(),
        })
        .await?
        .into_inner())
}

/// `n` sequential calls of `method`, each timed.
pub async fn sequential(client: &mut KmsClient, method: Method, wrapped: &EncryptResponse, n: u64) -> Hist {
    let mut hist = Hist::new();
    for _ in 0..n {
        let start = Instant::now();
        let ok = call(client, method, wrapped).await;
        hist.record(start.elapsed(), ok);
    }
    hist
}

/// Throughput and latency of one concurrent run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Conc {
    /// Concurrent callers.
    pub callers: u64,
    /// Successful calls per second of wall time.
    pub calls_per_s: f64,
    /// Latency of the calls.
    pub lat: Lat,
}

impl Conc {
    /// From a merged histogram and the run's wall time.
    pub fn new(callers: u64, hist: &Hist, wall: Duration) -> Self {
        let lat = hist.lat();
        Self {
            callers,
            calls_per_s: lat.calls as f64 / wall.as_secs_f64().max(1e-9),
            lat,
        }
    }
}

/// `callers` tasks, each making `total / callers` Decrypts of a ciphertext of its own over clones of
/// one channel (one HTTP/2 connection, as kube-apiserver holds one). Distinct ciphertexts, so a
/// plugin that collapses identical concurrent Decrypts gains nothing the raw side lacks. Run on a
/// multi-thread runtime.
pub async fn concurrent_decrypt(client: &KmsClient, callers: u64, total: u64) -> anyhow::Result<Conc> {
    let each = (total / callers).max(1);
    let mut wrapped = Vec::with_capacity(callers as usize);
    for _ in 0..callers {
        wrapped.push(wrap(&mut client.clone()).await?);
    }
    let start = Instant::now();
    let tasks: Vec<_> = wrapped
        .into_iter()
        .map(|wrapped| {
            let mut client = client.clone();
            tokio::spawn(async move { sequential(&mut client, Method::Decrypt, &wrapped, each).await })
        })
        .collect();
    let hist = Hist::gather(tasks, each).await;
    Ok(Conc::new(callers, &hist, start.elapsed()))
}
