//! PEFT LoRA adapter folders, the format transformers + peft, LLaMA-Factory, axolotl and unsloth write for
//! language models: `adapter_config.json` (`r`, `lora_alpha`, `target_modules`, `use_rslora`, `use_dora`,
//! `rank_pattern`, `alpha_pattern`, `base_model_name_or_path`) beside `adapter_model.safetensors` (or
//! `adapter_model.bin`) whose tensors are named `base_model.model.` + module path + `.lora_A.weight` /
//! `.lora_B.weight` (DoRA adds `.lora_magnitude_vector`).
//!
//! Read to attach to a model at a strength, written from a network's plain LoRA export. Scales are peft's:
//! `lora_alpha / r`, or `lora_alpha / √r` with rsLoRA, with `r` and `lora_alpha` per module from the
//! patterns. Knows no model: modules are found by their path in the model's layer registry.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use serde_json::{Value, json};

use super::attach::{AttachReport, StoredModule, attach_modules};
use super::error::LoraError;
use super::export::{ExportedLora, most_common};
use super::layer::{LayerRegistry, LayerShape};
use crate::atomic_file::write_atomically;
use crate::tensor_file::TensorFile;

/// The configuration file of an adapter folder.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// The weights file lora-studio writes (peft's default).
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The weights file older peft versions and `safe_serialization=False` write.
const ADAPTER_WEIGHTS_BIN: &str = "adapter_model.bin";
/// What peft puts before a module's path in the base model.
const PEFT_PREFIX: &str = "base_model.model.";

/// `target_modules` as stored: module-name suffixes, or one regular expression the whole name must match.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    Pattern(String),
}

/// What lora-studio reads of `adapter_config.json`; other keys are left alone.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PeftConfig {
    pub peft_type: Option<String>,
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    pub target_modules: Option<TargetModules>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    /// `r` of the modules whose name matches a key (a regular expression).
    pub rank_pattern: Option<BTreeMap<String, usize>>,
    /// `lora_alpha` of the modules whose name matches a key (a regular expression).
    pub alpha_pattern: Option<BTreeMap<String, f64>>,
    pub base_model_name_or_path: Option<String>,
}

impl PeftConfig {
    /// Reads `adapter_config.json` of the adapter folder `folder`.
    pub fn read(folder: &Path) -> Result<Self, LoraError> {
        let not_peft = |reason: String| LoraError::NotPeft {
            path: folder.to_path_buf(),
            reason,
        };
        if !folder.is_dir() {
            return Err(not_peft(format!(
                "it is not a folder (a PEFT adapter is a folder with {ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE})"
            )));
        }
        let path = folder.join(ADAPTER_CONFIG_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|_| not_peft(format!("it has no readable {ADAPTER_CONFIG_FILE}")))?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|e| not_peft(format!("its {ADAPTER_CONFIG_FILE} cannot be read ({e})")))?;
        match config.peft_type.as_deref() {
            None | Some("LORA") => Ok(config),
            Some(other) => Err(not_peft(format!(
                "its peft_type is {other}; only LoRA adapters (peft_type LORA) are read"
            ))),
        }
    }

    /// The base model the adapter was trained on, as the file names it.
    pub fn base_model(&self) -> &str {
        self.base_model_name_or_path
            .as_deref()
            .filter(|b| !b.is_empty())
            .unwrap_or("unknown")
    }

    /// peft's `lora_alpha` for `module` (the first `alpha_pattern` key it matches, else the default).
    fn alpha_of(&self, module: &str) -> f64 {
        self.alpha_pattern
            .iter()
            .flatten()
            .find(|(pattern, _)| pattern_matches(pattern, module))
            .map_or(self.lora_alpha, |(_, alpha)| *alpha)
    }

    /// The alpha that gives, at this module's rank, peft's scale in lora-studio's `alpha / rank` convention.
    fn effective_alpha(&self, module: &str, rank: usize) -> f64 {
        let alpha = self.alpha_of(module);
        if self.use_rslora {
            alpha * (rank as f64).sqrt()
        } else {
            alpha
        }
    }
}

/// Whether a `rank_pattern`/`alpha_pattern` key names `module`, as peft's `get_pattern_key` decides:
/// `re.match(rf"(.*\.)?({key})$", module)`.
fn pattern_matches(pattern: &str, module: &str) -> bool {
    regex::Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$")).is_ok_and(|re| re.is_match(module))
}

/// Which tensor of a module a stored name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeftTensor {
    /// `lora_A.weight`, `[r, in]`.
    A,
    /// `lora_B.weight`, `[out, r]`.
    B,
    /// DoRA's `lora_magnitude_vector`, `[out]`.
    Magnitude,
}

