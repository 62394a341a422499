//! Training language-model adapters: the dataset formats (OpenAI, ShareGPT, Alpaca, text) with bad rows
//! named by file and line, assistant-only labels checked token by token against the labels LLaMA-Factory's
//! way of rendering gives with transformers (`tests/fixtures/causal_lm/generate.py`, `sft_reference.json`),
//! the masked loss against transformers', packing against unpacked samples, a short run that lowers the
//! loss, exact resume, and a LLaMA-Factory YAML config.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::causal_lm::chat_lines;
use common::{fixture, max_abs_diff};
use lora_studio::chat::ChatFiles;
use lora_studio::config::{LrScheduler, MixedPrecision, TrainConfig, load_config_noting};
use lora_studio::data::text::{Role, TextSample, Turn, scan_text_dataset};
use lora_studio::lora::PeftAdapter;
use lora_studio::models::causal_lm::{CausalLm, IGNORE_INDEX};
use lora_studio::train::{
    CancelToken, CausalLmTask, StepReport, TextBatch, TrainReporter, causal_lm_batch_loss, lay_out,
    load_checkpoint, tokenize_dataset, train,
};

fn model_folder(family: &str) -> PathBuf {
    fixture(&format!("causal_lm/{family}"))
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// The conversation of `sft_reference.json`, as one OpenAI row.
fn reference(family: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(model_folder(family).join("sft_reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn reference_row(family: &str) -> String {
    serde_json::json!({ "messages": reference(family)["messages"] }).to_string()
}

#[test]
fn every_format_is_read_and_bad_rows_are_named_by_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(
        &data.join("a_openai.jsonl"),
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello!\"}]}\n\
         \n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"\"}]}\n\
         {not json\n",
    );
    write(
        &data.join("b_sharegpt.json"),
        "[\n  {\"conversations\": [{\"from\": \"human\", \"value\": \"Q\"}, {\"from\": \"gpt\", \"value\": \"A\"}], \"system\": \"S\"},\n  {\"conversations\": [{\"from\": \"robot\", \"value\": \"Q\"}]}\n]\n",
    );
    write(
        &data.join("nested/c_alpaca.jsonl"),
        "{\"instruction\": \"Add\", \"input\": \"2 and 3\", \"output\": \"5\", \"history\": [[\"1+1?\", \"2\"]]}\n\
         {\"instruction\": \"No answer\"}\n\
         {\"text\": \"A plain text row.\"}\n",
    );
    write(&data.join("d_notes.txt"), "Continued pre-training text.\n");
    write(&data.join("dataset_info.json"), "{}");
    write(&data.join("ignored.csv"), "a,b");

    let dataset = scan_text_dataset(&data).unwrap();
    let samples: Vec<&TextSample> = dataset.samples.iter().map(|(s, _)| s).collect();
    let turn = Turn::new;
    assert_eq!(
        samples,
        [
            &TextSample::Conversation(vec![
                turn(Role::User, "Hi"),
                turn(Role::Assistant, "Hello!")
            ]),
            &TextSample::Conversation(vec![
                turn(Role::System, "S"),
                turn(Role::User, "Q"),
                turn(Role::Assistant, "A")
            ]),
            &TextSample::Text("Continued pre-training text.\n".into()),
            &TextSample::Conversation(vec![
                turn(Role::User, "1+1?"),
                turn(Role::Assistant, "2"),
                turn(Role::User, "Add\n2 and 3"),
                turn(Role::Assistant, "5")
            ]),
            &TextSample::Text("A plain text row.".into()),
        ]
    );
    let bad: Vec<String> = dataset
        .bad_rows
        .iter()
        .map(|b| {
            let file = b
                .place
                .file
                .strip_prefix(&data)
                .unwrap()
                .display()
                .to_string();
            format!("{file}:{}", b.place.line)
        })
        .collect();
    assert_eq!(
        bad,
        [
            "a_openai.jsonl:3",
            "a_openai.jsonl:4",
            "b_sharegpt.json:3",
            "nested/c_alpaca.jsonl:2"
        ]
    );
    let reasons: Vec<&str> = dataset.bad_rows.iter().map(|b| b.reason.as_str()).collect();
    assert!(reasons[0].contains("empty assistant turn"), "{reasons:?}");
    assert!(reasons[1].contains("invalid JSON"), "{reasons:?}");
    assert!(reasons[2].contains("unknown role `robot`"), "{reasons:?}");
    assert!(reasons[3].contains("empty assistant turn"), "{reasons:?}");
    assert!(
        dataset.bad_rows[0]
            .to_string()
            .contains("a_openai.jsonl line 3")
    );
}

#[test]
fn a_dataset_without_assistant_turns_is_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir.path().join("chats.jsonl"),
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}\n\
         {\"conversations\": [{\"from\": \"human\", \"value\": \"Hi\"}]}\n",
    );
    let error = scan_text_dataset(&file).unwrap_err().to_string();
    assert!(
        error.contains("chats.jsonl")
            && error.contains("none of its 2 conversations has an assistant turn"),
        "{error}"
    );
    assert_eq!(error.matches(". ").count(), 0, "one sentence: {error}");
}

