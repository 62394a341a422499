//! One low-rank adapter beside a frozen layer with weight `W`.
//!
//! * LoRA (kohya): `Δy = m · s · up(down(x))`, with `s = alpha / rank` and `m` the strength multiplier.
//! * PiSSA: initialised on the principal singular vectors of `W`; the frozen initial copy `up₀·down₀` is
//!   subtracted, `Δy = m · s · (up·down − up₀·down₀) x`, so training starts from the base model exactly.
//! * DoRA: the adapted weight `W + s·up·down` is renormalised per output channel to a trained magnitude,
//!   `W' = mag / ‖W + s·up·down‖ · (W + s·up·down)` (norm detached, as in the paper); `m` interpolates
//!   between `W` and `W'`.
//!
//! While training, an adapter may drop out elements of its input (`lora_dropout`, as peft does: the low-rank
//! update sees `dropout(x)`, the frozen layer `x`); the mask comes from a seed set before each step, so a
//! recomputed forward pass and a resumed run draw the same masks.
//!
//! The tensors are plain tensors for a loaded file and `Var`s while training; the multiplier can change
//! between forward passes without touching them. A forward pass through `Var`s records the graph for
//! the backward pass and keeps every intermediate alive until its output is dropped; renders that use
//! trained adapters (previews, samples) turn gradients off so they cost what inference costs. This type
//! knows nothing about files or models.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use candle_core::{D, DType, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::layer::LayerShape;

/// What kind of adapter this is.
#[derive(Debug, Clone)]
pub enum AdapterKind {
    Lora,
    /// The frozen initial `(down₀, up₀)`.
    Pissa {
        down0: Tensor,
        up0: Tensor,
    },
    /// The trained per-output-channel magnitude, `[out]`.
    Dora {
        magnitude: Tensor,
    },
}

/// A LoRA-family adapter beside one frozen layer.
#[derive(Debug)]
pub struct LoraAdapter {
    /// `[rank, in]` for a linear layer, `[rank, in, kh, kw]` for a convolution.
    down: Tensor,
    /// `[out, rank]` for a linear layer, `[out, rank, 1, 1]` for a convolution.
    up: Tensor,
    alpha: f64,
    kind: AdapterKind,
    multiplier_bits: AtomicU64,
    /// Whether forward passes record the graph through the trained tensors.
    gradients: AtomicBool,
    /// The probability (f64 bits) that an input element is dropped from the update while training.
    dropout_bits: AtomicU64,
    /// The seed of the dropout masks of the current step.
    dropout_seed: AtomicU64,
}

impl LoraAdapter {
    /// Builds a plain LoRA adapter for a layer of the given shape. `down`/`up` may come in either the linear
    /// (2-D) or the 1x1-convolution (4-D) form, as A1111 and ComfyUI accept both; they are brought to the
    /// layer's own form here. `alpha: None` means alpha = rank (scale 1), kohya's rule for files without alpha.
    pub fn new(
        down: Tensor,
        up: Tensor,
        alpha: Option<f64>,
        layer: &LayerShape,
    ) -> std::result::Result<Self, String> {
        Self::with_kind(down, up, alpha, AdapterKind::Lora, layer)
    }

