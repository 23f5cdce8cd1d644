//! AWS KMS out of reach twice under load: the route to it swallows every byte for 8 s (the fault
//! proxy), then the service itself hangs for 8 s (moto SIGSTOPped). Each outage is shorter than the
//! apiserver's write budget (3 min ÷10 = 18 s after the last good probe): no write may fail, no read
//! of a cached seed may fail, and the plugin serves again after each heal without a restart.

use std::time::Duration;

use kleidi_harness::runtime::{Fault as Net, RuntimeKind};
use kleidi_harness::scenario::{BackendKind, Fault, Scenario, at};

/// The scenario.
pub fn scenario() -> Scenario {
    Scenario {
        backends: vec![BackendKind::AwsKms],
        timeline: vec![
            at(3.0, Fault::Proxy(None, Net::Blackhole)),
            at(11.0, Fault::Proxy(None, Net::Pass)),
            at(14.0, Fault::PauseBackend),
            at(22.0, Fault::ResumeBackend),
        ],
        length: Duration::from_secs(28),
        // moto runs as a local process (no image of it).
        runtimes: vec![RuntimeKind::Process],
        ..Scenario::new(
            "aws_kms_unreachable",
            "AWS KMS blackholed 8 s, then hung 8 s, under load (timing ÷10)",
        )
    }
}