fn tokenized_reference(family: &str, config: &TrainConfig) -> lora_studio::train::TokenizedSample {
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir.path().join("chat.jsonl"), &reference_row(family));
    let dataset = scan_text_dataset(&file).unwrap();
    let files = ChatFiles::open(&model_folder(family)).unwrap();
    let tokenized = tokenize_dataset(&files, &dataset, config).unwrap();
    assert_eq!(tokenized.samples.len(), 1);
    tokenized.samples[0].clone()
}

fn json_ids(value: &serde_json::Value) -> Vec<i64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect()
}

#[test]
fn labels_cover_the_assistant_turns_only_token_by_token() {
    for family in ["qwen2", "llama"] {
        let expected = reference(family);
        let sample = tokenized_reference(family, &TrainConfig::default());
        let ids: Vec<i64> = sample.ids.iter().map(|&i| i64::from(i)).collect();
        assert_eq!(ids, json_ids(&expected["ids"]), "{family}: ids");
        let labels = json_ids(&expected["labels"]);
        for (t, (ours, theirs)) in sample.labels.iter().zip(&labels).enumerate() {
            assert_eq!(ours, theirs, "{family}: label of token {t}");
        }
        assert_eq!(sample.labels.len(), labels.len());
        assert_eq!(
            sample.trained_tokens() as u64,
            expected["trained_tokens"].as_u64().unwrap()
        );
        let on_prompt = tokenized_reference(
            family,
            &TrainConfig {
                train_on_prompt: true,
                ..TrainConfig::default()
            },
        );
        assert_eq!(
            on_prompt.labels, ids,
            "{family}: train_on_prompt trains every token"
        );
    }
}

#[test]
fn system_prompt_is_given_to_conversations_without_one_and_long_ones_are_cut() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir.path().join("chat.jsonl"),
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello there, friend.\"}]}\n",
    );
    let dataset = scan_text_dataset(&file).unwrap();
    let files = ChatFiles::open(&model_folder("qwen2")).unwrap();
    let plain = tokenize_dataset(&files, &dataset, &TrainConfig::default()).unwrap();
    let with_system = TrainConfig {
        system_prompt: Some("Speak like a pirate.".into()),
        ..TrainConfig::default()
    };
    let prompted = tokenize_dataset(&files, &dataset, &with_system).unwrap();
    let text = files
        .tokenizer()
        .decode(&prompted.samples[0].ids, false)
        .unwrap();
    assert!(text.contains("Speak like a pirate."), "{text}");
    let plain_text = files
        .tokenizer()
        .decode(&plain.samples[0].ids, false)
        .unwrap();
    assert!(!plain_text.contains("pirate"), "{plain_text}");

    let full = plain.samples[0].ids.len();
    let short = TrainConfig {
        max_seq_length: (full - 2) as u32,
        ..TrainConfig::default()
    };
    let cut = tokenize_dataset(&files, &dataset, &short).unwrap();
    assert_eq!(cut.truncated, 1);
    assert_eq!(cut.samples[0].ids.len(), full - 2);
    assert_eq!(cut.samples[0].ids, plain.samples[0].ids[..full - 2]);
}

