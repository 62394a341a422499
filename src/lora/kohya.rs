//! The kohya LoRA file format, the one AUTOMATIC1111, Forge, ComfyUI and diffusers all read.
//!
//! A module is named `PREFIX_` + its module path with every `.` turned into `_` and holds `.lora_down.weight`,
//! `.lora_up.weight` and a 0-dim `.alpha`; its scale is alpha / rank. The path is the diffusers one for SD1/SD2
//! (`lora_unet_down_blocks_0_attentions_0_proj_in`, `lora_te_text_model_encoder_layers_0_mlp_fc1`) and the
//! original (sgm) one for SDXL's UNet (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), whose
//! text encoders are `lora_te1` and `lora_te2`. Names are matched by computing them from the model's layer
//! registry, never by parsing underscores back into dots.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::attach::{AttachReport, StoredModule, attach_modules};
use super::error::LoraError;
use super::layer::{AdapterSlot, LayerRegistry};
use crate::tensor_file::TensorFile;

/// The kohya prefix of the UNet's modules.
pub const UNET_PREFIX: &str = "lora_unet";
/// The kohya prefix of the text encoder's modules (SD1/SD2; some tools also write it for SDXL's first).
pub const TEXT_ENCODER_PREFIX: &str = "lora_te";
/// The kohya prefix of SDXL's first text encoder (CLIP ViT-L).
pub const TEXT_ENCODER_1_PREFIX: &str = "lora_te1";
/// The kohya prefix of SDXL's second text encoder (OpenCLIP ViT-bigG).
pub const TEXT_ENCODER_2_PREFIX: &str = "lora_te2";

/// The kind of model a LoRA file is made for, as far as its kohya names and metadata tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoraFamily {
    /// SD1 or SD2 (`lora_te_`, diffusers UNet paths).
    Sd,
    /// SDXL (`lora_te1_`/`lora_te2_`, original UNet paths, `ss_base_model_version = sdxl_…`).
    Sdxl,
}

impl LoraFamily {
    fn label(self) -> &'static str {
        match self {
            LoraFamily::Sd => "SD1/SD2",
            LoraFamily::Sdxl => "SDXL",
        }
    }

    /// The family of the model whose components (kohya prefix, registry) are given, if they tell.
    fn of_components(components: &[(&str, &LayerRegistry)]) -> Option<Self> {
        let has = |wanted: &str| components.iter().any(|(prefix, _)| *prefix == wanted);
        if has(TEXT_ENCODER_2_PREFIX) {
            Some(LoraFamily::Sdxl)
        } else if has(TEXT_ENCODER_PREFIX) {
            Some(LoraFamily::Sd)
        } else {
            None
        }
    }
}

/// A module's tensors while a file is being read.
#[derive(Default)]
struct PartialModule {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f64>,
}

/// A kohya LoRA file read into memory.
#[derive(Debug)]
pub struct KohyaLora {
    path: PathBuf,
    metadata: BTreeMap<String, String>,
    modules: BTreeMap<String, StoredModule>,
}

