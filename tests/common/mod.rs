//! Helpers shared by the integration tests and benchmarks: fixture paths, reference tensors, comparisons,
//! generated datasets, and files dropped on the app's window.
#![allow(dead_code)]

pub mod causal_lm;
pub mod fake_hub;
pub mod fake_installs;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lora_studio::tensor_file::TensorFile;

/// A path under `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The reference outputs of one tiny model (`sd1`, `sd2`, `sdxl`, or a language model's
/// `reference.safetensors`).
pub struct Reference {
    file: TensorFile,
}

impl Reference {
    pub fn open(kind: &str) -> Self {
        Self::at(&fixture(&format!("{kind}_reference.safetensors")))
    }

    /// The reference file at `path`.
    pub fn at(path: &std::path::Path) -> Self {
        Self {
            file: TensorFile::open(path).unwrap_or_else(|e| panic!("{e}")),
        }
    }

    pub fn tensor(&self, name: &str) -> Tensor {
        self.file
            .load(name, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn f32(&self, name: &str) -> Tensor {
        self.tensor(name).to_dtype(DType::F32).unwrap()
    }

    pub fn names_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.file
            .infos()
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }

    pub fn metadata(&self, key: &str) -> String {
        self.file
            .metadata()
            .get(key)
            .cloned()
            .unwrap_or_else(|| panic!("no metadata {key}"))
    }
}

/// Replays a reference run's per-step noise (`euler_a.step_noise`, one slice per step).
pub struct ReplayNoise {
    steps: Vec<Tensor>,
}

impl ReplayNoise {
    /// The noise `sampler` draws in the reference runs: none for DDIM, `euler_a.step_noise` for Euler a.
    pub fn for_sampler(
        reference: &Reference,
        sampler: lora_studio::models::schedulers::SamplerKind,
    ) -> Self {
        use lora_studio::models::schedulers::SamplerKind;
        let steps = match sampler {
            SamplerKind::Ddim | SamplerKind::Euler | SamplerKind::DpmSolverMultistep { .. } => {
                Vec::new()
            }
            SamplerKind::EulerAncestral => {
                let all = reference.f32("euler_a.step_noise");
                (0..all.dim(0).unwrap())
                    .map(|i| all.get(i).unwrap())
                    .collect()
            }
        };
        Self { steps }
    }
}

impl lora_studio::models::schedulers::NoiseSource for ReplayNoise {
    fn next(&mut self, dims: &[usize], _device: &Device) -> candle_core::Result<Tensor> {
        let next = self.steps.remove(0);
        assert_eq!(next.dims(), dims);
        Ok(next)
    }
}

/// The VAE's encoder (mean, log-variance) and decoder against the reference (`vae.*`).
pub fn check_vae(
    model: &lora_studio::models::pipeline::StableDiffusion,
    reference: &Reference,
    tolerance: f64,
) {
    let posterior = model.vae.encode(&reference.f32("vae.image")).unwrap();
    assert_close(
        "VAE encode mean",
        &posterior.mean,
        &reference.f32("vae.latent_mean"),
        tolerance,
    );
    assert_close(
        "VAE encode logvar",
        &posterior.logvar,
        &reference.f32("vae.latent_logvar"),
        tolerance,
    );
    let decoded = model.vae.decode(&reference.f32("vae.latents")).unwrap();
    assert_close(
        "VAE decode",
        &decoded,
        &reference.f32("vae.decoded"),
        tolerance,
    );
}

/// A generation of the reference pipeline (`key.init_noise` → `key.latents`, `key.image`).
pub fn check_generation(
    model: &lora_studio::models::pipeline::StableDiffusion,
    reference: &Reference,
    sampler: lora_studio::models::schedulers::SamplerKind,
    init: &str,
    key: &str,
) {
    let size = |name: &str| reference.metadata(name).parse::<usize>().unwrap();
    let request = lora_studio::models::pipeline::GenerateRequest {
        prompt: reference.metadata("pipeline.prompt"),
        negative_prompt: reference.metadata("pipeline.negative_prompt"),
        width: size("pipeline.width"),
        height: size("pipeline.height"),
        steps: size("pipeline.steps"),
        guidance_scale: reference
            .metadata("pipeline.guidance_scale")
            .parse()
            .unwrap(),
        sampler,
        clip_skip: 1,
    };
    let mut noise = ReplayNoise::for_sampler(reference, sampler);
    let generated = model
        .generate(
            &request,
            &reference.f32(&format!("{init}.init_noise")),
            &mut noise,
            &mut |_, _| true,
        )
        .unwrap();
    assert_close(
        &format!("{key} latents"),
        &generated.latents,
        &reference.f32(&format!("{key}.latents")),
        1e-3,
    );
    // Pixels: under 2/255 everywhere.
    assert_close(
        &format!("{key} image"),
        &generated.image,
        &reference.f32(&format!("{key}.image")),
        2.0 / 255.0,
    );
}

/// The reference's DDIM and Euler a generations (`ddim.*`, `euler_a.*`).
pub fn check_ddim_and_euler_a(
    model: &lora_studio::models::pipeline::StableDiffusion,
    reference: &Reference,
) {
    use lora_studio::models::schedulers::SamplerKind;
    for (sampler, key) in [
        (SamplerKind::Ddim, "ddim"),
        (SamplerKind::EulerAncestral, "euler_a"),
    ] {
        check_generation(model, reference, sampler, key, key);
    }
}

/// Timesteps, sigmas and initial noise scale of each of `samplers` (with the reference's key for its run) for
/// the scheduler config of the fixture model `model`, against diffusers' for the same config in `reference`
/// (`KEY.timesteps`, `KEY.sigmas`, `KEY.init_noise_sigma`, for `pipeline.steps` steps): timesteps exactly, noise
/// levels to two f32 roundings (torch's vectorised `linspace` rounds a few betas differently from its scalar
/// formula, which lora-studio follows).
pub fn check_schedules(
    model: &str,
    reference: &Reference,
    samplers: &[(lora_studio::models::schedulers::SamplerKind, &str)],
) {
    use lora_studio::models::checkpoint::ModelSource;
    use lora_studio::models::schedulers::{DpmSolverMultistepSampler, EulerSampler, SamplerKind};
    const RELATIVE_TOLERANCE: f64 = 2.5e-7;
    let source = ModelSource::open(&fixture(model)).unwrap_or_else(|e| panic!("{e}"));
    let config = &source.config().scheduler;
    let steps: usize = reference.metadata("pipeline.steps").parse().unwrap();
    let list = |key: &str| -> Vec<f64> { serde_json::from_str(&reference.metadata(key)).unwrap() };
    let relative = |ours: f64, expected: f64| (ours - expected).abs() / expected.abs().max(1.0);
    for &(sampler, key) in samplers {
        let built = sampler.build(config, steps);
        assert_eq!(
            built.timesteps(),
            list(&format!("{key}.timesteps")),
            "{model} {key} timesteps"
        );
        let init: f64 = reference
            .metadata(&format!("{key}.init_noise_sigma"))
            .parse()
            .unwrap();
        let init_diff = relative(built.init_noise_sigma(), init);
        let ours = match sampler {
            SamplerKind::Euler => EulerSampler::new(config, steps).sigmas().to_vec(),
            SamplerKind::DpmSolverMultistep { karras } => {
                DpmSolverMultistepSampler::new(config, steps, karras)
                    .sigmas()
                    .to_vec()
            }
            SamplerKind::Ddim | SamplerKind::EulerAncestral => {
                panic!("{sampler:?} has no scheduler reference")
            }
        };
        let expected = list(&format!("{key}.sigmas"));
        assert_eq!(ours.len(), expected.len(), "{model} {key} sigmas");
        let worst = ours
            .iter()
            .zip(&expected)
            .map(|(&a, &b)| relative(a as f64, b))
            .fold(0.0, f64::max);
        eprintln!(
            "{model} {key}: sigmas differ by up to {worst:.2e}, init_noise_sigma by {init_diff:.2e} (relative)"
        );
        assert!(
            worst <= RELATIVE_TOLERANCE,
            "{model} {key}: sigmas {ours:?} vs {expected:?}"
        );
        assert!(
            init_diff <= RELATIVE_TOLERANCE,
            "{model} {key}: init_noise_sigma {} vs {init}",
            built.init_noise_sigma()
        );
    }
}

/// Copies the tensors of `source` into `dest`, dropping keys for which `keep` is false and adding `extra`.
pub fn rewrite(
    source: &std::path::Path,
    dest: &std::path::Path,
    keep: impl Fn(&str) -> bool,
    extra: &[(&str, Tensor)],
) {
    let file = TensorFile::open(source).unwrap();
    let mut tensors: std::collections::HashMap<String, Tensor> = file
        .infos()
        .keys()
        .filter(|k| keep(k))
        .map(|k| (k.clone(), file.load(k, &Device::Cpu).unwrap()))
        .collect();
    for (name, tensor) in extra {
        tensors.insert(name.to_string(), tensor.clone());
    }
    candle_core::safetensors::save(&tensors, dest).unwrap();
}

/// The tiny SDXL single file with the `v_pred` and `ztsnr` marker keys (empty f32 tensors, as AUTOMATIC1111's
/// and ComfyUI's v-prediction SDXL files have them), and its sidecar, written into `dir`.
pub fn sdxl_v_prediction_file(dir: &std::path::Path) -> PathBuf {
    let marker = Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap();
    let path = dir.join("sdxl_vpred.safetensors");
    rewrite(
        &fixture("sdxl_single.safetensors"),
        &path,
        |_| true,
        &[("v_pred", marker.clone()), ("ztsnr", marker)],
    );
    std::fs::copy(fixture("sdxl_single.json"), path.with_extension("json")).unwrap();
    path
}

/// Largest absolute elementwise difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64).unwrap();
    max_abs(&(a - b.to_dtype(DType::F64).unwrap()).unwrap())
}

