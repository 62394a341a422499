//! Finding a Stable Diffusion model in the files users have and building its components from them.
//!
//! Two layouts are read: single-file checkpoints in the original LDM layout (`.safetensors`, or `.ckpt` read
//! without executing code), with an optional `.yaml`/`.json` config beside them, and diffusers folders
//! (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`; fp32 or fp16-variant weights, sharded or
//! not). Tensors are read lazily from memory-mapped files, one at a time, straight into the compute dtype.

mod backend;
pub mod infer;
pub mod names;
mod sidecar;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::models::ModelError;
use crate::models::clip::{ClipActivation, ClipTextConfig, ClipTextTransformer};
use crate::models::schedulers::{PredictionType, SchedulerConfig};
use crate::models::tokenizer::END_OF_TEXT;
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::tensor_file::TensorFile;
use backend::ComponentBackend;
pub use backend::NameMap;
pub use backend::TensorFiles;
pub use infer::TextEncoderLayout;

/// The model families this program runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// Stable Diffusion 1.x (CLIP ViT-L/14 text encoder).
    Sd1,
    /// Stable Diffusion 2.x (OpenCLIP ViT-H text encoder).
    Sd2,
}

impl ModelFamily {
    pub fn label(&self) -> &'static str {
        match self {
            ModelFamily::Sd1 => "Stable Diffusion 1.x",
            ModelFamily::Sd2 => "Stable Diffusion 2.x",
        }
    }
}

/// Everything needed to build and run a model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub family: ModelFamily,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub text_encoder: ClipTextConfig,
    pub scheduler: SchedulerConfig,
    /// The token id prompts are padded with (`<|endoftext|>` for SD1, `!` = 0 for SD2).
    pub pad_token: u32,
    /// How `scheduler.prediction_type` was (or is to be) decided.
    pub prediction_origin: PredictionOrigin,
}

/// How a model's prediction type (noise or velocity) is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionOrigin {
    /// A config file says so (`scheduler/scheduler_config.json`, the `.yaml` beside a single file).
    Config,
    /// Nothing says so and the family leaves no doubt (SD1 predicts noise), or diffusers' default applies
    /// (a folder without a scheduler config).
    Default,
    /// An SD2 single file without a config: SD 2.x-base predicts noise, SD 2.x (768) velocity, and their
    /// tensors look alike, so a test prediction of the loaded UNet decides, as AUTOMATIC1111 does.
    TestPrediction,
    /// The user's `prediction_type` (or `--prediction`).
    Override,
}

/// How the model's files are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointLayout {
    SingleFileSafetensors,
    SingleFileCkpt,
    DiffusersFolder,
}

impl CheckpointLayout {
    pub fn label(&self) -> &'static str {
        match self {
            CheckpointLayout::SingleFileSafetensors => "single-file checkpoint (.safetensors)",
            CheckpointLayout::SingleFileCkpt => {
                "single-file checkpoint (.ckpt, read without executing code)"
            }
            CheckpointLayout::DiffusersFolder => "diffusers folder",
        }
    }
}

/// Where one component's tensors are stored and how its names map.
#[derive(Debug, Clone)]
pub struct Component {
    pub files: Arc<TensorFiles>,
    pub names: NameMap,
}

/// The three components of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComponentKind {
    Unet,
    Vae,
    TextEncoder,
}

/// A located model: its configuration and where each component's tensors are.
#[derive(Debug, Clone)]
pub struct ModelSource {
    path: PathBuf,
    layout: CheckpointLayout,
    config: ModelConfig,
    config_files: Vec<PathBuf>,
    unet: Component,
    vae: Component,
    text_encoder: Component,
}

