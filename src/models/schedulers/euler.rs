//! Euler (discrete, deterministic) and Euler ancestral ("Euler a"): diffusers `EulerDiscreteScheduler` (linear
//! sigma interpolation, no churn: the sampler diffusers configures for SDXL) and
//! `EulerAncestralDiscreteScheduler`, both with leading spacing. The ancestral one steps below the next noise
//! level and adds fresh noise back up to it.
//!
//! They walk the table sigmas of their timesteps; Karras sigmas are DPM-Solver++'s, not offered here.

use candle_core::{Result, Tensor};

use super::sigmas::SigmaSchedule;
use super::{NoiseSource, PredictionType, Sampler, SchedulerConfig, weighted_sum};

/// The Euler or Euler ancestral sampler for a fixed number of steps.
#[derive(Debug, Clone)]
pub struct EulerSampler {
    schedule: SigmaSchedule,
    init_noise_sigma: f32,
    prediction: PredictionType,
    ancestral: bool,
}

impl EulerSampler {
    /// Euler: deterministic steps from one noise level to the next.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Self {
        Self::with_noise(config, steps, false)
    }

    /// Euler ancestral: every step but the last adds fresh noise.
    pub fn ancestral(config: &SchedulerConfig, steps: usize) -> Self {
        Self::with_noise(config, steps, true)
    }

    fn with_noise(config: &SchedulerConfig, steps: usize, ancestral: bool) -> Self {
        let schedule = SigmaSchedule::leading(config, steps);
        Self {
            init_noise_sigma: schedule.leading_init_noise_sigma(),
            schedule,
            prediction: config.prediction_type,
            ancestral,
        }
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }
}

/// The denoised estimate `x̂₀` at noise level `sigma` from a model output, for samples in sigma form
/// (`x = x₀ + σ·ε`, fed to the model as `x / √(σ² + 1)`).
fn denoised(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    match prediction {
        PredictionType::Epsilon => weighted_sum(sample, 1.0, model_output, -sigma),
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            weighted_sum(model_output, -sigma / s2.sqrt(), sample, 1.0 / s2)
        }
    }
}

/// The ancestral split of a step from `sigma` to `sigma_to`: the level to step down to deterministically and
/// the amount of fresh noise that brings the sample back up to `sigma_to`.
fn ancestral_levels(sigma: f32, sigma_to: f32) -> (f32, f32) {
    let sigma_up =
        (sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)).sqrt();
    let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
    (sigma_down, sigma_up)
}

impl Sampler for EulerSampler {
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        let sigma = self.schedule.sigmas[index];
        sample.affine(1.0 / (sigma * sigma + 1.0).sqrt() as f64, 0.0)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let sigma = self.schedule.sigmas[index];
        let sigma_to = self.schedule.sigmas[index + 1];
        let (sigma_down, sigma_up) = if self.ancestral {
            ancestral_levels(sigma, sigma_to)
        } else {
            (sigma_to, 0.0)
        };
        let pred_original = denoised(self.prediction, model_output, sample, sigma)?;
        let derivative = (sample - pred_original)?.affine(1.0 / sigma as f64, 0.0)?;
        let moved = weighted_sum(sample, 1.0, &derivative, sigma_down - sigma)?;
        if sigma_up == 0.0 {
            return Ok(moved);
        }
        let fresh = noise
            .next(sample.dims(), sample.device())?
            .to_dtype(sample.dtype())?;
        weighted_sum(&moved, 1.0, &fresh, sigma_up)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::super::sigmas::training_sigmas;
    use super::*;
    use crate::models::schedulers::SeededNoise;
    use crate::test_support::max_abs_diff;

    /// With a model that knows the clean image, every Euler step lands exactly on the noise level it steps to,
    /// `x₀ + σ_next·ε`, and the model sees unit-variance input: a wrong x̂₀ formula or input scale breaks this.
    fn lands_on_each_level(prediction: PredictionType) {
        let config = SchedulerConfig {
            prediction_type: prediction,
            ..SchedulerConfig::default()
        };
        let device = Device::Cpu;
        let mut noise = SeededNoise::new(3);
        let mut draw = || {
            noise
                .next(&[1, 4, 4, 4], &device)
                .and_then(|t| t.to_dtype(DType::F64))
                .unwrap()
        };
        let (clean, epsilon) = (draw(), draw());
        let mut sampler = EulerSampler::new(&config, 6);
        let sigmas = sampler.sigmas().to_vec();
        // The pipeline's start: unit noise times init_noise_sigma = √(σ₀² + 1), where σ₀ is the first level's
        // sigma (not the training maximum); the model sees it scaled back to unit variance.
        assert_eq!(
            sampler.init_noise_sigma() as f32,
            (sigmas[0] * sigmas[0] + 1.0).sqrt()
        );
        assert!(sigmas[0] < *training_sigmas(&config).last().unwrap());
        let mut x = weighted_sum(&clean, 1.0, &epsilon, sigmas[0]).unwrap();
        for (index, &sigma) in sigmas[..sigmas.len() - 1].iter().enumerate() {
            let input = sampler.scale_model_input(&x, index).unwrap();
            let (alpha_vp, sigma_vp) = (
                1.0 / (sigma * sigma + 1.0).sqrt(),
                sigma / (sigma * sigma + 1.0).sqrt(),
            );
            let expected_input = weighted_sum(&clean, alpha_vp, &epsilon, sigma_vp).unwrap();
            assert!(max_abs_diff(&input, &expected_input) < 1e-4);
            let output = match prediction {
                PredictionType::Epsilon => epsilon.clone(),
                PredictionType::VPrediction => {
                    weighted_sum(&epsilon, alpha_vp, &clean, -sigma_vp).unwrap()
                }
            };
            x = sampler.step(&output, index, &x, &mut noise).unwrap();
            let expected = weighted_sum(&clean, 1.0, &epsilon, sigmas[index + 1]).unwrap();
            assert!(max_abs_diff(&x, &expected) < 1e-4, "step {index}");
        }
    }

    #[test]
    fn epsilon_steps_land_on_each_noise_level() {
        lands_on_each_level(PredictionType::Epsilon);
    }

    #[test]
    fn v_prediction_steps_land_on_each_noise_level() {
        lands_on_each_level(PredictionType::VPrediction);
    }
}
