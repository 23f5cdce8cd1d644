//! Decrypt: what must be refused (an unknown key_id, a tampered ciphertext, tampered annotations)
//! and a storm of concurrent callers that must all succeed. The verdicts where the spec is silent
//! are set out in the `conformance` module's doc.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::{Check, Probe, SEED_LEN, Verdict, millis, percentile, rpc_error, uid};
use crate::apiserver::kms::DecryptRequest;

/// Concurrent Decrypts of the storm, over this many distinct wrapped seeds.
const STORM_CALLS: usize = 64;
const STORM_SEEDS: usize = 8;

pub(super) const UNKNOWN_KEY_ID: &str = "decrypt.unknown-key-id";
pub(super) const TAMPERED_CIPHERTEXT: &str = "decrypt.tampered-ciphertext";
pub(super) const TAMPERED_ANNOTATIONS: &str = "decrypt.tampered-annotations";

/// `decrypt.unknown-key-id`: a good ciphertext under a key_id the plugin never issued is refused.
pub(super) async fn unknown_key_id(probe: &Probe) -> Check {
    let (seed, good) = match probe.sample(SEED_LEN).await {
        Ok(sample) => sample,
        Err(why) => return Check::unknown(UNKNOWN_KEY_ID, why),
    };
    let with_key_id = |key_id: String| DecryptRequest {
        key_id,
        ..good.clone()
    };
    let cases = vec![
        (
            "a key_id never issued",
            with_key_id(format!("conformance-unknown-{}", uid())),
        ),
        (
            "the key_id with a byte appended",
            with_key_id(format!("{}x", good.key_id)),
        ),
    ];
    refused(
        probe,
        UNKNOWN_KEY_ID,
        &seed,
        cases,
        (
            Verdict::Fail,
            "Decrypt does not check the key_id (spec 8: it must recognise it)",
        ),
    )
    .await
}

/// `decrypt.tampered-ciphertext`: changed bytes are refused, never decrypted to something else.
pub(super) async fn tampered_ciphertext(probe: &Probe) -> Check {
    let (seed, good) = match probe.sample(SEED_LEN).await {
        Ok(sample) => sample,
        Err(why) => return Check::unknown(TAMPERED_CIPHERTEXT, why),
    };
    let len = good.ciphertext.len();
    let with = |ciphertext: Vec<u8>| DecryptRequest {
        ciphertext,
        ..good.clone()
    };
    let flipped = |i: usize| {
        let mut c = good.ciphertext.clone();
        if let Some(b) = c.get_mut(i) {
            *b ^= 0x01;
        }
        with(c)
    };
    let mut truncated = good.ciphertext.clone();
    truncated.pop();
    let mut extended = good.ciphertext.clone();
    extended.push(0);
    let cases = vec![
        ("first byte flipped", flipped(0)),
        ("middle byte flipped", flipped(len / 2)),
        ("last byte flipped", flipped(len.saturating_sub(1))),
        ("last byte dropped", with(truncated)),
        ("a byte appended", with(extended)),
    ];
    refused(
        probe,
        TAMPERED_CIPHERTEXT,
        &seed,
        cases,
        (Verdict::Unknown, "those bytes are not authenticated"),
    )
    .await
}

/// `decrypt.tampered-annotations`: each annotation Encrypt returned, changed or removed, is refused.
pub(super) async fn tampered_annotations(probe: &Probe) -> Check {
    let (seed, good) = match probe.sample(SEED_LEN).await {
        Ok(sample) => sample,
        Err(why) => return Check::unknown(TAMPERED_ANNOTATIONS, why),
    };
    if good.annotations.is_empty() {
        return Check::pass(TAMPERED_ANNOTATIONS, "n/a: Encrypt returns no annotations");
    }
    let mut cases = Vec::new();
    // Bounded: a plugin may return many annotations; a few show whether it checks them.
    for (key, value) in good.annotations.iter().take(4) {
        let mut changed = good.clone();
        let mut new_value = value.clone();
        match new_value.last_mut() {
            Some(b) => *b ^= 0x01,
            None => new_value.push(b'x'),
        }
        changed.annotations.insert(key.clone(), new_value);
        let mut removed = good.clone();
        removed.annotations.remove(key);
        cases.push(("an annotation value changed", changed));
        cases.push(("an annotation removed", removed));
    }
    refused(
        probe,
        TAMPERED_ANNOTATIONS,
        &seed,
        cases,
        (
            Verdict::Unknown,
            "the plugin does not authenticate its annotations",
        ),
    )
    .await
}

