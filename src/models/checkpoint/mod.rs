//! Finding a Stable Diffusion model in the files users have and building its components from them.
//!
//! Two layouts are read: single-file checkpoints in the original LDM/sgm layout (`.safetensors`, or `.ckpt`
//! read without executing code), with an optional `.yaml`/`.json` config beside them, and diffusers folders
//! (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`, and SDXL's `text_encoder_2/`,
//! `tokenizer_2/`; fp32 or fp16-variant weights, sharded or not). Tensors are read lazily from
//! memory-mapped files, one at a time, straight into the compute dtype.

mod backend;
pub mod infer;
pub mod names;
mod sidecar;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::models::ModelError;
use crate::models::clip::{
    ClipActivation, ClipTextConfig, ClipTextTransformer, TextEncoder2Config,
};
use crate::models::schedulers::{PredictionType, SchedulerConfig};
use crate::models::tokenizer::END_OF_TEXT;
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::models::vae::{AutoencoderKL, SDXL_SCALING_FACTOR, VaeConfig};
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
    /// Stable Diffusion XL 1.0 base and its fine-tunes (CLIP ViT-L and OpenCLIP ViT-bigG text encoders,
    /// pooled-text and size conditioning).
    Sdxl,
}

impl ModelFamily {
    pub fn label(&self) -> &'static str {
        match self {
            ModelFamily::Sd1 => "Stable Diffusion 1.x",
            ModelFamily::Sd2 => "Stable Diffusion 2.x",
            ModelFamily::Sdxl => "Stable Diffusion XL",
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
    /// SDXL's second text encoder.
    pub text_encoder_2: Option<TextEncoder2Config>,
    pub scheduler: SchedulerConfig,
    /// The token id prompts are padded with (`<|endoftext|>` for SD1 and SDXL's first tokenizer, `!` = 0 for
    /// SD2).
    pub pad_token: u32,
    /// The pad token of SDXL's second tokenizer (`!` = 0).
    pub pad_token_2: u32,
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
    /// An SDXL single file's `v_pred` marker key, which AUTOMATIC1111 and ComfyUI read (v-prediction
    /// fine-tunes such as NoobAI-XL V-Pred carry it, and `ztsnr` when trained with zero terminal SNR).
    Marker,
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

/// The components of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComponentKind {
    Unet,
    Vae,
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl ComponentKind {
    pub const ALL: [ComponentKind; 4] = [
        ComponentKind::Unet,
        ComponentKind::Vae,
        ComponentKind::TextEncoder,
        ComponentKind::TextEncoder2,
    ];

    pub fn label(&self) -> &'static str {
        match self {
            ComponentKind::Unet => "UNet",
            ComponentKind::Vae => "VAE",
            ComponentKind::TextEncoder => "text encoder",
            ComponentKind::TextEncoder2 => "text encoder 2",
        }
    }
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
    text_encoder_2: Option<Component>,
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

    /// Where a component's tensors are (`None` for a second text encoder the model does not have).
    pub fn component(&self, kind: ComponentKind) -> Option<&Component> {
        match kind {
            ComponentKind::Unet => Some(&self.unet),
            ComponentKind::Vae => Some(&self.vae),
            ComponentKind::TextEncoder => Some(&self.text_encoder),
            ComponentKind::TextEncoder2 => self.text_encoder_2.as_ref(),
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

    /// SDXL's second text encoder, if the model has one.
    pub fn load_text_encoder_2(
        &self,
        device: &Device,
        dtype: DType,
    ) -> Result<Option<ClipTextTransformer>, ModelError> {
        let (Some(component), Some(config)) = (&self.text_encoder_2, &self.config.text_encoder_2)
        else {
            return Ok(None);
        };
        build(component, "text encoder 2", device, dtype, |vb| {
            ClipTextTransformer::with_projection(vb, config)
        })
        .map(Some)
    }
}

/// How a model of `config` names each component's tensors in a single file of the original layout.
pub fn single_file_names(config: &ModelConfig, kind: ComponentKind) -> NameMap {
    match kind {
        ComponentKind::Unet => NameMap::LdmUnet {
            layers_per_block: config.unet.layers_per_block,
            up_attention: config.unet.up_attention.clone(),
        },
        ComponentKind::Vae => NameMap::LdmVae {
            levels: config.vae.block_out_channels.len(),
        },
        ComponentKind::TextEncoder => match config.family {
            ModelFamily::Sd1 => NameMap::LdmClip {
                prefix: names::LDM_CLIP,
            },
            ModelFamily::Sd2 => NameMap::OpenClip {
                prefix: names::LDM_OPEN_CLIP,
                hidden: config.text_encoder.hidden_size,
            },
            ModelFamily::Sdxl => NameMap::LdmClip {
                prefix: names::SDXL_CLIP_L,
            },
        },
        ComponentKind::TextEncoder2 => NameMap::OpenClip {
            prefix: names::SDXL_OPEN_CLIP,
            hidden: config
                .text_encoder_2
                .as_ref()
                .map_or(0, |te| te.text.hidden_size),
        },
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
    let sdxl = check_is_sd_checkpoint(path, &files)?;
    let sidecars = sidecar::read_sidecars(path)?;
    let config = if sdxl {
        sdxl_single_file_config(&files, &sidecars)?
    } else {
        sd_single_file_config(&files, &sidecars)?
    };
    let component = |kind| Component {
        files: files.clone(),
        names: single_file_names(&config, kind),
    };
    Ok(ModelSource {
        path: path.to_path_buf(),
        layout,
        unet: component(ComponentKind::Unet),
        vae: component(ComponentKind::Vae),
        text_encoder: component(ComponentKind::TextEncoder),
        text_encoder_2: config
            .text_encoder_2
            .is_some()
            .then(|| component(ComponentKind::TextEncoder2)),
        config,
        config_files: sidecars.sources,
    })
}

/// The configuration of an SD1/SD2 single file: its sidecars, else what its shapes imply.
fn sd_single_file_config(
    files: &TensorFiles,
    sidecars: &sidecar::SidecarConfig,
) -> Result<ModelConfig, ModelError> {
    let te_layout =
        infer::text_encoder_layout(files).unwrap_or(if sidecars.open_clip == Some(true) {
            TextEncoderLayout::OpenClip
        } else {
            TextEncoderLayout::Clip
        });
    let unet = match &sidecars.unet {
        Some(unet) => unet.clone(),
        None => infer::infer_unet(files)?,
    };
    let vae = match &sidecars.vae {
        Some(vae) => vae.clone(),
        None => infer::infer_vae(files)?,
    };
    let text_encoder = match &sidecars.text_encoder {
        Some(te) => te.clone(),
        None => infer::infer_text_encoder(files, te_layout)?,
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
        (None, _) => PredictionOrigin::Default,
    };
    let scheduler = sidecars
        .scheduler
        .clone()
        .unwrap_or_else(|| SchedulerConfig {
            prediction_type: if family == ModelFamily::Sd2 {
                PredictionType::VPrediction
            } else {
                PredictionType::Epsilon
            },
            ..SchedulerConfig::default()
        });
    Ok(ModelConfig {
        family,
        unet,
        vae,
        text_encoder,
        text_encoder_2: None,
        scheduler,
        pad_token: default_pad_token(family),
        pad_token_2: 0,
        prediction_origin,
    })
}

/// The marker key of a v-prediction SDXL fine-tune (an empty tensor; only its presence counts).
pub const V_PREDICTION_MARKER: &str = "v_pred";
/// The marker key of an SDXL fine-tune trained with zero terminal SNR.
pub const ZERO_TERMINAL_SNR_MARKER: &str = "ztsnr";

/// The configuration of an SDXL single file: its sidecars, else its shapes; the prediction type from a
/// sidecar, else from the `v_pred`/`ztsnr` markers, else epsilon (SDXL base).
fn sdxl_single_file_config(
    files: &TensorFiles,
    sidecars: &sidecar::SidecarConfig,
) -> Result<ModelConfig, ModelError> {
    let unet = match &sidecars.unet {
        Some(unet) => unet.clone(),
        None => infer::infer_unet(files)?,
    };
    let vae = match &sidecars.vae {
        Some(vae) => vae.clone(),
        None => VaeConfig {
            scaling_factor: sidecars.vae_scaling_factor.unwrap_or(SDXL_SCALING_FACTOR),
            ..infer::infer_vae(files)?
        },
    };
    let (text_encoder, text_encoder_2) = match (&sidecars.text_encoder, &sidecars.text_encoder_2) {
        (Some(first), Some(second)) => (first.clone(), second.clone()),
        (first, second) => {
            let (inferred_first, inferred_second) = infer::infer_sdxl_text_encoders(files)?;
            (
                first.clone().unwrap_or(inferred_first),
                second.clone().unwrap_or(inferred_second),
            )
        }
    };
    let (scheduler, prediction_origin) = match &sidecars.scheduler {
        Some(scheduler) => (scheduler.clone(), PredictionOrigin::Config),
        None if files.contains(V_PREDICTION_MARKER) => (
            SchedulerConfig {
                prediction_type: PredictionType::VPrediction,
                rescale_betas_zero_snr: files.contains(ZERO_TERMINAL_SNR_MARKER),
                ..SchedulerConfig::default()
            },
            PredictionOrigin::Marker,
        ),
        None => (SchedulerConfig::default(), PredictionOrigin::Default),
    };
    Ok(ModelConfig {
        family: ModelFamily::Sdxl,
        unet,
        vae,
        text_encoder,
        text_encoder_2: Some(text_encoder_2),
        scheduler,
        pad_token: END_OF_TEXT,
        pad_token_2: 0,
        prediction_origin,
    })
}
/// What a checkpoint of a family this program recognises but does not run is (`has_key_prefix` tells whether
/// any tensor name starts with a prefix): the SDXL refiner (OpenCLIP as its only, first embedder), EDM
/// models (CosXL, Playground v2.5) and fp8 files.
pub fn unsupported_checkpoint(has_key_prefix: impl Fn(&str) -> bool) -> Option<&'static str> {
    if has_key_prefix("conditioner.embedders.0.model.") {
        Some(SDXL_REFINER)
    } else if has_key_prefix("edm_vpred.") {
        Some(
            "an EDM v-prediction model (CosXL), whose continuous noise schedule lora-studio does not run",
        )
    } else if has_key_prefix("edm_mean") {
        Some(
            "an EDM model with latent statistics (Playground v2.5), which lora-studio does not run",
        )
    } else if has_key_prefix("scaled_fp8") {
        Some(
            "an fp8 checkpoint (scaled_fp8), which lora-studio cannot read; use an fp16 or bf16 file",
        )
    } else {
        None
    }
}

/// What the SDXL refiner is, for the sentence refusing it.
const SDXL_REFINER: &str = "an SDXL refiner, which only refines the SDXL base model's images and is \
                            conditioned differently (lora-studio runs SDXL base models and their fine-tunes)";

/// Refuses files that are clearly something else, with a sentence saying what they are; says whether the
/// checkpoint is an SDXL one (`conditioner.embedders.*`, `label_emb.*`).
fn check_is_sd_checkpoint(path: &Path, files: &TensorFiles) -> Result<bool, ModelError> {
    let any = |prefix: &str| files.keys().any(|k| k.starts_with(prefix));
    if let Some(what) = unsupported_checkpoint(any) {
        return Err(ModelError::Unsupported(format!(
            "{} is {what}",
            path.display()
        )));
    }
    if any(names::LDM_UNET) {
        return Ok(any("conditioner.embedders.") || any(&format!("{}label_emb.", names::LDM_UNET)));
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
    let has = |part: &str| folder.join(part).is_dir();
    let missing = |part: &str| {
        not_model(format!(
            "it has no `{part}/` subfolder (a diffusers model folder has unet/, vae/, text_encoder/ and \
             tokenizer/, and an SDXL one text_encoder_2/ and tokenizer_2/ too)"
        ))
    };
    for part in ["unet", "vae"] {
        if !has(part) {
            return Err(missing(part));
        }
    }
    let mut files = Vec::new();
    let unet = read_config(
        folder,
        "unet/config.json",
        &mut files,
        UNetConfig::from_diffusers_json,
    )?;
    if unet.addition.is_some() && !has("text_encoder") && has("text_encoder_2") {
        return Err(ModelError::Unsupported(format!(
            "{} is {SDXL_REFINER}",
            folder.display()
        )));
    }
    if !has("text_encoder") {
        return Err(missing("text_encoder"));
    }
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
    let text_encoder_2 = match &unet.addition {
        Some(addition) => {
            if !has("text_encoder_2") {
                return Err(missing("text_encoder_2"));
            }
            let config = read_config(
                folder,
                "text_encoder_2/config.json",
                &mut files,
                TextEncoder2Config::from_transformers_json,
            )?;
            if config.projection_dim != addition.pooled_dim() {
                return Err(ModelError::Unsupported(format!(
                    "{}: the UNet takes a pooled text embedding of width {} besides {} size values, but the \
                     second text encoder makes one of width {} (an SDXL refiner takes other conditioning)",
                    folder.display(),
                    addition.pooled_dim(),
                    crate::models::unet::TextTimeEmbedding::TIME_IDS,
                    config.projection_dim
                )));
            }
            Some(config)
        }
        None => None,
    };
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
    let family = if text_encoder_2.is_some() {
        ModelFamily::Sdxl
    } else if text_encoder.hidden_act == ClipActivation::Gelu || unet.cross_attention_dim == 1024 {
        ModelFamily::Sd2
    } else {
        ModelFamily::Sd1
    };
    let pad_token =
        read_pad_token(&folder.join("tokenizer")).unwrap_or_else(|| default_pad_token(family));
    let pad_token_2 = read_pad_token(&folder.join("tokenizer_2")).unwrap_or(0);
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
        text_encoder_2: text_encoder_2
            .is_some()
            .then(|| component("text_encoder_2", "model"))
            .transpose()?,
        config: ModelConfig {
            family,
            unet,
            vae,
            text_encoder,
            text_encoder_2,
            scheduler,
            pad_token,
            pad_token_2,
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

/// The pad token a diffusers tokenizer folder declares (`<|endoftext|>` for SD1 and SDXL's first, `!` for
/// SD2 and SDXL's second).
fn read_pad_token(tokenizer: &Path) -> Option<u32> {
    ["special_tokens_map.json", "tokenizer_config.json"]
        .iter()
        .find_map(|name| {
            let text = std::fs::read_to_string(tokenizer.join(name)).ok()?;
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
        ModelFamily::Sd1 | ModelFamily::Sdxl => END_OF_TEXT,
        ModelFamily::Sd2 => 0,
    }
}
