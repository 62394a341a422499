//! Merging kohya LoRA files into a base model and writing one single-file checkpoint in the original (LDM/sgm)
//! layout that every UI loads. The models are built as shape-only skeletons (no weights in memory) just to
//! match LoRA modules to layers; the output is then streamed one tensor at a time, each read from the source
//! file and changed by the LoRA deltas that target it.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use super::ModelError;
use super::checkpoint::names::StoredName;
use super::checkpoint::{
    CheckpointLayout, ComponentKind, ModelFamily, ModelSource, TensorFiles, single_file_names,
};
use super::clip::ClipTextTransformer;
use super::pipeline::adapter_components;
use super::unet::UNet2DConditionModel;
use crate::lora::{AdapterSlot, KohyaLora, LayerRegistry};

/// What a merge did.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeReport {
    pub tensors: usize,
    pub merged_layers: usize,
    /// LoRA files with modules that matched no layer, and how many.
    pub unmatched: Vec<(PathBuf, usize)>,
}

/// Hands out zero-stride stand-ins: models built on it have their layer registries but hold no weights.
pub(crate) struct ShapeOnly;

impl SimpleBackend for ShapeOnly {
    fn get(
        &self,
        s: Shape,
        _: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unexpected load of {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// One tensor of the output file: the source pieces it is made of (stacked along dimension 0), whether that
/// stack is stored transposed, and its shape.
pub(super) struct Planned {
    pub(super) key: String,
    pub(super) shape: Vec<usize>,
    pub(super) parts: Vec<(Arc<TensorFiles>, String)>,
    pub(super) transposed: bool,
}

/// Merges `loras` (file, strength) into `source` and writes the result to `out` in `dtype`.
pub fn merge_to_single_file(
    source: &ModelSource,
    loras: &[(PathBuf, f64)],
    out: &Path,
    dtype: DType,
) -> Result<MergeReport, ModelError> {
    let config = source.config();
    let skeleton = |what: &str| ModelError::Config(format!("building the {what} layout failed"));
    let vb = || VarBuilder::from_backend(Box::new(ShapeOnly), DType::F32, Device::Cpu);
    let unet = UNet2DConditionModel::new(vb(), &config.unet).map_err(|_| skeleton("UNet"))?;
    let text_encoder = ClipTextTransformer::new(vb(), &config.text_encoder)
        .map_err(|_| skeleton("text encoder"))?;
    let text_encoder_2 = config
        .text_encoder_2
        .as_ref()
        .map(|te| ClipTextTransformer::with_projection(vb(), te))
        .transpose()
        .map_err(|_| skeleton("text encoder 2"))?;
    let components = adapter_components(&unet, &text_encoder, text_encoder_2.as_ref());
    let mut unmatched = Vec::new();
    for (path, strength) in loras {
        let lora =
            KohyaLora::load(path, &Device::Cpu).map_err(|e| ModelError::Config(e.to_string()))?;
        let report = lora
            .attach(&components, *strength, DType::F32)
            .map_err(|e| ModelError::Config(e.to_string()))?;
        if !report.unmatched.is_empty() {
            unmatched.push((path.clone(), report.unmatched.len()));
        }
    }

    let plan = plan_outputs(source)?;
    let mut registries = vec![
        (ComponentKind::Unet, unet.layers()),
        (ComponentKind::TextEncoder, text_encoder.layers()),
    ];
    if let Some(second) = &text_encoder_2 {
        registries.push((ComponentKind::TextEncoder2, second.layers()));
    }
    let deltas = locate_deltas(source, &registries)?;
    let mut metadata = BTreeMap::new();
    metadata.insert(
        "lora_studio.version".to_string(),
        crate::build_info::LONG_VERSION.to_string(),
    );
    let merged: Vec<serde_json::Value> = loras
        .iter()
        .map(|(p, s)| serde_json::json!({ "file": p.file_name().map(|n| n.to_string_lossy().into_owned()), "strength": s }))
        .collect();
    metadata.insert(
        "lora_studio.merged_loras".to_string(),
        serde_json::Value::Array(merged).to_string(),
    );
    write_streaming(out, &plan, &deltas, dtype, &metadata)?;
    Ok(MergeReport {
        tensors: plan.len(),
        merged_layers: deltas.values().map(Vec::len).sum(),
        unmatched,
    })
}

/// Every tensor of the output, in the original layout.
fn plan_outputs(source: &ModelSource) -> Result<Vec<Planned>, ModelError> {
    let single = |files: &Arc<TensorFiles>, key: &str| -> Planned {
        Planned {
            key: key.to_string(),
            shape: files.shape(key).map(<[usize]>::to_vec).unwrap_or_default(),
            parts: vec![(files.clone(), key.to_string())],
            transposed: false,
        }
    };
    if source.layout() != CheckpointLayout::DiffusersFolder {
        // A single file keeps its own layout; EMA copies are left out.
        let Some(unet) = source.component(ComponentKind::Unet) else {
            return Ok(Vec::new());
        };
        let mut keys: Vec<&String> = unet
            .files
            .keys()
            .filter(|k| !k.starts_with("model_ema."))
            .collect();
        keys.sort();
        return Ok(keys.into_iter().map(|k| single(&unet.files, k)).collect());
    }
    let config = source.config();
    let mut plan = Vec::new();
    for kind in ComponentKind::ALL {
        let Some(component) = source.component(kind) else {
            continue;
        };
        let names = single_file_names(config, kind);
        // Stored tensors made of several diffusers ones (OpenCLIP's packed q/k/v), by key.
        let mut grouped: BTreeMap<String, (Vec<(usize, String)>, bool)> = BTreeMap::new();
        for key in component
            .files
            .keys()
            .filter(|k| !k.ends_with("position_ids"))
        {
            let name = match kind {
                ComponentKind::TextEncoder | ComponentKind::TextEncoder2 => with_text_model(key),
                _ => key.clone(),
            };
            let stored = names
                .primary(&name)
                .ok_or_else(|| unmapped(kind.label(), key))?;
            let row = stored.rows.map_or(0, |(start, _)| start);
            let entry = grouped.entry(stored.key).or_default();
            entry.0.push((row, key.clone()));
            entry.1 = stored.transposed;
        }
        for (key, (mut parts, transposed)) in grouped {
            parts.sort();
            let files = &component.files;
            let rows: usize = parts
                .iter()
                .map(|(_, k)| files.shape(k).map_or(0, |s| s[0]))
                .sum();
            let mut shape = files
                .shape(&parts[0].1)
                .map(<[usize]>::to_vec)
                .unwrap_or_default();
            if let Some(first) = shape.first_mut() {
                *first = rows;
            }
            if transposed {
                shape.reverse();
            }
            // The original VAE stores its attention projections as 1x1 convolutions.
            if kind == ComponentKind::Vae
                && key.contains(".attn_1.")
                && key.ends_with(".weight")
                && shape.len() == 2
            {
                shape.extend([1, 1]);
            }
            let parts: Vec<(Arc<TensorFiles>, String)> =
                parts.into_iter().map(|(_, k)| (files.clone(), k)).collect();
            plan.push(Planned {
                key,
                shape,
                parts,
                transposed,
            });
        }
    }
    if config.family == ModelFamily::Sd2 {
        plan.extend(sd2_unused_last_layer(
            &plan,
            config.text_encoder.num_hidden_layers,
        ));
    }
    Ok(plan)
}

/// transformers >= 5.6 saves CLIP without the `text_model.` level; the original layout always has it (the
/// projection of SDXL's second encoder sits beside it).
fn with_text_model(key: &str) -> String {
    if key.starts_with("text_model.") || key.starts_with("text_projection.") {
        key.to_string()
    } else {
        format!("text_model.{key}")
    }
}

fn unmapped(component: &str, key: &str) -> ModelError {
    ModelError::Config(format!(
        "the {component} tensor `{key}` has no place in the original layout"
    ))
}

/// SD2's OpenCLIP text tower has one more resblock than diffusers keeps (SD2 conditions on the penultimate
/// one): it is written back as a copy of the last one kept, so the file has the original layout.
fn sd2_unused_last_layer(plan: &[Planned], layers: usize) -> Vec<Planned> {
    let prefix = |layer: usize| {
        format!(
            "{}transformer.resblocks.{layer}.",
            super::checkpoint::names::LDM_OPEN_CLIP
        )
    };
    let (last, extra) = (prefix(layers.saturating_sub(1)), prefix(layers));
    plan.iter()
        .filter_map(|p| {
            let rest = p.key.strip_prefix(&last)?;
            Some(Planned {
                key: format!("{extra}{rest}"),
                shape: p.shape.clone(),
                parts: p.parts.clone(),
                transposed: p.transposed,
            })
        })
        .collect()
}

/// The weight change of every layer with adapters, by output key, with the row it starts at.
fn locate_deltas(
    source: &ModelSource,
    registries: &[(ComponentKind, &LayerRegistry)],
) -> Result<HashMap<String, Vec<(usize, Tensor)>>, ModelError> {
    let mut deltas: HashMap<String, Vec<(usize, Tensor)>> = HashMap::new();
    for (kind, registry) in registries {
        let Some(component) = source.component(*kind) else {
            continue;
        };
        for slot in registry.slots() {
            if slot.adapters().is_empty() {
                continue;
            }
            let weight = slot.weight().map_err(ModelError::compute(format!(
                "reading the weight of `{}`",
                slot.name()
            )))?;
            let Some(delta) = adapters_delta(&slot, &weight)? else {
                continue;
            };
            let name = format!("{}.weight", slot.name());
            let stored: Option<StoredName> = if source.layout() == CheckpointLayout::DiffusersFolder
            {
                single_file_names(source.config(), *kind).primary(&name)
            } else {
                component.names.resolve(&name, &component.files)
            };
            let stored = stored
                .filter(|s| !s.transposed)
                .ok_or_else(|| unmapped(kind.label(), &name))?;
            deltas
                .entry(stored.key)
                .or_default()
                .push((stored.rows.map_or(0, |(start, _)| start), delta));
        }
    }
    Ok(deltas)
}

/// The weight change of all of a layer's adapters at their strengths, against its real `weight` (DoRA's
/// change depends on it); `None` for a layer without adapters.
pub(super) fn adapters_delta(
    slot: &AdapterSlot,
    weight: &Tensor,
) -> Result<Option<Tensor>, ModelError> {
    let mut delta: Option<Tensor> = None;
    for adapter in slot.adapters() {
        let change = adapter
            .weight_delta(weight, slot.shape())
            .map_err(ModelError::compute(format!(
                "merging an adapter into `{}`",
                slot.name()
            )))?;
        delta = Some(match delta {
            Some(sum) => (sum + change).map_err(ModelError::compute(format!(
                "merging an adapter into `{}`",
                slot.name()
            )))?,
            None => change,
        });
    }
    Ok(delta)
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F64 => "F64",
        DType::I64 => "I64",
        DType::I32 => "I32",
        DType::U8 => "U8",
        DType::U32 => "U32",
        _ => "F32",
    }
}

/// Writes the planned tensors as a safetensors file (to a temporary name, then renamed), one at a time.
pub(super) fn write_streaming(
    out: &Path,
    plan: &[Planned],
    deltas: &HashMap<String, Vec<(usize, Tensor)>>,
    dtype: DType,
    metadata: &BTreeMap<String, String>,
) -> Result<(), ModelError> {
    let io = |source| ModelError::Io {
        path: out.to_path_buf(),
        source,
    };
    // Floating-point tensors take the output dtype; others (position ids) keep theirs.
    let out_dtype = |p: &Planned| -> DType {
        let (files, key) = &p.parts[0];
        match files
            .file_of(key)
            .and_then(|f| f.info(key))
            .map(|i| i.dtype)
        {
            Some(crate::tensor_file::StoredDType::Supported(d)) if d.is_float() => dtype,
            Some(crate::tensor_file::StoredDType::Supported(d)) => d,
            _ => dtype,
        }
    };
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".to_string(), serde_json::json!(metadata));
    let mut offset = 0usize;
    for p in plan {
        let d = out_dtype(p);
        let size = p.shape.iter().product::<usize>() * d.size_in_bytes();
        header.insert(
            p.key.clone(),
            serde_json::json!({ "dtype": dtype_name(d), "shape": p.shape, "data_offsets": [offset, offset + size] }),
        );
        offset += size;
    }
    let mut header_bytes = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| ModelError::Config(e.to_string()))?;
    while header_bytes.len() % 8 != 0 {
        header_bytes.push(b' ');
    }
    crate::atomic_file::write_atomically(out, |w| {
        w.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
        w.write_all(&header_bytes)?;
        for p in plan {
            let tensor =
                assemble(p, deltas.get(&p.key), out_dtype(p)).map_err(std::io::Error::other)?;
            let bytes = safetensors::View::data(&tensor);
            w.write_all(&bytes)?;
        }
        Ok(())
    })
    .map_err(io)
}

/// Reads a planned tensor's parts, stacks them, adds the deltas, and converts it.
fn assemble(
    p: &Planned,
    deltas: Option<&Vec<(usize, Tensor)>>,
    dtype: DType,
) -> Result<Tensor, String> {
    let compute = |e: candle_core::Error| crate::tensor_file::plain_error(&e);
    let mut pieces = Vec::with_capacity(p.parts.len());
    for (files, key) in &p.parts {
        let file = files
            .file_of(key)
            .ok_or_else(|| format!("`{key}` disappeared from the source"))?;
        pieces.push(file.load(key, &Device::Cpu).map_err(|e| e.to_string())?);
    }
    let mut stacked = Tensor::cat(&pieces, 0).map_err(compute)?;
    if p.transposed {
        stacked = stacked.t().and_then(|t| t.contiguous()).map_err(compute)?;
    }
    let mut tensor = stacked.reshape(p.shape.clone()).map_err(compute)?;
    if let Some(deltas) = deltas {
        let rows = p.shape[0];
        let mut flat = tensor
            .to_dtype(DType::F32)
            .and_then(|t| t.reshape((rows, ())))
            .map_err(compute)?;
        let columns = flat.dim(1).map_err(compute)?;
        for (start, delta) in deltas {
            let count = delta.dims()[0];
            let updated = flat
                .narrow(0, *start, count)
                .and_then(|target| target + delta.reshape((count, ()))?)
                .map_err(compute)?;
            flat = flat
                .slice_assign(&[*start..start + count, 0..columns], &updated)
                .map_err(compute)?;
        }
        tensor = flat.reshape(p.shape.clone()).map_err(compute)?;
    }
    tensor.to_dtype(dtype).map_err(compute)
}
