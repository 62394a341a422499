//! Causal language models (Qwen2/Qwen2.5, Qwen3, Llama 3.x) for LoRA training and chat: their
//! configuration, weights from a Hugging Face folder, the forward pass with causal, padding and packing
//! masks, the key/value cache, the next-token loss, generation, and gradient checkpointing of the decoder
//! layers for training.
//!
//! Built like the image models, from adapter-capable layers and the kernels with their own backward passes
//! (RMS norm, rotary embedding, attention with `ops::softmax` under a mask), so LoRA gradients flow through
//! every projection. Tokenizers and chat templates are the `chat` room's; this module knows token ids only.
//! Must not use train, worker, cli or app.

mod attention;
mod batch;
mod cache;
mod config;
mod generate;
mod gguf_adapter;
mod layer;
mod loss;
mod merge;
mod model;
mod rope;

pub use batch::{PADDING_SEGMENT, PaddingSide, TEXT_SEGMENT, TokenBatch};
pub use cache::KvCache;
pub use config::{Architecture, CausalLmConfig, RopeScaling};
pub use generate::{GenerationSettings, Sampling, generate, generate_while, sample};
pub use gguf_adapter::{
    AdapterNames, gguf_adapter_tensors, llama_cpp_architecture, llama_cpp_tensor_name,
    write_gguf_adapter,
};
pub use loss::{IGNORE_INDEX, next_token_loss};
pub use merge::{MERGED_WEIGHTS_FILE, merge_into_folder};
pub use model::CausalLm;
