//! Writing a trained network as a kohya LoRA file that AUTOMATIC1111, Forge, ComfyUI and diffusers load:
//! DoRA folded into a plain low-rank delta (with the folding error stated), PiSSA converted exactly to a
//! rank-2r delta, kohya's `sshs_*` hashes, string metadata, and an optional diffusers/PEFT-layout copy.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::adapter::AdapterKind;
use super::error::LoraError;
use super::network::{LoraNetwork, NetworkKind};
use super::svd::{to_matrix, truncated_svd};
use crate::atomic_file::write_atomically;

/// One module of an exported file.
#[derive(Debug, Clone)]
pub struct ExportedModule {
    pub kohya_name: String,
    /// The diffusers module path (`down_blocks.0.attentions.0.proj_in`).
    pub module_path: String,
    /// The kohya prefix of its component (`lora_unet`, `lora_te`, `lora_te1`, `lora_te2`).
    pub prefix: String,
    pub down: Tensor,
    pub up: Tensor,
    pub alpha: f64,
}

/// A rank and the alpha that goes with it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RankAlpha {
    pub rank: usize,
    pub alpha: f64,
}

/// What kohya's metadata says of a network: `network_dim`/`network_alpha` for the linear modules (1x1
/// convolutions included) and `conv_dim`/`conv_alpha` for the larger convolutions (LoCon).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetworkDims {
    pub linear: Option<RankAlpha>,
    pub conv: Option<RankAlpha>,
}

impl ExportedModule {
    /// Whether it adapts a convolution with a kernel larger than 1x1 (kohya's conv rank and alpha apply).
    fn is_spatial_conv(&self) -> bool {
        matches!(self.down.dims(), [_, _, height, width] if height * width > 1)
    }
}

/// A network turned into plain LoRA modules.
#[derive(Debug, Clone)]
pub struct ExportedLora {
    pub modules: Vec<ExportedModule>,
    /// How exactly the file reproduces the trained network, for the metadata.
    pub exactness: String,
}

impl ExportedLora {
    /// The largest rank (with its alpha) among the linear modules and among the larger convolutions of the
    /// file. Ranks differ between modules only where a folded DoRA layer needed more (its alpha is its
    /// rank, scale 1, in every module).
    pub fn network_dims(&self) -> NetworkDims {
        let largest = |conv: bool| {
            self.modules
                .iter()
                .filter(|m| m.is_spatial_conv() == conv)
                .map(|m| RankAlpha {
                    rank: m.down.dims()[0],
                    alpha: m.alpha,
                })
                .max_by_key(|dims| dims.rank)
        };
        NetworkDims {
            linear: largest(false),
            conv: largest(true),
        }
    }

    /// kohya tensors: `NAME.lora_down.weight`, `NAME.lora_up.weight`, `NAME.alpha` (0-dim), in `dtype`.
    pub fn kohya_tensors(&self, dtype: DType) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut tensors = Vec::with_capacity(self.modules.len() * 3);
        for m in &self.modules {
            let device = m.down.device();
            tensors.push((
                format!("{}.lora_down.weight", m.kohya_name),
                m.down.to_dtype(dtype)?,
            ));
            tensors.push((
                format!("{}.lora_up.weight", m.kohya_name),
                m.up.to_dtype(dtype)?,
            ));
            tensors.push((
                format!("{}.alpha", m.kohya_name),
                Tensor::new(m.alpha as f32, device)?.to_dtype(dtype)?,
            ));
        }
        Ok(tensors)
    }

    /// The diffusers/PEFT layout: `unet.PATH.lora_A.weight` / `lora_B.weight` (`text_encoder.`,
    /// `text_encoder_2.` for the text encoders; diffusers module paths) with the scale folded into B (PEFT
    /// assumes alpha = rank when no alpha is stored).
    pub fn peft_tensors(&self, dtype: DType) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut tensors = Vec::new();
        for m in &self.modules {
            let component = match m.prefix.as_str() {
                super::kohya::UNET_PREFIX => "unet",
                super::kohya::TEXT_ENCODER_2_PREFIX => "text_encoder_2",
                _ => "text_encoder",
            };
            let rank = m.down.dims()[0] as f64;
            let base = format!("{component}.{}", m.module_path);
            tensors.push((format!("{base}.lora_A.weight"), m.down.to_dtype(dtype)?));
            tensors.push((
                format!("{base}.lora_B.weight"),
                m.up.affine(m.alpha / rank, 0.0)?.to_dtype(dtype)?,
            ));
        }
        Ok(tensors)
    }
}

