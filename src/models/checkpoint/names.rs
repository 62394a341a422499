//! Tensor-name maps between the diffusers layout (what the models ask for) and the original LDM/sgm
//! single-file layout (`model.diffusion_model.*`, `first_stage_model.*`, OpenCLIP's `cond_stage_model.model.*`,
//! SDXL's `conditioner.embedders.{0,1}.*`).
//!
//! Each function takes a diffusers parameter name and returns the stored key, or `None` when the name has no
//! counterpart in that layout.

/// Prefix of the UNet in single-file checkpoints.
pub const LDM_UNET: &str = "model.diffusion_model.";
/// Prefix of the VAE in single-file checkpoints.
pub const LDM_VAE: &str = "first_stage_model.";
/// Prefix of SD1's (transformers-layout) CLIP text encoder in single-file checkpoints.
pub const LDM_CLIP: &str = "cond_stage_model.transformer.";
/// Prefix of SD2's OpenCLIP text encoder in single-file checkpoints.
pub const LDM_OPEN_CLIP: &str = "cond_stage_model.model.";
/// Prefix of SDXL's first text encoder (CLIP ViT-L, transformers names) in single-file checkpoints.
pub const SDXL_CLIP_L: &str = "conditioner.embedders.0.transformer.";
/// Prefix of SDXL's second text encoder (OpenCLIP ViT-bigG) in single-file checkpoints.
pub const SDXL_OPEN_CLIP: &str = "conditioner.embedders.1.model.";

/// A stored key, plus the rows of it that hold the requested tensor when several are packed together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredName {
    pub key: String,
    /// `(start, len)` along dimension 0.
    pub rows: Option<(usize, usize)>,
    /// The stored matrix is the transpose of the requested one (OpenCLIP's `text_projection`, kept for
    /// `x @ W`, is a Linear weight's transpose).
    pub transposed: bool,
}

impl StoredName {
    pub fn whole(key: String) -> Self {
        Self {
            key,
            rows: None,
            transposed: false,
        }
    }
}

fn join(base: String, rest: &[&str]) -> String {
    if rest.is_empty() {
        base
    } else {
        format!("{base}.{}", rest.join("."))
    }
}

fn index(s: &str) -> Option<usize> {
    s.parse().ok()
}

/// diffusers `ResnetBlock2D` child names to the LDM `ResBlock` ones.
fn unet_resnet(rest: &[&str]) -> Option<String> {
    let (first, tail) = rest.split_first()?;
    let mapped = match *first {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    };
    Some(join(mapped.to_string(), tail))
}

/// Maps a UNet parameter name to its single-file key (without the `model.diffusion_model.` prefix).
///
/// `up_attention[i]` tells whether up block `i` has attention, which moves its upsampler from slot 1 to 2.
pub fn unet_to_ldm(name: &str, layers_per_block: usize, up_attention: &[bool]) -> Option<String> {
    let parts: Vec<&str> = name.split('.').collect();
    let per_level = layers_per_block + 1;
    let mapped = match parts.as_slice() {
        ["conv_in", rest @ ..] => join("input_blocks.0.0".to_string(), rest),
        ["time_embedding", "linear_1", rest @ ..] => join("time_embed.0".to_string(), rest),
        ["time_embedding", "linear_2", rest @ ..] => join("time_embed.2".to_string(), rest),
        ["add_embedding", "linear_1", rest @ ..] => join("label_emb.0.0".to_string(), rest),
        ["add_embedding", "linear_2", rest @ ..] => join("label_emb.0.2".to_string(), rest),
        ["conv_norm_out", rest @ ..] => join("out.0".to_string(), rest),
        ["conv_out", rest @ ..] => join("out.2".to_string(), rest),
        ["down_blocks", level, "resnets", j, rest @ ..] => {
            let block = 1 + index(level)? * per_level + index(j)?;
            format!("input_blocks.{block}.0.{}", unet_resnet(rest)?)
        }
        ["down_blocks", level, "attentions", j, rest @ ..] => {
            let block = 1 + index(level)? * per_level + index(j)?;
            join(format!("input_blocks.{block}.1"), rest)
        }
        ["down_blocks", level, "downsamplers", "0", "conv", rest @ ..] => join(
            format!("input_blocks.{}.0.op", (index(level)? + 1) * per_level),
            rest,
        ),
        ["mid_block", "resnets", j, rest @ ..] => {
            format!("middle_block.{}.{}", 2 * index(j)?, unet_resnet(rest)?)
        }
        ["mid_block", "attentions", "0", rest @ ..] => join("middle_block.1".to_string(), rest),
        ["up_blocks", level, "resnets", j, rest @ ..] => {
            let block = index(level)? * per_level + index(j)?;
            format!("output_blocks.{block}.0.{}", unet_resnet(rest)?)
        }
        ["up_blocks", level, "attentions", j, rest @ ..] => {
            let block = index(level)? * per_level + index(j)?;
            join(format!("output_blocks.{block}.1"), rest)
        }
        ["up_blocks", level, "upsamplers", "0", "conv", rest @ ..] => {
            let level = index(level)?;
            let block = level * per_level + layers_per_block;
            let slot = if *up_attention.get(level)? { 2 } else { 1 };
            join(format!("output_blocks.{block}.{slot}.conv"), rest)
        }
        _ => return None,
    };
    Some(mapped)
}

/// diffusers VAE resnet children to the LDM names (`conv_shortcut` is `nin_shortcut` there).
fn vae_resnet(rest: &[&str]) -> Option<String> {
    let (first, tail) = rest.split_first()?;
    let mapped = match *first {
        "norm1" | "conv1" | "norm2" | "conv2" => *first,
        "conv_shortcut" => "nin_shortcut",
        _ => return None,
    };
    Some(join(mapped.to_string(), tail))
}

