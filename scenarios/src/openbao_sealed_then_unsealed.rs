//! OpenBao sealed for 10 s, then unsealed: kleidi reports `sealed`, serves cached reads, and
//! recovers by itself once the seal lifts.

use std::time::Duration;

use kleidi_harness::scenario::{BackendKind, Fault, Scenario, at};

/// The scenario.
pub fn scenario() -> Scenario {
    Scenario {
        backends: vec![BackendKind::Vault],
        timeline: vec![at(4.0, Fault::Seal), at(14.0, Fault::Unseal)],
        length: Duration::from_secs(20),
        ..Scenario::new(
            "openbao_sealed_then_unsealed",
            "OpenBao sealed 10 s, then unsealed (timing ÷10)",
        )
    }
}