/// Converts the trained network to plain LoRA modules. DoRA is folded with a truncated SVD (see
/// [`fold_to_low_rank`]); PiSSA becomes `[down; down₀]`, `[up, −up₀]` at rank `2 · rank`, exactly.
pub fn export_network(network: &LoraNetwork) -> candle_core::Result<ExportedLora> {
    let mut modules = Vec::with_capacity(network.modules().len());
    let mut worst_fold_error = 0f64;
    for module in network.modules() {
        let adapter = &module.adapter;
        let shape = *module.slot.shape();
        let device = module.down.device();
        let (down, up, alpha) = match adapter.kind() {
            AdapterKind::Lora => (
                module.down.as_tensor().copy()?,
                module.up.as_tensor().copy()?,
                adapter.alpha(),
            ),
            AdapterKind::Pissa { down0, up0 } => {
                let down = Tensor::cat(&[module.down.as_tensor(), down0], 0)?;
                let up = Tensor::cat(&[module.up.as_tensor(), &up0.neg()?], 1)?;
                let rank = down.dims()[0] as f64;
                (down, up, adapter.scale() * rank)
            }
            AdapterKind::Dora { .. } => {
                let delta = adapter.full_strength_delta(&module.slot.weight()?, &shape)?;
                let (factors, error) =
                    fold_to_low_rank(&delta, 2 * adapter.rank(), module.name.len() as u64)?;
                worst_fold_error = worst_fold_error.max(error);
                let (up, down) = (factors.0.to_device(device)?, factors.1.to_device(device)?);
                let k = down.dims()[0];
                let (down_dims, up_dims) = super::adapter::adapter_dims(&shape, k);
                (down.reshape(down_dims)?, up.reshape(up_dims)?, k as f64)
            }
        };
        modules.push(ExportedModule {
            kohya_name: module.name.clone(),
            module_path: module.slot.name().to_string(),
            prefix: module.prefix.to_string(),
            down,
            up,
            alpha,
        });
    }
    let exactness = match network.spec().kind {
        NetworkKind::Lora => "exact: the trained LoRA modules".to_string(),
        NetworkKind::Pissa => {
            "exact: PiSSA converted to a plain LoRA delta of twice the rank ([down; down0], [up, -up0])".to_string()
        }
        NetworkKind::Dora => format!(
            "approximate: DoRA folded into a plain LoRA delta by truncated SVD (rank doubled per layer until the \
             error is within {DORA_FOLD_TOLERANCE}); largest relative Frobenius error of a layer's weight change \
             {worst_fold_error:.3e}"
        ),
    };
    Ok(ExportedLora { modules, exactness })
}

/// The value seen most often (the first of equally common ones).
pub fn most_common<T: Copy + Ord>(values: impl Iterator<Item = T>) -> Option<T> {
    let mut counts: Vec<(T, usize)> = Vec::new();
    for value in values {
        match counts.iter_mut().find(|(v, _)| *v == value) {
            Some((_, count)) => *count += 1,
            None => counts.push((value, 1)),
        }
    }
    counts
        .iter()
        .fold(None, |best: Option<(T, usize)>, &(v, c)| match best {
            Some((_, most)) if most >= c => best,
            _ => Some((v, c)),
        })
        .map(|(v, _)| v)
}

/// Largest relative (Frobenius) error a folded DoRA layer may keep before its rank is doubled.
const DORA_FOLD_TOLERANCE: f64 = 0.01;

/// The smallest `(up, down)` factorisation (rank `start`, doubled as needed) whose relative error is within
/// [`DORA_FOLD_TOLERANCE`]: DoRA's magnitude rescales whole rows of `W`, which no fixed low rank captures.
fn fold_to_low_rank(
    delta: &Tensor,
    start: usize,
    seed: u64,
) -> candle_core::Result<((Tensor, Tensor), f64)> {
    let out = delta.dims()[0];
    let flat = delta.reshape((out, ()))?;
    let matrix = to_matrix(&flat)?;
    let full_rank = matrix.nrows().min(matrix.ncols());
    let norm = matrix.norm();
    let mut rank = start.min(full_rank).max(1);
    loop {
        let (up, down) = truncated_svd(&matrix, rank, seed).balanced_factors(1.0, &Device::Cpu)?;
        let residual = (up.matmul(&down)? - flat.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)?;
        let error = if norm > 0.0 {
            (residual.sqr()?.sum_all()?.to_scalar::<f32>()? as f64).sqrt() / norm
        } else {
            0.0
        };
        if error <= DORA_FOLD_TOLERANCE || rank >= full_rank {
            return Ok(((up, down), error));
        }
        rank = (rank * 2).min(full_rank);
    }
}

/// Writes a kohya LoRA file atomically, adding kohya's `sshs_model_hash`/`sshs_legacy_hash`.
pub fn write_lora_file(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<(), LoraError> {
    let fail = |reason: String| LoraError::Write {
        path: path.to_path_buf(),
        reason,
    };
    // kohya hashes a serialisation that carries only the training (ss_*) metadata.
    let training_only: BTreeMap<String, String> = metadata
        .iter()
        .filter(|(k, _)| k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let for_hash = serialize(tensors, &training_only).map_err(fail)?;
    let mut metadata = metadata.clone();
    metadata.insert("sshs_model_hash".to_string(), data_section_hash(&for_hash));
    metadata.insert("sshs_legacy_hash".to_string(), legacy_hash(&for_hash));
    let bytes = serialize(tensors, &metadata).map_err(fail)?;
    write_atomically(path, |w| std::io::Write::write_all(w, &bytes))
        .map_err(|e| fail(e.to_string()))
}

fn serialize(
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, String> {
    let metadata = Some(
        metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    );
    safetensors::serialize(tensors.iter().map(|(name, t)| (name.as_str(), t)), metadata)
        .map_err(|e| e.to_string())
}

/// SHA-256 of a safetensors file's tensor data (everything after the header), as A1111 computes it.
pub fn data_section_hash(file: &[u8]) -> String {
    let header =
        file.get(..8)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))) as usize;
    let data = file.get(8 + header..).unwrap_or(&[]);
    crate::hashing::sha256_hex(data)
}

/// kohya's legacy hash: the first 8 hex digits of SHA-256 of bytes 0x100000..0x110000.
pub fn legacy_hash(file: &[u8]) -> String {
    let start = 0x100000.min(file.len());
    let end = 0x110000.min(file.len());
    crate::hashing::sha256_hex(&file[start..end])[..8].to_string()
}

#[cfg(test)]
mod tests {
    use super::most_common;

    #[test]
    fn the_most_common_value_wins_and_ties_keep_the_first() {
        assert_eq!(most_common([4, 8, 8, 4, 2].into_iter()), Some(4));
        assert_eq!(most_common([4, 8, 8].into_iter()), Some(8));
        assert_eq!(most_common(std::iter::empty::<usize>()), None);
    }
}
