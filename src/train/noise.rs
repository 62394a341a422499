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

/// Min-SNR-γ loss weights (Hang et al. 2023): `min(SNR, γ) / SNR` for noise prediction,
/// `min(SNR, γ) / (SNR + 1)` for velocity prediction.
pub fn min_snr_weights(alphas: &[f32], gamma: f64, prediction: PredictionType) -> Vec<f64> {
    alphas
        .iter()
        .map(|&a| {
            let snr = a as f64 / (1.0 - a as f64);
            let clipped = snr.min(gamma);
            match prediction {
                PredictionType::Epsilon => clipped / snr,
                PredictionType::VPrediction => clipped / (snr + 1.0),
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
}