#[test]
fn masked_loss_equals_transformers_loss_with_ignored_labels() {
    for family in ["qwen2", "llama"] {
        let expected = reference(family)["loss"].as_f64().unwrap();
        let config = TrainConfig {
            base_model: model_folder(family),
            ..TrainConfig::default()
        };
        let sample = tokenized_reference(family, &config);
        let model = CausalLm::load(&model_folder(family), &Device::Cpu, DType::F32).unwrap();
        let task =
            CausalLmTask::new(&model, vec![sample.clone()], String::new(), 0, &config).unwrap();
        let laid = lay_out(
            &TextBatch {
                rows: vec![vec![0]],
            },
            &[sample],
            0,
        );
        let (loss, count) = causal_lm_batch_loss(&model, &laid).unwrap();
        drop(task);
        let loss = loss.to_scalar::<f32>().unwrap() as f64;
        assert_eq!(
            count as u64,
            reference(family)["trained_tokens"].as_u64().unwrap()
        );
        assert!(
            (loss - expected).abs() < 1e-4 * expected.max(1.0),
            "{family}: {loss} vs transformers {expected}"
        );
    }
}

#[test]
fn packed_loss_equals_the_loss_of_the_samples_unpacked() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir.path().join("chats.jsonl"),
        &[
            "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello there.\"}]}",
            "{\"instruction\": \"Name a colour\", \"output\": \"Blue, like the sea.\"}",
            "{\"conversations\": [{\"from\": \"human\", \"value\": \"2+2?\"}, {\"from\": \"gpt\", \"value\": \"4\"}, {\"from\": \"human\", \"value\": \"And 3+3?\"}, {\"from\": \"gpt\", \"value\": \"6, of course.\"}]}",
        ]
        .join("\n"),
    );
    let dataset = scan_text_dataset(&file).unwrap();
    let files = ChatFiles::open(&model_folder("qwen2")).unwrap();
    let samples = tokenize_dataset(&files, &dataset, &TrainConfig::default())
        .unwrap()
        .samples;
    let model = CausalLm::load(&model_folder("qwen2"), &Device::Cpu, DType::F32).unwrap();
    let pad = 5;
    let packed = lay_out(
        &TextBatch {
            rows: vec![vec![0, 1, 2]],
        },
        &samples,
        pad,
    );
    let (packed_loss, packed_count) = causal_lm_batch_loss(&model, &packed).unwrap();
    // Unpacked: each sample in its own row (padded), and each alone.
    let padded = lay_out(
        &TextBatch {
            rows: vec![vec![0], vec![1], vec![2]],
        },
        &samples,
        pad,
    );
    let (padded_loss, padded_count) = causal_lm_batch_loss(&model, &padded).unwrap();
    let mut sum = 0f64;
    let mut count = 0;
    for i in 0..3 {
        let alone = lay_out(
            &TextBatch {
                rows: vec![vec![i]],
            },
            &samples,
            pad,
        );
        let (loss, n) = causal_lm_batch_loss(&model, &alone).unwrap();
        sum += loss.to_scalar::<f32>().unwrap() as f64 * n as f64;
        count += n;
    }
    let separate = sum / count as f64;
    assert_eq!(packed_count, count);
    assert_eq!(padded_count, count);
    for (what, loss) in [("packed", packed_loss), ("padded", padded_loss)] {
        let loss = loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (loss - separate).abs() < 1e-5,
            "{what} {loss} vs separate {separate}"
        );
    }
}

/// Records step losses and messages.
#[derive(Default)]
struct Recorder {
    losses: Vec<f64>,
    tokens: Vec<Option<u64>>,
    messages: Vec<String>,
}

impl TrainReporter for Recorder {
    fn step(&mut self, report: &StepReport) {
        self.losses.push(report.loss);
        self.tokens.push(report.tokens);
    }

    fn message(&mut self, text: &str) {
        self.messages.push(text.to_string());
    }
}

fn chat_dataset(dir: &Path) -> PathBuf {
    let rows = [
        ("What colour is the sky?", "Blue, on a clear day."),
        ("Name a fruit.", "An apple."),
        ("How many legs has a cat?", "Four legs."),
        ("Say hello.", "Hello! How are you?"),
    ];
    write(&dir.join("data/chats.jsonl"), &chat_lines(&rows));
    dir.join("data")
}

fn tiny_config(data: &Path, out: &Path) -> TrainConfig {
    TrainConfig {
        base_model: model_folder("qwen2"),
        train_data_dir: data.to_path_buf(),
        output_dir: out.to_path_buf(),
        output_name: "chat".into(),
        lora_rank: 4,
        lora_alpha: 8.0,
        learning_rate: 5e-3,
        batch_size: 2,
        max_train_steps: Some(12),
        save_steps: 0,
        log_with: lora_studio::config::LogWith::None,
        device: "cpu".into(),
        seed: 3,
        ..TrainConfig::default()
    }
}

