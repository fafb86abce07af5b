//! The SVG plot: total time against VF count per mode, with sigma bars, and
//! the paper's Table I drawn beside (dashed, labelled as the paper's).

use std::path::Path;

use plotters::prelude::*;

use super::report::{label, BenchReport};
use crate::error::Error;

fn err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Bench {
        what: format!("drawing the plot {}: {e}", path.display()),
        source: None,
    }
}

/// Draws `report` into the SVG file `path`.
pub fn draw(report: &BenchReport, path: &Path) -> Result<(), Error> {
    let e = |x: &dyn std::fmt::Display| err(path, x);
    let max_vfs = report
        .series
        .iter()
        .map(|s| s.vfs)
        .chain(report.paper_table_i.iter().map(|p| p.vfs))
        .max()
        .unwrap_or(1);
    let max_ms = report
        .series
        .iter()
        .map(|s| s.summary.avg_ms + s.summary.sigma_ms)
        .chain(report.paper_table_i.iter().map(|p| p.ms))
        .fold(1.0f64, f64::max);
    let min_ms = report
        .series
        .iter()
        .map(|s| s.summary.avg_ms - s.summary.sigma_ms)
        .chain(report.paper_table_i.iter().map(|p| p.ms))
        .filter(|v| *v > 0.0)
        .fold(max_ms, f64::min);
    // Log scale: the paper's tens of seconds and the lab's seconds both readable.
    let (y0, y1) = ((min_ms / 1.5).max(1.0), max_ms * 1.5);
    let root = SVGBackend::new(path, (960, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let caption = format!(
        "svff bench: one reconfiguration, PF {} ({}), {} runs each",
        report.pf, report.profile, report.runs
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(0f64..f64::from(max_vfs) + 1.0, (y0..y1).log_scale())
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("assigned VFs")
        .y_desc("total time (ms, log scale)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|x| e(&x))?;

    let mut keys: Vec<(String, String)> = report
        .series
        .iter()
        .map(|s| (s.mode.clone(), s.vmm.clone()))
        .collect();
    // Unique, in order of first appearance (series come per VF count, modes interleaved).
    let mut seen = Vec::new();
    keys.retain(|k| {
        let new = !seen.contains(k);
        if new {
            seen.push(k.clone());
        }
        new
    });
    for (i, (mode, vmm)) in keys.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mut pts: Vec<(f64, f64, f64)> = report
            .series
            .iter()
            .filter(|s| &s.mode == mode && &s.vmm == vmm)
            .map(|s| (f64::from(s.vfs), s.summary.avg_ms, s.summary.sigma_ms))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.1)),
                color.stroke_width(2),
            ))
            .map_err(|x| e(&x))?
            .label(format!("{} (this run)", label(mode, vmm)))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                pts.iter()
                    .map(|p| Circle::new((p.0, p.1), 3, color.filled())),
            )
            .map_err(|x| e(&x))?;
        // Sigma bars with short caps.
        let cap = 0.08;
        chart
            .draw_series(pts.iter().flat_map(|&(x, y, s)| {
                let (lo, hi) = ((y - s).max(y0), y + s);
                let (y, s) = ((lo + hi) / 2.0, (hi - lo) / 2.0);
                [
                    PathElement::new(vec![(x, y - s), (x, y + s)], color.stroke_width(1)),
                    PathElement::new(
                        vec![(x - cap, y - s), (x + cap, y - s)],
                        color.stroke_width(1),
                    ),
                    PathElement::new(
                        vec![(x - cap, y + s), (x + cap, y + s)],
                        color.stroke_width(1),
                    ),
                ]
            }))
            .map_err(|x| e(&x))?;
    }

    let mut paper_modes: Vec<&str> = Vec::new();
    for p in &report.paper_table_i {
        if !paper_modes.contains(&p.mode.as_str()) {
            paper_modes.push(p.mode.as_str());
        }
    }
    for (j, mode) in paper_modes.iter().enumerate() {
        let color = if j == 0 {
            BLACK.mix(0.6)
        } else {
            RGBColor(120, 120, 120).mix(0.8)
        };
        let pts: Vec<(f64, f64)> = report
            .paper_table_i
            .iter()
            .filter(|p| p.mode == *mode)
            .map(|p| (f64::from(p.vfs), p.ms))
            .collect();
        chart
            .draw_series(
                dashed(&pts, 0.25)
                    .into_iter()
                    .map(|seg| PathElement::new(seg, color.stroke_width(1))),
            )
            .map_err(|x| e(&x))?
            .label(format!("{mode} (paper, CITS 2023 Table I, FPGA host)"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 8, y)], color.stroke_width(1))
            });
        chart
            .draw_series(pts.iter().map(|&p| Cross::new(p, 5, color.stroke_width(2))))
            .map_err(|x| e(&x))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// The polyline through `pts` cut into dashes of `len` (in x units).
fn dashed(pts: &[(f64, f64)], len: f64) -> Vec<Vec<(f64, f64)>> {
    let mut out = Vec::new();
    for w in pts.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        let dx = x1 - x0;
        if dx <= 0.0 {
            continue;
        }
        let n = (dx / len).ceil().max(1.0) as usize;
        for k in (0..n).step_by(2) {
            let a = k as f64 / n as f64;
            let b = ((k + 1) as f64 / n as f64).min(1.0);
            out.push(vec![
                (x0 + dx * a, y0 + (y1 - y0) * a),
                (x0 + dx * b, y0 + (y1 - y0) * b),
            ]);
        }
    }
    out
}
