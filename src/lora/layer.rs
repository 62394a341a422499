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

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::adapter::LoraAdapter;
use super::fused_lora::{LinearInput, lora_linear};
use crate::kernels::{
    AffineLayer, FrozenWeight, LowRank, NormalizedInput, frozen_affine, frozen_conv2d,
    frozen_linear, geglu, geglu_affine, silu, silu_conv2d,
};

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
    /// The frozen base weight, which the layer reads from here; stored in another dtype for a run by
    /// [`LayerRegistry::store_weights_in`], or in tile order by [`LayerRegistry::tile_linear_weights`].
    weight: RwLock<FrozenWeight>,
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

    /// The frozen base weight, `[out, in]` or `[out, in, kh, kw]`: a handle, or a copy of a weight stored
    /// in tile order.
    pub fn weight(&self) -> Result<Tensor> {
        self.frozen_weight().to_tensor()
    }

    /// The frozen base weight as the kernels read it (a handle, not a copy).
    pub fn frozen_weight(&self) -> FrozenWeight {
        self.weight
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Adds an adapter. One that reads the frozen weight's values (DoRA) gets the weight stored as a
    /// tensor again if it was in tile order, so that it is not copied out at every step.
    pub fn attach(&self, adapter: Arc<LoraAdapter>) {
        if adapter.reads_base_weight() {
            let mut weight = self.weight.write().unwrap_or_else(PoisonError::into_inner);
            if let FrozenWeight::Tiled(_) = &*weight
                && let Ok(tensor) = weight.to_tensor()
            {
                *weight = tensor.into();
            }
        }
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
        let active: Vec<_> = adapters.iter().filter(|a| a.multiplier() != 0.0).collect();
        let weight = if active.iter().any(|a| a.reads_base_weight()) {
            Some(self.weight()?)
        } else {
            None
        };
        let mut y = base.clone();
        for adapter in active {
            y = (y + adapter.forward(x, &base, weight.as_ref(), &self.shape)?)?;
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
    fn register(&self, name: String, shape: LayerShape, weight: FrozenWeight) -> Arc<AdapterSlot> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = Arc::new(AdapterSlot {
            name: name.clone(),
            kohya_path: OnceLock::new(),
            shape,
            weight: RwLock::new(weight),
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

    /// Stores every layer's frozen weight in `dtype` (the values rounded to it), one layer at a time so that
    /// memory holds one layer twice at most: training on the CPU with bf16 products keeps them in bf16,
    /// half the memory and half the bytes each product reads.
    pub fn store_weights_in(&self, dtype: DType) -> Result<()> {
        for slot in self.slots() {
            let mut weight = slot.weight.write().unwrap_or_else(PoisonError::into_inner);
            let stored = match &*weight {
                FrozenWeight::Tensor(tensor) if tensor.dtype() == dtype => continue,
                FrozenWeight::Tiled(_) if dtype == DType::BF16 => continue,
                stored => stored.to_tensor()?,
            };
            *weight = stored.to_dtype(dtype)?.into();
        }
        Ok(())
    }

    /// Stores the linear layers' frozen weights in bf16 in the tile order of the products that read them
    /// (one layer at a time), where the CPU kernels take bf16 products: a run in bf16 products
    /// then packs no weight for its products. Other code reads them back as bf16 tensors (copies);
    /// [`Self::store_weights_in`] stores them as tensors again.
    pub fn tile_linear_weights(&self) -> Result<()> {
        for slot in self.slots() {
            if !matches!(slot.shape, LayerShape::Linear { .. }) {
                continue;
            }
            let mut weight = slot.weight.write().unwrap_or_else(PoisonError::into_inner);
            if let FrozenWeight::Tensor(tensor) = &*weight
                && let Some(tiled) = FrozenWeight::tiled(tensor)?
            {
                *weight = tiled;
            }
        }
        Ok(())
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

    /// The dtype the frozen weight of an adapter-capable layer loads in: bf16 for an f32 model built on the
    /// CPU inside a bf16-products scope (the products read them as they are, and the model never sits in
    /// memory in f32), else the builder's own.
    fn frozen_dtype(&self) -> DType {
        let f32_on_cpu = self.vb.dtype() == DType::F32 && self.vb.device().is_cpu();
        if f32_on_cpu && crate::kernels::bf16_products() {
            DType::BF16
        } else {
            self.vb.dtype()
        }
    }

    /// The frozen weight of `dims` under `weight`, in [`Self::frozen_dtype`].
    fn frozen_weight(&self, dims: &[usize]) -> Result<Tensor> {
        self.vb
            .get_with_hints_dtype(dims, "weight", Default::default(), self.frozen_dtype())
    }

    pub fn linear(
        &self,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<AdaptableLinear> {
        let weight = self.frozen_weight(&[out_features, in_features])?;
        // Loaded for bf16 products, the weight goes straight into the tile order they read.
        let for_bf16_products = weight.dtype() != self.vb.dtype();
        let weight = if for_bf16_products {
            FrozenWeight::tiled(&weight)?.unwrap_or(FrozenWeight::Tensor(weight))
        } else {
            weight.into()
        };
        let bias = if bias {
            Some(self.vb.get(out_features, "bias")?)
        } else {
            None
        };
        let shape = LayerShape::Linear {
            in_features,
            out_features,
        };
        let slot = self.registry.register(self.vb.prefix(), shape, weight);
        Ok(AdaptableLinear { bias, slot })
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
            .frozen_weight(&[out_channels, in_channels, kernel, kernel])?
            .into();
        let bias = self.vb.get(out_channels, "bias")?;
        let shape = LayerShape::Conv2d {
            in_channels,
            out_channels,
            kernel: (kernel, kernel),
            stride,
            padding,
        };
        let slot = self.registry.register(self.vb.prefix(), shape, weight);
        Ok(AdaptableConv2d {
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
    bias: Option<Tensor>,
    slot: Arc<AdapterSlot>,
}

impl AdaptableLinear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.single_lora_op(LinearInput::Tensor(x), None) {
            return y;
        }
        let weight = self.slot.frozen_weight();
        if let Some(bias) = &self.bias
            && !self.slot.has_active_adapters()
        {
            return frozen_affine(x, &weight, bias);
        }
        let y = self.slot.add_adapters(x, frozen_linear(x, &weight)?)?;
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }

    /// `residual + layer(x)` (an attention's output layer and the block's residual stream). With one plain
    /// LoRA the sum is part of the layer's op, so the layer's output is not kept for the backward pass.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match self.single_lora_op(LinearInput::Tensor(x), Some(residual)) {
            Some(y) => y,
            None => self.forward(x)? + residual,
        }
    }

    /// This layer applied to a layer norm's output. With one plain LoRA the layer ties its output to the
    /// norm's input and recomputes the norm in its backward pass, so the norm's output is not kept.
    pub fn forward_normalized(&self, input: &NormalizedInput) -> Result<Tensor> {
        match self.single_lora_op(LinearInput::Normalized(input), None) {
            Some(y) => y,
            None => self.forward(&input.tracked()?),
        }
    }

    /// The layer and its adapter as one op ([`lora_linear`]), when it has one plain LoRA.
    fn single_lora_op(
        &self,
        input: LinearInput,
        residual: Option<&Tensor>,
    ) -> Option<Result<Tensor>> {
        let (down, up, scale) = self.slot.single_plain_linear_lora()?;
        let weight = self.slot.frozen_weight();
        let bias = self.bias.as_ref();
        Some(lora_linear(
            input,
            &weight,
            bias,
            (&down, &up),
            scale,
            residual,
        ))
    }

    /// This layer applied to `geglu(projected)` (a feed-forward's output layer). Without adapters the GEGLU
    /// output is not kept for the backward pass ([`geglu_affine`]); with them, their gradients need it.
    pub fn forward_geglu(&self, projected: &Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(bias) if !self.slot.has_active_adapters() => {
                geglu_affine(projected, self.slot.frozen_weight(), bias)
            }
            _ => self.forward(&geglu(projected)?),
        }
    }

    /// The frozen weight: a handle, or a copy of a weight stored in tile order.
    pub fn weight(&self) -> Result<Tensor> {
        self.slot.weight()
    }

    /// The weight, bias and plain LoRA (if any), when the layer has a bias and at most one active adapter,
    /// a plain LoRA: it is then an affine map that ops may fold in.
    pub fn affine_parts(&self) -> Option<AffineParts> {
        let bias = self.bias.clone()?;
        let adapter = match self.slot.single_plain_linear_lora() {
            Some(lora) => Some(lora),
            None if !self.slot.has_active_adapters() => None,
            None => return None,
        };
        Some(AffineParts {
            weight: self.slot.frozen_weight(),
            bias,
            adapter,
        })
    }

    pub fn slot(&self) -> &Arc<AdapterSlot> {
        &self.slot
    }
}

/// An [`AdaptableLinear`]'s frozen weight and bias and its plain LoRA (down, up, scale), if any.
pub struct AffineParts {
    weight: FrozenWeight,
    bias: Tensor,
    adapter: Option<(Tensor, Tensor, f64)>,
}

impl AffineParts {
    /// The layer as a kernel sees it.
    pub fn layer(&self) -> AffineLayer<'_> {
        AffineLayer {
            weight: &self.weight,
            bias: &self.bias,
            adapter: self.adapter.as_ref().map(|(down, up, scale)| LowRank {
                down,
                up,
                scale: *scale,
            }),
        }
    }
}

/// A frozen 2-D convolution (square kernel, with bias) plus the slot's adapters.
#[derive(Debug, Clone)]
pub struct AdaptableConv2d {
    bias: Tensor,
    stride: usize,
    padding: usize,
    slot: Arc<AdapterSlot>,
}

impl AdaptableConv2d {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let bias = self.channel_bias()?;
        let weight = self.slot.weight()?;
        if !self.slot.has_active_adapters() {
            return frozen_conv2d(x, &weight, Some(&bias), self.padding, self.stride);
        }
        let y = frozen_conv2d(x, &weight, None, self.padding, self.stride)?;
        self.slot.add_adapters(x, y)?.broadcast_add(&bias)
    }

    /// This convolution applied to `silu(x)` (a resnet's convolutions). Without adapters the activated
    /// input is not kept for the backward pass ([`silu_conv2d`]); with them, their gradients need it.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        if self.slot.has_active_adapters() {
            return self.forward(&silu(x)?);
        }
        silu_conv2d(
            x,
            &self.slot.weight()?,
            &self.channel_bias()?,
            self.padding,
            self.stride,
        )
    }

    /// The bias as `[1, out, 1, 1]`, to broadcast over images.
    fn channel_bias(&self) -> Result<Tensor> {
        self.bias.reshape((1, self.bias.dims1()?, 1, 1))
    }

    /// The frozen kernel (a handle, not a copy).
    pub fn weight(&self) -> Result<Tensor> {
        self.slot.weight()
    }

    pub fn slot(&self) -> &Arc<AdapterSlot> {
        &self.slot
    }
}