impl ModelSource {
    /// Locates the model at `path` (a checkpoint file or a diffusers folder) and works out its architecture.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        if path.is_dir() {
            open_diffusers(path)
        } else if path.is_file() {
            open_single_file(path)
        } else {
            Err(ModelError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            })
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn layout(&self) -> CheckpointLayout {
        self.layout
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Config files that were read (sidecars or diffusers `config.json`s).
    pub fn config_files(&self) -> &[PathBuf] {
        &self.config_files
    }

    /// Where a component's tensors are.
    pub fn component(&self, kind: ComponentKind) -> &Component {
        match kind {
            ComponentKind::Unet => &self.unet,
            ComponentKind::Vae => &self.vae,
            ComponentKind::TextEncoder => &self.text_encoder,
        }
    }

    /// Overrides what the model is taken to predict (for checkpoints without a config saying so).
    pub fn set_prediction_type(&mut self, prediction: PredictionType) {
        self.config.scheduler.prediction_type = prediction;
        self.config.prediction_origin = PredictionOrigin::Override;
    }

    pub fn load_unet(
        &self,
        device: &Device,
        dtype: DType,
    ) -> Result<UNet2DConditionModel, ModelError> {
        let config = self.config.unet.clone();
        build(&self.unet, "UNet", device, dtype, |vb| {
            UNet2DConditionModel::new(vb, &config)
        })
    }

    pub fn load_vae(&self, device: &Device, dtype: DType) -> Result<AutoencoderKL, ModelError> {
        let config = self.config.vae.clone();
        build(&self.vae, "VAE", device, dtype, |vb| {
            AutoencoderKL::new(vb, &config)
        })
    }

    pub fn load_text_encoder(
        &self,
        device: &Device,
        dtype: DType,
    ) -> Result<ClipTextTransformer, ModelError> {
        let config = self.config.text_encoder.clone();
        build(&self.text_encoder, "text encoder", device, dtype, |vb| {
            ClipTextTransformer::new(vb, &config)
        })
    }
}

/// Builds one component, reporting the backend's structured error (missing tensor, wrong shape) if any.
pub fn build<T>(
    component: &Component,
    label: &str,
    device: &Device,
    dtype: DType,
    construct: impl FnOnce(VarBuilder) -> candle_core::Result<T>,
) -> Result<T, ModelError> {
    let first_error = Arc::new(Mutex::new(None));
    let backend = ComponentBackend::new(
        component.files.clone(),
        component.names.clone(),
        label,
        first_error.clone(),
    );
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    construct(vb).map_err(|source| {
        first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_else(|| ModelError::Compute {
                context: format!(
                    "building the {label} of {}",
                    component.files.display_path().display()
                ),
                source,
            })
    })
}

fn open_single_file(path: &Path) -> Result<ModelSource, ModelError> {
    let file = TensorFile::open(path)?;
    let layout = if file.is_safetensors() {
        CheckpointLayout::SingleFileSafetensors
    } else {
        CheckpointLayout::SingleFileCkpt
    };
    let files = Arc::new(TensorFiles::new(vec![file]));
    check_is_sd_checkpoint(path, &files)?;
    let sidecars = sidecar::read_sidecars(path)?;

    let te_layout =
        infer::text_encoder_layout(files.as_ref()).unwrap_or(if sidecars.open_clip == Some(true) {
            TextEncoderLayout::OpenClip
        } else {
            TextEncoderLayout::Clip
        });
    let unet = match sidecars.unet {
        Some(unet) => unet,
        None => infer::infer_unet(files.as_ref())?,
    };
    let vae = match sidecars.vae {
        Some(vae) => vae,
        None => infer::infer_vae(files.as_ref())?,
    };
    let text_encoder = match sidecars.text_encoder {
        Some(te) => te,
        None => infer::infer_text_encoder(files.as_ref(), te_layout)?,
    };
    let family = match te_layout {
        TextEncoderLayout::OpenClip => ModelFamily::Sd2,
        TextEncoderLayout::Clip => ModelFamily::Sd1,
    };
    // Without a config, an SD2 checkpoint's prediction type is decided by a test prediction once its UNet
    // is loaded (until then it counts as the 768-px v-prediction model, as diffusers takes it).
    let prediction_origin = match (&sidecars.scheduler, family) {
        (Some(_), _) => PredictionOrigin::Config,
        (None, ModelFamily::Sd2) => PredictionOrigin::TestPrediction,
        (None, ModelFamily::Sd1) => PredictionOrigin::Default,
    };
    let scheduler = sidecars.scheduler.unwrap_or_else(|| SchedulerConfig {
        prediction_type: if family == ModelFamily::Sd2 {
            PredictionType::VPrediction
        } else {
            PredictionType::Epsilon
        },
        ..SchedulerConfig::default()
    });
    let te_names = match te_layout {
        TextEncoderLayout::Clip => NameMap::LdmClip,
        TextEncoderLayout::OpenClip => NameMap::OpenClip {
            hidden: text_encoder.hidden_size,
        },
    };
    let component = |names| Component {
        files: files.clone(),
        names,
    };
    Ok(ModelSource {
        path: path.to_path_buf(),
        layout,
        unet: component(NameMap::LdmUnet {
            layers_per_block: unet.layers_per_block,
            up_attention: unet.up_attention.clone(),
        }),
        vae: component(NameMap::LdmVae {
            levels: vae.block_out_channels.len(),
        }),
        text_encoder: component(te_names),
        config: ModelConfig {
            family,
            unet,
            vae,
            text_encoder,
            scheduler,
            pad_token: default_pad_token(family),
            prediction_origin,
        },
        config_files: sidecars.sources,
    })
}

