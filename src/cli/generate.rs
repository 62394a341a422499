//! `lora-studio generate`: one image from a prompt, a base model and any number of kohya LoRA files.
//!
//! The PNG carries A1111-style generation parameters (its "PNG Info"), and `--init-noise` takes the initial
//! latents from a file so a run can be reproduced in other tools.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use crate::atomic_file::write_atomically;
use crate::device::{DeviceChoice, describe, inference_dtype, open_device};
use crate::lora::KohyaLora;
use crate::models::checkpoint::{ModelFamily, ModelSource, PredictionOrigin};
use crate::models::pipeline::{GenerateRequest, StableDiffusion, to_rgb8};
use crate::models::schedulers::{NoiseSource, PredictionType, SamplerKind, SeededNoise};
use crate::tensor_file::TensorFile;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Base model: a single-file checkpoint (.safetensors/.ckpt), a diffusers folder, or the name of a model
    /// found on this computer (`lora-studio models` lists them).
    #[arg(long, value_name = "MODEL")]
    pub base: PathBuf,
    /// What to draw.
    #[arg(long)]
    pub prompt: String,
    /// What to steer away from.
    #[arg(long, default_value = "")]
    pub negative: String,
    /// A kohya LoRA file and its strength, e.g. `style.safetensors:0.8` (repeatable; strength 1 if omitted).
    #[arg(long = "lora", value_name = "FILE[:STRENGTH]")]
    pub loras: Vec<String>,
    /// Random seed (a random one is chosen and printed if omitted).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Sampling steps.
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.5)]
    pub cfg: f64,
    /// Image width in pixels (default: the model's native size).
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels (default: the model's native size).
    #[arg(long)]
    pub height: Option<usize>,
    /// The sampler, each as diffusers' scheduler of that name: ddim, euler_a (Euler ancestral), euler (Euler
    /// discrete, diffusers' default for SDXL), dpmpp_2m (DPM-Solver++ 2M).
    #[arg(long, value_enum, default_value_t = SchedulerArg::EulerA)]
    pub scheduler: SchedulerArg,
    /// Karras sigmas for dpmpp_2m ("DPM++ 2M Karras").
    #[arg(long)]
    pub karras: bool,
    /// A safetensors file with one f32 tensor `latents` [1,4,H/8,W/8] used as the initial noise.
    #[arg(long, value_name = "FILE")]
    pub init_noise: Option<PathBuf>,
    /// Use the text encoder's n-th layer from the end (2 = A1111's "clip skip 2"; not for SDXL).
    #[arg(long, default_value_t = 1)]
    pub clip_skip: usize,
    /// Override what the model predicts, for checkpoints without a config that says so.
    #[arg(long, value_enum)]
    pub prediction: Option<PredictionArg>,
    /// cpu, cuda, cuda:N, metal or auto.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Where to write the PNG.
    #[arg(long, value_name = "FILE.png")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SchedulerArg {
    Ddim,
    #[value(name = "euler_a")]
    EulerA,
    Euler,
    #[value(name = "dpmpp_2m")]
    DpmPp2m,
}

