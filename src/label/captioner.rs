//! The captioning models `label` runs, built from a model folder in the transformers layout
//! (`config.json` + `model.safetensors` or `pytorch_model.bin`): BLIP for a sentence, CLIP for tags.

use std::path::Path;

use candle_core::{DType, Device};
use image::DynamicImage;

use super::LabelError;
use super::interrogate::{Interrogator, Vocabulary};
use crate::models::ModelError;
use crate::models::blip::{BlipCaptioner, BlipConfig, DEFAULT_DECODING};
use crate::models::checkpoint::{build, transformers_weights};
use crate::models::clip_embedder::{ClipEmbedder, ClipEmbedderConfig};
use crate::models::decoding::Decoding;
use crate::models::image_processor::{SquareFit, pixel_values};
use crate::models::wordpiece::WordPieceDecoder;

/// How captions are made.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionSettings {
    /// BLIP: caption length, beams and repetition penalty.
    pub decoding: Decoding,
    /// CLIP: the best phrases taken from each vocabulary.
    pub tags_per_vocabulary: usize,
    /// CLIP: the phrase lists to rank.
    pub vocabularies: Vec<Vocabulary>,
}

impl Default for CaptionSettings {
    fn default() -> Self {
        Self {
            decoding: DEFAULT_DECODING,
            tags_per_vocabulary: 1,
            vocabularies: Vocabulary::builtin(),
        }
    }
}

/// A loaded captioning model.
#[derive(Debug, Clone)]
pub enum Captioner {
    /// A sentence from BLIP.
    Blip {
        model: Box<BlipCaptioner>,
        decoder: WordPieceDecoder,
        decoding: Decoding,
    },
    /// Phrases ranked by CLIP.
    Clip(Box<Interrogator>),
}

impl Captioner {
    /// Loads the model in `folder`, telling BLIP from CLIP by its `config.json`.
    pub fn load(
        folder: &Path,
        device: &Device,
        settings: &CaptionSettings,
    ) -> Result<Self, LabelError> {
        let config_path = folder.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| LabelError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            LabelError::Input(format!(
                "{}: it is not valid JSON ({e})",
                config_path.display()
            ))
        })?;
        let in_file = |e: ModelError| LabelError::Input(format!("{}: {e}", config_path.display()));
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let weights = transformers_weights(folder)?;
        match model_type {
            "blip" => {
                let blip_config = BlipConfig::from_json(&config).map_err(in_file)?;
                let decoder = WordPieceDecoder::from_folder(folder)?;
                let model = build(&weights, "BLIP captioner", device, DType::F32, |vb| {
                    BlipCaptioner::new(vb, &blip_config)
                })?;
                Ok(Self::Blip {
                    model: Box::new(model),
                    decoder,
                    decoding: settings.decoding,
                })
            }
            "clip" => {
                let clip_config = ClipEmbedderConfig::from_json(&config).map_err(in_file)?;
                let model = build(&weights, "CLIP model", device, DType::F32, |vb| {
                    ClipEmbedder::new(vb, &clip_config)
                })?;
                Ok(Self::Clip(Box::new(Interrogator::new(
                    model,
                    settings.vocabularies.clone(),
                    settings.tags_per_vocabulary,
                )?)))
            }
            other => Err(LabelError::Input(format!(
                "{}: the model type is `{other}`; lora-studio captions with BLIP (`blip`) and CLIP (`clip`) models",
                config_path.display()
            ))),
        }
    }

    /// What this model adds to a caption: one sentence (BLIP) or tags (CLIP).
    pub fn describe(
        &self,
        image: &DynamicImage,
        device: &Device,
    ) -> Result<Vec<String>, LabelError> {
        match self {
            Self::Blip {
                model,
                decoder,
                decoding,
            } => {
                let compute = |e| LabelError::compute("captioning with BLIP", e);
                let size = model.config().vision.image_size as u32;
                let pixels =
                    pixel_values(image, size, SquareFit::Stretch, device).map_err(compute)?;
                let ids = model.caption_ids(&pixels, decoding).map_err(compute)?;
                let sentence = decoder.decode(&ids);
                Ok(if sentence.is_empty() {
                    Vec::new()
                } else {
                    vec![sentence]
                })
            }
            Self::Clip(interrogator) => interrogator.tags(image, device),
        }
    }

    /// The model kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Blip { .. } => "BLIP",
            Self::Clip(_) => "CLIP",
        }
    }
}
