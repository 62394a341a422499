//! A trainable network: one adapter (LoRA, DoRA or PiSSA) per target layer, whose tensors are `Var`s.
//!
//! Ranks follow kohya: 3x3 (and larger) convolutions take the conv rank/alpha, linear layers and 1x1
//! convolutions the linear ones. Initialisation follows kohya too (down: Kaiming-uniform, bound
//! 1/sqrt(fan_in); up: zeros), so training starts from the base model exactly. Which layers are targets is
//! the model's business; this type takes a list of slots per component.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::adapter::{AdapterKind, LoraAdapter, adapter_dims, row_norm};
use super::kohya::kohya_name;
use super::layer::{AdapterSlot, LayerShape};
use super::svd::{to_matrix, truncated_svd};

/// Which adapter family to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkKind {
    Lora,
    Dora,
    Pissa,
}

impl NetworkKind {
    pub fn label(&self) -> &'static str {
        match self {
            NetworkKind::Lora => "lora",
            NetworkKind::Dora => "dora",
            NetworkKind::Pissa => "pissa",
        }
    }
}

/// Ranks and alphas of a network.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetworkSpec {
    pub rank: usize,
    pub alpha: f64,
    pub conv_rank: usize,
    pub conv_alpha: f64,
    pub kind: NetworkKind,
}

impl NetworkSpec {
    /// Rank and alpha for a layer: the conv pair for kernels larger than 1x1.
    pub fn rank_alpha(&self, shape: &LayerShape) -> (usize, f64) {
        match shape {
            LayerShape::Conv2d { kernel, .. } if kernel.0 > 1 || kernel.1 > 1 => {
                (self.conv_rank, self.conv_alpha)
            }
            _ => (self.rank, self.alpha),
        }
    }
}

/// The layers of one model component to put adapters on.
pub struct TargetComponent {
    /// The kohya prefix (`lora_unet`, `lora_te`, `lora_te1`, `lora_te2`).
    pub prefix: &'static str,
    pub slots: Vec<Arc<AdapterSlot>>,
    /// The learning-rate group of its adapters, which the trainer maps to a learning rate (several
    /// components may share one: SDXL's two text encoders train at one rate, as kohya's do).
    pub group: usize,
}

/// One trained adapter.
pub struct NetworkModule {
    /// The kohya module name.
    pub name: String,
    /// The kohya prefix of its component.
    pub prefix: &'static str,
    /// The learning-rate group of its component (see [`TargetComponent::group`]).
    pub group: usize,
    pub slot: Arc<AdapterSlot>,
    pub adapter: Arc<LoraAdapter>,
    pub down: Var,
    pub up: Var,
    /// DoRA's magnitude.
    pub magnitude: Option<Var>,
}

impl NetworkModule {
    /// The trainable variables with their checkpoint names.
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        let mut vars = vec![
            (format!("{}.lora_down.weight", self.name), &self.down),
            (format!("{}.lora_up.weight", self.name), &self.up),
        ];
        if let Some(m) = &self.magnitude {
            vars.push((format!("{}.dora_magnitude", self.name), m));
        }
        vars
    }
}

/// A network attached to a model.
pub struct LoraNetwork {
    modules: Vec<NetworkModule>,
    spec: NetworkSpec,
}

impl LoraNetwork {
    /// Creates and attaches adapters on every target slot. `seed` fixes the initialisation.
    pub fn create(
        components: &[TargetComponent],
        spec: NetworkSpec,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut modules = Vec::new();
        for target in components {
            for slot in &target.slots {
                let module = Self::create_module(
                    target.group,
                    target.prefix,
                    slot,
                    &spec,
                    &mut rng,
                    device,
                )?;
                slot.attach(module.adapter.clone());
                modules.push(module);
            }
        }
        Ok(Self { modules, spec })
    }

