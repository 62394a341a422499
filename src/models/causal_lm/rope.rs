//! Rotary position embeddings: the inverse frequencies of a model (theta, optionally Llama 3's
//! `rope_scaling`) and the cosine and sine tables for the positions of a batch. Computed in f32 the way
//! transformers computes them (frequencies, products with positions, cos and sin all in f32), then cast to
//! the model's dtype. The rotation itself is [`crate::kernels::rotary_embedding`].

use candle_core::{DType, Device, Result, Tensor};

use super::config::{CausalLmConfig, RopeScaling};

/// The inverse frequencies of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct RotaryFrequencies {
    /// `head_dim / 2` values.
    inverse: Vec<f32>,
}

impl RotaryFrequencies {
    pub fn new(config: &CausalLmConfig) -> Self {
        let dim = config.head_dim;
        let theta = config.rope_theta as f32;
        let plain = (0..dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / dim as f32));
        let inverse = match config.rope_scaling {
            RopeScaling::None => plain.collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let [factor, low, high, context] = [
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                ]
                .map(|v| v as f32);
                plain
                    .map(|f| llama3_frequency(f, factor, (low, high), context))
                    .collect()
            }
        };
        Self { inverse }
    }

    /// `(cos, sin)` of `position · frequency`, each `[rows, positions.len() / rows, head_dim / 2]` in
    /// `dtype` on `device`.
    pub fn tables(
        &self,
        positions: &[u32],
        rows: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inverse.len();
        let angles: Vec<f32> = positions
            .iter()
            .flat_map(|&p| self.inverse.iter().map(move |&f| p as f32 * f))
            .collect();
        let shape = (rows, positions.len() / rows.max(1), half);
        let table = |f: fn(f32) -> f32| {
            let values: Vec<f32> = angles.iter().map(|&a| f(a)).collect();
            Tensor::from_vec(values, shape, device)?.to_dtype(dtype)
        };
        Ok((table(f32::cos)?, table(f32::sin)?))
    }
}

/// transformers' `_compute_llama3_parameters` for one frequency: wavelengths shorter than
/// `context / high` keep their frequency, longer than `context / low` are divided by `factor`, and those
/// between blend the two by `(context / wavelength − low) / (high − low)`.
fn llama3_frequency(frequency: f32, factor: f32, (low, high): (f32, f32), context: f32) -> f32 {
    let wavelength = 2.0 * std::f32::consts::PI / frequency;
    if wavelength < context / high {
        frequency
    } else if wavelength > context / low {
        frequency / factor
    } else {
        let smooth = (context / wavelength - low) / (high - low);
        (1.0 - smooth) * frequency / factor + smooth * frequency
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_divides_and_blends_by_wavelength() {
        let (factor, bands, context) = (8.0, (1.0, 4.0), 64.0);
        // Wavelength 2π/1 ≈ 6.3 < 16: kept; 2π/0.01 ≈ 628 > 64: divided; 2π/0.2 ≈ 31.4: blended.
        assert_eq!(llama3_frequency(1.0, factor, bands, context), 1.0);
        assert_eq!(llama3_frequency(0.01, factor, bands, context), 0.01 / 8.0);
        let blended = llama3_frequency(0.2, factor, bands, context);
        let smooth = (64.0 / (2.0 * std::f32::consts::PI / 0.2) - 1.0) / 3.0;
        assert!((blended - ((1.0 - smooth) * 0.2 / 8.0 + smooth * 0.2)).abs() < 1e-7);
        assert!(0.2 / 8.0 < blended && blended < 0.2);
    }

    #[test]
    fn tables_hold_one_angle_per_position_and_frequency() {
        let frequencies = RotaryFrequencies {
            inverse: vec![1.0, 0.5],
        };
        let (cos, sin) = frequencies
            .tables(&[0, 1, 2, 0, 3, 1], 2, DType::F32, &Device::Cpu)
            .unwrap();
        assert_eq!(cos.dims(), [2, 3, 2]);
        let sin: Vec<f32> = sin.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(sin[2..4], [1f32.sin(), 0.5f32.sin()]);
        assert_eq!(sin[8..10], [3f32.sin(), 1.5f32.sin()]);
    }
}