/// Refuses files that are clearly something else, with a sentence saying what they are.
fn check_is_sd_checkpoint(path: &Path, files: &TensorFiles) -> Result<(), ModelError> {
    let any = |prefix: &str| files.keys().any(|k| k.starts_with(prefix));
    if any("conditioner.embedders.") || any(&format!("{}label_emb.", names::LDM_UNET)) {
        return Err(ModelError::Unsupported(format!(
            "{} is an SDXL checkpoint; SDXL is not supported yet",
            path.display()
        )));
    }
    if any(names::LDM_UNET) {
        return Ok(());
    }
    let reason = if any("lora_unet_") || any("lora_te") {
        "it is a LoRA file, not a base model (pass it with --lora)".to_string()
    } else if any("down_blocks.") || any("unet.") {
        "it holds weights in the diffusers layout; pass the whole diffusers folder instead of one file".to_string()
    } else {
        let count = files.keys().count();
        format!(
            "none of its {count} tensors belongs to a Stable Diffusion UNet (`{}*`)",
            names::LDM_UNET
        )
    };
    Err(ModelError::NotAModel {
        path: path.to_path_buf(),
        reason,
    })
}

fn open_diffusers(folder: &Path) -> Result<ModelSource, ModelError> {
    let not_model = |reason: String| ModelError::NotAModel {
        path: folder.to_path_buf(),
        reason,
    };
    for part in ["unet", "vae", "text_encoder"] {
        if !folder.join(part).is_dir() {
            return Err(not_model(format!(
                "it has no `{part}/` subfolder (a diffusers model folder has unet/, vae/, text_encoder/ and tokenizer/)"
            )));
        }
    }
    let mut files = Vec::new();
    let unet = read_config(
        folder,
        "unet/config.json",
        &mut files,
        UNetConfig::from_diffusers_json,
    )?;
    let vae = read_config(
        folder,
        "vae/config.json",
        &mut files,
        VaeConfig::from_diffusers_json,
    )?;
    let text_encoder = read_config(
        folder,
        "text_encoder/config.json",
        &mut files,
        ClipTextConfig::from_transformers_json,
    )?;
    let (scheduler, prediction_origin) = if folder.join("scheduler/scheduler_config.json").is_file()
    {
        let scheduler = read_config(
            folder,
            "scheduler/scheduler_config.json",
            &mut files,
            SchedulerConfig::from_diffusers_json,
        )?;
        (scheduler, PredictionOrigin::Config)
    } else {
        (SchedulerConfig::default(), PredictionOrigin::Default)
    };
    let family =
        if text_encoder.hidden_act == ClipActivation::Gelu || unet.cross_attention_dim == 1024 {
            ModelFamily::Sd2
        } else {
            ModelFamily::Sd1
        };
    let pad_token = read_pad_token(folder).unwrap_or_else(|| default_pad_token(family));
    let component = |part: &str, stem: &str| -> Result<Component, ModelError> {
        let files = diffusers_weights(&folder.join(part), stem)?;
        Ok(Component {
            files: Arc::new(TensorFiles::new(files)),
            names: NameMap::Diffusers {
                prefix: String::new(),
            },
        })
    };
    Ok(ModelSource {
        path: folder.to_path_buf(),
        layout: CheckpointLayout::DiffusersFolder,
        unet: component("unet", "diffusion_pytorch_model")?,
        vae: component("vae", "diffusion_pytorch_model")?,
        text_encoder: component("text_encoder", "model")?,
        config: ModelConfig {
            family,
            unet,
            vae,
            text_encoder,
            scheduler,
            pad_token,
            prediction_origin,
        },
        config_files: files,
    })
}

