//! Compute kernels with their own backward passes, shared by every model: frozen linear and convolution
//! layers whose backward computes only the input gradient, memory-lean attention, normalisation (layer,
//! group and RMS), rotary position embeddings and activations, and the CPU fast paths behind them (im2col
//! and Winograd convolutions, tiled attention, vectorised norms, few-row products), whose matrix products
//! take bf16 operands (AMX tiles or AVX-512 BF16 dot products) inside a [`Bf16Products`] scope ([`amx`], [`products`]).
//!
//! Each op has a device-generic path built from candle ops (what CUDA and Metal run) and, for f32/f64 on
//! the CPU, the project's own kernels. [`cpu_kernels`] decides between them in one place, so the generic
//! paths can be forced on the CPU (`LORA_STUDIO_GENERIC_KERNELS=1`, or [`force_generic_paths`]) and tested
//! there. Knows nothing about adapters, models or training: must not use lora, models, train or worker.

mod activations;
mod add_into;
mod amx;
mod compute_threads;
mod cross_entropy;
mod fast_math;
mod feed_forward;
mod few_rows;
mod fill;
mod flash_attention;
mod frozen;
mod frozen_weight;
mod fused_attention;
mod fused_norm;
mod im2col;
mod low_rank;
mod norm_kernel;
mod products;
mod rms_norm;
mod rotary;
mod tied;
mod winograd;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;

pub use activations::{geglu, gelu, silu};
pub(crate) use add_into::{add_bias_into, add_into, add_term_into};
pub use compute_threads::{on_compute_threads, return_free_memory};
pub use cross_entropy::cross_entropy_sum;
pub use feed_forward::{AffineLayer, FusedFeedForward};
pub use frozen::{frozen_affine, frozen_conv2d, frozen_linear, geglu_affine, silu_conv2d};
pub use frozen_weight::FrozenWeight;
pub use fused_attention::fused_attention;
pub use fused_norm::{NormPath, NormalizedInput, normalize_affine, normalize_rows};
pub use low_rank::LowRank;
pub(crate) use low_rank::{
    AdapterState, adapted_affine, adapted_affine_gradients, adapter_gradients,
};
pub use products::{
    Bf16Products, bf16_products, bf16_products_available, bf16_products_engine, matmul,
    product_arithmetic,
};
pub use rms_norm::rms_norm;
pub use rotary::rotary_embedding;
pub(crate) use tied::{TiedBackward, tie};

/// The environment variable that, set to anything but `0`, makes the CPU take the device-generic paths.
pub const GENERIC_KERNELS_ENV: &str = "LORA_STUDIO_GENERIC_KERNELS";

/// Set by [`force_generic_paths`].
static GENERIC_FORCED: AtomicBool = AtomicBool::new(false);

/// The f32 slice of a contiguous CPU storage; `what` names the op in the error.
fn f32_rows<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle_core::bail!("{what}: expects contiguous f32 data"),
    }
}

/// Makes every op in this process take its device-generic path (candle ops), as on CUDA and Metal, also on
/// the CPU. For tests of those paths; there is no way back.
pub fn force_generic_paths() {
    GENERIC_FORCED.store(true, Ordering::Relaxed);
}

/// Whether the project's CPU kernels compute on `device`: on the CPU, unless the generic paths are forced.
pub fn cpu_kernels(device: &Device) -> bool {
    static FROM_ENV: OnceLock<bool> = OnceLock::new();
    let from_env = *FROM_ENV.get_or_init(|| {
        std::env::var_os(GENERIC_KERNELS_ENV).is_some_and(|v| !v.is_empty() && v != "0")
    });
    device.is_cpu() && !(from_env || GENERIC_FORCED.load(Ordering::Relaxed))
}
