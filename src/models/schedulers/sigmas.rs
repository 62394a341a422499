//! Noise levels for the samplers that walk the schedule by sigma (Euler, Euler a, DPM-Solver++): which
//! training timesteps they visit and their `σ = √((1 − ᾱ)/ᾱ)`, with diffusers' spacing rules and rounding
//! (table sigmas in f32 as torch computes them; Karras sigmas in f64, then stored in f32).
//!
//! It only builds schedules; how a sampler steps between the levels stays in the sampler.

use super::SchedulerConfig;

/// Karras et al.'s ρ: how strongly the levels crowd towards low noise.
const KARRAS_RHO: f64 = 7.0;

/// The timesteps a sampler feeds the UNet and the noise level of each, plus a final level of 0.
#[derive(Debug, Clone, PartialEq)]
pub struct SigmaSchedule {
    pub timesteps: Vec<f64>,
    /// One more than `timesteps`: the last is 0, where sampling ends.
    pub sigmas: Vec<f32>,
}

impl SigmaSchedule {
    /// diffusers' "leading" spacing of `EulerDiscreteScheduler` (and Euler a): `steps_offset + k · (T / steps)`,
    /// the same timesteps as DDIM's.
    pub fn leading(config: &SchedulerConfig, steps: usize) -> Self {
        let timesteps = config.leading_timesteps(steps);
        Self::at_training_timesteps(config, &timesteps)
    }

    /// diffusers' "leading" spacing of `DPMSolverMultistepScheduler`, which divides by `steps + 1`:
    /// `steps_offset + k · (T / (steps + 1))` for k = steps down to 1.
    pub fn dpm_solver_leading(config: &SchedulerConfig, steps: usize) -> Self {
        let train_steps = config.num_train_timesteps;
        let ratio = train_steps / (steps + 1);
        let timesteps: Vec<usize> = (1..=steps)
            .rev()
            .map(|k| (k * ratio + config.steps_offset).min(train_steps - 1))
            .collect();
        Self::at_training_timesteps(config, &timesteps)
    }

    /// Karras et al. (2022) levels, ρ = 7, from the largest to the smallest training sigma, each fed to the UNet
    /// at its log-sigma-interpolated timestep rounded to an integer (as `DPMSolverMultistepScheduler` does).
    pub fn karras_rounded(config: &SchedulerConfig, steps: usize) -> Self {
        let table = training_sigmas(config);
        let log_table: Vec<f32> = table.iter().map(|s| s.ln()).collect();
        let (Some(&min), Some(&max)) = (table.first(), table.last()) else {
            return Self {
                timesteps: Vec::new(),
                sigmas: vec![0.0],
            };
        };
        let (min_inv_rho, max_inv_rho) = (
            (min as f64).powf(1.0 / KARRAS_RHO),
            (max as f64).powf(1.0 / KARRAS_RHO),
        );
        let levels: Vec<f64> = numpy_unit_ramp(steps)
            .into_iter()
            .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(KARRAS_RHO))
            .collect();
        let timesteps = levels
            .iter()
            .map(|&sigma| timestep_of_sigma(sigma, &log_table).round_ties_even())
            .collect();
        let mut sigmas: Vec<f32> = levels.iter().map(|&s| s as f32).collect();
        sigmas.push(0.0);
        Self { timesteps, sigmas }
    }

    /// The table sigmas of integer training timesteps, then 0.
    fn at_training_timesteps(config: &SchedulerConfig, timesteps: &[usize]) -> Self {
        let table = training_sigmas(config);
        let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| table[t]).collect();
        sigmas.push(0.0);
        Self {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            sigmas,
        }
    }

    /// `√(σ_max² + 1)`, the scale of the initial noise with "leading" spacing (σ_max is the first level, not
    /// the training maximum).
    pub fn leading_init_noise_sigma(&self) -> f32 {
        let max = self.sigmas.iter().copied().fold(0.0f32, f32::max);
        (max * max + 1.0).sqrt()
    }
}

