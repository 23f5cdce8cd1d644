//! OpenBao's Raft leader SIGKILLed under load: the two others elect a new leader and every kleidi,
//! listing all three addresses, moves on to whichever answers. Writes never stop (the apiserver
//! writes on its cached seed), cached reads never fail, and the killed node comes back sealed and
//! is unsealed into the cluster again. Containers only: a Raft leader exists there.

use std::time::Duration;

use kleidi_harness::runtime::RuntimeKind;
use kleidi_harness::scenario::{BackendKind, Fault, Scenario, at};

/// The scenario.
pub fn scenario() -> Scenario {
    Scenario {
        backends: vec![BackendKind::Vault],
        nodes: 3,
        timeline: vec![
            at(4.0, Fault::KillBackendLeader),
            at(14.0, Fault::StartBackendSealed),
            at(17.0, Fault::Unseal),
            at(18.0, Fault::RotateKey),
        ],
        length: Duration::from_secs(26),
        runtimes: vec![RuntimeKind::Container],
        ..Scenario::new(
            "openbao_leader_killed_under_load",
            "3 nodes; OpenBao's Raft leader killed, back sealed 10 s later, unsealed, then a rotation (timing ÷10)",
        )
    }
}
