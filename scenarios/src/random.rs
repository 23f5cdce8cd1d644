//! The randomized nemesis: three nodes under load for five minutes while faults drawn from the seed
//! come and go (plugin crashes and pauses, apiserver and etcd restarts, rotations, and the backend's
//! own: OpenBao killed, paused, sealed, its Raft leader killed, a node partitioned from it; the HSM
//! token or its store lost; an etcd member lost — each where the runtime can do it). Every fault is
//! healed before the next; `SCENARIO_SEED` replays the same schedule and the same randomness.

use std::time::Duration;

use kleidi_harness::runtime::RuntimeKind;
use kleidi_harness::scenario::{BackendKind, Scenario, nemesis};

/// The scenario for `backend` on `runtime`, its schedule drawn from `seed`, `length` long.
pub fn scenario(backend: BackendKind, runtime: RuntimeKind, seed: u64, length: Duration) -> Scenario {
    Scenario {
        nodes: 3,
        timeline: nemesis(seed, backend, runtime, 3, length),
        length: length + Duration::from_secs(3),
        ..Scenario::new("random", "randomized nemesis on 3 nodes (timing ÷10)")
    }
}
