//! The loss chart: raw points and a smoothed curve, the learning rate in a small linked plot below, epoch
//! boundaries as vertical lines. Long runs are thinned to about two points per pixel column (keeping each
//! column's minimum and maximum) so 100k steps still draw smoothly; zoomed in, only the visible steps are
//! thinned, so detail appears as you zoom.

use egui_plot::{Legend, Line, Plot, PlotPoints, Points, VLine};

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
    let lr: Vec<[f64; 2]> = losses.iter().map(|p| [p.step as f64, p.lr]).collect();
    Plot::new("learning-rate")
        .height(LR_PLOT_HEIGHT)
        .x_axis_label("step")
        .y_axis_label("lr")
        .link_axis(link, [true, false])
        .show(ui, |plot| {
            let lr = thinned_for_view(plot, &lr);
            plot.line(Line::new("learning rate", PlotPoints::from(lr)))
        });
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
    use super::{epoch_marks, in_range, thin};

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