    /// Builds an adapter of any kind (see the module docs).
    pub fn with_kind(
        down: Tensor,
        up: Tensor,
        alpha: Option<f64>,
        kind: AdapterKind,
        layer: &LayerShape,
    ) -> std::result::Result<Self, String> {
        let rank = down.dims().first().copied().unwrap_or(0);
        if rank == 0 {
            return Err(format!(
                "lora_down has shape {:?}; expected a non-empty rank dimension",
                down.dims()
            ));
        }
        let (down_dims, up_dims) = adapter_dims(layer, rank);
        let down = reshape_if(&down, &down_dims, "lora_down")?;
        let up = reshape_if(&up, &up_dims, "lora_up")?;
        let kind = match kind {
            AdapterKind::Pissa { down0, up0 } => AdapterKind::Pissa {
                down0: reshape_if(&down0, &down_dims, "the initial lora_down")?,
                up0: reshape_if(&up0, &up_dims, "the initial lora_up")?,
            },
            AdapterKind::Dora { magnitude } => {
                let out = up_dims[0];
                AdapterKind::Dora {
                    magnitude: reshape_if(&magnitude, &[out], "the DoRA magnitude")?,
                }
            }
            AdapterKind::Lora => AdapterKind::Lora,
        };
        let alpha = match alpha {
            Some(a) if a != 0.0 && a.is_finite() => a,
            _ => rank as f64,
        };
        Ok(Self {
            down,
            up,
            alpha,
            kind,
            multiplier_bits: AtomicU64::new(1.0f64.to_bits()),
            gradients: AtomicBool::new(true),
            dropout_bits: AtomicU64::new(0.0f64.to_bits()),
            dropout_seed: AtomicU64::new(0),
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

    pub fn kind(&self) -> &AdapterKind {
        &self.kind
    }

    /// The strength the adapter is applied at (the `0.8` of `<lora:NAME:0.8>`).
    pub fn multiplier(&self) -> f64 {
        f64::from_bits(self.multiplier_bits.load(Ordering::Relaxed))
    }

    pub fn set_multiplier(&self, multiplier: f64) {
        self.multiplier_bits
            .store(multiplier.to_bits(), Ordering::Relaxed);
    }

    /// Turns the recording of the graph through the trained tensors on (training) or off (rendering).
    pub fn set_gradients(&self, enabled: bool) {
        self.gradients.store(enabled, Ordering::Relaxed);
    }

    /// Drops each element of the update's input with `probability` while training (gradients on), with
    /// masks drawn from `seed`; 0 turns dropout off.
    pub fn set_dropout(&self, probability: f64, seed: u64) {
        self.dropout_bits
            .store(probability.to_bits(), Ordering::Relaxed);
        self.dropout_seed.store(seed, Ordering::Relaxed);
    }

    /// The dropout probability in effect: none unless training.
    fn active_dropout(&self) -> Option<f64> {
        let probability = f64::from_bits(self.dropout_bits.load(Ordering::Relaxed));
        (probability > 0.0 && self.gradients.load(Ordering::Relaxed)).then_some(probability)
    }

    /// `x` with elements dropped (and the rest scaled by 1/(1−p)) when dropout is active.
    fn dropped(&self, x: &Tensor) -> Result<Tensor> {
        let Some(probability) = self.active_dropout() else {
            return Ok(x.clone());
        };
        let mut rng = ChaCha8Rng::seed_from_u64(self.dropout_seed.load(Ordering::Relaxed));
        let keep = 1.0 / (1.0 - probability);
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.random::<f64>() < probability {
                    0.0
                } else {
                    keep as f32
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }

    /// `tensor`, cut from the graph when gradients are off (the storage is shared, nothing is copied).
    fn trained(&self, tensor: &Tensor) -> Tensor {
        if self.gradients.load(Ordering::Relaxed) {
            tensor.clone()
        } else {
            tensor.detach()
        }
    }

    /// A plain LoRA's down and up matrices (detached unless training) and its effective scale
    /// (multiplier × alpha/rank); `None` for DoRA and PiSSA.
    pub(crate) fn plain_parts(&self) -> Option<(Tensor, Tensor, f64)> {
        match self.kind {
            AdapterKind::Lora if self.active_dropout().is_none() => Some((
                self.trained(&self.down),
                self.trained(&self.up),
                self.multiplier() * self.scale(),
            )),
            _ => None,
        }
    }

    /// `up(down(x))` for the given pair, in `x`'s dtype.
    fn low_rank(x: &Tensor, down: &Tensor, up: &Tensor, layer: &LayerShape) -> Result<Tensor> {
        let (down, up) = (down.to_dtype(x.dtype())?, up.to_dtype(x.dtype())?);
        match *layer {
            LayerShape::Linear { .. } => x.broadcast_matmul(&down.t()?)?.broadcast_matmul(&up.t()?),
            LayerShape::Conv2d {
                stride, padding, ..
            } => x
                .conv2d(&down, padding, stride, 1, 1)?
                .conv2d(&up, 0, 1, 1, 1),
        }
    }

    /// Whether [`Self::forward`] reads the frozen weight's values (DoRA's norm of the adapted weight).
    pub fn reads_base_weight(&self) -> bool {
        matches!(self.kind, AdapterKind::Dora { .. })
    }

    /// The adapter's contribution to the layer output, given the input `x`, the frozen layer's output
    /// without bias `base` (`W x`), and `W` itself where the adapter reads it
    /// ([`Self::reads_base_weight`]).
    pub fn forward(
        &self,
        x: &Tensor,
        base: &Tensor,
        weight: Option<&Tensor>,
        layer: &LayerShape,
    ) -> Result<Tensor> {
        let multiplier = self.multiplier();
        let scale = self.scale();
        let (down, up) = (self.trained(&self.down), self.trained(&self.up));
        let update = Self::low_rank(&self.dropped(x)?, &down, &up, layer)?;
        match &self.kind {
            AdapterKind::Lora => update.affine(multiplier * scale, 0.0),
            AdapterKind::Pissa { down0, up0 } => {
                let initial = Self::low_rank(x, down0, up0, layer)?;
                (update - initial)?.affine(multiplier * scale, 0.0)
            }
            AdapterKind::Dora { magnitude } => {
                // ratio = mag / ‖W + s·up·down‖ per output channel, broadcast over the output's channel axis.
                let Some(weight) = weight else {
                    candle_core::bail!("a DoRA adapter needs the layer's frozen weight");
                };
                let norm = self.adapted_weight_norm(weight)?.detach();
                let ratio = self
                    .trained(magnitude)
                    .to_dtype(DType::F32)?
                    .broadcast_div(&norm)?
                    .to_dtype(x.dtype())?;
                let ratio = match layer {
                    LayerShape::Linear { .. } => ratio,
                    LayerShape::Conv2d { .. } => ratio.reshape((1, (), 1, 1))?,
                };
                let rescaled_base = base.broadcast_mul(&(ratio.clone() - 1.0)?)?;
                let rescaled_update = update.broadcast_mul(&ratio)?.affine(scale, 0.0)?;
                (rescaled_base + rescaled_update)?.affine(multiplier, 0.0)
            }
        }
    }

    /// `s · up·down` (minus the PiSSA initial product), in the weight's own shape, at multiplier 1.
    pub fn low_rank_delta(&self, layer: &LayerShape) -> Result<Tensor> {
        let product = |down: &Tensor, up: &Tensor| -> Result<Tensor> {
            let rank = down.dims()[0];
            let out = up.dims()[0];
            let flat_down = down.to_dtype(DType::F32)?.reshape((rank, ()))?;
            let flat_up = up.to_dtype(DType::F32)?.reshape((out, rank))?;
            flat_up.matmul(&flat_down)?.reshape(layer.weight_dims())
        };
        let mut delta = product(&self.down, &self.up)?;
        if let AdapterKind::Pissa { down0, up0 } = &self.kind {
            delta = (delta - product(down0, up0)?)?;
        }
        delta.affine(self.scale(), 0.0)
    }

    /// The change to the layer's weight at full strength, `W' − W` (f32, weight-shaped).
    pub fn full_strength_delta(&self, weight: &Tensor, layer: &LayerShape) -> Result<Tensor> {
        let low_rank = self.low_rank_delta(layer)?;
        match &self.kind {
            AdapterKind::Dora { magnitude } => {
                let weight = weight.to_dtype(DType::F32)?;
                let adapted = (&weight + low_rank)?;
                let ratio = magnitude
                    .to_dtype(DType::F32)?
                    .broadcast_div(&row_norm(&adapted)?)?;
                let shape: Vec<usize> = std::iter::once(ratio.dim(0)?)
                    .chain(std::iter::repeat_n(1, weight.rank() - 1))
                    .collect();
                adapted.broadcast_mul(&ratio.reshape(shape)?)? - weight
            }
            _ => Ok(low_rank),
        }
    }

    /// The change to the layer's weight at the current multiplier (f32, weight-shaped).
    pub fn weight_delta(&self, weight: &Tensor, layer: &LayerShape) -> Result<Tensor> {
        self.full_strength_delta(weight, layer)?
            .affine(self.multiplier(), 0.0)
    }

    /// `‖W + s·up·down‖` per output channel (f32).
    fn adapted_weight_norm(&self, weight: &Tensor) -> Result<Tensor> {
        let rank = self.rank();
        let out = self.up.dims()[0];
        let down = self.down.to_dtype(DType::F32)?.reshape((rank, ()))?;
        let up = self.up.to_dtype(DType::F32)?.reshape((out, rank))?;
        let weight = weight.to_dtype(DType::F32)?.reshape((out, ()))?;
        let adapted = (weight + up.matmul(&down)?.affine(self.scale(), 0.0)?)?;
        row_norm(&adapted)
    }
}

/// The Euclidean norm of each output channel (dimension 0) of a weight, `[out]`.
pub fn row_norm(weight: &Tensor) -> Result<Tensor> {
    let out = weight.dim(0)?;
    weight.reshape((out, ()))?.sqr()?.sum(D::Minus1)?.sqrt()
}

/// The shapes of `down` and `up` for a layer at a rank.
pub fn adapter_dims(layer: &LayerShape, rank: usize) -> (Vec<usize>, Vec<usize>) {
    match *layer {
        LayerShape::Linear {
            in_features,
            out_features,
        } => (vec![rank, in_features], vec![out_features, rank]),
        LayerShape::Conv2d {
            in_channels,
            out_channels,
            kernel,
            ..
        } => (
            vec![rank, in_channels, kernel.0, kernel.1],
            vec![out_channels, rank, 1, 1],
        ),
    }
}

/// Reshapes `t` to `dims` when only unit dimensions differ (2-D <-> 1x1 4-D); otherwise explains the mismatch.
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

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    use super::{AdapterKind, LoraAdapter};
    use crate::lora::layer::LayerShape;

    #[test]
    fn renders_without_gradients_record_no_graph() {
        let layer = LayerShape::Linear {
            in_features: 6,
            out_features: 5,
        };
        let down = Var::ones((2, 6), candle_core::DType::F32, &Device::Cpu).unwrap();
        let up = Var::ones((5, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let adapter = LoraAdapter::with_kind(
            down.as_tensor().clone(),
            up.as_tensor().clone(),
            Some(2.0),
            AdapterKind::Lora,
            &layer,
        )
        .unwrap();
        let x = Tensor::ones((3, 6), candle_core::DType::F32, &Device::Cpu).unwrap();
        let weight = Tensor::zeros((5, 6), candle_core::DType::F32, &Device::Cpu).unwrap();
        let base = x.matmul(&weight.t().unwrap()).unwrap();
        let training = adapter.forward(&x, &base, Some(&weight), &layer).unwrap();
        assert!(training.track_op());
        adapter.set_gradients(false);
        let rendering = adapter.forward(&x, &base, Some(&weight), &layer).unwrap();
        assert!(!rendering.track_op());
        let difference = (training - rendering)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(difference.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn dropout_zeroes_input_elements_from_its_seed_while_training_only() {
        let n = 64;
        let layer = LayerShape::Linear {
            in_features: n,
            out_features: n,
        };
        let identity = Tensor::eye(n, candle_core::DType::F32, &Device::Cpu).unwrap();
        let adapter = LoraAdapter::new(identity.clone(), identity.clone(), None, &layer).unwrap();
        let x = Tensor::ones((8, n), candle_core::DType::F32, &Device::Cpu).unwrap();
        let base = x.zeros_like().unwrap();
        let update = |adapter: &LoraAdapter| -> Vec<f32> {
            adapter
                .forward(&x, &base, Some(&identity), &layer)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        adapter.set_dropout(0.25, 11);
        let first = update(&adapter);
        assert_eq!(first, update(&adapter), "the same seed draws the same mask");
        let dropped = first.iter().filter(|&&v| v == 0.0).count() as f64 / first.len() as f64;
        assert!((dropped - 0.25).abs() < 0.05, "dropped {dropped}");
        let kept = 1.0 / 0.75;
        assert!(first.iter().all(|&v| v == 0.0 || (v - kept).abs() < 1e-6));
        adapter.set_dropout(0.25, 12);
        assert_ne!(first, update(&adapter), "another seed, another mask");
        adapter.set_gradients(false);
        assert!(
            update(&adapter).iter().all(|&v| v == 1.0),
            "no dropout when rendering"
        );
    }
}
