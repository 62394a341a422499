//! Elementwise ops whose candle backward is not exact or is slow, redone as custom ops.
//!
//! candle's `gelu_erf` gradient uses 0.398942 for 1/sqrt(2π) (off by 7e-7 relative), which finite-difference
//! checks of the UNet's GEGLU feed-forward detect. The forward here runs candle's own kernel on any backend.

use candle_core::backend::BackendStorage;
use candle_core::cpu::erf;
use candle_core::op::GeluErf;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, D, DType, Layout, MetalStorage, Result, Shape,
    Tensor,
};
use rayon::prelude::*;

use super::f32_rows;
use super::fast_math::{Simd, erf_f32, exp_f32, vectorised};
use super::fill::par_filled;
use super::tied::{Ready, TiedBackward, tie};

/// Exact (erf) GELU, `0.5·x·(1 + erf(x/√2))`, with an exact gradient.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return x.gelu_erf();
    }
    x.apply_op1(Activation::Gelu)
}

/// SiLU, `x·σ(x)`, whose backward pass is one pass over memory on the CPU (candle's composes seven
/// element-wise ops, ten times the forward's cost). f32 on the CPU runs in parallel with a vectorised
/// exponential both ways.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.apply_op1(Activation::Silu)
}

/// The gradient of SiLU's input `x` for the gradient `grad` of its output.
pub(super) fn silu_gradient(x: &Tensor, grad: &Tensor) -> Result<Tensor> {
    Activation::Silu.gradient(x, grad)
}

impl Activation {
    /// candle's own forward kernel, on any backend.
    fn forward<S: BackendStorage>(self, storage: &S, layout: &Layout) -> Result<(S, Shape)> {
        let result = match self {
            Activation::Silu => storage.unary_impl::<candle_core::op::Silu>(layout)?,
            Activation::Gelu => storage.unary_impl::<GeluErf>(layout)?,
        };
        Ok((result, layout.shape().clone()))
    }

    /// `f'(x)` composed from tensor ops, for the devices without [`ActivationGradient`].
    fn composed_derivative(self, x: &Tensor) -> Result<Tensor> {
        match self {
            // σ(x)·(1 + x·(1 − σ(x))).
            Activation::Silu => {
                let sigmoid = (x.neg()?.exp()? + 1.0)?.recip()?;
                &sigmoid * ((x * (1.0 - &sigmoid)?)? + 1.0)?
            }
            // 0.5·(1 + erf(x/√2)) + x·exp(-x²/2)/√(2π).
            Activation::Gelu => {
                let cdf = (x * std::f64::consts::FRAC_1_SQRT_2)?
                    .erf()?
                    .affine(0.5, 0.5)?;
                let density = (x.sqr()? * -0.5)?
                    .exp()?
                    .affine(1.0 / (2.0 * std::f64::consts::PI).sqrt(), 0.0)?;
                cdf + (x * density)?
            }
        }
    }
}

impl CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::Gelu => "gelu-exact",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        if let (Activation::Silu, CpuStorage::F32(data), Some((start, end))) =
            (self, storage, layout.contiguous_offsets())
        {
            let out = silu_f32(&data[start..end]);
            return Ok((CpuStorage::F32(out), layout.shape().clone()));
        }
        self.forward(storage, layout)
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        self.forward(storage, layout)
    }

    fn metal_fwd(&self, storage: &MetalStorage, layout: &Layout) -> Result<(MetalStorage, Shape)> {
        self.forward(storage, layout)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.gradient(x, grad)?))
    }
}

impl Activation {
    /// `grad · f'(x)`.
    fn gradient(self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let x = x.detach().contiguous()?;
        if has_cpu_gradient(&x) {
            let op = ActivationGradient(self);
            return x.apply_op2_no_bwd(&grad.contiguous()?, &op);
        }
        grad * self.composed_derivative(&x)?
    }
}

/// diffusers' GEGLU: `value · gelu(gate)` for `projected = [value, gate]` along the last dimension, as one
/// autograd node that keeps only its input and output (composed, `gelu(gate)` would be kept too); the
/// backward pass recomputes `gelu(gate)`.
pub fn geglu(projected: &Tensor) -> Result<Tensor> {
    let inner = projected.dim(D::Minus1)? / 2;
    let detached = projected.detach();
    let output = if has_f32_cpu_kernel(&detached) {
        Ready::from_cpu_op(&detached.contiguous()?, &GegluRows { rounded: false })?
    } else {
        let value = detached.narrow(D::Minus1, 0, inner)?;
        let gate = detached.narrow(D::Minus1, inner, inner)?;
        Ready::Tensor((value * gate.gelu_erf()?)?)
    };
    tie(output, &[projected], GegluBackward)
}

