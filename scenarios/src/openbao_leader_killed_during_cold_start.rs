//! Every apiserver restarted cold at the moment OpenBao's Raft leader is SIGKILLed: the decrypt
//! storm of the cold caches (one Decrypt per distinct seed) crosses the leader election. Reads that
//! need a Decrypt may fail only while no leader answers; once one does, every key reads back, and the
//! cold final reads still decrypt once per seed. Containers only.

use std::time::Duration;

use kleidi_harness::runtime::RuntimeKind;
use kleidi_harness::scenario::{BackendKind, Fault, Scenario, at};

/// The scenario.
pub fn scenario() -> Scenario {
    Scenario {
        backends: vec![BackendKind::Vault],
        nodes: 3,
        timeline: vec![
            at(6.0, Fault::RestartAllApiservers),
            at(6.0, Fault::KillBackendLeader),
            at(16.0, Fault::StartBackendSealed),
            at(18.0, Fault::Unseal),
        ],
        length: Duration::from_secs(24),
        count_cold_decrypts: true,
        runtimes: vec![RuntimeKind::Container],
        ..Scenario::new(
            "openbao_leader_killed_during_cold_start",
            "3 cold apiservers while OpenBao's Raft leader is killed (timing ÷10)",
        )
    }
}
