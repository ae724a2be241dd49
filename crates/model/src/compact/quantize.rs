//! Rounding f32 values to GGUF's Q8_0 and Q4_1 blocks, as llama.cpp does: the weights once at
//! load, the activations before every quantised product.

use half::f16;
use multiversion::multiversion;

use super::BLOCK_VALUES;

/// Rounds `src` to Q8_0 blocks: each block's scale is its largest magnitude over 127 (passed
/// through `round_scale`: GGUF stores it as f16), each value `round(v / scale)`.
pub fn quantize_q8_0(
    src: &[f32],
    quants: &mut [i8],
    scales: &mut [f32],
    round_scale: impl Fn(f32) -> f32,
) {
    debug_assert_eq!(src.len(), quants.len());
    debug_assert_eq!(src.len(), scales.len() * BLOCK_VALUES);
    q8_0_blocks(src, quants, scales);
    for d in scales.iter_mut() {
        *d = round_scale(*d);
    }
}

/// [`quantize_q8_0`] before the scales are rounded (the values are rounded with the exact
/// scale). Activations are rounded to Q8_0 before every quantised product, so this loop is
/// written to vectorise: the largest magnitude in eight lanes, then the rounding.
#[multiversion(targets("x86_64+avx2+fma"))]
fn q8_0_blocks(src: &[f32], quants: &mut [i8], scales: &mut [f32]) {
    const LANES: usize = 8;
    for ((block, q), d) in src
        .chunks_exact(BLOCK_VALUES)
        .zip(quants.chunks_exact_mut(BLOCK_VALUES))
        .zip(scales.iter_mut())
    {
        let mut lanes = [0f32; LANES];
        for chunk in block.chunks_exact(LANES) {
            for l in 0..LANES {
                lanes[l] = lanes[l].max(chunk[l].abs());
            }
        }
        let amax = lanes.iter().fold(0f32, |m, &v| m.max(v));
        let scale = amax / 127.0;
        let inverse = if scale == 0.0 { 0.0 } else { 1.0 / scale };
        for (q, v) in q.iter_mut().zip(block) {
            // Rounds half away from zero, as `f32::round` (a libm call without SSE4.1) does.
            let scaled = v * inverse;
            *q = (scaled + 0.5f32.copysign(scaled)) as i32 as i8;
        }
        *d = scale;
    }
}

/// Rounds `src` to Q4_1 blocks as GGUF does: each block spans its minimum to its maximum in 15
/// steps, each value `min(15, trunc((v - min) / step + 0.5))`; the step and the minimum are
/// stored rounded to f16 (the values are rounded with them unrounded, as llama.cpp does).
pub(super) fn quantize_q4_1(src: &[f32], quants: &mut [u8], scales: &mut [f32], mins: &mut [f32]) {
    let half = BLOCK_VALUES / 2;
    for (((block, q), d), m) in src
        .chunks_exact(BLOCK_VALUES)
        .zip(quants.chunks_exact_mut(half))
        .zip(scales.iter_mut())
        .zip(mins.iter_mut())
    {
        let min = block.iter().fold(f32::MAX, |a, &v| a.min(v));
        let max = block.iter().fold(f32::MIN, |a, &v| a.max(v));
        let step = (max - min) / 15.0;
        let inverse = if step == 0.0 { 0.0 } else { 1.0 / step };
        let level = |v: f32| (((v - min) * inverse + 0.5) as i8 as u8).min(15);
        for (j, q) in q.iter_mut().enumerate() {
            *q = level(block[j]) | (level(block[j + half]) << 4);
        }
        *d = f16::from_f32(step).to_f32();
        *m = f16::from_f32(min).to_f32();
    }
}
