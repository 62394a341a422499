//! The arithmetic of a training run on the CPU with `mixed_precision = "bf16"`: matrix products on bf16
//! operands (summed in f32) on processors with AMX or AVX-512 BF16, and the frozen weights stored in bf16
//! for the run — half the memory, and half the bytes each product reads — as PyTorch's bf16 training
//! casts them.
//! Activations, gradients, adapters and the optimizer stay f32.

use candle_core::{DType, Device};

use super::TrainError;
use super::report::TrainReporter;
use crate::config::MixedPrecision;
use crate::kernels::Bf16Products;
use crate::lora::LayerRegistry;

/// A run's bf16 products: while alive, the calling thread's products are bf16 ones and the layers of its
/// registries hold their frozen weights in bf16; dropping it stores them in f32 again (their values stay
/// rounded to bf16: a model kept after the run renders with the weights it trained with).
#[must_use = "the products and weights return to f32 when this is dropped"]
pub(super) struct CpuBf16Run {
    layers: Vec<LayerRegistry>,
    _products: Bf16Products,
}

impl Drop for CpuBf16Run {
    fn drop(&mut self) {
        for registry in &self.layers {
            // Widening bf16 to f32 is exact and cannot fail on the CPU but for memory, which aborts.
            let _ = registry.store_weights_in(DType::F32);
        }
    }
}

/// Enters bf16 products for a run on `device` at `precision` where they apply (the CPU with bf16 asked for,
/// on a processor with bf16 products), storing the frozen weights of `layers` in bf16; said once in the
/// log, as is why a processor without them computes in f32.
pub(super) fn cpu_products(
    device: &Device,
    precision: MixedPrecision,
    layers: Vec<LayerRegistry>,
    reporter: &mut dyn TrainReporter,
) -> Result<Option<CpuBf16Run>, TrainError> {
    if !device.is_cpu() || precision != MixedPrecision::Bf16 {
        return Ok(None);
    }
    let Some(products) = Bf16Products::enter() else {
        reporter.message(
            "mixed precision bf16 on the CPU needs AMX (Intel Xeon 4th generation or later) or AVX-512 \
             BF16 (AMD Zen 4 or later), which this processor lacks: the run computes in f32",
        );
        return Ok(None);
    };
    let run = CpuBf16Run {
        layers,
        _products: products,
    };
    for registry in &run.layers {
        // A model loaded for this run holds them so already; one kept from before converts here.
        registry
            .store_weights_in(DType::BF16)
            .and_then(|()| registry.tile_linear_weights())
            .map_err(|e| {
                TrainError::Internal(format!("cannot store the frozen weights in bf16: {e}"))
            })?;
    }
    let engine = crate::kernels::bf16_products_engine().unwrap_or("bf16 products");
    reporter.message(&format!(
        "mixed precision bf16 on the CPU: the frozen weights are stored in bf16 and matrix products take \
         bf16 operands summed in f32 ({engine}); activations, gradients, adapters and the optimizer stay \
         f32",
    ));
    Ok(Some(run))
}

/// The scope to load a run's model in, for a run on `device` at `precision` that will take bf16 products:
/// built inside it, the adapter-capable layers load their frozen weights straight into bf16, so the model
/// is never in memory in f32 ([`crate::lora::LayerBuilder`]).
pub(super) fn loading_scope(device: &Device, precision: MixedPrecision) -> Option<Bf16Products> {
    if device.is_cpu() && precision == MixedPrecision::Bf16 {
        Bf16Products::enter()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;

    use super::{cpu_products, loading_scope};
    use crate::config::MixedPrecision;
    use crate::lora::one_linear_layer;
    use crate::lora::{LayerBuilder, LayerRegistry};
    use crate::train::report::SilentReporter;

    #[test]
    fn a_bf16_run_holds_the_frozen_weights_in_bf16_until_it_ends() {
        let device = Device::Cpu;
        let weight = Tensor::ones((3, 4), DType::F32, &device).unwrap();
        let (layers, layer) = one_linear_layer(&weight);
        let reporter = &mut SilentReporter;
        let f32_run = cpu_products(&device, MixedPrecision::No, vec![layers.clone()], reporter);
        assert!(
            f32_run.unwrap().is_none(),
            "only bf16 asks for bf16 products"
        );
        assert_eq!(layer.weight().unwrap().dtype(), DType::F32);

        let run = cpu_products(
            &device,
            MixedPrecision::Bf16,
            vec![layers.clone()],
            reporter,
        )
        .unwrap();
        let expected = if crate::kernels::bf16_products() {
            DType::BF16
        } else {
            assert!(
                run.is_none(),
                "without bf16 products the run computes in f32"
            );
            DType::F32
        };
        assert_eq!(layer.weight().unwrap().dtype(), expected);
        drop(run);
        assert_eq!(layer.weight().unwrap().dtype(), DType::F32);
        assert!(!crate::kernels::bf16_products());
    }

    #[test]
    fn a_model_loaded_for_a_bf16_run_holds_its_frozen_weights_in_bf16_from_the_start() {
        let device = Device::Cpu;
        let tensors = HashMap::from([
            (
                "fc.weight".to_string(),
                Tensor::ones((3, 4), DType::F16, &device).unwrap(),
            ),
            (
                "fc.bias".to_string(),
                Tensor::ones(3, DType::F16, &device).unwrap(),
            ),
        ]);
        let build = || {
            let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &device);
            LayerBuilder::new(vb, LayerRegistry::default())
                .pp("fc")
                .linear(4, 3, true)
                .unwrap()
        };
        assert_eq!(build().weight().unwrap().dtype(), DType::F32);
        assert!(loading_scope(&device, MixedPrecision::No).is_none());
        let scope = loading_scope(&device, MixedPrecision::Bf16);
        let expected = if scope.is_some() {
            DType::BF16
        } else {
            DType::F32
        };
        let layer = build();
        assert_eq!(
            layer.weight().unwrap().dtype(),
            expected,
            "the weight is stored as the products read it"
        );
        let x = Tensor::ones((2, 4), DType::F32, &device).unwrap();
        let output = layer.forward(&x).unwrap();
        assert_eq!(
            output.dtype(),
            DType::F32,
            "the bias and the output stay f32"
        );
        assert_eq!(
            output.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![5.0; 6]
        );
    }
}
