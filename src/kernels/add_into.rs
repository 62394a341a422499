//! Terms added to a freshly computed output in place: a layer's product plus a same-shaped term (a LoRA's
//! low-rank product) and a bias repeated along its features, in one parallel pass over the output. As
//! candle ops they would make a full-size tensor per term (two passes over memory, each on one or two
//! threads while the rest wait).

use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

use super::tied::Ready;

/// Values per parallel task.
const CHUNK: usize = 1 << 14;

/// `output + term + bias`, where `output` is a fresh result that nothing else holds (on the CPU it is
/// changed in place and returned), `term` has its shape, and `bias` broadcasts to it along one dimension
/// of features (`[out]` for a linear layer's `[.., out]`, `[1, out, 1, 1]` for a convolution's
/// `[n, out, h, w]`).
pub(crate) fn add_into(
    output: Tensor,
    term: Option<&Tensor>,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let in_place = super::cpu_kernels(output.device())
        && output.dtype() == DType::F32
        && output.is_contiguous()
        && term.is_none_or(|t| {
            t.dtype() == DType::F32 && t.is_contiguous() && t.shape() == output.shape()
        });
    let features = bias.and_then(|bias| feature_layout(output.dims(), bias));
    if !in_place || (bias.is_some() && features.is_none()) {
        let output = match term {
            Some(term) => (output + term)?,
            None => output,
        };
        return match bias {
            Some(bias) => output.broadcast_add(bias),
            None => Ok(output),
        };
    }
    let bias = match (bias, features) {
        (Some(bias), Some(run)) => {
            Some((bias.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?, run))
        }
        _ => None,
    };
    let op = AddTerms { bias };
    match term {
        Some(term) => output.inplace_op2(term, &op)?,
        None => output.inplace_op1(&op)?,
    }
    Ok(output)
}

/// [`add_into`] of a bias alone, for a result about to be tied ([`Ready`]): values on the CPU get the bias in
/// place and stay movable into the tied op's output.
pub(crate) fn add_bias_into(output: Ready, bias: Option<&Tensor>) -> Result<Ready> {
    let Some(bias) = bias else {
        return Ok(output);
    };
    let run = match &output {
        Ready::Cpu(CpuStorage::F32(_), shape) => feature_layout(shape.dims(), bias),
        _ => None,
    };
    match (output, run) {
        (Ready::Cpu(CpuStorage::F32(mut values), shape), Some(run)) => {
            let bias = bias.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            AddTerms {
                bias: Some((bias, run)),
            }
            .add(&mut values, None);
            Ok(Ready::Cpu(CpuStorage::F32(values), shape))
        }
        (other, _) => Ok(Ready::Tensor(add_into(
            other.into_tensor(),
            None,
            Some(bias),
        )?)),
    }
}

/// `output + term` for a result about to be tied ([`Ready`]) and a term of its shape (a residual): values
/// on the CPU get the term in place and stay movable into the tied op's output.
pub(crate) fn add_term_into(output: Ready, term: &Tensor) -> Result<Ready> {
    match output {
        Ready::Cpu(CpuStorage::F32(mut values), shape)
            if term.dtype() == DType::F32 && term.shape() == &shape =>
        {
            super::fused_norm::with_values(term, |term| {
                AddTerms { bias: None }.add(&mut values, Some(term))
            })?;
            Ok(Ready::Cpu(CpuStorage::F32(values), shape))
        }
        other => Ok(Ready::Tensor(add_into(
            other.into_tensor(),
            Some(term),
            None,
        )?)),
    }
}

/// How many consecutive output values share a bias value, when `bias` broadcasts to `dims` along a single
/// dimension (or none).
fn feature_layout(dims: &[usize], bias: &Tensor) -> Option<usize> {
    let bias_dims = bias.dims();
    if bias_dims.len() > dims.len() {
        return None;
    }
    let offset = dims.len() - bias_dims.len();
    let mut features = bias_dims.iter().enumerate().filter(|&(_, &d)| d != 1);
    let Some((index, &count)) = features.next() else {
        return Some(dims.iter().product::<usize>().max(1));
    };
    (features.next().is_none() && dims[offset + index] == count)
        .then(|| dims[offset + index + 1..].iter().product())
}

