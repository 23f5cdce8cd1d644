//! The run's report: markdown tables (one per point of issue #11), JSON, and two PNG charts.

use std::fmt::Write as _;
use std::path::Path;

use super::measure::Lat;
use super::{CALLERS, Report};
use crate::plot::{Axes, DotSeries, LineData, latency_dots, lines};

fn lat3(l: &Lat) -> String {
    format!("{:.0} / {:.0} / {:.0}", l.p50_us, l.p99_us, l.p999_us)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{v:.digits$}"))
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// The markdown tables.
pub fn markdown(r: &Report) -> String {
    let mut md = String::new();
    // Writing to a String cannot fail.
    let _ = write_markdown(r, &mut md);
    md
}

fn write_markdown(r: &Report, md: &mut String) -> std::fmt::Result {
    writeln!(md, "# kleidi-bench: cross-process, over the Unix socket\n")?;
    let meta = |key: &str| r.meta.get(key).unwrap_or(&serde_json::Value::Null);
    writeln!(
        md,
        "{} calls per latency loop, {} Decrypts per concurrent run (TPM: {} and {}); µs; {}.\n",
        meta("n"),
        meta("conc_total"),
        meta("tpm_n"),
        meta("tpm_conc_total"),
        meta("client").as_str().unwrap_or("")
    )?;

    writeln!(
        md,
        "## Latency: kleidi vs trivial gRPC server + raw backend (target ratio ≤ 1.10)\n"
    )?;
    writeln!(
        md,
        "| backend | method | kleidi p50 / p99 / p999 | trivial p50 / p99 / p999 | raw p50 | kleidi ÷ (trivial + raw) | plain plugin p50 / p99 / p999 | kleidi ÷ plain | errors |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|")?;
    for row in &r.latency {
        let errors = row.kleidi.errors
            + row.trivial.errors
            + row.raw.as_ref().map_or(0, |l| l.errors)
            + row.plain.as_ref().map_or(0, |l| l.errors);
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.2} | {} | {} | {} |",
            row.backend,
            row.method,
            lat3(&row.kleidi),
            lat3(&row.trivial),
            opt(row.raw.as_ref().map(|l| l.p50_us), 0),
            row.ratio,
            row.plain.as_ref().map_or("–".to_string(), lat3),
            opt(row.plain_ratio, 2),
            errors
        )?;
    }
    writeln!(
        md,
        "\nPlain plugin: the trivial server with the raw side's call made inline in its handler \
         (nothing else of a plugin: no limits, checks, time bound or hand-off), so what composing gRPC \
         with the backend costs on this machine is measured, not assumed zero."
    )?;

    writeln!(
        md,
        "\n## Status (target p99 ≤ 1000 µs; OpenBao transit requests per Status 0 between probes)\n"
    )?;
    writeln!(
        md,
        "| backend | kleidi Status p99 | transit requests per Status | peer Status p99 | peer requests per Status |"
    )?;
    writeln!(md, "|---|---|---|---|---|")?;
    for row in r.latency.iter().filter(|l| l.method == "Status") {
        writeln!(
            md,
            "| {} | {:.0} | {} | {} | {} |",
            row.backend,
            row.kleidi.p99_us,
            opt(row.kleidi_backend_requests_per_call, 3),
            opt(row.peer.as_ref().map(|l| l.p99_us), 0),
            opt(row.peer_backend_requests_per_call, 3)
        )?;
    }

    writeln!(md, "\n## Peer (same OpenBao, transit key and client)\n")?;
    writeln!(md, "{}\n", r.peer)?;
    if r.latency.iter().any(|l| l.peer.is_some()) {
        writeln!(
            md,
            "| method | kleidi p50 / p99 / p999 | peer p50 / p99 / p999 | kleidi transit req/RPC | peer transit req/RPC | peer errors |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|")?;
        for row in r.latency.iter() {
            if let Some(peer) = &row.peer {
                writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} |",
                    row.method,
                    lat3(&row.kleidi),
                    lat3(peer),
                    opt(row.kleidi_backend_requests_per_call, 3),
                    opt(row.peer_backend_requests_per_call, 3),
                    peer.errors
                )?;
            }
        }
    }

    writeln!(
        md,
        "\n## Concurrent Decrypt (target kleidi ≥ 0.8 × raw; zero errors)\n"
    )?;
    writeln!(
        md,
        "| backend | callers | kleidi calls/s | kleidi p99 | kleidi errors | raw calls/s | raw p99 | kleidi ÷ raw | \
         trivial gRPC calls/s | kleidi ÷ min(raw, trivial) | plain plugin calls/s | plain ÷ raw |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    for row in &r.concurrency {
        writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.2} | {} | {} |",
            row.backend,
            row.kleidi.callers,
            row.kleidi.calls_per_s,
            row.kleidi.lat.p99_us,
            row.kleidi.lat.errors,
            row.raw.calls_per_s,
            row.raw.lat.p99_us,
            row.ratio,
            row.trivial.calls_per_s,
            row.ceiling_ratio,
            opt(row.plain.as_ref().map(|c| c.calls_per_s), 0),
            opt(
                row.plain
                    .as_ref()
                    .map(|c| c.calls_per_s / row.raw.calls_per_s.max(1e-9)),
                2
            )
        )?;
    }

    writeln!(
        md,
        "\nEvery caller decrypts a ciphertext of its own. kleidi's vault backend gathers concurrent Decrypts \
         into transit `batch_input` requests; the raw side sends one request per decrypt. The TPM's raw \
         callers share one connection (its ceiling: the TPM runs one command at a time). The trivial \
         server, with as many callers over one connection, is what gRPC over the socket allows at all: \
         the last column compares kleidi with the lower of the two ceilings."
    )?;
    writeln!(
        md,
        "\n## Server runtime (`kleidi serve --runtime`, one process each)\n"
    )?;
    writeln!(
        md,
        "| backend | runtime | Decrypt p50 / p99 / p999 | 16 callers calls/s | 16 callers p99 | errors |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    for row in &r.runtime {
        writeln!(
            md,
            "| {} | {} | {} | {:.0} | {:.0} | {} |",
            row.backend,
            row.runtime,
            lat3(&row.decrypt),
            row.conc16.calls_per_s,
            row.conc16.lat.p99_us,
            row.decrypt.errors + row.conc16.lat.errors
        )?;
    }

    writeln!(
        md,
        "\n## Instructions per call (callgrind: the server process, all its threads; {} calls)\n",
        super::instructions::CALLS
    )?;
    if r.instructions.is_empty() {
        writeln!(md, "{}", r.instructions_note)?;
    } else {
        writeln!(
            md,
            "| backend | method | kleidi | trivial gRPC | raw | kleidi ÷ (trivial + raw) | peer |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|")?;
        for row in &r.instructions {
            writeln!(
                md,
                "| {} | {} | {} | {} | {} | {:.2} | {} |",
                row.backend,
                row.method,
                row.kleidi,
                row.trivial,
                row.raw,
                row.ratio,
                row.peer.map_or("–".to_string(), |p| p.to_string())
            )?;
        }
        writeln!(
            md,
            "\nRaw: the client side only (OpenBao's own work is in its process, for every path alike). \
             Counts do not depend on the machine's load; waiting (hand-offs between threads and \
             processes) is not in them."
        )?;
    }

    writeln!(
        md,
        "\n## Memory of `kleidi serve` (VmRSS, MiB; target idle ≤ 15, no growth)\n"
    )?;
    writeln!(
        md,
        "| backend | MALLOC_ARENA_MAX | idle | after load 1 | after load 2 | after load 3 |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    for row in &r.memory {
        let after: Vec<String> = row.after_kib.iter().map(|k| mib(*k)).collect();
        writeln!(
            md,
            "| {} | {} | {} | {} |",
            row.backend,
            row.arenas,
            mib(row.idle_kib),
            after.join(" | ")
        )?;
    }
    writeln!(
        md,
        "\nEach load run: 64 callers, {} Decrypts (TPM: {}).",
        meta("conc_total"),
        meta("tpm_conc_total")
    )?;
    writeln!(md, "\nTPM: {}", meta("tpm").as_str().unwrap_or(""))?;
    writeln!(md, "\nErrors: {}. Elapsed: {:.1} s.", r.errors, r.elapsed_s)?;
    Ok(())
}

