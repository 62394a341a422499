//! Language-model adapters in the formats other tools read and write: PEFT adapter folders made by peft
//! (rsLoRA, rank and alpha patterns, DoRA, `.bin` weights) attached with peft's logits; lora-studio's own
//! exports (the PEFT folder and the llama.cpp GGUF adapter) read back; merged model folders.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, gguf_file};
use candle_core::{DType, Device};
use common::causal_lm::{
    at_positions, folder, load, padded_batch, padded_text_positions, reference,
};
use common::{Reference, assert_close, fixture};
use lora_studio::chat::{ChatFiles, ChatMessage, RenderOptions};
use lora_studio::config::{SavePrecision, TrainConfig};
use lora_studio::lora::{
    LoraAdapter, LoraNetwork, NetworkKind, NetworkSpec, PeftAdapter, PeftExport, TargetComponent,
    export_network, write_peft_adapter,
};
use lora_studio::models::causal_lm::{
    AdapterNames, CausalLm, generate, llama_cpp_tensor_name, merge_into_folder, write_gguf_adapter,
};
use lora_studio::models::inspect::{FileReport, inspect};
use lora_studio::tensor_file::TensorFile;
use lora_studio::tensor_file::gguf::read_gguf_header;
use lora_studio::train::write_causal_lm_exports;

fn adapters_folder() -> PathBuf {
    fixture("causal_lm/adapters")
}