/// `σ_t = √((1 − ᾱ_t)/ᾱ_t)` for every training timestep, in f32. A zero-terminal-SNR schedule's last `ᾱ` (0)
/// is taken as 2⁻²⁴ first, as diffusers' sigma-based schedulers do, so its σ stays finite.
pub fn training_sigmas(config: &SchedulerConfig) -> Vec<f32> {
    let mut alphas_cumprod = config.alphas_cumprod();
    if config.rescale_betas_zero_snr
        && let Some(last) = alphas_cumprod.last_mut()
    {
        *last = 2f32.powi(-24);
    }
    alphas_cumprod
        .into_iter()
        .map(|a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// numpy's `linspace(0, 1, n)`: `i · (1 / (n − 1))`, the last exactly 1.
fn numpy_unit_ramp(n: usize) -> Vec<f64> {
    if n < 2 {
        return vec![0.0; n];
    }
    let step = 1.0 / (n - 1) as f64;
    (0..n)
        .map(|i| if i == n - 1 { 1.0 } else { i as f64 * step })
        .collect()
}

/// The (fractional) training timestep of a noise level: linear interpolation of `log σ` between the two table
/// entries around it, clamped to the table (diffusers' `_sigma_to_t`).
fn timestep_of_sigma(sigma: f64, log_table: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let last_low = log_table.len().saturating_sub(2);
    let low = log_table
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(last_low);
    let (low_log, high_log) = (log_table[low], log_table[low + 1]);
    let w = ((low_log as f64 - log_sigma) / (low_log - high_log) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn karras_levels_span_the_training_sigmas_evenly_in_the_seventh_root() {
        let config = SchedulerConfig::default();
        let table = training_sigmas(&config);
        let steps = 12;
        let schedule = SigmaSchedule::karras_rounded(&config, steps);
        assert_eq!(schedule.timesteps.len(), steps);
        assert_eq!(schedule.sigmas.len(), steps + 1);
        // Endpoints: the largest and smallest training sigma, then a final 0.
        assert_eq!(schedule.sigmas[0], table[table.len() - 1]);
        assert_eq!(schedule.sigmas[steps - 1], table[0]);
        assert_eq!(schedule.sigmas[steps], 0.0);
        assert_eq!(schedule.timesteps[0], (table.len() - 1) as f64);
        assert_eq!(schedule.timesteps[steps - 1], 0.0);
        // Equal steps in σ^(1/ρ) (a plain geometric or linear spacing would fail this).
        let roots: Vec<f64> = schedule.sigmas[..steps]
            .iter()
            .map(|&s| (s as f64).powf(1.0 / KARRAS_RHO))
            .collect();
        let first_gap = roots[0] - roots[1];
        for pair in roots.windows(2) {
            assert!(((pair[0] - pair[1]) - first_gap).abs() < 1e-6 * first_gap.abs());
        }
        // Each timestep is the table entry nearest its level in log sigma.
        for (&t, &sigma) in schedule.timesteps.iter().zip(&schedule.sigmas) {
            let t = t as usize;
            let here = (table[t].ln() - sigma.ln()).abs();
            for neighbour in [t.saturating_sub(1), (t + 1).min(table.len() - 1)] {
                assert!(here <= (table[neighbour].ln() - sigma.ln()).abs() + 1e-6);
            }
        }
    }

    #[test]
    fn dpm_solver_leading_spacing_divides_by_one_more_step_than_euler() {
        let config = SchedulerConfig::default();
        let dpm = SigmaSchedule::dpm_solver_leading(&config, 4);
        let euler = SigmaSchedule::leading(&config, 4);
        // T / (steps + 1) = 200 apart versus T / steps = 250, both starting after `steps_offset`.
        assert_eq!(dpm.timesteps, [801.0, 601.0, 401.0, 201.0]);
        assert_eq!(euler.timesteps, [751.0, 501.0, 251.0, 1.0]);
        let table = training_sigmas(&config);
        assert_eq!(
            dpm.sigmas,
            [table[801], table[601], table[401], table[201], 0.0]
        );
    }

    #[test]
    fn timestep_of_a_table_sigma_is_its_own_index() {
        let table = training_sigmas(&SchedulerConfig::default());
        let log_table: Vec<f32> = table.iter().map(|s| s.ln()).collect();
        for t in [0, 1, 500, 998, 999] {
            let found = timestep_of_sigma(table[t] as f64, &log_table);
            assert!((found - t as f64).abs() < 1e-3, "{t}: {found}");
        }
        // Outside the table the timestep clamps to its ends.
        assert_eq!(timestep_of_sigma(1e-4, &log_table), 0.0);
        assert_eq!(timestep_of_sigma(1e4, &log_table), 999.0);
    }
}
