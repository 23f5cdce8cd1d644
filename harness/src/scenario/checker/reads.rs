//! (b) Every acknowledged write reads back byte-exact in the final reads, through every node, warm and
//! cold. A key may hold any value that no acknowledged write has superseded: the last acknowledged
//! writes (several when they overlap in time) and any write whose outcome is unknown, which may have
//! landed at any moment after it started. Unknown writes are never counted as lost or as kept.

use std::collections::{BTreeMap, BTreeSet};

use super::{Check, Checker};
use crate::scenario::history::{Cache, Event, Op, OpRecord, Outcome};

/// Compares the final reads in the history with the writes before them, by digest.
#[derive(Clone, Copy, Debug, Default)]
pub struct AcknowledgedWritesReadBack;

/// The values a key may hold after the run.
#[derive(Default)]
struct Allowed<'a> {
    /// Digests that may be read (`None`: the key may be absent).
    values: BTreeSet<Option<&'a str>>,
    /// Digests of acknowledged writes that a later acknowledged write superseded.
    superseded: BTreeSet<Option<&'a str>>,
    acknowledged: bool,
}

impl Checker for AcknowledgedWritesReadBack {
    fn name(&self) -> &'static str {
        "acknowledged_writes_read_back"
    }

    fn check(&self, history: &[Event]) -> Check {
        let mut check = Check::new(self.name());
        let mut writes: BTreeMap<&str, Vec<&OpRecord>> = BTreeMap::new();
        let mut final_reads = Vec::new();
        for event in history {
            let Event::Op(op) = event else { continue };
            match op.op {
                Op::Read if op.final_read => final_reads.push((event, op)),
                Op::Read => {}
                Op::Write | Op::Delete => writes.entry(&op.key).or_default().push(op),
            }
        }
        let allowed: BTreeMap<&str, Allowed> = writes.iter().map(|(key, ops)| (*key, allowed(ops))).collect();
        count_writes(&mut check, &writes);

        let mut read_keys = BTreeSet::new();
        let mut paths: BTreeMap<String, usize> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        let (mut lost, mut stale) = (0, 0);
        for (event, read) in &final_reads {
            let cache = match read.cache {
                Some(Cache::Cold) => "cold",
                _ => "warm",
            };
            *paths.entry(format!("node{}_{cache}", read.node)).or_default() += 1;
            let empty = Allowed::default();
            let key = allowed.get(read.key.as_str()).unwrap_or(&empty);
            match &read.outcome {
                Outcome::Unknown { why } => {
                    check.unknown(format!(
                        "final read of {} on node {} timed out: {why}",
                        read.key, read.node
                    ));
                    continue;
                }
                Outcome::Fail { error } if key.acknowledged => {
                    lost += 1;
                    check.violation(
                        format!("final read of acknowledged {} failed: {error}", read.key),
                        Some(event),
                    );
                    continue;
                }
                Outcome::Fail { .. } => continue,
                Outcome::Ok => {}
            }
            read_keys.insert(read.key.as_str());
            let value = read.digest.as_deref();
            seen.insert((read.key.as_str(), value));
            if key.values.contains(&value) || (!key.acknowledged && key.values.is_empty() && value.is_none())
            {
                continue;
            }
            let what = if key.superseded.contains(&value) {
                stale += 1;
                "an older value that a later acknowledged write replaced"
            } else if value.is_none() {
                lost += 1;
                "nothing: the acknowledged write is lost"
            } else {
                "a value no write wrote"
            };
            check.violation(
                format!(
                    "final read of {} on node {} ({cache}) returned {what}",
                    read.key, read.node
                ),
                Some(event),
            );
        }

        let unread: Vec<&str> = allowed
            .iter()
            .filter(|(key, a)| a.acknowledged && !read_keys.contains(*key))
            .map(|(key, _)| *key)
            .collect();
        if let Some(first) = unread.first() {
            check.unknown(format!(
                "{} acknowledged keys never read back (first: {first})",
                unread.len()
            ));
        }
        let unknown_kept = writes
            .iter()
            .flat_map(|(key, ops)| ops.iter().map(move |op| (*key, op)))
            .filter(|(key, op)| {
                matches!(op.outcome, Outcome::Unknown { .. }) && seen.contains(&(*key, op.digest.as_deref()))
            })
            .count();
        check.figure("final_reads", final_reads.len());
        check.figure(
            "final_reads_by_path",
            serde_json::to_value(&paths).unwrap_or_default(),
        );
        check.figure("lost", lost);
        check.figure("stale", stale);
        check.figure("unknown_writes_seen", unknown_kept);
        check
    }
}

