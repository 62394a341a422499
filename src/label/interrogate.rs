//! CLIP interrogation: phrases from vocabularies (medium, style, lighting, colour, subject) ranked by how
//! well CLIP says they match an image; the best of each become tags after the sentence caption.
//!
//! The phrases are embedded once when the interrogator is built; each image then costs one vision pass
//! and a matrix product.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::DynamicImage;

use super::LabelError;
use crate::models::clip_embedder::{ClipEmbedder, unit_rows};
use crate::models::image_processor::{SquareFit, pixel_values};
use crate::models::tokenizer::{ClipTokenizer, END_OF_TEXT, MAX_TOKENS, START_OF_TEXT};

/// The vocabularies shipped in `assets/interrogate/`, in the order their tags are written.
const BUILTIN: [(&str, &str); 5] = [
    (
        "subject",
        include_str!("../../assets/interrogate/subject.txt"),
    ),
    (
        "medium",
        include_str!("../../assets/interrogate/medium.txt"),
    ),
    ("style", include_str!("../../assets/interrogate/style.txt")),
    (
        "lighting",
        include_str!("../../assets/interrogate/lighting.txt"),
    ),
    (
        "colour",
        include_str!("../../assets/interrogate/colour.txt"),
    ),
];

/// Phrases embedded per batch when building.
const TEXT_BATCH: usize = 32;

/// A named list of candidate phrases.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocabulary {
    pub name: String,
    pub phrases: Vec<String>,
}

impl Vocabulary {
    /// One phrase per non-empty line; lines starting with `#` are comments.
    pub fn parse(name: &str, text: &str) -> Self {
        Self {
            name: name.to_string(),
            phrases: text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect(),
        }
    }

    /// The vocabularies compiled into the program.
    pub fn builtin() -> Vec<Self> {
        BUILTIN
            .iter()
            .map(|(name, text)| Self::parse(name, text))
            .collect()
    }

    /// Every `*.txt` in `dir` (named by the file stem), sorted by name.
    pub fn from_folder(dir: &Path) -> Result<Vec<Self>, LabelError> {
        let io = |source| LabelError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "txt"))
            .collect();
        files.sort();
        let mut vocabularies = Vec::new();
        for path in files {
            let text = std::fs::read_to_string(&path).map_err(|source| LabelError::Io {
                path: path.clone(),
                source,
            })?;
            let name = path.file_stem().unwrap_or_default().to_string_lossy();
            let vocabulary = Self::parse(&name, &text);
            if !vocabulary.phrases.is_empty() {
                vocabularies.push(vocabulary);
            }
        }
        if vocabularies.is_empty() {
            return Err(LabelError::Input(format!(
                "{} has no .txt vocabulary with phrases in it",
                dir.display()
            )));
        }
        Ok(vocabularies)
    }
}

/// A vocabulary with its phrases' unit text embeddings, `[phrases, projection]`.
#[derive(Debug, Clone)]
struct EmbeddedVocabulary {
    vocabulary: Vocabulary,
    embeddings: Tensor,
}

/// One phrase and its cosine similarity to the image.
#[derive(Debug, Clone, PartialEq)]
pub struct RankedPhrase {
    pub phrase: String,
    pub similarity: f32,
}

/// A CLIP model with embedded vocabularies.
#[derive(Debug, Clone)]
pub struct Interrogator {
    model: ClipEmbedder,
    vocabularies: Vec<EmbeddedVocabulary>,
    per_vocabulary: usize,
}

impl Interrogator {
    /// Embeds every phrase; `per_vocabulary` is how many of each vocabulary's best phrases become tags.
    pub fn new(
        model: ClipEmbedder,
        vocabularies: Vec<Vocabulary>,
        per_vocabulary: usize,
    ) -> Result<Self, LabelError> {
        let tokenizer = ClipTokenizer::shared().map_err(LabelError::Input)?;
        let compute = |e| LabelError::compute("embedding the interrogation phrases", e);
        let mut embedded = Vec::with_capacity(vocabularies.len());
        for vocabulary in vocabularies {
            let mut parts = Vec::new();
            for batch in vocabulary.phrases.chunks(TEXT_BATCH) {
                let sequences: Vec<Vec<u32>> = batch
                    .iter()
                    .map(|phrase| {
                        let mut ids = vec![START_OF_TEXT];
                        ids.extend(tokenizer.encode(phrase).into_iter().take(MAX_TOKENS - 2));
                        ids.push(END_OF_TEXT);
                        ids
                    })
                    .collect();
                parts.push(model.text_embeds(&sequences).map_err(compute)?);
            }
            let embeddings = unit_rows(&Tensor::cat(&parts, 0).map_err(compute)?)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(compute)?;
            embedded.push(EmbeddedVocabulary {
                vocabulary,
                embeddings,
            });
        }
        Ok(Self {
            model,
            vocabularies: embedded,
            per_vocabulary,
        })
    }

    /// Every vocabulary's phrases, best first, with their similarity to `image`.
    pub fn rank(
        &self,
        image: &DynamicImage,
        device: &Device,
    ) -> Result<Vec<(String, Vec<RankedPhrase>)>, LabelError> {
        let compute = |e| LabelError::compute("ranking phrases with CLIP", e);
        let pixels = pixel_values(
            image,
            self.model.image_size() as u32,
            SquareFit::ResizeThenCrop,
            device,
        )
        .map_err(compute)?;
        let image_embedding = self
            .model
            .image_embeds(&pixels)
            .and_then(|e| unit_rows(&e))
            .and_then(|e| e.to_dtype(DType::F32))
            .map_err(compute)?;
        let mut ranked = Vec::with_capacity(self.vocabularies.len());
        for v in &self.vocabularies {
            let similarities = v
                .embeddings
                .matmul(&image_embedding.t().map_err(compute)?)
                .and_then(|s| s.flatten_all())
                .and_then(|s| s.to_vec1::<f32>())
                .map_err(compute)?;
            let mut phrases: Vec<RankedPhrase> = v
                .vocabulary
                .phrases
                .iter()
                .zip(similarities)
                .map(|(phrase, similarity)| RankedPhrase {
                    phrase: phrase.clone(),
                    similarity,
                })
                .collect();
            phrases.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
            ranked.push((v.vocabulary.name.clone(), phrases));
        }
        Ok(ranked)
    }

    /// The best `per_vocabulary` phrases of each vocabulary, in vocabulary order.
    pub fn tags(&self, image: &DynamicImage, device: &Device) -> Result<Vec<String>, LabelError> {
        Ok(self
            .rank(image, device)?
            .into_iter()
            .flat_map(|(_, phrases)| phrases.into_iter().take(self.per_vocabulary))
            .map(|p| p.phrase)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_vocabularies_are_non_empty_and_unique() {
        let vocabularies = Vocabulary::builtin();
        assert_eq!(vocabularies.len(), 5);
        for v in &vocabularies {
            assert!(v.phrases.len() >= 20, "{} has {}", v.name, v.phrases.len());
            let mut sorted = v.phrases.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), v.phrases.len(), "{} repeats a phrase", v.name);
        }
    }

    #[test]
    fn parse_skips_blank_lines_and_comments() {
        let v = Vocabulary::parse("x", "# heading\n\n  oil painting \nwatercolor\n");
        assert_eq!(v.phrases, ["oil painting", "watercolor"]);
    }
}