/// Largest absolute value.
pub fn max_abs(a: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().abs().unwrap();
    a.flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// How far above a comparison's tolerance a reference must reach to be worth comparing with: a reference
/// near zero would let any result that is also near zero pass.
pub const NON_TRIVIAL_FACTOR: f64 = 100.0;

/// Asserts `expected` is non-trivial at `tolerance`: its largest value is [`NON_TRIVIAL_FACTOR`] times the
/// tolerance or more.
pub fn assert_non_trivial(what: &str, expected: &Tensor, tolerance: f64) {
    let scale = max_abs(expected);
    assert!(
        scale >= NON_TRIVIAL_FACTOR * tolerance,
        "{what}: the reference (max abs {scale:.3e}) is too close to zero to test anything at tolerance \
         {tolerance:.1e}"
    );
}

/// Asserts `actual` matches `expected` to within `tolerance` (max abs), printing both scales on failure,
/// and that `expected` is non-trivial at that tolerance.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tolerance: f64) {
    assert_non_trivial(what, expected, tolerance);
    let diff = max_abs_diff(actual, expected);
    eprintln!(
        "{what}: max abs diff {diff:.3e} (reference max abs {:.3e})",
        max_abs(expected)
    );
    assert!(
        diff <= tolerance,
        "{what}: max abs diff {diff:.3e} exceeds {tolerance:.1e} (reference max abs {:.3e})",
        max_abs(expected)
    );
}

