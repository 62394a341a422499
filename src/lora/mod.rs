//! Low-rank adapters beside frozen layers: the adapter-capable Linear/Conv2d layers every model is built
//! from, the LoRA math, and the file formats (kohya files, PEFT adapter folders).
//!
//! Model-agnostic by design: layers are named by module paths, so the same code serves Stable Diffusion's
//! UNet and text encoders today and other model families later. Must not use egui, train or worker.

mod adapter;
mod attach;
mod error;
mod export;
mod fused_lora;
mod kohya;
mod layer;
mod network;
mod peft;
pub mod svd;

pub use adapter::{AdapterKind, LoraAdapter, adapter_dims, row_norm};
pub use attach::{AttachReport, StoredModule};
pub use error::LoraError;
pub use export::{
    ExportedLora, ExportedModule, NetworkDims, RankAlpha, export_network, most_common,
    write_lora_file,
};
pub use kohya::{
    KohyaLora, TEXT_ENCODER_1_PREFIX, TEXT_ENCODER_2_PREFIX, TEXT_ENCODER_PREFIX, UNET_PREFIX,
    kohya_name,
};
#[cfg(test)]
pub(crate) use layer::one_linear_layer;
pub use layer::{
    AdaptableConv2d, AdaptableLinear, AdapterSlot, AffineParts, LayerBuilder, LayerRegistry,
    LayerShape,
};
pub use network::{
    LoraNetwork, NetworkKind, NetworkModule, NetworkSpec, Rendering, TargetComponent,
};
pub use peft::{
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PeftAdapter, PeftConfig, PeftExport, PeftTensor,
    TargetModules, adapter_weights_file, split_tensor_name, write_peft_adapter,
};
