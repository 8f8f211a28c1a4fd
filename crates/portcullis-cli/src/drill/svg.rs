//! `drill outage --svg FILE`: requests per second by outcome for each stack, with the outage
//! shaded and the primary's breaker state drawn under the curves.

use std::path::Path;
use std::time::Duration;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::stacks::StackKind;
use super::workload::Outcome;

/// One stack's run, for the chart.
pub struct Timeline {
    /// The stack.
    pub name: StackKind,
    /// Every request.
    pub outcomes: Vec<Outcome>,
    /// Breaker transitions of the primary: `(at, from, to)`.
    pub transitions: Vec<(Duration, String, String)>,
    /// When the outage started and ended.
    pub outage: (Duration, Duration),
    /// The run's length.
    pub total: Duration,
}

const BIN: f64 = 0.25;

/// Writes the chart.
pub fn write(path: &Path, timelines: &[Timeline]) -> Result<(), Box<dyn std::error::Error>> {
    let height = 260 * timelines.len() as u32;
    let root = SVGBackend::new(path, (960, height.max(260))).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((timelines.len().max(1), 1));
    for (t, area) in timelines.iter().zip(panels.iter()) {
        draw(t, area)?;
    }
    root.present()?;
    Ok(())
}

fn draw<DB: DrawingBackend>(
    t: &Timeline,
    area: &DrawingArea<DB, plotters::coord::Shift>,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let secs = t.total.as_secs_f64() + 1.0;
    let bins = (secs / BIN).ceil() as usize;
    let mut series = [vec![0f64; bins], vec![0f64; bins], vec![0f64; bins]];
    for o in &t.outcomes {
        let b = ((o.done.as_secs_f64() / BIN) as usize).min(bins - 1);
        let s = match &o.result {
            Ok(s) if s.provider == "openai" => 0,
            Ok(_) => 1,
            Err(_) => 2,
        };
        series[s][b] += 1.0 / BIN;
    }
    let ymax = series.iter().flatten().cloned().fold(10.0, f64::max) * 1.15;
    let caption = format!(
        "{}: requests/s by outcome (grey: the outage; bottom band: the primary's breaker, \
         green closed, amber half-open, red open)",
        t.name
    );
    let mut chart = chart(area, caption, secs, ymax, "req/s")?;

    // The outage, shaded.
    let (a, b) = (t.outage.0.as_secs_f64(), t.outage.1.as_secs_f64());
    chart.draw_series(std::iter::once(Rectangle::new(
        [(a, 0.0), (b, ymax)],
        RGBColor(235, 235, 235).filled(),
    )))?;
    // Breaker state: a band along the bottom, red while open, amber while half-open.
    let mut state = ("closed".to_string(), 0.0);
    let mut bands = Vec::new();
    for (at, _from, to) in &t.transitions {
        bands.push((state.0.clone(), state.1, at.as_secs_f64()));
        state = (to.clone(), at.as_secs_f64());
    }
    bands.push((state.0, state.1, secs));
    let band = ymax * 0.04;
    for (s, from, to) in bands {
        let color = match s.as_str() {
            "open" => RGBColor(214, 39, 40),
            "half_open" => RGBColor(255, 160, 0),
            _ => RGBColor(44, 160, 44),
        };
        if !t.transitions.is_empty() {
            chart.draw_series(std::iter::once(Rectangle::new(
                [(from, 0.0), (to, band)],
                color.filled(),
            )))?;
        }
    }
    let names = ["served by primary", "served by secondary", "failed"];
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(148, 103, 189),
        RGBColor(214, 39, 40),
    ];
    lines(&mut chart, &series, &names, &colors)
}

type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A panel: seconds across, `y` up to `ymax`, with its caption and mesh.
fn chart<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, plotters::coord::Shift>,
    caption: String,
    secs: f64,
    ymax: f64,
    y: &str,
) -> Result<Chart<'a, DB>, Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 14))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(0f64..secs, 0f64..ymax)?;
    chart.configure_mesh().x_desc("seconds").y_desc(y).draw()?;
    Ok(chart)
}

/// Draws one line per series (a value per [`BIN`]) with its legend.
fn lines<'a, DB: DrawingBackend + 'a>(
    chart: &mut Chart<'a, DB>,
    series: &[Vec<f64>],
    names: &[&str],
    colors: &[RGBColor],
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    for ((data, name), color) in series.iter().zip(names).zip(colors) {
        let color = *color;
        chart
            .draw_series(LineSeries::new(
                data.iter().enumerate().map(|(i, v)| (i as f64 * BIN, *v)),
                color.stroke_width(2),
            ))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

/// `drill pool --svg FILE`: for each stack, each deployment's share of the calls served per
/// quarter second, and the calls failed, with `b`'s slow phase and `c`'s outage shaded.
pub fn write_pool(
    path: &Path,
    runs: &[super::pool::Run],
) -> Result<(), Box<dyn std::error::Error>> {
    use super::pool::{DURATION, OUTAGE, SLOW};
    let root = SVGBackend::new(path, (960, 260 * runs.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((runs.len().max(1), 1));
    let secs = DURATION.as_secs_f64() + 2.0;
    let bins = (secs / BIN).ceil() as usize;
    for (run, area) in runs.iter().zip(panels.iter()) {
        // Requests per second by deployment `a`, `b`, `c`, and failed.
        let mut series = vec![vec![0f64; bins]; 4];
        for o in &run.outcomes {
            let b = ((o.done.as_secs_f64() / BIN) as usize).min(bins - 1);
            let s = match &o.result {
                Ok(s) => ["a", "b", "c"]
                    .iter()
                    .position(|d| *d == s.provider)
                    .unwrap_or(3),
                Err(_) => 3,
            };
            series[s][b] += 1.0 / BIN;
        }
        let ymax = series.iter().flatten().cloned().fold(10.0, f64::max) * 1.15;
        let caption = format!(
            "{}: calls/s served by each deployment (light: b slow; grey: c down)",
            run.name
        );
        let mut chart = chart(area, caption, secs, ymax, "calls/s")?;
        let phases = [
            (SLOW.0, SLOW.1, RGBColor(245, 240, 225)),
            (OUTAGE.0, OUTAGE.1, RGBColor(230, 230, 230)),
        ];
        for (from, to, color) in phases {
            chart.draw_series(std::iter::once(Rectangle::new(
                [(from.as_secs_f64(), 0.0), (to.as_secs_f64(), ymax)],
                color.filled(),
            )))?;
        }
        let names = ["a", "b (slows)", "c (goes down)", "failed"];
        let colors = [
            RGBColor(31, 119, 180),
            RGBColor(255, 127, 14),
            RGBColor(44, 160, 44),
            RGBColor(214, 39, 40),
        ];
        lines(&mut chart, &series, &names, &colors)?;
    }
    root.present()?;
    Ok(())
}
