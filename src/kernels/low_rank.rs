//! A frozen linear layer with an optional plain LoRA, `y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ` (`A` the `[rank, in]`
//! down and `B` the `[out, rank]` up projection), as the forward and backward products that ops built of
//! such layers share (a LoRA linear, a transformer block's feed-forward).
//!
//! With `g = dy` and `u = g·B`: `dx = g·W + s·u·A`, `dB = s·gᵀ·(x·Aᵀ)`, `dA = s·uᵀ·x`. The forward pass keeps
//! the small `x·Aᵀ` (`[rows, rank]`) for the backward pass. In bf16 products the low-rank terms `s·(x·Aᵀ)·Bᵀ`
//! and `s·u·A` are summed in the tiles of the frozen products they join ([`joined_matmul`]) instead of being
//! written out and added.

use candle_core::{D, Result, Tensor};

use super::amx::Orientation;
use super::frozen_weight::FrozenWeight;
use super::products::{Right, joined_matmul, matmul, right_matmul, rounded_matmul};
use super::tied::Ready;
use super::{add_bias_into, add_into, frozen_linear};

/// A plain LoRA's down and up matrices and its scale (`alpha / rank` times its multiplier).
#[derive(Clone, Copy)]
pub struct LowRank<'a> {
    pub down: &'a Tensor,
    pub up: &'a Tensor,
    pub scale: f64,
}

/// `x·Wᵀ + b` plus the adapter's term for a detached `x` (`[.., in]`): the result to tie, and `x·Aᵀ` when
/// there is an adapter.
pub(crate) fn adapted_affine(
    x: &Tensor,
    weight: &FrozenWeight,
    bias: Option<&Tensor>,
    adapter: Option<LowRank>,
) -> Result<(Ready, Option<Tensor>)> {
    let Some(LowRank { down, up, scale }) = adapter else {
        return Ok((super::frozen::affine_ready(x, weight, bias)?, None));
    };
    let (down, up) = (down.detach(), up.detach());
    // The scale goes on the narrow hidden values, and the low-rank product and the bias into the frozen
    // product's fresh output.
    let x_rows = x.reshape(((), down.dim(1)?))?;
    let hidden = matmul(&x_rows, &down.t()?)?;
    let scaled = (&hidden * scale)?;
    let weight_t = Right::of_weight(weight, Orientation::Transposed)?;
    let y = match joined_matmul(&x_rows, &weight_t, &scaled, &up.t()?)? {
        Some(sum) => {
            let (out_features, in_features) = weight.dims2()?;
            crate::flops::add_layer(x_rows.dim(0)? * in_features * out_features);
            let mut dims = x.dims().to_vec();
            let Some(width) = dims.last_mut() else {
                candle_core::bail!("lora linear: the input is a scalar");
            };
            *width = out_features;
            add_bias_into(sum.reshaped(&dims)?, bias)?
        }
        None => {
            let frozen = frozen_linear(x, weight)?;
            let low_rank = scaled.matmul(&up.t()?)?.reshape(frozen.shape())?;
            Ready::Tensor(add_into(frozen, Some(&low_rank), bias)?)
        }
    };
    Ok((y, Some(hidden)))
}

