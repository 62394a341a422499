//! Euler ancestral ("Euler a"): diffusers `EulerAncestralDiscreteScheduler` with leading spacing.

use candle_core::{Result, Tensor};

use super::{NoiseSource, PredictionType, Sampler, SchedulerConfig, weighted_sum};

/// The Euler ancestral sampler for a fixed number of steps.
#[derive(Debug, Clone)]
pub struct EulerAncestralSampler {
    timesteps: Vec<f64>,
    /// One sigma per step, then a final 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
}

impl EulerAncestralSampler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Self {
        let mut alphas_cumprod = config.alphas_cumprod();
        if config.rescale_betas_zero_snr
            && let Some(last) = alphas_cumprod.last_mut()
        {
            // diffusers' guard against an infinite sigma at the last timestep
            *last = 2f32.powi(-24);
        }
        let timesteps = config.leading_timesteps(steps);
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| ((1.0 - alphas_cumprod[t]) / alphas_cumprod[t]).sqrt())
            .collect();
        sigmas.push(0.0);
        let max_sigma = sigmas.iter().copied().fold(0.0f32, f32::max);
        Self {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            sigmas,
            init_noise_sigma: (max_sigma * max_sigma + 1.0).sqrt(),
            prediction: config.prediction_type,
        }
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Sampler for EulerAncestralSampler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        let sigma = self.sigmas[index];
        sample.affine(1.0 / (sigma * sigma + 1.0).sqrt() as f64, 0.0)
    }

    fn step(
        &self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let sigma = self.sigmas[index];
        let sigma_to = self.sigmas[index + 1];
        let pred_original = match self.prediction {
            PredictionType::Epsilon => weighted_sum(sample, 1.0, model_output, -sigma)?,
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                weighted_sum(model_output, -sigma / s2.sqrt(), sample, 1.0 / s2)?
            }
        };
        let sigma_up =
            (sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)).sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
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
