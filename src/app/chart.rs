//! The loss chart: raw points and a smoothed curve, the learning rate in a small linked plot below, epoch
//! boundaries as vertical lines. Long runs are thinned to about two points per pixel column (keeping each
//! column's minimum and maximum) so 100k steps still draw smoothly; zoomed in, only the visible steps are
//! thinned, so detail appears as you zoom.

use egui_plot::{HoverPosition, Legend, Line, Plot, PlotPoints, Points, VLine};

use crate::messages::LossPoint;

/// Exponential smoothing factor of the smoothed curve.
const SMOOTHING: f64 = 0.95;

/// At most this many points are drawn per series.
const MAX_DRAWN: usize = 4000;

/// `[step, value]` thinned to at most `MAX_DRAWN` points, keeping each bucket's extremes.
pub fn thin(points: &[[f64; 2]]) -> Vec<[f64; 2]> {
    if points.len() <= MAX_DRAWN {
        return points.to_vec();
    }
    let bucket = points.len().div_ceil(MAX_DRAWN / 2);
    points
        .chunks(bucket)
        .flat_map(|chunk| {
            let min = chunk.iter().copied().min_by(|a, b| a[1].total_cmp(&b[1]));
            let max = chunk.iter().copied().max_by(|a, b| a[1].total_cmp(&b[1]));
            let mut pair: Vec<[f64; 2]> = min.into_iter().chain(max).collect();
            pair.sort_by(|a, b| a[0].total_cmp(&b[0]));
            pair
        })
        .collect()
}

/// The exponentially smoothed loss.
pub fn smoothed(losses: &[LossPoint]) -> Vec<[f64; 2]> {
    let mut value: Option<f64> = None;
    losses
        .iter()
        .filter(|p| p.loss.is_finite())
        .map(|p| {
            let v = match value {
                Some(v) => SMOOTHING * v + (1.0 - SMOOTHING) * p.loss,
                None => p.loss,
            };
            value = Some(v);
            [p.step as f64, v]
        })
        .collect()
}

/// The points whose step lies in `[from, to]` plus one neighbour on each side, so lines reach the edges.
fn in_range(points: &[[f64; 2]], from: f64, to: f64) -> &[[f64; 2]] {
    let start = points.partition_point(|p| p[0] < from).saturating_sub(1);
    let end = (points.partition_point(|p| p[0] <= to) + 1).min(points.len());
    &points[start..end.max(start)]
}

/// Steps where an epoch starts, every `stride`-th epoch so that at most `MAX_EPOCH_MARKS` show.
fn epoch_marks(steps_per_epoch: u64, last_step: u64) -> Vec<u64> {
    if steps_per_epoch == 0 {
        return Vec::new();
    }
    let epochs = last_step.saturating_sub(1) / steps_per_epoch;
    let stride = epochs.div_ceil(MAX_EPOCH_MARKS).max(1);
    (1..=epochs)
        .filter(|e| e % stride == 0)
        .map(|e| e * steps_per_epoch)
        .collect()
}

/// Width of both plots' y axes, wide enough for `1.0e-3`, so that their steps line up.
const Y_AXIS_WIDTH: f32 = 64.0;

/// Height of the learning-rate plot under the loss plot.
const LR_PLOT_HEIGHT: f32 = 90.0;

/// At most this many epoch boundaries are drawn.
const MAX_EPOCH_MARKS: u64 = 40;

/// Draws `series` thinned: the whole run while the plot follows it, only the visible steps (at full
/// detail) once the user zooms or pans.
fn thinned_for_view(plot: &egui_plot::PlotUi<'_>, series: &[[f64; 2]]) -> Vec<[f64; 2]> {
    if plot.auto_bounds().x {
        return thin(series);
    }
    let bounds = plot.plot_bounds();
    thin(in_range(series, bounds.min()[0], bounds.max()[0]))
}

/// Draws the loss and learning-rate plots.
pub fn loss_chart_ui(ui: &mut egui::Ui, losses: &[LossPoint], steps_per_epoch: u64) {
    let raw: Vec<[f64; 2]> = losses
        .iter()
        .filter(|p| p.loss.is_finite())
        .map(|p| [p.step as f64, p.loss])
        .collect();
    let smooth = smoothed(losses);
    let last_step = losses.last().map_or(0, |p| p.step);
    let link = egui::Id::unique("loss-lr-link");
    let epoch_colour = ui.visuals().weak_text_color().gamma_multiply(0.5);
    let loss_height = (ui.available_height() - LR_PLOT_HEIGHT - 80.0).max(220.0);
    if losses.is_empty() {
        empty_chart_ui(ui, loss_height + LR_PLOT_HEIGHT);
        return;
    }
    Plot::new("loss")
        .height(loss_height)
        .y_axis_min_width(Y_AXIS_WIDTH)
        .legend(Legend::default())
        .x_axis_label("step")
        .y_axis_label("loss")
        .link_axis(link, [true, false])
        .show(ui, |plot| {
            let (raw, smooth) = (
                thinned_for_view(plot, &raw),
                thinned_for_view(plot, &smooth),
            );
            plot.points(Points::new("loss", PlotPoints::from(raw)).radius(1.2));
            plot.line(Line::new("smoothed", PlotPoints::from(smooth)).width(2.0));
            for step in epoch_marks(steps_per_epoch, last_step) {
                plot.vline(VLine::new("epoch start", step as f64).color(epoch_colour));
            }
        });
    learning_rate_chart_ui(ui, losses, link);
}