/// The in-place sum: the bias values with the run of output values each covers.
struct AddTerms {
    bias: Option<(Vec<f32>, usize)>,
}

impl AddTerms {
    fn add(&self, output: &mut [f32], term: Option<&[f32]>) {
        output
            .par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(index, part)| {
                let start = index * CHUNK;
                if let Some(term) = term {
                    for (y, &t) in part.iter_mut().zip(&term[start..]) {
                        *y += t;
                    }
                }
                match &self.bias {
                    Some((bias, 1)) => {
                        let cycled = bias.iter().cycle().skip(start % bias.len());
                        for (y, &b) in part.iter_mut().zip(cycled) {
                            *y += b;
                        }
                    }
                    Some((bias, run)) => {
                        // Runs of `run` values share a bias value.
                        let mut i = 0;
                        while i < part.len() {
                            let at = start + i;
                            let end = part.len().min(i + run - at % run);
                            let b = bias[at / run % bias.len()];
                            part[i..end].iter_mut().for_each(|y| *y += b);
                            i = end;
                        }
                    }
                    None => {}
                }
            });
    }
}

/// The contiguous f32 values of a storage, writable.
fn values_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout) -> Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(values), Some((start, end))) => Ok(&mut values[start..end]),
        _ => candle_core::bail!("add-terms: expects contiguous f32 data"),
    }
}

impl InplaceOp1 for AddTerms {
    fn name(&self) -> &'static str {
        "add-terms"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        self.add(values_mut(storage, layout)?, None);
        Ok(())
    }
}

impl InplaceOp2 for AddTerms {
    fn name(&self) -> &'static str {
        "add-terms"
    }

    fn cpu_fwd(
        &self,
        output: &mut CpuStorage,
        output_layout: &Layout,
        term: &CpuStorage,
        term_layout: &Layout,
    ) -> Result<()> {
        let term = super::f32_rows(term, term_layout, "add-terms")?;
        self.add(values_mut(output, output_layout)?, Some(term));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::add_into;

    fn ramp(dims: &[usize], step: f64) -> Tensor {
        let n: usize = dims.iter().product();
        Tensor::arange(0f32, n as f32, &Device::Cpu)
            .unwrap()
            .affine(step, 0.5)
            .unwrap()
            .reshape(dims)
            .unwrap()
    }

    #[test]
    fn matches_candle_for_linear_and_convolution_biases() {
        let cases: [(&[usize], &[usize]); 4] = [
            (&[2, 5, 6], &[6]),
            (&[2, 3, 4, 5], &[1, 3, 1, 1]),
            (&[70_000], &[70_000]),
            (&[3, 40_000], &[1, 40_000]),
        ];
        for (dims, bias_dims) in cases {
            let (term, bias) = (ramp(dims, 0.25), ramp(bias_dims, -1.5));
            for (with_term, with_bias) in [(true, true), (true, false), (false, true)] {
                let (term, bias) = (with_term.then_some(&term), with_bias.then_some(&bias));
                let fresh = ramp(dims, 1.0);
                let mut expected = fresh.copy().unwrap();
                if let Some(term) = term {
                    expected = (expected + term).unwrap();
                }
                if let Some(bias) = bias {
                    expected = expected.broadcast_add(bias).unwrap();
                }
                let got = add_into(fresh, term, bias).unwrap();
                let diff = (got - expected).unwrap().abs().unwrap().max_all().unwrap();
                assert_eq!(
                    diff.to_scalar::<f32>().unwrap(),
                    0.0,
                    "{dims:?} + {bias_dims:?}"
                );
            }
        }
    }
}
