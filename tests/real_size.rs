//! The models at the real SD1.5, SD2.1 and SDXL 1.0 sizes, checked against key/shape listings the reference
//! implementation produced (`tests/fixtures/manifests/`): every tensor the models ask for, its single-file
//! key, the architecture inferred from a single file's shapes, and the kohya LoRA target names.
//! Weights are zero-stride stand-ins, so no memory is used.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use lora_studio::lora::{LayerRegistry, LayerShape, kohya_name};
use lora_studio::models::checkpoint::infer::{
    TextEncoderLayout, infer_sdxl_text_encoders, infer_text_encoder, infer_unet, infer_vae,
    text_encoder_layout,
};
use lora_studio::models::checkpoint::{
    ComponentKind, ModelConfig, ModelFamily, NameMap, PredictionOrigin, single_file_names,
};
use lora_studio::models::clip::{ClipTextConfig, ClipTextTransformer, TextEncoder2Config};
use lora_studio::models::pipeline::adapter_components;
use lora_studio::models::schedulers::SchedulerConfig;
use lora_studio::models::unet::{UNet2DConditionModel, UNetConfig};
use lora_studio::models::vae::{AutoencoderKL, VaeConfig};
use serde::Deserialize;

type Shapes = BTreeMap<String, Vec<usize>>;

#[derive(Deserialize)]
struct Manifest {
    diffusers: BTreeMap<String, Shapes>,
    ldm: Shapes,
    kohya_targets: BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<usize>>>>,
}

