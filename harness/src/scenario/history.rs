//! The recorded history of a scenario run: every client operation, every plugin RPC the envelopes made,
//! every fault on the timeline, every Status observation and every process exit, as one [`Event`] per
//! JSON line. Values are kept only as SHA-256 digests, so a history file can be shared without leaking
//! what was written. Times are milliseconds since the run started ([`History::now_ms`]).

use std::fs::File;
use std::io::{self, BufRead, BufReader, LineWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The SHA-256 of a value, lower-case hex: how histories name values without holding them.
pub fn digest(value: &[u8]) -> String {
    hex::encode(Sha256::digest(value))
}

/// One line of the history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A client operation through one node's apiserver.
    Op(OpRecord),
    /// An RPC one node's envelope sent to its plugin.
    Rpc(RpcRecord),
    /// A step of the fault timeline (or of the nemesis).
    Fault(FaultRecord),
    /// What a Status probe reported to one node.
    Status(StatusRecord),
    /// A process of the run exited.
    Exit(ExitRecord),
}

impl Event {
    /// When the event started (operations, RPCs) or happened (the rest), in ms since run start.
    pub fn at_ms(&self) -> u64 {
        match self {
            Self::Op(op) => op.start_ms,
            Self::Rpc(rpc) => rpc.at_ms,
            Self::Fault(fault) => fault.at_ms,
            Self::Status(status) => status.at_ms,
            Self::Exit(exit) => exit.at_ms,
        }
    }
}

/// What a client asked an apiserver to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Store a value under a key.
    Write,
    /// Read a key's value.
    Read,
    /// Remove a key.
    Delete,
}

/// Whether a read went through a node whose seed cache was warm or one just started cold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cache {
    /// The node's envelope kept its read cache from the workload.
    Warm,
    /// A fresh envelope: every distinct seed costs one Decrypt.
    Cold,
}

/// How an operation ended, jepsen's three ways.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It happened, and the client was told so.
    Ok,
    /// It did not happen.
    Fail {
        /// The error the client saw.
        error: String,
    },
    /// The client cannot tell (a timeout during an outage): it may or may not have happened.
    Unknown {
        /// Why it is indeterminate.
        why: String,
    },
}

impl Outcome {
    /// Whether the operation is acknowledged.
    pub fn is_ok(&self) -> bool {
        matches!(self, Self::Ok)
    }
}

/// One client operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRecord {
    /// Index of the node (apiserver + plugin) the client used.
    pub node: usize,
    /// What was asked.
    pub op: Op,
    /// The etcd key.
    pub key: String,
    /// [`digest`] of the value written, or of the value read; `None` for deletes and absent keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// For reads: through a warm or a cold cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Cache>,
    /// A read of the final phase, after the timeline healed everything.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub final_read: bool,
    /// When the client sent it.
    pub start_ms: u64,
    /// When the client got an answer or gave up.
    pub end_ms: u64,
    /// How it ended.
    pub outcome: Outcome,
}

/// A KMS v2 RPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Method {
    /// `Status`.
    Status,
    /// `Encrypt`.
    Encrypt,
    /// `Decrypt`.
    Decrypt,
}

/// One RPC an envelope sent to its plugin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcRecord {
    /// The node whose envelope sent it.
    pub node: usize,
    /// Which RPC.
    pub method: Method,
    /// The key_id answered (Status, Encrypt) or asked for (Decrypt); empty when there was none.
    #[serde(default)]
    pub key_id: String,
    /// The gRPC code name: `OK`, `UNAVAILABLE`, `DEADLINE_EXCEEDED`, ….
    pub code: String,
    /// When it was sent.
    pub at_ms: u64,
    /// How long the answer took.
    pub latency_ms: u64,
}

/// What a timeline step does to the run, as the checkers read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// Starts an outage of the target (stop, kill, pause, seal, blackhole, …).
    Breaks,
    /// Ends the target's outage (start, resume, unseal, restore, …); target [`ALL`] ends every one.
    Heals,
    /// Changes something without an outage (rotate a key, restart an apiserver cold, …).
    Changes,
}

/// The target of a heal step that ends every outage (jepsen's final heal).
pub const ALL: &str = "all";

/// The verb of a KEK rotation step; its `detail` is the new key_id.
pub const ROTATE: &str = "rotate";

