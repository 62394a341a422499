//! The diffusion noise schedule and the samplers that walk it backwards.
//!
//! The schedule is computed with the reference implementation's precision and operation order (torch's f32
//! `linspace` halves, a `cumprod` that accumulates in f64 and stores f32), so coefficients match diffusers' to
//! the last bit or two (torch's vectorised `linspace` rounds a few betas differently from its scalar
//! formula). Samplers draw noise from a [`NoiseSource`], which is how a run is reproduced with another tool's
//! noise.

mod ddim;
mod dpm_solver;
mod euler;
mod sigmas;

use candle_core::{Device, Result, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde::Deserialize;

use crate::models::ModelError;
pub use ddim::DdimSampler;
pub use dpm_solver::DpmSolverMultistepSampler;
pub use euler::EulerSampler;

/// What the UNet is trained to predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum PredictionType {
    #[serde(rename = "epsilon")]
    Epsilon,
    #[serde(rename = "v_prediction")]
    VPrediction,
}

impl PredictionType {
    pub fn as_str(&self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
        }
    }
}

/// How betas grow over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum BetaSchedule {
    #[serde(rename = "scaled_linear")]
    ScaledLinear,
    #[serde(rename = "linear")]
    Linear,
}

/// The noise schedule of a model (diffusers `scheduler_config.json`; SD1.5 defaults).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub prediction_type: PredictionType,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
    /// Betas rescaled so the last timestep is pure noise (zero terminal SNR, arXiv 2305.08891), as v-prediction
    /// fine-tunes with the `ztsnr` marker (NoobAI-XL V-Pred) are trained.
    pub rescale_betas_zero_snr: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            prediction_type: PredictionType::Epsilon,
            steps_offset: 1,
            set_alpha_to_one: false,
            rescale_betas_zero_snr: false,
        }
    }
}

impl SchedulerConfig {
    pub fn from_diffusers_json(json: &str) -> std::result::Result<Self, ModelError> {
        serde_json::from_str(json)
            .map_err(|e| ModelError::Config(format!("the scheduler config is not valid: {e}")))
    }

    /// `ᾱ_t` for every training timestep, as torch computes it on the CPU: f32 betas, the running product in f64,
    /// each value stored in f32 (with a zero-terminal-SNR schedule, `ᾱ` of the last timestep is 0).
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        let betas: Vec<f32> = match self.beta_schedule {
            BetaSchedule::ScaledLinear => torch_linspace_f32(
                self.beta_start.sqrt() as f32,
                self.beta_end.sqrt() as f32,
                n,
            )
            .into_iter()
            .map(|b| b * b)
            .collect(),
            BetaSchedule::Linear => {
                torch_linspace_f32(self.beta_start as f32, self.beta_end as f32, n)
            }
        };
        let betas = if self.rescale_betas_zero_snr {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        };
        // torch's CPU `cumprod` keeps its running product in f64 and rounds each output to f32.
        let mut product = 1.0f64;
        betas
            .into_iter()
            .map(|beta| {
                product *= (1.0 - beta) as f64;
                product as f32
            })
            .collect()
    }

    /// Inference timesteps with "trailing" spacing, highest first: numpy's `round(arange(T, 0, -T/steps)) - 1`, so the
    /// first is the last training timestep (999), where a zero-terminal-SNR schedule starts.
    pub fn trailing_timesteps(&self, steps: usize) -> Vec<usize> {
        let n = self.num_train_timesteps;
        let ratio = n as f64 / steps.max(1) as f64;
        (0..steps.max(1))
            .map(|i| ((n as f64 - i as f64 * ratio).round_ties_even() as usize).saturating_sub(1))
            .collect()
    }

    /// Inference timesteps with "leading" spacing plus `steps_offset`, highest first (SD1.5's default).
    pub fn leading_timesteps(&self, steps: usize) -> Vec<usize> {
        let ratio = self.num_train_timesteps / steps.max(1);
        (0..steps)
            .rev()
            .map(|i| (i * ratio + self.steps_offset).min(self.num_train_timesteps - 1))
            .collect()
    }
}