/// GEGLU of a projection kept for a backward pass (f32, or bf16 on the CPU), outside the graph; f32.
pub(super) fn geglu_of_kept(projected: &Tensor) -> Result<Tensor> {
    if projected.dtype() == DType::BF16 && super::cpu_kernels(projected.device()) {
        // In bf16 products GEGLU's output feeds only the output layer's bf16 products.
        let rows = GegluRows {
            rounded: super::bf16_products(),
        };
        return Ready::from_cpu_op(&projected.contiguous()?, &rows).map(Ready::into_tensor);
    }
    geglu(&projected.detach())
}

/// Ties the precomputed GEGLU output (first operand) to the projection (second).
struct GegluBackward;

impl TiedBackward for GegluBackward {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn bwd(&self, projected: &[&Tensor], _: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(geglu_gradient(projected[0], grad)?)])
    }
}

/// The gradient of GEGLU's input `projected` for the gradient `grad` of its output; f32, or on the CPU also
/// a projection kept in bf16 with an f32 gradient (the gradient is f32, or in bf16 products bf16: it then
/// only feeds the projection's bf16 products, which would round it anyway).
pub(super) fn geglu_gradient(projected: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let inner = projected.dim(D::Minus1)? / 2;
    let projected = projected.detach();
    let kept_in_bf16 = projected.dtype() == DType::BF16
        && grad.dtype() == DType::F32
        && super::cpu_kernels(projected.device());
    if kept_in_bf16 || has_f32_cpu_kernel(&projected) {
        // In bf16 products a projection kept in bf16 feeds only bf16 products, and so does its gradient.
        let rounded = kept_in_bf16 && super::bf16_products();
        return projected
            .contiguous()?
            .apply_op2_no_bwd(&grad.contiguous()?, &GegluGradientRows { rounded });
    }
    let value = projected.narrow(D::Minus1, 0, inner)?;
    let gate = projected.narrow(D::Minus1, inner, inner)?.contiguous()?;
    let grad_value = (grad * gate.gelu_erf()?)?;
    let grad_gate = Activation::Gelu.gradient(&gate, &(grad * value)?)?;
    Tensor::cat(&[grad_value, grad_gate], D::Minus1)
}

/// Whether the f32 CPU kernels of GEGLU apply.
fn has_f32_cpu_kernel(x: &Tensor) -> bool {
    super::cpu_kernels(x.device()) && x.dtype() == DType::F32
}

/// `0.5·(1 + erf(x/√2))` and `x·φ(x)`, whose sum is GELU's derivative and whose first times `x` is GELU.
#[inline(always)]
fn gelu_parts(x: f32) -> (f32, f32) {
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    let cdf = 0.5 * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
    (cdf, x * FRAC_1_SQRT_2PI * exp_f32(-0.5 * x * x))
}

#[inline(always)]
fn geglu_row(row: &[f32], out: &mut [f32]) {
    let (value, gate) = row.split_at(out.len());
    for ((o, &v), &g) in out.iter_mut().zip(value).zip(gate) {
        *o = v * g * gelu_parts(g).0;
    }
}

#[inline(always)]
fn geglu_gradient_row(row: &[f32], grad: &[f32], out: &mut [f32]) {
    let (value, gate) = row.split_at(grad.len());
    let (grad_value, grad_gate) = out.split_at_mut(grad.len());
    for i in 0..grad.len() {
        let (cdf, density) = gelu_parts(gate[i]);
        grad_value[i] = grad[i] * gate[i] * cdf;
        grad_gate[i] = grad[i] * value[i] * (cdf + density);
    }
}

/// GEGLU's forward over rows `[value | gate]` of contiguous f32 (or bf16) data, rows in parallel.
struct GegluRows {
    /// Whether the output is written rounded to bf16.
    rounded: bool,
}

