//! OpenBao answering just under kleidi's 1 s call timeout (0.9×: 450 ms each way), then just over it
//! (1.1×): under it every call still succeeds, slowly; over it calls fail with a clear status and
//! cached reads carry on; all heals when the latency goes.

use std::time::Duration;

use kleidi_harness::runtime::{Direction, Fault as Net};
use kleidi_harness::scenario::{BackendKind, Fault, Scenario, at};

/// The scenario.
pub fn scenario() -> Scenario {
    let latency = |ms| {
        Fault::Proxy(
            None,
            Net::Latency {
                delay: Duration::from_millis(ms),
                direction: Direction::Both,
            },
        )
    };
    Scenario {
        backends: vec![BackendKind::Vault],
        kleidi_flags: vec!["--call-timeout".into(), "1s".into()],
        timeline: vec![
            at(4.0, latency(450)),
            at(12.0, Fault::Proxy(None, Net::Pass)),
            at(14.0, latency(550)),
            at(20.0, Fault::Proxy(None, Net::Pass)),
        ],
        length: Duration::from_secs(26),
        ..Scenario::new(
            "backend_latency_near_call_timeout",
            "OpenBao at 0.9× then 1.1× of a 1 s call timeout (timing ÷10)",
        )
    }
}
