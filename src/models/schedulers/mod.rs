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
        }
    }
}

impl SchedulerConfig {
    pub fn from_diffusers_json(json: &str) -> std::result::Result<Self, ModelError> {
        serde_json::from_str(json)
            .map_err(|e| ModelError::Config(format!("the scheduler config is not valid: {e}")))
    }

    /// `ᾱ_t` for every training timestep, as torch computes it on the CPU: f32 betas, the running product in f64,
    /// each value stored in f32.
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

    /// Inference timesteps with "leading" spacing plus `steps_offset`, highest first (SD1.5's default).
    pub fn leading_timesteps(&self, steps: usize) -> Vec<usize> {
        let ratio = self.num_train_timesteps / steps.max(1);
        (0..steps)
            .rev()
            .map(|i| (i * ratio + self.steps_offset).min(self.num_train_timesteps - 1))
            .collect()
    }
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

    /// The factor initial noise is scaled by.
    fn init_noise_sigma(&self) -> f64;

    /// Scales the latents before the UNet sees them at step `index`.
    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor>;

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