/// The step losses of a run of `config` and the adapters of its last checkpoint.
fn losses_and_adapters(config: &TrainConfig) -> (Vec<f64>, HashMap<String, Tensor>) {
    let mut recorder = Recorder::default();
    let outcome = train(config, None, &mut recorder, &CancelToken::default()).unwrap();
    let checkpoint = load_checkpoint(&outcome.checkpoint.unwrap(), &Device::Cpu).unwrap();
    (recorder.losses, checkpoint.adapters)
}

/// Two runs gave the same step losses and adapters (1e-5).
fn assert_same_training(
    (losses_a, adapters_a): &(Vec<f64>, HashMap<String, Tensor>),
    (losses_b, adapters_b): &(Vec<f64>, HashMap<String, Tensor>),
) {
    for (a, b) in losses_a.iter().zip(losses_b) {
        assert!(
            (a - b).abs() < 1e-5,
            "step losses {losses_a:?} vs {losses_b:?}"
        );
    }
    for (name, tensor) in adapters_a {
        let diff = max_abs_diff(tensor, &adapters_b[name]);
        assert!(diff < 1e-5, "{name} differs by {diff}");
    }
}

#[test]
fn a_short_run_lowers_the_loss_and_reports_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let data = chat_dataset(dir.path());
    let config = TrainConfig {
        batch_size: 4,
        max_train_steps: Some(15),
        ..tiny_config(&data, &dir.path().join("out"))
    };
    let mut recorder = Recorder::default();
    let outcome = train(&config, None, &mut recorder, &CancelToken::default()).unwrap();
    assert_eq!(outcome.steps, 15);
    let (first, last) = (recorder.losses[0], *recorder.losses.last().unwrap());
    assert!(
        last < 0.8 * first,
        "loss {first} -> {last}: {:?}",
        recorder.losses
    );
    assert!(recorder.tokens.iter().all(|t| t.is_some_and(|n| n > 20)));
    assert!(
        dir.path()
            .join("out/checkpoint-15/lora.safetensors")
            .is_file()
    );
    // The run ends with its PEFT folder (what the outcome names) and its llama.cpp adapter; the folder
    // attaches to every adapted layer of the base and changes its logits.
    assert_eq!(outcome.lora_path, dir.path().join("out/chat"));
    let gguf = std::fs::read(dir.path().join("out/chat.gguf")).unwrap();
    assert_eq!(&gguf[..4], b"GGUF");
    let model = CausalLm::load(&config.base_model, &Device::Cpu, DType::F32).unwrap();
    let batch = lora_studio::models::causal_lm::TokenBatch::new(
        vec![vec![5, 17, 42, 9, 3]],
        vec![vec![lora_studio::models::causal_lm::TEXT_SEGMENT; 5]],
    )
    .unwrap();
    let base_logits = model.forward(&batch, None).unwrap();
    let adapter = PeftAdapter::load(&outcome.lora_path, &Device::Cpu).unwrap();
    let report = adapter.attach(model.layers(), 1.0, DType::F32).unwrap();
    assert!(report.unmatched.is_empty(), "{:?}", report.unmatched);
    assert_eq!(report.adapters.len(), model.layers().len());
    let moved = max_abs_diff(&model.forward(&batch, None).unwrap(), &base_logits);
    assert!(
        moved > 1e-3,
        "the trained adapter moves the logits by {moved}"
    );
}

