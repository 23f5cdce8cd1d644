//! The scenario machinery that needs no process: the recorded [`history`] of a run (operations, plugin
//! RPCs, fault steps, Status observations, process exits, as JSON lines), the [`checker`]s that judge
//! it with jepsen's three verdicts, and the [`verdict`] file and summary table a person reads. The
//! workload, the fault timeline and the runner that fill a history live beside this module, and the
//! scenarios themselves in the top-level `scenarios/` crate; nothing here starts or talks to a process.

pub mod checker;
pub mod history;
pub mod verdict;

pub use checker::{Check, Checker, Report, Verdict};
pub use history::{Event, History};
pub use verdict::{Run, VerdictFile, summary_table};
