//! A transformer block's feed-forward step, `x + geglu(norm(x)·W₁ᵀ + b₁)·W₂ᵀ + b₂` with frozen weights and an
//! optional plain LoRA on each layer, as one op on the CPU.
//!
//! Composed (layer norm, projection, GEGLU, output layer, residual sum), the graph keeps the normalised
//! input (the projection's operand), the projection (eight times the model width), the GEGLU output (four
//! times; the output layer's operand) and the step's output (the residual sum's operand) until the
//! backward pass. The op keeps only the projection, and inside a [`super::Bf16Products`] scope keeps it in
//! bf16, as PyTorch's autocast keeps a linear layer's output: there the projection, its bias added, leaves
//! the product's tiles already rounded ([`super::low_rank::rounded_adapted_affine`]), so it never exists in
//! f32, and GEGLU reads the rounded values as everything after it does. The backward pass recomputes what the
//! adapters' gradients read: the normalised input from `x` and the row statistics, the GEGLU output from
//! the projection. `dx = g + norm'(x)·(proj'(geglu'(z, out'(g))))`, with `g` the output gradient and `z`
//! the projection.

use candle_core::{CpuStorage, DType, Result, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::frozen_weight::FrozenWeight;
use super::fused_norm::{NormPath, NormalizedInput, with_values};
use super::low_rank::{
    AdapterState, LowRank, adapted_affine, adapted_affine_gradients, rounded_adapted_affine,
};
use super::tied::{Ready, TiedBackward, tie};

/// One linear layer of the feed-forward: its frozen weight and bias, and its adapter if it has one.
#[derive(Clone, Copy)]
pub struct AffineLayer<'a> {
    pub weight: &'a FrozenWeight,
    pub bias: &'a Tensor,
    pub adapter: Option<LowRank<'a>>,
}

/// The layers of one feed-forward step: the layer norm before it, the projection to the GEGLU's value and
/// gate, and the output layer.
pub struct FusedFeedForward<'a> {
    /// The layer norm's scale, shift and epsilon.
    pub norm: (&'a Tensor, &'a Tensor, f64),
    /// The projection: weight `[2·inner, width]`.
    pub proj: AffineLayer<'a>,
    /// The output layer: weight `[width, inner]`.
    pub out: AffineLayer<'a>,
}

impl FusedFeedForward<'_> {
    /// `x` plus the feed-forward of its layer norm, differentiable in `x` (`[.., width]`) and the adapters,
    /// when the CPU kernels apply (f32 on the CPU, f32 adapters); `None` otherwise, for the caller to
    /// compose the layers.
    pub fn residual(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let adapters = [self.proj.adapter, self.out.adapter];
        let f32_adapters = adapters
            .iter()
            .flatten()
            .all(|a| a.down.dtype() == DType::F32 && a.up.dtype() == DType::F32);
        if !f32_adapters {
            return Ok(None);
        }
        let (normalized, norm) = match NormalizedInput::new(x, self.norm)? {
            Some(input) => (input.values().clone(), input.path().clone()),
            None => return Ok(None),
        };
        let proj = (self.proj.weight, Some(self.proj.bias), self.proj.adapter);
        let (kept, proj_hidden, activated) =
            match rounded_adapted_affine(&normalized, proj.0, proj.1, proj.2)? {
                // In bf16 products the projection comes out of the product's tiles in bf16.
                Some((kept, hidden)) => {
                    drop(normalized);
                    let activated = super::activations::geglu_of_kept(&kept)?;
                    (kept, hidden, activated)
                }
                None => {
                    let (projected, hidden) = adapted_affine(&normalized, proj.0, proj.1, proj.2)?;
                    drop(normalized);
                    let projected = projected.into_tensor();
                    let activated = super::geglu(&projected)?;
                    let kept = if super::bf16_products() {
                        rounded_to_bf16(&projected)?
                    } else {
                        projected
                    };
                    (kept, hidden, activated)
                }
            };
        let (output, out_hidden) = adapted_affine(
            &activated,
            self.out.weight,
            Some(self.out.bias),
            self.out.adapter,
        )?;
        drop(activated);
        let output = super::add_term_into(output, &x.detach())?;
        let mut inputs = vec![x];
        for adapter in adapters.iter().flatten() {
            inputs.extend([adapter.down, adapter.up]);
        }
        let backward = FeedForwardBackward {
            norm,
            projected: kept,
            proj: LayerBackward::of(&self.proj, proj_hidden),
            out: LayerBackward::of(&self.out, out_hidden),
        };
        tie(output, &inputs, backward).map(Some)
    }
}