#[test]
fn resume_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let data = chat_dataset(dir.path());
    let base = TrainConfig {
        packing: true,
        lora_dropout: 0.1,
        max_seq_length: 160,
        gradient_accumulation_steps: 2,
        batch_size: 1,
        ..tiny_config(&data, &dir.path().join("straight"))
    };
    let straight = TrainConfig {
        max_train_steps: Some(6),
        ..base.clone()
    };
    let run = |config: &TrainConfig, resume: Option<&Path>| {
        train(
            config,
            resume,
            &mut Recorder::default(),
            &CancelToken::default(),
        )
        .unwrap()
    };
    run(&straight, None);
    let first_half = TrainConfig {
        max_train_steps: Some(3),
        output_dir: dir.path().join("resumed"),
        ..base.clone()
    };
    run(&first_half, None);
    let second_half = TrainConfig {
        max_train_steps: Some(6),
        ..first_half.clone()
    };
    run(&second_half, Some(&dir.path().join("resumed/checkpoint-3")));

    let a = load_checkpoint(&dir.path().join("straight/checkpoint-6"), &Device::Cpu).unwrap();
    let b = load_checkpoint(&dir.path().join("resumed/checkpoint-6"), &Device::Cpu).unwrap();
    assert_eq!((a.state.step, b.state.step), (6, 6));
    assert_eq!(a.adapters.len(), b.adapters.len());
    assert!(!a.adapters.is_empty());
    let mut moved = false;
    for (name, tensor) in &a.adapters {
        let diff = max_abs_diff(tensor, &b.adapters[name]);
        assert!(diff < 1e-6, "{name} differs by {diff} after resuming");
        moved |= name.contains("lora_up") && common::max_abs(tensor) > 0.0;
    }
    assert!(moved, "training changed the adapters");
    for (name, tensor) in &a.optimizer {
        assert!(
            max_abs_diff(tensor, &b.optimizer[name]) < 1e-6,
            "optimizer state {name}"
        );
    }
}

#[test]
fn a_llama_factory_yaml_loads_into_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write(
        &data.join("dataset_info.json"),
        "{\"my_chats\": {\"file_name\": \"chats.jsonl\", \"formatting\": \"sharegpt\", \"columns\": {\"messages\": \"conversations\"}}}",
    );
    write(&data.join("chats.jsonl"), "");
    let yaml = format!(
        "### model\nmodel_name_or_path: {model}\ntrust_remote_code: true\n\n### method\nstage: sft\ndo_train: true\n\
         finetuning_type: lora\nlora_rank: 16\nlora_target: q_proj,v_proj\nlora_dropout: 0.05\n\n### dataset\n\
         dataset: my_chats\ndataset_dir: {data}\ntemplate: qwen\ncutoff_len: 512\noverwrite_cache: true\n\
         preprocessing_num_workers: 16\n\n### output\noutput_dir: {out}\nlogging_steps: 10\nsave_steps: 100\n\
         plot_loss: true\noverwrite_output_dir: true\n\n### train\nper_device_train_batch_size: 2\n\
         gradient_accumulation_steps: 4\nlearning_rate: 1.0e-4\nnum_train_epochs: 2.0\nlr_scheduler_type: cosine\n\
         warmup_ratio: 0.1\nbf16: true\n",
        model = model_folder("qwen2").display(),
        data = data.display(),
        out = dir.path().join("saves").display(),
    );
    let path = write(&dir.path().join("qwen_lora_sft.yaml"), &yaml);
    let loaded = load_config_noting(Some(&path), &[]).unwrap_or_else(|e| panic!("{e}"));
    let config = loaded.config;
    assert_eq!(config.base_model, model_folder("qwen2"));
    assert_eq!(config.train_data_dir, data.join("chats.jsonl"));
    assert_eq!(config.output_dir, dir.path().join("saves"));
    assert_eq!(config.lora_rank, 16);
    assert_eq!(
        config.lora_alpha, 32.0,
        "LLaMA-Factory's alpha: twice the rank"
    );
    assert_eq!(
        config.language_model_targets().unwrap(),
        ["q_proj", "v_proj"]
    );
    assert_eq!(config.lora_dropout, 0.05);
    assert_eq!(config.max_seq_length, 512);
    assert_eq!(config.batch_size, 2);
    assert_eq!(config.gradient_accumulation_steps, 4);
    assert_eq!(config.learning_rate, 1e-4);
    assert_eq!(config.epochs, 2);
    assert_eq!(config.lr_scheduler, LrScheduler::Cosine);
    assert_eq!(config.warmup_steps(100), 10);
    assert_eq!(config.mixed_precision, MixedPrecision::Bf16);
    assert_eq!(config.save_steps, 100);
    assert_eq!(config.weight_decay, 0.0);
    assert!(config.gradient_checkpointing);
    let notes = loaded.notes.join("\n");
    assert!(
        notes.contains("preprocessing_num_workers") && notes.contains("template"),
        "{notes}"
    );

    let quantized = write(
        &dir.path().join("qlora.yaml"),
        &format!("{yaml}quantization_bit: 4\n"),
    );
    let error = load_config_noting(Some(&quantized), &[])
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("quantization_bit") && error.contains("QLoRA"),
        "{error}"
    );
    assert_eq!(
        error.trim_end_matches('.').matches(". ").count(),
        0,
        "one sentence: {error}"
    );
}

