use candle_core::{DType, Device, Tensor};
use lora_studio::kernels::{Bf16Products, frozen_linear};
use std::time::Instant;
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn main() -> candle_core::Result<()> {
    unsafe { libmimalloc_sys::mi_option_set(15, 60_000) };
    let _s = Bf16Products::enter().expect("amx");
    let cpu = &Device::Cpu;
    for (tokens, inp, out) in [
        (256usize, 1280usize, 10240usize),
        (256, 5120, 1280),
        (1024, 640, 5120),
    ] {
        let count = (1usize << 30) / (2 * inp * out) + 1;
        let ws: Vec<Tensor> = (0..count)
            .map(|_| {
                (Tensor::randn(0f32, 1.0, (out, inp), cpu).unwrap() / (inp as f64).sqrt())
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap()
            })
            .collect();
        let x = Tensor::randn(0f32, 1.0, (1, tokens, inp), cpu)?;
        for keep in [false, true] {
            let mut kept = Vec::new();
            let mut f = Vec::new();
            for round in 0..3 {
                kept.clear();
                for w in &ws {
                    let t = Instant::now();
                    let y = frozen_linear(&x, w)?;
                    let e = t.elapsed().as_secs_f64();
                    if keep {
                        kept.push(y);
                    } else {
                        drop(y);
                    }
                    if round > 0 {
                        f.push(e);
                    }
                }
            }
            f.sort_by(f64::total_cmp);
            println!(
                "{tokens}x{inp}->{out} keep={keep}: {:.2} ms (kept {:.1} GB)",
                f[f.len() / 2] * 1e3,
                kept.len() as f64 * (tokens * out * 4) as f64 / 1e9
            );
        }
    }
    Ok(())
}
