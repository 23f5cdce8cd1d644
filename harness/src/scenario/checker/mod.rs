//! Checkers read a finished run — its [`history`](super::history) plus explicit inputs such as a raw
//! etcd snapshot or the process logs — and each returns a [`Check`]: a three-valued [`Verdict`]
//! (jepsen's valid / invalid / unknown), the figures behind it, and the offending events when invalid.
//! [`Report::run`] composes them; a checker that panics counts as unknown, never as valid. Nothing
//! here talks to a process: [`etcd`] (no plaintext in etcd), [`reads`] (acknowledged writes read
//! back), [`key_id`] (rotation converges; Encrypt agrees with Status), [`availability`] (outages, the
//! 3-minute write budget, recovery time), [`process`] (plugin exits, secrets in logs).

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};

use serde::{Deserialize, Serialize};

use super::history::Event;

pub mod availability;
pub mod cold;
pub mod etcd;
pub mod key_id;
pub mod process;
pub mod reads;

pub use availability::{Availability, Window, outage_windows};
pub use cold::ColdReadsDecryptOncePerSeed;
pub use etcd::NoPlaintextInEtcd;
pub use key_id::{EncryptKeyIdMatchesStatus, KeyIdConvergesAfterRotation};
pub use process::{Log, NoSecretInLogs, PluginNeverExited, Secret};
pub use reads::AcknowledgedWritesReadBack;

/// A checker's conclusion. Ordered so the worst of several is their maximum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The property held over everything the checker could see.
    Valid,
    /// The checker could not tell (missing observations, indeterminate operations, a crash).
    Unknown,
    /// The property was broken; the violations say where.
    Invalid,
}

/// One way a property was broken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// What went wrong, in a sentence.
    pub what: String,
    /// The offending operation, RPC or exit, when one event is to blame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<Event>,
}

/// What one checker found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// The checker's name (`no_plaintext_in_etcd`, …).
    pub name: String,
    /// The conclusion.
    pub verdict: Verdict,
    /// Named numbers and strings behind the verdict (counts, times in ms, key_ids).
    pub figures: BTreeMap<String, serde_json::Value>,
    /// Why the verdict is invalid; empty otherwise.
    pub violations: Vec<Violation>,
    /// Why the verdict is unknown, if it is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unknowns: Vec<String>,
}

impl Check {
    /// A valid check with nothing recorded yet.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            verdict: Verdict::Valid,
            figures: BTreeMap::new(),
            violations: Vec::new(),
            unknowns: Vec::new(),
        }
    }

    /// Records a figure.
    pub fn figure(&mut self, name: &str, value: impl Into<serde_json::Value>) {
        self.figures.insert(name.to_owned(), value.into());
    }

    /// Records a violation: the verdict becomes invalid.
    pub fn violation(&mut self, what: impl Into<String>, event: Option<&Event>) {
        self.verdict = Verdict::Invalid;
        self.violations.push(Violation {
            what: what.into(),
            event: event.cloned(),
        });
    }

    /// Records something the checker cannot decide: the verdict becomes unknown unless already invalid.
    pub fn unknown(&mut self, why: impl Into<String>) {
        self.verdict = self.verdict.max(Verdict::Unknown);
        self.unknowns.push(why.into());
    }
}

/// A property checked over a finished run. Inputs beyond the history are fields of the implementor.
pub trait Checker {
    /// The name the check is reported under.
    fn name(&self) -> &'static str;
    /// Checks the property over `history`.
    fn check(&self, history: &[Event]) -> Check;
}

/// Every checker's result and the overall verdict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Invalid if any check is, else unknown if any is, else valid.
    pub verdict: Verdict,
    /// One per checker, in the order given.
    pub checks: Vec<Check>,
}

impl Report {
    /// Runs every checker over `history`. A checker that panics is reported as unknown with the panic
    /// message: a crashed checker proves nothing either way.
    pub fn run(history: &[Event], checkers: &[&dyn Checker]) -> Self {
        let checks = checkers
            .iter()
            .map(|checker| {
                catch_unwind(AssertUnwindSafe(|| checker.check(history))).unwrap_or_else(|panic| {
                    let mut check = Check::new(checker.name());
                    check.unknown(format!("checker panicked: {}", panic_message(&*panic)));
                    check
                })
            })
            .collect();
        Self::from_checks(checks)
    }

    /// The report over checks already made.
    pub fn from_checks(checks: Vec<Check>) -> Self {
        let verdict = checks.iter().map(|c| c.verdict).max().unwrap_or(Verdict::Valid);
        Self { verdict, checks }
    }