/// diffusers VAE mid block children (`resnets.0`, `attentions.0.to_q`, ...) to the LDM `mid.*` names.
fn vae_mid(rest: &[&str]) -> Option<String> {
    let mapped = match rest {
        ["resnets", j, tail @ ..] => format!("block_{}.{}", index(j)? + 1, vae_resnet(tail)?),
        ["attentions", "0", child @ .., param] => {
            let child = match child {
                ["group_norm"] => "norm",
                ["to_q"] => "q",
                ["to_k"] => "k",
                ["to_v"] => "v",
                ["to_out", "0"] => "proj_out",
                _ => return None,
            };
            format!("attn_1.{child}.{param}")
        }
        _ => return None,
    };
    Some(format!("mid.{mapped}"))
}

/// Maps a VAE parameter name to its single-file key (without `first_stage_model.`). The decoder's levels are
/// stored in reverse order, so the level count is needed.
pub fn vae_to_ldm(name: &str, levels: usize) -> Option<String> {
    let parts: Vec<&str> = name.split('.').collect();
    let mapped = match parts.as_slice() {
        [coder @ ("encoder" | "decoder"), "conv_in", rest @ ..] => {
            join(format!("{coder}.conv_in"), rest)
        }
        [coder @ ("encoder" | "decoder"), "conv_out", rest @ ..] => {
            join(format!("{coder}.conv_out"), rest)
        }
        [coder @ ("encoder" | "decoder"), "conv_norm_out", rest @ ..] => {
            join(format!("{coder}.norm_out"), rest)
        }
        [coder @ ("encoder" | "decoder"), "mid_block", rest @ ..] => {
            format!("{coder}.{}", vae_mid(rest)?)
        }
        ["encoder", "down_blocks", level, "resnets", j, rest @ ..] => {
            format!("encoder.down.{level}.block.{j}.{}", vae_resnet(rest)?)
        }
        [
            "encoder",
            "down_blocks",
            level,
            "downsamplers",
            "0",
            "conv",
            rest @ ..,
        ] => join(format!("encoder.down.{level}.downsample.conv"), rest),
        ["decoder", "up_blocks", level, "resnets", j, rest @ ..] => {
            let stored = levels.checked_sub(1 + index(level)?)?;
            format!("decoder.up.{stored}.block.{j}.{}", vae_resnet(rest)?)
        }
        [
            "decoder",
            "up_blocks",
            level,
            "upsamplers",
            "0",
            "conv",
            rest @ ..,
        ] => {
            let stored = levels.checked_sub(1 + index(level)?)?;
            join(format!("decoder.up.{stored}.upsample.conv"), rest)
        }
        [conv @ ("quant_conv" | "post_quant_conv"), rest @ ..] => join(conv.to_string(), rest),
        _ => return None,
    };
    Some(mapped)
}

/// Maps a transformers-layout CLIP text parameter (`text_model.encoder.layers.0.self_attn.q_proj.weight`) to
/// the OpenCLIP key (without its prefix); q/k/v are row blocks of the packed `in_proj`, and the projection of
/// `CLIPTextModelWithProjection` (`text_projection.weight`) is the transpose of OpenCLIP's `text_projection`.
pub fn clip_to_open_clip(name: &str, hidden: usize) -> Option<StoredName> {
    let parts: Vec<&str> = name.split('.').collect();
    let whole = |key: String| Some(StoredName::whole(key));
    match parts.as_slice() {
        ["text_model", "embeddings", "token_embedding", "weight"] => {
            whole("token_embedding.weight".into())
        }
        ["text_model", "embeddings", "position_embedding", "weight"] => {
            whole("positional_embedding".into())
        }
        ["text_model", "final_layer_norm", param] => whole(format!("ln_final.{param}")),
        ["text_projection", "weight"] => Some(StoredName {
            transposed: true,
            ..StoredName::whole("text_projection".into())
        }),
        ["text_model", "encoder", "layers", layer, rest @ ..] => {
            let base = format!("transformer.resblocks.{layer}");
            match rest {
                ["layer_norm1", param] => whole(format!("{base}.ln_1.{param}")),
                ["layer_norm2", param] => whole(format!("{base}.ln_2.{param}")),
                ["mlp", "fc1", param] => whole(format!("{base}.mlp.c_fc.{param}")),
                ["mlp", "fc2", param] => whole(format!("{base}.mlp.c_proj.{param}")),
                ["self_attn", "out_proj", param] => whole(format!("{base}.attn.out_proj.{param}")),
                ["self_attn", projection, param] => {
                    let block = match *projection {
                        "q_proj" => 0,
                        "k_proj" => 1,
                        "v_proj" => 2,
                        _ => return None,
                    };
                    Some(StoredName {
                        rows: Some((block * hidden, hidden)),
                        ..StoredName::whole(format!("{base}.attn.in_proj_{param}"))
                    })
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Older diffusers VAE folders name the attention layers `query`/`key`/`value`/`proj_attn`.
pub fn vae_legacy_attention_name(name: &str) -> Option<String> {
    const RENAMES: [(&str, &str); 4] = [
        (".to_q.", ".query."),
        (".to_k.", ".key."),
        (".to_v.", ".value."),
        (".to_out.0.", ".proj_attn."),
    ];
    RENAMES
        .iter()
        .find(|(new, _)| name.contains(new))
        .map(|(new, old)| name.replace(new, old))
}