/// [`adapted_affine`] rounded to bf16 (`[.., out]` bf16, with `x·Aᵀ` as there) for a result that only feeds
/// bf16 products, written straight from the product's tiles: `None` outside bf16 products or where the
/// products do not run on AMX tiles.
pub(crate) fn rounded_adapted_affine(
    x: &Tensor,
    weight: &FrozenWeight,
    bias: Option<&Tensor>,
    adapter: Option<LowRank>,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    let (out_features, in_features) = weight.dims2()?;
    let x_rows = x.reshape(((), in_features))?;
    let weight_t = Right::of_weight(weight, Orientation::Transposed)?;
    let (rounded, hidden) = match adapter {
        Some(LowRank { down, up, scale }) => {
            let (down, up) = (down.detach(), up.detach());
            let hidden = matmul(&x_rows, &down.t()?)?;
            let scaled = (&hidden * scale)?;
            let rounded = rounded_matmul((&x_rows, &weight_t), Some((&scaled, &up.t()?)), bias)?;
            (rounded, Some(hidden))
        }
        None => (rounded_matmul((&x_rows, &weight_t), None, bias)?, None),
    };
    let Some(rounded) = rounded else {
        return Ok(None);
    };
    crate::flops::add_layer(x_rows.dim(0)? * in_features * out_features);
    let mut dims = x.dims().to_vec();
    if let Some(width) = dims.last_mut() {
        *width = out_features;
    }
    Ok(Some((rounded.reshape(dims)?, hidden)))
}

/// An adapter's part in [`adapted_affine_gradients`]: the adapter, the `x·Aᵀ` [`adapted_affine`] returned,
/// and the layer's input values `x`.
#[derive(Clone, Copy)]
pub(crate) struct AdapterState<'a> {
    pub adapter: LowRank<'a>,
    pub hidden: &'a Tensor,
    pub input: &'a Tensor,
}

/// The gradient of [`adapted_affine`]'s input (`[.., in]`) and, with an adapter, of its down and up
/// matrices, from the output gradient `grad`.
pub(crate) fn adapted_affine_gradients(
    grad: &Tensor,
    weight: &FrozenWeight,
    adapter: Option<AdapterState>,
) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let Some(AdapterState {
        adapter: LowRank { down, up, scale },
        hidden,
        input,
    }) = adapter
    else {
        let weight = Right::of_weight(weight, Orientation::Upright)?;
        return Ok((right_matmul(grad, &weight)?.into_tensor(), None));
    };
    let (down, up) = (down.detach(), up.detach());
    let grad_rows = grad.reshape(((), up.dim(0)?))?;
    let grad_hidden = (matmul(&grad_rows, &up)? * scale)?;
    let weight = Right::of_weight(weight, Orientation::Upright)?;
    let grad_x = match joined_matmul(&grad_rows, &weight, &grad_hidden, &down)? {
        Some(sum) => sum.into_tensor(),
        None => {
            let frozen_part = right_matmul(&grad_rows, &weight)?.into_tensor();
            add_into(frozen_part, Some(&grad_hidden.matmul(&down)?), None)?
        }
    }
    .reshape(input.shape())?;
    let adapter_grads = down_up_gradients((&grad_rows, &grad_hidden), (hidden, input), scale)?;
    Ok((grad_x, Some(adapter_grads)))
}

/// The gradients of an adapter's down and up matrices alone, from the output gradient `grad`: for a
/// layer whose input is not part of the graph (a frozen text encoder's context), whose gradient would be
/// computed for nothing.
pub(crate) fn adapter_gradients(grad: &Tensor, state: AdapterState) -> Result<(Tensor, Tensor)> {
    let AdapterState {
        adapter: LowRank { up, scale, .. },
        hidden,
        input,
    } = state;
    let up = up.detach();
    let grad_rows = grad.reshape(((), up.dim(0)?))?;
    let grad_hidden = (matmul(&grad_rows, &up)? * scale)?;
    down_up_gradients((&grad_rows, &grad_hidden), (hidden, input), scale)
}

/// `(down, up)` gradients from the output and hidden gradients (rows) and the hidden and input values.
fn down_up_gradients(
    (grad_rows, grad_hidden): (&Tensor, &Tensor),
    (hidden, input): (&Tensor, &Tensor),
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let x_rows = input.reshape(((), input.dim(D::Minus1)?))?;
    let grad_up = (matmul(&grad_rows.t()?, hidden)? * scale)?;
    let grad_down = matmul(&grad_hidden.t()?, &x_rows)?;
    Ok((grad_down, grad_up))
}
