//! Merging kohya LoRA files into a base model and writing one single-file checkpoint in the original (LDM)
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
use super::checkpoint::names::{self, LDM_CLIP, LDM_OPEN_CLIP, LDM_UNET, LDM_VAE};
use super::checkpoint::{CheckpointLayout, ComponentKind, ModelFamily, ModelSource, TensorFiles};
use super::clip::ClipTextTransformer;
use super::unet::UNet2DConditionModel;
use crate::lora::{KohyaLora, LayerRegistry, TEXT_ENCODER_PREFIX, UNET_PREFIX};

/// What a merge did.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeReport {
    pub tensors: usize,
    pub merged_layers: usize,
    /// LoRA files with modules that matched no layer, and how many.
    pub unmatched: Vec<(PathBuf, usize)>,
}

/// Hands out zero-stride stand-ins: models built on it have their layer registries but hold no weights.
struct ShapeOnly;

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

/// One tensor of the output file: the source pieces it is made of (stacked along dimension 0) and its shape.
struct Planned {
    key: String,
    shape: Vec<usize>,
    parts: Vec<(Arc<TensorFiles>, String)>,
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
    let components = [
        (UNET_PREFIX, unet.layers()),
        (TEXT_ENCODER_PREFIX, text_encoder.layers()),
    ];
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
    let deltas = locate_deltas(
        source,
        &[
            (ComponentKind::Unet, unet.layers()),
            (ComponentKind::TextEncoder, text_encoder.layers()),
        ],
    )?;
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
    let mut plan = Vec::new();
    let single = |files: &Arc<TensorFiles>, key: &str| -> Planned {
        Planned {
            key: key.to_string(),
            shape: files.shape(key).map(<[usize]>::to_vec).unwrap_or_default(),
            parts: vec![(files.clone(), key.to_string())],
        }
    };
    if source.layout() != CheckpointLayout::DiffusersFolder {
        // A single file keeps its own layout; EMA copies are left out.
        let files = &source.component(ComponentKind::Unet).files;
        let mut keys: Vec<&String> = files
            .keys()
            .filter(|k| !k.starts_with("model_ema."))
            .collect();
        keys.sort();
        plan.extend(keys.into_iter().map(|k| single(files, k)));
        return Ok(plan);
    }
    let config = source.config();
    let unet = &source.component(ComponentKind::Unet).files;
    for key in unet.keys() {
        let ldm = names::unet_to_ldm(key, config.unet.layers_per_block, &config.unet.up_attention)
            .ok_or_else(|| unmapped("UNet", key))?;
        plan.push(Planned {
            key: format!("{LDM_UNET}{ldm}"),
            ..single(unet, key)
        });
    }
    let vae = &source.component(ComponentKind::Vae).files;
    for key in vae.keys() {
        let ldm = names::vae_to_ldm(key, config.vae.block_out_channels.len())
            .ok_or_else(|| unmapped("VAE", key))?;
        let mut planned = Planned {
            key: format!("{LDM_VAE}{ldm}"),
            ..single(vae, key)
        };
        // The original VAE stores its attention projections as 1x1 convolutions.
        if ldm.contains(".attn_1.") && ldm.ends_with(".weight") && planned.shape.len() == 2 {
            planned.shape.extend([1, 1]);
        }
        plan.push(planned);
    }
    let te = &source.component(ComponentKind::TextEncoder).files;
    if config.family == ModelFamily::Sd2 {
        let te_config = &config.text_encoder;
        plan.extend(open_clip_plan(
            te,
            te_config.hidden_size,
            te_config.num_hidden_layers,
        )?);
    } else {
        for key in te.keys().filter(|k| !k.ends_with("position_ids")) {
            plan.push(Planned {
                key: format!("{LDM_CLIP}{}", with_text_model(key)),
                ..single(te, key)
            });
        }
    }
    Ok(plan)
}

