//! The AMX side of the products: enabling the tile state, configuring a thread's tiles, and the 32×32
//! micro-kernel (x86-64 Linux; elsewhere AMX is never available).

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub use platform::*;
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
pub use portable::*;

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod platform {
    use std::arch::asm;
    use std::cell::Cell;

    use super::super::{BLOCK_ELEMENTS, Block, ConvolutionBlock, TILE_ELEMENTS};

    thread_local! {
        /// Whether this thread has loaded the tile configuration.
        static CONFIGURED: Cell<bool> = const { Cell::new(false) };
    }

    /// Whether the processor has AMX tiles with bf16 products (and the AVX-512 BF16 conversions the
    /// packing uses), and Linux lets this process use them.
    pub fn enable() -> bool {
        const AMX_BF16: u32 = 1 << 22;
        const AMX_TILE: u32 = 1 << 24;
        const AVX512_BF16: u32 = 1 << 5;
        let leaf = std::arch::x86_64::__cpuid_count(7, 0);
        let amx = leaf.edx & (AMX_BF16 | AMX_TILE) == AMX_BF16 | AMX_TILE;
        let conversions = std::arch::x86_64::__cpuid_count(7, 1).eax & AVX512_BF16 != 0;
        if !(amx
            && conversions
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl"))
        {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: the request changes only which register state the kernel saves for this process.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }

    /// The tile configuration: palette 1, eight tiles of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    /// Loads the tile configuration on this thread, once.
    pub fn configure_thread() {
        if CONFIGURED.get() {
            return;
        }
        let mut config = [0u8; 64];
        config[0] = 1;
        for tile in 0..8 {
            config[16 + 2 * tile] = 64;
            config[48 + tile] = 16;
        }
        let config = TileConfig(config);
        // SAFETY: `available()` held (tiles exist and are permitted) and the configuration is valid.
        unsafe { asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly)) };
        CONFIGURED.set(true);
    }

    /// Clears the accumulator tiles 0–3.
    ///
    /// # Safety
    /// The thread's tiles are configured.
    #[inline(always)]
    unsafe fn zero_accumulators() {
        // SAFETY: configured tiles (caller); no memory is touched.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            )
        };
    }

    /// `block [+]=` the product of `k_blocks` packed block pairs, in tiles 0–3 (result quarters), 4–5 (left
    /// rows 0–15, 16–31) and 6–7 (right columns 0–15, 16–31).
    ///
    /// # Safety
    /// The thread's tiles are configured, the block lies inside its allocation, and `left`/`right` hold
    /// `k_blocks` packed blocks.
    pub unsafe fn multiply((left, right): (&[u16], &[u16]), k_blocks: usize, block: Block) {
        let Block {
            first: c,
            stride,
            accumulate,
        } = block;
        debug_assert!(left.len() >= k_blocks * BLOCK_ELEMENTS);
        debug_assert!(right.len() >= k_blocks * BLOCK_ELEMENTS);
        let bytes = stride * 4;
        // SAFETY: as the caller guarantees; every access below stays inside the blocks named.
        unsafe {
            let (c1, c2) = (c.add(16), c.add(16 * stride));
            let c3 = c2.add(16);
            if accumulate {
                asm!(
                    "tileloadd tmm0, [{c0} + {s}*1]",
                    "tileloadd tmm1, [{c1} + {s}*1]",
                    "tileloadd tmm2, [{c2} + {s}*1]",
                    "tileloadd tmm3, [{c3} + {s}*1]",
                    c0 = in(reg) c, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3, s = in(reg) bytes,
                    options(nostack, readonly),
                );
            } else {
                zero_accumulators();
            }
            for kb in 0..k_blocks {
                let a = left.as_ptr().add(kb * BLOCK_ELEMENTS);
                let b = right.as_ptr().add(kb * BLOCK_ELEMENTS);
                asm!(
                    "tileloadd tmm4, [{a0} + {s}*1]",
                    "tileloadd tmm6, [{b0} + {s}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b1} + {s}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a1} + {s}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a, a1 = in(reg) a.add(TILE_ELEMENTS),
                    b0 = in(reg) b, b1 = in(reg) b.add(TILE_ELEMENTS),
                    s = in(reg) 64usize,
                    options(nostack, readonly),
                );
            }
            asm!(
                "tilestored [{c0} + {s}*1], tmm0",
                "tilestored [{c1} + {s}*1], tmm1",
                "tilestored [{c2} + {s}*1], tmm2",
                "tilestored [{c3} + {s}*1], tmm3",
                c0 = in(reg) c, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3, s = in(reg) bytes,
                options(nostack),
            );
        }
    }

    /// A convolution's result block in tiles 0–3: the left blocks in tiles 4–5 (output channels 0–15,
    /// 16–31), the pixel tiles in 6–7.
    ///
    /// # Safety
    /// The thread's tiles are configured; every tile named lies inside its allocation, and no other thread
    /// touches the result tiles.
    pub unsafe fn convolve(block: ConvolutionBlock) {
        let ConvolutionBlock {
            left,
            offsets,
            runs,
            run_stride,
            out,
            out_stride,
            start,
        } = block;
        // SAFETY: as the caller guarantees; every access below stays inside the tiles named.
        unsafe {
            match start {
                Some(start) => asm!(
                    "tileloadd tmm0, [{upper} + {s}*1]",
                    "tileloadd tmm1, [{upper} + {s}*1]",
                    "tileloadd tmm2, [{lower} + {s}*1]",
                    "tileloadd tmm3, [{lower} + {s}*1]",
                    upper = in(reg) start, lower = in(reg) start.add(256), s = in(reg) 64usize,
                    options(nostack, readonly),
                ),
                None => zero_accumulators(),
            }
            for (s, &offset) in offsets.iter().enumerate() {
                let a = left.add(s * BLOCK_ELEMENTS);
                let b0 = runs.0.add(offset);
                match runs.1 {
                    Some(second) => asm!(
                        "tileloadd tmm4, [{a0} + {s}*1]",
                        "tileloadd tmm6, [{b0} + {t}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tileloadd tmm7, [{b1} + {t}*1]",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tileloadd tmm5, [{a1} + {s}*1]",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a, a1 = in(reg) a.add(TILE_ELEMENTS),
                        b0 = in(reg) b0, b1 = in(reg) second.add(offset),
                        s = in(reg) 64usize, t = in(reg) run_stride,
                        options(nostack, readonly),
                    ),
                    None => asm!(
                        "tileloadd tmm4, [{a0} + {s}*1]",
                        "tileloadd tmm6, [{b0} + {t}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tileloadd tmm5, [{a1} + {s}*1]",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        a0 = in(reg) a, a1 = in(reg) a.add(TILE_ELEMENTS),
                        b0 = in(reg) b0, s = in(reg) 64usize, t = in(reg) run_stride,
                        options(nostack, readonly),
                    ),
                }
            }
            let lower = |first: *mut f32| first.byte_add(16 * out_stride);
            asm!(
                "tilestored [{c0} + {s}*1], tmm0",
                "tilestored [{c2} + {s}*1], tmm2",
                c0 = in(reg) out.0, c2 = in(reg) lower(out.0), s = in(reg) out_stride,
                options(nostack),
            );
            if let Some(second) = out.1 {
                asm!(
                    "tilestored [{c1} + {s}*1], tmm1",
                    "tilestored [{c3} + {s}*1], tmm3",
                    c1 = in(reg) second, c3 = in(reg) lower(second), s = in(reg) out_stride,
                    options(nostack),
                );
            }
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod portable {
    /// AMX is used on x86-64 Linux only.
    pub fn enable() -> bool {
        false
    }

    pub fn configure_thread() {}

    /// Never called: [`super::multiply`] calls it only where AMX is available.
    pub unsafe fn multiply(_: (&[u16], &[u16]), _: usize, _: super::super::Block) {
        unreachable!("AMX is not available on this platform")
    }

    /// Never called: the direct convolution runs only where AMX is available.
    pub unsafe fn convolve(_: super::super::ConvolutionBlock) {
        unreachable!("AMX is not available on this platform")
    }
}
