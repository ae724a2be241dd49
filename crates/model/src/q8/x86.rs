//! The x86 kernels: AVX-512 VNNI and AVX2 tiles for Q8_0 and Q4_1 weights.

use super::{BlockFormat, Task, Tile, WeightRows, XRows, BLOCK_VALUES};
use crate::matmul::avx2::sum8;
use std::arch::x86_64::*;

/// One kernel's tile and entry point. Per block, `$load(p)` reads the weights' block at
/// `p` into 32 bytes, `$prepare(x)` turns a block of x into what `$dot(prepared, w)` takes
/// with them; `$dot` gives eight lanes of sums of four products each.
macro_rules! kernel {
    (
        $isa:ident, $entry:ident, $features:literal, $format:ident, $nr:literal,
        load = |$p:ident| $load:expr,
        prepare = |$x:ident| $prepare:expr,
        dot = |$px:ident, $pw:ident| $dot:expr
    ) => {
        pub struct $isa;

        /// # Safety
        /// As [`Task::run`]; the CPU has the features.
        #[target_feature(enable = $features)]
        pub unsafe fn $entry(task: Task<'_>) {
            task.run::<$isa, $nr>()
        }

        impl Tile<$nr> for $isa {
            const FORMAT: BlockFormat = BlockFormat::$format;

            #[target_feature(enable = $features)]
            unsafe fn tile<const MR: usize>(
                x: XRows,
                w: WeightRows<$nr>,
                blocks: usize,
            ) -> [[f32; $nr]; MR] {
                const BYTES: usize = BlockFormat::$format.quant_bytes();
                let mut acc = [[_mm256_setzero_ps(); $nr]; MR];
                for b in 0..blocks {
                    // The group PREFETCH_GROUPS ahead is read while this one is: the cache
                    // lines that start within its part for this block.
                    let part = b * $nr * BYTES;
                    let mut line = part.next_multiple_of(64);
                    while line < part + $nr * BYTES {
                        _mm_prefetch::<_MM_HINT_T0>(w.ahead.wrapping_add(line) as *const i8);
                        line += 64;
                    }
                    let wv: [__m256i; $nr] = std::array::from_fn(|s| {
                        let $p = w.quants[s].add(b * BYTES);
                        $load
                    });
                    let dw: [__m256; $nr] =
                        std::array::from_fn(|s| _mm256_set1_ps(*w.scales[s].add(b)));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let $x = _mm256_loadu_si256(
                            x.quants.add(r * x.k + b * BLOCK_VALUES) as *const __m256i
                        );
                        let $px = $prepare;
                        let dx = _mm256_set1_ps(*x.scales.add(r * blocks + b));
                        for s in 0..$nr {
                            let $pw = wv[s];
                            let dot: __m256i = $dot;
                            let scale = _mm256_mul_ps(dw[s], dx);
                            acc[s] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[s]);
                        }
                    }
                }
                let mut out = [[0f32; $nr]; MR];
                for (o, a) in out.iter_mut().zip(&acc) {
                    for (o, &v) in o.iter_mut().zip(a) {
                        *o = sum8(v);
                    }
                }
                out
            }
        }
    };
}

// VNNI multiplies unsigned by signed bytes: Q8_0 weights go in offset by 128 (a flip of
// the top bit), and each lane's accumulator starts at minus 128 times its four x values,
// so the sum comes out exact with no sign fix-up per pair (32 registers: 4 x 4 tiles fit).
macro_rules! q8_0_vnni {
    ($isa:ident, $entry:ident, $nr:literal) => {
        kernel!(
            $isa,
            $entry,
            "avx2,fma,avx512f,avx512vl,avx512vnni",
            Q8_0,
            $nr,
            load = |p| _mm256_xor_si256(
                _mm256_loadu_si256(p as *const __m256i),
                _mm256_set1_epi8(-128)
            ),
            prepare = |xv| (
                xv,
                _mm256_sub_epi32(
                    _mm256_setzero_si256(),
                    _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(-128), xv)
                )
            ),
            dot = |px, wu| _mm256_dpbusd_epi32(px.1, wu, px.0)
        );
    };
}
q8_0_vnni!(Q8_0Vnni, q8_0_vnni, 4);
// A lone row (decoding one sequence) streams the weights faster two rows at a time.
q8_0_vnni!(Q8_0VnniPairs, q8_0_vnni_pairs, 2);

/// A Q4_1 block's 16 bytes as 32 unsigned bytes in value order: the low nibbles (values
/// 0-15) in the lower half, the high nibbles (16-31) in the upper.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let packed = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

macro_rules! q4_1_vnni {
    ($isa:ident, $entry:ident, $nr:literal) => {
        kernel!(
            $isa,
            $entry,
            "avx2,fma,avx512f,avx512vl,avx512vnni",
            Q4_1,
            $nr,
            load = |p| nibbles(p),
            prepare = |xv| xv,
            dot = |px, wu| _mm256_dpbusd_epi32(_mm256_setzero_si256(), wu, px)
        );
    };
}
q4_1_vnni!(Q4_1Vnni, q4_1_vnni, 4);
q4_1_vnni!(Q4_1VnniPairs, q4_1_vnni_pairs, 2);

// AVX2's `vpmaddubsw` saturates at 16 bits, which offset Q8_0 weights would overflow: x
// gives its magnitudes and each weight takes x's sign instead. Q4_1's nibbles (at most 15)
// go in unsigned as they are.
kernel!(
    Q8_0Avx2,
    q8_0_avx2,
    "avx2,fma",
    Q8_0,
    2,
    load = |p| _mm256_loadu_si256(p as *const __m256i),
    prepare = |xv| (_mm256_sign_epi8(xv, xv), xv),
    dot = |px, wv| _mm256_madd_epi16(
        _mm256_maddubs_epi16(px.0, _mm256_sign_epi8(wv, px.1)),
        _mm256_set1_epi16(1)
    )
);
kernel!(
    Q4_1Avx2,
    q4_1_avx2,
    "avx2,fma",
    Q4_1,
    2,
    load = |p| nibbles(p),
    prepare = |xv| xv,
    dot = |px, wu| _mm256_madd_epi16(_mm256_maddubs_epi16(wu, px), _mm256_set1_epi16(1))
);