/// transformers >= 5.6 saves CLIP without the `text_model.` level; the original layout always has it.
fn with_text_model(key: &str) -> String {
    if key.starts_with("text_model.") {
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

/// SD2's text encoder in the OpenCLIP layout: q/k/v packed into `in_proj`, and the unused last resblock that
/// diffusers drops written back as a copy of the one before (SD2 conditions on the penultimate block).
fn open_clip_plan(
    files: &Arc<TensorFiles>,
    hidden: usize,
    layers: usize,
) -> Result<Vec<Planned>, ModelError> {
    let mut grouped: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
    for key in files.keys().filter(|k| !k.ends_with("position_ids")) {
        let stored = names::clip_to_open_clip(&with_text_model(key), hidden)
            .ok_or_else(|| unmapped("text encoder", key))?;
        let row = stored.rows.map_or(0, |(start, _)| start);
        grouped
            .entry(stored.key)
            .or_default()
            .push((row, key.clone()));
    }
    let mut plan = Vec::new();
    let last = format!("transformer.resblocks.{}.", layers.saturating_sub(1));
    let extra = format!("transformer.resblocks.{layers}.");
    for (key, mut parts) in grouped {
        parts.sort();
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
        let parts: Vec<(Arc<TensorFiles>, String)> =
            parts.into_iter().map(|(_, k)| (files.clone(), k)).collect();
        if let Some(rest) = key.strip_prefix(&last) {
            plan.push(Planned {
                key: format!("{LDM_OPEN_CLIP}{extra}{rest}"),
                shape: shape.clone(),
                parts: parts.clone(),
            });
        }
        plan.push(Planned {
            key: format!("{LDM_OPEN_CLIP}{key}"),
            shape,
            parts,
        });
    }
    Ok(plan)
}

/// The weight change of every layer with adapters, by output key, with the row it starts at.
fn locate_deltas(
    source: &ModelSource,
    registries: &[(ComponentKind, &LayerRegistry)],
) -> Result<HashMap<String, Vec<(usize, Tensor)>>, ModelError> {
    let config = source.config();
    let mut deltas: HashMap<String, Vec<(usize, Tensor)>> = HashMap::new();
    for (kind, registry) in registries {
        let component = source.component(*kind);
        for slot in registry.slots() {
            let adapters = slot.adapters();
            if adapters.is_empty() {
                continue;
            }
            let mut delta: Option<Tensor> = None;
            for adapter in adapters {
                let d = adapter
                    .weight_delta(slot.weight(), slot.shape())
                    .map_err(ModelError::compute("merging a LoRA"))?;
                delta = Some(match delta {
                    Some(sum) => (sum + d).map_err(ModelError::compute("merging a LoRA"))?,
                    None => d,
                });
            }
            let Some(delta) = delta else { continue };
            let name = format!("{}.weight", slot.name());
            let (key, row) = match source.layout() {
                layout if layout != CheckpointLayout::DiffusersFolder => {
                    let stored = component
                        .names
                        .resolve(&name, &component.files)
                        .ok_or_else(|| unmapped("model", &name))?;
                    (stored.key, stored.rows.map_or(0, |(start, _)| start))
                }
                _ => match kind {
                    ComponentKind::Unet => {
                        let ldm = names::unet_to_ldm(
                            &name,
                            config.unet.layers_per_block,
                            &config.unet.up_attention,
                        )
                        .ok_or_else(|| unmapped("UNet", &name))?;
                        (format!("{LDM_UNET}{ldm}"), 0)
                    }
                    _ if config.family == ModelFamily::Sd2 => {
                        let stored =
                            names::clip_to_open_clip(&name, config.text_encoder.hidden_size)
                                .ok_or_else(|| unmapped("text encoder", &name))?;
                        (
                            format!("{LDM_OPEN_CLIP}{}", stored.key),
                            stored.rows.map_or(0, |(start, _)| start),
                        )
                    }
                    _ => (format!("{LDM_CLIP}{name}"), 0),
                },
            };
            deltas.entry(key).or_default().push((row, delta));
        }
    }
    Ok(deltas)
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
fn write_streaming(
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
    let mut tensor = Tensor::cat(&pieces, 0)
        .and_then(|t| t.reshape(p.shape.clone()))
        .map_err(compute)?;
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
