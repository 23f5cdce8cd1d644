//! Node 1's plugin cut off the network for 30 s (`docker network disconnect`: OpenBao unreachable,
//! its socket still answers the apiserver) while nodes 0 and 2 keep serving. Node 1's Status says
//! unhealthy within seconds, but its apiserver keeps writing on its cached seed past the 3-minute
//! budget (18 s here: see [`NoWriteFailsDuringThePartition`] for why), its cached reads never fail,
//! and after the heal it converges. Containers only.

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
        extra: vec![std::sync::Arc::new(NoWriteFailsDuringThePartition {
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

/// No write fails on any node while node 1 is cut off — past its 3-minute budget too. Upstream's
/// probe (`rotateDEKOnKeyIDChange`) moves the write state's expiry on every Status answer that
/// carries the same key_id, healthy or not, and kleidi's Status keeps answering with its key_id
/// (healthz names the outage): the apiserver writes on its cached seed, which needs no plugin. The
/// budget only runs out when Status itself fails (`plugin_killed_under_load`, `openbao_hung_30s`).
pub struct NoWriteFailsDuringThePartition {
    /// The partitioned node.
    pub node: usize,
    /// Its write budget (real ms after its last good probe).
    pub write_ttl_ms: u64,
}

impl Checker for NoWriteFailsDuringThePartition {
    fn name(&self) -> &'static str {
        "no_write_fails_during_the_partition"
    }

    fn check(&self, events: &[Event]) -> Check {
        let mut check = Check::new(self.name());
        let at = |verb: &str| {
            events.iter().find_map(|e| match e {
                Event::Fault(f) if f.verb == verb => Some(f.at_ms),
                _ => None,
            })
        };
        let (Some(cut), Some(heal)) = (at("partition"), at("heal_partition")) else {
            check.unknown("no partition and heal in the history");
            return check;
        };
        let (mut writes, mut past_budget) = (0, 0);
        for op in history::ops(events).filter(|op| op.op == Op::Write && !op.final_read) {
            if op.start_ms < cut || op.end_ms > heal {
                continue;
            }
            writes += 1;
            if op.node == self.node && op.start_ms > cut + self.write_ttl_ms {
                past_budget += 1;
            }
            if let Outcome::Fail { error } = &op.outcome {
                let what = format!(
                    "write of {} on node {} failed during the partition: {error}",
                    op.key, op.node
                );
                check.violation(what, None);
            }
        }
        check.figure("writes_during_partition", writes);
        check.figure("partitioned_node_writes_past_its_budget", past_budget);
        if past_budget == 0 {
            check.unknown("the partitioned node wrote nothing past its budget");
        }
        check
    }
}
