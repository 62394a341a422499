//! Mixed precision on the CPU, where candle runs fp16 too: one fp16 training step of the tiny SD1 model
//! against the f32 step (the loss within fp16's rounding, the updated adapters equal), fp16 dynamic loss
//! scaling recovering from an overflow without ending the run, and `mixed_precision = "bf16"`, which on the
//! CPU keeps f32 tensors and makes the matrix products bf16 ones where the processor has AMX or AVX-512
//! BF16. (candle 0.11
//! has no bf16 matrix product on the CPU, "unsupported dtype BF16 for op matmul", so steps in bf16 tensors
//! run on GPUs only.)

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{make_dataset, tiny_config};
use lora_studio::config::{MixedPrecision, TrainConfig};
use lora_studio::train::{
    CancelToken, StepReport, TrainOutcome, TrainReporter, TrainStop, load_checkpoint, train_on,
};

/// The reported steps, and the run's messages.
#[derive(Default)]
struct Steps(Vec<StepReport>, Vec<String>);

impl TrainReporter for Steps {
    fn step(&mut self, report: &StepReport) {
        self.0.push(*report);
    }

    fn message(&mut self, text: &str) {
        self.1.push(text.to_string());
    }
}

fn train_in(
    dtype: DType,
    config: &TrainConfig,
    resume: Option<&Path>,
) -> (TrainOutcome, Vec<StepReport>) {
    let (outcome, steps, _) = train_reporting(dtype, config, resume);
    (outcome, steps)
}

/// [`train_in`] with the run's messages too.
fn train_reporting(
    dtype: DType,
    config: &TrainConfig,
    resume: Option<&Path>,
) -> (TrainOutcome, Vec<StepReport>, Vec<String>) {
    let mut steps = Steps::default();
    let outcome = train_on(
        &mut common::loaded_base("sd1", dtype),
        config,
        resume,
        &mut steps,
        &CancelToken::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (outcome, steps.0, steps.1)
}

/// The adapters of a run's last checkpoint, by name.
fn adapters(outcome: &TrainOutcome) -> Vec<(String, Tensor)> {
    let checkpoint = load_checkpoint(outcome.checkpoint.as_ref().unwrap(), &Device::Cpu).unwrap();
    let mut named: Vec<(String, Tensor)> = checkpoint.adapters.into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

#[test]
fn one_step_in_fp16_matches_the_f32_step() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 2);
    // With an epsilon far above every gradient, AdamW's first update is lr·g/(|g| + eps) ≈ lr·g/eps: the
    // adapters move by the gradient itself, so comparing them compares the gradients of the two precisions
    // (with the usual 1e-8 every element would move by ±lr whatever its size).
    let config = |name: &str| TrainConfig {
        max_train_steps: Some(1),
        train_text_encoder: true,
        adam_epsilon: 10.0,
        learning_rate: 1.0,
        weight_decay: 0.0,
        ..tiny_config(&data, &dir.path().join(name))
    };
    let (f32_run, f32_steps) = train_in(DType::F32, &config("f32"), None);
    let (run, steps) = train_in(DType::F16, &config("f16"), None);
    assert_eq!(run.stop, TrainStop::Finished);
    assert!(!steps[0].skipped, "the fp16 step was skipped");
    // The loss: the UNet output rounded to fp16's 11-bit mantissa, through ~20 layers.
    let relative = (steps[0].loss - f32_steps[0].loss).abs() / f32_steps[0].loss;
    eprintln!(
        "fp16 loss {:.6} vs f32 {:.6} (relative {relative:.2e})",
        steps[0].loss, f32_steps[0].loss
    );
    assert!(
        relative < 4e-3,
        "fp16 loss {} vs f32 {}",
        steps[0].loss,
        f32_steps[0].loss
    );
    let initial = adapters_at_start(&config("start"));
    let (relative, worst) = update_difference(&run, &f32_run, &initial);
    eprintln!(
        "fp16 update vs f32: relative difference {relative:.2e} (worst tensor {:.2e}, {})",
        worst.0, worst.1
    );
    assert!(
        relative < 1e-2,
        "the fp16 update differs by {relative:.2e} of the f32 one"
    );
    assert!(worst.0 < 5e-2, "{} differs by {:.2e}", worst.1, worst.0);
}

/// How far the adapter update of `run` is from that of `reference` (both from `initial`): relative to the
/// reference update over all tensors, and the worst single tensor with its name.
fn update_difference(
    run: &TrainOutcome,
    reference: &TrainOutcome,
    initial: &[(String, Tensor)],
) -> (f64, (f64, String)) {
    let (mut error, mut norm, mut worst) = (0f64, 0f64, (0f64, String::new()));
    for (((name, ours), (_, theirs)), (_, start)) in
        adapters(run).iter().zip(&adapters(reference)).zip(initial)
    {
        let ours = (ours - start).unwrap();
        let theirs = (theirs - start).unwrap();
        let squared = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let (e, n) = (squared(&(&ours - &theirs).unwrap()), squared(&theirs));
        error += e;
        norm += n;
        if n > 0.0 && (e / n).sqrt() > worst.0 {
            worst = ((e / n).sqrt(), name.clone());
        }
    }
    assert!(norm > 0.0, "the reference step moved nothing");
    ((error / norm).sqrt(), worst)
}

