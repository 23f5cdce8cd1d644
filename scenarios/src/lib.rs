//! kleidi's chaos scenarios, one page each: the cluster it needs, the workload, the faults on a
//! timeline, and (where the defaults do not fit) its own checkers. The machinery — cluster, workload,
//! fault verbs, history, checkers, runner — lives in `kleidi_harness::scenario`; nothing here starts a
//! process by itself. Run one with `kleidi-scenarios run NAME`, all with `just e2e`.

#![forbid(unsafe_code)]

use std::time::Duration;

use kleidi_harness::scenario::Scenario;

pub mod apiservers_restarted_cold;
pub mod aws_kms_unreachable;
pub mod backend_latency_near_call_timeout;
pub mod etcd_member_lost_under_load;
pub mod etcd_restarted;
pub mod hsm_token_lost_and_restored;
pub mod kek_deleted;
pub mod node_partitioned_from_openbao;
pub mod openbao_blackholed;
pub mod openbao_hung_30s;
pub mod openbao_leader_killed_during_cold_start;
pub mod openbao_leader_killed_under_load;
pub mod openbao_sealed_then_unsealed;
pub mod openbao_stopped_60s;
pub mod plugin_killed_under_load;
pub mod random;
pub mod rolling_restart_of_plugins;
pub mod rotation_under_load;
pub mod short_token_ttl;
pub mod three_nodes_one_plugin_killed;
pub mod token_revoked_then_replaced;
pub mod tpm_reset;

/// Every scripted scenario (the randomized one is built from its seed: [`random::scenario`]).
pub fn all() -> Vec<Scenario> {
    vec![
        rotation_under_load::scenario(),
        openbao_stopped_60s::scenario(),
        openbao_hung_30s::scenario(),
        openbao_blackholed::scenario(),
        openbao_sealed_then_unsealed::scenario(),
        token_revoked_then_replaced::scenario(),
        short_token_ttl::scenario(),
        hsm_token_lost_and_restored::scenario(),
        plugin_killed_under_load::scenario(),
        apiservers_restarted_cold::scenario(),
        etcd_restarted::scenario(),
        backend_latency_near_call_timeout::scenario(),
        three_nodes_one_plugin_killed::scenario(),
        kek_deleted::scenario(),
        tpm_reset::scenario(),
        openbao_leader_killed_under_load::scenario(),
        openbao_leader_killed_during_cold_start::scenario(),
        node_partitioned_from_openbao::scenario(),
        rolling_restart_of_plugins::scenario(),
        etcd_member_lost_under_load::scenario(),
        aws_kms_unreachable::scenario(),
    ]
}

/// The scripted scenario named `name`.
pub fn named(name: &str) -> Option<Scenario> {
    all().into_iter().find(|s| s.name == name)
}

/// Scenarios whose workload runs at most this long count as fast: they run in `just test`.
pub const FAST: Duration = Duration::from_secs(30);
