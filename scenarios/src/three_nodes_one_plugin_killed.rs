//! Three nodes on one backend, one node's plugin killed for 10 s: the other two never notice, the
//! killed node keeps serving cached reads and writes within its budget, and it converges after.

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
        nodes: 3,
        timeline: vec![at(4.0, Fault::KillPlugin(1)), at(14.0, Fault::StartPlugin(1))],
        length: Duration::from_secs(20),
        ..Scenario::new(
            "three_nodes_one_plugin_killed",
            "3 nodes, node 1's plugin killed 10 s (timing ÷10)",
        )
    }
}
