//! key_id checkers. (c) After the last [`ROTATE`] step every node's last Status reports the new key_id
//! and every value written before the rotation still reads. (d) Every successful Encrypt answered the
//! key_id that Status last reported to the same node (the apiserver refuses the seed otherwise), and no
//! node saw a key_id come back after another (A→B→A: upstream forbids reuse).

use std::collections::{BTreeMap, BTreeSet};

use super::{Check, Checker};
use crate::scenario::history::{self, Event, Method, Op, Outcome, ROTATE, StatusRecord};

/// (c) Checks that the nodes converge on the rotated key_id and that old values still read.
#[derive(Clone, Copy, Debug, Default)]
pub struct KeyIdConvergesAfterRotation;

impl Checker for KeyIdConvergesAfterRotation {
    fn name(&self) -> &'static str {
        "key_id_converges_after_rotation"
    }

    fn check(&self, history: &[Event]) -> Check {
        let mut check = Check::new(self.name());
        let Some(rotation) = history::faults(history).filter(|f| f.verb == ROTATE).last() else {
            check.unknown("no rotation in the history");
            return check;
        };
        let Some(new_key_id) = rotation.detail.as_deref() else {
            check.unknown(format!(
                "the rotation at {} ms does not name its new key_id",
                rotation.at_ms
            ));
            return check;
        };
        let at = rotation.at_ms;
        check.figure("rotation_at_ms", at);
        check.figure("new_key_id", new_key_id);

        let nodes: BTreeSet<usize> = history
            .iter()
            .filter_map(|e| match e {
                Event::Status(s) => Some(s.node),
                Event::Op(op) => Some(op.node),
                _ => None,
            })
            .collect();
        let mut slowest = None;
        let mut converged = 0;
        for node in &nodes {
            let after = || {
                history
                    .iter()
                    .filter(|e| matches!(e, Event::Status(s) if s.node == *node && s.at_ms >= at))
            };
            let Some(last @ Event::Status(status)) = after().next_back() else {
                check.unknown(format!("node {node} reported no Status after the rotation"));
                continue;
            };
            if status.key_id != new_key_id {
                check.violation(
                    format!(
                        "node {node} still reports key_id {} after rotating to {new_key_id}",
                        status.key_id
                    ),
                    Some(last),
                );
                continue;
            }
            converged += 1;
            let first = after().find_map(|e| match e {
                Event::Status(s) if s.key_id == new_key_id => Some(s.at_ms - at),
                _ => None,
            });
            slowest = slowest.max(first);
        }
        check.figure("nodes", nodes.len());
        check.figure("nodes_converged", converged);
        if let Some(ms) = slowest {
            check.figure("convergence_ms", ms);
        }
        old_values_read(&mut check, history, at);
        check
    }
}

/// Keys whose acknowledged writes all ended before the rotation must read in every final read.
fn old_values_read(check: &mut Check, history: &[Event], at: u64) {
    let mut old: BTreeMap<&str, bool> = BTreeMap::new();
    for op in history::ops(history) {
        if op.op == Op::Write && !op.final_read && op.outcome.is_ok() {
            let before = old.entry(&op.key).or_insert(true);
            *before &= op.end_ms < at;
        }
    }
    old.retain(|_, before| *before);
    let mut read = BTreeSet::new();
    for event in history {
        let Event::Op(op) = event else { continue };
        if op.op != Op::Read || !op.final_read || !old.contains_key(op.key.as_str()) {
            continue;
        }
        match &op.outcome {
            Outcome::Ok if op.digest.is_some() => {
                read.insert(op.key.as_str());
            }
            Outcome::Ok => check.violation(
                format!("{} written before the rotation is gone", op.key),
                Some(event),
            ),
            Outcome::Fail { error } => check.violation(
                format!("{} written before the rotation no longer reads: {error}", op.key),
                Some(event),
            ),
            Outcome::Unknown { why } => check.unknown(format!("final read of {} timed out: {why}", op.key)),
        }
    }
    check.figure("old_keys", old.len());
    check.figure("old_keys_read", read.len());
    if old.is_empty() {
        check.unknown("no value was written before the rotation, so none was read after it");
    } else if read.len() < old.len() && check.violations.is_empty() {
        check.unknown(format!(
            "{} keys written before the rotation were never read back",
            old.len() - read.len()
        ));
    }
}

