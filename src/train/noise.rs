//! The DDPM forward process used for training: noising latents at a timestep, the prediction target
//! (noise or velocity), and min-SNR loss weights.

use candle_core::{Result, Tensor};

use crate::models::schedulers::PredictionType;

/// `ᾱ_t` values for the batch's timesteps, as a `[batch, 1, 1, 1]` f32 tensor.
fn per_sample(values: &[f32], like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(values.to_vec(), (values.len(), 1, 1, 1), like.device())?
        .to_dtype(like.dtype())
}

/// `√ᾱ_t · x₀ + √(1 − ᾱ_t) · ε`.
pub fn add_noise(latents: &Tensor, noise: &Tensor, alphas: &[f32]) -> Result<Tensor> {
    let signal: Vec<f32> = alphas.iter().map(|a| a.sqrt()).collect();
    let sigma: Vec<f32> = alphas.iter().map(|a| (1.0 - a).sqrt()).collect();
    latents.broadcast_mul(&per_sample(&signal, latents)?)?
        + noise.broadcast_mul(&per_sample(&sigma, noise)?)?
}

/// What the UNet should output: the noise, or the velocity `√ᾱ·ε − √(1−ᾱ)·x₀`.
pub fn target(
    latents: &Tensor,
    noise: &Tensor,
    alphas: &[f32],
    prediction: PredictionType,
) -> Result<Tensor> {
    match prediction {
        PredictionType::Epsilon => Ok(noise.clone()),
        PredictionType::VPrediction => {
            let signal: Vec<f32> = alphas.iter().map(|a| a.sqrt()).collect();
            let sigma: Vec<f32> = alphas.iter().map(|a| (1.0 - a).sqrt()).collect();
            noise.broadcast_mul(&per_sample(&signal, noise)?)?
                - latents.broadcast_mul(&per_sample(&sigma, latents)?)?
        }
    }
}

/// Min-SNR-γ loss weights (Hang et al. 2023, as kohya sd-scripts applies them): `min(SNR, γ) / SNR` for noise
/// prediction, `min(SNR, γ) / (SNR + 1)` for velocity prediction.
///
/// A zero-terminal-SNR schedule's last timestep has SNR 0, where the noise weight would be 0/0 (kohya's
/// formula gives NaN there): it takes its limit, 1, written as `1` for every SNR up to γ (where min(SNR, γ) =
/// SNR) and `γ / SNR` above. The velocity weight is 0 there, as kohya's: the last timestep's target is the
/// negated sample, which min-SNR leaves out.
pub fn min_snr_weights(alphas: &[f32], gamma: f64, prediction: PredictionType) -> Vec<f64> {
    alphas
        .iter()
        .map(|&a| {
            let snr = a as f64 / (1.0 - a as f64);
            match prediction {
                PredictionType::Epsilon if snr <= gamma => 1.0,
                PredictionType::Epsilon => gamma / snr,
                PredictionType::VPrediction => snr.min(gamma) / (snr + 1.0),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::{add_noise, min_snr_weights, target};
    use crate::models::schedulers::PredictionType;

    #[test]
    fn velocity_and_noise_recover_the_sample() {
        let x0 = Tensor::new(&[[[[0.5f32]]], [[[-1.0]]]], &Device::Cpu).unwrap();
        let eps = Tensor::new(&[[[[2.0f32]]], [[[0.25]]]], &Device::Cpu).unwrap();
        let alphas = [0.64f32, 0.36];
        let noisy = add_noise(&x0, &eps, &alphas).unwrap();
        let v = target(&x0, &eps, &alphas, PredictionType::VPrediction).unwrap();
        // x0 = √ᾱ·x_t − √(1−ᾱ)·v
        let rebuilt: Vec<f32> = noisy
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(v.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .zip(alphas)
            .map(|((xt, v), a)| a.sqrt() * xt - (1.0 - a).sqrt() * v)
            .collect();
        assert!((rebuilt[0] - 0.5).abs() < 1e-6 && (rebuilt[1] + 1.0).abs() < 1e-6);
        let w = min_snr_weights(&[0.9, 0.1], 5.0, PredictionType::Epsilon);
        assert!((w[0] - 5.0 / 9.0).abs() < 1e-6 && (w[1] - 1.0).abs() < 1e-6);
    }

    /// A zero-terminal-SNR schedule's last timestep has ᾱ = 0, so SNR 0: the noise weight is its limit 1
    /// (min(SNR, γ)/SNR = 1 for every SNR up to γ), the velocity weight kohya's min(0, γ)/(0 + 1) = 0; neither is
    /// 0/0.
    #[test]
    fn min_snr_weights_are_finite_at_zero_terminal_snr() {
        let schedule = crate::models::schedulers::SchedulerConfig {
            rescale_betas_zero_snr: true,
            ..Default::default()
        };
        let alphas = schedule.alphas_cumprod();
        assert_eq!(alphas[999], 0.0);
        let last = [alphas[998], alphas[999]];
        let eps = min_snr_weights(&last, 5.0, PredictionType::Epsilon);
        let v = min_snr_weights(&last, 5.0, PredictionType::VPrediction);
        assert_eq!((eps[1], v[1]), (1.0, 0.0));
        // Next to it the weights follow the formula (SNR there is far below γ).
        let snr = last[0] as f64 / (1.0 - last[0] as f64);
        assert!(snr > 0.0 && snr < 5.0);
        assert_eq!(eps[0], 1.0);
        assert!((v[0] - snr / (snr + 1.0)).abs() < 1e-12);
    }
}