/// diffusers' `rescale_zero_terminal_snr` in f32 and torch's order: `√ᾱ` shifted so its last value is 0 and
/// scaled so its first is unchanged, then turned back into betas.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    // torch's CPU `cumprod`: the running product in f64, each value stored in f32.
    let mut product = 1.0f64;
    let mut sqrt_alpha_bar: Vec<f32> = betas
        .iter()
        .map(|beta| {
            product *= f64::from(1.0 - beta);
            (product as f32).sqrt()
        })
        .collect();
    let (Some(&first), Some(&last)) = (sqrt_alpha_bar.first(), sqrt_alpha_bar.last()) else {
        return Vec::new();
    };
    let scale = first / (first - last);
    for s in &mut sqrt_alpha_bar {
        *s = (*s - last) * scale;
    }
    let alpha_bar: Vec<f32> = sqrt_alpha_bar.iter().map(|s| s * s).collect();
    std::iter::once(alpha_bar[0])
        .chain(alpha_bar.windows(2).map(|w| w[1] / w[0]))
        .map(|alpha| 1.0 - alpha)
        .collect()
}

/// `torch.linspace(start, end, n, dtype=float32)`: the first half counts up from `start`, the second half
/// counts down from `end`.
fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (n - i - 1) as f32
            }
        })
        .collect()
}

/// The source of Gaussian noise for initial latents and ancestral steps.
pub trait NoiseSource {
    /// A tensor of independent standard normal values.
    fn next(&mut self, dims: &[usize], device: &Device) -> Result<Tensor>;
}

/// Seeded noise, generated on the CPU so a seed gives the same image on every device.
#[derive(Debug)]
pub struct SeededNoise {
    rng: rand::rngs::StdRng,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }
}

impl NoiseSource for SeededNoise {
    fn next(&mut self, dims: &[usize], device: &Device) -> Result<Tensor> {
        let count = dims.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect();
        Tensor::from_vec(values, dims, device)
    }
}

/// A sampler: the timesteps to visit and how to step from one to the next. Multistep samplers remember
/// earlier steps, so one sampler serves one generation, stepped through its indices in order.
pub trait Sampler {
    /// The timesteps fed to the UNet, in order.
    fn timesteps(&self) -> &[f64];

    /// The factor initial noise is scaled by (1 for samplers that work on unscaled samples).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Scales the latents before the UNet sees them at step `index` (unchanged by default).
    fn scale_model_input(&self, sample: &Tensor, _index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    /// Moves `sample` from step `index` to the next, given the (guided) model output.
    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
}

/// The available samplers, each diffusers' scheduler of the same name with leading spacing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    Ddim,
    EulerAncestral,
    Euler,
    /// DPM-Solver++ 2M, with Karras sigmas or diffusers' leading spacing.
    DpmSolverMultistep {
        karras: bool,
    },
}

impl SamplerKind {
    pub fn build(self, config: &SchedulerConfig, steps: usize) -> Box<dyn Sampler> {
        match self {
            SamplerKind::Ddim => Box::new(DdimSampler::new(config, steps)),
            SamplerKind::EulerAncestral => Box::new(EulerSampler::ancestral(config, steps)),
            SamplerKind::Euler => Box::new(EulerSampler::new(config, steps)),
            SamplerKind::DpmSolverMultistep { karras } => {
                Box::new(DpmSolverMultistepSampler::new(config, steps, karras))
            }
        }
    }
}

/// `a·x + b·y` for f32 scalars, the shape of every sampler update.
fn weighted_sum(x: &Tensor, a: f32, y: &Tensor, b: f32) -> Result<Tensor> {
    x.affine(a as f64, 0.0)? + y.affine(b as f64, 0.0)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_spacing_starts_at_the_last_timestep_and_rounds_like_numpy() {
        let config = SchedulerConfig::default();
        let ten: Vec<usize> = (0..10).map(|i| 999 - 100 * i).collect();
        assert_eq!(config.trailing_timesteps(10), ten);
        // 1000 / 16 = 62.5 apart: numpy rounds the halves to even (937.5 -> 938, 812.5 -> 812), then - 1.
        assert_eq!(
            config.trailing_timesteps(16),
            [
                999, 937, 874, 811, 749, 687, 624, 561, 499, 437, 374, 311, 249, 187, 124, 61
            ]
        );
    }

    #[test]
    fn zero_terminal_snr_ends_in_pure_noise_and_keeps_the_first_step() {
        let plain = SchedulerConfig::default().alphas_cumprod();
        let rescaled = SchedulerConfig {
            rescale_betas_zero_snr: true,
            ..SchedulerConfig::default()
        }
        .alphas_cumprod();
        assert_eq!(rescaled[999], 0.0);
        assert!((rescaled[0] - plain[0]).abs() < 1e-6);
        // diffusers' DDIMScheduler(rescale_betas_zero_snr=True).alphas_cumprod[500]
        assert!(
            (rescaled[500] - 0.241_018_55).abs() < 1e-6,
            "{}",
            rescaled[500]
        );
    }
}
