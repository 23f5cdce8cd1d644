//! The TPM reset under load (swtpm SIGKILLed and started again on its state 4 s later: every loaded
//! object and session gone, as after a reboot of the TPM): kleidi answers UNAVAILABLE meanwhile,
//! reloads its context and keys by itself, and everything acknowledged reads back.

use std::time::Duration;

use kleidi_harness::scenario::{BackendKind, Fault, Scenario, at};

/// The scenario.
pub fn scenario() -> Scenario {
    Scenario {
        backends: vec![BackendKind::Tpm],
        timeline: vec![
            at(5.0, Fault::KillTpm),
            at(9.0, Fault::StartTpm),
            at(12.0, Fault::RotateKey),
        ],
        length: Duration::from_secs(18),
        ..Scenario::new(
            "tpm_reset",
            "TPM reset 4 s under load, then a rotation by `kleidi tpm init` (timing ÷10)",
        )
    }
}