    fn create_module(
        group: usize,
        prefix: &'static str,
        slot: &Arc<AdapterSlot>,
        spec: &NetworkSpec,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<NetworkModule> {
        let shape = *slot.shape();
        let (rank, alpha) = spec.rank_alpha(&shape);
        let weight_dims = shape.weight_dims();
        let fan_in: usize = weight_dims[1..].iter().product();
        // A truncated SVD has at most min(out, in) components.
        let rank = if spec.kind == NetworkKind::Pissa {
            rank.min(weight_dims[0]).min(fan_in).max(1)
        } else {
            rank
        };
        let (down_dims, up_dims) = adapter_dims(&shape, rank);
        let name = kohya_name(prefix, slot.kohya_path());
        let (down, up, kind, magnitude) = match spec.kind {
            NetworkKind::Pissa => {
                // scale · up₀·down₀ = the top-`rank` SVD part of W.
                let scale = alpha / rank as f64;
                let weight = to_matrix(
                    &slot
                        .weight()?
                        .to_dtype(DType::F32)?
                        .reshape((weight_dims[0], fan_in))?,
                )?;
                let svd = truncated_svd(&weight, rank, rng.random());
                let (up0, down0) = svd.balanced_factors(1.0 / scale.sqrt(), device)?;
                let (up0, down0) = (up0.reshape(up_dims)?, down0.reshape(down_dims)?);
                let kind = AdapterKind::Pissa {
                    down0: down0.copy()?,
                    up0: up0.copy()?,
                };
                (
                    Var::from_tensor(&down0)?,
                    Var::from_tensor(&up0)?,
                    kind,
                    None,
                )
            }
            NetworkKind::Lora | NetworkKind::Dora => {
                let bound = 1.0 / (fan_in as f64).sqrt();
                let count: usize = down_dims.iter().product();
                let values: Vec<f32> = (0..count)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                let down = Var::from_tensor(&Tensor::from_vec(values, down_dims, device)?)?;
                let up = Var::zeros(up_dims, DType::F32, device)?;
                if spec.kind == NetworkKind::Dora {
                    let magnitude =
                        Var::from_tensor(&row_norm(&slot.weight()?.to_dtype(DType::F32)?)?)?;
                    let kind = AdapterKind::Dora {
                        magnitude: magnitude.as_tensor().clone(),
                    };
                    (down, up, kind, Some(magnitude))
                } else {
                    (down, up, AdapterKind::Lora, None)
                }
            }
        };
        let adapter = LoraAdapter::with_kind(
            down.as_tensor().clone(),
            up.as_tensor().clone(),
            Some(alpha),
            kind,
            &shape,
        )
        .map_err(|reason| candle_core::Error::Msg(format!("{name}: {reason}")))?;
        Ok(NetworkModule {
            name,
            prefix,
            group,
            slot: slot.clone(),
            adapter: Arc::new(adapter),
            down,
            up,
            magnitude,
        })
    }

    pub fn spec(&self) -> &NetworkSpec {
        &self.spec
    }

    pub fn modules(&self) -> &[NetworkModule] {
        &self.modules
    }

    /// Every trainable variable with its name and learning-rate group.
    pub fn named_vars(&self) -> Vec<(String, usize, &Var)> {
        self.modules
            .iter()
            .flat_map(|m| {
                m.named_vars()
                    .into_iter()
                    .map(move |(name, var)| (name, m.group, var))
            })
            .collect()
    }

    /// Number of trainable values.
    pub fn parameter_count(&self) -> usize {
        self.named_vars()
            .iter()
            .map(|(_, _, v)| v.elem_count())
            .sum()
    }

    /// Applies the network at `multiplier` (1 while training; previews may use others).
    pub fn set_multiplier(&self, multiplier: f64) {
        for module in &self.modules {
            module.adapter.set_multiplier(multiplier);
        }
    }

    /// Sets the adapters' input dropout for the next forward passes: `probability` (0 = none), each
    /// module's masks drawn from `seed` and its place in the network.
    pub fn set_dropout(&self, probability: f64, seed: u64) {
        for (index, module) in self.modules.iter().enumerate() {
            let module_seed = seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            module.adapter.set_dropout(probability, module_seed);
        }
    }

    /// Turns the recording of the backward graph on (training) or off (previews and samples render at
    /// inference cost).
    pub fn set_gradients(&self, enabled: bool) {
        for module in &self.modules {
            module.adapter.set_gradients(enabled);
        }
    }

    /// Renders at `multiplier` without recording gradients until the guard is dropped, which puts the
    /// network back in training mode (multiplier 1, gradients on).
    pub fn rendering_at(&self, multiplier: f64) -> Rendering<'_> {
        self.set_multiplier(multiplier);
        self.set_gradients(false);
        Rendering(self)
    }

    /// The trained tensors (f32) by name, for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.named_vars()
            .into_iter()
            .map(|(name, _, var)| (name, var.as_tensor().clone()))
            .collect()
    }

    /// Restores tensors saved by [`state`](Self::state); every variable must be present with its shape.
    pub fn load_state(&self, tensors: &HashMap<String, Tensor>) -> std::result::Result<(), String> {
        for (name, _, var) in self.named_vars() {
            let saved = tensors
                .get(&name)
                .ok_or_else(|| format!("the checkpoint has no `{name}`"))?;
            if saved.dims() != var.dims() {
                return Err(format!(
                    "`{name}` has shape {:?} in the checkpoint, {:?} in the network",
                    saved.dims(),
                    var.dims()
                ));
            }
            let saved = saved
                .to_dtype(var.dtype())
                .and_then(|t| t.to_device(var.device()))
                .map_err(|e| e.to_string())?;
            var.set(&saved).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// See [`LoraNetwork::rendering_at`].
pub struct Rendering<'a>(&'a LoraNetwork);

impl Drop for Rendering<'_> {
    fn drop(&mut self) {
        self.0.set_multiplier(1.0);
        self.0.set_gradients(true);
    }
}

impl Drop for LoraNetwork {
    /// A network leaves the model as it found it.
    fn drop(&mut self) {
        for module in &self.modules {
            module.slot.detach(&module.adapter);
        }
    }
}
