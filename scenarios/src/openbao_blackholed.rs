//! The network to OpenBao swallows every byte for 15 s (the harness's fault proxy): the partition an
//! apiserver node sees when its route to Vault dies. Same promises as a hung OpenBao.

use std::time::Duration;

use kleidi_harness::runtime::Fault as Net;
use kleidi_harness::scenario::{BackendKind, Fault, Scenario, at};

/// The scenario.
pub fn scenario() -> Scenario {
    Scenario {
        backends: vec![BackendKind::Vault],
        timeline: vec![
            at(4.0, Fault::Proxy(None, Net::Blackhole)),
            at(19.0, Fault::Proxy(None, Net::Pass)),
        ],
        length: Duration::from_secs(25),
        ..Scenario::new(
            "openbao_blackholed",
            "OpenBao blackholed 15 s through the fault proxy (timing ÷10)",
        )
    }
}
