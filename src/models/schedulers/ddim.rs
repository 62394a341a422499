//! DDIM (eta = 0), deterministic: diffusers `DDIMScheduler` with SD1.5's settings, and with "trailing"
//! spacing for a zero-terminal-SNR schedule (which has to start at its last timestep, where the image is pure
//! noise, as AUTOMATIC1111 and ComfyUI do for such models and diffusers' documentation recommends).

use candle_core::{Result, Tensor};

use super::{NoiseSource, PredictionType, Sampler, SchedulerConfig, weighted_sum};

/// The DDIM sampler for a fixed number of steps.
#[derive(Debug, Clone)]
pub struct DdimSampler {
    timesteps: Vec<f64>,
    /// `(ᾱ_t, ᾱ_prev)` of each step.
    alphas: Vec<(f32, f32)>,
    prediction: PredictionType,
}

impl DdimSampler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Self {
        let alphas_cumprod = config.alphas_cumprod();
        let final_alpha = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let stride = config.num_train_timesteps / steps.max(1);
        let timesteps = if config.rescale_betas_zero_snr {
            config.trailing_timesteps(steps)
        } else {
            config.leading_timesteps(steps)
        };
        let alphas = timesteps
            .iter()
            .map(|&t| {
                let previous = t
                    .checked_sub(stride)
                    .map_or(final_alpha, |p| alphas_cumprod[p]);
                (alphas_cumprod[t], previous)
            })
            .collect();
        Self {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            alphas,
            prediction: config.prediction_type,
        }
    }
}

impl Sampler for DdimSampler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(
        &self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let (alpha, alpha_prev) = self.alphas[index];
        let (sqrt_alpha, sqrt_beta) = (alpha.sqrt(), (1.0 - alpha).sqrt());
        let (pred_original, pred_epsilon) = match self.prediction {
            PredictionType::Epsilon => {
                let x0 = weighted_sum(sample, 1.0, model_output, -sqrt_beta)?
                    .affine(1.0 / sqrt_alpha as f64, 0.0)?;
                (x0, model_output.clone())
            }
            PredictionType::VPrediction => (
                weighted_sum(sample, sqrt_alpha, model_output, -sqrt_beta)?,
                weighted_sum(model_output, sqrt_alpha, sample, sqrt_beta)?,
            ),
        };
        weighted_sum(
            &pred_original,
            alpha_prev.sqrt(),
            &pred_epsilon,
            (1.0 - alpha_prev).sqrt(),
        )
    }
}
