//! `lora-studio chat --base DIR [--lora ADAPTER[:STRENGTH]]...`: talk to a language model with PEFT
//! adapters attached. With `--prompt`, the assistant's one reply goes to stdout and nothing else does;
//! without it, a multi-turn conversation in the terminal, each reply streamed as it is generated. Replies
//! end at the model's own stop ids; timings go to stderr, as `generate`'s do.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;

use crate::chat::{ChatFiles, ChatMessage, RenderOptions, TextTokenizer};
use crate::device::{DeviceChoice, describe, inference_dtype, open_device};
use crate::lora::PeftAdapter;
use crate::models::causal_lm::{CausalLm, GenerationSettings, Sampling, generate};

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// The language model: a Hugging Face folder (config.json, safetensors, tokenizer.json,
    /// tokenizer_config.json), or the name of one found on this computer (`lora-studio models`).
    #[arg(long, value_name = "DIR")]
    pub base: PathBuf,
    /// A PEFT LoRA adapter folder and its strength, e.g. `voice:0.8` (repeatable; strength 1 if omitted).
    #[arg(long = "lora", value_name = "ADAPTER[:STRENGTH]")]
    pub loras: Vec<String>,
    /// The system prompt that opens the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Ask one question, print the reply to stdout and exit (otherwise chat interactively).
    #[arg(long)]
    pub prompt: Option<String>,
    /// The most tokens one reply may have.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// 0 always picks the most likely token (greedy); default: the model's generation_config.json, else 0.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Sample only among the most likely tokens holding this much probability; default: the model's, else 1.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Sample only among this many of the most likely tokens (0: all); default: the model's, else 0.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Above 1 makes tokens already in the conversation less likely (greedy replies too); default: the
    /// model's, else 1.
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    /// Random seed for sampling (a random one is chosen and printed if omitted).
    #[arg(long)]
    pub seed: Option<u64>,
    /// cpu, cuda, cuda:N, metal or auto.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

/// A loaded model with its tokenizer files, ready to answer.
struct Chat {
    model: CausalLm,
    files: ChatFiles,
    settings: GenerationSettings,
}

pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let adapters = args
        .loras
        .iter()
        .map(|spec| parse_adapter_spec(spec))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let chat = Chat::open(&args, &adapters)?;
    let mut messages: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|text| ChatMessage::new("system", text.as_str()))
        .collect();
    let mut stdout = std::io::stdout();
    if let Some(prompt) = &args.prompt {
        messages.push(ChatMessage::new("user", prompt.as_str()));
        chat.reply(&messages, &mut stdout)?;
        return Ok(());
    }
    eprintln!("Type a message and press Enter; an empty line or Ctrl-D ends the chat.");
    let mut lines = std::io::stdin().lock().lines();
    loop {
        eprint!("> ");
        let Some(line) = lines.next().transpose().context("reading the terminal")? else {
            break;
        };
        if line.trim().is_empty() {
            break;
        }
        messages.push(ChatMessage::new("user", line));
        let reply = chat.reply(&messages, &mut stdout)?;
        messages.push(ChatMessage::new("assistant", reply));
    }
    Ok(())
}

/// `DIR` or `DIR:STRENGTH`: a PEFT adapter folder and its strength (a suffix that is not a number is part
/// of the path).
fn parse_adapter_spec(spec: &str) -> anyhow::Result<(PathBuf, f64)> {
    let (path, strength) = super::split_strength(spec)?;
    if !path.exists() {
        bail!("the adapter folder {} does not exist", path.display());
    }
    Ok((path, strength))
}

impl Chat {
    fn open(args: &ChatArgs, adapters: &[(PathBuf, f64)]) -> anyhow::Result<Self> {
        let device = open_device(args.device).map_err(anyhow::Error::msg)?;
        let base = super::base_model_path(&args.base)?;
        let files = ChatFiles::open(&base)?;
        let started = Instant::now();
        let model = CausalLm::load(&base, &device, inference_dtype(&device))?;
        for (folder, strength) in adapters {
            let adapter = PeftAdapter::load(folder, &device)?;
            let report = adapter.attach(model.layers(), *strength, model.dtype())?;
            if !report.unmatched.is_empty() {
                eprintln!(
                    "warning: {} modules of {} match no layer of this model and were skipped",
                    report.unmatched.len(),
                    folder.display()
                );
            }
        }
        eprintln!(
            "loaded {} on {} in {:.1} s",
            model_name(&base),
            describe(&device),
            started.elapsed().as_secs_f64()
        );
        let settings = generation_settings(args, &files)?;
        Ok(Self {
            model,
            files,
            settings,
        })
    }

