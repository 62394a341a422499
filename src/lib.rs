//! lora-studio: train LoRA style adapters for Stable Diffusion on your own images, preview them at any
//! strength, and export `.safetensors` files that AUTOMATIC1111, Forge and ComfyUI load.
//!
//! The engine (models, adapters, file formats) is a library; the `lora-studio` binary drives it from the
//! command line ([`cli`]) or from the desktop app (`app`, behind the `gui` feature).

#[cfg(feature = "gui")]
pub mod app;
pub mod atomic_file;
pub mod build_info;
pub mod chat;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod discovery;
pub mod flops;
pub mod hashing;
pub mod hub;
pub mod kernels;
pub mod label;
pub mod lora;
pub mod messages;
pub mod models;
pub mod tensor_file;
#[cfg(test)]
mod test_support;
pub mod train;
pub mod worker;
