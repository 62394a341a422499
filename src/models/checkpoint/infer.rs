//! Architecture inference for single-file checkpoints, from their tensor names and shapes alone.
//!
//! Everything but the attention head count (and, for SDXL, the width of the size embeddings, read from what
//! is left of the added embedding's input) is in the shapes. Heads follow the standard rules: SD1-style
//! UNets (1x1-conv projections) use 8 heads, SD2-style and SDXL (linear projections) 64-dimensional heads;
//! CLIP text encoders use 64-dimensional heads. A sidecar config beside the file overrides all of this.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::backend::TensorFiles;
use super::names::{LDM_CLIP, LDM_OPEN_CLIP, LDM_UNET, LDM_VAE, SDXL_CLIP_L, SDXL_OPEN_CLIP};
use crate::models::ModelError;
use crate::models::clip::{ClipActivation, ClipTextConfig, TextEncoder2Config};
use crate::models::unet::{TextTimeEmbedding, UNetConfig};
use crate::models::vae::VaeConfig;

/// The text encoder layout found in a single file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoderLayout {
    /// transformers CLIP names under `cond_stage_model.transformer.` (SD1).
    Clip,
    /// OpenCLIP names under `cond_stage_model.model.` (SD2).
    OpenClip,
}

/// Tensor names and shapes, from a checkpoint's header or from a listing.
pub trait KeyShapes {
    fn shape_of(&self, key: &str) -> Option<&[usize]>;
    fn key_names(&self) -> Box<dyn Iterator<Item = &str> + '_>;
    /// The file the shapes come from, for messages.
    fn source_path(&self) -> PathBuf;
}

impl KeyShapes for TensorFiles {
    fn shape_of(&self, key: &str) -> Option<&[usize]> {
        self.shape(key)
    }

    fn key_names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        Box::new(self.keys().map(String::as_str))
    }

    fn source_path(&self) -> PathBuf {
        self.display_path()
    }
}

impl KeyShapes for BTreeMap<String, Vec<usize>> {
    fn shape_of(&self, key: &str) -> Option<&[usize]> {
        self.get(key).map(Vec::as_slice)
    }

    fn key_names(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        Box::new(self.keys().map(String::as_str))
    }

    fn source_path(&self) -> PathBuf {
        PathBuf::from("<tensor listing>")
    }
}

struct Shapes<'a> {
    files: &'a dyn KeyShapes,
    component: &'static str,
}

impl Shapes<'_> {
    fn get(&self, key: &str) -> Result<&[usize], ModelError> {
        self.files
            .shape_of(key)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.files.source_path(),
                tensor: key.to_string(),
                component: self.component.to_string(),
            })
    }

    fn dim(&self, key: &str, index: usize) -> Result<usize, ModelError> {
        let shape = self.get(key)?;
        shape.get(index).copied().ok_or_else(|| {
            ModelError::Config(format!(
                "{}: tensor `{key}` has shape {shape:?}, which is not what a {} has",
                self.files.source_path().display(),
                self.component
            ))
        })
    }

    fn has(&self, key: &str) -> bool {
        self.files.shape_of(key).is_some()
    }

    /// How many consecutive `prefix{i}suffix` keys exist, from 0.
    fn count(&self, prefix: &str, suffix: &str) -> usize {
        (0..)
            .take_while(|i| self.has(&format!("{prefix}{i}{suffix}")))
            .count()
    }
}