fn attach(model: &CausalLm, adapter: &Path) -> usize {
    let adapter = PeftAdapter::load(adapter, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    let report = adapter
        .attach(model.layers(), 1.0, model.dtype())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(report.unmatched.is_empty(), "{:?}", report.unmatched);
    report.adapters.len()
}

/// The base model of `family` with the adapter `name` (made by peft) attached: logits of the padded
/// reference batch against peft's.
fn peft_variant_matches(family: &str, name: &str, modules: usize) {
    let model = load(family, DType::F32);
    assert_eq!(attach(&model, &adapters_folder().join(name)), modules);
    let base = reference(family);
    let text = padded_text_positions(&base);
    let logits = model.forward(&padded_batch(&base), None).unwrap();
    let expected = Reference::at(&adapters_folder().join("reference.safetensors"))
        .tensor(&format!("{name}.logits"));
    // The adapter must change the logits well beyond the tolerance, or the comparison shows nothing.
    let unadapted = at_positions(&base.tensor("padded.logits"), &text);
    let adapted = at_positions(&expected, &text);
    assert!(common::max_abs_diff(&unadapted, &adapted) > 1e-2);
    assert_close(
        &format!("{family} logits with {name}"),
        &at_positions(&logits, &text),
        &adapted,
        1e-4,
    );
}

#[test]
fn rslora_with_rank_and_alpha_patterns_matches_peft() {
    peft_variant_matches("qwen2", "qwen2_rslora", 14);
}

#[test]
fn dora_matches_peft() {
    peft_variant_matches("qwen2", "qwen2_dora", 6);
}

#[test]
fn adapters_saved_as_bin_match_peft() {
    peft_variant_matches("llama", "llama_bin", 14);
}

#[test]
fn an_adapter_for_another_base_names_the_shape_mismatch() {
    let model = load("llama", DType::F32);
    let adapter = PeftAdapter::load(&folder("qwen2").join("lora"), &Device::Cpu).unwrap();
    let error = adapter
        .attach(model.layers(), 1.0, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(error.contains("another base model"), "{error}");
    assert!(error.contains("shape"), "{error}");
    assert_eq!(error.lines().count(), 1, "{error}");
    assert!(
        model
            .layers()
            .slots()
            .iter()
            .all(|s| s.adapters().is_empty()),
        "a failed attach must leave the model untouched"
    );
}

/// A network on every adapter-capable layer of `model` as training leaves it: random A and B (B is zero
/// only before the first step).
fn trained_network(model: &CausalLm, seed: u64) -> LoraNetwork {
    let component = TargetComponent {
        prefix: "lora_lm",
        slots: model.layers().slots(),
        group: 0,
    };
    let spec = NetworkSpec {
        rank: 4,
        alpha: 8.0,
        conv_rank: 0,
        conv_alpha: 0.0,
        kind: NetworkKind::Lora,
    };
    let network = LoraNetwork::create(&[component], spec, seed, &Device::Cpu).unwrap();
    for module in network.modules() {
        let up = module.up.as_tensor();
        let values = (up.randn_like(0.0, 0.1).unwrap())
            .to_dtype(up.dtype())
            .unwrap();
        module.up.set(&values).unwrap();
    }
    network
}

/// Where the exports of the round trip go: `LM_EXPORT_CHECK_DIR/FAMILY` when that is set (for
/// `tests/fixtures/causal_lm/check_exports.py`), else a temporary folder.
fn export_folder(family: &str, temp: &tempfile::TempDir) -> PathBuf {
    match std::env::var_os("LM_EXPORT_CHECK_DIR") {
        Some(dir) => PathBuf::from(dir).join(family),
        None => temp.path().join(family),
    }
}

/// A network written by `write_causal_lm_exports` reads back as a PEFT adapter giving the network's
/// logits, and its GGUF adapter has llama.cpp's header, names and shapes.
fn exports_round_trip(family: &str, use_rslora: bool) {
    let model = load(family, DType::F32);
    let network = trained_network(&model, 11);
    let base = reference(family);
    let batch = padded_batch(&base);
    let text = padded_text_positions(&base);
    let logits = model.forward(&batch, None).unwrap();
    let temp = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        base_model: folder(family),
        output_dir: export_folder(family, &temp),
        output_name: "voice".to_string(),
        save_precision: SavePrecision::Fp32,
        ..Default::default()
    };
    let exports = write_causal_lm_exports(&network, &model, &config, use_rslora).unwrap();
    assert_eq!(exports.peft_folder, config.output_dir.join("voice"));
    assert_eq!(exports.gguf_file, config.output_dir.join("voice.gguf"));
    candle_core::safetensors::save(
        &HashMap::from([("logits".to_string(), logits.clone())]),
        config.output_dir.join("lora_studio_logits.safetensors"),
    )
    .unwrap();

    let peft_config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(exports.peft_folder.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(peft_config["peft_type"], "LORA");
    assert_eq!(peft_config["task_type"], "CAUSAL_LM");
    assert_eq!(peft_config["r"], 4);
    assert_eq!(peft_config["use_rslora"], use_rslora);
    assert_eq!(peft_config["use_dora"], false);
    let expected_alpha = if use_rslora { 4.0 } else { 8.0 };
    assert_eq!(peft_config["lora_alpha"].as_f64(), Some(expected_alpha));
    let targets: Vec<&str> = peft_config["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        targets,
        [
            "down_proj",
            "gate_proj",
            "k_proj",
            "o_proj",
            "q_proj",
            "up_proj",
            "v_proj"
        ]
    );
    let weights = TensorFile::open(&exports.peft_folder.join("adapter_model.safetensors")).unwrap();
    let layers = model.config().num_hidden_layers;
    assert_eq!(weights.infos().len(), 2 * 7 * layers);
    assert!(
        weights
            .infos()
            .contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    );

    let reloaded = load(family, DType::F32);
    assert_eq!(attach(&reloaded, &exports.peft_folder), 7 * layers);
    let reloaded_logits = reloaded.forward(&batch, None).unwrap();
    assert_close(
        &format!("{family} logits of the exported PEFT adapter"),
        &at_positions(&reloaded_logits, &text),
        &at_positions(&logits, &text),
        1e-5,
    );

    // The merged model folder, for check_exports.py to load with transformers.
    merge_into_folder(
        &folder(family),
        &[(exports.peft_folder.clone(), 1.0)],
        &config.output_dir.join("merged"),
        DType::F32,
    )
    .unwrap();

    let header = read_gguf_header(&exports.gguf_file).unwrap();
    assert_eq!(header.version, 3);
    assert_eq!(header.string("general.type"), Some("adapter"));
    assert_eq!(header.string("adapter.type"), Some("lora"));
    assert_eq!(header.string("general.architecture"), Some(family));
    assert_eq!(header.float("adapter.lora.alpha"), Some(8.0));
    assert_eq!(header.tensors.len(), 2 * 7 * layers);
    for slot in model.layers().slots() {
        let weight = slot.weight().unwrap();
        let [out_features, in_features] = weight.dims() else {
            panic!("{} is not a linear layer", slot.name());
        };
        let name = llama_cpp_tensor_name(slot.name()).unwrap();
        let a = &header.tensors[&format!("{name}.lora_a")];
        let b = &header.tensors[&format!("{name}.lora_b")];
        assert_eq!(a.shape, [4, *in_features], "{name}.lora_a");
        assert_eq!(b.shape, [*out_features, 4], "{name}.lora_b");
        assert_eq!(a.dtype, GgmlDType::F32);
    }
}

#[test]
fn qwen2_exports_round_trip() {
    exports_round_trip("qwen2", false);
}

#[test]
fn qwen3_exports_round_trip_with_rslora() {
    exports_round_trip("qwen3", true);
}

#[test]
fn llama_exports_round_trip() {
    exports_round_trip("llama", false);
}

/// `merge_into_folder` writes a folder whose model gives the logits of the base with the adapter attached
/// at the same strength, and which keeps the base's tokenizer and chat template.
fn merged_folder_matches(family: &str, adapter: &Path, strength: f64) {
    let adapted = load(family, DType::F32);
    let peft = PeftAdapter::load(adapter, &Device::Cpu).unwrap();
    peft.attach(adapted.layers(), strength, DType::F32).unwrap();
    let base = reference(family);
    let batch = padded_batch(&base);
    let text = padded_text_positions(&base);
    let expected = at_positions(&adapted.forward(&batch, None).unwrap(), &text);

    let out = tempfile::tempdir().unwrap();
    let merged = out.path().join("merged");
    let report = merge_into_folder(
        &folder(family),
        &[(adapter.to_path_buf(), strength)],
        &merged,
        DType::F32,
    )
    .unwrap();
    assert_eq!(report.merged_layers, peft.modules().len());
    assert!(report.unmatched.is_empty());
    assert!(merged.join("model.safetensors").is_file());
    assert!(!merged.join("model.safetensors.index.json").exists());
    let model = CausalLm::load(&merged, &Device::Cpu, DType::F32).unwrap();
    let logits = at_positions(&model.forward(&batch, None).unwrap(), &text);
    assert_close(
        &format!("{family} merged with {}", adapter.display()),
        &logits,
        &expected,
        1e-4,
    );
    let unadapted = at_positions(&base.tensor("padded.logits"), &text);
    assert!(common::max_abs_diff(&unadapted, &expected) > 1e-2);
    let files = ChatFiles::open(&merged).unwrap();
    let original = ChatFiles::open(&folder(family)).unwrap();
    assert_eq!(files.generation(), original.generation());
    let conversation = [ChatMessage::new("user", "Hi")];
    let options = RenderOptions::default();
    assert_eq!(
        files.encode_chat(&conversation, &options).unwrap(),
        original.encode_chat(&conversation, &options).unwrap()
    );
}

#[test]
fn merging_rslora_at_a_strength_gives_the_adapted_logits() {
    merged_folder_matches("qwen2", &adapters_folder().join("qwen2_rslora"), 0.7);
}

#[test]
fn merging_dora_gives_the_adapted_logits() {
    merged_folder_matches("qwen2", &adapters_folder().join("qwen2_dora"), 1.0);
}

#[test]
fn merging_into_a_sharded_bf16_base_gives_the_adapted_logits() {
    merged_folder_matches("llama", &adapters_folder().join("llama_bin"), 1.0);
    merged_folder_matches("qwen3", &folder("qwen3").join("lora"), 1.0);
}

#[test]
fn inspect_reads_peft_folders_gguf_adapters_and_language_model_folders() {
    let FileReport::LmAdapter(peft) = inspect(&adapters_folder().join("qwen2_rslora")).unwrap()
    else {
        panic!("not read as an adapter");
    };
    assert_eq!(peft.format, "PEFT adapter folder");
    assert_eq!(peft.base.as_deref(), Some("tests/fixtures/causal_lm/qwen2"));
    assert_eq!(
        (peft.modules, peft.use_rslora, peft.use_dora),
        (14, true, false)
    );
    assert_eq!(peft.ranks.into_iter().collect::<Vec<_>>(), [2, 4, 6]);
    assert_eq!(peft.alphas.into_iter().collect::<Vec<_>>(), ["3", "8"]);
    assert_eq!(peft.targets.len(), 7);
    let FileReport::LmAdapter(dora) = inspect(&adapters_folder().join("qwen2_dora")).unwrap()
    else {
        panic!("not read as an adapter");
    };
    assert_eq!((dora.modules, dora.use_dora), (6, true));

    let model = load("llama", DType::F32);
    let network = trained_network(&model, 3);
    let temp = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        base_model: folder("llama"),
        output_dir: temp.path().to_path_buf(),
        output_name: "voice".to_string(),
        save_precision: SavePrecision::Fp16,
        ..Default::default()
    };
    let exports = write_causal_lm_exports(&network, &model, &config, false).unwrap();
    let FileReport::LmAdapter(gguf) = inspect(&exports.gguf_file).unwrap() else {
        panic!("not read as an adapter");
    };
    assert_eq!(gguf.format, "llama.cpp LoRA adapter (GGUF)");
    assert_eq!(gguf.architecture.as_deref(), Some("llama"));
    assert_eq!(gguf.base, Some(folder("llama").display().to_string()));
    assert_eq!(gguf.modules, 14);
    assert_eq!(gguf.ranks.into_iter().collect::<Vec<_>>(), [4]);
    assert_eq!(gguf.alphas.into_iter().collect::<Vec<_>>(), ["8"]);
    assert_eq!(
        gguf.dtypes.into_iter().collect::<Vec<_>>(),
        [("F16".to_string(), 28)]
    );

    let FileReport::LanguageModel(lm) = inspect(&folder("llama")).unwrap() else {
        panic!("not read as a language model");
    };
    assert_eq!(lm.config.architecture.label(), "Llama");
    assert_eq!(lm.weight_files, 3);
    let parameters: usize = model
        .layers()
        .slots()
        .iter()
        .map(|s| s.weight().unwrap().elem_count())
        .sum();
    assert!(
        lm.parameters > parameters,
        "{} vs {parameters}",
        lm.parameters
    );
    assert!(lm.has_tokenizer);
}

/// Greedy decoding (32 new tokens, KV cache) of the reference's chat prompts with the family's PEFT adapter
/// attached as `chat --lora` attaches it: the tokens transformers + peft chose.
fn greedy_generation_with_the_adapter_matches(family: &str) {
    let (expected, settings) = common::causal_lm::greedy_reference(family);
    let ids = common::causal_lm::id_rows;
    let model = load(family, DType::F32);
    attach(&model, &folder(family).join("lora"));
    let tokens = generate(
        &model,
        &ids(&expected["lora"]["prompts"]),
        &settings,
        |_, _| {},
    )
    .unwrap();
    let reference = ids(&expected["lora"]["new_tokens"]);
    assert_eq!(tokens, reference, "{family}");
    assert!(reference.iter().any(|r| r.len() == 32));
    assert_ne!(reference, ids(&expected["base"]["new_tokens"]));
}

#[test]
fn greedy_generation_with_attached_adapters_matches_peft() {
    for family in common::causal_lm::FAMILIES {
        greedy_generation_with_the_adapter_matches(family);
    }
}

/// A PEFT folder whose modules differ in rank and alpha (as a folded DoRA network's may) reads back with
/// every module's own scale, rsLoRA or not: `r`/`lora_alpha` take the most common values and
/// `rank_pattern`/`alpha_pattern` the others.
#[test]
fn mixed_ranks_and_alphas_round_trip_through_patterns() {
    let model = load("qwen2", DType::F32);
    let network = trained_network(&model, 5);
    let mut lora = export_network(&network).unwrap();
    for module in &mut lora.modules {
        if module.module_path == "model.layers.0.self_attn.q_proj" {
            module.down = module.down.narrow(0, 0, 2).unwrap();
            module.up = module.up.narrow(1, 0, 2).unwrap();
        }
        if module.module_path.ends_with("down_proj") {
            module.alpha = 3.0;
        }
    }
    network.set_multiplier(0.0);
    let base = reference("qwen2");
    let batch = padded_batch(&base);
    let text = padded_text_positions(&base);
    let direct = load("qwen2", DType::F32);
    for module in &lora.modules {
        let slot = direct.layers().get(&module.module_path).unwrap();
        let adapter = LoraAdapter::new(
            module.down.clone(),
            module.up.clone(),
            Some(module.alpha),
            slot.shape(),
        )
        .unwrap();
        slot.attach(std::sync::Arc::new(adapter));
    }
    let expected = direct.forward(&batch, None).unwrap();
    let temp = tempfile::tempdir().unwrap();
    for use_rslora in [false, true] {
        let name = if use_rslora {
            "qwen2_rspatterns"
        } else {
            "qwen2_patterns"
        };
        let out = export_folder(name, &temp);
        let export = PeftExport {
            base_model_name_or_path: folder("qwen2").display().to_string(),
            use_rslora,
            layers: model.layers(),
        };
        write_peft_adapter(&out.join("voice"), &lora, &export, DType::F32).unwrap();
        let names = AdapterNames {
            name: "voice",
            base_model: "qwen2",
        };
        write_gguf_adapter(
            &out.join("voice.gguf"),
            &lora,
            model.config(),
            names,
            DType::F32,
        )
        .unwrap();
        // One alpha for the file (the most common); the others folded into their modules' lora_b.
        let header = read_gguf_header(&out.join("voice.gguf")).unwrap();
        assert_eq!(header.float("adapter.lora.alpha"), Some(8.0));
        assert_eq!(
            header.tensors["blk.0.attn_q.weight.lora_a"].shape,
            [2, model.config().hidden_size]
        );
        let mut file = std::fs::File::open(out.join("voice.gguf")).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        let mut stored = |name: &str| {
            let tensor = content.tensor(&mut file, name, &Device::Cpu).unwrap();
            tensor.dequantize(&Device::Cpu).unwrap()
        };
        let module = |path: &str| lora.modules.iter().find(|m| m.module_path == path).unwrap();
        let q = module("model.layers.0.self_attn.q_proj");
        assert_eq!(
            common::max_abs_diff(&stored("blk.0.attn_q.weight.lora_a"), &q.down),
            0.0
        );
        let down = module("model.layers.1.mlp.down_proj");
        assert_close(
            "lora_b with alpha 3 under the file's alpha 8",
            &stored("blk.1.ffn_down.weight.lora_b"),
            &(&down.up * (3.0 / 8.0)).unwrap(),
            1e-7,
        );
        candle_core::safetensors::save(
            &HashMap::from([("logits".to_string(), expected.clone())]),
            out.join("lora_studio_logits.safetensors"),
        )
        .unwrap();
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("voice/adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["r"], 4);
        assert_eq!(config["rank_pattern"].as_object().unwrap().len(), 1);
        // The two down_proj; with rsLoRA, the rank-2 module's scale needs its own alpha too.
        let alphas = 2 + usize::from(use_rslora);
        assert_eq!(config["alpha_pattern"].as_object().unwrap().len(), alphas);
        let reloaded = load("qwen2", DType::F32);
        assert_eq!(attach(&reloaded, &out.join("voice")), 14);
        assert_close(
            &format!("{name}: logits of the reloaded adapter"),
            &at_positions(&reloaded.forward(&batch, None).unwrap(), &text),
            &at_positions(&expected, &text),
            1e-5,
        );
    }
}