    /// Generates the assistant's reply to `messages`, writing its text to `out` as it comes, then a
    /// newline; the timings go to stderr. Returns the reply's text.
    fn reply(&self, messages: &[ChatMessage], out: &mut impl Write) -> anyhow::Result<String> {
        let options = RenderOptions {
            add_generation_prompt: true,
            ..Default::default()
        };
        let prompt = self.files.encode_chat(messages, &options)?;
        let started = Instant::now();
        let mut first_token_secs = None;
        let mut stream = TextStream::new(self.files.tokenizer(), &self.settings.stop_ids);
        let mut write_error = None;
        let tokens = generate(
            &self.model,
            std::slice::from_ref(&prompt),
            &self.settings,
            |_, token| {
                first_token_secs.get_or_insert_with(|| started.elapsed().as_secs_f64());
                let piece = stream.push(token);
                if let Err(e) = piece.and_then(|p| Ok(out.write_all(p.as_bytes())?)) {
                    write_error.get_or_insert(e);
                }
                let _ = out.flush();
            },
        )
        .context("generating the reply")?;
        if let Some(error) = write_error {
            return Err(error);
        }
        let rest = stream.finish()?;
        write!(out, "{rest}")?;
        writeln!(out)?;
        out.flush()?;
        let total_secs = started.elapsed().as_secs_f64();
        let generated = tokens.first().map_or(0, Vec::len);
        let prompt_secs = first_token_secs.unwrap_or(total_secs);
        let per_second =
            (generated.saturating_sub(1)) as f64 / (total_secs - prompt_secs).max(1e-9);
        eprintln!(
            "{} prompt tokens in {prompt_secs:.2} s, {generated} new tokens in {total_secs:.2} s ({per_second:.1} tokens/s after the first)",
            prompt.len()
        );
        Ok(stream.text)
    }
}

/// The folder's name, for messages.
fn model_name(folder: &Path) -> String {
    folder.file_name().map_or_else(
        || folder.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// The sampling the flags ask for, the model's defaults filling in what they leave out.
fn generation_settings(args: &ChatArgs, files: &ChatFiles) -> anyhow::Result<GenerationSettings> {
    let defaults = files.generation();
    let temperature = match args.temperature {
        Some(t) => t,
        None if defaults.do_sample => defaults.temperature.unwrap_or(1.0),
        None => 0.0,
    };
    let top_p = args.top_p.or(defaults.top_p).unwrap_or(1.0);
    if !(temperature >= 0.0 && temperature.is_finite()) {
        bail!("--temperature must be 0 (greedy) or more");
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        bail!("--top-p must be above 0 and at most 1");
    }
    let top_k = args.top_k.or(defaults.top_k).unwrap_or(0);
    let repetition_penalty = args
        .repetition_penalty
        .or(defaults.repetition_penalty)
        .unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty.is_finite()) {
        bail!("--repetition-penalty must be above 0 (1 leaves the logits as they are)");
    }
    if defaults.stop_ids.is_empty() {
        eprintln!(
            "warning: the model names no end-of-reply token; replies run to --max-new-tokens"
        );
    }
    let seed = args.seed.unwrap_or_else(|| {
        let seed = rand::random::<u64>() >> 11;
        if temperature > 0.0 {
            eprintln!("seed {seed}");
        }
        seed
    });
    Ok(GenerationSettings {
        max_new_tokens: args.max_new_tokens,
        stop_ids: defaults.stop_ids.clone(),
        sampling: Sampling {
            temperature,
            top_p,
            top_k,
            repetition_penalty,
        },
        seed,
    })
}

/// Turns the reply's tokens into text as they come: each push returns what the text gained. Special tokens
/// (the stop token included) are left out, and a character whose bytes are still incomplete waits for the
/// next token.
struct TextStream<'a> {
    tokenizer: &'a TextTokenizer,
    stop_ids: &'a [u32],
    ids: Vec<u32>,
    text: String,
}

impl<'a> TextStream<'a> {
    fn new(tokenizer: &'a TextTokenizer, stop_ids: &'a [u32]) -> Self {
        Self {
            tokenizer,
            stop_ids,
            ids: Vec::new(),
            text: String::new(),
        }
    }

    fn push(&mut self, token: u32) -> anyhow::Result<String> {
        if self.stop_ids.contains(&token) {
            return Ok(String::new());
        }
        self.ids.push(token);
        let decoded = self.tokenizer.decode(&self.ids, true)?;
        if decoded.ends_with('\u{FFFD}') || !decoded.starts_with(&self.text) {
            return Ok(String::new());
        }
        let piece = decoded[self.text.len()..].to_string();
        self.text = decoded;
        Ok(piece)
    }

    /// What the whole reply's text adds to what was returned so far (a character left incomplete by the
    /// last token, as its replacement character).
    fn finish(&mut self) -> anyhow::Result<String> {
        let decoded = self.tokenizer.decode(&self.ids, true)?;
        let piece = decoded
            .strip_prefix(self.text.as_str())
            .unwrap_or_default()
            .to_string();
        self.text = decoded;
        Ok(piece)
    }
}
