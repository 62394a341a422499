//! The captioning models against transformers (fixtures from `tests/fixtures/captioners/generate.py`):
//! image preprocessing, BLIP's image embeddings and greedy caption, CLIP's image and text embeddings, and
//! CLIP interrogation over the shipped vocabularies.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixture};
use lora_studio::label::interrogate::Vocabulary;
use lora_studio::label::{CaptionSettings, Captioner};
use lora_studio::models::blip::{BlipCaptioner, BlipConfig, CaptionLength};
use lora_studio::models::checkpoint::{build, transformers_weights};
use lora_studio::models::clip_embedder::{ClipEmbedder, ClipEmbedderConfig};
use lora_studio::models::image_processor::{SquareFit, pixel_values};
use lora_studio::models::wordpiece::WordPieceDecoder;
use lora_studio::tensor_file::TensorFile;

fn expected(name: &str) -> Tensor {
    TensorFile::open(&fixture("captioners/expected.safetensors"))
        .unwrap()
        .load(name, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn expected_json() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("captioners/expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn config(folder: &str) -> serde_json::Value {
    let text =
        std::fs::read_to_string(fixture(&format!("captioners/{folder}/config.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn blip() -> BlipCaptioner {
    let config = BlipConfig::from_json(&config("blip")).unwrap();
    let weights = transformers_weights(&fixture("captioners/blip")).unwrap();
    build(&weights, "BLIP", &Device::Cpu, DType::F32, |vb| {
        BlipCaptioner::new(vb, &config)
    })
    .unwrap()
}

fn clip() -> ClipEmbedder {
    let config = ClipEmbedderConfig::from_json(&config("clip")).unwrap();
    let weights = transformers_weights(&fixture("captioners/clip")).unwrap();
    build(&weights, "CLIP", &Device::Cpu, DType::F32, |vb| {
        ClipEmbedder::new(vb, &config)
    })
    .unwrap()
}

fn test_image() -> image::DynamicImage {
    image::open(fixture("captioners/image.png")).unwrap()
}

#[test]
fn image_preprocessing_matches_the_transformers_processors() {
    let image = test_image();
    // Pillow's bicubic resampling is reproduced bit for bit; only float rounding may differ.
    let blip = pixel_values(&image, 32, SquareFit::Stretch, &Device::Cpu).unwrap();
    assert_close("BLIP pixels", &blip, &expected("blip_pixel_values"), 1e-6);
    let clip = pixel_values(&image, 32, SquareFit::ResizeThenCrop, &Device::Cpu).unwrap();
    assert_close("CLIP pixels", &clip, &expected("clip_pixel_values"), 1e-6);
}

#[test]
fn blip_image_embeddings_match_transformers() {
    let embeds = blip().image_embeds(&expected("blip_pixel_values")).unwrap();
    assert_close(
        "BLIP image embeddings",
        &embeds,
        &expected("blip_image_embeds"),
        1e-4,
    );
}

#[test]
fn blip_greedy_caption_matches_transformers() {
    let json = expected_json();
    let length = CaptionLength {
        min_tokens: json["blip_min_new_tokens"].as_u64().unwrap() as usize,
        max_tokens: json["blip_max_new_tokens"].as_u64().unwrap() as usize,
    };
    let ids = blip()
        .caption_ids(&expected("blip_pixel_values"), length)
        .unwrap();
    let reference: Vec<u32> = json["blip_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, reference);
    let decoder = WordPieceDecoder::from_folder(&fixture("captioners/blip")).unwrap();
    assert_eq!(decoder.decode(&ids), json["blip_caption"].as_str().unwrap());
}

#[test]
fn clip_embeddings_match_transformers() {
    let model = clip();
    let image = model.image_embeds(&expected("clip_pixel_values")).unwrap();
    assert_close(
        "CLIP image embeddings",
        &image,
        &expected("clip_image_embeds"),
        1e-4,
    );
    let sequences: Vec<Vec<u32>> = expected_json()["clip_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let ids: Vec<u32> = s
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            // Trailing end-of-text padding is the embedder's own; give it the unpadded sequences.
            let end = ids.iter().position(|&t| t == 49407).unwrap();
            ids[..=end].to_vec()
        })
        .collect();
    let text = model.text_embeds(&sequences).unwrap();
    assert_close(
        "CLIP text embeddings",
        &text,
        &expected("clip_text_embeds"),
        1e-4,
    );
}

#[test]
fn captioners_load_from_their_folders_and_describe_images() {
    let settings = CaptionSettings {
        length: CaptionLength {
            min_tokens: 4,
            max_tokens: 12,
        },
        ..CaptionSettings::default()
    };
    let image = test_image();
    let blip = Captioner::load(&fixture("captioners/blip"), &Device::Cpu, &settings).unwrap();
    let sentence = blip.describe(&image, &Device::Cpu).unwrap();
    assert_eq!(sentence.len(), 1);
    assert!(!sentence[0].is_empty());
    assert_eq!(
        blip.describe(&image, &Device::Cpu).unwrap(),
        sentence,
        "not deterministic"
    );

    let clip = Captioner::load(&fixture("captioners/clip"), &Device::Cpu, &settings).unwrap();
    let tags = clip.describe(&image, &Device::Cpu).unwrap();
    let vocabularies = Vocabulary::builtin();
    assert_eq!(
        tags.len(),
        vocabularies.len(),
        "one tag per vocabulary: {tags:?}"
    );
    for (tag, vocabulary) in tags.iter().zip(&vocabularies) {
        assert!(
            vocabulary.phrases.contains(tag),
            "{tag} is not from {}",
            vocabulary.name
        );
    }
}

#[test]
fn interrogation_ranks_every_phrase_by_cosine_similarity() {
    let vocabularies = vec![Vocabulary::parse(
        "colours",
        "red\nblue\ngreen\na photo of a cat\n",
    )];
    let interrogator =
        lora_studio::label::interrogate::Interrogator::new(clip(), vocabularies, 2).unwrap();
    let ranked = interrogator.rank(&test_image(), &Device::Cpu).unwrap();
    assert_eq!(ranked.len(), 1);
    let phrases = &ranked[0].1;
    assert_eq!(phrases.len(), 4);
    for pair in phrases.windows(2) {
        assert!(pair[0].similarity >= pair[1].similarity);
    }
    for p in phrases {
        assert!((-1.0..=1.0).contains(&p.similarity), "{p:?}");
    }
    let tags = interrogator.tags(&test_image(), &Device::Cpu).unwrap();
    assert_eq!(tags, [phrases[0].phrase.clone(), phrases[1].phrase.clone()]);
}

#[test]
fn a_folder_that_is_not_a_captioner_is_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "bert"}"#).unwrap();
    std::fs::copy(
        fixture("captioners/blip/model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let message = Captioner::load(dir.path(), &Device::Cpu, &CaptionSettings::default())
        .unwrap_err()
        .to_string();
    assert!(message.contains("the model type is `bert`"), "{message}");
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "blip"}"#).unwrap();
    let message = Captioner::load(dir.path(), &Device::Cpu, &CaptionSettings::default())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("has no vocab.txt or tokenizer.json"),
        "{message}"
    );
    std::fs::copy(
        fixture("captioners/blip/vocab.txt"),
        dir.path().join("vocab.txt"),
    )
    .unwrap();
    let message = Captioner::load(dir.path(), &Device::Cpu, &CaptionSettings::default())
        .unwrap_err()
        .to_string();
    assert!(message.contains("model.safetensors"), "{message}");
}
