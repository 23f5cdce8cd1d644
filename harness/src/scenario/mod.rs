//! The scenario machinery. A run's [`runner`] starts a simulated control plane ([`cluster`]: etcd, a
//! key backend, N nodes of `kleidi serve` + the apiserver's envelope, every plugin RPC recorded by
//! [`recorder`]), drives the [`workload`] and the [`fault`] timeline (or the seeded nemesis), and
//! records it all in the [`history`] (JSON lines); the [`checker`]s judge the history with jepsen's
//! three verdicts, and [`verdict`] writes what a person reads. The scenarios themselves live in the
//! top-level `scenarios/` crate, one page each.

pub mod checker;
pub mod cluster;
pub mod fault;
pub mod handles;
pub mod history;
pub mod recorder;
pub mod runner;
pub mod verdict;
pub mod workload;

pub use checker::{Check, Checker, Report, Verdict};
pub use cluster::{BackendKind, Timing};
pub use fault::{Fault, Step, at, nemesis};
pub use history::{Event, History};
pub use runner::{RunOptions, Scenario, run, seed_from_env};
pub use verdict::{Run, VerdictFile, summary_table};
pub use workload::{Via, Workload};