/// A deterministic pseudo-random direction (values in [-1, 1)) with the shape of `t`, for finite-difference
/// checks.
pub fn direction(t: &Tensor, seed: u64) -> Tensor {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let values: Vec<f64> = (0..t.elem_count())
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(values, t.dims(), t.device()).unwrap()
}

/// Finite-difference checks of gradients in float64: each compares the analytic directional derivative along a
/// pseudo-random direction with a central difference of the loss, relative to the derivative's own size.
#[derive(Debug)]
pub struct FiniteDifferences {
    /// Smallest |derivative| worth checking: the float64 noise of the difference quotient must stay far
    /// below it (a derivative that is zero by construction would compare noise with noise).
    pub non_trivial: f64,
    /// The step along the direction.
    pub eps: f64,
    pub checked: usize,
    /// Adapters the loss does not reach (no gradient, and the loss does not move).
    pub unreached: usize,
    pub worst: f64,
    pub smallest: f64,
}

impl FiniteDifferences {
    pub fn new(eps: f64, non_trivial: f64) -> Self {
        Self {
            non_trivial,
            eps,
            checked: 0,
            unreached: 0,
            worst: 0.0,
            smallest: f64::INFINITY,
        }
    }

    /// Checks `grad`, the gradient of `loss` at `var`, along `direction(var, seed)`; `loss` is evaluated
    /// with `var` moved either way, which is restored after.
    pub fn check(
        &mut self,
        what: &str,
        var: &candle_core::Var,
        grad: &Tensor,
        seed: u64,
        loss: impl Fn() -> f64,
    ) {
        let d = direction(var.as_tensor(), seed);
        let predicted = (grad * &d)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let numeric = self.central_difference(var, &d, loss);
        assert!(
            numeric.abs() > self.non_trivial,
            "{what}: the directional derivative {numeric:.3e} is too small to check"
        );
        let error = (predicted - numeric).abs() / predicted.abs().max(numeric.abs());
        assert!(
            error < 1e-5,
            "{what}: analytic {predicted:.6e} vs finite difference {numeric:.6e} (rel {error:.1e})"
        );
        self.smallest = self.smallest.min(numeric.abs());
        self.worst = self.worst.max(error);
        self.checked += 1;
    }

