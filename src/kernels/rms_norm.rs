//! RMS normalisation (Llama, Qwen) with its own backward pass.
//!
//! candle's fused `rms_norm` returns no gradient, and composed from candle ops the normalisation keeps the
//! squares, their mean and its root alive and differentiates through broadcasting reductions. Here the rows
//! are normalised on detached values and a custom op ties the result to the input; its backward pass
//! applies the normalisation's gradient directly: with `r = 1/√(mean(x²) + eps)`, `x̂ = x·r` and the incoming
//! gradient `g` of `x̂·weight`, per row `dx = r·(g·weight − x̂·mean(g·weight·x̂))`. The weight is frozen:
//! only the input's gradient is computed. f32 on the CPU runs [`super::norm_kernel`]'s loops; every other
//! case (f64, f16, bf16, CUDA, Metal) the composed path, which computes in f32 for f16/bf16 and rounds the
//! normalised rows to the input's type before the weight multiplies them, as transformers does.

use candle_core::{CpuStorage, D, DType, Result, Tensor};

use super::fused_norm::{kernel_input_gradient, with_values};
use super::norm_kernel;
use super::tied::{Ready, TiedBackward, tie};

/// `x / √(mean(x²) + eps) · weight` over the last dimension of `x`; `weight` (`[n]`, `x`'s dtype) is frozen,
/// the result differentiable in `x`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let size = x.dim(D::Minus1)?;
    if weight.dims1()? != size {
        candle_core::bail!(
            "rms norm: a weight of {} values for rows of {size}",
            weight.elem_count()
        );
    }
    let f32_on_cpu = |t: &Tensor| super::cpu_kernels(t.device()) && t.dtype() == DType::F32;
    if f32_on_cpu(x) && f32_on_cpu(weight) {
        return kernel_rms_norm(x, weight, eps);
    }
    let dtype = x.dtype();
    let values = x.detach().to_dtype(internal_dtype(dtype))?;
    let inverse_rms = (values.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let y = values
        .broadcast_mul(&inverse_rms)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)?;
    tie(
        y,
        &[x],
        RmsNormBackward {
            inverse_rms,
            weight: weight.clone(),
        },
    )
}

/// f16 and bf16 rows are normalised in f32.
fn internal_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// [`rms_norm`] by [`norm_kernel`]: f32 values on the CPU.
fn kernel_rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let weight_values: Vec<f32> = weight.to_vec1()?;
    let (output, inverse_rms) = with_values(&x.detach(), |values| {
        norm_kernel::rms_forward(values, &weight_values, eps)
    })?;
    tie(
        Ready::Cpu(CpuStorage::F32(output), x.shape().clone()),
        &[x],
        KernelRmsNormBackward {
            weight: weight_values,
            inverse_rms,
        },
    )
}

/// Routes the output gradient of [`kernel_rms_norm`] to its input.
struct KernelRmsNormBackward {
    weight: Vec<f32>,
    inverse_rms: Vec<f32>,
}

impl TiedBackward for KernelRmsNormBackward {
    fn name(&self) -> &'static str {
        "rms-normalization-kernel"
    }

    fn bwd(&self, x: &[&Tensor], _: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let grad_x = kernel_input_gradient(x[0], grad, |x_values, grad_values| {
            norm_kernel::rms_backward(x_values, grad_values, &self.inverse_rms, &self.weight)
        })?;
        Ok(vec![Some(grad_x)])
    }
}

/// Routes the output gradient of the composed [`rms_norm`] to its input.
struct RmsNormBackward {
    /// `1/√(mean(x²) + eps)` of each row, `[..., 1]`, in the internal dtype.
    inverse_rms: Tensor,
    weight: Tensor,
}

impl TiedBackward for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms-normalization"
    }

    fn bwd(&self, x: &[&Tensor], _: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let x = x[0];
        let internal = self.inverse_rms.dtype();
        let normalized = x
            .detach()
            .to_dtype(internal)?
            .broadcast_mul(&self.inverse_rms)?;
        let grad = grad
            .to_dtype(internal)?
            .broadcast_mul(&self.weight.to_dtype(internal)?)?;
        let projection = (&grad * &normalized)?.mean_keepdim(D::Minus1)?;
        let grad_x = grad
            .sub(&normalized.broadcast_mul(&projection)?)?
            .broadcast_mul(&self.inverse_rms)?
            .to_dtype(x.dtype())?;
        Ok(vec![Some(grad_x)])
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, DType, Device, Tensor, Var};

    use crate::test_support::max_abs_diff;

    use super::rms_norm;

    /// transformers' RMSNorm from candle ops (differentiable through candle's own backward).
    fn composed(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
        let mean_square = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        x.broadcast_div(&(mean_square + eps).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(weight)
            .unwrap()
    }

    fn values(dims: &[usize], seed: f64) -> Tensor {
        let count: usize = dims.iter().product();
        Tensor::arange(0f64, count as f64, &Device::Cpu)
            .unwrap()
            .affine(0.37, seed)
            .unwrap()
            .sin()
            .unwrap()
            .affine(2.0, 0.3)
            .unwrap()
            .reshape(dims)
            .unwrap()
    }

    /// Output and input gradient of `rms_norm` in `dtype` against the composed form in f64.
    fn matches_composed(dtype: DType, tolerance: f64) {
        // 37 features: more than the kernel's lanes and not a multiple of them; rows over three axes.
        let x64 = values(&[2, 3, 37], 0.2);
        let weight64 = values(&[37], 1.1).affine(0.5, 1.0).unwrap();
        let probe = values(&[2, 3, 37], 0.7).cos().unwrap();
        let eps = 1e-6;
        let reference_x = Var::from_tensor(&x64).unwrap();
        let reference = composed(reference_x.as_tensor(), &weight64, eps);
        let reference_grad = (&reference * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let x = Var::from_tensor(&x64.to_dtype(dtype).unwrap()).unwrap();
        let ours = rms_norm(x.as_tensor(), &weight64.to_dtype(dtype).unwrap(), eps).unwrap();
        let grads = (&ours * probe.to_dtype(dtype).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let as_f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let y_diff = max_abs_diff(&as_f64(&ours), &reference);
        let grad_diff = max_abs_diff(
            &as_f64(grads.get(&x).unwrap()),
            reference_grad.get(&reference_x).unwrap(),
        );
        assert!(y_diff < tolerance, "{dtype:?}: output differs by {y_diff}");
        assert!(
            grad_diff < tolerance,
            "{dtype:?}: gradient differs by {grad_diff}"
        );
    }

    #[test]
    fn matches_the_composed_norm_and_its_gradient() {
        matches_composed(DType::F64, 1e-12);
        matches_composed(DType::F32, 1e-5);
        matches_composed(DType::BF16, 5e-2);
    }

    #[test]
    fn a_weight_of_the_wrong_length_is_an_error() {
        let error = rms_norm(&values(&[2, 5], 0.1), &values(&[4], 0.1), 1e-5).unwrap_err();
        assert!(
            error.to_string().contains("4 values for rows of 5"),
            "{error}"
        );
    }
}
