//! The presets shipped in `presets/`, built into the binary so the app offers them wherever it runs: those
//! for SD1/SD2 bases, those for SDXL ones and those for chat models, each made for an amount of GPU memory
//! or for the CPU. When the user picks a base of another family, the same hardware's preset of that family
//! takes over.

use std::path::Path;

use crate::config::{TrainConfig, config_from_text};
use crate::messages::BaseFamily;

/// What a preset is made for: the CPU or a GPU with this many GiB of memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hardware {
    Cpu,
    GpuGib(u32),
}

/// One preset: its name in the app, its file and text, the family of base models and the hardware it is
/// made for (`None`: an example or the defaults, made for no particular hardware).
struct Preset {
    name: &'static str,
    file: &'static str,
    text: &'static str,
    family: BaseFamily,
    hardware: Option<Hardware>,
}

macro_rules! preset {
    ($name:expr, $file:expr, $family:ident, $hardware:expr) => {
        Preset {
            name: $name,
            file: $file,
            text: include_str!(concat!("../../presets/", $file)),
            family: BaseFamily::$family,
            hardware: $hardware,
        }
    };
}

const PRESETS: [Preset; 16] = [
    preset!("24 GB GPU", "gpu-24gb.toml", Sd, Some(Hardware::GpuGib(24))),
    preset!("16 GB GPU", "gpu-16gb.toml", Sd, Some(Hardware::GpuGib(16))),
    preset!("8 GB GPU", "gpu-8gb.toml", Sd, Some(Hardware::GpuGib(8))),
    preset!("CPU", "cpu.toml", Sd, Some(Hardware::Cpu)),
    preset!("Cyberpunk example", "cyberpunk.toml", Sd, None),
    preset!("Default", "default.toml", Sd, None),
    preset!(
        "SDXL, 24 GB GPU",
        "sdxl-gpu-24gb.toml",
        Sdxl,
        Some(Hardware::GpuGib(24))
    ),
    preset!(
        "SDXL, 16 GB GPU",
        "sdxl-gpu-16gb.toml",
        Sdxl,
        Some(Hardware::GpuGib(16))
    ),
    preset!(
        "SDXL, 12 GB GPU",
        "sdxl-gpu-12gb.toml",
        Sdxl,
        Some(Hardware::GpuGib(12))
    ),
    preset!(
        "SDXL, 8 GB GPU",
        "sdxl-gpu-8gb.toml",
        Sdxl,
        Some(Hardware::GpuGib(8))
    ),
    preset!("SDXL, CPU", "sdxl-cpu.toml", Sdxl, Some(Hardware::Cpu)),
    preset!(
        "Chat, 24 GB GPU",
        "chat-gpu-24gb.toml",
        Language,
        Some(Hardware::GpuGib(24))
    ),
    preset!(
        "Chat, 16 GB GPU",
        "chat-gpu-16gb.toml",
        Language,
        Some(Hardware::GpuGib(16))
    ),
    preset!(
        "Chat, 8 GB GPU",
        "chat-gpu-8gb.toml",
        Language,
        Some(Hardware::GpuGib(8))
    ),
    preset!("Chat, CPU", "chat-cpu.toml", Language, Some(Hardware::Cpu)),
    preset!("Chat example", "chat.toml", Language, None),
];

/// The names of the presets for bases of `family`.
pub fn preset_names(family: BaseFamily) -> impl Iterator<Item = &'static str> {
    PRESETS
        .iter()
        .filter(move |p| p.family == family)
        .map(|p| p.name)
}

/// The family of the preset called `name`, and the hardware it is made for.
pub fn preset_kind(name: &str) -> Option<(BaseFamily, Option<Hardware>)> {
    PRESETS
        .iter()
        .find(|p| p.name == name)
        .map(|p| (p.family, p.hardware))
}

/// The preset to apply when the base model changes to one of `family`, after `current` (the preset chosen
/// so far, maybe none): the one of `family` for the same hardware, or for the most memory at or below it;
/// with no hardware known, `fallback`'s. `None` when there is no such preset.
pub fn counterpart(current: &str, family: BaseFamily, fallback: Hardware) -> Option<&'static str> {
    let hardware = preset_kind(current)
        .and_then(|(_, hardware)| hardware)
        .unwrap_or(fallback);
    PRESETS
        .iter()
        .filter(|p| p.family == family)
        .filter_map(|p| Some((p.hardware?, p.name)))
        .filter(|(h, _)| *h <= hardware)
        .max_by_key(|(h, _)| *h)
        .map(|(_, name)| name)
}

