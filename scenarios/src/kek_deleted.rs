//! The KEK deleted from OpenBao under load: what the apiserver would do, recorded. The plugin must
//! say so (Status unhealthy, every Encrypt and cold Decrypt refused with a clear status, never a
//! wrong plaintext); warm apiservers keep reading from cached seeds, which hides the loss until their
//! next restart — the hazard upstream tracks as kubernetes/kubernetes#138950. Read-back and
//! availability are left out: losing every value is the expected outcome, reported in figures.

use std::sync::Arc;
use std::time::Duration;

use kleidi_harness::scenario::checker::{Check, Checker};
use kleidi_harness::scenario::history::{self, Cache, Event, Outcome};
use kleidi_harness::scenario::{BackendKind, Fault, Scenario, at};

/// The scenario.
pub fn scenario() -> Scenario {
    Scenario {
        backends: vec![BackendKind::Vault],
        timeline: vec![at(6.0, Fault::DeleteKey)],
        length: Duration::from_secs(16),
        omit: vec![
            (
                "acknowledged_writes_read_back",
                "the KEK is gone: cold reads must fail",
            ),
            (
                "availability",
                "the outage is never healed: the key does not come back",
            ),
        ],
        extra: vec![Arc::new(KekLossIsReported)],
        ..Scenario::new(
            "kek_deleted",
            "KEK deleted under load: reported, never garbage (timing ÷10)",
        )
    }
}

/// After the deletion every node's Status turns unhealthy, and no cold read decrypts anything.
pub struct KekLossIsReported;

impl Checker for KekLossIsReported {
    fn name(&self) -> &'static str {
        "kek_loss_is_reported"
    }

    fn check(&self, events: &[Event]) -> Check {
        let mut check = Check::new(self.name());
        let Some(deleted) = history::faults(events).find(|f| f.verb == "delete_key") else {
            check.unknown("the KEK was never deleted");
            return check;
        };
        let nodes: std::collections::BTreeSet<usize> = history::statuses(events).map(|s| s.node).collect();
        for node in nodes {
            let reported = history::statuses(events)
                .find(|s| s.node == node && s.at_ms >= deleted.at_ms && !s.is_healthy())
                .map(|s| s.at_ms - deleted.at_ms);
            match reported {
                Some(ms) => check.figure(&format!("node_{node}_reported_after_ms"), ms),
                None => check.violation(
                    format!("node {node}'s Status never reported the deleted KEK"),
                    None,
                ),
            }
        }
        let (mut warm_ok, mut cold_failed) = (0, 0);
        for event in events {
            let Event::Op(op) = event else { continue };
            if !op.final_read || op.digest.is_none() && op.outcome == Outcome::Ok {
                continue;
            }
            match (op.cache, &op.outcome) {
                (Some(Cache::Warm), Outcome::Ok) => warm_ok += 1,
                (Some(Cache::Cold), Outcome::Ok) => check.violation(
                    format!("{} decrypted cold after the KEK was deleted", op.key),
                    Some(event),
                ),
                (Some(Cache::Cold), _) => cold_failed += 1,
                _ => {}
            }
        }
        // The hazard in numbers: what a warm apiserver still serves, and what a restart loses.
        check.figure("warm_final_reads_ok", warm_ok);
        check.figure("cold_final_reads_failed", cold_failed);
        check
    }
}

#[cfg(test)]
mod tests {
    use kleidi_harness::scenario::Verdict;
    use kleidi_harness::scenario::history::{FaultRecord, OpRecord, Outcome, StatusRecord};

    use super::*;

    fn history(status_after: &str, cold_read: Outcome) -> Vec<Event> {
        vec![
            Event::Fault(FaultRecord {
                at_ms: 1_000,
                verb: "delete_key".into(),
                target: "kek".into(),
                effect: Effect::Breaks,
                detail: None,
            }),
            Event::Status(StatusRecord {
                node: 0,
                at_ms: 2_000,
                key_id: "k".into(),
                healthz: status_after.into(),
            }),
            Event::Op(OpRecord {
                node: 0,
                op: history::Op::Read,
                key: "a".into(),
                digest: matches!(cold_read, Outcome::Ok).then(|| "d".into()),
                cache: Some(Cache::Cold),
                final_read: true,
                start_ms: 3_000,
                end_ms: 3_001,
                outcome: cold_read,
            }),
        ]
    }

    use kleidi_harness::scenario::history::Effect;

    #[test]
    fn a_reported_loss_with_failing_cold_reads_is_valid() {
        let failed = Outcome::Fail {
            error: "key missing".into(),
        };
        assert_eq!(
            KekLossIsReported.check(&history("key missing", failed)).verdict,
            Verdict::Valid
        );
    }

    #[test]
    fn a_status_that_stays_ok_or_a_cold_read_that_decrypts_is_invalid() {
        let failed = Outcome::Fail {
            error: "key missing".into(),
        };
        assert_eq!(
            KekLossIsReported.check(&history("ok", failed)).verdict,
            Verdict::Invalid
        );
        assert_eq!(
            KekLossIsReported
                .check(&history("key missing", Outcome::Ok))
                .verdict,
            Verdict::Invalid
        );
    }
}
