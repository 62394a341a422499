//! Resumable checkpoints: `output_dir/checkpoint-N/` with the adapters, the optimizer state, and
//! `state.json` (counters, RNG position, the config in its versioned stored form, dataset fingerprint), read
//! back whichever release wrote it. A checkpoint is written under a temporary name, synced, and renamed into
//! place, so a crash or a full disk never leaves a half-written checkpoint under a final name; only the
//! newest `keep` complete checkpoints are kept.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::TrainError;
use crate::atomic_file::{remove_abandoned, temp_name};
use crate::config::{TrainConfig, restore_config};

/// The RNG's exact position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: String,
    pub stream: u64,
    /// A u128 as a decimal string (JSON numbers cannot hold it).
    pub word_pos: String,
}

impl RngState {
    pub fn capture(rng: &ChaCha8Rng) -> Self {
        Self {
            seed: crate::hashing::hex(&rng.get_seed()),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    pub fn restore(&self) -> Result<ChaCha8Rng, String> {
        use rand::SeedableRng;
        let bytes: Vec<u8> = (0..self.seed.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(self.seed.get(i..i + 2).unwrap_or("zz"), 16))
            .collect::<Result<_, _>>()
            .map_err(|_| "the RNG seed is not hexadecimal".to_string())?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "the RNG seed is not 32 bytes".to_string())?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(
            self.word_pos
                .parse()
                .map_err(|_| "the RNG position is not a number".to_string())?,
        );
        Ok(rng)
    }
}

/// Everything but the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format_version: u32,
    pub lora_studio_version: String,
    /// Optimizer steps completed.
    pub step: u64,
    pub rng: RngState,
    /// Consecutive steps skipped for a non-finite loss.
    pub nonfinite_streak: u32,
    /// fp16 dynamic loss scale.
    pub loss_scale: f64,
    pub dataset_fingerprint: String,
    pub images: usize,
    /// Unix seconds when the run (not this resume) started.
    pub training_started_at: u64,
    /// Stored with its version; read from any (see [`Checkpoint::upgrade_note`] for what changed).
    #[serde(with = "crate::config::stored")]
    pub config: TrainConfig,
}

/// Tensors with their names, as a checkpoint stores them.
pub type NamedTensors = [(String, Tensor)];

const STATE_FILE: &str = "state.json";
const ADAPTERS_FILE: &str = "adapters.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// A loaded checkpoint.
pub struct Checkpoint {
    pub path: PathBuf,
    pub state: TrainState,
    pub adapters: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    /// What reading a config stored by another release changed, as a sentence to show; none when nothing did.
    pub upgrade_note: Option<String>,
}

/// Makes sure training can write to `output_dir` before any time is spent (creating it if needed), and
/// removes what an interrupted run left half-written there. Returns the names removed.
pub fn prepare_output_folder(output_dir: &Path) -> Result<Vec<String>, TrainError> {
    let not_writable = |source| TrainError::OutputNotWritable {
        path: output_dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(output_dir).map_err(not_writable)?;
    let probe = output_dir.join(temp_name("write-check"));
    std::fs::write(&probe, b"").map_err(not_writable)?;
    let _ = std::fs::remove_file(&probe);
    Ok(remove_abandoned(output_dir))
}

/// Writes `output_dir/checkpoint-STEP` atomically and prunes old checkpoints; `write_extra` adds files to
/// the folder before it gets its final name.
pub fn save_checkpoint(
    output_dir: &Path,
    state: &TrainState,
    (adapters, optimizer): (&NamedTensors, &NamedTensors),
    write_extra: &dyn Fn(&Path) -> Result<(), TrainError>,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let final_dir = output_dir.join(format!("checkpoint-{}", state.step));
    let temp_dir = output_dir.join(temp_name(&format!("checkpoint-{}", state.step)));
    if temp_dir.exists() {
        std::fs::remove_dir_all(&temp_dir).map_err(io(&temp_dir))?;
    }
    std::fs::create_dir_all(&temp_dir).map_err(io(&temp_dir))?;
    let written = (|| -> Result<(), TrainError> {
        write_tensors(&temp_dir.join(ADAPTERS_FILE), adapters)?;
        write_tensors(&temp_dir.join(OPTIMIZER_FILE), optimizer)?;
        write_extra(&temp_dir)?;
        let json = serde_json::to_string_pretty(state).map_err(|e| TrainError::Checkpoint {
            path: temp_dir.clone(),
            reason: e.to_string(),
        })?;
        let state_path = temp_dir.join(STATE_FILE);
        crate::atomic_file::write_atomically(&state_path, |w| {
            std::io::Write::write_all(w, json.as_bytes())
        })
        .map_err(io(&state_path))?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&temp_dir);
        return Err(e);
    }
    // Replace an older checkpoint of the same step (a resumed run saving again) only once the new one is whole.
    if final_dir.exists() {
        let stale = output_dir.join(temp_name(&format!("checkpoint-{}.old", state.step)));
        std::fs::rename(&final_dir, &stale).map_err(io(&final_dir))?;
        std::fs::rename(&temp_dir, &final_dir).map_err(io(&final_dir))?;
        let _ = std::fs::remove_dir_all(&stale);
    } else {
        std::fs::rename(&temp_dir, &final_dir).map_err(io(&final_dir))?;
    }
    sync_dir(output_dir);
    prune(output_dir, keep)?;
    Ok(final_dir)
}

fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), TrainError> {
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    crate::atomic_file::write_atomically(path, |w| std::io::Write::write_all(w, &bytes)).map_err(
        |source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        },
    )
}

