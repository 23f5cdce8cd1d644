//! The KEK rotated under load on three nodes: every node converges on the new key_id, Encrypt never
//! disagrees with Status, and everything written under the old key still reads, warm and cold.
//! pkcs11 rotates the operator's way: a new key label and a rolling restart of the plugins. tpm (a
//! swtpm per node) makes a new shareable KEK on node 0 and enrols it on the other two before any node
//! switches to it. aws-kms rotates the key's material on demand; kleidi's key_id counts rotations.

use std::time::Duration;

use kleidi_harness::scenario::{BackendKind, Fault, Scenario, at};

/// The scenario.
pub fn scenario() -> Scenario {
    Scenario {
        backends: vec![
            BackendKind::Pkcs11,
            BackendKind::Vault,
            BackendKind::Tpm,
            BackendKind::AwsKms,
        ],
        nodes: 3,
        timeline: vec![at(6.0, Fault::RotateKey)],
        length: Duration::from_secs(16),
        ..Scenario::new(
            "rotation_under_load",
            "KEK rotated under load on 3 nodes (timing ÷10)",
        )
    }
}
