//! Adapter-capable Linear and Conv2d layers, and the registry that names them.
//!
//! Every Linear and Conv2d of every model is one of these: a frozen base weight (run through the
//! input-gradient-only ops of [`crate::kernels`]) plus a slot holding any number of adapters. Training,
//! previews at any strength, loading LoRA files and merging all go through the same slots. A slot is named
//! by its module path in the diffusers layout (`down_blocks.0.attentions.0.proj_in`), the name kohya LoRA keys
//! are made of, unless the model gives it another path for kohya (SDXL's original layout). This module must
//! not know about any particular model.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::adapter::LoraAdapter;
use super::fused_lora::lora_linear;
use crate::kernels::{frozen_affine, frozen_conv2d, frozen_linear};

/// The geometry of a base layer, which decides how an adapter attaches to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerShape {
    Linear {
        in_features: usize,
        out_features: usize,
    },
    Conv2d {
        in_channels: usize,
        out_channels: usize,
        kernel: (usize, usize),
        stride: usize,
        padding: usize,
    },
}

impl LayerShape {
    /// The shape of the base weight.
    pub fn weight_dims(&self) -> Vec<usize> {
        match *self {
            LayerShape::Linear {
                in_features,
                out_features,
            } => vec![out_features, in_features],
            LayerShape::Conv2d {
                in_channels,
                out_channels,
                kernel,
                ..
            } => {
                vec![out_channels, in_channels, kernel.0, kernel.1]
            }
        }
    }

    pub fn is_conv_1x1(&self) -> bool {
        matches!(self, LayerShape::Conv2d { kernel: (1, 1), .. })
    }
}

/// The adapters attached to one named layer.
#[derive(Debug)]
pub struct AdapterSlot {
    name: String,
    /// The module path kohya names this layer by, when it is not `name`.
    kohya_path: OnceLock<String>,
    shape: LayerShape,
    /// The frozen base weight (shared with the layer, not copied).
    weight: Tensor,
    adapters: RwLock<Vec<Arc<LoraAdapter>>>,
}

impl AdapterSlot {
    /// The module path in the diffusers layout.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The module path kohya's files name this layer by: the diffusers path, or the one the model set with
    /// [`LayerRegistry::set_kohya_paths`].
    pub fn kohya_path(&self) -> &str {
        self.kohya_path.get().map_or(&self.name, String::as_str)
    }

    pub fn shape(&self) -> &LayerShape {
        &self.shape
    }

    /// The frozen base weight, `[out, in]` or `[out, in, kh, kw]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn attach(&self, adapter: Arc<LoraAdapter>) {
        self.adapters
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(adapter);
    }

    /// Removes one adapter (compared by identity).
    pub fn detach(&self, adapter: &Arc<LoraAdapter>) {
        self.adapters
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|a| !Arc::ptr_eq(a, adapter));
    }

    pub fn detach_all(&self) {
        self.adapters
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    pub fn adapters(&self) -> Vec<Arc<LoraAdapter>> {
        self.adapters
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Adds the contribution of every adapter with a non-zero multiplier to `base`, the frozen layer's
    /// output without bias.
    /// Whether any adapter would change the layer's output.
    fn has_active_adapters(&self) -> bool {
        let adapters = self.adapters.read().unwrap_or_else(PoisonError::into_inner);
        adapters.iter().any(|a| a.multiplier() != 0.0)
    }

    /// The single active adapter's parts when it is a plain LoRA on a linear layer (the fused path).
    fn single_plain_linear_lora(&self) -> Option<(Tensor, Tensor, f64)> {
        if !matches!(self.shape, LayerShape::Linear { .. }) {
            return None;
        }
        let adapters = self.adapters.read().unwrap_or_else(PoisonError::into_inner);
        let mut active = adapters.iter().filter(|a| a.multiplier() != 0.0);
        match (active.next(), active.next()) {
            (Some(only), None) => only.plain_parts(),
            _ => None,
        }
    }

    fn add_adapters(&self, x: &Tensor, base: Tensor) -> Result<Tensor> {
        let adapters = self.adapters.read().unwrap_or_else(PoisonError::into_inner);
        let mut y = base.clone();
        for adapter in adapters.iter().filter(|a| a.multiplier() != 0.0) {
            y = (y + adapter.forward(x, &base, &self.weight, &self.shape)?)?;
        }
        Ok(y)
    }
}

/// All adapter-capable layers of one model, in construction order, looked up by name.
#[derive(Debug, Clone, Default)]
pub struct LayerRegistry {
    inner: Arc<Mutex<RegistryInner>>,
}

#[derive(Debug, Default)]
struct RegistryInner {
    slots: Vec<Arc<AdapterSlot>>,
    by_name: HashMap<String, usize>,
}

impl LayerRegistry {
    fn register(&self, name: String, shape: LayerShape, weight: Tensor) -> Arc<AdapterSlot> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = Arc::new(AdapterSlot {
            name: name.clone(),
            kohya_path: OnceLock::new(),
            shape,
            weight,
            adapters: RwLock::new(Vec::new()),
        });
        let index = inner.slots.len();
        inner.slots.push(slot.clone());
        inner.by_name.insert(name, index);
        slot
    }

    pub fn slots(&self) -> Vec<Arc<AdapterSlot>> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .slots
            .clone()
    }

    pub fn get(&self, name: &str) -> Option<Arc<AdapterSlot>> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.by_name.get(name).map(|&i| inner.slots[i].clone())
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .slots
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Gives the layers the module paths kohya names them by, where `path_of` (given a layer's diffusers
    /// path) returns one; for models kohya trains in another layout than diffusers'.
    pub fn set_kohya_paths(&self, path_of: impl Fn(&str) -> Option<String>) {
        for slot in self.slots() {
            if let Some(path) = path_of(slot.name()) {
                // A second call cannot rename a layer: the first paths are the ones files were named by.
                let _ = slot.kohya_path.set(path);
            }
        }
    }

    /// Removes every adapter from every layer.
    pub fn detach_all(&self) {
        for slot in self.slots() {
            slot.detach_all();
        }
    }
}