#[test]
fn bf16_on_the_cpu_rounds_only_the_frozen_weights_and_products_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 2);
    // As in the fp16 test: the first update is the gradient itself.
    let config = |name: &str, mixed_precision| TrainConfig {
        max_train_steps: Some(1),
        train_text_encoder: true,
        adam_epsilon: 10.0,
        learning_rate: 1.0,
        weight_decay: 0.0,
        mixed_precision,
        ..tiny_config(&data, &dir.path().join(name))
    };
    let (f32_run, f32_steps) = train_in(DType::F32, &config("f32", MixedPrecision::No), None);
    let (run, steps, messages) =
        train_reporting(DType::F32, &config("bf16", MixedPrecision::Bf16), None);
    assert_eq!(run.stop, TrainStop::Finished);
    let in_bf16 = messages.iter().any(|m| {
        m.contains("take bf16 operands") && m.contains("frozen weights are stored in bf16")
    });
    let without = messages.iter().any(|m| m.contains("lacks"));
    assert!(
        in_bf16 != without,
        "one message names the arithmetic: {messages:?}"
    );
    let loss = (steps[0].loss - f32_steps[0].loss).abs() / f32_steps[0].loss;
    let initial = adapters_at_start(&config("start", MixedPrecision::No));
    let (update, worst) = update_difference(&run, &f32_run, &initial);
    eprintln!(
        "bf16 products ({in_bf16}): loss {:.6} vs f32 {:.6} (relative {loss:.2e}), update relative \
         difference {update:.2e} (worst tensor {:.2e}, {})",
        steps[0].loss, f32_steps[0].loss, worst.0, worst.1
    );
    if in_bf16 {
        // Operands rounded to bf16's 8-bit mantissa, sums in f32.
        assert!(loss > 0.0, "the products were not rounded");
        assert!(
            loss < 1e-2,
            "bf16 loss {} vs f32 {}",
            steps[0].loss,
            f32_steps[0].loss
        );
        assert!(
            update < 3e-2,
            "the bf16 update differs by {update:.2e} of the f32 one"
        );
    } else {
        assert_eq!(loss, 0.0, "without bf16 products the run is the f32 run");
        assert_eq!(update, 0.0, "without bf16 products the run is the f32 run");
    }
}

/// The adapters a run of `config` starts from (its step-0 initialisation).
fn adapters_at_start(config: &TrainConfig) -> Vec<(String, Tensor)> {
    let config = TrainConfig {
        learning_rate: 0.0,
        ..config.clone()
    };
    let (run, _) = train_in(DType::F32, &config, None);
    adapters(&run)
}

#[test]
fn fp16_loss_scaling_recovers_from_an_overflow_without_stopping_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = make_dataset(&dir.path().join("data"), 2);
    let output = dir.path().join("out");
    let first = TrainConfig {
        max_train_steps: Some(1),
        ..tiny_config(&data, &output)
    };
    let (run, _) = train_in(DType::F16, &first, None);
    let checkpoint = run.checkpoint.unwrap();
    // Inject the overflow: a loss scale so large that the scaled gradients exceed fp16's range (65504) at
    // once. Each overflowing step halves it; from 2^32 the scale must come down about ten times before a
    // step goes through (here 2^21 does): more than the five non-finite steps in a row that end a run.
    let state_path = checkpoint.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    let injected = 2f64.powi(32);
    state["loss_scale"] = injected.into();
    std::fs::write(&state_path, state.to_string()).unwrap();

    let resumed = TrainConfig {
        max_train_steps: Some(16),
        ..first
    };
    let (run, steps) = train_in(DType::F16, &resumed, Some(&checkpoint));
    assert_eq!(
        run.stop,
        TrainStop::Finished,
        "overflows ended the run: {steps:?}"
    );
    let skipped: Vec<bool> = steps.iter().map(|s| s.skipped).collect();
    eprintln!("skipped: {skipped:?}");
    let overflows = skipped.iter().take_while(|s| **s).count();
    assert!(
        overflows >= 6,
        "the injected scale overflowed only {overflows} steps"
    );
    assert!(
        skipped[overflows..].iter().all(|s| !s),
        "steps were skipped after the scale came down: {skipped:?}"
    );
    let last = load_checkpoint(run.checkpoint.as_ref().unwrap(), &Device::Cpu).unwrap();
    assert_eq!(last.state.step, 16);
    assert_eq!(
        last.state.loss_scale,
        injected / 2f64.powi(overflows as i32)
    );
    assert_eq!(last.state.nonfinite_streak, 0);
    let before = load_checkpoint(&checkpoint, &Device::Cpu).unwrap();
    let name = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight";
    let moved = (&last.adapters[name] - &before.adapters[name])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(moved > 0.0, "the steps after the overflows changed nothing");
}
