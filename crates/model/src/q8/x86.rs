//! The x86 kernels: AVX-512 VNNI and AVX2 tiles for Q8_0 and Q4_1 weights.
//!
//! A tile is up to eight rows of `x` (AVX-512's 32 vector registers; four with AVX2's 16) against
//! one group of 8 interleaved weight rows. Per block,
//! the group's 8 vectors (Q4_1: 4, each two of them in nibbles) are loaded once; for each `x`
//! row, eight broadcasts of four of its values go through eight integer dot products into one
//! accumulator whose lanes are the 8 outputs, converted and scaled once.

use super::{BlockFormat, Group, Task, Tile, XRows, BLOCK_VALUES, GROUP_ROWS};
use std::arch::x86_64::*;

/// Kernel entry points and tiles. Per block, `$load(p)` turns the group's block at `p` into 8
/// vectors of 32 bytes; for each `x` row, `$start(level_sum)` is the integer accumulator's
/// starting value and `$dot(acc, w, x4)` adds the products of `w` with the broadcast `x4`.
macro_rules! kernel {
    (
        $isa:ident, $entry:ident, $features:literal, $format:ident, max_rows = $max_rows:literal,
        load = |$p:ident| $load:expr,
        start = |$level_sum:ident| $start:expr,
        dot = |$acc:ident, $w:ident, $x4:ident| $dot:expr
    ) => {
        pub struct $isa;

        /// # Safety
        /// As [`Task::run`]; the CPU has the features.
        #[target_feature(enable = $features)]
        pub unsafe fn $entry(task: Task<'_>) {
            task.run::<$isa>()
        }

        impl Tile for $isa {
            const FORMAT: BlockFormat = BlockFormat::$format;
            const MAX_ROWS: usize = $max_rows;

            #[target_feature(enable = $features)]
            unsafe fn tile<const MR: usize>(
                x: XRows,
                w: Group,
                blocks: usize,
            ) -> [[f32; GROUP_ROWS]; MR] {
                const BYTES: usize = GROUP_ROWS * BlockFormat::$format.quant_bytes();
                let mut sums = [_mm256_setzero_ps(); MR];
                for b in 0..blocks {
                    // The group PREFETCH_GROUPS ahead is read while this one is, block by block.
                    for line in (0..BYTES).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(
                            w.ahead.wrapping_add(b * BYTES + line) as *const i8
                        );
                    }
                    let $p = w.quants.add(b * BYTES);
                    let wv: [__m256i; 8] = $load;
                    let scales = widen_f16(w.scales.add(b * GROUP_ROWS));
                    for (r, sum) in sums.iter_mut().enumerate() {
                        let xq = x.quants.add(r * x.k + b * BLOCK_VALUES);
                        let $level_sum = *x.level_sums.add(r * blocks + b);
                        let mut $acc: __m256i = $start;
                        for (c, &$w) in wv.iter().enumerate() {
                            let $x4 =
                                _mm256_set1_epi32((xq.add(4 * c) as *const i32).read_unaligned());
                            $acc = $dot;
                        }
                        let dx = _mm256_set1_ps(*x.scales.add(r * blocks + b));
                        *sum = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps($acc),
                            _mm256_mul_ps(scales, dx),
                            *sum,
                        );
                        if BlockFormat::$format == BlockFormat::Q4_1 {
                            let mins = widen_f16(w.mins.add(b * GROUP_ROWS));
                            let sx = _mm256_set1_ps(*x.sums.add(r * blocks + b));
                            *sum = _mm256_fmadd_ps(mins, sx, *sum);
                        }
                    }
                }
                let mut out = [[0f32; GROUP_ROWS]; MR];
                for (o, a) in out.iter_mut().zip(&sums) {
                    _mm256_storeu_ps(o.as_mut_ptr(), *a);
                }
                out
            }
        }
    };
}

/// A group's 8 scales (or minimums) of one block, from f16.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn widen_f16(p: *const half::f16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// A Q8_0 group's block: 8 vectors as stored.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q8_0_vectors(p: *const u8) -> [__m256i; 8] {
    std::array::from_fn(|c| _mm256_loadu_si256(p.add(32 * c) as *const __m256i))
}

/// A Q4_1 group's block: the low nibbles of its 4 vectors, then their high nibbles.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q4_1_vectors(p: *const u8) -> [__m256i; 8] {
    let low = _mm256_set1_epi8(0x0F);
    let packed: [__m256i; 4] =
        std::array::from_fn(|c| _mm256_loadu_si256(p.add(32 * c) as *const __m256i));
    std::array::from_fn(|c| {
        if c < 4 {
            _mm256_and_si256(packed[c], low)
        } else {
            _mm256_and_si256(_mm256_srli_epi16::<4>(packed[c - 4]), low)
        }
    })
}

// VNNI multiplies unsigned by signed bytes: Q8_0 weights go in offset by 128 (a flip of the
// top bit), and the accumulator starts at minus 128 times the sum of the block's x levels, so
// the sum comes out exact with no fix-up per product.
kernel!(
    Q8_0Vnni,
    q8_0_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    Q8_0,
    max_rows = 8,
    load = |p| q8_0_vectors(p).map(|v| _mm256_xor_si256(v, _mm256_set1_epi8(-128))),
    start = |level_sum| _mm256_set1_epi32(-128 * level_sum),
    dot = |acc, w, x4| _mm256_dpbusd_epi32(acc, w, x4)
);
kernel!(
    Q4_1Vnni,
    q4_1_vnni,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    Q4_1,
    max_rows = 8,
    load = |p| q4_1_vectors(p),
    start = |_level_sum| _mm256_setzero_si256(),
    dot = |acc, w, x4| _mm256_dpbusd_epi32(acc, w, x4)
);

// AVX2's `vpmaddubsw` saturates at 16 bits, which offset Q8_0 weights would overflow: x gives
// its magnitudes and each weight takes x's sign instead. Q4_1's nibbles (at most 15) go in
// unsigned as they are.
kernel!(
    Q8_0Avx2,
    q8_0_avx2,
    "avx2,fma,f16c",
    Q8_0,
    max_rows = 4,
    load = |p| q8_0_vectors(p),
    start = |_level_sum| _mm256_setzero_si256(),
    dot = |acc, w, x4| _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_sign_epi8(x4, x4), _mm256_sign_epi8(w, x4)),
            _mm256_set1_epi16(1)
        )
    )
);
kernel!(
    Q4_1Avx2,
    q4_1_avx2,
    "avx2,fma,f16c",
    Q4_1,
    max_rows = 4,
    load = |p| q4_1_vectors(p),
    start = |_level_sum| _mm256_setzero_si256(),
    dot = |acc, w, x4| _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, x4), _mm256_set1_epi16(1))
    )
);