/// One step of the fault timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRecord {
    /// When it was applied.
    pub at_ms: u64,
    /// The verb: `pause`, `resume`, `kill`, `seal`, [`ROTATE`], `heal`, ….
    pub verb: String,
    /// What it acted on: `openbao`, `kleidi-1`, `etcd`, [`ALL`], ….
    pub target: String,
    /// Whether it breaks, heals or only changes something.
    pub effect: Effect,
    /// Anything the checkers need to know about it (for [`ROTATE`]: the new key_id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What one Status probe told one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRecord {
    /// The node that probed.
    pub node: usize,
    /// When the answer arrived.
    pub at_ms: u64,
    /// The key_id Status reported.
    pub key_id: String,
    /// The healthz string (`ok` when healthy).
    pub healthz: String,
}

impl StatusRecord {
    /// Whether the apiserver counts this probe as good.
    pub fn is_healthy(&self) -> bool {
        self.healthz == "ok" && !self.key_id.is_empty()
    }
}

/// What kind of process exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A KMS plugin (`kleidi serve` or a foreign one).
    Plugin,
    /// etcd.
    Etcd,
    /// OpenBao.
    Openbao,
    /// Anything else the runtime started.
    Other,
}

/// A process of the run exited.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// When the exit was seen.
    pub at_ms: u64,
    /// The process name as the runtime knows it (`kleidi-0`, `etcd`, …).
    pub process: String,
    /// What it is.
    pub role: Role,
    /// Its exit code, if it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Whether a harness verb (stop, kill, restart) ended it.
    pub by_harness: bool,
}

/// The history of one run: cheap to clone and to append to from many tasks, optionally mirrored line
/// by line into a JSONL file so a run that dies still leaves its history behind.
#[derive(Clone)]
pub struct History {
    inner: Arc<Inner>,
}

struct Inner {
    start: Instant,
    events: Mutex<Vec<Event>>,
    sink: Option<Mutex<Sink>>,
}

struct Sink {
    file: LineWriter<File>,
    /// The first write error; [`History::flush`] reports it.
    error: Option<io::Error>,
}

impl History {
    /// An empty history kept in memory; the clock starts now.
    pub fn new() -> Self {
        Self::build(None)
    }

    /// An empty history that is also written to `path` (created or truncated), one event per line.
    pub fn with_file(path: &Path) -> io::Result<Self> {
        let file = LineWriter::new(File::create(path)?);
        Ok(Self::build(Some(Mutex::new(Sink { file, error: None }))))
    }

    fn build(sink: Option<Mutex<Sink>>) -> Self {
        Self {
            inner: Arc::new(Inner {
                start: Instant::now(),
                events: Mutex::new(Vec::new()),
                sink,
            }),
        }
    }

    /// Milliseconds since the run started: the clock every record uses.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Appends one event. A file write error is kept for [`flush`](Self::flush) rather than returned,
    /// so workload tasks never have to handle it mid-run.
    pub fn record(&self, event: Event) {
        if let Some(sink) = &self.inner.sink {
            let mut sink = lock(sink);
            if sink.error.is_none() {
                let written = serde_json::to_string(&event)
                    .map_err(io::Error::other)
                    .and_then(|line| writeln!(sink.file, "{line}"));
                if let Err(e) = written {
                    sink.error = Some(e);
                }
            }
        }
        lock(&self.inner.events).push(event);
    }

    /// Everything recorded so far, in the order recorded.
    pub fn events(&self) -> Vec<Event> {
        lock(&self.inner.events).clone()
    }

    /// Flushes the file, and reports the first error any write to it hit.
    pub fn flush(&self) -> io::Result<()> {
        let Some(sink) = &self.inner.sink else {
            return Ok(());
        };
        let mut sink = lock(sink);
        match sink.error.take() {
            Some(e) => Err(e),
            None => sink.file.flush(),
        }
    }
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History")
            .field("events", &lock(&self.inner.events).len())
            .field("file", &self.inner.sink.is_some())
            .finish()
    }
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

/// A poisoned lock only means another recorder panicked mid-push; the events stay usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads a history written by [`History::with_file`] (blank lines are skipped).
pub fn load(path: &Path) -> io::Result<Vec<Event>> {
    let mut events = Vec::new();
    for (index, line) in BufReader::new(File::open(path)?).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let event = serde_json::from_str(&line).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}:{}: {e}", path.display(), index + 1),
            )
        })?;
        events.push(event);
    }
    Ok(events)
}

/// The client operations of a history.
pub fn ops(events: &[Event]) -> impl Iterator<Item = &OpRecord> {
    events.iter().filter_map(|e| match e {
        Event::Op(op) => Some(op),
        _ => None,
    })
}