/// Reads and parses the config file at `relative` in `folder`, adding its path to `files`; a config that is
/// wrong names its file.
fn read_config<T>(
    folder: &Path,
    relative: &str,
    files: &mut Vec<PathBuf>,
    parse: impl Fn(&str) -> Result<T, ModelError>,
) -> Result<T, ModelError> {
    let path = folder.join(relative);
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let parsed = parse(&text).map_err(|e| match e {
        ModelError::Config(reason) => ModelError::Config(format!("{}: {reason}", path.display())),
        other => other,
    });
    files.push(path);
    parsed
}

/// The weights of a transformers model folder (`model.safetensors`, possibly sharded, or
/// `pytorch_model.bin`), under their stored names.
pub fn transformers_weights(folder: &Path) -> Result<Component, ModelError> {
    Ok(Component {
        files: Arc::new(TensorFiles::new(diffusers_weights(folder, "model")?)),
        names: NameMap::Diffusers {
            prefix: String::new(),
        },
    })
}

/// The weight files of one diffusers component, in order of preference: fp32 safetensors, fp16-variant
/// safetensors, each possibly sharded, then PyTorch `.bin` files.
fn diffusers_weights(dir: &Path, stem: &str) -> Result<Vec<TensorFile>, ModelError> {
    let candidates = [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
        format!("{stem}.safetensors.index.json"),
        format!("{stem}.safetensors.index.fp16.json"),
        format!("{stem}.bin"),
        format!("{stem}.fp16.bin"),
        "pytorch_model.bin".to_string(),
    ];
    for name in &candidates {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        if name.ends_with(".json") {
            return sharded_files(&path);
        }
        return Ok(vec![TensorFile::open(&path)?]);
    }
    Err(ModelError::NotAModel {
        path: dir.to_path_buf(),
        reason: format!(
            "it has no weights file (looked for {})",
            candidates.join(", ")
        ),
    })
}

/// Opens the shards listed in a `*.safetensors.index.json`.
fn sharded_files(index: &Path) -> Result<Vec<TensorFile>, ModelError> {
    let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let bad = |reason: &str| {
        ModelError::Config(format!(
            "{} is not a valid shard index: {reason}",
            index.display()
        ))
    };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|_| bad("it is not JSON"))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("it has no weight_map"))?;
    let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
    shards.sort_unstable();
    shards.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    shards
        .into_iter()
        .map(|shard| {
            if shard.contains('/') || shard.contains('\\') || shard.contains("..") {
                return Err(bad(&format!(
                    "the shard name `{shard}` points outside its folder"
                )));
            }
            Ok(TensorFile::open(&dir.join(shard))?)
        })
        .collect()
}

/// The pad token a diffusers folder's tokenizer declares (`<|endoftext|>` for SD1, `!` for SD2).
fn read_pad_token(folder: &Path) -> Option<u32> {
    ["special_tokens_map.json", "tokenizer_config.json"]
        .iter()
        .find_map(|name| {
            let text = std::fs::read_to_string(folder.join("tokenizer").join(name)).ok()?;
            let json: serde_json::Value = serde_json::from_str(&text).ok()?;
            let pad = json.get("pad_token")?;
            let content = pad.as_str().or_else(|| pad.get("content")?.as_str())?;
            match content {
                "<|endoftext|>" => Some(END_OF_TEXT),
                "!" => Some(0),
                _ => None,
            }
        })
}

fn default_pad_token(family: ModelFamily) -> u32 {
    match family {
        ModelFamily::Sd1 => END_OF_TEXT,
        ModelFamily::Sd2 => 0,
    }
}