impl SchedulerArg {
    /// The sampler these flags choose; `--karras` belongs to dpmpp_2m only.
    fn sampler(self, karras: bool) -> anyhow::Result<SamplerKind> {
        Ok(match (self, karras) {
            (SchedulerArg::DpmPp2m, karras) => SamplerKind::DpmSolverMultistep { karras },
            (_, true) => bail!("--karras works only with --scheduler dpmpp_2m"),
            (SchedulerArg::Ddim, false) => SamplerKind::Ddim,
            (SchedulerArg::EulerA, false) => SamplerKind::EulerAncestral,
            (SchedulerArg::Euler, false) => SamplerKind::Euler,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PredictionArg {
    Epsilon,
    V,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let sampler = args.scheduler.sampler(args.karras)?;
    let loras = args
        .loras
        .iter()
        .map(|spec| super::parse_lora_spec(spec))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let device = open_device(args.device).map_err(anyhow::Error::msg)?;
    let dtype = inference_dtype(&device);

    let base = super::base_model_path(&args.base)?;
    let mut source = ModelSource::open(&base)?;
    if let Some(prediction) = args.prediction {
        source.set_prediction_type(match prediction {
            PredictionArg::Epsilon => PredictionType::Epsilon,
            PredictionArg::V => PredictionType::VPrediction,
        });
    }
    eprintln!(
        "loading {} ({}) on {}",
        base.display(),
        source.config().family.label(),
        describe(&device)
    );
    let started = Instant::now();
    let model = StableDiffusion::load(&source, &device, dtype)?;
    drop(source);
    eprintln!("loaded in {:.1} s", started.elapsed().as_secs_f64());
    if model.config().prediction_origin != PredictionOrigin::Config {
        eprintln!("{}", model.prediction_note());
    }
    if let Some(note) = model.vae_precision_note() {
        eprintln!("{note}");
    }
    if model.config().scheduler.rescale_betas_zero_snr && args.scheduler != SchedulerArg::Ddim {
        eprintln!(
            "this model was trained with zero terminal SNR: DDIM starts sampling at its last timestep (pure \
             noise), Euler a does not yet; --scheduler ddim follows the model more closely"
        );
    }
    if model.config().family == ModelFamily::Sdxl && args.clip_skip > 1 {
        eprintln!(
            "--clip-skip does not apply to SDXL, which conditions on both text encoders' penultimate layers"
        );
    }
    for (path, strength) in &loras {
        let lora = KohyaLora::load(path, &device)?;
        let report = lora.attach(&model.adapter_components(), *strength, dtype)?;
        eprintln!(
            "applied {} at strength {strength}: {} modules",
            path.display(),
            report.adapters.len()
        );
        if !report.unmatched.is_empty() {
            eprintln!(
                "warning: {} modules of {} match no layer of this model and were skipped (first: {})",
                report.unmatched.len(),
                path.display(),
                report.unmatched[0]
            );
        }
    }

    let native = model.config().unet.sample_size * model.config().vae.downscale_factor();
    let request = GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative.clone(),
        width: args.width.unwrap_or(native),
        height: args.height.unwrap_or(native),
        steps: args.steps,
        guidance_scale: args.cfg,
        sampler,
        clip_skip: args.clip_skip,
    };
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut noise = SeededNoise::new(seed);
    let dims = model.latent_dims(request.width, request.height)?;
    let init_noise = match &args.init_noise {
        Some(path) => read_init_noise(path, &dims)?,
        None => noise.next(&dims, &Device::Cpu)?,
    };

    let bar = ProgressBar::new(request.steps as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let generated = model.generate(&request, &init_noise, &mut noise, &mut |done, _| {
        bar.set_position(done as u64);
        true
    })?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "generated {}x{} in {seconds:.1} s ({:.2} s per step, VAE decode included)",
        request.width,
        request.height,
        seconds / request.steps as f64
    );

    let image = to_rgb8(&generated.image)?;
    let parameters = infotext(&args, &request, seed, &loras);
    write_png(&args.out, &image, &parameters)
        .with_context(|| format!("could not write the image to {}", args.out.display()))?;
    eprintln!("wrote {} (seed {seed})", args.out.display());
    Ok(())
}

/// Reads `--init-noise`: a safetensors file whose tensor `latents` has exactly the latent shape.
fn read_init_noise(path: &Path, dims: &[usize; 4]) -> anyhow::Result<Tensor> {
    let file = TensorFile::open(path)?;
    let Some(info) = file.info("latents") else {
        bail!("{} has no tensor named `latents`", path.display());
    };
    if info.shape != dims {
        bail!(
            "the `latents` tensor in {} has shape {:?}, but this image size needs {dims:?}",
            path.display(),
            info.shape
        );
    }
    Ok(file.load("latents", &Device::Cpu)?.to_dtype(DType::F32)?)
}

/// The A1111 "parameters" text, so WebUI's PNG Info and civitai read the settings back.
fn infotext(
    args: &GenerateArgs,
    request: &GenerateRequest,
    seed: u64,
    loras: &[(PathBuf, f64)],
) -> String {
    let mut prompt = request.prompt.clone();
    for (path, strength) in loras {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        prompt.push_str(&format!(" <lora:{name}:{strength}>"));
    }
    let sampler = match request.sampler {
        SamplerKind::Ddim => "DDIM",
        SamplerKind::EulerAncestral => "Euler a",
        SamplerKind::Euler => "Euler",
        SamplerKind::DpmSolverMultistep { karras: true } => "DPM++ 2M Karras",
        SamplerKind::DpmSolverMultistep { karras: false } => "DPM++ 2M",
    };
    let model = args
        .base
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut text = prompt;
    if !request.negative_prompt.is_empty() {
        text.push_str(&format!("\nNegative prompt: {}", request.negative_prompt));
    }
    text.push_str(&format!(
        "\nSteps: {}, Sampler: {sampler}, CFG scale: {}, Seed: {seed}, Size: {}x{}, Model: {model}",
        request.steps, request.guidance_scale, request.width, request.height
    ));
    if request.clip_skip > 1 {
        text.push_str(&format!(", Clip skip: {}", request.clip_skip));
    }
    text.push_str(&format!(
        ", Version: lora-studio {}",
        crate::build_info::VERSION
    ));
    text
}

fn write_png(path: &Path, image: &image::RgbImage, parameters: &str) -> std::io::Result<()> {
    write_atomically(path, |writer| {
        let mut encoder = png::Encoder::new(writer, image.width(), image.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder
            .add_text_chunk("parameters".to_string(), parameters.to_string())
            .map_err(std::io::Error::other)?;
        let mut png = encoder.write_header().map_err(std::io::Error::other)?;
        png.write_image_data(image.as_raw())
            .map_err(std::io::Error::other)?;
        png.finish().map_err(std::io::Error::other)
    })
}
