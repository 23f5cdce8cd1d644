//! Encrypt: round trips of seed-sized and larger plaintexts, the key_id agreement with Status
//! under concurrency, and the apiserver's limits on every Encrypt answer of the run (spec 2.1).

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use tokio::task::JoinSet;

use super::{Check, Probe, SEED_LEN, decrypt_request, quote, random_bytes, rpc_error};
use crate::apiserver::encrypted_object::{
    ANNOTATIONS_MAX, DEK_SOURCE_MAX, KEY_ID_MAX, validate_annotations, validate_dek_source, validate_key_id,
};
use crate::apiserver::kms::EncryptResponse;

/// Plaintext sizes of the round-trip checks, and their names.
pub(super) const ROUND_TRIPS: [(usize, &str); 3] = [
    (SEED_LEN, "round-trip.32B"),
    (64, "round-trip.64B"),
    (256, "round-trip.256B"),
];
/// Concurrent tasks of the key_id agreement check, and the Status + Encrypt rounds each runs.
const AGREEMENT_TASKS: usize = 8;
const AGREEMENT_ROUNDS: usize = 25;

/// `round-trip.<n>B`: Decrypt gives back exactly what Encrypt was given.
pub(super) async fn round_trip(probe: &Probe, size: usize, name: &'static str) -> Check {
    let plaintext = random_bytes(size);
    let encrypted = match probe.encrypt(&plaintext).await {
        Ok(e) => e,
        Err(err) if size == SEED_LEN => {
            return Check::fail(name, format!("Encrypt failed: {}", rpc_error(&err)));
        }
        Err(err) => {
            return Check::unknown(
                name,
                format!(
                    "Encrypt refused {size} B ({}); the apiserver only sends {SEED_LEN} B",
                    rpc_error(&err)
                ),
            );
        }
    };
    let figures = format!(
        "ciphertext {} B, key_id {} B, {} annotation(s)",
        encrypted.ciphertext.len(),
        encrypted.key_id.len(),
        encrypted.annotations.len()
    );
    match probe.decrypt(&decrypt_request(encrypted)).await {
        Ok(p) if p.as_slice() == plaintext => Check::pass(name, figures),
        Ok(p) => Check::fail(
            name,
            format!(
                "Decrypt returned {} B that differ from the {size} B encrypted",
                p.len()
            ),
        ),
        Err(err) => Check::fail(
            name,
            format!("Decrypt of a fresh ciphertext failed: {}", rpc_error(&err)),
        ),
    }
}

pub(super) const AGREEMENT: &str = "encrypt.key-id-matches-status";

/// `encrypt.key-id-matches-status`: the apiserver discards an Encrypt whose key_id is not the one
/// Status just reported and marks the plugin unhealthy (spec 2.1, 2.3).
pub(super) async fn key_id_agreement(probe: &Arc<Probe>) -> Check {
    let mut tasks = JoinSet::new();
    for _ in 0..AGREEMENT_TASKS {
        let probe = Arc::clone(probe);
        tasks.spawn(async move {
            let mut pairs = Vec::with_capacity(AGREEMENT_ROUNDS);
            for _ in 0..AGREEMENT_ROUNDS {
                let status = match probe.status().await {
                    Ok(s) => s,
                    Err(err) => return (pairs, Some(format!("Status failed: {err}"))),
                };
                match probe.encrypt(&random_bytes(SEED_LEN)).await {
                    Ok(e) => pairs.push((status.key_id, e.key_id)),
                    Err(err) => return (pairs, Some(format!("Encrypt failed: {}", rpc_error(&err)))),
                }
            }
            (pairs, None)
        });
    }
    let mut pairs = Vec::new();
    let mut errors = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((done, error)) => {
                pairs.extend(done);
                errors.extend(error);
            }
            Err(err) => errors.push(format!("a task ended abnormally: {err}")),
        }
    }
    let n = pairs.len();
    let mismatches: Vec<&(String, String)> = pairs.iter().filter(|(s, e)| s != e).collect();
    let Some((status_id, encrypt_id)) = mismatches.first() else {
        return match errors.first() {
            None => Check::pass(
                AGREEMENT,
                format!(
                    "{n} of {n} Encrypts ({AGREEMENT_TASKS} tasks × {AGREEMENT_ROUNDS}) carried the key_id Status reported just before"
                ),
            ),
            Some(first) => Check::unknown(
                AGREEMENT,
                format!(
                    "{n} Encrypts agreed, but {} task(s) stopped early: {first}",
                    errors.len()
                ),
            ),
        };
    };
    let distinct: BTreeSet<&str> = pairs.iter().flat_map(|(s, e)| [s.as_str(), e.as_str()]).collect();
    let one_rotation = distinct.len() == 2
        && mismatches.len() <= AGREEMENT_TASKS
        && mismatches.iter().all(|m| (&m.0, &m.1) == (status_id, encrypt_id));
    if one_rotation {
        return Check::unknown(
            AGREEMENT,
            format!(
                "key_id changed once during the run ({} → {}); {} Encrypt(s) straddled it; rerun",
                quote(status_id),
                quote(encrypt_id),
                mismatches.len()
            ),
        );
    }
    Check::fail(
        AGREEMENT,
        format!(
            "{} of {n} Encrypts carried another key_id than the Status just before, e.g. Status {}, Encrypt {}",
            mismatches.len(),
            quote(status_id),
            quote(encrypt_id)
        ),
    )
}