/// What the writes of one key (in any order) allow a final read to see.
fn allowed<'a>(ops: &[&'a OpRecord]) -> Allowed<'a> {
    let acked: Vec<&OpRecord> = ops.iter().copied().filter(|op| op.outcome.is_ok()).collect();
    let mut allowed = Allowed {
        acknowledged: acked.iter().any(|op| op.op == Op::Write),
        ..Allowed::default()
    };
    for op in &acked {
        // Superseded: another acknowledged write began after this one was acknowledged.
        let value = op.digest.as_deref();
        if acked.iter().any(|later| later.start_ms > op.end_ms) {
            allowed.superseded.insert(value);
        } else {
            allowed.values.insert(value);
        }
    }
    for op in ops {
        if let Outcome::Unknown { .. } = op.outcome {
            allowed.values.insert(op.digest.as_deref());
        }
    }
    if acked.is_empty() {
        allowed.values.insert(None);
    }
    // A value both superseded and allowed (written twice) is allowed.
    allowed.superseded.retain(|v| !allowed.values.contains(v));
    allowed
}

fn count_writes(check: &mut Check, writes: &BTreeMap<&str, Vec<&OpRecord>>) {
    let all = || writes.values().flatten();
    let count = |f: fn(&Outcome) -> bool| all().filter(|op| f(&op.outcome)).count();
    check.figure("keys", writes.len());
    check.figure("acknowledged_writes", count(Outcome::is_ok));
    check.figure("failed_writes", count(|o| matches!(o, Outcome::Fail { .. })));
    check.figure("unknown_writes", count(|o| matches!(o, Outcome::Unknown { .. })));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::checker::Verdict;
    use crate::scenario::history::digest;

    fn write(key: &str, value: &[u8], start_ms: u64, end_ms: u64, outcome: Outcome) -> Event {
        Event::Op(OpRecord {
            node: 0,
            op: Op::Write,
            key: key.into(),
            digest: Some(digest(value)),
            cache: None,
            final_read: false,
            start_ms,
            end_ms,
            outcome,
        })
    }

    fn final_read(node: usize, cache: Cache, key: &str, value: Option<&[u8]>) -> Event {
        Event::Op(OpRecord {
            node,
            op: Op::Read,
            key: key.into(),
            digest: value.map(digest),
            cache: Some(cache),
            final_read: true,
            start_ms: 1000,
            end_ms: 1001,
            outcome: Outcome::Ok,
        })
    }

    fn unknown() -> Outcome {
        Outcome::Unknown {
            why: "timed out".into(),
        }
    }

    fn check(history: &[Event]) -> Check {
        AcknowledgedWritesReadBack.check(history)
    }

    #[test]
    fn the_last_acknowledged_write_read_on_every_node_warm_and_cold_is_valid() {
        let mut history = vec![
            write("a", b"1", 0, 5, Outcome::Ok),
            write("a", b"2", 10, 15, Outcome::Ok),
        ];
        for node in 0..3 {
            history.push(final_read(node, Cache::Warm, "a", Some(b"2")));
            history.push(final_read(node, Cache::Cold, "a", Some(b"2")));
        }
        let check = check(&history);
        assert_eq!(check.verdict, Verdict::Valid, "{check:?}");
        assert_eq!(check.figures["final_reads_by_path"]["node2_cold"], 1);
        assert_eq!(check.figures["acknowledged_writes"], 2);
    }

    #[test]
    fn an_acknowledged_write_missing_on_one_cold_node_is_invalid_and_names_the_read() {
        let read = final_read(2, Cache::Cold, "a", None);
        let history = [
            write("a", b"1", 0, 5, Outcome::Ok),
            final_read(0, Cache::Warm, "a", Some(b"1")),
            read.clone(),
        ];
        let check = check(&history);
        assert_eq!(check.verdict, Verdict::Invalid);
        assert_eq!(check.figures["lost"], 1);
        assert_eq!(check.violations.len(), 1);
        assert_eq!(check.violations[0].event, Some(read));
        assert!(check.violations[0].what.contains("node 2 (cold)"), "{check:?}");
    }

    #[test]
    fn a_value_superseded_by_a_later_acknowledged_write_is_stale() {
        let history = [
            write("a", b"1", 0, 5, Outcome::Ok),
            write("a", b"2", 10, 15, Outcome::Ok),
            final_read(0, Cache::Warm, "a", Some(b"1")),
        ];
        let check = check(&history);
        assert_eq!(check.verdict, Verdict::Invalid);
        assert_eq!(check.figures["stale"], 1);
    }

    #[test]
    fn overlapping_acknowledged_writes_may_either_win() {
        for winner in [b"1", b"2"] {
            let history = [
                write("a", b"1", 0, 10, Outcome::Ok),
                write("a", b"2", 5, 15, Outcome::Ok),
                final_read(0, Cache::Warm, "a", Some(winner)),
            ];
            assert_eq!(check(&history).verdict, Verdict::Valid);
        }
    }

    #[test]
    fn an_unknown_write_may_be_kept_or_not_and_is_neither_lost_nor_kept() {
        let cases: [(&[u8], Option<&[u8]>); 2] = [(b"1", Some(b"2")), (b"3", None)];
        for (a, b) in cases {
            let history = [
                write("a", b"1", 0, 5, Outcome::Ok),
                write("a", b"3", 20, 3020, unknown()),
                write("b", b"2", 0, 3000, unknown()),
                final_read(0, Cache::Cold, "a", Some(a)),
                final_read(0, Cache::Cold, "b", b),
            ];
            let check = check(&history);
            assert_eq!(check.verdict, Verdict::Valid, "{a:?} {b:?}: {check:?}");
            assert_eq!(check.figures["lost"], 0);
        }
    }

    #[test]
    fn a_value_no_one_wrote_is_invalid() {
        let history = [
            write("a", b"1", 0, 5, unknown()),
            final_read(0, Cache::Warm, "a", Some(b"9")),
        ];
        assert_eq!(check(&history).verdict, Verdict::Invalid);
    }

    #[test]
    fn a_failed_final_read_of_an_acknowledged_write_is_invalid_and_a_timed_out_one_unknown() {
        let mut failed = final_read(0, Cache::Cold, "a", None);
        let mut timed_out = failed.clone();
        if let (Event::Op(f), Event::Op(t)) = (&mut failed, &mut timed_out) {
            f.outcome = Outcome::Fail {
                error: "UNAVAILABLE".into(),
            };
            t.outcome = unknown();
        }
        let acked = write("a", b"1", 0, 5, Outcome::Ok);
        assert_eq!(check(&[acked.clone(), failed]).verdict, Verdict::Invalid);
        assert_eq!(check(&[acked, timed_out]).verdict, Verdict::Unknown);
    }

    #[test]
    fn an_acknowledged_key_never_read_back_is_unknown() {
        let history = [
            write("a", b"1", 0, 5, Outcome::Ok),
            write("b", b"1", 0, 5, Outcome::Ok),
        ];
        let check = check(&[
            history[0].clone(),
            history[1].clone(),
            final_read(0, Cache::Warm, "a", Some(b"1")),
        ]);
        assert_eq!(check.verdict, Verdict::Unknown);
        assert_eq!(check.unknowns, ["1 acknowledged keys never read back (first: b)"]);
    }
}
