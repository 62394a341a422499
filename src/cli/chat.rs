//! `lora-studio chat --base DIR [--lora ADAPTER[:STRENGTH]]...`: talk to a language model with PEFT
//! adapters attached. With `--prompt`, the assistant's one reply goes to stdout and nothing else does;
//! without it, a multi-turn conversation in the terminal, each reply streamed as it is generated. Replies
//! end at the model's own stop ids; timings go to stderr, as `generate`'s do.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;

use crate::chat::{ChatFiles, ChatMessage};
use crate::device::{DeviceChoice, describe, inference_dtype, open_device};
use crate::lora::PeftAdapter;
use crate::models::causal_lm::{CausalLm, GenerationSettings};
use crate::train::lm_chat::{self, SamplingChoice};

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
        let mut write_error = None;
        let reply = lm_chat::reply(
            &self.model,
            &self.files,
            messages,
            &self.settings,
            |piece| {
                let written = out.write_all(piece.as_bytes()).and_then(|()| out.flush());
                written.map_err(|e| write_error.get_or_insert(e)).is_ok()
            },
        )
        .context("generating the reply")?;
        if let Some(error) = write_error {
            return Err(error.into());
        }
        let Some(reply) = reply else {
            bail!("the reply stopped before its end");
        };
        writeln!(out)?;
        out.flush()?;
        let per_second = (reply.new_tokens.saturating_sub(1)) as f64
            / (reply.total_secs - reply.first_token_secs).max(1e-9);
        eprintln!(
            "{} prompt tokens in {:.2} s, {} new tokens in {:.2} s ({per_second:.1} tokens/s after the first)",
            reply.prompt_tokens, reply.first_token_secs, reply.new_tokens, reply.total_secs
        );
        Ok(reply.text)
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
    if files.generation().stop_ids.is_empty() {
        eprintln!(
            "warning: the model names no end-of-reply token; replies run to --max-new-tokens"
        );
    }
    let asked = SamplingChoice {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repetition_penalty: args.repetition_penalty,
    };
    // The seed is chosen once the sampling is known to be valid.
    let mut settings = lm_chat::generation_settings(files, &asked, args.max_new_tokens, 0)?;
    settings.seed = args.seed.unwrap_or_else(|| {
        let seed = rand::random::<u64>() >> 11;
        if settings.sampling.temperature > 0.0 {
            eprintln!("seed {seed}");
        }
        seed
    });
    Ok(settings)
}
