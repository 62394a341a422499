//! One low-rank adapter: `delta(x) = multiplier · (alpha / rank) · up(down(x))`, the kohya LoRA rule.
//!
//! The adapter owns its `down`/`up` tensors (plain tensors for a loaded file, `Var`s while training) and a
//! strength multiplier that can change between forward passes without touching the tensors, so a preview
//! slider costs nothing but a re-render. It knows nothing about files or models.

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{Result, Tensor};

use super::layer::LayerShape;

/// A LoRA (or LoCon, for 3x3 convolutions) adapter beside one frozen layer.
#[derive(Debug)]
pub struct LoraAdapter {
    /// `[rank, in]` for a linear layer, `[rank, in, kh, kw]` for a convolution.
    down: Tensor,
    /// `[out, rank]` for a linear layer, `[out, rank, 1, 1]` for a convolution.
    up: Tensor,
    alpha: f64,
    multiplier_bits: AtomicU64,
}

impl LoraAdapter {
    /// Builds an adapter for a layer of the given shape. `down`/`up` may come in either the linear (2-D) or
    /// the 1x1-convolution (4-D) form, as A1111 and ComfyUI accept both; they are brought to the layer's own
    /// form here. `alpha: None` means alpha = rank (scale 1), kohya's rule for files without alpha.
    pub fn new(
        down: Tensor,
        up: Tensor,
        alpha: Option<f64>,
        layer: &LayerShape,
    ) -> std::result::Result<Self, String> {
        let rank = down.dims().first().copied().unwrap_or(0);
        if rank == 0 {
            return Err(format!(
                "lora_down has shape {:?}; expected a non-empty rank dimension",
                down.dims()
            ));
        }
        let (down, up) = match *layer {
            LayerShape::Linear {
                in_features,
                out_features,
            } => {
                let down = reshape_if(&down, &[rank, in_features], "lora_down")?;
                let up = reshape_if(&up, &[out_features, rank], "lora_up")?;
                (down, up)
            }
            LayerShape::Conv2d {
                in_channels,
                out_channels,
                kernel,
                ..
            } => {
                let down =
                    reshape_if(&down, &[rank, in_channels, kernel.0, kernel.1], "lora_down")?;
                let up = reshape_if(&up, &[out_channels, rank, 1, 1], "lora_up")?;
                (down, up)
            }
        };
        let alpha = match alpha {
            Some(a) if a != 0.0 && a.is_finite() => a,
            _ => rank as f64,
        };
        Ok(Self {
            down,
            up,
            alpha,
            multiplier_bits: AtomicU64::new(1.0f64.to_bits()),
        })
    }

    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }

    pub fn down(&self) -> &Tensor {
        &self.down
    }

    pub fn up(&self) -> &Tensor {
        &self.up
    }

    /// The strength the adapter is applied at (the `0.8` of `<lora:NAME:0.8>`).
    pub fn multiplier(&self) -> f64 {
        f64::from_bits(self.multiplier_bits.load(Ordering::Relaxed))
    }

    pub fn set_multiplier(&self, multiplier: f64) {
        self.multiplier_bits
            .store(multiplier.to_bits(), Ordering::Relaxed);
    }

    /// The adapter's contribution to the layer output for input `x`.
    pub fn forward(&self, x: &Tensor, layer: &LayerShape) -> Result<Tensor> {
        let factor = self.multiplier() * self.scale();
        let low_rank = match *layer {
            LayerShape::Linear { .. } => x
                .broadcast_matmul(&self.down.to_dtype(x.dtype())?.t()?)?
                .broadcast_matmul(&self.up.to_dtype(x.dtype())?.t()?)?,
            LayerShape::Conv2d {
                stride, padding, ..
            } => x
                .conv2d(&self.down.to_dtype(x.dtype())?, padding, stride, 1, 1)?
                .conv2d(&self.up.to_dtype(x.dtype())?, 0, 1, 1, 1)?,
        };
        low_rank.affine(factor, 0.0)
    }

    /// The change this adapter makes to the layer's weight, `multiplier · scale · up·down`, in the weight's
    /// own shape (`[out, in]` or `[out, in, kh, kw]`).
    pub fn weight_delta(&self, layer: &LayerShape) -> Result<Tensor> {
        let factor = self.multiplier() * self.scale();
        let rank = self.rank();
        let delta = match *layer {
            LayerShape::Linear { .. } => self.up.matmul(&self.down)?,
            LayerShape::Conv2d {
                in_channels,
                out_channels,
                kernel,
                ..
            } => {
                let up = self.up.reshape((out_channels, rank))?;
                let down = self
                    .down
                    .reshape((rank, in_channels * kernel.0 * kernel.1))?;
                up.matmul(&down)?
                    .reshape((out_channels, in_channels, kernel.0, kernel.1))?
            }
        };
        delta.affine(factor, 0.0)
    }
}

/// Reshapes `t` to `dims` when the element counts agree (2-D <-> 1x1 4-D); otherwise explains the mismatch.
fn reshape_if(t: &Tensor, dims: &[usize], what: &str) -> std::result::Result<Tensor, String> {
    if t.dims() == dims {
        return Ok(t.clone());
    }
    let same_count = t.elem_count() == dims.iter().product::<usize>();
    let only_unit_dims_differ = same_count
        && t.dims()
            .iter()
            .filter(|&&d| d != 1)
            .eq(dims.iter().filter(|&&d| d != 1));
    if only_unit_dims_differ {
        t.reshape(dims).map_err(|e| e.to_string())
    } else {
        Err(format!(
            "{what} has shape {:?}; the layer needs {:?}",
            t.dims(),
            dims
        ))
    }
}