#[test]
fn rows_the_template_cannot_place_or_cut_before_any_reply_are_left_out_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let long_prompt = "word ".repeat(200);
    let file = write(
        &dir.path().join("chats.jsonl"),
        &format!(
            "{}\n{}\n",
            serde_json::json!({"messages": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "ok"}]}),
            serde_json::json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}),
        ),
    );
    let dataset = scan_text_dataset(&file).unwrap();
    let files = ChatFiles::open(&model_folder("qwen2")).unwrap();
    let config = TrainConfig {
        max_seq_length: 200,
        ..TrainConfig::default()
    };
    let tokenized = tokenize_dataset(&files, &dataset, &config).unwrap();
    assert_eq!(tokenized.truncated, 1);
    assert_eq!(tokenized.samples.len(), 1);
    assert_eq!(tokenized.left_out.len(), 1);
    assert!(
        tokenized.left_out[0].contains("chats.jsonl line 1"),
        "{:?}",
        tokenized.left_out
    );
    assert!(
        tokenized.samples[0]
            .labels
            .iter()
            .any(|&l| l != IGNORE_INDEX)
    );
}

#[test]
fn accumulated_micro_batches_weigh_by_their_trained_tokens() {
    // Samples with replies of very different lengths: a step over two micro-batches of one sample must
    // equal a step over one batch of both (the mean over every trained token, not of the two means).
    let dir = tempfile::tempdir().unwrap();
    let rows = [
        ("Hi", "Ok."),
        (
            "Tell me a story.",
            "Once upon a time a small cat lived by the sea and watched the boats.",
        ),
        ("Yes?", "No."),
        (
            "Count to ten.",
            "One, two, three, four, five, six, seven, eight, nine, ten.",
        ),
    ];
    let data = write(&dir.path().join("data/chats.jsonl"), &chat_lines(&rows));
    let run = |name: &str, batch_size: u32, accumulation: u32| {
        losses_and_adapters(&TrainConfig {
            batch_size,
            gradient_accumulation_steps: accumulation,
            max_train_steps: Some(3),
            ..tiny_config(&data, &dir.path().join(name))
        })
    };
    assert_same_training(&run("one_batch", 2, 1), &run("accumulated", 1, 2));
}

/// A change to a run's settings.
type ConfigChange = dyn Fn(&mut TrainConfig);

#[test]
fn dora_pissa_rslora_and_dropout_train_and_change_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let data = chat_dataset(dir.path());
    let run = |name: &str, change: &ConfigChange| {
        let mut config = TrainConfig {
            batch_size: 4,
            max_train_steps: Some(8),
            ..tiny_config(&data, &dir.path().join(name))
        };
        change(&mut config);
        losses_and_adapters(&config)
    };
    let (_, plain) = run("plain", &|_| {});
    let variants: [(&str, &ConfigChange); 4] = [
        ("dora", &|c| c.dora = true),
        ("pissa", &|c| c.pissa = true),
        ("rslora", &|c| c.use_rslora = true),
        ("dropout", &|c| c.lora_dropout = 0.3),
    ];
    for (name, change) in variants {
        let (losses, adapters) = run(name, change);
        let (first, last) = (losses[0], *losses.last().unwrap());
        assert!(last < first, "{name}: loss {losses:?}");
        let moved = plain
            .iter()
            .filter(|(key, _)| key.contains("lora_up"))
            .map(|(key, tensor)| max_abs_diff(tensor, &adapters[key]))
            .fold(0.0, f64::max);
        assert!(
            moved > 1e-4,
            "{name} trained the same adapters as plain LoRA"
        );
    }
}

#[test]
fn gradient_checkpointing_trains_the_same_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let data = chat_dataset(dir.path());
    let run = |name: &str, checkpointing: bool| {
        losses_and_adapters(&TrainConfig {
            batch_size: 2,
            max_train_steps: Some(4),
            lora_dropout: 0.2,
            gradient_checkpointing: checkpointing,
            ..tiny_config(&data, &dir.path().join(name))
        })
    };
    assert_same_training(&run("kept", false), &run("recomputed", true));
}
