//! A rolling restart of all three nodes' plugins under load, as an upgrade does it: each is stopped
//! (SIGTERM: `docker stop` on the container runtime) and started again before the next one goes.
//! No read fails — each node's apiserver reads on its cached seeds, and a node whose plugin is down
//! for 2 s needs it for nothing it had already read — and every node converges after.

use std::time::Duration;

use kleidi_harness::scenario::history::{self, Event, Op, Outcome};
use kleidi_harness::scenario::{BackendKind, Check, Checker, Fault, Scenario, at};

/// The scenario.
pub fn scenario() -> Scenario {
    let mut timeline = Vec::new();
    for n in 0..3 {
        let t = 4.0 + 5.0 * n as f64;
        timeline.push(at(t, Fault::StopPlugin(n)));
        timeline.push(at(t + 2.0, Fault::StartPlugin(n)));
    }
    Scenario {
        backends: vec![BackendKind::Pkcs11, BackendKind::Vault],
        nodes: 3,
        timeline,
        length: Duration::from_secs(24),
        extra: vec![std::sync::Arc::new(NoFailedRead)],
        ..Scenario::new(
            "rolling_restart_of_plugins",
            "3 nodes, each plugin stopped 2 s and started in turn under load (timing ÷10)",
        )
    }
}

/// No read failed at all: a rolling restart is routine, not an outage.
pub struct NoFailedRead;

impl Checker for NoFailedRead {
    fn name(&self) -> &'static str {
        "no_failed_read"
    }

    fn check(&self, events: &[Event]) -> Check {
        let mut check = Check::new(self.name());
        let mut reads = 0;
        for op in history::ops(events).filter(|op| op.op == Op::Read) {
            reads += 1;
            if let Outcome::Fail { error } = &op.outcome {
                let what = format!("read of {} on node {} failed: {error}", op.key, op.node);
                check.violation(what, events.iter().find(|e| matches!(e, Event::Op(o) if o == op)));
            }
        }
        check.figure("reads", reads);
        if reads == 0 {
            check.unknown("no reads");
        }
        check
    }
}