impl CustomOp1 for GegluRows {
    fn name(&self) -> &'static str {
        "geglu-rows"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = ProjectionRows::of(storage, layout, "GEGLU")?;
        let dims = layout.dims();
        let width = dims.last().copied().unwrap_or(0);
        let inner = width / 2;
        let simd = Simd::detect();
        let row_output = |index: usize, out: &mut [f32]| {
            let mut widened = Vec::new();
            let row = input.row(index, width, &mut widened);
            vectorised(
                simd,
                #[inline(always)]
                || geglu_row(row, out),
            )
        };
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = inner;
        }
        let storage = if self.rounded {
            CpuStorage::BF16(rounded_rows(input.len() / 2, inner, row_output))
        } else {
            CpuStorage::F32(par_filled(input.len() / 2, inner, 0.0, row_output))
        };
        Ok((storage, Shape::from(shape)))
    }
}

/// `len` values in rows of `width`, each row computed in f32 by `row(index, out)` and rounded to bf16, rows
/// in parallel.
fn rounded_rows(
    len: usize,
    width: usize,
    row: impl Fn(usize, &mut [f32]) + Sync + Send,
) -> Vec<half::bf16> {
    // Rows go to the threads in groups of about 16 Ki values, each group computed through one f32 row.
    let rows_per_chunk = (ROUNDED_CHUNK / width.max(1)).max(1);
    par_filled(
        len,
        rows_per_chunk * width,
        half::bf16::ZERO,
        |chunk, out| {
            let mut values = vec![0f32; width];
            for (offset, out) in out.chunks_mut(width).enumerate() {
                row(chunk * rows_per_chunk + offset, &mut values);
                // SAFETY: `bf16` is a `u16` in a transparent wrapper.
                let bits = unsafe { &mut *(out as *mut [half::bf16] as *mut [u16]) };
                super::amx::round_to_bf16(&values, bits);
            }
        },
    )
}

/// Values per group of rows [`rounded_rows`] hands to a thread.
const ROUNDED_CHUNK: usize = 1 << 14;

/// The contiguous values of a projection, f32 or bf16.
#[derive(Clone, Copy)]
enum ProjectionRows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
}

impl<'a> ProjectionRows<'a> {
    /// The values of a contiguous storage; `what` names the op in the error.
    fn of(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<Self> {
        match (storage, layout.contiguous_offsets()) {
            (CpuStorage::BF16(values), Some((start, end))) => {
                Ok(ProjectionRows::Bf16(&values[start..end]))
            }
            _ => f32_rows(storage, layout, what).map(ProjectionRows::F32),
        }
    }

    /// Row `index` of rows `width` long, as f32 (bf16 values widened into `widened`).
    fn row<'b>(self, index: usize, width: usize, widened: &'b mut Vec<f32>) -> &'b [f32]
    where
        'a: 'b,
    {
        let range = index * width..(index + 1) * width;
        match self {
            ProjectionRows::F32(values) => &values[range],
            ProjectionRows::Bf16(values) => {
                *widened = values[range].iter().map(|v| v.to_f32()).collect();
                widened
            }
        }
    }

    fn len(self) -> usize {
        match self {
            ProjectionRows::F32(values) => values.len(),
            ProjectionRows::Bf16(values) => values.len(),
        }
    }
}

/// GEGLU's input gradient `[grad·gelu(gate) | grad·value·gelu'(gate)]` from the projection (first operand)
/// (f32 or bf16) and the output gradient (second, f32), contiguous rows in parallel.
struct GegluGradientRows {
    /// Whether the gradient is written rounded to bf16.
    rounded: bool,
}

impl CustomOp2 for GegluGradientRows {
    fn name(&self) -> &'static str {
        "geglu-gradient-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let input = ProjectionRows::of(s1, l1, "GEGLU gradient")?;
        let grad = f32_rows(s2, l2, "GEGLU gradient")?;
        let width = l1.dims().last().copied().unwrap_or(0);
        let inner = width / 2;
        if grad.len() * 2 != input.len() {
            candle_core::bail!("GEGLU gradient: the gradient does not match the projection");
        }
        let simd = Simd::detect();
        let row_gradient = |index: usize, out: &mut [f32]| {
            let grad = &grad[index * inner..][..inner];
            let mut widened = Vec::new();
            let row = input.row(index, width, &mut widened);
            vectorised(
                simd,
                #[inline(always)]
                || geglu_gradient_row(row, grad, out),
            )
        };
        let storage = if self.rounded {
            CpuStorage::BF16(rounded_rows(input.len(), width, row_gradient))
        } else {
            CpuStorage::F32(par_filled(input.len(), width, 0.0, row_gradient))
        };
        Ok((storage, l1.shape().clone()))
    }
}

/// An element-wise activation with an exact gradient: candle's forward kernel, and a one-pass gradient on
/// the CPU ([`ActivationGradient`]).
#[derive(Clone, Copy)]
enum Activation {
    Silu,
    Gelu,
}

