//! OpenBao frozen (SIGSTOP) for 30 s: every call to it hangs until kleidi's call timeout. Reads from
//! cached seeds never notice; writes ride the cached seed for 18 s (÷10), then fail; all recovers
//! after SIGCONT.

use std::time::Duration;

use kleidi_harness::scenario::{BackendKind, Fault, Scenario, at};

/// The scenario.
pub fn scenario() -> Scenario {
    Scenario {
        backends: vec![BackendKind::Vault],
        timeline: vec![at(4.0, Fault::PauseBackend), at(34.0, Fault::ResumeBackend)],
        length: Duration::from_secs(40),
        ..Scenario::new("openbao_hung_30s", "OpenBao paused 30 s under load (timing ÷10)")
    }
}