/// The module path and the role of a stored tensor name, or why lora-studio cannot read it.
pub fn split_tensor_name(name: &str) -> Result<(&str, PeftTensor), String> {
    let path = name.strip_prefix(PEFT_PREFIX).unwrap_or(name);
    let roles = [
        (".lora_A.weight", PeftTensor::A),
        (".lora_B.weight", PeftTensor::B),
        (".lora_magnitude_vector", PeftTensor::Magnitude),
        (".lora_magnitude_vector.weight", PeftTensor::Magnitude),
    ];
    if let Some((module, role)) = roles
        .iter()
        .find_map(|(suffix, role)| Some((path.strip_suffix(suffix)?, *role)))
    {
        return Ok((module, role));
    }
    Err(if name.contains("lora_embedding_") {
        format!("tensor `{name}` adapts the token embeddings, which is not supported")
    } else if name.ends_with(".bias") && name.contains(".lora_B") {
        format!("tensor `{name}` is a LoRA bias (lora_bias), which is not supported")
    } else {
        format!(
            "tensor `{name}` is not a LoRA tensor (whole weights saved with modules_to_save, as when tokens \
             were added, are not supported)"
        )
    })
}

/// The weights file of an adapter folder (`adapter_model.safetensors`, else `adapter_model.bin`).
pub fn adapter_weights_file(folder: &Path) -> Option<PathBuf> {
    [ADAPTER_WEIGHTS_FILE, ADAPTER_WEIGHTS_BIN]
        .iter()
        .map(|name| folder.join(name))
        .find(|path| path.is_file())
}

/// A module's tensors while a file is being read.
#[derive(Default)]
struct PartialModule {
    down: Option<Tensor>,
    up: Option<Tensor>,
    magnitude: Option<Tensor>,
}

/// A PEFT LoRA adapter folder read into memory.
#[derive(Debug)]
pub struct PeftAdapter {
    folder: PathBuf,
    config: PeftConfig,
    /// By module path (`model.layers.0.self_attn.q_proj`), alphas in lora-studio's `alpha / rank` convention.
    modules: BTreeMap<String, StoredModule>,
}

impl PeftAdapter {
    /// Reads the adapter folder `folder` (its config and all its tensors, onto `device`).
    pub fn load(folder: &Path, device: &Device) -> Result<Self, LoraError> {
        let config = PeftConfig::read(folder)?;
        let not_peft = |reason: String| LoraError::NotPeft {
            path: folder.to_path_buf(),
            reason,
        };
        let path = adapter_weights_file(folder).ok_or_else(|| {
            not_peft(format!(
                "it has neither {ADAPTER_WEIGHTS_FILE} nor {ADAPTER_WEIGHTS_BIN}"
            ))
        })?;
        let file = TensorFile::open(&path)?;
        let mut parts: BTreeMap<String, PartialModule> = BTreeMap::new();
        for name in file.infos().keys() {
            let (module, role) = split_tensor_name(name).map_err(&not_peft)?;
            let tensor = file.load(name, device)?;
            let entry = parts.entry(module.to_string()).or_default();
            match role {
                PeftTensor::A => entry.down = Some(tensor),
                PeftTensor::B => entry.up = Some(tensor),
                PeftTensor::Magnitude => entry.magnitude = Some(tensor),
            }
        }
        if parts.is_empty() {
            return Err(not_peft(format!("{} holds no tensors", path.display())));
        }
        let mut modules = BTreeMap::new();
        for (module, part) in parts {
            let missing = |what: &str| LoraError::Module {
                path: path.clone(),
                module: module.clone(),
                reason: format!("{what} is missing"),
            };
            let down = part.down.ok_or_else(|| missing("lora_A.weight"))?;
            let up = part.up.ok_or_else(|| missing("lora_B.weight"))?;
            if config.use_dora && part.magnitude.is_none() {
                return Err(missing("the DoRA magnitude (lora_magnitude_vector)"));
            }
            let rank = down.dims().first().copied().unwrap_or(0);
            let alpha = config.effective_alpha(&module, rank);
            modules.insert(
                module,
                StoredModule {
                    down,
                    up,
                    alpha: Some(alpha),
                    magnitude: part.magnitude,
                },
            );
        }
        Ok(Self {
            folder: folder.to_path_buf(),
            config,
            modules,
        })
    }

    pub fn folder(&self) -> &Path {
        &self.folder
    }

    pub fn config(&self) -> &PeftConfig {
        &self.config
    }

    /// The modules by path, with alphas such that `alpha / rank` is peft's scale.
    pub fn modules(&self) -> &BTreeMap<String, StoredModule> {
        &self.modules
    }