/// `encrypt.key-id-size`, `encrypt.ciphertext-size`, `encrypt.annotations`, `encrypt.distinct`:
/// what the apiserver validates on every Encrypt answer (spec 2.1), over every answer of the run,
/// and that distinct plaintexts gave distinct answers (spec 8.2: the apiserver's cache keys on them).
pub(super) fn limits(encrypts: &[EncryptResponse]) -> Vec<Check> {
    const NAMES: [&str; 4] = [
        "encrypt.key-id-size",
        "encrypt.ciphertext-size",
        "encrypt.annotations",
        "encrypt.distinct",
    ];
    let n = encrypts.len();
    if n == 0 {
        return NAMES
            .into_iter()
            .map(|name| Check::unknown(name, "no Encrypt succeeded"))
            .collect();
    }
    let judge = |name: &'static str, violation: Option<String>, figures: String| match violation {
        Some(v) => Check::fail(name, format!("{v} (over {n} Encrypts)")),
        None => Check::pass(name, format!("{figures} over {n} Encrypts")),
    };
    let longest = |len: fn(&EncryptResponse) -> usize| encrypts.iter().map(len).max().unwrap_or(0);
    let key_id = judge(
        NAMES[0],
        encrypts
            .iter()
            .find_map(|e| validate_key_id(&e.key_id).err())
            .map(|v| v.to_string()),
        format!("longest {} B (limit {KEY_ID_MAX})", longest(|e| e.key_id.len())),
    );
    let ciphertext = judge(
        NAMES[1],
        encrypts
            .iter()
            .find_map(|e| validate_dek_source(&e.ciphertext).err())
            .map(|v| v.to_string()),
        format!(
            "longest {} B (limit {DEK_SOURCE_MAX})",
            longest(|e| e.ciphertext.len())
        ),
    );
    let keys: BTreeSet<&str> = encrypts
        .iter()
        .flat_map(|e| e.annotations.keys().map(String::as_str))
        .collect();
    let keys = if keys.is_empty() {
        "none".to_owned()
    } else {
        keys.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ")
    };
    let total = |e: &EncryptResponse| {
        e.annotations
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
    };
    let annotations = judge(
        NAMES[2],
        encrypts
            .iter()
            .find_map(|e| validate_annotations(&e.annotations).err())
            .map(|v| v.to_string()),
        format!(
            "keys {keys}; largest total {} B (limit {ANNOTATIONS_MAX})",
            encrypts.iter().map(total).max().unwrap_or(0)
        ),
    );
    let mut answers = HashSet::new();
    let duplicates = encrypts
        .iter()
        .filter(|e| !answers.insert((&e.ciphertext, &e.key_id, &e.annotations)))
        .count();
    let distinct = judge(
        NAMES[3],
        (duplicates > 0).then(|| {
            format!("{duplicates} answer(s) repeat an earlier one for another plaintext; the apiserver's cache would confuse their seeds")
        }),
        "every answer distinct".to_owned(),
    );
    vec![key_id, ciphertext, annotations, distinct]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::Verdict;

    #[test]
    fn repeated_encrypt_answers_fail_distinctness() {
        let answer = EncryptResponse {
            ciphertext: vec![1; 16],
            key_id: "k".into(),
            annotations: Default::default(),
        };
        let checks = limits(&[answer.clone(), answer]);
        let distinct = checks.iter().find(|c| c.name == "encrypt.distinct").unwrap();
        assert_eq!(distinct.verdict, Verdict::Fail, "{}", distinct.detail);
    }
}