/// Turns an I/O error on `path` into a training error.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.to_path_buf();
    move |source| TrainError::Io { path, source }
}

/// Makes a rename durable (best effort: not every file system supports syncing a folder).
fn sync_dir(dir: &Path) {
    if let Ok(handle) = std::fs::File::open(dir) {
        let _ = handle.sync_all();
    }
}

/// The complete checkpoints in `output_dir`, oldest first.
pub fn list_checkpoints(output_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path()
                .join(STATE_FILE)
                .is_file()
                .then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

fn prune(output_dir: &Path, keep: usize) -> Result<(), TrainError> {
    let all = list_checkpoints(output_dir);
    for (step, path) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        // Renamed first, so that a kill during the removal leaves a hidden leftover, not half a checkpoint.
        let doomed = output_dir.join(temp_name(&format!("checkpoint-{step}.pruned")));
        std::fs::rename(path, &doomed).map_err(io(path))?;
        std::fs::remove_dir_all(&doomed).map_err(io(&doomed))?;
    }
    Ok(())
}

/// The checkpoint folder `path` names: itself, or given an output folder, its newest checkpoint.
pub fn checkpoint_dir(path: &Path) -> Result<PathBuf, TrainError> {
    if path.join(STATE_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    list_checkpoints(path)
        .pop()
        .map(|(_, p)| p)
        .ok_or_else(|| TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason: "it is not a checkpoint folder and contains no checkpoint-N folders"
                .to_string(),
        })
}

/// Reads a checkpoint folder (or, given an output folder, its newest checkpoint).
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<Checkpoint, TrainError> {
    let dir = checkpoint_dir(path)?;
    let bad = |reason: String| TrainError::Checkpoint {
        path: dir.clone(),
        reason,
    };
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|source| TrainError::Io {
        path: state_path,
        source,
    })?;
    let damaged = |e: serde_json::Error| bad(format!("its state.json is damaged ({e})"));
    let value: serde_json::Value = serde_json::from_str(&text).map_err(damaged)?;
    // The state's own reading upgrades the config the same way; this one keeps the notes.
    let restored = restore_config(value.get("config").cloned().unwrap_or_default());
    let state: TrainState = serde_json::from_value(value).map_err(damaged)?;
    let upgrade_note = restored.summary(&format!(
        "{} was written by lora-studio {}",
        dir.display(),
        state.lora_studio_version
    ));
    let read = |name: &str| -> Result<HashMap<String, Tensor>, TrainError> {
        candle_core::safetensors::load(dir.join(name), device).map_err(|e| {
            bad(format!(
                "{name} cannot be read ({})",
                crate::tensor_file::plain_error(&e)
            ))
        })
    };
    Ok(Checkpoint {
        adapters: read(ADAPTERS_FILE)?,
        optimizer: read(OPTIMIZER_FILE)?,
        state,
        path: dir,
        upgrade_note,
    })
}