/// A bias-free linear layer `fc` built from `weight` (`[out, in]`), and the registry that holds it.
#[cfg(test)]
pub(crate) fn one_linear_layer(weight: &Tensor) -> (LayerRegistry, AdaptableLinear) {
    let (out, inputs) = weight.dims2().expect("a [out, in] weight");
    let tensors = HashMap::from([("fc.weight".to_string(), weight.clone())]);
    let vb = VarBuilder::from_tensors(tensors, DType::F32, weight.device());
    let registry = LayerRegistry::default();
    let layer = LayerBuilder::new(vb, registry.clone())
        .pp("fc")
        .linear(inputs, out, false)
        .expect("a linear layer from its weight");
    (registry, layer)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::{DType, Device, Tensor, Var};

    use super::{AdaptableLinear, FrozenWeight, LoraAdapter, one_linear_layer};
    use crate::lora::AdapterKind;
    use crate::test_support::{probed_gradients, pseudo_random};

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn weights_stored_in_bf16_are_the_ones_the_layers_compute_with() {
        let device = Device::Cpu;
        // Values with more significant bits than bf16 keeps.
        let weight = Tensor::arange(0f32, 12.0, &device)
            .unwrap()
            .affine(0.377, -2.01)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let (registry, layer) = one_linear_layer(&weight);
        let x = Tensor::arange(0f32, 8.0, &device)
            .unwrap()
            .reshape((2, 4))
            .unwrap();
        let rounded = weight
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_ne!(values(&rounded), values(&weight), "the test rounds nothing");
        let with_rounded = values(&x.matmul(&rounded.t().unwrap()).unwrap());

        registry.store_weights_in(DType::BF16).unwrap();
        let slot = registry.get("fc").unwrap();
        assert_eq!(slot.weight().unwrap().dtype(), DType::BF16);
        assert_eq!(
            layer.weight().unwrap().dtype(),
            DType::BF16,
            "the layer reads its slot's weight"
        );
        let output = values(&layer.forward(&x).unwrap());
        let with_f32 = values(&x.matmul(&weight.t().unwrap()).unwrap());
        let largest_difference = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
        };
        assert!(largest_difference(&output, &with_rounded) < 1e-5);
        assert!(largest_difference(&with_f32, &with_rounded) > 1e-3);

        registry.store_weights_in(DType::F32).unwrap();
        assert_eq!(layer.weight().unwrap().dtype(), DType::F32);
        assert_eq!(
            values(&layer.weight().unwrap()),
            values(&rounded),
            "the values stay rounded"
        );
    }

    #[test]
    fn linear_weights_in_tile_order_compute_what_the_same_bf16_weights_compute() {
        let Some(_scope) = crate::kernels::Bf16Products::enter() else {
            return;
        };
        // 64 inputs: the adapter's product joins the frozen one's tiles; 48 outputs: a partial block.
        let weight = pseudo_random(&[48, 64], 0.1);
        let (tiled_registry, tiled_layer) = one_linear_layer(&weight);
        let (plain_registry, plain_layer) = one_linear_layer(&weight);
        plain_registry.store_weights_in(DType::F32).unwrap();
        plain_registry.store_weights_in(DType::BF16).unwrap();
        tiled_registry.tile_linear_weights().unwrap();
        let stored = |layer: &AdaptableLinear| layer.slot().frozen_weight();
        assert!(matches!(stored(&tiled_layer), FrozenWeight::Tiled(_)));
        assert!(matches!(stored(&plain_layer), FrozenWeight::Tensor(_)));
        assert_eq!(
            values(&tiled_layer.weight().unwrap().to_dtype(DType::F32).unwrap()),
            values(&plain_layer.weight().unwrap().to_dtype(DType::F32).unwrap()),
            "read back, the tiled weight is the bf16 one"
        );
        let x = pseudo_random(&[2, 7, 64], 0.2);
        let output_weights = pseudo_random(&[2, 7, 48], 0.3);
        let run = |layer: &AdaptableLinear, adapter: Option<&Arc<LoraAdapter>>| {
            if let Some(adapter) = adapter {
                layer.slot().attach(adapter.clone());
            }
            let x = Var::from_tensor(&x).unwrap();
            let y = layer.forward(x.as_tensor()).unwrap();
            let grads = probed_gradients(&y, &output_weights);
            let mut results = vec![values(&y), values(grads.get(&x).unwrap())];
            if let Some(adapter) = adapter {
                results.push(values(grads.get(adapter.down()).unwrap()));
                results.push(values(grads.get(adapter.up()).unwrap()));
                layer.slot().detach(adapter);
            }
            results
        };
        assert_eq!(run(&tiled_layer, None), run(&plain_layer, None));
        let lora = |seed| {
            let shape = *plain_layer.slot().shape();
            let (down, up) = (
                pseudo_random(&[4, 64], seed),
                pseudo_random(&[48, 4], seed + 0.1),
            );
            let (down, up) = (
                Var::from_tensor(&down).unwrap(),
                Var::from_tensor(&up).unwrap(),
            );
            let adapter = LoraAdapter::new(
                down.as_tensor().clone(),
                up.as_tensor().clone(),
                None,
                &shape,
            );
            Arc::new(adapter.unwrap())
        };
        let (tiled_lora, plain_lora) = (lora(0.4), lora(0.4));
        assert_eq!(
            run(&tiled_layer, Some(&tiled_lora)),
            run(&plain_layer, Some(&plain_lora))
        );
        tiled_registry.store_weights_in(DType::F32).unwrap();
        assert!(matches!(stored(&tiled_layer), FrozenWeight::Tensor(_)));
        assert_eq!(
            values(&tiled_layer.weight().unwrap()),
            values(&plain_layer.weight().unwrap().to_dtype(DType::F32).unwrap()),
            "stored as an f32 tensor again, the weight keeps its bf16 values"
        );
        tiled_registry.tile_linear_weights().unwrap();
        assert!(matches!(stored(&tiled_layer), FrozenWeight::Tiled(_)));
        let shape = *tiled_layer.slot().shape();
        let magnitude = pseudo_random(&[48], 0.5);
        let (down, up) = (pseudo_random(&[4, 64], 0.6), pseudo_random(&[48, 4], 0.7));
        let dora = LoraAdapter::with_kind(down, up, None, AdapterKind::Dora { magnitude }, &shape);
        tiled_layer.slot().attach(Arc::new(dora.unwrap()));
        assert!(
            matches!(stored(&tiled_layer), FrozenWeight::Tensor(_)),
            "DoRA reads the weight's values: it is stored as a tensor again"
        );
    }
}