/// (d) Checks every Encrypt against the Status before it on the same node, and key_id reuse.
#[derive(Clone, Copy, Debug, Default)]
pub struct EncryptKeyIdMatchesStatus;

impl Checker for EncryptKeyIdMatchesStatus {
    fn name(&self) -> &'static str {
        "encrypt_key_id_matches_status"
    }

    fn check(&self, history: &[Event]) -> Check {
        let mut check = Check::new(self.name());
        // Stable sort: records of the same millisecond keep their recorded order.
        let mut timeline: Vec<&Event> = history
            .iter()
            .filter(|e| matches!(e, Event::Status(_) | Event::Rpc(_)))
            .collect();
        timeline.sort_by_key(|e| e.at_ms());
        let mut last_status: BTreeMap<usize, &StatusRecord> = BTreeMap::new();
        let mut seen: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
        let (mut checked, mut unmatched, mut flip_flops) = (0, 0, 0);
        for event in timeline {
            match event {
                Event::Status(status) if !status.key_id.is_empty() => {
                    last_status.insert(status.node, status);
                    let ids = seen.entry(status.node).or_default();
                    if ids.last() == Some(&status.key_id.as_str()) {
                        continue;
                    }
                    if ids.contains(&status.key_id.as_str()) {
                        flip_flops += 1;
                        let path = [ids.as_slice(), &[status.key_id.as_str()]].concat().join(" → ");
                        check.violation(
                            format!("node {} saw key_id flip-flop: {path}", status.node),
                            Some(event),
                        );
                    }
                    ids.push(&status.key_id);
                }
                Event::Rpc(rpc) if rpc.method == Method::Encrypt && rpc.code == "OK" => {
                    checked += 1;
                    match last_status.get(&rpc.node) {
                        None => unmatched += 1,
                        Some(status) if status.key_id != rpc.key_id => check.violation(
                            format!(
                                "node {}: Encrypt answered key_id {} but Status last reported {}",
                                rpc.node, rpc.key_id, status.key_id
                            ),
                            Some(event),
                        ),
                        Some(_) => {}
                    }
                }
                _ => {}
            }
        }
        if unmatched > 0 {
            check.unknown(format!(
                "{unmatched} Encrypts came before any Status on their node"
            ));
        }
        if checked == 0 {
            check.unknown("no successful Encrypt to check");
        }
        check.figure("encrypts_checked", checked);
        check.figure("encrypts_without_status", unmatched);
        check.figure("flip_flops", flip_flops);
        check.figure(
            "key_ids_seen",
            seen.values().flatten().collect::<BTreeSet<_>>().len(),
        );
        check
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::checker::Verdict;
    use crate::scenario::history::{Effect, FaultRecord, OpRecord, RpcRecord, digest};

    fn status(node: usize, at_ms: u64, key_id: &str) -> Event {
        Event::Status(StatusRecord {
            node,
            at_ms,
            key_id: key_id.into(),
            healthz: "ok".into(),
        })
    }

    fn encrypt(node: usize, at_ms: u64, key_id: &str) -> Event {
        Event::Rpc(RpcRecord {
            node,
            method: Method::Encrypt,
            key_id: key_id.into(),
            code: "OK".into(),
            at_ms,
            latency_ms: 3,
        })
    }

    fn rotate(at_ms: u64, new_key_id: &str) -> Event {
        Event::Fault(FaultRecord {
            at_ms,
            verb: ROTATE.into(),
            target: "openbao".into(),
            effect: Effect::Changes,
            detail: Some(new_key_id.into()),
        })
    }

    fn op(key: &str, at_ms: u64, final_read: bool, outcome: Outcome) -> Event {
        Event::Op(OpRecord {
            node: 0,
            op: if final_read { Op::Read } else { Op::Write },
            key: key.into(),
            digest: Some(digest(key.as_bytes())),
            cache: None,
            final_read,
            start_ms: at_ms,
            end_ms: at_ms + 2,
            outcome,
        })
    }

    fn rotation_run(node1_after: &str) -> Vec<Event> {
        vec![
            status(0, 0, "A"),
            status(1, 0, "A"),
            op("old", 5, false, Outcome::Ok),
            rotate(100, "B"),
            status(0, 150, "B"),
            status(1, 160, "A"),
            status(1, 400, node1_after),
            op("new", 500, false, Outcome::Ok),
            op("old", 900, true, Outcome::Ok),
        ]
    }

    #[test]
    fn every_node_on_the_new_key_id_with_old_values_readable_is_valid() {
        let check = KeyIdConvergesAfterRotation.check(&rotation_run("B"));
        assert_eq!(check.verdict, Verdict::Valid, "{check:?}");
        assert_eq!(check.figures["convergence_ms"], 300);
        assert_eq!(check.figures["old_keys_read"], 1);
    }

    #[test]
    fn a_node_left_on_the_old_key_id_is_invalid() {
        let check = KeyIdConvergesAfterRotation.check(&rotation_run("A"));
        assert_eq!(check.verdict, Verdict::Invalid);
        assert_eq!(check.violations[0].event, Some(status(1, 400, "A")));
    }

    #[test]
    fn an_old_value_that_no_longer_reads_after_rotation_is_invalid() {
        let mut history = rotation_run("B");
        history.push(op(
            "old",
            901,
            true,
            Outcome::Fail {
                error: "INVALID_ARGUMENT: unknown key_id".into(),
            },
        ));
        let check = KeyIdConvergesAfterRotation.check(&history);
        assert_eq!(check.verdict, Verdict::Invalid);
        assert!(check.violations[0].what.contains("no longer reads"), "{check:?}");
    }

    #[test]
    fn no_rotation_or_a_silent_node_is_unknown() {
        let check = KeyIdConvergesAfterRotation.check(&[status(0, 0, "A")]);
        assert_eq!(check.verdict, Verdict::Unknown);
        let mut history = rotation_run("B");
        history.push(status(2, 10, "A"));
        let check = KeyIdConvergesAfterRotation.check(&history);
        assert_eq!(check.unknowns, ["node 2 reported no Status after the rotation"]);
    }

    #[test]
    fn encrypts_matching_the_last_status_of_their_node_are_valid() {
        let history = [
            status(0, 0, "A"),
            encrypt(0, 1, "A"),
            status(1, 2, "A"),
            status(0, 50, "B"),
            encrypt(0, 50, "B"),
            encrypt(1, 51, "A"),
        ];
        let check = EncryptKeyIdMatchesStatus.check(&history);
        assert_eq!(check.verdict, Verdict::Valid, "{check:?}");
        assert_eq!(check.figures["encrypts_checked"], 3);
    }

    #[test]
    fn an_encrypt_key_id_that_differs_from_status_is_invalid_and_named() {
        let history = [status(0, 0, "A"), encrypt(0, 1, "B")];
        let check = EncryptKeyIdMatchesStatus.check(&history);
        assert_eq!(check.verdict, Verdict::Invalid);
        assert_eq!(check.violations[0].event, Some(encrypt(0, 1, "B")));
    }

    #[test]
    fn a_key_id_that_comes_back_is_a_flip_flop() {
        let history = [
            status(0, 0, "A"),
            encrypt(0, 1, "A"),
            status(0, 60, "B"),
            status(0, 61, "B"),
            status(0, 120, "A"),
        ];
        let check = EncryptKeyIdMatchesStatus.check(&history);
        assert_eq!(check.verdict, Verdict::Invalid);
        assert_eq!(check.figures["flip_flops"], 1);
        assert_eq!(check.violations[0].what, "node 0 saw key_id flip-flop: A → B → A");
    }

    #[test]
    fn an_encrypt_before_any_status_is_unknown() {
        let check = EncryptKeyIdMatchesStatus.check(&[encrypt(0, 1, "A"), status(0, 2, "A")]);
        assert_eq!(check.verdict, Verdict::Unknown);
    }
}
