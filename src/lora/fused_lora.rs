//! A linear layer with one plain LoRA adapter as a single autograd node:
//! `y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ` with `A` the `[rank, in]` down and `B` the `[out, rank]` up projection.
//!
//! Composed from candle ops, the frozen product, the low-rank product, its scaling, their sum and the bias
//! sum each keep an output as large as the layer's alive until the backward pass ends (candle retains
//! every intermediate of the graph); here only `y` is kept, with the small `x·Aᵀ` (`[rows, rank]`) for the
//! backward pass: with `g = dy` and `u = g·B`, `dx = g·W + s·u·A`, `dB = s·gᵀ·(x·Aᵀ)`, `dA = s·uᵀ·x`.
//!
//! In bf16 products (a CPU run with `mixed_precision = "bf16"`) the adapter's products take bf16 operands
//! as the frozen one does, and the low-rank terms `s·(x·Aᵀ)·Bᵀ` and `s·u·A` are summed in the tiles of
//! the frozen products they join ([`joined_matmul`]) instead of being written out and added.

use candle_core::{Result, Tensor};

use crate::kernels::{
    AdapterState, FrozenWeight, LowRank, NormPath, NormalizedInput, TiedBackward, adapted_affine,
    adapted_affine_gradients, adapter_gradients, add_term_into, tie,
};

/// What a LoRA linear reads: a tensor, or a layer norm's output that the layer takes from the norm's input
/// and recomputes in its backward pass instead of keeping.
#[derive(Clone, Copy)]
pub enum LinearInput<'a> {
    Tensor(&'a Tensor),
    Normalized(&'a NormalizedInput),
}

impl LinearInput<'_> {
    /// The tensor the layer's output is tied to, the values it reads, and the norm between them.
    fn parts(self) -> (Tensor, Tensor, Option<NormPath>) {
        match self {
            LinearInput::Tensor(x) => (x.clone(), x.detach(), None),
            LinearInput::Normalized(input) => (
                input.input().clone(),
                input.values().clone(),
                Some(input.path().clone()),
            ),
        }
    }
}

/// `x·Wᵀ + b + scale·(x·downᵀ)·upᵀ`, plus `residual` (of the output's shape) when given, differentiable in
/// the input, `down`, `up` and `residual` (`W` and `b` frozen). Summed here, the residual does not make the
/// layer's output an operand that the graph keeps until the backward pass.
pub fn lora_linear(
    input: LinearInput,
    weight: impl Into<FrozenWeight>,
    bias: Option<&Tensor>,
    (down, up): (&Tensor, &Tensor),
    scale: f64,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let (tracked, x_value, norm) = input.parts();
    let (down, up) = (
        down.to_dtype(x_value.dtype())?,
        up.to_dtype(x_value.dtype())?,
    );
    let adapter = LowRank {
        down: &down,
        up: &up,
        scale,
    };
    let weight = weight.into();
    let (y, hidden) = adapted_affine(&x_value, &weight, bias, Some(adapter))?;
    drop(x_value);
    let backward = LoraLinearBackward {
        input_tracked: tracked.track_op(),
        weight,
        hidden: hidden
            .ok_or_else(|| candle_core::Error::Msg("lora linear: no hidden values".into()))?,
        scale,
        norm,
    };
    match residual {
        Some(residual) => {
            let y = add_term_into(y, &residual.detach())?;
            tie(y, &[&tracked, &down, &up, residual], backward)
        }
        None => tie(y, &[&tracked, &down, &up], backward),
    }
}

/// Ties the precomputed result to the input and the adapter's down and up matrices.
struct LoraLinearBackward {
    /// Whether the input is part of the graph (a frozen text encoder's context is not): its gradient is
    /// computed only then.
    input_tracked: bool,
    weight: FrozenWeight,
    /// `x·Aᵀ` from the forward pass, `[rows, rank]`: small, so kept rather than computed again.
    hidden: Tensor,
    scale: f64,
    /// The norm between the tied input and the values the layer read, if any.
    norm: Option<NormPath>,
}

