//! Learning-rate schedules as pure functions of the optimizer step (the diffusers/transformers formulas).

use crate::config::LrScheduler;

/// The learning-rate factor (multiplied with the base rate) at `step` (0-based) of `total` steps.
pub fn lr_factor(kind: LrScheduler, step: u64, total: u64, warmup: u64, cycles: u32) -> f64 {
    let warming = warmup > 0 && step < warmup;
    let warmup_factor = (step as f64 + 1.0) / warmup.max(1) as f64;
    let progress = || {
        let span = total.saturating_sub(warmup).max(1) as f64;
        ((step.saturating_sub(warmup)) as f64 / span).clamp(0.0, 1.0)
    };
    match kind {
        LrScheduler::Constant => 1.0,
        LrScheduler::ConstantWithWarmup => {
            if warming {
                warmup_factor
            } else {
                1.0
            }
        }
        LrScheduler::Linear => {
            if warming {
                warmup_factor
            } else {
                (1.0 - progress()).max(0.0)
            }
        }
        LrScheduler::Cosine => {
            if warming {
                warmup_factor
            } else {
                0.5 * (1.0 + (std::f64::consts::PI * progress()).cos())
            }
        }
        LrScheduler::CosineWithRestarts => {
            if warming {
                warmup_factor
            } else {
                let p = progress();
                if p >= 1.0 {
                    0.0
                } else {
                    let cycle_progress = (cycles.max(1) as f64 * p) % 1.0;
                    0.5 * (1.0 + (std::f64::consts::PI * cycle_progress).cos())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::lr_factor;
    use crate::config::LrScheduler;

    #[test]
    fn schedules_follow_their_shapes() {
        assert_eq!(lr_factor(LrScheduler::Constant, 5, 10, 3, 1), 1.0);
        assert!((lr_factor(LrScheduler::ConstantWithWarmup, 0, 10, 4, 1) - 0.25).abs() < 1e-12);
        assert_eq!(lr_factor(LrScheduler::ConstantWithWarmup, 4, 10, 4, 1), 1.0);
        assert!((lr_factor(LrScheduler::Linear, 5, 10, 0, 1) - 0.5).abs() < 1e-12);
        assert!((lr_factor(LrScheduler::Cosine, 0, 10, 0, 1) - 1.0).abs() < 1e-12);
        assert!((lr_factor(LrScheduler::Cosine, 5, 10, 0, 1) - 0.5).abs() < 1e-12);
        // Two cycles: back to the top half-way.
        assert!((lr_factor(LrScheduler::CosineWithRestarts, 5, 10, 0, 2) - 1.0).abs() < 1e-12);
        assert!(lr_factor(LrScheduler::CosineWithRestarts, 4, 10, 0, 2) < 0.2);
    }
}
