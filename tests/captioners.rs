//! The captioning models against transformers (fixtures from `tests/fixtures/captioners/generate.py`):
//! image preprocessing, BLIP's image embeddings and its captions (greedy, beam search, repetition penalty),
//! CLIP's image and text embeddings, and CLIP interrogation over the shipped vocabularies.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixture};
use lora_studio::label::interrogate::Vocabulary;
use lora_studio::label::{CaptionSettings, Captioner};
use lora_studio::models::blip::{BlipCaptioner, BlipConfig, DEFAULT_DECODING};
use lora_studio::models::checkpoint::{build, transformers_weights};
use lora_studio::models::clip_embedder::{ClipEmbedder, ClipEmbedderConfig};
use lora_studio::models::decoding::Decoding;
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

fn token_ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// The length limits the fixture's captions were decoded with, and the given beams and penalty.
fn fixture_decoding(beams: usize, repetition_penalty: f32) -> Decoding {
    let json = expected_json();
    Decoding {
        min_tokens: json["blip_min_new_tokens"].as_u64().unwrap() as usize,
        max_tokens: json["blip_max_new_tokens"].as_u64().unwrap() as usize,
        beams,
        repetition_penalty,
    }
}

#[test]
fn blip_greedy_caption_matches_transformers() {
    let json = expected_json();
    let ids = blip()
        .caption_ids(&expected("blip_pixel_values"), &fixture_decoding(1, 1.0))
        .unwrap();
    assert_eq!(ids, token_ids(&json["blip_token_ids"]));
    let decoder = WordPieceDecoder::from_folder(&fixture("captioners/blip")).unwrap();
    assert_eq!(decoder.decode(&ids), json["blip_caption"].as_str().unwrap());
}

/// The fixture BLIP with its language-model head's LayerNorm scaled by `head_scale` and `sep_bias` added
/// to the `[SEP]` logit, as `generate.py` makes its variants.
fn blip_variant(head_scale: f64, sep_bias: f64) -> BlipCaptioner {
    let config = BlipConfig::from_json(&config("blip")).unwrap();
    let path = fixture("captioners/blip/model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let head = "text_decoder.cls.predictions";
    for part in ["weight", "bias"] {
        let name = format!("{head}.transform.LayerNorm.{part}");
        let scaled = tensors[&name].affine(head_scale, 0.0).unwrap();
        tensors.insert(name, scaled);
    }
    let bias_name = [format!("{head}.bias"), format!("{head}.decoder.bias")]
        .into_iter()
        .find(|name| tensors.contains_key(name))
        .unwrap();
    let bias = &tensors[&bias_name];
    let sep = config.text.sep_token_id as usize;
    let mut raised = bias.to_vec1::<f32>().unwrap();
    raised[sep] += sep_bias as f32;
    let raised = Tensor::from_vec(raised, bias.dims(), &Device::Cpu).unwrap();
    tensors.insert(bias_name, raised);
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    BlipCaptioner::new(vb, &config).unwrap()
}

#[test]
fn blip_beam_search_and_repetition_penalty_match_transformers() {
    let json = expected_json();
    let pixels = expected("blip_pixel_values");
    let cases = json["blip_decodings"].as_array().unwrap();
    assert_eq!(cases.len(), 15);
    let mut ended_early = 0;
    for case in cases {
        let model = blip_variant(
            case["head_scale"].as_f64().unwrap(),
            case["sep_bias_added"].as_f64().unwrap(),
        );
        let decoding = fixture_decoding(
            case["beams"].as_u64().unwrap() as usize,
            case["repetition_penalty"].as_f64().unwrap() as f32,
        );
        let ids = model.caption_ids(&pixels, &decoding).unwrap();
        assert_eq!(ids, token_ids(&case["token_ids"]), "{case}");
        ended_early += usize::from(ids.len() <= decoding.max_tokens);
    }
    // The variants exercise captions that end before the limit, where beam search ranks finished ones.
    assert!(ended_early >= 5, "{ended_early}");
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
        decoding: Decoding {
            min_tokens: 4,
            max_tokens: 12,
            ..DEFAULT_DECODING
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
