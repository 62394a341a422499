//! Sample previews during training: the configured prompts at each configured strength, with a fixed seed,
//! saved as PNG under `output_dir/samples` and logged to TensorBoard.

use candle_core::Device;

use super::TrainError;
use super::report::TrainReporter;
use super::tensorboard::EventWriter;
use crate::config::TrainConfig;
use crate::lora::LoraNetwork;
use crate::models::pipeline::{GenerateRequest, StableDiffusion, to_rgb8};
use crate::models::schedulers::{NoiseSource, SamplerKind, SeededNoise};

/// Renders every prompt at every strength, then puts the network back at strength 1.
pub fn render_samples(
    model: &StableDiffusion,
    network: &LoraNetwork,
    config: &TrainConfig,
    step: u64,
    mut events: Option<&mut EventWriter>,
    reporter: &mut dyn TrainReporter,
) -> Result<(), TrainError> {
    let dir = config.output_dir.join("samples");
    std::fs::create_dir_all(&dir).map_err(|source| TrainError::Io {
        path: dir.clone(),
        source,
    })?;
    let size = config.sample_size.unwrap_or(config.training_resolution()) as usize;
    for (index, prompt) in config.sample_prompts.iter().enumerate() {
        for &strength in &config.sample_strengths {
            let _rendering = network.rendering_at(strength);
            let request = GenerateRequest {
                prompt: prompt.clone(),
                negative_prompt: config.sample_negative_prompt.clone(),
                width: size,
                height: size,
                steps: config.sample_steps as usize,
                guidance_scale: config.sample_cfg,
                sampler: SamplerKind::Ddim,
                clip_skip: config.clip_skip as usize,
            };
            let mut noise = SeededNoise::new(config.sample_seed);
            let init = noise.next(&model.latent_dims(size, size)?, &Device::Cpu)?;
            let generated = model.generate(&request, &init, &mut noise, &mut |_, _| true)?;
            let image = to_rgb8(&generated.image)?;
            let path = dir.join(format!(
                "step{step:06}-prompt{index}-strength{strength}.png"
            ));
            let mut png = Vec::new();
            image::DynamicImage::ImageRgb8(image.clone())
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .map_err(|e| TrainError::Io {
                    path: path.clone(),
                    source: std::io::Error::other(e),
                })?;
            crate::atomic_file::write_atomically(&path, |w| std::io::Write::write_all(w, &png))
                .map_err(|source| TrainError::Io {
                    path: path.clone(),
                    source,
                })?;
            if let Some(events) = events.as_deref_mut() {
                let tag = format!("samples/prompt{index}/strength{strength}");
                events
                    .image(&tag, &png, image.width(), image.height(), step)
                    .map_err(|source| TrainError::Io {
                        path: events.path().to_path_buf(),
                        source,
                    })?;
            }
            reporter.sample(&path, step);
        }
    }
    Ok(())
}