/// `crossproc.json`, `crossproc.md` in `out_dir`; the two charts in `plots_dir`.
pub fn write(r: &Report, out_dir: &Path, plots_dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(out_dir.join("crossproc.json"), serde_json::to_string_pretty(r)?)?;
    let md = markdown(r);
    std::fs::write(out_dir.join("crossproc.md"), &md)?;

    let groups: Vec<String> = r
        .latency
        .iter()
        .map(|l| format!("{} {}", l.backend, l.method))
        .collect();
    let pick = |f: &dyn Fn(&super::LatRow) -> Option<Lat>| -> Vec<Option<(f64, f64)>> {
        r.latency
            .iter()
            .map(|l| f(l).map(|x| (x.p50_us, x.p99_us)))
            .collect()
    };
    let mut series = vec![
        DotSeries {
            name: "kleidi".into(),
            values: pick(&|l| Some(l.kleidi.clone())),
        },
        DotSeries {
            name: "trivial gRPC".into(),
            values: pick(&|l| Some(l.trivial.clone())),
        },
        DotSeries {
            name: "raw backend".into(),
            values: pick(&|l| l.raw.clone()),
        },
        DotSeries {
            name: "plain plugin (gRPC + raw call)".into(),
            values: pick(&|l| l.plain.clone()),
        },
    ];
    if r.latency.iter().any(|l| l.peer.is_some()) {
        series.push(DotSeries {
            name: "peer (vault-kms-provider)".into(),
            values: pick(&|l| l.peer.clone()),
        });
    }
    latency_dots(
        &plots_dir.join("crossproc-latency.png"),
        "Latency over the Unix socket from another process (p50 filled, p99 hollow)",
        &groups,
        &series,
    )?;

    let mut data = Vec::new();
    let backends: Vec<&str> = {
        let mut b: Vec<&str> = r.concurrency.iter().map(|c| c.backend.as_str()).collect();
        b.dedup();
        b
    };
    for backend in backends {
        let rows: Vec<_> = r.concurrency.iter().filter(|c| c.backend == backend).collect();
        data.push(LineData {
            name: format!("{backend}: kleidi"),
            points: rows
                .iter()
                .map(|c| (c.kleidi.callers as f64, c.kleidi.calls_per_s))
                .collect(),
        });
        data.push(LineData {
            name: format!("{backend}: raw in-process"),
            points: rows
                .iter()
                .map(|c| (c.raw.callers as f64, c.raw.calls_per_s))
                .collect(),
        });
    }
    lines(
        &plots_dir.join("crossproc-throughput.png"),
        &Axes {
            title: &format!("Decrypt throughput against concurrent callers ({CALLERS:?})"),
            x_desc: "concurrent callers (log)",
            y_desc: "Decrypts per second (log)",
            log_y: true,
        },
        &data,
    )?;
    Ok(md)
}