/// The plugin RPCs of a history.
pub fn rpcs(events: &[Event]) -> impl Iterator<Item = &RpcRecord> {
    events.iter().filter_map(|e| match e {
        Event::Rpc(rpc) => Some(rpc),
        _ => None,
    })
}

/// The timeline steps of a history.
pub fn faults(events: &[Event]) -> impl Iterator<Item = &FaultRecord> {
    events.iter().filter_map(|e| match e {
        Event::Fault(fault) => Some(fault),
        _ => None,
    })
}

/// The Status observations of a history.
pub fn statuses(events: &[Event]) -> impl Iterator<Item = &StatusRecord> {
    events.iter().filter_map(|e| match e {
        Event::Status(status) => Some(status),
        _ => None,
    })
}

/// The process exits of a history.
pub fn exits(events: &[Event]) -> impl Iterator<Item = &ExitRecord> {
    events.iter().filter_map(|e| match e {
        Event::Exit(exit) => Some(exit),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Event> {
        vec![
            Event::Op(OpRecord {
                node: 1,
                op: Op::Write,
                key: "/registry/secrets/default/a".into(),
                digest: Some(digest(b"value")),
                cache: None,
                final_read: false,
                start_ms: 5,
                end_ms: 9,
                outcome: Outcome::Unknown {
                    why: "timed out after 3s".into(),
                },
            }),
            Event::Rpc(RpcRecord {
                node: 0,
                method: Method::Encrypt,
                key_id: "pkcs11:kek:01".into(),
                code: "OK".into(),
                at_ms: 3,
                latency_ms: 2,
            }),
            Event::Fault(FaultRecord {
                at_ms: 10,
                verb: ROTATE.into(),
                target: "openbao".into(),
                effect: Effect::Changes,
                detail: Some("vault:transit/k:v2:abcd".into()),
            }),
            Event::Status(StatusRecord {
                node: 2,
                at_ms: 11,
                key_id: "k".into(),
                healthz: "ok".into(),
            }),
            Event::Exit(ExitRecord {
                at_ms: 12,
                process: "kleidi-0".into(),
                role: Role::Plugin,
                code: None,
                signal: Some(9),
                by_harness: true,
            }),
        ]
    }

    #[test]
    fn digests_are_sha256_hex_never_the_value() {
        assert_eq!(
            digest(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn events_are_one_json_object_per_line_tagged_by_type() {
        let line = serde_json::to_string(&sample()[0]).unwrap();
        assert!(!line.contains('\n'));
        assert!(
            line.starts_with(r#"{"type":"op","node":1,"op":"write""#),
            "{line}"
        );
        assert!(
            line.contains(r#""outcome":{"unknown":{"why":"timed out after 3s"}}"#),
            "{line}"
        );
        assert!(!line.contains("final_read") && !line.contains("cache"), "{line}");
    }

    #[test]
    fn a_history_written_to_a_file_loads_back_equal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        let history = History::with_file(&path).unwrap();
        for event in sample() {
            history.record(event);
        }
        history.flush().unwrap();
        assert_eq!(load(&path).unwrap(), sample());
        assert_eq!(history.events(), sample());
    }

    #[test]
    fn a_corrupt_line_names_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        std::fs::write(&path, "\n{\"type\":\"nope\"}\n").unwrap();
        let error = load(&path).unwrap_err();
        assert!(error.to_string().contains("history.jsonl:2:"), "{error}");
    }

    #[test]
    fn many_tasks_append_concurrently_without_losing_events() {
        let history = History::new();
        let threads: Vec<_> = (0..8)
            .map(|node| {
                let history = history.clone();
                std::thread::spawn(move || {
                    for at_ms in 0..100 {
                        history.record(Event::Status(StatusRecord {
                            node,
                            at_ms,
                            key_id: "k".into(),
                            healthz: "ok".into(),
                        }));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(statuses(&history.events()).count(), 800);
    }

    #[test]
    fn records_are_found_by_kind() {
        let events = sample();
        assert_eq!(ops(&events).count(), 1);
        assert_eq!(rpcs(&events).count(), 1);
        assert_eq!(
            faults(&events).next().unwrap().detail.as_deref(),
            Some("vault:transit/k:v2:abcd")
        );
        assert_eq!(exits(&events).next().unwrap().signal, Some(9));
        assert_eq!(
            events.iter().map(Event::at_ms).collect::<Vec<_>>(),
            [5, 3, 10, 11, 12]
        );
    }
}