/// A `VarBuilder` that also registers the adapter-capable layers it builds.
#[derive(Clone)]
pub struct LayerBuilder<'a> {
    vb: VarBuilder<'a>,
    registry: LayerRegistry,
}

impl<'a> LayerBuilder<'a> {
    pub fn new(vb: VarBuilder<'a>, registry: LayerRegistry) -> Self {
        Self { vb, registry }
    }

    /// Descends into the sub-module `name`.
    pub fn pp(&self, name: impl ToString) -> Self {
        Self {
            vb: self.vb.pp(name),
            registry: self.registry.clone(),
        }
    }

    /// The underlying weights, for layers that take no adapters (norms, embeddings).
    pub fn vb(&self) -> &VarBuilder<'a> {
        &self.vb
    }

    pub fn linear(
        &self,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<AdaptableLinear> {
        let weight = self.vb.get((out_features, in_features), "weight")?;
        let bias = if bias {
            Some(self.vb.get(out_features, "bias")?)
        } else {
            None
        };
        let shape = LayerShape::Linear {
            in_features,
            out_features,
        };
        let slot = self
            .registry
            .register(self.vb.prefix(), shape, weight.clone());
        Ok(AdaptableLinear { weight, bias, slot })
    }

    pub fn conv2d(
        &self,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<AdaptableConv2d> {
        let weight = self
            .vb
            .get((out_channels, in_channels, kernel, kernel), "weight")?;
        let bias = self.vb.get(out_channels, "bias")?;
        let shape = LayerShape::Conv2d {
            in_channels,
            out_channels,
            kernel: (kernel, kernel),
            stride,
            padding,
        };
        let slot = self
            .registry
            .register(self.vb.prefix(), shape, weight.clone());
        Ok(AdaptableConv2d {
            weight,
            bias,
            stride,
            padding,
            slot,
        })
    }
}

/// `y = x·Wᵀ + b` with a frozen `W`, plus the slot's adapters.
#[derive(Debug, Clone)]
pub struct AdaptableLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    slot: Arc<AdapterSlot>,
}

impl AdaptableLinear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some((down, up, scale)) = self.slot.single_plain_linear_lora() {
            return lora_linear(x, &self.weight, self.bias.as_ref(), (&down, &up), scale);
        }
        if let Some(bias) = &self.bias
            && !self.slot.has_active_adapters()
        {
            return frozen_affine(x, &self.weight, bias);
        }
        let y = self.slot.add_adapters(x, frozen_linear(x, &self.weight)?)?;
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn slot(&self) -> &Arc<AdapterSlot> {
        &self.slot
    }
}

/// A frozen 2-D convolution (square kernel, with bias) plus the slot's adapters.
#[derive(Debug, Clone)]
pub struct AdaptableConv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
    slot: Arc<AdapterSlot>,
}

impl AdaptableConv2d {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let channels = self.bias.dims1()?;
        let bias = self.bias.reshape((1, channels, 1, 1))?;
        if !self.slot.has_active_adapters() {
            return frozen_conv2d(x, &self.weight, Some(&bias), self.padding, self.stride);
        }
        let y = frozen_conv2d(x, &self.weight, None, self.padding, self.stride)?;
        self.slot.add_adapters(x, y)?.broadcast_add(&bias)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn slot(&self) -> &Arc<AdapterSlot> {
        &self.slot
    }
}
