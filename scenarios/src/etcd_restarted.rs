//! etcd killed and restarted on its data under load: writes in flight become unknown, never lost
//! once acknowledged, and the plugin does not care.

use std::time::Duration;

use kleidi_harness::scenario::{Fault, Scenario, at};

/// The scenario.
pub fn scenario() -> Scenario {
    Scenario {
        timeline: vec![at(6.0, Fault::RestartEtcd)],
        length: Duration::from_secs(14),
        ..Scenario::new("etcd_restarted", "etcd restarted under load (timing ÷10)")
    }
}