    /// Checks that `loss` does not depend on `var`, which got no gradient (an adapter on a layer the loss
    /// never runs, such as the last layer of SDXL's first text encoder).
    pub fn check_unreached(
        &mut self,
        what: &str,
        var: &candle_core::Var,
        seed: u64,
        loss: impl Fn() -> f64,
    ) {
        let d = direction(var.as_tensor(), seed);
        let numeric = self.central_difference(var, &d, loss);
        assert_eq!(
            numeric, 0.0,
            "{what}: no gradient, but the loss depends on it"
        );
        self.unreached += 1;
    }

    /// The derivative of `loss` at `var` along `d` by a central difference; `var` is restored after.
    fn central_difference(
        &self,
        var: &candle_core::Var,
        d: &Tensor,
        loss: impl Fn() -> f64,
    ) -> f64 {
        let original = var.as_tensor().copy().unwrap();
        let value_at = |step: f64| {
            var.set(&(&original + (d * step).unwrap()).unwrap())
                .unwrap();
            loss()
        };
        let numeric = (value_at(self.eps) - value_at(-self.eps)) / (2.0 * self.eps);
        var.set(&original).unwrap();
        numeric
    }
}

/// Runs the tests named (exactly) in this test binary again, in a child process with the device-generic
/// kernels forced on the CPU (`LORA_STUDIO_GENERIC_KERNELS=1`: the candle-op paths CUDA and Metal take), and
/// asserts they pass there too. Inside that child it does nothing.
pub fn rerun_with_generic_kernels(tests: &[&str]) {
    use lora_studio::kernels::GENERIC_KERNELS_ENV;
    if std::env::var_os(GENERIC_KERNELS_ENV).is_some() {
        return;
    }
    let binary = std::env::current_exe().unwrap();
    let status = std::process::Command::new(binary)
        .args(tests)
        .args(["--exact", "--nocapture"])
        .env(GENERIC_KERNELS_ENV, "1")
        .status()
        .unwrap();
    assert!(
        status.success(),
        "with the device-generic kernels, some of {tests:?} failed (their output is above)"
    );
}

/// Asserts the kernels follow the switch [`rerun_with_generic_kernels`] sets.
pub fn assert_kernels_follow_the_switch() {
    use lora_studio::kernels::{GENERIC_KERNELS_ENV, cpu_kernels};
    let forced = std::env::var_os(GENERIC_KERNELS_ENV).is_some_and(|v| v != "0");
    assert_eq!(cpu_kernels(&Device::Cpu), !forced);
}

/// Writes `count` small PNG images with a `metadata.csv` of captions into `dir` and returns it.
pub fn make_dataset(dir: &std::path::Path, count: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut csv = String::from("file_name,text\n");
    for i in 0..count {
        let (w, h) = [(64, 64), (96, 64), (64, 96)][i % 3];
        let image = image::RgbImage::from_fn(w, h, |x, y| {
            let on = (x / 16 + y / 16 + i as u32).is_multiple_of(2);
            if on {
                image::Rgb([255, 0, 255])
            } else {
                image::Rgb([20, 20, 60 + 20 * (i as u8 % 5)])
            }
        });
        image.save(dir.join(format!("img{i}.png"))).unwrap();
        csv.push_str(&format!("img{i}.png,\"neon city {i}, magenta squares\"\n"));
    }
    std::fs::write(dir.join("metadata.csv"), csv).unwrap();
    dir.to_path_buf()
}

/// Every tensor of a safetensors file, and its metadata.
pub fn read_tensors(
    path: &std::path::Path,
) -> (
    std::collections::HashMap<String, Tensor>,
    std::collections::HashMap<String, String>,
) {
    let file = TensorFile::open(path).unwrap_or_else(|e| panic!("{e}"));
    let tensors = file
        .infos()
        .keys()
        .map(|k| (k.clone(), file.load(k, &Device::Cpu).unwrap()))
        .collect();
    let metadata = file
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    (tensors, metadata)
}