/// `values` (f32 on the CPU) rounded to bf16, in parallel.
fn rounded_to_bf16(values: &Tensor) -> Result<Tensor> {
    let rounded: Vec<bf16> = with_values(values, |values| {
        values.par_iter().map(|&v| bf16::from_f32(v)).collect()
    })?;
    let storage = CpuStorage::BF16(rounded);
    Ok(Ready::Cpu(storage, values.shape().clone()).into_tensor())
}

/// What the backward pass needs of one layer: its weight and, with an adapter, the adapter's scale and the
/// `x·Aᵀ` of the forward pass.
struct LayerBackward {
    weight: FrozenWeight,
    adapter: Option<(f64, Tensor)>,
}

impl LayerBackward {
    fn of(layer: &AffineLayer, hidden: Option<Tensor>) -> Self {
        Self {
            weight: layer.weight.clone(),
            adapter: layer.adapter.map(|a| a.scale).zip(hidden),
        }
    }

    /// The gradient of the layer's input, and its adapter's (down, up) gradients, from the output gradient;
    /// `adapter` holds the adapter's matrices (the op's inputs) and `input` gives the layer's input values
    /// when the adapter's gradients need them.
    fn gradients(
        &self,
        grad: &Tensor,
        adapter: Option<(&Tensor, &Tensor)>,
        input: impl FnOnce() -> Result<Tensor>,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let (Some((scale, hidden)), Some((down, up))) = (&self.adapter, adapter) else {
            return adapted_affine_gradients(grad, &self.weight, None);
        };
        let input = input()?;
        let state = AdapterState {
            adapter: LowRank {
                down,
                up,
                scale: *scale,
            },
            hidden,
            input: &input,
        };
        adapted_affine_gradients(grad, &self.weight, Some(state))
    }
}

/// Routes the output gradient of [`FusedFeedForward::residual`] to its input and the adapters.
struct FeedForwardBackward {
    norm: NormPath,
    /// The projection `z`, f32 or (in bf16 products) bf16.
    projected: Tensor,
    proj: LayerBackward,
    out: LayerBackward,
}

