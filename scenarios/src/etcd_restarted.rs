//! etcd killed and restarted on its data under load: writes in flight become unknown, never lost
//! once acknowledged, and the plugin does not care.

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
            BackendKind::Foreign,
        ],
        timeline: vec![at(6.0, Fault::RestartEtcd)],
        length: Duration::from_secs(14),
        ..Scenario::new("etcd_restarted", "etcd restarted under load (timing ÷10)")
    }
}