impl KohyaLora {
    /// Reads a kohya LoRA file.
    pub fn load(path: &Path, device: &Device) -> Result<Self, LoraError> {
        let file = TensorFile::open(path)?;
        let not_kohya = |reason: String| LoraError::NotKohya {
            path: path.to_path_buf(),
            reason,
        };
        let mut parts: BTreeMap<String, PartialModule> = BTreeMap::new();
        for name in file.infos().keys() {
            if name.contains(".lora_A.") || name.contains(".lora_B.") {
                return Err(not_kohya(format!(
                    "tensor `{name}` uses the diffusers/PEFT naming (lora_A/lora_B); convert it to the kohya format"
                )));
            }
            let Some((module, suffix)) = name.split_once('.') else {
                return Err(not_kohya(format!("tensor `{name}` has no module suffix")));
            };
            let entry = parts.entry(module.to_string()).or_default();
            match suffix {
                "lora_down.weight" => entry.down = Some(file.load(name, device)?),
                "lora_up.weight" => entry.up = Some(file.load(name, device)?),
                "alpha" => {
                    let alpha = file.load(name, device)?;
                    let value = alpha
                        .to_dtype(DType::F64)
                        .and_then(|a| a.flatten_all())
                        .and_then(|a| a.to_vec1::<f64>())
                        .map_err(|source| LoraError::Tensor {
                            path: path.to_path_buf(),
                            source,
                        })?;
                    entry.alpha = value.first().copied();
                }
                // DoRA magnitudes are read three different ways by the three UIs; refuse rather than guess.
                "dora_scale" => {
                    return Err(not_kohya(format!(
                        "module `{module}` is a DoRA module (dora_scale), which is not supported for loading"
                    )));
                }
                other if other.starts_with("hada_") || other.starts_with("lokr_") => {
                    return Err(not_kohya(format!(
                        "module `{module}` is a LyCORIS LoHa/LoKr module, which is not supported"
                    )));
                }
                other => {
                    return Err(not_kohya(format!(
                        "tensor `{name}` has the unknown suffix `{other}`"
                    )));
                }
            }
        }
        if parts.is_empty() {
            return Err(not_kohya("it contains no tensors".to_string()));
        }
        let mut modules = BTreeMap::new();
        for (module, PartialModule { down, up, alpha }) in parts {
            let missing = |what: &str| LoraError::Module {
                path: path.to_path_buf(),
                module: module.clone(),
                reason: format!("{what} is missing"),
            };
            let down = down.ok_or_else(|| missing("lora_down.weight"))?;
            let up = up.ok_or_else(|| missing("lora_up.weight"))?;
            modules.insert(
                module,
                StoredModule {
                    down,
                    up,
                    alpha,
                    magnitude: None,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            metadata: file.metadata().clone(),
            modules,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    pub fn modules(&self) -> &BTreeMap<String, StoredModule> {
        &self.modules
    }

    /// The family the file was made for: its `ss_base_model_version`, else its module names (SDXL's text
    /// encoders and original UNet blocks, or SD1/SD2's single text encoder).
    fn family(&self) -> Option<LoraFamily> {
        if let Some(version) = self.metadata.get("ss_base_model_version") {
            if version.starts_with("sdxl") {
                return Some(LoraFamily::Sdxl);
            }
            if version.starts_with("sd_v1") || version.starts_with("sd_v2") {
                return Some(LoraFamily::Sd);
            }
        }
        let any = |prefix: &str| self.modules.keys().any(|m| m.starts_with(prefix));
        let sgm_unet = ["input_blocks_", "middle_block_", "output_blocks_"]
            .iter()
            .any(|block| any(&format!("{UNET_PREFIX}_{block}")));
        if any(&format!("{TEXT_ENCODER_1_PREFIX}_"))
            || any(&format!("{TEXT_ENCODER_2_PREFIX}_"))
            || sgm_unet
        {
            Some(LoraFamily::Sdxl)
        } else if any(&format!("{TEXT_ENCODER_PREFIX}_")) {
            Some(LoraFamily::Sd)
        } else {
            None
        }
    }

    /// Attaches every module to the matching layer of the given components (`(prefix, registry)` pairs such as
    /// `("lora_unet", unet.layers())`) at `multiplier`, converting the tensors to `dtype`.
    ///
    /// A module whose shape does not fit its layer is an error naming the module; modules that match no
    /// layer are listed in the report (A1111 and ComfyUI skip them too); a file where nothing matches is an
    /// error, since it was made for another model.
    ///
    /// Besides each layer's kohya name, its diffusers-path name is accepted (some tools write SDXL files
    /// that way), and `lora_te_` modules are read as SDXL's first text encoder, as diffusers and ComfyUI do.
    pub fn attach(
        &self,
        components: &[(&str, &LayerRegistry)],
        multiplier: f64,
        dtype: DType,
    ) -> Result<AttachReport, LoraError> {
        if let (Some(lora), Some(model)) = (self.family(), LoraFamily::of_components(components))
            && lora != model
        {
            return Err(LoraError::OtherFamily {
                path: self.path.clone(),
                lora_family: lora.label(),
                model_family: match model {
                    LoraFamily::Sd => "an SD1/SD2",
                    LoraFamily::Sdxl => "an SDXL",
                },
            });
        }
        let mut slots: HashMap<String, Arc<AdapterSlot>> = HashMap::new();
        for (prefix, registry) in components {
            let mut prefixes = vec![*prefix];
            if *prefix == TEXT_ENCODER_1_PREFIX {
                prefixes.push(TEXT_ENCODER_PREFIX);
            }
            for slot in registry.slots() {
                for prefix in &prefixes {
                    slots.insert(kohya_name(prefix, slot.name()), slot.clone());
                    slots.insert(kohya_name(prefix, slot.kohya_path()), slot.clone());
                }
            }
        }
        attach_modules(
            &self.path,
            self.modules.iter(),
            |module| slots.get(module).cloned(),
            multiplier,
            dtype,
        )
    }
}

/// The kohya module name of a layer: `prefix_` + its module path ([`AdapterSlot::kohya_path`]) with dots
/// turned into underscores.
pub fn kohya_name(prefix: &str, module_path: &str) -> String {
    format!("{prefix}_{}", module_path.replace('.', "_"))
}