    /// One line per violation and per unknown, each naming its checker (what a failing run prints).
    pub fn problems(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for check in &self.checks {
            for v in &check.violations {
                let event = v
                    .event
                    .as_ref()
                    .and_then(|e| serde_json::to_string(e).ok())
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                lines.push(format!("{}: invalid: {}{event}", check.name, v.what));
            }
            for why in &check.unknowns {
                lines.push(format!("{}: unknown: {why}", check.name));
            }
        }
        lines
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        return (*s).to_owned();
    }
    panic
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_else(|| "a non-string payload".to_owned())
}

/// Many byte strings searched for at once in long haystacks: each needle is indexed by its first
/// `probe` bytes, so a search is one hash lookup per haystack position instead of one scan per needle.
pub(crate) struct Needles<'a> {
    probe: usize,
    index: HashMap<&'a [u8], Vec<usize>>,
    needles: Vec<&'a [u8]>,
}

impl<'a> Needles<'a> {
    /// Needles must be at least `probe` bytes long; [`add`](Self::add) refuses shorter ones.
    pub(crate) fn new(probe: usize) -> Self {
        Self {
            probe: probe.max(1),
            index: HashMap::new(),
            needles: Vec::new(),
        }
    }

    /// Adds a needle and returns its number, or `None` if it is shorter than the probe.
    pub(crate) fn add(&mut self, needle: &'a [u8]) -> Option<usize> {
        let head = needle.get(..self.probe)?;
        let id = self.needles.len();
        self.needles.push(needle);
        self.index.entry(head).or_default().push(id);
        Some(id)
    }

    /// The numbers of the needles that occur in `haystack`, each once, in increasing order.
    pub(crate) fn found_in(&self, haystack: &[u8]) -> Vec<usize> {
        let mut found = Vec::new();
        if self.needles.is_empty() {
            return found;
        }
        for (at, window) in haystack.windows(self.probe).enumerate() {
            let Some(ids) = self.index.get(window) else {
                continue;
            };
            let rest = haystack.get(at..).unwrap_or_default();
            for &id in ids {
                if self.needles.get(id).is_some_and(|n| rest.starts_with(n)) {
                    found.push(id);
                }
            }
        }
        found.sort_unstable();
        found.dedup();
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Verdict);

    impl Checker for Fixed {
        fn name(&self) -> &'static str {
            "fixed"
        }
        fn check(&self, _: &[Event]) -> Check {
            let mut check = Check::new(self.name());
            match self.0 {
                Verdict::Valid => {}
                Verdict::Unknown => check.unknown("cannot tell"),
                Verdict::Invalid => check.violation("broken", None),
            }
            check
        }
    }

    struct Crashes;

    impl Checker for Crashes {
        fn name(&self) -> &'static str {
            "crashes"
        }
        fn check(&self, _: &[Event]) -> Check {
            panic!("index out of range")
        }
    }

    #[test]
    fn the_overall_verdict_is_the_worst_of_the_checks() {
        let (valid, unknown, invalid) = (
            Fixed(Verdict::Valid),
            Fixed(Verdict::Unknown),
            Fixed(Verdict::Invalid),
        );
        assert_eq!(Report::run(&[], &[&valid, &valid]).verdict, Verdict::Valid);
        assert_eq!(Report::run(&[], &[&valid, &unknown]).verdict, Verdict::Unknown);
        assert_eq!(
            Report::run(&[], &[&unknown, &invalid, &valid]).verdict,
            Verdict::Invalid
        );
        assert_eq!(Report::run(&[], &[]).verdict, Verdict::Valid);
    }

    #[test]
    fn a_checker_that_panics_is_unknown_never_valid() {
        let report = Report::run(&[], &[&Fixed(Verdict::Valid), &Crashes]);
        assert_eq!(report.verdict, Verdict::Unknown);
        let crashed = &report.checks[1];
        assert_eq!(
            (crashed.name.as_str(), crashed.verdict),
            ("crashes", Verdict::Unknown)
        );
        assert_eq!(crashed.unknowns, ["checker panicked: index out of range"]);
    }

    #[test]
    fn an_unknown_never_hides_an_invalid() {
        let mut check = Check::new("c");
        check.violation("lost a write", None);
        check.unknown("one write timed out");
        assert_eq!(check.verdict, Verdict::Invalid);
        let report = Report::from_checks(vec![check]);
        assert_eq!(
            report.problems(),
            ["c: invalid: lost a write", "c: unknown: one write timed out"]
        );
    }

    #[test]
    fn needles_are_found_anywhere_in_a_haystack_each_once() {
        let mut needles = Needles::new(4);
        let a = needles.add(b"abcdef").unwrap();
        let b = needles.add(b"abcdxx").unwrap();
        let c = needles.add(b"zzzz").unwrap();
        assert_eq!(needles.add(b"abc"), None);
        assert_eq!(needles.found_in(b"..abcdef..abcdef..zzzz"), [a, c]);
        assert_eq!(needles.found_in(b"abcdxx"), [b]);
        assert!(needles.found_in(b"abc").is_empty());
    }
}
