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
        let mut alphas_cumprod = config.alphas_cumprod();
        if config.prediction_type == PredictionType::Epsilon
            && let Some(last) = alphas_cumprod.last_mut()
            && *last == 0.0
        {
            // A noise prediction says nothing of the image where there is no signal left (x₀ = x/√ᾱ − …):
            // diffusers' other samplers' guard, instead of an infinite x₀ (v-prediction needs none).
            *last = 2f32.powi(-24);
        }
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

    fn step(
        &mut self,
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    struct NoNoise;

    impl NoiseSource for NoNoise {
        fn next(&mut self, _: &[usize], _: &Device) -> Result<Tensor> {
            candle_core::bail!("DDIM draws no noise")
        }
    }

    /// A zero-terminal-SNR schedule starts at t = 999, where ᾱ = 0: v-prediction steps from there exactly, a
    /// noise prediction (`--prediction epsilon` on such a model) stays finite.
    #[test]
    fn the_first_step_of_a_zero_terminal_snr_schedule_is_finite() {
        let device = Device::Cpu;
        let sample = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &device).unwrap();
        let output = Tensor::new(&[[0.1f32, 0.2], [-0.3, 0.4]], &device).unwrap();
        for prediction in [PredictionType::VPrediction, PredictionType::Epsilon] {
            let config = SchedulerConfig {
                prediction_type: prediction,
                rescale_betas_zero_snr: true,
                ..SchedulerConfig::default()
            };
            let mut sampler = DdimSampler::new(&config, 10);
            assert_eq!(sampler.timesteps()[0], 999.0);
            let next = sampler.step(&output, 0, &sample, &mut NoNoise).unwrap();
            let values: Vec<f32> = next.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                values.iter().all(|v| v.is_finite()),
                "{prediction:?}: {values:?}"
            );
        }
    }
}
