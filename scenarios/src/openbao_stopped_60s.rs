//! OpenBao stopped for 60 s under load. Cached seeds keep every read working; writes keep working on
//! the cached seed until the (÷10) 3-minute budget of failed probes runs out, 18 s in, then fail;
//! after OpenBao is back and unsealed, writes resume and everything acknowledged reads back.

use std::time::Duration;

use kleidi_harness::scenario::{BackendKind, Fault, Scenario, at};

/// The scenario.
pub fn scenario() -> Scenario {
    Scenario {
        backends: vec![BackendKind::Vault],
        timeline: vec![at(4.0, Fault::StopBackend), at(64.0, Fault::StartBackend)],
        length: Duration::from_secs(70),
        ..Scenario::new(
            "openbao_stopped_60s",
            "OpenBao stopped 60 s under load (timing ÷10: writes budget 18 s)",
        )
    }
}
