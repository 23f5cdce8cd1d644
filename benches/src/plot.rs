//! PNG charts for the bench tools (`kleidi-bench`, `kleidi-scale`): plotters' bitmap backend, text
//! drawn with ab_glyph from a TTF read at run time (no fontconfig or freetype to build).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, anyhow};
use plotters::prelude::*;
use serde::Deserialize;

/// The font every chart's text uses (Debian `fonts-dejavu-core`).
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const SIZE: (u32, u32) = (1100, 650);

/// Registers [`FONT`] as plotters' "sans-serif" once per process.
pub fn register_font() -> anyhow::Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let bytes =
            std::fs::read(FONT).map_err(|e| format!("{FONT}: {e} (apt-get install fonts-dejavu-core)"))?;
        // plotters keeps the font for the process's life; leaking the one copy is what it asks for.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{FONT}: not a usable TTF"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

fn create_parent(out: &Path) -> anyhow::Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

/// One named series of a [`latency_dots`] chart: per group, (p50, p99) in µs, or nothing.
pub struct DotSeries {
    /// Legend name.
    pub name: String,
    /// One entry per group, in the groups' order.
    pub values: Vec<Option<(f64, f64)>>,
}

/// Latency per group (e.g. "vault Decrypt") and series (kleidi, trivial, raw, peer): p50 as a filled
/// dot, p99 as a hollow one above it, log y axis in µs.
pub fn latency_dots(out: &Path, title: &str, groups: &[String], series: &[DotSeries]) -> anyhow::Result<()> {
    register_font()?;
    create_parent(out)?;
    let all: Vec<f64> = series
        .iter()
        .flat_map(|s| s.values.iter().flatten().flat_map(|(a, b)| [*a, *b]))
        .filter(|v| *v > 0.0)
        .collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).min(10.0) * 0.5;
    let hi = all.iter().copied().fold(1.0, f64::max) * 2.0;
    let root = BitMapBackend::new(out, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let n = groups.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.5f64..(n - 0.5), (lo..hi).log_scale())?;
    let label = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 0.01 && i >= 0.0 {
            groups.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() + 1)
        .x_label_formatter(&label)
        .y_desc("latency, µs (filled: p50, hollow: p99)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    let count = series.len().max(1) as f64;
    for (k, s) in series.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        // Spread the series within each group so their dots do not cover each other.
        let dx = (k as f64 - (count - 1.0) / 2.0) * (0.6 / count);
        let points: Vec<(f64, f64, f64)> = s
            .values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|(p50, p99)| (i as f64 + dx, p50.max(lo), p99.max(lo))))
            .collect();
        chart
            .draw_series(
                points
                    .iter()
                    .map(|(x, p50, _)| Circle::new((*x, *p50), 6, color.filled())),
            )?
            .label(s.name.clone())
            .legend(move |(x, y)| Circle::new((x + 8, y), 5, color.filled()));
        chart.draw_series(
            points
                .iter()
                .map(|(x, _, p99)| Circle::new((*x, *p99), 6, color.stroke_width(2))),
        )?;
        chart.draw_series(
            points
                .iter()
                .map(|(x, p50, p99)| PathElement::new(vec![(*x, *p50), (*x, *p99)], color.stroke_width(1))),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// One named line of a [`lines`] chart.
pub struct LineData {
    /// Legend name.
    pub name: String,
    /// (x, y) points, x ascending.
    pub points: Vec<(f64, f64)>,
}

/// Axes of a [`lines`] chart.
pub struct Axes<'a> {
    /// Chart title.
    pub title: &'a str,
    /// x axis description.
    pub x_desc: &'a str,
    /// y axis description.
    pub y_desc: &'a str,
    /// Log scale on y too (x is always log).
    pub log_y: bool,
}

/// Lines with dots against a log x axis (callers, N, …).
pub fn lines(out: &Path, axes: &Axes<'_>, data: &[LineData]) -> anyhow::Result<()> {
    register_font()?;
    create_parent(out)?;
    let xs = data.iter().flat_map(|d| d.points.iter().map(|p| p.0));
    let ys: Vec<f64> = data.iter().flat_map(|d| d.points.iter().map(|p| p.1)).collect();
    let (x_lo, x_hi) = xs.fold((f64::INFINITY, 1.0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let x_lo = if x_lo.is_finite() { x_lo.max(1e-9) } else { 1.0 };
    let y_hi = ys.iter().copied().fold(1.0, f64::max);
    let y_lo = ys
        .iter()
        .copied()
        .filter(|y| *y > 0.0)
        .fold(f64::INFINITY, f64::min);
    let root = BitMapBackend::new(out, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(axes.title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80);
    let x_range = ((x_lo / 1.5)..(x_hi * 1.5)).log_scale();
    if axes.log_y {
        let lo = if y_lo.is_finite() { y_lo / 2.0 } else { 0.1 };
        let mut chart = builder.build_cartesian_2d(x_range, (lo..(y_hi * 2.0)).log_scale())?;
        chart
            .configure_mesh()
            .x_desc(axes.x_desc)
            .y_desc(axes.y_desc)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        draw_lines(&mut chart, data)?;
    } else {
        let mut chart = builder.build_cartesian_2d(x_range, 0f64..(y_hi * 1.15))?;
        chart
            .configure_mesh()
            .x_desc(axes.x_desc)
            .y_desc(axes.y_desc)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        draw_lines(&mut chart, data)?;
    }
    root.present()?;
    Ok(())
}

fn draw_lines<'a, 'b: 'a, X, Y>(
    chart: &mut ChartContext<'a, BitMapBackend<'b>, Cartesian2d<X, Y>>,
    data: &[LineData],
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (k, d) in data.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        chart
            .draw_series(LineSeries::new(d.points.clone(), color.stroke_width(2)))?
            .label(d.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(d.points.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// `kleidi-scale`'s output, as far as the plot needs it.
#[derive(Deserialize)]
struct Scale {
    rows: Vec<ScaleRow>,
}

#[derive(Deserialize)]
struct ScaleRow {
    n: f64,
    decrypt_rpcs: f64,
    backend_decrypt_items: f64,
    backend_requests: f64,
}

/// "Decrypt RPCs and backend calls against N" from `target/bench/scale.json`.
pub fn plot_scale(input: &Path, out: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let scale: Scale = serde_json::from_str(&text).with_context(|| format!("parsing {}", input.display()))?;
    let mut rows = scale.rows;
    rows.sort_by(|a, b| a.n.total_cmp(&b.n));
    let series = |name: &str, f: fn(&ScaleRow) -> f64| LineData {
        name: name.into(),
        points: rows.iter().map(|r| (r.n, f(r))).collect(),
    };
    lines(
        out,
        &Axes {
            title: "Decrypt RPCs and backend calls against N (cold start, all Secrets read)",
            x_desc: "N Secrets (log)",
            y_desc: "count",
            log_y: false,
        },
        &[
            series("Decrypt RPCs", |r| r.decrypt_rpcs),
            series("backend decrypt items", |r| r.backend_decrypt_items),
            series("backend requests", |r| r.backend_requests),
        ],
    )
}