impl TiedBackward for LoraLinearBackward {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn bwd(&self, inputs: &[&Tensor], _: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (input, down, up) = (inputs[0], inputs[1], inputs[2]);
        let x = match &self.norm {
            Some(norm) => norm.normalized(input)?,
            None => input.detach(),
        };
        let state = AdapterState {
            adapter: LowRank {
                down,
                up,
                scale: self.scale,
            },
            hidden: &self.hidden,
            input: &x,
        };
        let (grad_input, (grad_down, grad_up)) = if self.input_tracked {
            let (grad_x, adapter_grads) =
                adapted_affine_gradients(grad, &self.weight, Some(state))?;
            let Some(adapter_grads) = adapter_grads else {
                candle_core::bail!("lora linear: no adapter gradients");
            };
            let grad_input = match &self.norm {
                Some(norm) => norm.input_grad(input, &grad_x)?,
                None => grad_x,
            };
            (Some(grad_input), adapter_grads)
        } else {
            (None, adapter_gradients(grad, state)?)
        };
        let mut grads = vec![grad_input, Some(grad_down), Some(grad_up)];
        if inputs.len() == 4 {
            // The residual's gradient is the output's.
            grads.push(Some(grad.clone()));
        }
        Ok(grads)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::{LinearInput, lora_linear};
    use crate::kernels::{Bf16Products, NormalizedInput, normalize_affine};
    use crate::test_support::{max_abs_diff, probed_gradients, pseudo_random, relative_difference};

    fn var(dims: &[usize], seed: f64) -> Var {
        let n: usize = dims.iter().product();
        let t = Tensor::arange(0f64, n as f64, &Device::Cpu)
            .unwrap()
            .affine(0.61, seed)
            .unwrap()
            .sin()
            .unwrap()
            .reshape(dims)
            .unwrap();
        Var::from_tensor(&t).unwrap()
    }

    #[test]
    fn matches_the_composed_layer_and_its_gradients() {
        let x = var(&[2, 5, 7], 0.2);
        let weight = var(&[6, 7], 0.9).as_tensor().detach();
        let bias = var(&[6], 1.4).as_tensor().detach();
        let (down, up) = (var(&[3, 7], 2.3), var(&[6, 3], 3.1));
        let scale = 0.75;
        let ours = lora_linear(
            LinearInput::Tensor(x.as_tensor()),
            &weight,
            Some(&bias),
            (down.as_tensor(), up.as_tensor()),
            scale,
            None,
        )
        .unwrap();
        let composed = (x
            .as_tensor()
            .broadcast_matmul(&weight.t().unwrap())
            .unwrap()
            + (x.as_tensor()
                .broadcast_matmul(&down.as_tensor().t().unwrap())
                .unwrap()
                .broadcast_matmul(&up.as_tensor().t().unwrap())
                .unwrap()
                * scale)
                .unwrap())
        .unwrap()
        .broadcast_add(&bias)
        .unwrap();
        assert!(max_abs_diff(&ours, &composed) < 1e-12);
        let weights = var(&[2, 5, 6], 4.7);
        let loss = |y: &Tensor| (y * weights.as_tensor()).unwrap().sum_all().unwrap();
        let ours_grads = loss(&ours).backward().unwrap();
        let composed_grads = loss(&composed).backward().unwrap();
        for (name, v) in [("x", &x), ("down", &down), ("up", &up)] {
            let diff = max_abs_diff(ours_grads.get(v).unwrap(), composed_grads.get(v).unwrap());
            assert!(diff < 1e-11, "d{name} differs by {diff}");
        }
    }

    #[test]
    fn a_residual_is_summed_and_gets_the_output_gradient() {
        let x = var(&[2, 5, 7], 0.2);
        let weight = var(&[6, 7], 0.9).as_tensor().detach();
        let (down, up) = (var(&[3, 7], 2.3), var(&[6, 3], 3.1));
        let residual = var(&[2, 5, 6], 1.7);
        let layer = |residual: Option<&Tensor>| {
            let adapter = (down.as_tensor(), up.as_tensor());
            let input = LinearInput::Tensor(x.as_tensor());
            lora_linear(input, &weight, None, adapter, 0.5, residual).unwrap()
        };
        let ours = layer(Some(residual.as_tensor()));
        let composed = (layer(None) + residual.as_tensor()).unwrap();
        assert!(max_abs_diff(&ours, &composed) < 1e-12);
        let weights = var(&[2, 5, 6], 4.7);
        let loss = |y: &Tensor| (y * weights.as_tensor()).unwrap().sum_all().unwrap();
        let ours_grads = loss(&ours).backward().unwrap();
        let composed_grads = loss(&composed).backward().unwrap();
        for (name, v) in [
            ("x", &x),
            ("down", &down),
            ("up", &up),
            ("residual", &residual),
        ] {
            let diff = max_abs_diff(ours_grads.get(v).unwrap(), composed_grads.get(v).unwrap());
            assert!(diff < 1e-11, "d{name} differs by {diff}");
        }
    }

    #[test]
    fn an_input_outside_the_graph_gets_no_gradient_and_the_adapter_the_same_ones() {
        let x = var(&[2, 5, 7], 0.2);
        let weight = var(&[6, 7], 0.9).as_tensor().detach();
        let (down, up) = (var(&[3, 7], 2.3), var(&[6, 3], 3.1));
        let residual = var(&[2, 5, 6], 1.7);
        let weights = var(&[2, 5, 6], 4.7);
        let gradients = |input: &Tensor| {
            let adapter = (down.as_tensor(), up.as_tensor());
            let residual = Some(residual.as_tensor());
            let y = lora_linear(
                LinearInput::Tensor(input),
                &weight,
                None,
                adapter,
                0.5,
                residual,
            )
            .unwrap();
            (y * weights.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (tracked, untracked) = (gradients(x.as_tensor()), gradients(&x.as_tensor().detach()));
        assert!(untracked.get(&x).is_none());
        for (name, v) in [("down", &down), ("up", &up), ("residual", &residual)] {
            let diff = max_abs_diff(tracked.get(v).unwrap(), untracked.get(v).unwrap());
            assert!(diff < 1e-12, "d{name} differs by {diff}");
        }
    }

    #[test]
    fn a_normalized_input_gives_the_layer_on_the_norm_and_its_gradients() {
        let x = Var::from_tensor(&pseudo_random(&[2, 5, 40], 0.1)).unwrap();
        let (norm_weight, norm_bias) = (pseudo_random(&[40], 0.2), pseudo_random(&[40], 0.3));
        let weight = pseudo_random(&[24, 40], 0.4);
        let (down, up) = (
            Var::from_tensor(&pseudo_random(&[4, 40], 0.5)).unwrap(),
            Var::from_tensor(&pseudo_random(&[24, 4], 0.6)).unwrap(),
        );
        let probe = pseudo_random(&[2, 5, 24], 0.7);
        let adapter = (down.as_tensor(), up.as_tensor());
        let norm = (&norm_weight, &norm_bias, 1e-5);
        let normalized = NormalizedInput::new(x.as_tensor(), norm).unwrap().unwrap();
        let tracked = normalize_affine(x.as_tensor(), 10, 1e-5, &norm_weight, &norm_bias).unwrap();
        let outputs = [
            LinearInput::Normalized(&normalized),
            LinearInput::Tensor(&tracked),
            // What a layer without one plain LoRA reads.
            LinearInput::Tensor(&normalized.tracked().unwrap()),
        ]
        .map(|input| lora_linear(input, &weight, None, adapter, 0.5, None).unwrap());
        let results = outputs.map(|y| {
            let grads = probed_gradients(&y, &probe);
            let [dx, ddown, dup] = [&x, &down, &up].map(|v| grads.get(v).unwrap().clone());
            [y, dx, ddown, dup]
        });
        for other in &results[1..] {
            for (name, (ours, theirs)) in ["y", "dx", "ddown", "dup"]
                .iter()
                .zip(results[0].iter().zip(other))
            {
                let difference = relative_difference(ours, theirs);
                assert!(difference < 1e-6, "{name}: {difference}");
            }
        }
    }

    #[test]
    fn in_bf16_products_stays_within_bf16_rounding_of_the_f32_layer() {
        let inputs = [
            pseudo_random(&[2, 40, 64], 0.1),
            pseudo_random(&[16, 64], 0.2),
            pseudo_random(&[48, 16], 0.3),
        ];
        let (weight, bias) = (pseudo_random(&[48, 64], 0.4), pseudo_random(&[48], 0.5));
        let output_weights = pseudo_random(&[2, 40, 48], 0.6);
        let scale = 0.75;
        // The layer's output and the gradients of its input, down and up matrices.
        let run = |weight: &Tensor| {
            let vars = inputs.clone().map(|t| Var::from_tensor(&t).unwrap());
            let [x, down, up] = vars.each_ref().map(|v| v.as_tensor());
            let input = LinearInput::Tensor(x);
            let y = lora_linear(input, weight, Some(&bias), (down, up), scale, None).unwrap();
            let grads = (&y * &output_weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let mut results = vec![y.detach()];
            results.extend(vars.iter().map(|v| grads.get(v).unwrap().clone()));
            results
        };
        let exact = run(&weight);
        let Some(scope) = Bf16Products::enter() else {
            // Without AMX or AVX-512 BF16 there are no bf16 products: the layer stays f32.
            return;
        };
        // A bf16 run stores the frozen weight in bf16.
        let rounded = run(&weight.to_dtype(DType::BF16).unwrap());
        drop(scope);
        for (name, (ours, exact)) in ["y", "dx", "ddown", "dup"]
            .iter()
            .zip(rounded.iter().zip(&exact))
        {
            let error = relative_difference(ours, exact);
            assert!(
                error > 1e-5 && error < 1e-2,
                "{name}: relative difference {error} is not bf16 rounding"
            );
        }
        // The low-rank term matters here: leaving it out moves the output far beyond rounding.
        let frozen_only = (inputs[0].broadcast_matmul(&weight.t().unwrap()).unwrap())
            .broadcast_add(&bias)
            .unwrap();
        assert!(relative_difference(&frozen_only, &exact[0]) > 0.1);
    }
}
