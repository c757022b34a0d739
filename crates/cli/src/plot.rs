//! `tokenfab sim --plot FILE.svg`: TTFT distributions and load over time, one line per
//! policy, as an SVG (plotters).

use plotters::prelude::*;
use tokenfab_sim::cluster::Report;

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Left: the TTFT CDF of every policy; right: requests in flight over time.
pub fn write(path: &std::path::Path, reports: &[Report]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(600);

    let max_ttft = reports
        .iter()
        .flat_map(|r| r.ttfts.iter().copied())
        .fold(1.0, f64::max);
    let mut cdf = ChartBuilder::on(&left)
        .caption("TTFT distribution", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(44)
        .build_cartesian_2d(0.0..max_ttft * 1.02, 0.0..1.0)
        .map_err(err)?;
    cdf.configure_mesh()
        .x_desc("time to first token (ms)")
        .y_desc("share of requests")
        .draw()
        .map_err(err)?;
    for (i, r) in reports.iter().enumerate() {
        let mut xs = r.ttfts.clone();
        xs.sort_by(f64::total_cmp);
        let n = xs.len().max(1) as f64;
        let colour = COLOURS[i % COLOURS.len()];
        cdf.draw_series(LineSeries::new(
            xs.iter().enumerate().map(|(k, &x)| (x, (k + 1) as f64 / n)),
            colour.stroke_width(2),
        ))
        .map_err(err)?
        .label(r.label())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
    }
    cdf.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;

    let max_t = reports.iter().map(|r| r.makespan_s).fold(1e-3, f64::max);
    let max_load = reports
        .iter()
        .flat_map(|r| r.timeline.iter().map(|p| p.in_flight))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut load = ChartBuilder::on(&right)
        .caption("requests in flight", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(44)
        .build_cartesian_2d(0.0..max_t, 0u64..max_load + max_load / 10 + 1)
        .map_err(err)?;
    load.configure_mesh()
        .x_desc("time (s)")
        .y_desc("requests")
        .draw()
        .map_err(err)?;
    for (i, r) in reports.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        load.draw_series(LineSeries::new(
            r.timeline.iter().map(|p| (p.t_s, p.in_flight)),
            colour.stroke_width(2),
        ))
        .map_err(err)?
        .label(r.label())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
    }
    load.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}
