//! The base models offered for download to someone who has none: where each is on the Hugging Face Hub,
//! which file, and about how big (the exact size comes from the Hub before the download starts).

use super::Family;

/// A base model offered for download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recommended {
    /// The short name `lora-studio download` takes.
    pub name: &'static str,
    /// What it is, in a few words (`Stable Diffusion 1.5`).
    pub label: &'static str,
    /// What it is, exactly.
    pub title: &'static str,
    pub family: Family,
    /// The Hub repository.
    pub repo: &'static str,
    /// The file to fetch; `None` fetches the model folder (config, tokenizer, weights).
    pub file: Option<&'static str>,
    /// About how many bytes it is.
    pub approximate_bytes: u64,
}

/// The recommended bases, most useful first.
pub const RECOMMENDED: [Recommended; 2] = [
    Recommended {
        name: "sd15",
        label: "Stable Diffusion 1.5",
        title: "Stable Diffusion 1.5 (pruned, EMA weights, fp16)",
        family: Family::Sd1,
        repo: "Comfy-Org/stable-diffusion-v1-5-archive",
        file: Some("v1-5-pruned-emaonly-fp16.safetensors"),
        approximate_bytes: 2_130_000_000,
    },
    Recommended {
        name: "sdxl",
        label: "SDXL base 1.0",
        title: "Stable Diffusion XL base 1.0 (fp16)",
        family: Family::Sdxl,
        repo: "stabilityai/stable-diffusion-xl-base-1.0",
        file: Some("sd_xl_base_1.0.safetensors"),
        approximate_bytes: 6_940_000_000,
    },
];

/// The recommended base called `name`.
pub fn find(name: &str) -> Option<&'static Recommended> {
    RECOMMENDED
        .iter()
        .find(|r| r.name.eq_ignore_ascii_case(name))
}
