//! (e) Availability as upstream promises it (../shared/spec/kms.md 2.3, 2.4): during a plugin or backend
//! outage, reads whose seed the node already holds never fail (they need no RPC), and writes keep
//! working until 3 minutes after the node's last good Status probe. Reported, not judged: the time from
//! each heal to the first acknowledged write after it. Outages are the [`Effect::Breaks`] …
//! [`Effect::Heals`] spans of the timeline ([`outage_windows`]). RPC records must include failed
//! attempts, since a read that sent a Decrypt is the one allowed to fail.

use serde::{Deserialize, Serialize};

use super::{Check, Checker};
use crate::scenario::history::{self, ALL, Effect, Event, Method, Op, OpRecord, Outcome};

/// An outage of one target on the timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// What was broken.
    pub target: String,
    /// The verb that broke it.
    pub verb: String,
    /// When it broke.
    pub from_ms: u64,
    /// When it healed; `None` if it never did.
    pub to_ms: Option<u64>,
}

impl Window {
    /// Whether an operation running from `start` to `end` overlaps the outage.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        end >= self.from_ms && self.to_ms.is_none_or(|to| start < to)
    }
}

/// The outages of a history: a [`Effect::Breaks`] step opens one on its target (unless one is open),
/// a [`Effect::Heals`] step closes the target's, and a heal of [`ALL`] closes every open one.
pub fn outage_windows(history: &[Event]) -> Vec<Window> {
    let mut windows: Vec<Window> = Vec::new();
    for fault in history::faults(history) {
        let open = |w: &&mut Window| w.to_ms.is_none() && (fault.target == ALL || w.target == fault.target);
        match fault.effect {
            Effect::Breaks if !windows.iter_mut().any(|w| open(&w)) => windows.push(Window {
                target: fault.target.clone(),
                verb: fault.verb.clone(),
                from_ms: fault.at_ms,
                to_ms: None,
            }),
            Effect::Heals => windows
                .iter_mut()
                .filter(open)
                .for_each(|w| w.to_ms = Some(fault.at_ms)),
            _ => {}
        }
    }
    windows
}

/// Checks reads and writes during outages, and measures recovery after each heal.
#[derive(Clone, Debug)]
pub struct Availability {
    /// How long writes may go on after the last good probe: 3 min upstream, less where a scenario
    /// compresses time.
    pub write_ttl_ms: u64,
    /// Targets whose outages are not the plugin's to survive (prefixes; `etcd` by default: with etcd
    /// down nothing is written).
    pub ignore_targets: Vec<String>,
}

impl Default for Availability {
    fn default() -> Self {
        Self {
            write_ttl_ms: 180_000,
            ignore_targets: vec!["etcd".to_owned()],
        }
    }
}

/// A probe's expiration is counted from before its Status RPC, which the apiserver bounds at 3 s.
const PROBE_MARGIN_MS: u64 = 3_000;

impl Checker for Availability {
    fn name(&self) -> &'static str {
        "availability"
    }

    fn check(&self, history: &[Event]) -> Check {
        let mut check = Check::new(self.name());
        let windows: Vec<Window> = outage_windows(history)
            .into_iter()
            .filter(|w| {
                !self
                    .ignore_targets
                    .iter()
                    .any(|t| w.target.starts_with(t.as_str()))
            })
            .collect();
        let (mut reads, mut writes, mut failed_reads, mut failed_writes, mut unknown_ops) = (0, 0, 0, 0, 0);
        for event in history {
            let Event::Op(op) = event else { continue };
            if op.final_read || !windows.iter().any(|w| w.overlaps(op.start_ms, op.end_ms)) {
                continue;
            }
            let error = match &op.outcome {
                Outcome::Ok => None,
                Outcome::Fail { error } => Some(error),
                Outcome::Unknown { .. } => {
                    unknown_ops += 1;
                    None
                }
            };
            match op.op {
                Op::Read => reads += 1,
                Op::Write => writes += 1,
                Op::Delete => continue,
            }
            let Some(error) = error else { continue };
            if op.op == Op::Read {
                failed_reads += 1;
                if held_seed(history, op) && !sent_decrypt(history, op) {
                    check.violation(
                        format!("read of {} on node {} failed during an outage without needing the plugin: {error}", op.key, op.node),
                        Some(event),
                    );
                }
            } else {
                failed_writes += 1;
                let good = last_good_probe(history, op.node, op.start_ms);
                if let Some(good) =
                    good.filter(|good| op.start_ms + PROBE_MARGIN_MS < good + self.write_ttl_ms)
                {
                    check.violation(
                        format!(
                            "write of {} on node {} failed {} ms after the last good probe (writes may go on for {} ms): {error}",
                            op.key,
                            op.node,
                            op.start_ms - good,
                            self.write_ttl_ms
                        ),
                        Some(event),
                    );
                }
            }
        }
        check.figure("outages", windows.len());
        check.figure("reads_during_outages", reads);
        check.figure("reads_failed_during_outages", failed_reads);
        check.figure("writes_during_outages", writes);
        check.figure("writes_failed_during_outages", failed_writes);
        check.figure("unknown_ops_during_outages", unknown_ops);
        recovery(&mut check, history, &windows);
        check
    }
}