/// Infers the UNet architecture of a single-file checkpoint.
pub fn infer_unet(files: &dyn KeyShapes) -> Result<UNetConfig, ModelError> {
    let s = Shapes {
        files,
        component: "UNet",
    };
    let key = |k: &str| format!("{LDM_UNET}{k}");
    let in_channels = s.dim(&key("input_blocks.0.0.weight"), 1)?;
    let out_channels = s.dim(&key("out.2.weight"), 0)?;
    let block_prefix = key("input_blocks.");
    let input_blocks = files
        .key_names()
        .filter_map(|k| {
            k.strip_prefix(&block_prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |last| last + 1);
    // The first downsampler sits right after the first level's resnets.
    let layers_per_block = (1..input_blocks)
        .find(|i| s.has(&key(&format!("input_blocks.{i}.0.op.weight"))))
        .map(|i| i - 1)
        .unwrap_or(input_blocks.saturating_sub(1));
    if layers_per_block == 0 {
        return Err(ModelError::Config(format!(
            "{}: the UNet's input blocks do not follow the Stable Diffusion layout",
            files.source_path().display()
        )));
    }
    let levels = input_blocks / (layers_per_block + 1);
    let mut block_out_channels = Vec::with_capacity(levels);
    let mut down_attention = Vec::with_capacity(levels);
    let mut depth = Vec::with_capacity(levels);
    for level in 0..levels {
        let block = 1 + level * (layers_per_block + 1);
        block_out_channels.push(s.dim(
            &key(&format!("input_blocks.{block}.0.out_layers.3.weight")),
            0,
        )?);
        let attention = key(&format!("input_blocks.{block}.1."));
        let has_attention = s.has(&format!("{attention}proj_in.weight"));
        down_attention.push(has_attention);
        depth.push(if has_attention {
            s.count(
                &format!("{attention}transformer_blocks."),
                ".attn1.to_q.weight",
            )
        } else {
            1
        });
    }
    let up_attention: Vec<bool> = (0..levels)
        .map(|i| {
            s.has(&key(&format!(
                "output_blocks.{}.1.proj_in.weight",
                i * (layers_per_block + 1)
            )))
        })
        .collect();
    let first_attention = (0..levels)
        .find(|&l| down_attention[l])
        .map(|l| {
            key(&format!(
                "input_blocks.{}.1.",
                1 + l * (layers_per_block + 1)
            ))
        })
        .unwrap_or_else(|| key("middle_block.1."));
    let use_linear_projection = s.get(&format!("{first_attention}proj_in.weight"))?.len() == 2;
    let cross_attention_dim = s.dim(
        &format!("{first_attention}transformer_blocks.0.attn2.to_k.weight"),
        1,
    )?;
    let attention_heads = block_out_channels
        .iter()
        .map(|&c| {
            if use_linear_projection {
                (c / 64).max(1)
            } else {
                8
            }
        })
        .collect();
    // SDXL: the pooled text embedding (text encoder 2's projection width) then six size embeddings.
    let label_emb = key("label_emb.0.0.weight");
    let addition = if s.has(&label_emb) {
        let input_dim = s.dim(&label_emb, 1)?;
        let pooled = files
            .shape_of(&format!("{SDXL_OPEN_CLIP}text_projection"))
            .and_then(|shape| shape.get(1).copied())
            .unwrap_or(TextEncoder2Config::sdxl().projection_dim);
        Some(TextTimeEmbedding {
            time_embed_dim: input_dim.saturating_sub(pooled) / TextTimeEmbedding::TIME_IDS,
            input_dim,
        })
    } else {
        None
    };
    let config = UNetConfig {
        in_channels,
        out_channels,
        block_out_channels,
        down_attention,
        up_attention,
        layers_per_block,
        transformer_layers_per_block: depth,
        attention_heads,
        cross_attention_dim,
        use_linear_projection,
        norm_num_groups: 32,
        norm_eps: 1e-5,
        sample_size: match (addition, use_linear_projection) {
            (Some(_), _) => 128,
            (None, true) => 96,
            (None, false) => 64,
        },
        addition,
    };
    config.validate()?;
    Ok(config)
}

/// Infers the VAE architecture of a single-file checkpoint (with SD1/SD2's scaling factor; the shapes do not
/// tell SDXL's apart).
pub fn infer_vae(files: &dyn KeyShapes) -> Result<VaeConfig, ModelError> {
    let s = Shapes {
        files,
        component: "VAE",
    };
    let key = |k: &str| format!("{LDM_VAE}{k}");
    let levels = s.count(&key("encoder.down."), ".block.0.conv1.weight");
    if levels == 0 {
        s.get(&key("encoder.down.0.block.0.conv1.weight"))?;
    }
    let block_out_channels = (0..levels)
        .map(|i| s.dim(&key(&format!("encoder.down.{i}.block.0.conv2.weight")), 0))
        .collect::<Result<Vec<_>, _>>()?;
    let config = VaeConfig {
        in_channels: s.dim(&key("encoder.conv_in.weight"), 1)?,
        out_channels: s.dim(&key("decoder.conv_out.weight"), 0)?,
        block_out_channels,
        layers_per_block: s.count(&key("encoder.down.0.block."), ".conv1.weight"),
        latent_channels: s.dim(&key("post_quant_conv.weight"), 0)?,
        norm_num_groups: 32,
        scaling_factor: 0.18215,
        force_upcast: true,
    };
    config.validate()?;
    Ok(config)
}

/// Finds which text encoder layout a single file uses.
pub fn text_encoder_layout(files: &dyn KeyShapes) -> Option<TextEncoderLayout> {
    if files.key_names().any(|k| k.starts_with(LDM_OPEN_CLIP)) {
        Some(TextEncoderLayout::OpenClip)
    } else if files.key_names().any(|k| k.starts_with(LDM_CLIP)) {
        Some(TextEncoderLayout::Clip)
    } else {
        None
    }
}

/// Infers the text encoder of an SD1/SD2 single file; OpenCLIP encoders are used up to their penultimate
/// layer.
pub fn infer_text_encoder(
    files: &dyn KeyShapes,
    layout: TextEncoderLayout,
) -> Result<ClipTextConfig, ModelError> {
    let s = Shapes {
        files,
        component: "text encoder",
    };
    match layout {
        TextEncoderLayout::Clip => infer_clip(&s, LDM_CLIP),
        TextEncoderLayout::OpenClip => {
            let mut config = infer_open_clip(&s, LDM_OPEN_CLIP)?;
            config.num_hidden_layers = config.num_hidden_layers.saturating_sub(1).max(1);
            Ok(config)
        }
    }
}

/// Infers SDXL's two text encoders: CLIP ViT-L under `conditioner.embedders.0.transformer.` and OpenCLIP
/// ViT-bigG under `conditioner.embedders.1.model.` (all its layers, and its projection).
pub fn infer_sdxl_text_encoders(
    files: &dyn KeyShapes,
) -> Result<(ClipTextConfig, TextEncoder2Config), ModelError> {
    let first = infer_clip(
        &Shapes {
            files,
            component: "text encoder",
        },
        SDXL_CLIP_L,
    )?;
    let s = Shapes {
        files,
        component: "text encoder 2",
    };
    let second = TextEncoder2Config {
        text: infer_open_clip(&s, SDXL_OPEN_CLIP)?,
        projection_dim: s.dim(&format!("{SDXL_OPEN_CLIP}text_projection"), 1)?,
    };
    Ok((first, second))
}

/// A CLIP text encoder in transformers names under `prefix` (with or without the `text_model.` level).
fn infer_clip(s: &Shapes, prefix: &str) -> Result<ClipTextConfig, ModelError> {
    let prefix = if s.has(&format!(
        "{prefix}text_model.embeddings.token_embedding.weight"
    )) {
        format!("{prefix}text_model.")
    } else {
        prefix.to_string()
    };
    let token = s.get(&format!("{prefix}embeddings.token_embedding.weight"))?;
    let (vocab_size, hidden_size) = (token[0], token.get(1).copied().unwrap_or(0));
    Ok(ClipTextConfig {
        vocab_size,
        hidden_size,
        intermediate_size: s.dim(&format!("{prefix}encoder.layers.0.mlp.fc1.weight"), 0)?,
        num_hidden_layers: s.count(&format!("{prefix}encoder.layers."), ".mlp.fc1.weight"),
        num_attention_heads: (hidden_size / 64).max(1),
        max_position_embeddings: s
            .dim(&format!("{prefix}embeddings.position_embedding.weight"), 0)?,
        hidden_act: ClipActivation::QuickGelu,
        layer_norm_eps: 1e-5,
    })
}

/// An OpenCLIP text tower under `prefix`, with all its layers.
fn infer_open_clip(s: &Shapes, prefix: &str) -> Result<ClipTextConfig, ModelError> {
    let token = s.get(&format!("{prefix}token_embedding.weight"))?;
    let (vocab_size, hidden_size) = (token[0], token.get(1).copied().unwrap_or(0));
    Ok(ClipTextConfig {
        vocab_size,
        hidden_size,
        intermediate_size: s.dim(
            &format!("{prefix}transformer.resblocks.0.mlp.c_fc.weight"),
            0,
        )?,
        num_hidden_layers: s
            .count(
                &format!("{prefix}transformer.resblocks."),
                ".mlp.c_fc.weight",
            )
            .max(1),
        num_attention_heads: (hidden_size / 64).max(1),
        max_position_embeddings: s.dim(&format!("{prefix}positional_embedding"), 0)?,
        hidden_act: ClipActivation::Gelu,
        layer_norm_eps: 1e-5,
    })
}
