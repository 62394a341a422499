//! Exponential and error function for f32 without library calls, so loops over them vectorise: the CPU
//! kernels of attention, GEGLU and SiLU use them, compiled for AVX2 where the CPU has it ([`vectorised`],
//! which the norm and convolution kernels use too). `exp` is within 2 ulp of `f32::exp` for `x <= 0`;
//! `erf` within 4e-7 absolute of the true value (3 ulp of 1). Depends on nothing else in the crate.

/// `e^x` for `x <= 0` (scores minus their row maximum) without a library call, so loops over it
/// vectorise: `e^x = 2^n · e^r` with `r` in `[-ln2/2, ln2/2]` and Cephes' degree-7 polynomial for `e^r`.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    // Round-to-nearest by the 1.5·2^23 trick (vectorises without SSE4.1).
    const ROUNDER: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let shifted = x * LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    let r = x - n * LN2_HIGH - n * LN2_LOW;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // 2^n from the exponent bits; n is in [-126, 0] here.
    let n_bits = shifted.to_bits().wrapping_sub(ROUNDER.to_bits()) as i32;
    e_r * f32::from_bits(((n_bits + 127) as u32) << 23)
}

/// `erf(x)`: its Maclaurin series to `x¹³` below `|x| = 0.5` (where the tail formula cancels), above it
/// `1 − t·(a1 + t·(a2 + …))·e^(−x²)` with `t = 1/(1 + p·|x|)` (Abramowitz & Stegun 7.1.26). Both are
/// computed and one selected, so loops over it stay branch-free.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    const TWO_OVER_SQRT_PI: f32 = std::f32::consts::FRAC_2_SQRT_PI;
    let magnitude = x.abs();
    let t = 1.0 / (1.0 + P * magnitude);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let tail = (1.0 - poly * exp_f32(-magnitude * magnitude)).copysign(x);
    let x2 = x * x;
    let series = 1.0 / 9360.0;
    let series = series * x2 - 1.0 / 1320.0;
    let series = series * x2 + 1.0 / 216.0;
    let series = series * x2 - 1.0 / 42.0;
    let series = series * x2 + 1.0 / 10.0;
    let series = series * x2 - 1.0 / 3.0;
    let series = (series * x2 + 1.0) * x * TWO_OVER_SQRT_PI;
    if magnitude < 0.5 { series } else { tail }
}

/// The vector instructions the CPU was found to have. Only [`Simd::detect`] makes one, so a [`Simd`] that
/// says AVX2 (or AVX-512) is proof that feature detection saw them: [`vectorised`] relies on it for
/// soundness.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Simd {
    avx2_fma: bool,
    avx512: bool,
}

impl Simd {
    /// Asks the CPU (a cached check after the first call).
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        let (avx2_fma, avx512) = {
            let avx2_fma = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let avx512 = avx2_fma
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl");
            (avx2_fma, avx512)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let (avx2_fma, avx512) = (false, false);
        Self { avx2_fma, avx512 }
    }
}

/// Runs `kernel` compiled for AVX-512 or else AVX2 and FMA when the CPU has them, so that the loops it
/// inlines vectorise sixteen or eight lanes wide; elsewhere as plain code. Each lane computes what the
/// plain code computes, so results do not depend on the width.
#[inline(always)]
pub(crate) fn vectorised<R>(simd: Simd, kernel: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if simd.avx512 {
            // SAFETY: a `Simd` with `avx512` set comes only from `Simd::detect` on a CPU that has it.
            return unsafe { with_avx512(kernel) };
        }
        if simd.avx2_fma {
            // SAFETY: a `Simd` with `avx2_fma` set comes only from `Simd::detect` on a CPU that has both.
            return unsafe { with_avx2(kernel) };
        }
    }
    let _ = simd;
    kernel()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn with_avx2<R>(kernel: impl FnOnce() -> R) -> R {
    kernel()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
unsafe fn with_avx512<R>(kernel: impl FnOnce() -> R) -> R {
    kernel()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exponential_is_within_two_ulp_of_the_library_one() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (ours, reference) = (exp_f32(x), x.exp());
            worst = worst.max((ours - reference).abs() / reference);
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn erf_is_within_its_bound_of_the_f64_one() {
        let mut worst = 0f64;
        for i in -100_000..=100_000 {
            let x = i as f64 * 6.0 / 100_000.0;
            let reference = candle_core::cpu::erf::erf_f64(x);
            worst = worst.max((erf_f32(x as f32) as f64 - reference).abs());
        }
        assert!(worst < 4e-7, "absolute error {worst}");
        assert_eq!(erf_f32(0.0), 0.0);
    }
}
