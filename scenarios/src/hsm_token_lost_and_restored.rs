//! The SoftHSM token lost twice under load: first its own directory (6 s), then the whole
//! `directories.tokendir` (10 s, the defect of issue 7). kleidi answers UNAVAILABLE meanwhile and
//! recovers each time by itself, without a restart.

use std::time::Duration;

use kleidi_harness::scenario::{BackendKind, Fault, Scenario, at};

/// The scenario.
pub fn scenario() -> Scenario {
    Scenario {
        backends: vec![BackendKind::Pkcs11],
        timeline: vec![
            at(4.0, Fault::LoseToken),
            at(10.0, Fault::RestoreToken),
            at(14.0, Fault::LoseTokenStore),
            at(24.0, Fault::RestoreToken),
        ],
        length: Duration::from_secs(30),
        ..Scenario::new(
            "hsm_token_lost_and_restored",
            "token dir lost 6 s, token store lost 10 s (timing ÷10)",
        )
    }
}
