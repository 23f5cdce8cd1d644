//! Status: its shape over every reply of the run (`status.version`, `status.healthz`,
//! `status.key-id`) and its latency (`status.latency`). The apiserver polls it every minute, every
//! 10 s after a failure, and each call has the provider's `timeout` (3 s by default, spec 2.2).

use std::collections::BTreeSet;
use std::time::Instant;

use super::{Check, Probe, Seen, millis, percentile, quote};
use crate::apiserver::encrypted_object::{KEY_ID_MAX, validate_key_id};
use crate::apiserver::kms::{DEFAULT_TIMEOUT, StatusResponse};

/// Status calls timed one after another.
const STATUS_SAMPLES: usize = 50;

/// `status.version`, `status.healthz`, `status.key-id` over every Status reply of the run.
pub(super) fn shape(seen: &Seen) -> Vec<Check> {
    const NAMES: [&str; 3] = ["status.version", "status.healthz", "status.key-id"];
    let Some(first) = seen.statuses.first() else {
        let why = seen
            .first_status_error
            .as_deref()
            .unwrap_or("no Status call was made");
        return NAMES
            .into_iter()
            .map(|name| Check::fail(name, format!("no Status call succeeded: {why}")))
            .collect();
    };
    let n = seen.statuses.len();
    let version = if !matches!(first.version.as_str(), "v2" | "v2beta1") {
        Check::fail(
            NAMES[0],
            format!(
                "{}; the apiserver accepts \"v2\" or \"v2beta1\"",
                quote(&first.version)
            ),
        )
    } else if let Some(other) = seen.statuses.iter().find(|s| s.version != first.version) {
        Check::fail(
            NAMES[0],
            format!(
                "changed from {:?} to {}; the apiserver requires it never change",
                first.version,
                quote(&other.version)
            ),
        )
    } else {
        Check::pass(NAMES[0], format!("{:?} in all {n} replies", first.version))
    };
    // A Status call that errors is a failed probe to the apiserver, as a healthz other than "ok" is.
    let unhealthy: Vec<&StatusResponse> = seen.statuses.iter().filter(|s| s.healthz != "ok").collect();
    let healthz = match (unhealthy.first(), &seen.first_status_error) {
        (Some(s), _) => Check::fail(
            NAMES[1],
            format!(
                "{} of {n} replies not \"ok\", e.g. {}",
                unhealthy.len(),
                quote(&s.healthz)
            ),
        ),
        (None, Some(error)) => Check::fail(
            NAMES[1],
            format!("{} Status call(s) failed, e.g. {error}", seen.status_errors),
        ),
        (None, None) => Check::pass(NAMES[1], format!("\"ok\" in all {n} replies")),
    };
    let bad_key_id = seen
        .statuses
        .iter()
        .find_map(|s| validate_key_id(&s.key_id).err());
    let distinct: BTreeSet<&str> = seen.statuses.iter().map(|s| s.key_id.as_str()).collect();
    let key_id = match bad_key_id {
        Some(violation) => Check::fail(NAMES[2], format!("{violation}")),
        None => Check::pass(
            NAMES[2],
            format!(
                "{} B (limit {KEY_ID_MAX}), {} distinct over {n} replies",
                first.key_id.len(),
                distinct.len()
            ),
        ),
    };
    vec![version, healthz, key_id]
}

/// `status.latency`: sequential calls, as the apiserver's probe makes them.
pub(super) async fn latency(probe: &Probe) -> Check {
    const NAME: &str = "status.latency";
    let mut times = Vec::with_capacity(STATUS_SAMPLES);
    for i in 0..STATUS_SAMPLES {
        let started = Instant::now();
        if let Err(err) = probe.status().await {
            return Check::fail(
                NAME,
                format!(
                    "call {} of {STATUS_SAMPLES} failed after {}: {err}",
                    i + 1,
                    millis(started.elapsed())
                ),
            );
        }
        times.push(started.elapsed());
    }
    times.sort();
    let max = times.last().copied().unwrap_or_default();
    let figures = format!(
        "p50 {}, p99 {}, max {} over {STATUS_SAMPLES} calls",
        millis(percentile(&times, 0.50)),
        millis(percentile(&times, 0.99)),
        millis(max)
    );
    // The client's deadline turns a slower call into an error above; this catches a clock edge.
    if max > DEFAULT_TIMEOUT {
        return Check::fail(
            NAME,
            format!("{figures}; over the apiserver's {DEFAULT_TIMEOUT:?} deadline"),
        );
    }
    Check::pass(NAME, format!("{figures} (bound {DEFAULT_TIMEOUT:?})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::Verdict;

    #[test]
    fn status_shape_fails_a_version_that_changes_and_a_bad_healthz() {
        let status = |version: &str, healthz: &str| StatusResponse {
            version: version.into(),
            healthz: healthz.into(),
            key_id: "k".into(),
        };
        let seen = Seen {
            statuses: vec![status("v2", "ok"), status("v2beta1", "backend down")],
            ..Seen::default()
        };
        let verdicts: Vec<Verdict> = shape(&seen).iter().map(|c| c.verdict).collect();
        assert_eq!(verdicts, [Verdict::Fail, Verdict::Fail, Verdict::Pass]);
    }
}