/// The learning-rate plot, x-linked to the loss plot, with the current rate written above it.
fn learning_rate_chart_ui(ui: &mut egui::Ui, losses: &[LossPoint], link: egui::Id) {
    let lr: Vec<[f64; 2]> = losses
        .iter()
        .filter(|p| p.lr.is_finite())
        .map(|p| [p.step as f64, p.lr])
        .collect();
    let Some(&[_, current]) = lr.last() else {
        return;
    };
    ui.label(format!("learning rate {}", format_lr(current)));
    let (low, high) = lr_axis_range(lr.iter().map(|p| p[1]));
    Plot::new("learning-rate")
        .id(egui::Id::unique(LR_PLOT_ID))
        .height(LR_PLOT_HEIGHT)
        .x_axis_label("step")
        .y_axis_label("lr")
        .include_y(low)
        .include_y(high)
        .y_axis_formatter(|mark, _| format_lr_tick(mark.value, mark.step_size))
        .y_axis_min_width(Y_AXIS_WIDTH)
        .label_formatter(|hover| {
            let (HoverPosition::NearDataPoint { position, .. }
            | HoverPosition::Elsewhere { position }) = hover;
            Some(format!(
                "step {:.0}\nlr {}",
                position.x,
                format_lr(position.y)
            ))
        })
        .link_axis(link, [true, false])
        .show(ui, |plot| {
            let lr = thinned_for_view(plot, &lr);
            plot.line(Line::new("learning rate", PlotPoints::from(lr)))
        });
}

/// The learning-rate plot's id (fixed, so its bounds can be read back).
const LR_PLOT_ID: &str = "learning-rate-plot";

/// Share of the spread added above and below a changing learning rate.
const LR_MARGIN: f64 = 0.1;

/// The y range of the learning-rate plot: the rates' range with a margin, or for a (nearly) constant rate a
/// band of half its value on each side. egui_plot's own fit collapses on a flat line (zero height) to a
/// default range around 0 in which a rate like 1e-3 is an invisible line on the axis.
fn lr_axis_range(rates: impl Iterator<Item = f64>) -> (f64, f64) {
    let (low, high) = rates.fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), r| {
        (low.min(r), high.max(r))
    });
    if !low.is_finite() || !high.is_finite() {
        return (0.0, 1.0);
    }
    let magnitude = low.abs().max(high.abs());
    let spread = high - low;
    let pad = if spread > magnitude * 1e-3 {
        spread * LR_MARGIN
    } else if magnitude > 0.0 {
        magnitude / 2.0
    } else {
        1.0
    };
    (low - pad, high + pad)
}

/// A learning rate as people write it: `1.0e-3`, `2.5e-4`, `0`.
fn format_lr(rate: f64) -> String {
    format_lr_tick(rate, rate.abs() / 10.0)
}

/// A tick of the learning-rate axis with as many digits as the ticks' spacing `step` needs to tell
/// neighbours apart (`1.05e-3` next to `1.10e-3`), and at least one.
fn format_lr_tick(rate: f64, step: f64) -> String {
    if rate == 0.0 || !rate.is_finite() {
        return format!("{rate}");
    }
    let decimals = (rate.abs().log10().floor() - step.abs().log10().floor()).clamp(1.0, 6.0);
    format!("{rate:.*e}", decimals as usize)
}

/// Before the first step: a framed area of the charts' height that says what will appear there (empty
/// plots would show meaningless axes from -0.5 to 0.5).
fn empty_chart_ui(ui: &mut egui::Ui, height: f32) {
    let size = egui::vec2(ui.available_width(), height);
    let (rect, _) = ui.allocate_exact_size(size, egui::Sense::hover());
    let visuals = ui.visuals();
    ui.painter().rect_stroke(
        rect,
        4.0,
        visuals.widgets.noninteractive.bg_stroke,
        egui::StrokeKind::Inside,
    );
    ui.painter().text(
        rect.center(),
        egui::Align2::CENTER_CENTER,
        "The loss of every step and the learning rate appear here once training starts.",
        egui::FontId::proportional(15.0),
        visuals.weak_text_color(),
    );
}

#[cfg(test)]
mod tests {
    use egui_kittest::Harness;
    use egui_kittest::kittest::Queryable as _;

    use super::{
        LR_PLOT_ID, epoch_marks, format_lr, format_lr_tick, in_range, loss_chart_ui, lr_axis_range,
        thin,
    };
    use crate::messages::LossPoint;

