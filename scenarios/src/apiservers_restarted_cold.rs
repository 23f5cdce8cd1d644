//! Every apiserver of three restarted cold five times under load, so etcd holds many distinct seeds;
//! then cold reads of everything: one Decrypt per distinct seed, never one per object. The clients
//! are kube-rs `Api<Secret>` against each node's Secrets API, which keeps serving across the
//! restarts: every request after one goes through the node's new envelope.

use std::time::Duration;

use kleidi_harness::scenario::{BackendKind, Fault, Scenario, Via, Workload, at};

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
        timeline: [2.0, 4.0, 6.0, 8.0, 10.0]
            .into_iter()
            .map(|t| at(t, Fault::RestartAllApiservers))
            .collect(),
        length: Duration::from_secs(14),
        count_cold_decrypts: true,
        workload: Workload {
            via: Via::SecretsApi,
            ..Workload::default()
        },
        ..Scenario::new(
            "apiservers_restarted_cold",
            "3 apiservers restarted cold 5 times (timing ÷10)",
        )
    }
}
