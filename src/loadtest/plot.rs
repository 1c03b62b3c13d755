//! `--plot DIR`: SVG charts of a run, per second: latency percentiles (`latency.svg`) and
//! throughput (`throughput.svg`), with the mock upstream's outage windows shaded.

use std::path::Path;

use plotters::prelude::*;

use super::report::Stats;

/// Why a chart could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The directory could not be created.
    #[error("cannot create the directory")]
    Io(#[from] std::io::Error),
    /// Drawing failed.
    #[error("drawing failed: {0}")]
    Draw(String),
}

/// One line of a chart: its name, points (second, value) and colour.
type Series<'a> = (&'a str, Vec<(f64, f64)>, RGBColor);

fn draw_err<E: std::fmt::Display>(e: E) -> PlotError {
    PlotError::Draw(e.to_string())
}

/// Write both charts into `dir` (created if missing).
pub fn write(dir: &Path, stats: &Stats, outages_ms: &[[u64; 2]]) -> Result<(), PlotError> {
    std::fs::create_dir_all(dir)?;
    let seconds = stats.timeline.len().max(1) as f64;
    let q = |p: f64| -> Vec<(f64, f64)> {
        stats
            .timeline
            .iter()
            .enumerate()
            .filter(|(_, h)| !h.is_empty())
            .map(|(s, h)| (s as f64 + 0.5, h.value_at_quantile(p) as f64 / 1000.0))
            .collect()
    };
    let series = [
        ("p50", q(0.5), BLUE),
        ("p90", q(0.9), GREEN),
        ("p99", q(0.99), RED),
    ];
    let top = series
        .iter()
        .flat_map(|(_, pts, _)| pts.iter().map(|(_, y)| *y))
        .fold(1.0, f64::max)
        * 1.1;
    chart(
        &dir.join("latency.svg"),
        "latency per second (ms)",
        seconds,
        top,
        outages_ms,
        &series,
    )?;
    let rps: Vec<(f64, f64)> = stats
        .timeline
        .iter()
        .enumerate()
        .map(|(s, h)| (s as f64 + 0.5, h.len() as f64))
        .collect();
    let top = rps.iter().map(|(_, y)| *y).fold(1.0, f64::max) * 1.1;
    chart(
        &dir.join("throughput.svg"),
        "answers per second",
        seconds,
        top,
        outages_ms,
        &[("rps", rps, BLUE)],
    )
}

fn chart(
    path: &Path,
    title: &str,
    seconds: f64,
    top: f64,
    outages_ms: &[[u64; 2]],
    series: &[Series<'_>],
) -> Result<(), PlotError> {
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..seconds, 0f64..top)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .draw()
        .map_err(draw_err)?;
    chart
        .draw_series(outages_ms.iter().map(|[from, to]| {
            Rectangle::new(
                [(*from as f64 / 1000.0, 0.0), (*to as f64 / 1000.0, top)],
                RGBColor(255, 200, 200).mix(0.5).filled(),
            )
        }))
        .map_err(draw_err)?
        .label("upstream down")
        .legend(|(x, y)| {
            Rectangle::new(
                [(x, y - 5), (x + 15, y + 5)],
                RGBColor(255, 200, 200).filled(),
            )
        });
    for (name, points, color) in series {
        let color = *color;
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(draw_err)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 15, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(draw_err)?;
    root.present().map_err(draw_err)?;
    Ok(())
}