    /// 20 steps whose learning rate is `lr(step)`.
    fn run_with(lr: impl Fn(u64) -> f64) -> Vec<LossPoint> {
        (1..=20)
            .map(|step| LossPoint {
                step,
                epoch: 0,
                loss: 0.2 - step as f64 * 0.001,
                lr: lr(step),
                seconds: 0.5,
            })
            .collect()
    }

    /// The y range the learning-rate plot shows after drawing `losses` as they arrive, step by step.
    fn shown_lr_range(losses: &[LossPoint]) -> (f64, f64) {
        let mut harness = Harness::builder().with_size([900.0, 700.0]).build_ui_state(
            |ui, shown: &mut Vec<LossPoint>| loss_chart_ui(ui, shown, 10),
            Vec::new(),
        );
        for point in losses {
            harness.state_mut().push(*point);
            harness.run();
        }
        let memory = egui_plot::PlotMemory::load(&harness.ctx, egui::Id::unique(LR_PLOT_ID))
            .expect("the learning-rate plot was drawn");
        let bounds = memory.bounds();
        (bounds.min()[1], bounds.max()[1])
    }

    #[test]
    fn a_constant_learning_rate_shows_in_a_band_around_its_value() {
        let losses = run_with(|_| 1e-3);
        let (low, high) = shown_lr_range(&losses);
        // The line lies well inside, and the band is of the rate's own size (not -1..1 or -100..100).
        assert!(low > 0.0 && low < 0.9e-3, "{low}..{high}");
        assert!(high > 1.1e-3 && high < 2e-3, "{low}..{high}");
        let mut harness = Harness::builder()
            .with_size([900.0, 700.0])
            .build_ui(|ui| loss_chart_ui(ui, &losses, 10));
        harness.run();
        harness.get_by_label("learning rate 1.0e-3");
    }

    #[test]
    fn a_changing_learning_rate_fits_its_range() {
        // Linear warmup to 2e-4 over the run: the range follows the rates as they arrive.
        let (low, high) = shown_lr_range(&run_with(|step| 1e-5 * step as f64));
        assert!(low <= 1e-5 && low > -1e-4, "{low}..{high}");
        assert!((2e-4..3e-4).contains(&high), "{low}..{high}");
        // Warmup to 1e-3 in 5 steps, then constant.
        let (low, high) = shown_lr_range(&run_with(|step| 2e-4 * step.min(5) as f64));
        assert!(low <= 2e-4 && low > -3e-4, "{low}..{high}");
        assert!((1e-3..1.3e-3).contains(&high), "{low}..{high}");
    }

    #[test]
    fn axis_ranges_and_labels_of_learning_rates() {
        assert_eq!(lr_axis_range([0.0, 0.0].into_iter()), (-1.0, 1.0));
        let (low, high) = lr_axis_range([2e-4, 2e-4 * (1.0 + 1e-6)].into_iter());
        assert!(
            low > 0.0 && high < 4e-4 && high - low > 1e-4,
            "{low}..{high}"
        );
        assert_eq!(format_lr(1e-3), "1.0e-3");
        assert_eq!(format_lr(2.5e-4), "2.5e-4");
        assert_eq!(format_lr(0.0), "0");
        // Ticks 5e-5 apart keep a third digit, so neighbours differ.
        assert_eq!(format_lr_tick(1.05e-3, 5e-5), "1.05e-3");
        assert_eq!(format_lr_tick(1.1e-3, 5e-5), "1.10e-3");
        assert_eq!(format_lr_tick(5e-4, 1e-4), "5.0e-4");
    }

    #[test]
    fn thinning_keeps_extremes_and_bounds_the_count() {
        let points: Vec<[f64; 2]> = (0..100_000).map(|i| [i as f64, (i % 97) as f64]).collect();
        let thinned = thin(&points);
        assert!(thinned.len() <= 4000);
        let max = thinned.iter().map(|p| p[1]).fold(f64::MIN, f64::max);
        assert_eq!(max, 96.0);
        assert!(thinned.windows(2).all(|w| w[0][0] <= w[1][0]));
    }

    #[test]
    fn a_zoomed_range_keeps_its_edges() {
        let points: Vec<[f64; 2]> = (0..100).map(|i| [i as f64, 0.0]).collect();
        let visible = in_range(&points, 10.5, 20.5);
        assert_eq!((visible[0][0], visible[visible.len() - 1][0]), (10.0, 21.0));
        assert_eq!(in_range(&points, 200.0, 300.0).len(), 1);
        assert!(in_range(&[], 0.0, 1.0).is_empty());
    }

    #[test]
    fn epoch_marks_are_bounded() {
        assert_eq!(epoch_marks(10, 35), vec![10, 20, 30]);
        assert_eq!(epoch_marks(10, 30), vec![10, 20]);
        assert!(epoch_marks(10, 100_000).len() <= 40);
        assert!(epoch_marks(0, 100).is_empty());
    }
}