impl Activation {
    fn derivative_f32(self, x: f32) -> f32 {
        match self {
            Activation::Silu => {
                let sigmoid = 1.0 / (1.0 + (-x).exp());
                sigmoid * (1.0 + x * (1.0 - sigmoid))
            }
            Activation::Gelu => {
                0.5 * (1.0 + erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
                    + x * (-0.5 * x * x).exp()
                        * (0.5 * std::f32::consts::FRAC_2_SQRT_PI)
                        * std::f32::consts::FRAC_1_SQRT_2
            }
        }
    }

    fn derivative_f64(self, x: f64) -> f64 {
        match self {
            Activation::Silu => {
                let sigmoid = 1.0 / (1.0 + (-x).exp());
                sigmoid * (1.0 + x * (1.0 - sigmoid))
            }
            Activation::Gelu => {
                0.5 * (1.0 + erf::erf_f64(x * std::f64::consts::FRAC_1_SQRT_2))
                    + x * (-0.5 * x * x).exp()
                        * (0.5 * std::f64::consts::FRAC_2_SQRT_PI)
                        * std::f64::consts::FRAC_1_SQRT_2
            }
        }
    }
}

/// Elements per parallel task of the f32 SiLU kernels.
const SILU_CHUNK: usize = 1 << 15;

/// `σ(x)` from `e^−|x|`, the range where [`exp_f32`] is accurate: `1/(1 + e^−x)`, or `e^x/(1 + e^x)` below 0.
#[inline(always)]
fn sigmoid_f32(x: f32) -> f32 {
    let e = exp_f32(-x.abs());
    let inverse = 1.0 / (1.0 + e);
    if x >= 0.0 { inverse } else { e * inverse }
}

/// `x ← silu(x)` for f32 values on one thread, vectorised where the processor allows.
pub(super) fn silu_in_place(x: &mut [f32]) {
    vectorised(Simd::detect(), || {
        for value in x.iter_mut() {
            *value *= sigmoid_f32(*value);
        }
    })
}

#[inline(always)]
fn silu_chunk(x: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(x) {
        *o = x * sigmoid_f32(x);
    }
}

#[inline(always)]
fn silu_gradient_chunk(x: &[f32], grad: &[f32], out: &mut [f32]) {
    for ((o, &x), &g) in out.iter_mut().zip(x).zip(grad) {
        let s = sigmoid_f32(x);
        *o = g * s * (1.0 + x * (1.0 - s));
    }
}

/// SiLU of f32 values, chunks in parallel (candle's kernel runs on one thread with a library `exp`).
fn silu_f32(x: &[f32]) -> Vec<f32> {
    let simd = Simd::detect();
    par_filled(x.len(), SILU_CHUNK, 0.0, |index, out| {
        let x = &x[index * SILU_CHUNK..][..out.len()];
        vectorised(
            simd,
            #[inline(always)]
            || silu_chunk(x, out),
        )
    })
}

/// `grad · silu'(x)` of f32 values, chunks in parallel.
fn silu_gradient_f32(x: &[f32], grad: &[f32]) -> Vec<f32> {
    let simd = Simd::detect();
    par_filled(x.len(), SILU_CHUNK, 0.0, |index, out| {
        let run = index * SILU_CHUNK..index * SILU_CHUNK + out.len();
        let (x, grad) = (&x[run.clone()], &grad[run]);
        vectorised(
            simd,
            #[inline(always)]
            || silu_gradient_chunk(x, grad, out),
        )
    })
}

/// `grad · f'(x)` for an activation `f`, in one parallel pass, for contiguous f32/f64 tensors on the CPU.
struct ActivationGradient(Activation);

fn times_derivative<T: Copy + Send + Sync + std::ops::Mul<Output = T>>(
    x: &[T],
    grad: &[T],
    derivative: impl Fn(T) -> T + Sync,
) -> Vec<T> {
    x.par_iter()
        .zip(grad)
        .map(|(&x, &g)| g * derivative(x))
        .collect()
}

/// Whether [`ActivationGradient`] can take `x`.
fn has_cpu_gradient(x: &Tensor) -> bool {
    super::cpu_kernels(x.device()) && matches!(x.dtype(), DType::F32 | DType::F64)
}

impl CustomOp2 for ActivationGradient {
    fn name(&self) -> &'static str {
        "activation-gradient"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some((x_start, x_end)), Some((g_start, g_end))) = (
            x_layout.contiguous_offsets(),
            grad_layout.contiguous_offsets(),
        ) else {
            candle_core::bail!("activation gradient: the inputs are not contiguous");
        };
        let activation = self.0;
        let result = match (x, grad) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                let (x, g) = (&x[x_start..x_end], &g[g_start..g_end]);
                if x.len() != g.len() {
                    candle_core::bail!(
                        "activation gradient: the gradient does not match the input"
                    );
                }
                CpuStorage::F32(match activation {
                    Activation::Silu => silu_gradient_f32(x, g),
                    Activation::Gelu => times_derivative(x, g, |v| activation.derivative_f32(v)),
                })
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => CpuStorage::F64(times_derivative(
                &x[x_start..x_end],
                &g[g_start..g_end],
                |v| activation.derivative_f64(v),
            )),
            _ => {
                candle_core::bail!("activation gradient: f32 or f64 tensors of one type are needed")
            }
        };
        Ok((result, x_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{CustomOp1, Device, Tensor, Var};

    use crate::test_support::max_abs_diff;

    #[test]
    fn in_bf16_products_geglu_of_a_kept_projection_writes_rounded_values() {
        let projected = (Tensor::randn(0f32, 1.5, (3, 64), &Device::Cpu).unwrap())
            .to_dtype(candle_core::DType::BF16)
            .unwrap();
        let grad = Tensor::randn(0f32, 1.0, (3, 32), &Device::Cpu).unwrap();
        // Outside the scope: f32 values; inside: the same values rounded to bf16.
        let output = super::geglu_of_kept(&projected).unwrap();
        let gradient = super::geglu_gradient(&projected, &grad).unwrap();
        let Some(_scope) = crate::kernels::Bf16Products::enter() else {
            return;
        };
        let rounded_output = super::geglu_of_kept(&projected).unwrap();
        let rounded_gradient = super::geglu_gradient(&projected, &grad).unwrap();
        for (f32_values, rounded) in [(output, rounded_output), (gradient, rounded_gradient)] {
            assert_eq!(f32_values.dtype(), candle_core::DType::F32);
            assert_eq!(rounded.dtype(), candle_core::DType::BF16);
            let expected = f32_values.to_dtype(candle_core::DType::BF16).unwrap();
            let wide = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
            assert_eq!(max_abs_diff(&wide(&rounded), &wide(&expected)), 0.0);
        }
    }

    #[test]
    fn silu_gradient_matches_finite_differences() {
        let values: Vec<f64> = (0..41).map(|i| (i as f64 - 20.0) / 3.0).collect();
        let x =
            Var::from_tensor(&Tensor::from_vec(values.clone(), 41, &Device::Cpu).unwrap()).unwrap();
        let weights = Tensor::arange(1f64, 42.0, &Device::Cpu).unwrap();
        let grads = (super::silu(x.as_tensor()).unwrap() * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let analytic = grads.get(&x).unwrap().to_vec1::<f64>().unwrap();
        let f = |v: f64| v / (1.0 + (-v).exp());
        for (i, (v, g)) in values.iter().zip(analytic).enumerate() {
            let numeric = (i + 1) as f64 * (f(v + 1e-6) - f(v - 1e-6)) / 2e-6;
            assert!(
                (g - numeric).abs() < 1e-7 * (i + 1) as f64,
                "x = {v}: {g} vs {numeric}"
            );
        }
    }

    #[test]
    fn f32_silu_and_its_gradient_match_f64() {
        // Both signs, tiny and large magnitudes, and more than one parallel chunk.
        let n = 3 * super::SILU_CHUNK + 5;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 20011) as f32 - 10005.0) * 0.009)
            .collect();
        let grad: Vec<f32> = (0..n).map(|i| ((i % 13) as f32 - 6.0) * 0.5).collect();
        let silu = super::silu_f32(&x);
        let silu_grad = super::silu_gradient_f32(&x, &grad);
        for i in 0..n {
            let (v, g) = (x[i] as f64, grad[i] as f64);
            let sigmoid = 1.0 / (1.0 + (-v).exp());
            let expected = v * sigmoid;
            let expected_grad = g * sigmoid * (1.0 + v * (1.0 - sigmoid));
            assert!(
                (silu[i] as f64 - expected).abs() < 1e-6 * (1.0 + expected.abs()),
                "silu({v}) = {} vs {expected}",
                silu[i]
            );
            assert!(
                (silu_grad[i] as f64 - expected_grad).abs() < 1e-6 * (1.0 + expected_grad.abs()),
                "silu'({v})·{g} = {} vs {expected_grad}",
                silu_grad[i]
            );
        }
    }

    #[test]
    fn geglu_matches_the_composed_form_and_its_gradient() {
        let values = Tensor::arange(0f64, 2.0 * 3.0 * 10.0, &Device::Cpu)
            .unwrap()
            .affine(0.29, -2.0)
            .unwrap()
            .sin()
            .unwrap()
            .affine(3.0, 0.0)
            .unwrap()
            .reshape((2, 3, 10))
            .unwrap();
        let x = Var::from_tensor(&values).unwrap();
        let ours = super::geglu(x.as_tensor()).unwrap();
        let value = x.as_tensor().narrow(2, 0, 5).unwrap();
        let gate = x.as_tensor().narrow(2, 5, 5).unwrap();
        let composed = (value * super::gelu(&gate).unwrap()).unwrap();
        assert!(max_abs_diff(&ours, &composed) < 1e-14);
        let weights = ours.cos().unwrap();
        let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();
        let ours_grad = loss(&ours).backward().unwrap();
        let composed_grad = loss(&composed).backward().unwrap();
        let gap = max_abs_diff(ours_grad.get(&x).unwrap(), composed_grad.get(&x).unwrap());
        assert!(gap < 1e-13, "gradient differs by {gap}");
    }

    #[test]
    fn the_f32_geglu_kernels_match_f64() {
        let values = Tensor::arange(0f64, 4.0 * 38.0, &Device::Cpu)
            .unwrap()
            .affine(0.41, -1.0)
            .unwrap()
            .sin()
            .unwrap()
            .affine(4.0, 0.0)
            .unwrap()
            .reshape((4, 38))
            .unwrap();
        let run = |dtype: candle_core::DType| {
            let x = Var::from_tensor(&values.to_dtype(dtype).unwrap()).unwrap();
            let y = super::geglu(x.as_tensor()).unwrap();
            let weights = Tensor::arange(0f64, 4.0 * 19.0, &Device::Cpu)
                .unwrap()
                .cos()
                .unwrap()
                .reshape((4, 19))
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let grads = (&y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grad = grads
                .get(&x)
                .unwrap()
                .to_dtype(candle_core::DType::F64)
                .unwrap();
            (y.to_dtype(candle_core::DType::F64).unwrap(), grad)
        };
        let (y32, g32) = run(candle_core::DType::F32);
        let (y64, g64) = run(candle_core::DType::F64);
        assert!(
            max_abs_diff(&y32, &y64) < 1e-5,
            "{}",
            max_abs_diff(&y32, &y64)
        );
        assert!(
            max_abs_diff(&g32, &g64) < 1e-5,
            "{}",
            max_abs_diff(&g32, &g64)
        );
    }

    #[test]
    fn composed_derivatives_for_other_devices_match_the_cpu_pass() {
        let x = Tensor::arange(-60f64, 61.0, &Device::Cpu)
            .unwrap()
            .affine(0.1, 0.0)
            .unwrap();
        let ones = x.ones_like().unwrap();
        for activation in [super::Activation::Silu, super::Activation::Gelu] {
            let composed = activation.composed_derivative(&x).unwrap();
            let one_pass = x
                .apply_op2_no_bwd(&ones, &super::ActivationGradient(activation))
                .unwrap();
            let diff = crate::test_support::max_abs_diff(&composed, &one_pass);
            assert!(diff < 1e-12, "{}: {diff}", activation.name());
        }
    }

    #[test]
    fn gelu_gradient_matches_finite_differences() {
        let values: Vec<f64> = (0..41).map(|i| (i as f64 - 20.0) / 5.0).collect();
        let x =
            Var::from_tensor(&Tensor::from_vec(values.clone(), 41, &Device::Cpu).unwrap()).unwrap();
        let grads = super::gelu(x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let analytic = grads.get(&x).unwrap().to_vec1::<f64>().unwrap();
        let f = |v: f64| {
            Tensor::new(&[v], &Device::Cpu)
                .unwrap()
                .gelu_erf()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()[0]
        };
        for (v, g) in values.iter().zip(analytic) {
            let numeric = (f(v + 1e-6) - f(v - 1e-6)) / 2e-6;
            assert!((g - numeric).abs() < 1e-9, "x = {v}: {g} vs {numeric}");
        }
    }
}