impl TiedBackward for FeedForwardBackward {
    fn name(&self) -> &'static str {
        "fused-feed-forward"
    }

    fn bwd(&self, inputs: &[&Tensor], _: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let x = inputs[0];
        let mut adapters = inputs[1..].chunks_exact(2).map(|pair| (pair[0], pair[1]));
        let proj_adapter = self.proj.adapter.as_ref().and_then(|_| adapters.next());
        let out_adapter = self.out.adapter.as_ref().and_then(|_| adapters.next());
        let grad = grad.contiguous()?;
        let (grad_activated, out_grads) = self.out.gradients(&grad, out_adapter, || {
            super::activations::geglu_of_kept(&self.projected)
        })?;
        let grad_projected = super::activations::geglu_gradient(&self.projected, &grad_activated)?;
        drop(grad_activated);
        let (grad_normalized, proj_grads) =
            self.proj
                .gradients(&grad_projected, proj_adapter, || self.norm.normalized(x))?;
        drop(grad_projected);
        let grad_x = self.norm.input_grad(x, &grad_normalized)?;
        let mut grads = vec![Some(super::add_into(grad_x, Some(&grad), None)?)];
        for (down, up) in [proj_grads, out_grads].into_iter().flatten() {
            grads.extend([Some(down), Some(up)]);
        }
        Ok(grads)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Tensor, Var};

    use super::{AffineLayer, FusedFeedForward, LowRank};
    use crate::kernels::{Bf16Products, frozen_affine, geglu, normalize_affine};
    use crate::test_support::{probed_gradients, pseudo_random, relative_difference};

    /// `x·Wᵀ + b`, plus `0.5·(x·Aᵀ)·Bᵀ` with an adapter, from candle's ops.
    fn layer(
        x: &Tensor,
        (weight, bias): (&Tensor, &Tensor),
        adapter: Option<(&Var, &Var)>,
    ) -> Tensor {
        let frozen = frozen_affine(x, weight, bias).unwrap();
        let Some((down, up)) = adapter else {
            return frozen;
        };
        let hidden = x.broadcast_matmul(&down.as_tensor().t().unwrap()).unwrap();
        let low_rank = hidden
            .broadcast_matmul(&up.as_tensor().t().unwrap())
            .unwrap();
        (frozen + (low_rank * 0.5).unwrap()).unwrap()
    }

    /// The op's and the composed layers' output and gradients (of `x`, then of each adapter's down and up),
    /// for `x` of `[2, 5, 24]` and adapters on the layers `adapted` says (projection, output layer).
    fn fused_and_composed(adapted: [bool; 2]) -> [Vec<Tensor>; 2] {
        let (width, inner, rank) = (24, 16, 4);
        let norm_weight = (pseudo_random(&[width], 1.0) + 1.0).unwrap();
        let norm_bias = pseudo_random(&[width], 2.0);
        let proj = (
            pseudo_random(&[2 * inner, width], 3.0),
            pseudo_random(&[2 * inner], 4.0),
        );
        let out = (
            pseudo_random(&[width, inner], 5.0),
            pseudo_random(&[width], 6.0),
        );
        let var = |dims: &[usize], seed: f64| Var::from_tensor(&pseudo_random(dims, seed)).unwrap();
        let adapters = [
            adapted[0].then(|| (var(&[rank, width], 9.0), var(&[2 * inner, rank], 10.0))),
            adapted[1].then(|| (var(&[rank, inner], 11.0), var(&[width, rank], 12.0))),
        ];
        let x = var(&[2, 5, width], 7.0);
        let probe = pseudo_random(x.dims(), 8.0);
        let run = |y: Tensor| {
            let grads = probed_gradients(&y, &probe);
            let mut results = vec![y, grads.get(&x).unwrap().clone()];
            for (down, up) in adapters.iter().flatten() {
                results.extend([down, up].map(|v| grads.get(v).unwrap().clone()));
            }
            results
        };
        fn low_rank(adapter: &Option<(Var, Var)>) -> Option<LowRank<'_>> {
            adapter.as_ref().map(|(down, up)| LowRank {
                down: down.as_tensor(),
                up: up.as_tensor(),
                scale: 0.5,
            })
        }
        let (proj_weight, out_weight) = (proj.0.clone().into(), out.0.clone().into());
        let layers = FusedFeedForward {
            norm: (&norm_weight, &norm_bias, 1e-5),
            proj: AffineLayer {
                weight: &proj_weight,
                bias: &proj.1,
                adapter: low_rank(&adapters[0]),
            },
            out: AffineLayer {
                weight: &out_weight,
                bias: &out.1,
                adapter: low_rank(&adapters[1]),
            },
        };
        let fused = layers.residual(x.as_tensor()).unwrap().unwrap();
        let normalized =
            normalize_affine(x.as_tensor(), 10, 1e-5, &norm_weight, &norm_bias).unwrap();
        fn pair(adapter: &Option<(Var, Var)>) -> Option<(&Var, &Var)> {
            adapter.as_ref().map(|(down, up)| (down, up))
        }
        let projected = layer(&normalized, (&proj.0, &proj.1), pair(&adapters[0]));
        let activated = geglu(&projected).unwrap();
        let composed = layer(&activated, (&out.0, &out.1), pair(&adapters[1]));
        [run(fused), run((composed + x.as_tensor()).unwrap())]
    }

    const ADAPTED: [[bool; 2]; 4] = [[false, false], [true, false], [false, true], [true, true]];

    #[test]
    fn the_op_is_the_composed_layers_and_their_gradients() {
        for adapted in ADAPTED {
            let [ours, theirs] = fused_and_composed(adapted);
            assert_eq!(ours.len(), 2 + 2 * adapted.iter().filter(|&&a| a).count());
            for (index, (ours, theirs)) in ours.iter().zip(&theirs).enumerate() {
                let difference = relative_difference(ours, theirs);
                assert!(
                    difference < 1e-5,
                    "{adapted:?} result {index}: {difference}"
                );
            }
        }
    }

    #[test]
    fn in_bf16_products_the_projection_is_rounded_to_bf16() {
        let Some(_scope) = Bf16Products::enter() else {
            return;
        };
        for adapted in ADAPTED {
            let [ours, theirs] = fused_and_composed(adapted);
            // The projection leaves the product's tiles rounded to bf16 (8 significant bits), as autocast
            // rounds a linear layer's output; GEGLU and the gradients read the rounded values.
            for (index, (ours, theirs)) in ours.iter().zip(&theirs).enumerate() {
                let difference = relative_difference(ours, theirs);
                assert!(
                    difference < 1e-2,
                    "{adapted:?} result {index}: {difference}"
                );
            }
            let output_difference = relative_difference(&ours[0], &theirs[0]);
            assert!(output_difference > 0.0, "{adapted:?}: nothing was rounded");
        }
    }

    #[test]
    fn other_dtypes_are_left_to_the_caller() {
        let x = pseudo_random(&[3, 4], 1.0).to_dtype(DType::F64).unwrap();
        let (weight, bias) = (
            x.narrow(0, 0, 1).unwrap().squeeze(0).unwrap(),
            x.get(1).unwrap(),
        );
        let frozen_weight = weight.clone().into();
        let frozen = AffineLayer {
            weight: &frozen_weight,
            bias: &bias,
            adapter: None,
        };
        let layers = FusedFeedForward {
            norm: (&weight, &bias, 1e-5),
            proj: frozen,
            out: frozen,
        };
        assert!(layers.residual(&x).unwrap().is_none());
    }
}