/// Whether the node had read or written this key before (since its apiserver last restarted cold),
/// so its envelope cached the seed.
fn held_seed(history: &[Event], read: &OpRecord) -> bool {
    // Strictly after: an op in the restart's own millisecond may have used the old apiserver.
    let restarted = last_cold_restart(history, read.node, read.start_ms);
    history::ops(history).any(|op| {
        op.node == read.node
            && op.key == read.key
            && op.outcome.is_ok()
            && restarted.is_none_or(|at| op.start_ms > at)
            && op.end_ms <= read.start_ms
    })
}

/// When node `node`'s apiserver last restarted cold before `before`.
fn last_cold_restart(history: &[Event], node: usize, before: u64) -> Option<u64> {
    history::faults(history)
        .filter(|f| {
            f.verb == "restart_cold"
                && (f.target == "apiservers" || f.target == format!("apiserver-{node}"))
                && f.at_ms <= before
        })
        .map(|f| f.at_ms)
        .max()
}

/// Whether the node sent a Decrypt while the read ran (a cache miss, allowed to fail in an outage).
fn sent_decrypt(history: &[Event], read: &OpRecord) -> bool {
    history::rpcs(history).any(|rpc| {
        rpc.node == read.node
            && rpc.method == Method::Decrypt
            && (read.start_ms..=read.end_ms).contains(&rpc.at_ms)
    })
}

/// When the node's last healthy Status before `before` arrived; `None` when its apiserver was
/// restarted cold since (a new process has no write state until a probe succeeds).
fn last_good_probe(history: &[Event], node: usize, before: u64) -> Option<u64> {
    let good = history::statuses(history)
        .filter(|s| s.node == node && s.at_ms <= before && s.is_healthy())
        .map(|s| s.at_ms)
        .max()?;
    let restarted = last_cold_restart(history, node, before).is_some_and(|at| at >= good);
    (!restarted).then_some(good)
}

