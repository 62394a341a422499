//! AdamW's update of one variable, as `torch.optim.AdamW` computes it (decoupled weight decay,
//! bias-corrected moments): composed of candle ops on any device, or in one pass over the values where the
//! variable, its gradient and its moments are f32 tensors in CPU memory. The composed form reads and writes
//! every value once per op, 13 ops a variable, each a parallel call of its own; the pass reads four values
//! and writes three (an SDXL LoRA's 23 M parameters: 0.04 s a step instead of 0.07 s on two cores). Both
//! compute the same f32 values: the constants rounded to f32 as candle's scalar ops round them, the
//! operations in the same order.

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};

/// The hyper-parameters of one update.
#[derive(Debug, Clone, Copy)]
pub(super) struct AdamStep {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub lr: f64,
    /// Updates applied so far, this one included.
    pub step: u64,
}

/// A variable's new values and moments.
pub(super) struct Updated {
    pub param: Tensor,
    pub m: Tensor,
    pub v: Tensor,
}

impl AdamStep {
    /// The update of `param` (f32) with gradient `grad` and moments `m`, `v`: in one pass where all four are
    /// f32 in CPU memory, else composed.
    pub fn update(
        &self,
        param: &Tensor,
        grad: &Tensor,
        (m, v): (&Tensor, &Tensor),
    ) -> Result<Updated> {
        match self.in_one_pass(param, grad, (m, v))? {
            Some(updated) => Ok(updated),
            None => self.composed(param, grad, (m, v)),
        }
    }

    /// The update as candle ops.
    fn composed(
        &self,
        param: &Tensor,
        grad: &Tensor,
        (m, v): (&Tensor, &Tensor),
    ) -> Result<Updated> {
        let (bias1, bias2) = self.bias_corrections();
        let m = ((m * self.beta1)? + (grad * (1.0 - self.beta1))?)?;
        let v = ((v * self.beta2)? + (grad.sqr()? * (1.0 - self.beta2))?)?;
        let denom = ((v.sqrt()? / bias2.sqrt())? + self.eps)?;
        let decayed = (param * (1.0 - self.lr * self.weight_decay))?;
        let param = (decayed - (m.div(&denom)? * (self.lr / bias1))?)?;
        Ok(Updated { param, m, v })
    }

    /// The update in one pass over the values, or `None` where a tensor is not f32 in CPU memory.
    fn in_one_pass(
        &self,
        param: &Tensor,
        grad: &Tensor,
        (m, v): (&Tensor, &Tensor),
    ) -> Result<Option<Updated>> {
        let tensors = [param, grad, m, v];
        if tensors
            .iter()
            .any(|t| !t.device().is_cpu() || t.dtype() != DType::F32)
        {
            return Ok(None);
        }
        let tensors = tensors
            .iter()
            .map(|t| t.contiguous())
            .collect::<Result<Vec<_>>>()?;
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let slices = guards
            .iter()
            .map(
                |(storage, layout)| match (&**storage, layout.contiguous_offsets()) {
                    (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) => {
                        Some(&values[start..end])
                    }
                    _ => None,
                },
            )
            .collect::<Option<Vec<_>>>();
        // Tensors of different sizes are left to the composed form, which names the mismatch.
        let Some(Ok(slices)) = slices.map(<[&[f32]; 4]>::try_from) else {
            return Ok(None);
        };
        if slices.iter().any(|s| s.len() != slices[0].len()) {
            return Ok(None);
        }
        let (new_param, new_m, new_v) = self.pass(slices);
        let shape = param.shape();
        let tensor = |values: Vec<f32>| Tensor::from_vec(values, shape, &Device::Cpu);
        Ok(Some(Updated {
            param: tensor(new_param)?,
            m: tensor(new_m)?,
            v: tensor(new_v)?,
        }))
    }

