//! The hot kernels of a Stable Diffusion 1.5 training step at 512 px, forward and forward+backward, as
//! the UNet runs them (frozen weights, input gradients only): `cargo bench --bench kernels`.
//! The input requires a gradient, as an activation in the middle of the UNet does. A word after `--`
//! runs only the kernels whose name contains it; `-- --bf16` measures them in bf16 products (AMX or
//! AVX-512 BF16), as a CPU run with `mixed_precision = "bf16"` computes.

use std::time::Instant;

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use lora_studio::kernels::{
    Bf16Products, FrozenWeight, bf16_products, bf16_products_engine, frozen_conv2d, frozen_linear,
    silu,
};
use lora_studio::models::nn::{GroupNorm, LayerNorm, attention};

const RUNS: usize = 3;

/// The binary's allocator and settings (`src/main.rs`), so that kernels pay for memory what they pay in a
/// training step: reused pages, not fresh ones faulted in on every call.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
const PURGE_DELAY_OPTION: libmimalloc_sys::mi_option_t = 15;
const PURGE_DELAY_MS: std::ffi::c_long = 3_600_000;

fn median_ms(mut run: impl FnMut() -> Result<()>) -> Result<f64> {
    run()?; // warm-up
    let mut times = Vec::new();
    for _ in 0..RUNS {
        let started = Instant::now();
        run()?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[RUNS / 2])
}

/// Prints forward and forward+backward milliseconds of `f` on a fresh input variable of `dims`, unless a
/// name filter was given (`cargo bench --bench kernels -- attention`) and `name` does not contain it.
fn measure(name: &str, dims: &[usize], f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    if filter.is_some_and(|f| !name.contains(&f)) {
        return Ok(());
    }
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, dims, &Device::Cpu)?)?;
    let forward = median_ms(|| f(&x.as_tensor().detach()).map(drop))?;
    let both = median_ms(|| {
        let y = f(x.as_tensor())?;
        let grads = y.sum_all()?.backward()?;
        grads
            .get(&x)
            .map(drop)
            .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))
    })?;
    println!(
        "{name:<44} forward {forward:>8.1} ms   forward+backward {both:>8.1} ms   ({:.1}x)",
        both / forward
    );
    Ok(())
}

/// A frozen weight, stored in bf16 inside a bf16-products scope as a CPU bf16 run stores it.
fn weight(dims: &[usize]) -> Result<Tensor> {
    let fan_in: usize = dims[1..].iter().product();
    let weight = (Tensor::randn(0f32, 1.0, dims, &Device::Cpu)? / (fan_in as f64).sqrt())?;
    if bf16_products() {
        weight.to_dtype(DType::BF16)
    } else {
        Ok(weight)
    }
}

/// A frozen linear layer's weight `[outputs, inputs]`, kept in tile order inside a bf16-products scope as
/// a CPU bf16 run keeps it.
fn linear_weight(outputs: usize, inputs: usize) -> Result<FrozenWeight> {
    let weight = weight(&[outputs, inputs])?;
    Ok(FrozenWeight::tiled(&weight)?.unwrap_or(FrozenWeight::Tensor(weight)))
}

/// A norm's unit scale and zero shift.
fn norm_parameters(channels: usize) -> Result<candle_nn::VarBuilder<'static>> {
    let tensors = [
        (
            "weight".to_string(),
            Tensor::ones(channels, DType::F32, &Device::Cpu)?,
        ),
        (
            "bias".to_string(),
            Tensor::zeros(channels, DType::F32, &Device::Cpu)?,
        ),
    ];
    Ok(candle_nn::VarBuilder::from_tensors(
        tensors.into(),
        DType::F32,
        &Device::Cpu,
    ))
}

fn main() -> Result<()> {
    // SAFETY: setting an option is thread-safe; it applies to later purges.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY_OPTION, PURGE_DELAY_MS) };
    let _products = if std::env::args().any(|a| a == "--bf16") {
        let scope = Bf16Products::enter();
        match bf16_products_engine() {
            Some(engine) => println!("bf16 products ({engine})"),
            None => println!("no bf16 products on this processor: f32 products"),
        }
        scope
    } else {
        None
    };
    let conv = weight(&[320, 320, 3, 3])?;
    for size in [64, 128] {
        measure(
            &format!("conv 3x3 320->320 at {size}x{size}"),
            &[1, 320, size, size],
            |x| frozen_conv2d(x, &conv, None, 1, 1),
        )?;
    }
    for (channels, size) in [(640, 32), (1280, 16)] {
        let conv = weight(&[channels, channels, 3, 3])?;
        measure(
            &format!("conv 3x3 {channels}->{channels} at {size}x{size}"),
            &[1, channels, size, size],
            |x| frozen_conv2d(x, &conv, None, 1, 1),
        )?;
    }
    measure(
        "conv 3x3, candle's conv2d (all gradients)",
        &[1, 320, 64, 64],
        |x| x.conv2d(&conv.to_dtype(DType::F32)?, 1, 1, 1, 1),
    )?;
    // SD 1.5's projections and GEGLU at 512 px; SDXL's blocks at 512 and 1024 px: few tokens, large
    // weights. The PyTorch reference reads the same list.
    let shapes: Vec<(usize, usize, usize, String)> =
        serde_json::from_str(include_str!("../bench/linear_shapes.json"))
            .map_err(|e| candle_core::Error::Msg(format!("bench/linear_shapes.json: {e}")))?;
    for (tokens, inputs, outputs, note) in shapes {
        let linear = linear_weight(outputs, inputs)?;
        measure(
            &format!("linear {inputs}->{outputs} over {tokens} tokens{note}"),
            &[1, tokens, inputs],
            |x| frozen_linear(x, &linear),
        )?;
    }
    measure(
        "self-attention, 8 heads, 4096 tokens",
        &[1, 4096, 320],
        |x| attention(x, x, x, 8, None),
    )?;
    measure(
        "self-attention, 10 heads, 4096 tokens (SDXL 1024 px)",
        &[1, 4096, 640],
        |x| attention(x, x, x, 10, None),
    )?;
    let context = Tensor::randn(0f32, 1.0, (1, 77, 320), &Device::Cpu)?;
    measure(
        "cross-attention, 8 heads, 4096x77 tokens",
        &[1, 4096, 320],
        |x| attention(x, &context, &context, 8, None),
    )?;
    let group_norm = GroupNorm::new(norm_parameters(320)?, 32, 320, 1e-5)?;
    measure("group norm, 32 groups, 320x64x64", &[1, 320, 64, 64], |x| {
        group_norm.forward(x)
    })?;
    // The composed form the fused one replaced, for comparison.
    let composed = candle_nn::group_norm(32, 320, 1e-5, norm_parameters(320)?)?;
    measure(
        "group norm, candle-nn's composed form",
        &[1, 320, 64, 64],
        |x| composed.forward(x),
    )?;
    let layer_norm = LayerNorm::new(norm_parameters(320)?, 320, 1e-5)?;
    measure("layer norm over 4096 tokens x 320", &[1, 4096, 320], |x| {
        layer_norm.forward(x)
    })?;
    measure("silu, 320x64x64", &[1, 320, 64, 64], silu)?;
    measure("silu, candle's composed backward", &[1, 320, 64, 64], |x| {
        x.silu()
    })?;
    Ok(())
}
