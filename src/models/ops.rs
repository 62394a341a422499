//! Elementwise ops whose candle backward is not exact, redone as custom ops with exact backward passes.
//!
//! candle's `gelu_erf` gradient uses 0.398942 for 1/sqrt(2π) (off by 7e-7 relative), which finite-difference
//! checks of the UNet's GEGLU feed-forward detect. The forward here runs candle's own kernel on any backend.
//! Also the forward of the ops that attach a result computed without a graph to its inputs
//! ([`pass_through`]), whose backward passes are their own.

use candle_core::backend::BackendStorage;
use candle_core::op::GeluErf;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, Layout, MetalStorage, Result, Shape, Tensor,
};

/// The forward pass of an op that ties `storage` (a result computed on detached tensors) to the inputs
/// its backward pass differentiates: the result, unchanged. `what` names the op in the error.
pub(super) fn pass_through<S: BackendStorage>(
    storage: &S,
    layout: &Layout,
    what: &str,
) -> Result<(S, Shape)> {
    if !layout.is_contiguous() || layout.start_offset() != 0 {
        candle_core::bail!("{what}: the result is not a fresh contiguous tensor");
    }
    Ok((storage.try_clone(layout)?, layout.shape().clone()))
}

/// Exact (erf) GELU, `0.5·x·(1 + erf(x/√2))`, with an exact gradient.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return x.gelu_erf();
    }
    x.apply_op1(Gelu)
}

struct Gelu;

impl Gelu {
    fn forward<S: BackendStorage>(storage: &S, layout: &Layout) -> Result<(S, Shape)> {
        Ok((
            storage.unary_impl::<GeluErf>(layout)?,
            layout.shape().clone(),
        ))
    }
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-exact"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        Self::forward(storage, layout)
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        Self::forward(storage, layout)
    }

    fn metal_fwd(&self, storage: &MetalStorage, layout: &Layout) -> Result<(MetalStorage, Shape)> {
        Self::forward(storage, layout)
    }

    /// d/dx = 0.5·(1 + erf(x/√2)) + x·exp(-x²/2)/√(2π).
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let cdf = (x * std::f64::consts::FRAC_1_SQRT_2)?
            .erf()?
            .affine(0.5, 0.5)?;
        let density = (x.sqr()? * -0.5)?
            .exp()?
            .affine(1.0 / (2.0 * std::f64::consts::PI).sqrt(), 0.0)?;
        let derivative = (cdf + (x * density)?)?;
        Ok(Some((grad * derivative)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

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
