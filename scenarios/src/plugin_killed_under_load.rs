//! The plugin SIGKILLed under load and started again 4 s later: its stale socket is replaced, the
//! apiserver's reads of cached seeds never fail, and everything acknowledged reads back.

use std::time::Duration;

use kleidi_harness::scenario::{BackendKind, Fault, Scenario, at};

/// The scenario.
pub fn scenario() -> Scenario {
    Scenario {
        // No fault here needs the backend: it runs against any plugin too (`--plugin-command`).
        backends: vec![
            BackendKind::Pkcs11,
            BackendKind::Vault,
            BackendKind::Tpm,
            BackendKind::AwsKms,
            BackendKind::Foreign,
        ],
        timeline: vec![at(5.0, Fault::KillPlugin(0)), at(9.0, Fault::StartPlugin(0))],
        length: Duration::from_secs(16),
        ..Scenario::new(
            "plugin_killed_under_load",
            "plugin SIGKILLed 4 s under load (timing ÷10)",
        )
    }
}