/// Sends each case; every one must be refused. Other bytes than `seed` are always FAIL; `seed`
/// itself gets the verdict and note in `accepted`.
async fn refused(
    probe: &Probe,
    name: &'static str,
    seed: &[u8],
    cases: Vec<(&'static str, DecryptRequest)>,
    accepted: (Verdict, &str),
) -> Check {
    let total = cases.len();
    let mut codes = BTreeSet::new();
    let mut gave_seed = Vec::new();
    for (what, request) in cases {
        match probe.decrypt(&request).await {
            Err(status) => {
                codes.insert(format!("{:?}", status.code()));
            }
            Ok(p) if p.as_slice() == seed => gave_seed.push(what),
            Ok(p) => {
                return Check::fail(
                    name,
                    format!(
                        "{what}: Decrypt returned {} B of garbage instead of an error",
                        p.len()
                    ),
                );
            }
        }
    }
    if gave_seed.is_empty() {
        let codes: Vec<String> = codes.into_iter().collect();
        return Check::pass(name, format!("{total} of {total} refused ({})", codes.join(", ")));
    }
    let (verdict, note) = accepted;
    Check::new(
        name,
        verdict,
        format!(
            "returned the original plaintext for: {}; {note}",
            gave_seed.join(", ")
        ),
    )
}

pub(super) const STORM: &str = "decrypt.storm";

/// `decrypt.storm`: an apiserver filling its watch cache after a restart sends one Decrypt per
/// stored seed, all at once; every one must succeed.
pub(super) async fn storm(probe: &Arc<Probe>) -> Check {
    let mut samples = Vec::with_capacity(STORM_SEEDS);
    for _ in 0..STORM_SEEDS {
        match probe.sample(SEED_LEN).await {
            Ok(sample) => samples.push(sample),
            Err(why) => return Check::unknown(STORM, why),
        }
    }
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (seed, request) in samples.into_iter().cycle().take(STORM_CALLS) {
        let probe = Arc::clone(probe);
        tasks.spawn(async move {
            let started = Instant::now();
            let result = probe.decrypt(&request).await.map(|p| p.as_slice() == seed);
            (started.elapsed(), result)
        });
    }
    let mut results = Vec::with_capacity(STORM_CALLS);
    while let Some(joined) = tasks.join_next().await {
        // A task that ended abnormally counts as a failed call, never as a panic here.
        results.push(joined.unwrap_or_else(|e| (Duration::ZERO, Err(tonic::Status::unknown(e.to_string())))));
    }
    let wall = started.elapsed();
    let wrong = results.iter().filter(|(_, r)| matches!(r, Ok(false))).count();
    let errors: Vec<&tonic::Status> = results.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    if wrong > 0 {
        return Check::fail(
            STORM,
            format!("{wrong} of {STORM_CALLS} Decrypts returned other bytes"),
        );
    }
    if let Some(first) = errors.first() {
        return Check::fail(
            STORM,
            format!(
                "{} of {STORM_CALLS} Decrypts failed, e.g. {}",
                errors.len(),
                rpc_error(first)
            ),
        );
    }
    let mut times: Vec<Duration> = results.iter().map(|(t, _)| *t).collect();
    times.sort();
    Check::pass(
        STORM,
        format!(
            "{STORM_CALLS} of {STORM_CALLS} right in {} ({STORM_SEEDS} seeds); p50 {}, p99 {} per call",
            millis(wall),
            millis(percentile(&times, 0.50)),
            millis(percentile(&times, 0.99))
        ),
    )
}
