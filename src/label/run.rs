//! Captioning a dataset folder: find the images the dataset loader would train on, skip those that already
//! have a caption (unless overwriting), caption the rest one by one with every loaded model, and save each
//! caption the moment it exists, atomically, so a stopped or crashed run resumes where it was.

use std::path::{Path, PathBuf};

use candle_core::Device;

use super::LabelError;
use super::captioner::Captioner;
use crate::config::TrainConfig;
use crate::data::caption_store::{CaptionTarget, IfCaptioned, Saved, save_caption};
use crate::data::images::load_oriented;
use crate::data::scan::scan_dataset;

/// Where captions are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaptionOutput {
    /// Rows of this `metadata.csv` (`file_name,text`, paths relative to the input folder; other rows kept).
    Csv(PathBuf),
    /// A sidecar next to each image with this extension (`txt`).
    Sidecars { extension: String },
}

/// What to caption and how to write it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelOptions {
    pub input: PathBuf,
    pub output: CaptionOutput,
    /// Written before every caption (a trigger word), followed by ", ".
    pub prefix: Option<String>,
    /// Replace captions that already exist.
    pub overwrite: bool,
}

impl LabelOptions {
    /// The output a dataset folder already uses: its `metadata.csv` if it has one, else `.txt` sidecars if
    /// any image has one, else a new `metadata.csv`.
    pub fn default_output(input: &Path) -> CaptionOutput {
        let csv = input.join("metadata.csv");
        if csv.is_file() {
            return CaptionOutput::Csv(csv);
        }
        let has_sidecars = std::fs::read_dir(input).is_ok_and(|entries| {
            entries
                .filter_map(|e| e.ok())
                .any(|e| e.path().extension().is_some_and(|x| x == "txt"))
        });
        if has_sidecars {
            CaptionOutput::Sidecars {
                extension: "txt".to_string(),
            }
        } else {
            CaptionOutput::Csv(csv)
        }
    }
}

/// Progress of a labelling run.
pub trait LabelReporter {
    /// The images that will be captioned, and how many keep the caption they have.
    fn planned(&mut self, to_caption: &[PathBuf], kept: usize);
    /// One image's caption was written (`relative` to the input folder) to `target`.
    fn captioned(&mut self, relative: &Path, caption: &str, target: &Path);
    /// One of the planned images could not be captioned; the run goes on.
    fn failed(&mut self, relative: &Path, reason: &str);
    /// A file the dataset scan could not read (it was never planned).
    fn unreadable(&mut self, relative: &Path, reason: &str) {
        self.failed(relative, reason);
    }
}

/// How a labelling run ended.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelReport {
    pub captioned: usize,
    /// Images that already had a caption and kept it.
    pub kept: usize,
    /// Images that could not be read or captioned, with the reason (relative paths).
    pub failed: Vec<(PathBuf, String)>,
    /// Stopped before the end; what was written stays.
    pub cancelled: bool,
}

/// What a run will do, from a scan of the dataset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelPlan {
    /// Images to caption, relative to the input folder.
    pub to_caption: Vec<PathBuf>,
    /// Images that keep the caption they have.
    pub kept: usize,
    /// Images (or their caption files) that cannot be read, with the reason.
    pub unreadable: Vec<(PathBuf, String)>,
}

/// The images to caption: the dataset's images without a caption (or all of them when overwriting).
pub fn plan(options: &LabelOptions) -> Result<LabelPlan, LabelError> {
    let config = TrainConfig {
        train_data_dir: options.input.clone(),
        metadata_path: match &options.output {
            CaptionOutput::Csv(path) if path.is_file() => Some(path.clone()),
            _ => None,
        },
        caption_extension: match &options.output {
            CaptionOutput::Sidecars { extension } => format!(".{extension}"),
            CaptionOutput::Csv(_) => ".txt".to_string(),
        },
        instance_prompt: None,
        ..TrainConfig::default()
    };
    let dataset = scan_dataset(&config)?;
    let (mut to_caption, mut kept) = (Vec::new(), 0);
    for item in &dataset.items {
        let has_caption = item.raw_caption.as_ref().is_some_and(|c| !c.is_empty());
        if has_caption && !options.overwrite {
            kept += 1;
        } else {
            to_caption.push(item.relative.clone());
        }
    }
    let unreadable = dataset
        .unreadable
        .iter()
        .map(|(path, reason)| {
            let relative = path.strip_prefix(&options.input).unwrap_or(path);
            (relative.to_path_buf(), reason.clone())
        })
        .collect();
    Ok(LabelPlan {
        to_caption,
        kept,
        unreadable,
    })
}

/// Captions the images of `options.input` with `captioners` (their parts joined with ", "), saving each
/// caption as soon as it is made. `cancelled` is checked before every image.
pub fn label_folder(
    options: &LabelOptions,
    captioners: &[Captioner],
    device: &Device,
    reporter: &mut dyn LabelReporter,
    cancelled: &dyn Fn() -> bool,
) -> Result<LabelReport, LabelError> {
    if captioners.is_empty() {
        return Err(LabelError::Input(
            "no captioning model was given".to_string(),
        ));
    }
    let LabelPlan {
        to_caption,
        kept,
        unreadable,
    } = plan(options)?;
    reporter.planned(&to_caption, kept);
    let mut report = LabelReport {
        kept,
        ..LabelReport::default()
    };
    for (relative, reason) in unreadable {
        reporter.unreadable(&relative, &reason);
        report.failed.push((relative, reason));
    }
    let prefix = options
        .prefix
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty());
    for relative in to_caption {
        if cancelled() {
            report.cancelled = true;
            break;
        }
        let path = options.input.join(&relative);
        let caption = match caption_image(&path, captioners, device) {
            Ok(parts) if parts.is_empty() => Err("the models produced no caption".to_string()),
            Ok(parts) => Ok(parts.join(", ")),
            Err(error) => Err(error.to_string()),
        };
        match caption {
            Ok(caption) => {
                let caption = match prefix {
                    Some(prefix) => format!("{prefix}, {caption}"),
                    None => caption,
                };
                let target = match &options.output {
                    CaptionOutput::Csv(csv) => CaptionTarget::Csv(csv.clone()),
                    CaptionOutput::Sidecars { extension } => CaptionTarget::Sidecar(
                        path.with_extension(extension.trim_start_matches('.')),
                    ),
                };
                // An image captioned since the plan was made (typed in the app meanwhile) keeps its caption.
                let if_captioned = if options.overwrite {
                    IfCaptioned::Replace
                } else {
                    IfCaptioned::Keep
                };
                if save_caption(&target, &relative, &caption, if_captioned)? == Saved::KeptExisting
                {
                    report.kept += 1;
                    continue;
                }
                let (CaptionTarget::Csv(written) | CaptionTarget::Sidecar(written)) = &target;
                reporter.captioned(&relative, &caption, written);
                report.captioned += 1;
            }
            Err(reason) => {
                reporter.failed(&relative, &reason);
                report.failed.push((relative, reason));
            }
        }
    }
    Ok(report)
}

/// Every model's contribution for one image.
fn caption_image(
    path: &Path,
    captioners: &[Captioner],
    device: &Device,
) -> Result<Vec<String>, LabelError> {
    let image = load_oriented(path)?;
    let mut parts = Vec::new();
    for captioner in captioners {
        parts.extend(captioner.describe(&image, device)?);
    }
    Ok(parts)
}
