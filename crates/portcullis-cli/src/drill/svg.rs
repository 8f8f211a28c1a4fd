//! `drill outage --svg FILE`: requests per second by outcome for each stack, with the outage
//! shaded and the primary's breaker state drawn under the curves.

use std::path::Path;
use std::time::Duration;

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
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "{}: requests/s by outcome (grey: the outage; bottom band: the primary's breaker, \
                 green closed, amber half-open, red open)",
                t.name
            ),
            ("sans-serif", 14),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(0f64..secs, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("req/s")
        .draw()?;

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
    for ((data, name), color) in series.iter().zip(names).zip(colors) {
        chart
            .draw_series(LineSeries::new(
                data.iter().enumerate().map(|(i, v)| (i as f64 * BIN, *v)),
                color.stroke_width(2),
            ))?
            .label(name)
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
