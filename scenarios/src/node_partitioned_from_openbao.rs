//! Node 1's plugin cut off the network for 30 s (`docker network disconnect`: OpenBao unreachable,
//! its socket still answers the apiserver) while nodes 0 and 2 keep serving. Node 1's apiserver
//! keeps writing on its cached seed until its write state expires — 3 min upstream, 18 s here — and
//! only then refuses writes; its cached reads never fail; after the heal it converges. Containers
//! only.

use std::time::Duration;

use kleidi_harness::runtime::RuntimeKind;
use kleidi_harness::scenario::history::{self, Event, Op, Outcome};
use kleidi_harness::scenario::{BackendKind, Check, Checker, Fault, Scenario, Timing, at};

const NODE: usize = 1;
const CUT_S: f64 = 4.0;
const HEAL_S: f64 = 34.0;

/// The scenario.
pub fn scenario() -> Scenario {
    let timing = Timing::compressed(10);
    Scenario {
        backends: vec![BackendKind::Vault],
        nodes: 3,
        timing,
        timeline: vec![
            at(CUT_S, Fault::Partition(NODE)),
            at(HEAL_S, Fault::HealPartition(NODE)),
        ],
        length: Duration::from_secs(42),
        extra: vec![std::sync::Arc::new(WritesStopOnlyAfterBudget {
            node: NODE,
            write_ttl_ms: u64::try_from(timing.write_ttl().as_millis()).unwrap_or(u64::MAX),
        })],
        runtimes: vec![RuntimeKind::Container],
        ..Scenario::new(
            "node_partitioned_from_openbao",
            "3 nodes; node 1's plugin off the network 30 s, the others serving (timing ÷10)",
        )
    }
}

/// The partitioned node's writes fail once its write budget is spent, and the other nodes' never:
/// the availability checker proves the budget is honoured; this proves it ends, and only there.
pub struct WritesStopOnlyAfterBudget {
    /// The partitioned node.
    pub node: usize,
    /// Its write budget (real ms after its last good probe).
    pub write_ttl_ms: u64,
}

impl Checker for WritesStopOnlyAfterBudget {
    fn name(&self) -> &'static str {
        "writes_stop_only_after_budget"
    }

    fn check(&self, events: &[Event]) -> Check {
        let mut check = Check::new(self.name());
        let window = events.iter().find_map(|e| match e {
            Event::Fault(f) if f.verb == "partition" => Some(f.at_ms),
            _ => None,
        });
        let heal = events.iter().find_map(|e| match e {
            Event::Fault(f) if f.verb == "heal_partition" => Some(f.at_ms),
            _ => None,
        });
        let (Some(cut), Some(heal)) = (window, heal) else {
            check.unknown("no partition and heal in the history");
            return check;
        };
        // Past the budget (counted from the cut, a probe's 3 s bound and a healthy probe interval
        // of 6 s on top) every write of the partitioned node must be refused.
        let refused_from = cut + self.write_ttl_ms + 3_000 + 6_000;
        let (mut late, mut late_failed, mut others_failed) = (0, 0, 0);
        for op in history::ops(events).filter(|op| op.op == Op::Write && !op.final_read) {
            let failed = matches!(op.outcome, Outcome::Fail { .. });
            if op.node == self.node && op.start_ms > refused_from && op.end_ms < heal {
                late += 1;
                if failed {
                    late_failed += 1;
                } else {
                    check.violation(
                        format!(
                            "write of {} on the partitioned node succeeded {} ms after the cut",
                            op.key,
                            op.start_ms - cut
                        ),
                        None,
                    );
                }
            }
            if op.node != self.node && failed && op.start_ms > cut && op.end_ms < heal {
                others_failed += 1;
                check.violation(format!("write of {} on node {} failed", op.key, op.node), None);
            }
        }
        check.figure("late_writes", late);
        check.figure("late_writes_refused", late_failed);
        check.figure("other_nodes_failed_writes", others_failed);
        if late == 0 {
            check.unknown("no write on the partitioned node after its budget ran out");
        }
        check
    }
}
