//! What a run leaves for a person: `verdict.json` under
//! `target/scenarios/<scenario>/<backend>/<seed>/` (the run, the overall verdict, the run's figures and
//! one entry per checker), and the summary table printed after many runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::checker::{Check, Report, Verdict};
use super::history::{self, Event, Method, Outcome};

/// Which run a verdict is about: enough to find its folder and to replay it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// The scenario's name (its file name in `scenarios/`).
    pub scenario: String,
    /// `pkcs11`, `vault`, ….
    pub backend: String,
    /// `processes` or `containers`.
    pub runtime: String,
    /// The seed that replays the run (`SCENARIO_SEED`).
    pub seed: u64,
}

impl Run {
    /// `<root>/<scenario>/<backend>/<seed>`: where the run's history, verdict and logs go.
    pub fn dir(&self, root: &Path) -> PathBuf {
        root.join(&self.scenario)
            .join(&self.backend)
            .join(self.seed.to_string())
    }
}

/// The contents of `verdict.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VerdictFile {
    /// The scenario's name.
    pub scenario: String,
    /// The backend it ran against.
    pub backend: String,
    /// The runtime it ran on.
    pub runtime: String,
    /// The seed that replays it.
    pub seed: u64,
    /// Invalid if any checker is, else unknown if any is, else valid.
    pub verdict: Verdict,
    /// Counts over the whole history: operations by outcome, RPCs by method, duration.
    pub figures: BTreeMap<String, serde_json::Value>,
    /// One entry per checker: name, verdict, figures, violations.
    pub checkers: Vec<Check>,
}

impl VerdictFile {
    /// The verdict of `run`, with the run's figures counted from `history`.
    pub fn new(run: Run, history: &[Event], report: Report) -> Self {
        Self {
            scenario: run.scenario,
            backend: run.backend,
            runtime: run.runtime,
            seed: run.seed,
            verdict: report.verdict,
            figures: figures(history),
            checkers: report.checks,
        }
    }

    /// Writes `verdict.json` (pretty-printed) into `dir`, creating it; returns the file's path.
    pub fn write(&self, dir: &Path) -> io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("verdict.json");
        let mut json = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        json.push('\n');
        std::fs::write(&path, json)?;
        Ok(path)
    }

    /// Reads a `verdict.json`.
    pub fn read(path: &Path) -> io::Result<Self> {
        serde_json::from_slice(&std::fs::read(path)?)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// The availability checker's worst time from a heal to the first good write, if it measured one.
    pub fn recovery_ms(&self) -> Option<u64> {
        self.checkers
            .iter()
            .find_map(|c| c.figures.get("recovery_ms"))
            .and_then(serde_json::Value::as_u64)
    }

    /// RPCs the envelopes sent, as `Status/Encrypt/Decrypt` counts.
    pub fn rpc_counts(&self) -> String {
        let count = |name: &str| {
            self.figures
                .get(name)
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
        };
        format!(
            "{}/{}/{}",
            count("rpc_status"),
            count("rpc_encrypt"),
            count("rpc_decrypt")
        )
    }

    /// The summary table's cells for this run.
    pub fn cells(&self) -> [String; 6] {
        [
            self.scenario.clone(),
            self.backend.clone(),
            self.seed.to_string(),
            label(self.verdict).to_owned(),
            self.recovery_ms()
                .map_or_else(|| "-".to_owned(), |ms| format!("{:.1}s", ms as f64 / 1000.0)),
            self.rpc_counts(),
        ]
    }

    /// One row of the summary table in fixed-width columns, for printing as each run ends.
    pub fn summary_row(&self) -> String {
        row(&self.cells(), &DEFAULT_WIDTHS)
    }
}

/// The summary table's column names.
pub const HEADER: [&str; 6] = ["scenario", "backend", "seed", "verdict", "recovery", "rpcs S/E/D"];

/// Column widths of [`VerdictFile::summary_row`]: long enough for most scenario names and seeds.
const DEFAULT_WIDTHS: [usize; 6] = [40, 8, 20, 8, 9, 14];

/// The summary table over many runs: a header, then one aligned row per run.
pub fn summary_table(runs: &[VerdictFile]) -> String {
    let rows: Vec<[String; 6]> = runs.iter().map(VerdictFile::cells).collect();
    let widths: Vec<usize> = (0..HEADER.len())
        .map(|column| {
            let cell = |r: &[String; 6]| r.get(column).map_or(0, |c| c.chars().count());
            let header = HEADER.get(column).map_or(0, |h| h.len());
            rows.iter().map(cell).max().unwrap_or(0).max(header)
        })
        .collect();
    let mut table = row(&HEADER.map(str::to_owned), &widths);
    table.push('\n');
    for cells in &rows {
        table.push_str(&row(cells, &widths));
        table.push('\n');
    }
    table
}

fn row(cells: &[String; 6], widths: &[usize]) -> String {
    let mut line = String::new();
    for (cell, width) in cells.iter().zip(widths) {
        let _ = write!(line, "{cell:<width$}  ");
    }
    line.trim_end().to_owned()
}

/// The verdict as written in `verdict.json`.
pub fn label(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Valid => "valid",
        Verdict::Unknown => "unknown",
        Verdict::Invalid => "invalid",
    }
}

