//! DPM-Solver++ 2M ("DPM++ 2M", optionally with Karras sigmas): diffusers `DPMSolverMultistepScheduler` with
//! `algorithm_type = "dpmsolver++"`, `solver_order = 2`, midpoint solver, `lower_order_final` and a final sigma
//! of 0, for epsilon and v-prediction models.
//!
//! It keeps the previous step's denoised estimate (what makes a step second order), so a sampler serves one
//! generation; its coefficients are computed in f32 as diffusers computes them. It draws no noise.

use candle_core::{Result, Tensor};

use super::sigmas::SigmaSchedule;
use super::{NoiseSource, PredictionType, Sampler, SchedulerConfig, weighted_sum};

/// The DPM-Solver++ 2M sampler for a fixed number of steps.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepSampler {
    schedule: SigmaSchedule,
    prediction: PredictionType,
    /// The step index and denoised estimate of the last step taken.
    previous: Option<(usize, Tensor)>,
}

/// A noise level in the variance-preserving form the solver works in: `x = α·x₀ + σ·ε` with `α² + σ² = 1`.
#[derive(Debug, Clone, Copy)]
struct Level {
    alpha: f32,
    sigma: f32,
}

impl Level {
    fn new(sigma_ve: f32) -> Self {
        let alpha = 1.0 / (sigma_ve * sigma_ve + 1.0).sqrt();
        Self {
            alpha,
            sigma: sigma_ve * alpha,
        }
    }

    /// `λ = log(α/σ)`, half the log signal-to-noise ratio.
    fn lambda(self) -> f32 {
        self.alpha.ln() - self.sigma.ln()
    }
}

impl DpmSolverMultistepSampler {
    /// With `karras`, Karras sigmas; otherwise diffusers' leading spacing for this scheduler.
    pub fn new(config: &SchedulerConfig, steps: usize, karras: bool) -> Self {
        let schedule = if karras {
            SigmaSchedule::karras_rounded(config, steps)
        } else {
            SigmaSchedule::dpm_solver_leading(config, steps)
        };
        Self {
            schedule,
            prediction: config.prediction_type,
            previous: None,
        }
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }

    /// The data prediction `x̂₀` from the model output at `level`.
    fn denoised(&self, model_output: &Tensor, sample: &Tensor, level: Level) -> Result<Tensor> {
        match self.prediction {
            PredictionType::Epsilon => weighted_sum(sample, 1.0, model_output, -level.sigma)?
                .affine(1.0 / level.alpha as f64, 0.0),
            PredictionType::VPrediction => {
                weighted_sum(sample, level.alpha, model_output, -level.sigma)
            }
        }
    }
}

impl Sampler for DpmSolverMultistepSampler {
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let sigmas = &self.schedule.sigmas;
        let current = Level::new(sigmas[index]);
        let sigma_next = sigmas[index + 1];
        let denoised = self.denoised(model_output, sample, current)?;
        let earlier = match self.previous.take() {
            Some((previous_index, previous)) if previous_index + 1 == index => {
                Some((Level::new(sigmas[index - 1]), previous))
            }
            _ => None,
        };
        self.previous = Some((index, denoised.clone()));
        // The last step (to σ = 0, λ = ∞) is first order and lands on the denoised estimate itself.
        if sigma_next == 0.0 {
            return Ok(denoised);
        }
        let next = Level::new(sigma_next);
        let h = next.lambda() - current.lambda();
        let keep = next.sigma / current.sigma;
        let pull = next.alpha * ((-h).exp() - 1.0);
        let first_order = weighted_sum(sample, keep, &denoised, -pull)?;
        // The first step has no earlier estimate: first order.
        let Some((earlier_level, earlier_denoised)) = earlier else {
            return Ok(first_order);
        };
        let r0 = (current.lambda() - earlier_level.lambda()) / h;
        let difference = (&denoised - earlier_denoised)?.affine((1.0 / r0) as f64, 0.0)?;
        weighted_sum(&first_order, 1.0, &difference, -0.5 * pull)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::models::schedulers::SeededNoise;
    use crate::test_support::max_abs_diff;

    /// A smooth toy noise predictor on VP samples (any fixed function will do).
    fn toy_epsilon(x: &Tensor, sigma: f32) -> Tensor {
        let bias = (sigma as f64).ln() * 0.1;
        (x.affine(0.7, bias).unwrap().tanh().unwrap() + x.affine(0.2, 0.0).unwrap()).unwrap()
    }