/// The settings of a preset, keeping the user's dataset, base model and output from `current`.
pub fn apply_preset(name: &str, current: &TrainConfig) -> Result<TrainConfig, String> {
    let preset = PRESETS
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| format!("there is no preset `{name}`"))?;
    let settings =
        config_from_text(preset.text, Path::new(preset.file)).map_err(|e| e.to_string())?;
    Ok(TrainConfig {
        train_data_dir: current.train_data_dir.clone(),
        metadata_path: current.metadata_path.clone(),
        trigger_word: current
            .trigger_word
            .clone()
            .or(settings.trigger_word.clone()),
        base_model: current.base_model.clone(),
        output_dir: current.output_dir.clone(),
        output_name: current.output_name.clone(),
        ..settings
    })
}

#[cfg(test)]
mod tests {
    use super::{Hardware, PRESETS, apply_preset, counterpart, preset_kind, preset_names};
    use crate::app::estimate::{Processor, estimate};
    use crate::config::TrainConfig;
    use crate::messages::BaseFamily;

    #[test]
    fn every_preset_applies_and_keeps_the_paths() {
        let current = TrainConfig {
            base_model: "mine.safetensors".into(),
            ..Default::default()
        };
        for preset in &PRESETS {
            let applied = apply_preset(preset.name, &current).unwrap();
            assert_eq!(applied.base_model, current.base_model, "{}", preset.name);
        }
        assert_eq!(apply_preset("8 GB GPU", &current).unwrap().batch_size, 1);
    }

    #[test]
    fn each_family_is_offered_its_own_presets() {
        let sd: Vec<_> = preset_names(BaseFamily::Sd).collect();
        let sdxl: Vec<_> = preset_names(BaseFamily::Sdxl).collect();
        let chat: Vec<_> = preset_names(BaseFamily::Language).collect();
        assert!(sd.contains(&"Default") && sdxl.contains(&"SDXL, 12 GB GPU"));
        assert!(chat.contains(&"Chat, CPU") && chat.contains(&"Chat, 24 GB GPU"));
        assert!(
            sd.iter()
                .all(|name| !sdxl.contains(name) && !chat.contains(name))
        );
        for name in chat {
            let settings = apply_preset(name, &TrainConfig::default()).unwrap();
            assert!(
                settings.language_model_targets().unwrap().len() == 7,
                "{name}"
            );
            assert!(settings.packing && !settings.train_on_prompt, "{name}");
        }
        for name in sdxl {
            let settings = apply_preset(name, &TrainConfig::default()).unwrap();
            // SDXL is trained near its native 1024 px, from 512 where memory is short, on the 32-px step.
            let resolution = settings.training_resolution();
            assert!(
                (512..=1024).contains(&resolution) && resolution.is_multiple_of(32),
                "{name}"
            );
        }
    }

    #[test]
    fn a_family_change_keeps_the_hardware() {
        let gpu_8 = Hardware::GpuGib(8);
        let sdxl = BaseFamily::Sdxl;
        let sd = BaseFamily::Sd;
        assert_eq!(
            counterpart("16 GB GPU", sdxl, gpu_8),
            Some("SDXL, 16 GB GPU")
        );
        assert_eq!(counterpart("SDXL, 24 GB GPU", sd, gpu_8), Some("24 GB GPU"));
        assert_eq!(counterpart("CPU", sdxl, gpu_8), Some("SDXL, CPU"));
        // SD has no 12 GB preset: the 8 GB one fits that card.
        assert_eq!(counterpart("SDXL, 12 GB GPU", sd, gpu_8), Some("8 GB GPU"));
        // No preset, or one made for no hardware: the fallback's.
        assert_eq!(counterpart("", sdxl, gpu_8), Some("SDXL, 8 GB GPU"));
        assert_eq!(
            counterpart("Default", sdxl, Hardware::Cpu),
            Some("SDXL, CPU")
        );
        assert_eq!(preset_kind("SDXL, CPU"), Some((sdxl, Some(Hardware::Cpu))));
        let chat = BaseFamily::Language;
        assert_eq!(
            counterpart("16 GB GPU", chat, gpu_8),
            Some("Chat, 16 GB GPU")
        );
        assert_eq!(
            counterpart("SDXL, 12 GB GPU", chat, gpu_8),
            Some("Chat, 8 GB GPU")
        );
        assert_eq!(counterpart("Chat, CPU", sd, gpu_8), Some("CPU"));
    }

    #[test]
    fn every_gpu_preset_is_estimated_to_fit_its_memory() {
        for preset in &PRESETS {
            let Some(Hardware::GpuGib(gib)) = preset.hardware else {
                continue;
            };
            let settings = apply_preset(preset.name, &TrainConfig::default()).unwrap();
            let step = estimate(&settings, Processor::Gpu, preset.family);
            assert!(
                step.memory_gib <= gib as f64,
                "{}: {:.1} GiB",
                preset.name,
                step.memory_gib
            );
        }
    }
}
