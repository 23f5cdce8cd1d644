//! Point 6: steady state. How many backend calls one kleidi makes per hour on its own while 3
//! apiservers poll Status every 20 s (their healthz/readyz checks) and nothing is written or read.
//!
//! Time is compressed by a factor k, every clock together: the pollers' interval, kleidi's health
//! cache lifetimes and the Vault token's lease are all divided by k, so one simulated hour takes
//! 3600/k real seconds and the calls counted in it are the calls of an hour.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use kleidi_harness::Envelope;
use kleidi_harness::apiserver::{Authority, connect_unix};
use kleidi_harness::runtime::{KleidiPlugin, OpenBaoSpec, TokenLease};
use tokio::task::JoinSet;

use super::audit::{self, Calls};

/// What the steady run was given.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Simulated apiservers polling Status.
    pub pollers: usize,
    /// Their poll interval, simulated.
    pub poll_interval: Duration,
    /// Simulated hours to run.
    pub hours: f64,
    /// Time compression factor k.
    pub compress: f64,
    /// kleidi's `--health-ok-ttl`, simulated (its default unless overridden).
    pub health_ok_ttl: Duration,
    /// kleidi's `--health-roundtrip-interval`, simulated.
    pub health_roundtrip: Duration,
    /// kleidi's `--health-err-ttl`, simulated.
    pub health_err_ttl: Duration,
    /// The Vault token's lease, simulated (the harness's default: 1 h TTL, 24 h max).
    pub token_ttl: Duration,
    /// The token's max TTL, simulated.
    pub token_max_ttl: Duration,
}

impl Plan {
    fn real(&self, simulated: Duration) -> Duration {
        simulated.div_f64(self.compress)
    }

    /// Real seconds the run lasts.
    pub fn real_seconds(&self) -> f64 {
        self.hours * 3600.0 / self.compress
    }

    /// One line saying exactly how time was compressed.
    pub fn method(&self) -> String {
        format!(
            "time compressed x{k}: {p} pollers call Status every {i:.3} s real ({is} s simulated); kleidi \
             --health-ok-ttl {ok} ms, --health-roundtrip-interval {rt} ms, --health-err-ttl {err} ms ({oks} s / \
             {rts} s / {errs} s simulated); Vault token \
             ttl {tt} s, max {tm} s ({tts} s / {tms} s simulated); run {r:.0} s real = {h} h simulated; \
             every kleidi-token request in OpenBao's audit log counted",
            k = self.compress,
            p = self.pollers,
            i = self.real(self.poll_interval).as_secs_f64(),
            is = self.poll_interval.as_secs(),
            ok = self.real(self.health_ok_ttl).as_millis(),
            rt = self.real(self.health_roundtrip).as_millis(),
            rts = self.health_roundtrip.as_secs(),
            err = self.real(self.health_err_ttl).as_millis(),
            oks = self.health_ok_ttl.as_secs(),
            errs = self.health_err_ttl.as_secs(),
            tt = self.real(self.token_ttl).as_secs(),
            tm = self.real(self.token_max_ttl).as_secs(),
            tts = self.token_ttl.as_secs(),
            tms = self.token_max_ttl.as_secs(),
            r = self.real_seconds(),
            h = self.hours,
        )
    }
}

/// What the steady run measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The plan it ran.
    pub plan: Plan,
    /// Real wall time of the counted window.
    pub real_seconds: f64,
    /// kleidi's backend calls in that window, by kind.
    pub calls: Calls,
    /// Status calls the pollers made, and how many of them failed.
    pub status_calls: u64,
    /// Failed probes (Status error or unhealthy).
    pub failed_probes: u64,
}

impl Outcome {
    /// Backend calls per simulated hour.
    pub fn per_hour(&self) -> f64 {
        self.calls.total as f64 / self.plan.hours
    }
}

/// Runs point 6 against a fresh OpenBao and kleidi (no etcd: nothing is stored).
pub async fn run(plan: Plan, kleidi: &Path) -> Result<Outcome> {
    let dir = tempfile::Builder::new().prefix("kleidi-steady-").tempdir()?;
    let audit_log = dir.path().join("audit.log");
    let lease = TokenLease::Ttl {
        ttl: plan.real(plan.token_ttl),
        max: plan.real(plan.token_max_ttl),
    };
    let bao = OpenBaoSpec::default()
        .with_lease(lease)
        .with_file_audit(&audit_log)
        .start()
        .await?;
    let ok_ttl = format!("{}ms", plan.real(plan.health_ok_ttl).as_millis().max(1));
    let err_ttl = format!("{}ms", plan.real(plan.health_err_ttl).as_millis().max(1));
    let roundtrip = format!("{}ms", plan.real(plan.health_roundtrip).as_millis().max(1));
    let plugin = KleidiPlugin::start_vault(
        kleidi,
        &bao,
        &bao.url(),
        dir.path(),
        &[
            "--health-ok-ttl",
            &ok_ttl,
            "--health-roundtrip-interval",
            &roundtrip,
            "--health-err-ttl",
            &err_ttl,
        ],
    )
    .await?;

    // The apiservers start (Status + Encrypt each); kleidi's own start-up calls happen now too. The
    // counted window begins once they are done.
    let mut envelopes = Vec::with_capacity(plan.pollers);
    for _ in 0..plan.pollers {
        let kms = connect_unix(&plugin.socket, Authority::Localhost).await?;
        let envelope = Envelope::new("kleidi", Arc::new(kms))?;
        envelope.refresh().await?;
        envelopes.push(Arc::new(envelope));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = audit::count(&audit_log)?;
    let started = Instant::now();
    let window = Duration::from_secs_f64(plan.real_seconds());
    let interval = plan.real(plan.poll_interval);

    let mut pollers = JoinSet::new();
    for (p, envelope) in envelopes.iter().enumerate() {
        let envelope = envelope.clone();
        // Apiservers started at different moments: their polls are spread over the interval.
        let offset = interval.mul_f64(p as f64 / plan.pollers as f64);
        pollers.spawn(async move {
            let (mut calls, mut failed) = (0u64, 0u64);
            let mut next = started + offset;
            loop {
                tokio::time::sleep_until(next.into()).await;
                if started.elapsed() >= window {
                    break;
                }
                calls += 1;
                if envelope.refresh().await.is_err() {
                    failed += 1;
                }
                next += interval;
            }
            (calls, failed)
        });
    }
    let (mut status_calls, mut failed_probes) = (0, 0);
    while let Some(done) = pollers.join_next().await {
        let (calls, failed) = done?;
        status_calls += calls;
        failed_probes += failed;
    }
    let real_seconds = started.elapsed().as_secs_f64();
    let calls = audit::count(&audit_log)?.since(&before);
    drop(plugin);
    drop(bao);
    Ok(Outcome {
        plan,
        real_seconds,
        calls,
        status_calls,
        failed_probes,
    })
}
