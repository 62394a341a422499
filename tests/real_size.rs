//! The models at the real SD1.5 and SD2.1 sizes, checked against key/shape listings the reference
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
    TextEncoderLayout, infer_text_encoder, infer_unet, infer_vae, text_encoder_layout,
};
use lora_studio::models::checkpoint::names::{self, LDM_CLIP, LDM_OPEN_CLIP, LDM_UNET, LDM_VAE};
use lora_studio::models::clip::{ClipTextConfig, ClipTextTransformer};
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

fn check_family(
    name: &str,
    unet_config: UNetConfig,
    te_config: ClipTextConfig,
    te_layout: TextEncoderLayout,
) {
    let manifest = manifest(name);
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
    for (param, shape) in &unet_shapes {
        let key = names::unet_to_ldm(
            param,
            unet_config.layers_per_block,
            &unet_config.up_attention,
        )
        .unwrap();
        let stored = &manifest.ldm[&format!("{LDM_UNET}{key}")];
        assert!(
            same_up_to_unit_dims(stored, shape),
            "{param} -> {key}: {stored:?} vs {shape:?}"
        );
    }
    for (param, shape) in &vae_shapes {
        let key = names::vae_to_ldm(param, 4).unwrap();
        let stored = &manifest.ldm[&format!("{LDM_VAE}{key}")];
        assert!(
            same_up_to_unit_dims(stored, shape),
            "{param} -> {key}: {stored:?} vs {shape:?}"
        );
    }
    for (param, shape) in &te_shapes {
        match te_layout {
            TextEncoderLayout::Clip => assert_eq!(
                &manifest.ldm[&format!("{LDM_CLIP}{param}")],
                shape,
                "{param}"
            ),
            TextEncoderLayout::OpenClip => {
                let stored = names::clip_to_open_clip(param, te_config.hidden_size).unwrap();
                let mut stored_shape =
                    manifest.ldm[&format!("{LDM_OPEN_CLIP}{}", stored.key)].clone();
                if let Some((_, rows)) = stored.rows {
                    stored_shape[0] = rows;
                }
                assert_eq!(&stored_shape, shape, "{param} -> {}", stored.key);
            }
        }
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
    check_kohya_targets(
        &manifest,
        &[("lora_unet", unet.layers()), ("lora_te", te.layers())],
    );
}

fn check_kohya_targets(manifest: &Manifest, components: &[(&str, &LayerRegistry)]) {
    let ours: BTreeMap<String, LayerShape> = components
        .iter()
        .flat_map(|(prefix, registry)| {
            registry
                .slots()
                .into_iter()
                .map(move |s| (kohya_name(prefix, s.name()), *s.shape()))
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
