//! The loss chart: raw points and a smoothed curve, the learning rate in a small linked plot below, epoch
//! boundaries as vertical lines. Long runs are thinned to about two points per pixel column (keeping each
//! column's minimum and maximum) so 100k steps still draw smoothly.

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

/// Draws the loss and learning-rate plots.
pub fn loss_chart_ui(ui: &mut egui::Ui, losses: &[LossPoint], steps_per_epoch: u64) {
    let raw: Vec<[f64; 2]> = losses
        .iter()
        .filter(|p| p.loss.is_finite())
        .map(|p| [p.step as f64, p.loss])
        .collect();
    let smooth = thin(&smoothed(losses));
    let raw = thin(&raw);
    let last_step = losses.last().map_or(0, |p| p.step);
    let link = egui::Id::unique("loss-lr-link");
    Plot::new("loss")
        .height(220.0)
        .legend(Legend::default())
        .x_axis_label("step")
        .y_axis_label("loss")
        .link_axis(link, [true, false])
        .show(ui, |plot| {
            plot.points(Points::new("loss", PlotPoints::from(raw)).radius(1.2));
            plot.line(Line::new("smoothed", PlotPoints::from(smooth)).width(2.0));
            if steps_per_epoch > 0 {
                let mut boundary = steps_per_epoch;
                while boundary < last_step {
                    plot.vline(VLine::new(
                        format!("epoch {}", boundary / steps_per_epoch + 1),
                        boundary as f64,
                    ));
                    boundary += steps_per_epoch;
                }
            }
        });
    let lr: Vec<[f64; 2]> = losses.iter().map(|p| [p.step as f64, p.lr]).collect();
    Plot::new("learning-rate")
        .height(90.0)
        .x_axis_label("step")
        .y_axis_label("lr")
        .link_axis(link, [true, false])
        .show(ui, |plot| {
            plot.line(Line::new("learning rate", PlotPoints::from(thin(&lr))))
        });
}

#[cfg(test)]
mod tests {
    use super::thin;

    #[test]
    fn thinning_keeps_extremes_and_bounds_the_count() {
        let points: Vec<[f64; 2]> = (0..100_000).map(|i| [i as f64, (i % 97) as f64]).collect();
        let thinned = thin(&points);
        assert!(thinned.len() <= 4000);
        let max = thinned.iter().map(|p| p[1]).fold(f64::MIN, f64::max);
        assert_eq!(max, 96.0);
        assert!(thinned.windows(2).all(|w| w[0][0] <= w[1][0]));
    }
}