fn manifest(name: &str) -> Manifest {
    let text = std::fs::read_to_string(common::fixture(&format!("manifests/{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A backend that records what is asked for and hands out zero-stride tensors.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Shapes>>,
}

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.seen
            .lock()
            .unwrap()
            .insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unexpected unchecked load of {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn record<T>(build: impl FnOnce(VarBuilder) -> candle_core::Result<T>) -> (T, Shapes) {
    let recorder = Recorder::default();
    let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
    let model = build(vb).unwrap();
    let seen = recorder.seen.lock().unwrap().clone();
    (model, seen)
}

/// Every requested tensor exists in the reference listing with the same shape, and nothing but buffers is left.
fn assert_same_tensors(what: &str, ours: &Shapes, reference: &Shapes) {
    for (name, shape) in ours {
        let expected = reference
            .get(name)
            .unwrap_or_else(|| panic!("{what}: `{name}` is not in the reference model"));
        assert_eq!(shape, expected, "{what}: shape of `{name}`");
    }
    let missing: Vec<&String> = reference
        .keys()
        .filter(|k| !ours.contains_key(*k) && !k.ends_with("position_ids"))
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: the reference has tensors the model never loads: {missing:?}"
    );
}

/// Shapes agree up to unit dimensions (single files store linear VAE attention as 1x1 convs).
fn same_up_to_unit_dims(a: &[usize], b: &[usize]) -> bool {
    let squeeze = |d: &[usize]| d.iter().copied().filter(|&x| x != 1).collect::<Vec<_>>();
    squeeze(a) == squeeze(b)
}

fn unet_param_count(shapes: &Shapes) -> usize {
    shapes.values().map(|s| s.iter().product::<usize>()).sum()
}

/// A model config of `family` with these architectures.
fn model_config(
    family: ModelFamily,
    unet: UNetConfig,
    text_encoder: ClipTextConfig,
    text_encoder_2: Option<TextEncoder2Config>,
) -> ModelConfig {
    ModelConfig {
        family,
        unet,
        vae: VaeConfig::sd(),
        text_encoder,
        text_encoder_2,
        scheduler: SchedulerConfig::default(),
        pad_token: 0,
        pad_token_2: 0,
        prediction_origin: PredictionOrigin::Default,
    }
}

/// Every tensor a component asks for has the shape of its single-file key (up to unit dimensions, the rows
/// of a packed tensor, a stored transpose); returns the keys used.
fn check_single_file_keys(
    what: &str,
    shapes: &Shapes,
    names: &NameMap,
    ldm: &Shapes,
) -> Vec<String> {
    let mut used = Vec::new();
    for (param, shape) in shapes {
        let stored = names
            .primary(param)
            .unwrap_or_else(|| panic!("{what}: `{param}` has no single-file key"));
        let mut stored_shape = ldm
            .get(&stored.key)
            .unwrap_or_else(|| panic!("{what}: {param} -> `{}` is not in the file", stored.key))
            .clone();
        if let Some((_, rows)) = stored.rows {
            stored_shape[0] = rows;
        }
        if stored.transposed {
            stored_shape.reverse();
        }
        assert!(
            same_up_to_unit_dims(&stored_shape, shape),
            "{what}: {param} -> {}: {stored_shape:?} vs {shape:?}",
            stored.key
        );
        used.push(stored.key);
    }
    used
}

fn check_family(
    name: &str,
    unet_config: UNetConfig,
    te_config: ClipTextConfig,
    te_layout: TextEncoderLayout,
) {
    let manifest = manifest(name);
    let family = match te_layout {
        TextEncoderLayout::Clip => ModelFamily::Sd1,
        TextEncoderLayout::OpenClip => ModelFamily::Sd2,
    };
    let config = model_config(family, unet_config.clone(), te_config.clone(), None);
    let (unet, unet_shapes) = record(|vb| UNet2DConditionModel::new(vb, &unet_config));
    assert_same_tensors(
        &format!("{name} UNet"),
        &unet_shapes,
        &manifest.diffusers["unet"],
    );
    let (_, vae_shapes) = record(|vb| AutoencoderKL::new(vb, &VaeConfig::sd()));
    assert_same_tensors(
        &format!("{name} VAE"),
        &vae_shapes,
        &manifest.diffusers["vae"],
    );
    let (te, te_shapes) = record(|vb| ClipTextTransformer::new(vb, &te_config));
    assert_same_tensors(
        &format!("{name} text encoder"),
        &te_shapes,
        &manifest.diffusers["text_encoder"],
    );

    // Every tensor maps to the single-file key holding it.
    for (kind, shapes) in [
        (ComponentKind::Unet, &unet_shapes),
        (ComponentKind::Vae, &vae_shapes),
        (ComponentKind::TextEncoder, &te_shapes),
    ] {
        let names = single_file_names(&config, kind);
        check_single_file_keys(
            &format!("{name} {}", kind.label()),
            shapes,
            &names,
            &manifest.ldm,
        );
    }

    // The architecture comes back from the single file's shapes alone.
    let mut inferred = infer_unet(&manifest.ldm).unwrap();
    inferred.sample_size = unet_config.sample_size;
    assert_eq!(inferred, unet_config, "{name}: inferred UNet");
    assert_eq!(
        infer_vae(&manifest.ldm).unwrap(),
        VaeConfig::sd(),
        "{name}: inferred VAE"
    );
    assert_eq!(text_encoder_layout(&manifest.ldm), Some(te_layout));
    assert_eq!(
        infer_text_encoder(&manifest.ldm, te_layout).unwrap(),
        te_config,
        "{name}: inferred text encoder"
    );

    // kohya's default and LoCon targets are all adapter-capable layers of ours, with matching shapes.
    check_kohya_targets(&manifest, &adapter_components(&unet, &te, None));
}

fn check_kohya_targets(manifest: &Manifest, components: &[(&str, &LayerRegistry)]) {
    let ours: BTreeMap<String, LayerShape> = components
        .iter()
        .flat_map(|(prefix, registry)| {
            registry
                .slots()
                .into_iter()
                .map(move |s| (kohya_name(prefix, s.kohya_path()), *s.shape()))
        })
        .collect();
    for targets in manifest.kohya_targets.values() {
        for (name, shapes) in targets {
            let shape = ours
                .get(name)
                .unwrap_or_else(|| panic!("kohya target {name} is not an adapter-capable layer"));
            let weight = shape.weight_dims();
            let (down, up) = (&shapes["down"], &shapes["up"]);
            assert_eq!(down[1], weight[1], "{name}: input width");
            assert_eq!(up[0], weight[0], "{name}: output width");
            assert_eq!(
                down.len() == 4 && down[2] > 1,
                weight.len() == 4 && weight[2] > 1,
                "{name}: kernel"
            );
        }
    }
}

#[test]
fn sd15_real_size_layout() {
    check_family(
        "sd15",
        UNetConfig::sd15(),
        ClipTextConfig::sd1(),
        TextEncoderLayout::Clip,
    );
    let (_, shapes) = record(|vb| UNet2DConditionModel::new(vb, &UNetConfig::sd15()));
    assert_eq!(
        unet_param_count(&shapes),
        859_520_964,
        "SD1.5 UNet parameters"
    );
}

#[test]
fn sd21_real_size_layout() {
    check_family(
        "sd21",
        UNetConfig::sd21(),
        ClipTextConfig::sd2(),
        TextEncoderLayout::OpenClip,
    );
}

#[test]
fn sdxl_real_size_layout() {
    let manifest = manifest("sdxl");
    let config = model_config(
        ModelFamily::Sdxl,
        UNetConfig::sdxl(),
        ClipTextConfig::sd1(),
        Some(TextEncoder2Config::sdxl()),
    );
    let (unet, unet_shapes) = record(|vb| UNet2DConditionModel::new(vb, &config.unet));
    assert_eq!(
        unet_param_count(&unet_shapes),
        2_567_463_684,
        "SDXL UNet parameters"
    );
    let (_, vae_shapes) = record(|vb| AutoencoderKL::new(vb, &config.vae));
    let (te, te_shapes) = record(|vb| ClipTextTransformer::new(vb, &config.text_encoder));
    let te2_config = TextEncoder2Config::sdxl();
    let (te2, te2_shapes) = record(|vb| ClipTextTransformer::with_projection(vb, &te2_config));
    let mut used = Vec::new();
    for (kind, shapes, listed) in [
        (ComponentKind::Unet, &unet_shapes, "unet"),
        (ComponentKind::Vae, &vae_shapes, "vae"),
        (ComponentKind::TextEncoder, &te_shapes, "text_encoder"),
        (ComponentKind::TextEncoder2, &te2_shapes, "text_encoder_2"),
    ] {
        let what = format!("sdxl {}", kind.label());
        assert_same_tensors(&what, shapes, &manifest.diffusers[listed]);
        used.extend(check_single_file_keys(
            &what,
            shapes,
            &single_file_names(&config, kind),
            &manifest.ldm,
        ));
    }
    // Every tensor of the single file is one the model reads, but the position ids and OpenCLIP's
    // logit_scale (and the packed in_proj is read once per q, k and v).
    let unread: Vec<&String> = manifest
        .ldm
        .keys()
        .filter(|k| {
            !used.contains(k) && !k.ends_with("position_ids") && !k.ends_with("logit_scale")
        })
        .collect();
    assert!(
        unread.is_empty(),
        "single-file tensors never read: {unread:?}"
    );

    // The architecture comes back from the single file's shapes alone.
    assert_eq!(
        infer_unet(&manifest.ldm).unwrap(),
        config.unet,
        "inferred UNet"
    );
    assert_eq!(
        infer_sdxl_text_encoders(&manifest.ldm).unwrap(),
        (ClipTextConfig::sd1(), te2_config),
        "inferred text encoders"
    );
    let vae = infer_vae(&manifest.ldm).unwrap();
    assert_eq!(vae.block_out_channels, config.vae.block_out_channels);

    // kohya's names: the original UNet paths and lora_te1/lora_te2, exactly the layers we target.
    let components = adapter_components(&unet, &te, Some(&te2));
    check_kohya_targets(&manifest, &components);
    let kohya_names = |prefix: &str, slots: Vec<std::sync::Arc<lora_studio::lora::AdapterSlot>>| {
        slots
            .iter()
            .map(|s| kohya_name(prefix, s.kohya_path()))
            .collect::<std::collections::BTreeSet<_>>()
    };
    let listed = |category: &str, prefix: &str| {
        manifest.kohya_targets[category]
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
    };
    let default_unet = kohya_names("lora_unet", unet.lora_targets(false));
    assert_eq!(default_unet.len(), 722);
    assert_eq!(default_unet, listed("default", "lora_unet_"));
    let with_conv = kohya_names("lora_unet", unet.lora_targets(true));
    assert_eq!(with_conv.len(), 722 + 66);
    assert_eq!(
        with_conv
            .difference(&default_unet)
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        listed("conv", "lora_unet_")
    );
    for (prefix, encoder, count) in [("lora_te1", &te, 72), ("lora_te2", &te2, 192)] {
        let ours = kohya_names(prefix, encoder.lora_targets());
        assert_eq!(ours.len(), count, "{prefix}");
        assert_eq!(ours, listed("default", &format!("{prefix}_")), "{prefix}");
    }
}