/// The tiny model `kind` (`sd1`, `sdxl`) loaded in `dtype` on the CPU, as a run's base.
pub fn loaded_base(kind: &str, dtype: DType) -> lora_studio::train::LoadedBase {
    use lora_studio::models::checkpoint::ModelSource;
    use lora_studio::models::pipeline::StableDiffusion;
    let path = fixture(kind);
    let source = ModelSource::open(&path).unwrap();
    lora_studio::train::LoadedBase {
        model: StableDiffusion::load(&source, &Device::Cpu, dtype).unwrap(),
        family: source.config().family,
        path,
        device: Device::Cpu,
        dtype,
    }
}

/// Asserts that two checkpoints of `steps` steps hold the same run: step, RNG, adapters and optimizer state
/// (to 1e-6).
pub fn assert_same_run(a: &std::path::Path, b: &std::path::Path, steps: u64) {
    use lora_studio::train::load_checkpoint;
    let a = load_checkpoint(a, &Device::Cpu).unwrap();
    let b = load_checkpoint(b, &Device::Cpu).unwrap();
    assert_eq!((a.state.step, b.state.step), (steps, steps));
    assert_eq!(
        a.state.rng, b.state.rng,
        "the RNG continues where it stopped"
    );
    assert_eq!(a.adapters.len(), b.adapters.len());
    for (name, tensor) in &a.adapters {
        let diff = max_abs_diff(tensor, &b.adapters[name]);
        assert!(diff < 1e-6, "{name} differs by {diff} after resuming");
    }
    assert_eq!(a.optimizer.len(), b.optimizer.len());
    for (name, tensor) in &a.optimizer {
        let diff = max_abs_diff(tensor, &b.optimizer[name]);
        assert!(diff < 1e-6, "optimizer state {name} differs by {diff}");
    }
}

/// A training config on the tiny SD1 model over `data`, writing to `output`.
pub fn tiny_config(
    data: &std::path::Path,
    output: &std::path::Path,
) -> lora_studio::config::TrainConfig {
    lora_studio::config::TrainConfig {
        train_data_dir: data.to_path_buf(),
        base_model: fixture("sd1"),
        output_dir: output.to_path_buf(),
        output_name: "tiny".to_string(),
        resolution: Some(64),
        lora_rank: 4,
        lora_alpha: 4.0,
        batch_size: 2,
        max_train_steps: Some(10),
        learning_rate: 1e-3,
        log_with: lora_studio::config::LogWith::None,
        device: "cpu".to_string(),
        ..Default::default()
    }
}

/// A file or folder dropped on the app's window.
#[cfg(feature = "gui")]
#[derive(Debug)]
pub struct DroppedPath(pub PathBuf);

#[cfg(feature = "gui")]
impl egui::DroppedFile for DroppedPath {
    fn path(&self) -> &std::path::Path {
        &self.0
    }

    fn bytes(&self) -> Result<Vec<u8>, String> {
        Err(format!("{} is read from its path", self.0.display()))
    }
}

/// The next event of a worker that `pick` accepts, failing on an error event or after a minute.
pub fn wait_for<T>(
    events: &crossbeam_channel::Receiver<lora_studio::messages::Event>,
    what: &str,
    mut pick: impl FnMut(&lora_studio::messages::Event) -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Ok(event) = events.recv_timeout(std::time::Duration::from_millis(100)) {
            if let lora_studio::messages::Event::Error { message, .. } = &event {
                panic!("worker error while waiting for {what}: {message}");
            }
            if let Some(found) = pick(&event) {
                return found;
            }
        }
    }
    panic!("no {what} within a minute");
}

/// Where workers look for models in a test: nowhere but `hub_cache` (if given), with downloads refused,
/// so a test never depends on what the machine has installed or on the network.
pub fn offline_places(hub_cache: Option<PathBuf>) -> lora_studio::worker::ModelPlaces {
    lora_studio::worker::ModelPlaces {
        discovery: lora_studio::discovery::DiscoveryOptions {
            home: None,
            hub_cache,
            extra_roots: Vec::new(),
            cache_file: None,
            time_limit: std::time::Duration::from_secs(1),
        },
        hub: lora_studio::hub::HubSettings {
            endpoint: "http://127.0.0.1:9".to_string(),
            cache_dir: std::env::temp_dir().join("lora-studio-tests-no-hub"),
            offline: true,
        },
    }
}