/// Time from each heal to the end of the first acknowledged write that started after it.
fn recovery(check: &mut Check, history: &[Event], windows: &[Window]) {
    let mut times = Vec::new();
    for window in windows {
        let Some(heal) = window.to_ms else {
            check.unknown(format!(
                "the outage of {} from {} ms never healed",
                window.target, window.from_ms
            ));
            continue;
        };
        let after: Vec<&OpRecord> = history::ops(history)
            .filter(|op| op.op == Op::Write && op.start_ms >= heal)
            .collect();
        match after
            .iter()
            .filter(|op| op.outcome.is_ok())
            .map(|op| op.end_ms)
            .min()
        {
            Some(end) => times.push(end - heal),
            None if after.is_empty() => check.unknown(format!(
                "no write was tried after {} healed at {heal} ms",
                window.target
            )),
            None => check.violation(
                format!(
                    "none of {} writes after {} healed at {heal} ms succeeded",
                    after.len(),
                    window.target
                ),
                None,
            ),
        }
    }
    if let Some(max) = times.iter().max() {
        check.figure("recovery_ms", *max);
    }
    check.figure("recovery_ms_by_outage", times);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::checker::Verdict;
    use crate::scenario::history::{FaultRecord, RpcRecord, StatusRecord, digest};

    fn fault(at_ms: u64, verb: &str, target: &str, effect: Effect) -> Event {
        Event::Fault(FaultRecord {
            at_ms,
            verb: verb.into(),
            target: target.into(),
            effect,
            detail: None,
        })
    }

    fn op(op: Op, key: &str, start_ms: u64, outcome: Outcome) -> Event {
        Event::Op(OpRecord {
            node: 0,
            op,
            key: key.into(),
            digest: Some(digest(key.as_bytes())),
            cache: None,
            final_read: false,
            start_ms,
            end_ms: start_ms + 10,
            outcome,
        })
    }

    fn fail() -> Outcome {
        Outcome::Fail {
            error: "rpc error: UNAVAILABLE".into(),
        }
    }

    fn good_status(at_ms: u64) -> Event {
        Event::Status(StatusRecord {
            node: 0,
            at_ms,
            key_id: "A".into(),
            healthz: "ok".into(),
        })
    }

    /// OpenBao paused from 10 s to 40 s; key `a` read and written before it.
    fn outage() -> Vec<Event> {
        vec![
            good_status(0),
            op(Op::Write, "a", 1_000, Outcome::Ok),
            fault(10_000, "pause", "openbao", Effect::Breaks),
            op(Op::Read, "a", 20_000, Outcome::Ok),
            op(Op::Write, "b", 21_000, Outcome::Ok),
            fault(40_000, "resume", "openbao", Effect::Heals),
            op(Op::Write, "c", 40_500, fail()),
            op(Op::Write, "c", 41_000, Outcome::Ok),
        ]
    }

    #[test]
    fn outage_windows_pair_breaks_with_heals_and_heal_all_closes_every_one() {
        let history = [
            fault(1, "pause", "openbao", Effect::Breaks),
            fault(2, "kill", "kleidi-0", Effect::Breaks),
            fault(3, "resume", "openbao", Effect::Heals),
            fault(4, "rotate", "openbao", Effect::Changes),
            fault(5, "heal", ALL, Effect::Heals),
            fault(6, "seal", "openbao", Effect::Breaks),
        ];
        let spans: Vec<_> = outage_windows(&history)
            .iter()
            .map(|w| (w.from_ms, w.to_ms))
            .collect();
        assert_eq!(spans, [(1, Some(3)), (2, Some(5)), (6, None)]);
    }

    #[test]
    fn cached_reads_and_writes_within_the_budget_during_an_outage_are_valid_with_recovery_time() {
        let check = Availability::default().check(&outage());
        assert_eq!(check.verdict, Verdict::Valid, "{check:?}");
        assert_eq!(check.figures["recovery_ms"], 1_010);
        assert_eq!(check.figures["reads_during_outages"], 1);
    }

    #[test]
    fn a_cached_read_that_fails_during_an_outage_is_invalid() {
        let mut history = outage();
        let read = op(Op::Read, "a", 25_000, fail());
        history.push(read.clone());
        let check = Availability::default().check(&history);
        assert_eq!(check.verdict, Verdict::Invalid);
        assert_eq!(check.violations[0].event, Some(read));
    }

    #[test]
    fn a_read_that_needed_a_decrypt_may_fail_during_an_outage() {
        let mut history = outage();
        history.push(op(Op::Read, "a", 25_000, fail()));
        history.push(Event::Rpc(RpcRecord {
            node: 0,
            method: Method::Decrypt,
            key_id: "A".into(),
            code: "UNAVAILABLE".into(),
            at_ms: 25_001,
            latency_ms: 2,
        }));
        assert_eq!(Availability::default().check(&history).verdict, Verdict::Valid);
    }

    #[test]
    fn a_write_failing_within_three_minutes_of_a_good_probe_is_invalid_and_after_them_allowed() {
        let mut early = outage();
        early.push(op(Op::Write, "d", 30_000, fail()));
        let check = Availability::default().check(&early);
        assert_eq!(check.verdict, Verdict::Invalid);
        assert!(
            check.violations[0]
                .what
                .contains("30000 ms after the last good probe"),
            "{check:?}"
        );

        let mut late = outage();
        late.push(op(Op::Write, "d", 30_000, fail()));
        let compressed = Availability {
            write_ttl_ms: 20_000,
            ..Availability::default()
        };
        assert_eq!(compressed.check(&late).verdict, Verdict::Valid);
    }

    #[test]
    fn writes_failing_while_etcd_is_down_are_not_the_plugins_fault() {
        let history = [
            good_status(0),
            fault(10, "stop", "etcd", Effect::Breaks),
            op(Op::Write, "a", 20, fail()),
            fault(30, "start", "etcd", Effect::Heals),
        ];
        assert_eq!(Availability::default().check(&history).verdict, Verdict::Valid);
    }

    #[test]
    fn no_good_write_after_a_heal_is_invalid_and_none_tried_or_no_heal_unknown() {
        let mut never = outage();
        never.truncate(6);
        never.push(op(Op::Write, "c", 40_500, fail()));
        assert_eq!(Availability::default().check(&never).verdict, Verdict::Invalid);

        let mut untried = outage();
        untried.truncate(6);
        assert_eq!(Availability::default().check(&untried).verdict, Verdict::Unknown);

        let mut unhealed = outage();
        unhealed.truncate(5);
        let check = Availability::default().check(&unhealed);
        assert_eq!(
            check.unknowns,
            ["the outage of openbao from 10000 ms never healed"]
        );
    }

    #[test]
    fn a_write_failing_on_a_cold_apiserver_is_no_violation_but_on_a_warm_one_is() {
        let status = Event::Status(StatusRecord {
            node: 0,
            at_ms: 1_000,
            key_id: "k".into(),
            healthz: "ok".into(),
        });
        let fault = |at_ms, verb: &str, target: &str, effect| {
            Event::Fault(FaultRecord {
                at_ms,
                verb: verb.into(),
                target: target.into(),
                effect,
                detail: None,
            })
        };
        let write = Event::Op(OpRecord {
            node: 0,
            op: Op::Write,
            key: "a".into(),
            digest: Some("d".into()),
            cache: None,
            final_read: false,
            start_ms: 6_000,
            end_ms: 6_001,
            outcome: Outcome::Fail {
                error: "no write state".into(),
            },
        });
        let broken = fault(5_000, "pause", "openbao", Effect::Breaks);
        let healed = fault(9_000, "resume", "openbao", Effect::Heals);
        let checker = Availability {
            write_ttl_ms: 18_000,
            ..Availability::default()
        };
        let warm = vec![status.clone(), broken.clone(), write.clone(), healed.clone()];
        assert_eq!(checker.check(&warm).verdict, Verdict::Invalid);
        let restart = fault(5_500, "restart_cold", "apiserver-0", Effect::Changes);
        let cold = vec![status, broken, restart, write, healed];
        assert!(checker.check(&cold).violations.is_empty());
    }
}
