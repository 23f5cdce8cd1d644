//! One of three etcd members SIGKILLed under load for 10 s, then started again on its data: the
//! other two keep quorum, so the apiservers keep writing and reading through the cluster, nothing
//! acknowledged is lost, and no value lands in clear. Containers only: a member exists there.

use std::time::Duration;

use kleidi_harness::runtime::RuntimeKind;
use kleidi_harness::scenario::{BackendKind, Fault, Scenario, at};

/// The scenario.
pub fn scenario() -> Scenario {
    Scenario {
        backends: vec![BackendKind::Pkcs11, BackendKind::Vault],
        nodes: 3,
        timeline: vec![
            at(4.0, Fault::LoseEtcdMember(0)),
            at(14.0, Fault::RestoreEtcdMember(0)),
        ],
        length: Duration::from_secs(20),
        runtimes: vec![RuntimeKind::Container],
        ..Scenario::new(
            "etcd_member_lost_under_load",
            "3 nodes; etcd member 0 of 3 killed 10 s under load, then back on its data (timing ÷10)",
        )
    }
}