    /// The new parameters, first and second moments from the old ones and the gradient.
    fn pass(&self, [param, grad, m, v]: [&[f32]; 4]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (bias1, bias2) = self.bias_corrections();
        // Each constant as candle's `tensor * scalar` (an affine op in the tensor's dtype) rounds it.
        let beta1 = self.beta1 as f32;
        let rest1 = (1.0 - self.beta1) as f32;
        let beta2 = self.beta2 as f32;
        let rest2 = (1.0 - self.beta2) as f32;
        let unbias2 = (1.0 / bias2.sqrt()) as f32;
        let eps = self.eps as f32;
        let decay = (1.0 - self.lr * self.weight_decay) as f32;
        let step_size = (self.lr / bias1) as f32;
        let len = param.len();
        let (grad, m, v) = (&grad[..len], &m[..len], &v[..len]);
        let (mut new_param, mut new_m, mut new_v) =
            (vec![0f32; len], vec![0f32; len], vec![0f32; len]);
        for i in 0..len {
            let g = grad[i];
            let m = m[i] * beta1 + g * rest1;
            let v = v[i] * beta2 + (g * g) * rest2;
            let denom = v.sqrt() * unbias2 + eps;
            new_param[i] = param[i] * decay - (m / denom) * step_size;
            new_m[i] = m;
            new_v[i] = v;
        }
        (new_param, new_m, new_v)
    }

    /// `1 − β₁ᵗ` and `1 − β₂ᵗ`.
    fn bias_corrections(&self) -> (f64, f64) {
        let t = self.step as f64;
        (1.0 - self.beta1.powf(t), 1.0 - self.beta2.powf(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32, scale: f32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                let x = (i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % 20_011;
                scale * (x as f32 / 10_005.5 - 1.0)
            })
            .collect()
    }

    #[test]
    fn the_pass_computes_the_composed_values_bit_for_bit() {
        let step = AdamStep {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            lr: 3e-4,
            step: 7,
        };
        let len = 1000;
        let tensor = |values: Vec<f32>| Tensor::from_vec(values, (40, 25), &Device::Cpu).unwrap();
        let param = tensor(values(len, 1, 1.0));
        let grad = tensor(values(len, 2, 0.1));
        let m = tensor(values(len, 3, 0.01));
        let v = tensor(values(len, 4, 1e-4).iter().map(|x| x.abs()).collect());
        let fused = step.in_one_pass(&param, &grad, (&m, &v)).unwrap().unwrap();
        let composed = step.composed(&param, &grad, (&m, &v)).unwrap();
        let pairs = [
            ("param", fused.param, composed.param),
            ("m", fused.m, composed.m),
            ("v", fused.v, composed.v),
        ];
        for (name, fused, composed) in pairs {
            assert_eq!(fused.dims(), &[40, 25], "{name}");
            let (fused, composed) = (
                fused.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                composed.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(fused, composed, "{name}");
        }
    }

    #[test]
    fn only_f32_tensors_in_cpu_memory_take_the_pass_strided_or_not() {
        let step = AdamStep {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            lr: 0.1,
            step: 3,
        };
        let param = Tensor::from_vec(values(6, 5, 1.0), (2, 3), &Device::Cpu).unwrap();
        let zeros = param.zeros_like().unwrap();
        let bf16 = param.to_dtype(DType::BF16).unwrap();
        assert!(
            step.in_one_pass(&param, &bf16, (&zeros, &zeros))
                .unwrap()
                .is_none()
        );
        // A gradient read through a transposed view gives the values of its contiguous copy.
        let grad = Tensor::from_vec(values(6, 6, 0.5), (3, 2), &Device::Cpu).unwrap();
        let strided = grad.t().unwrap();
        assert!(!strided.is_contiguous());
        let fused = step.update(&param, &strided, (&zeros, &zeros)).unwrap();
        let contiguous = strided.contiguous().unwrap();
        let composed = step
            .composed(&param, &contiguous, (&zeros, &zeros))
            .unwrap();
        assert_eq!(
            fused.param.to_vec2::<f32>().unwrap(),
            composed.param.to_vec2::<f32>().unwrap()
        );
    }
}