fn figures(history: &[Event]) -> BTreeMap<String, serde_json::Value> {
    let mut figures = BTreeMap::new();
    let mut put = |name: &str, n: usize| {
        figures.insert(name.to_owned(), n.into());
    };
    let ops: Vec<_> = history::ops(history).collect();
    put("ops", ops.len());
    put("ops_ok", ops.iter().filter(|op| op.outcome.is_ok()).count());
    put(
        "ops_failed",
        ops.iter()
            .filter(|op| matches!(op.outcome, Outcome::Fail { .. }))
            .count(),
    );
    put(
        "ops_unknown",
        ops.iter()
            .filter(|op| matches!(op.outcome, Outcome::Unknown { .. }))
            .count(),
    );
    let rpcs: Vec<_> = history::rpcs(history).collect();
    for (name, method) in [
        ("rpc_status", Method::Status),
        ("rpc_encrypt", Method::Encrypt),
        ("rpc_decrypt", Method::Decrypt),
    ] {
        put(name, rpcs.iter().filter(|rpc| rpc.method == method).count());
    }
    put("rpc_errors", rpcs.iter().filter(|rpc| rpc.code != "OK").count());
    put("faults", history::faults(history).count());
    let end = history
        .iter()
        .map(|e| match e {
            Event::Op(op) => op.end_ms,
            Event::Rpc(rpc) => rpc.at_ms + rpc.latency_ms,
            other => other.at_ms(),
        })
        .max();
    figures.insert("duration_ms".to_owned(), end.unwrap_or(0).into());
    figures
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::history::{Op, OpRecord, RpcRecord};

    fn run(scenario: &str, seed: u64) -> Run {
        Run {
            scenario: scenario.into(),
            backend: "vault".into(),
            runtime: "processes".into(),
            seed,
        }
    }

    fn history() -> Vec<Event> {
        let rpc = |method, code: &str| {
            Event::Rpc(RpcRecord {
                node: 0,
                method,
                key_id: "A".into(),
                code: code.into(),
                at_ms: 1,
                latency_ms: 4,
            })
        };
        vec![
            rpc(Method::Status, "OK"),
            rpc(Method::Encrypt, "OK"),
            rpc(Method::Decrypt, "UNAVAILABLE"),
            rpc(Method::Decrypt, "OK"),
            Event::Op(OpRecord {
                node: 0,
                op: Op::Write,
                key: "a".into(),
                digest: None,
                cache: None,
                final_read: false,
                start_ms: 2,
                end_ms: 61_000,
                outcome: Outcome::Unknown {
                    why: "timed out".into(),
                },
            }),
        ]
    }

    fn report(recovery_ms: Option<u64>, invalid: bool) -> Report {
        let mut availability = Check::new("availability");
        if let Some(ms) = recovery_ms {
            availability.figure("recovery_ms", ms);
        }
        let mut reads = Check::new("acknowledged_writes_read_back");
        if invalid {
            reads.violation("final read of a on node 1 (cold) returned nothing", None);
        }
        Report::from_checks(vec![availability, reads])
    }

    #[test]
    fn verdict_json_has_the_run_the_verdict_and_one_entry_per_checker() {
        let dir = tempfile::tempdir().unwrap();
        let verdict = VerdictFile::new(
            run("openbao_paused_30s", 42),
            &history(),
            report(Some(1500), true),
        );
        let path = verdict
            .write(&run("openbao_paused_30s", 42).dir(dir.path()))
            .unwrap();
        assert!(
            path.ends_with("openbao_paused_30s/vault/42/verdict.json"),
            "{}",
            path.display()
        );
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["scenario"], "openbao_paused_30s");
        assert_eq!(
            (json["backend"].as_str(), json["runtime"].as_str()),
            (Some("vault"), Some("processes"))
        );
        assert_eq!(
            (json["seed"].as_u64(), json["verdict"].as_str()),
            (Some(42), Some("invalid"))
        );
        let checkers = json["checkers"].as_array().unwrap();
        assert_eq!(checkers.len(), 2);
        assert_eq!(checkers[1]["name"], "acknowledged_writes_read_back");
        assert_eq!(checkers[1]["verdict"], "invalid");
        assert!(
            checkers[1]["violations"][0]["what"]
                .as_str()
                .unwrap()
                .contains("node 1 (cold)")
        );
        assert_eq!(checkers[0]["figures"]["recovery_ms"], 1500);
        assert_eq!(json["figures"]["rpc_decrypt"], 2);
        assert_eq!(json["figures"]["rpc_errors"], 1);
        assert_eq!(json["figures"]["duration_ms"], 61_000);
        assert_eq!(VerdictFile::read(&path).unwrap(), verdict);
    }

    #[test]
    fn the_summary_table_aligns_one_row_per_run_with_recovery_and_rpc_counts() {
        let runs = [
            VerdictFile::new(
                run("openbao_paused_30s", 42),
                &history(),
                report(Some(1500), false),
            ),
            VerdictFile::new(
                run("etcd_restarted", 18_446_744_073_709_551_615),
                &[],
                report(None, true),
            ),
        ];
        let table = summary_table(&runs);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[0],
            "scenario            backend  seed                  verdict  recovery  rpcs S/E/D"
        );
        assert_eq!(
            lines[1],
            "openbao_paused_30s  vault    42                    valid    1.5s      1/1/2"
        );
        assert_eq!(
            lines[2],
            "etcd_restarted      vault    18446744073709551615  invalid  -         0/0/0"
        );
    }

    #[test]
    fn a_single_row_has_fixed_columns_for_printing_as_runs_end() {
        let verdict = VerdictFile::new(
            run("rotation_under_load", 7),
            &history(),
            report(Some(300), false),
        );
        let row = verdict.summary_row();
        assert!(row.starts_with("rotation_under_load "), "{row}");
        assert_eq!(row.find("vault"), Some(42));
        assert!(row.ends_with("valid     0.3s       1/1/2"), "{row}");
    }
}