    /// Attaches every module to the layer of `layers` with its path at `multiplier`, converting the tensors
    /// to `dtype`. A module whose shape does not fit its layer means the adapter was made for another base
    /// model: an error naming the module. Modules with no layer are listed in the report; an adapter where
    /// none has one is an error.
    pub fn attach(
        &self,
        layers: &LayerRegistry,
        multiplier: f64,
        dtype: DType,
    ) -> Result<AttachReport, LoraError> {
        for (module, weights) in &self.modules {
            if let Some(slot) = layers.get(module) {
                self.check_fits(module, weights, slot.shape())?;
            }
        }
        attach_modules(
            &self.folder,
            self.modules.iter(),
            |module| layers.get(module),
            multiplier,
            dtype,
        )
    }

    /// The shapes peft stores for a linear layer: `lora_A` `[r, in]`, `lora_B` `[out, r]`, the magnitude
    /// `[out]`.
    fn check_fits(
        &self,
        module: &str,
        weights: &StoredModule,
        layer: &LayerShape,
    ) -> Result<(), LoraError> {
        let LayerShape::Linear {
            in_features,
            out_features,
        } = *layer
        else {
            return Ok(());
        };
        let rank = weights.down.dims().first().copied().unwrap_or(0);
        let expected = [
            ("lora_A", weights.down.dims(), vec![rank, in_features]),
            ("lora_B", weights.up.dims(), vec![out_features, rank]),
        ];
        let magnitude = weights
            .magnitude
            .as_ref()
            .map(|m| ("lora_magnitude_vector", m.dims(), vec![out_features]));
        for (what, found, wanted) in expected.into_iter().chain(magnitude) {
            if found != wanted.as_slice() {
                return Err(LoraError::OtherBase {
                    path: self.folder.clone(),
                    base: self.config.base_model().to_string(),
                    module: module.to_string(),
                    reason: format!(
                        "has a {what} of shape {found:?} where this model's layer ({in_features} in, \
                         {out_features} out) needs {wanted:?}"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// What a written adapter says besides its tensors.
#[derive(Debug, Clone)]
pub struct PeftExport<'a> {
    /// `base_model_name_or_path`: the base model's folder or Hub id.
    pub base_model_name_or_path: String,
    /// Scales written as `lora_alpha / √r` (rsLoRA) instead of `lora_alpha / r`.
    pub use_rslora: bool,
    /// The layers of the model the adapter is for, to tell whether `target_modules` can be names.
    pub layers: &'a LayerRegistry,
}

/// Writes `lora` (linear modules, named by their paths in the model) as the PEFT adapter folder `folder`:
/// `adapter_config.json` and `adapter_model.safetensors` with tensors in `dtype`, both atomically.
pub fn write_peft_adapter(
    folder: &Path,
    lora: &ExportedLora,
    export: &PeftExport,
    dtype: DType,
) -> Result<(), LoraError> {
    let fail = |path: &Path, reason: String| LoraError::Write {
        path: path.to_path_buf(),
        reason,
    };
    std::fs::create_dir_all(folder).map_err(|e| fail(folder, e.to_string()))?;
    let config = adapter_config(lora, export);
    let mut tensors = Vec::with_capacity(2 * lora.modules.len());
    for module in &lora.modules {
        let rank = module.down.dims()[0];
        let flat = |t: &Tensor, rows: usize| t.reshape((rows, ()))?.to_dtype(dtype);
        let base = format!("{PEFT_PREFIX}{}", module.module_path);
        let out = module.up.dims()[0];
        let to_write = flat(&module.down, rank)
            .and_then(|down| Ok((down, flat(&module.up, out)?)))
            .map_err(|e| fail(folder, e.to_string()))?;
        tensors.push((format!("{base}.lora_A.weight"), to_write.0));
        tensors.push((format!("{base}.lora_B.weight"), to_write.1));
    }
    let weights = folder.join(ADAPTER_WEIGHTS_FILE);
    let metadata = Some([("format".to_string(), "pt".to_string())].into());
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), metadata)
        .map_err(|e| fail(&weights, e.to_string()))?;
    write_atomically(&weights, |w| std::io::Write::write_all(w, &bytes))
        .map_err(|e| fail(&weights, e.to_string()))?;
    let config_path = folder.join(ADAPTER_CONFIG_FILE);
    let text = serde_json::to_string_pretty(&config).unwrap_or_default() + "\n";
    write_atomically(&config_path, |w| {
        std::io::Write::write_all(w, text.as_bytes())
    })
    .map_err(|e| fail(&config_path, e.to_string()))
}

/// `adapter_config.json` for `lora`: the most common rank and alpha as `r` and `lora_alpha`, the others in
/// `rank_pattern`/`alpha_pattern` (escaped module paths); `target_modules` as names when they select exactly
/// the exported modules, else one pattern naming each.
fn adapter_config(lora: &ExportedLora, export: &PeftExport) -> Value {
    let per_module: Vec<(&str, usize, f64)> = lora
        .modules
        .iter()
        .map(|m| {
            let rank = m.down.dims()[0];
            let alpha = if export.use_rslora {
                m.alpha / (rank as f64).sqrt()
            } else {
                m.alpha
            };
            (m.module_path.as_str(), rank, alpha)
        })
        .collect();
    let rank = most_common(per_module.iter().map(|m| m.1)).unwrap_or(0);
    let alpha = most_common(per_module.iter().map(|m| m.2.to_bits())).map_or(0.0, f64::from_bits);
    let rank_pattern: BTreeMap<String, usize> = per_module
        .iter()
        .filter(|m| m.1 != rank)
        .map(|m| (regex::escape(m.0), m.1))
        .collect();
    let alpha_pattern: BTreeMap<String, f64> = per_module
        .iter()
        .filter(|m| m.2 != alpha)
        .map(|m| (regex::escape(m.0), m.2))
        .collect();
    let config: BTreeMap<&str, Value> = BTreeMap::from([
        ("alpha_pattern", json!(alpha_pattern)),
        (
            "base_model_name_or_path",
            json!(export.base_model_name_or_path),
        ),
        ("bias", json!("none")),
        ("fan_in_fan_out", json!(false)),
        ("inference_mode", json!(true)),
        ("init_lora_weights", json!(true)),
        ("layers_pattern", Value::Null),
        ("layers_to_transform", Value::Null),
        ("lora_alpha", json!(alpha)),
        ("lora_dropout", json!(0.0)),
        ("modules_to_save", Value::Null),
        ("peft_type", json!("LORA")),
        ("r", json!(rank)),
        ("rank_pattern", json!(rank_pattern)),
        ("revision", Value::Null),
        (
            "target_modules",
            target_modules(per_module.iter().map(|m| m.0), export.layers),
        ),
        ("task_type", json!("CAUSAL_LM")),
        ("use_dora", json!(false)),
        ("use_rslora", json!(export.use_rslora)),
    ]);
    json!(config)
}

/// peft's `target_modules` for `modules`: their last names (`q_proj`, ...) when every layer of the model
/// with one of those names is among them, else a pattern the whole name of each must match.
fn target_modules<'a>(modules: impl Iterator<Item = &'a str>, layers: &LayerRegistry) -> Value {
    let modules: BTreeSet<&str> = modules.collect();
    let last = |path: &'a str| path.rsplit('.').next().unwrap_or(path);
    let names: BTreeSet<&str> = modules.iter().map(|m| last(m)).collect();
    let slots = layers.slots();
    let all_covered = slots
        .iter()
        .map(|slot| slot.name())
        .filter(|name| name.rsplit('.').next().is_some_and(|l| names.contains(l)))
        .all(|name| modules.contains(name));
    if all_covered {
        json!(names)
    } else {
        let alternatives: Vec<String> = modules.iter().map(|m| regex::escape(m)).collect();
        json!(format!("^(?:{})$", alternatives.join("|")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names_split_into_module_and_role() {
        assert_eq!(
            split_tensor_name("base_model.model.model.layers.3.mlp.up_proj.lora_B.weight"),
            Ok(("model.layers.3.mlp.up_proj", PeftTensor::B))
        );
        assert_eq!(
            split_tensor_name(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
            ),
            Ok(("model.layers.0.self_attn.q_proj", PeftTensor::Magnitude))
        );
        let embedding =
            split_tensor_name("base_model.model.model.embed_tokens.lora_embedding_A").unwrap_err();
        assert!(embedding.contains("token embeddings"), "{embedding}");
        let whole = split_tensor_name("base_model.model.lm_head.weight").unwrap_err();
        assert!(whole.contains("modules_to_save"), "{whole}");
    }

    #[test]
    fn patterns_match_as_peft_matches_them() {
        let module = "model.layers.1.self_attn.q_proj";
        assert!(pattern_matches("q_proj", module));
        assert!(pattern_matches(
            r"model\.layers\.1\.self_attn\.q_proj",
            module
        ));
        assert!(pattern_matches(r"layers\.1\..*q_proj", module));
        assert!(!pattern_matches("proj", module));
        assert!(!pattern_matches(
            r"model\.layers\.11\.self_attn\.q_proj",
            module
        ));
    }
}