    fn start(seed: u64) -> Tensor {
        SeededNoise::new(seed)
            .next(&[1, 4, 4, 4], &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F64))
            .unwrap()
    }

    /// k-diffusion's `sample_dpmpp_2m`, an independent formulation of the same solver in VE coordinates
    /// (`t = −log σ`, `x_VE = x_VP·√(σ² + 1)`): first order on the first step and into σ = 0, otherwise
    /// `D' = (1 + 1/(2r))·D − 1/(2r)·D_prev`.
    fn k_diffusion_2m(sigmas: &[f32], x_vp: &Tensor) -> Tensor {
        let denoise = |x_ve: &Tensor, sigma: f32| {
            let input = x_ve
                .affine(1.0 / ((sigma * sigma + 1.0) as f64).sqrt(), 0.0)
                .unwrap();
            (x_ve
                - toy_epsilon(&input, sigma)
                    .affine(sigma as f64, 0.0)
                    .unwrap())
            .unwrap()
        };
        let s0 = sigmas[0] as f64;
        let mut x = x_vp.affine((s0 * s0 + 1.0).sqrt(), 0.0).unwrap();
        let mut old: Option<Tensor> = None;
        for i in 0..sigmas.len() - 1 {
            let (sigma, next) = (sigmas[i] as f64, sigmas[i + 1] as f64);
            let d = denoise(&x, sigmas[i]);
            let h = -next.ln() + sigma.ln();
            x = match (&old, next == 0.0) {
                (Some(prev), false) => {
                    let h_last = -sigma.ln() + (sigmas[i - 1] as f64).ln();
                    let r = h_last / h;
                    let d_prime = ((d.affine(1.0 + 1.0 / (2.0 * r), 0.0).unwrap())
                        - prev.affine(1.0 / (2.0 * r), 0.0).unwrap())
                    .unwrap();
                    (x.affine(next / sigma, 0.0).unwrap()
                        - d_prime.affine((-h).exp_m1(), 0.0).unwrap())
                    .unwrap()
                }
                _ if next == 0.0 => d.clone(),
                _ => (x.affine(next / sigma, 0.0).unwrap() - d.affine((-h).exp_m1(), 0.0).unwrap())
                    .unwrap(),
            };
            old = Some(d);
        }
        x
    }

    fn run_ours(sampler: &mut DpmSolverMultistepSampler, x: &Tensor) -> Tensor {
        let mut x = x.clone();
        let sigmas = sampler.sigmas().to_vec();
        for (index, &sigma) in sigmas[..sigmas.len() - 1].iter().enumerate() {
            let output = toy_epsilon(&sampler.scale_model_input(&x, index).unwrap(), sigma);
            x = sampler
                .step(&output, index, &x, &mut SeededNoise::new(0))
                .unwrap();
        }
        x
    }

    #[test]
    fn matches_k_diffusion_dpmpp_2m_with_and_without_karras_sigmas() {
        let config = SchedulerConfig::default();
        for karras in [false, true] {
            let mut sampler = DpmSolverMultistepSampler::new(&config, 8, karras);
            let x = start(1);
            let ours = run_ours(&mut sampler, &x);
            let reference = k_diffusion_2m(sampler.sigmas(), &x);
            let diff = max_abs_diff(&ours, &reference);
            assert!(diff < 1e-4, "karras {karras}: differs by {diff}");
        }
    }

    #[test]
    fn first_step_is_first_order_and_the_last_lands_on_the_denoised_estimate() {
        let config = SchedulerConfig {
            prediction_type: PredictionType::VPrediction,
            ..SchedulerConfig::default()
        };
        let mut sampler = DpmSolverMultistepSampler::new(&config, 5, true);
        let sigmas = sampler.sigmas().to_vec();
        let x = start(2);
        let v = start(3);
        // First order is DDIM's update: x' = α'·x̂₀ + σ'·ε̂ with ε̂ = (x − α·x̂₀)/σ, x̂₀ = α·x − σ·v.
        let (now, next) = (Level::new(sigmas[0]), Level::new(sigmas[1]));
        let x0 = weighted_sum(&x, now.alpha, &v, -now.sigma).unwrap();
        let eps = weighted_sum(&x, 1.0 / now.sigma, &x0, -now.alpha / now.sigma).unwrap();
        let ddim = weighted_sum(&x0, next.alpha, &eps, next.sigma).unwrap();
        let stepped = sampler.step(&v, 0, &x, &mut SeededNoise::new(0)).unwrap();
        assert!(max_abs_diff(&stepped, &ddim) < 1e-5);
        // A middle step uses the earlier estimate: it is no longer DDIM's update.
        let v_next = start(4);
        let middle = sampler
            .step(&v_next, 1, &stepped, &mut SeededNoise::new(0))
            .unwrap();
        let mut fresh = DpmSolverMultistepSampler::new(&config, 5, true);
        let first_order_middle = fresh
            .step(&v_next, 1, &stepped, &mut SeededNoise::new(0))
            .unwrap();
        assert!(max_abs_diff(&middle, &first_order_middle) > 1e-3);
        // The last step returns x̂₀ exactly, finite (no log 0), whatever came before.
        sampler.previous = Some((3, start(5)));
        let last = Level::new(sigmas[4]);
        let x_last = start(6);
        let out = sampler
            .step(&v, 4, &x_last, &mut SeededNoise::new(0))
            .unwrap();
        let expected = weighted_sum(&x_last, last.alpha, &v, -last.sigma).unwrap();
        assert_eq!(max_abs_diff(&out, &expected), 0.0);
    }
}
