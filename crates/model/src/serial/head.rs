//! One query head's attention over its cached keys and values: the inner loop of a decode
//! step's attention, run once per (sequence, head) of every layer.
//!
//! With AVX2 and FMA (and a head size that is whole 8-lane vectors), the scores are taken for
//! eight keys at a time (eight independent accumulators, reduced together), the exponentials
//! are vectorised ([`crate::fastmath::exp_from_max`]), and the weighted sum of the values is
//! kept in registers across all positions, 64 columns at a time; the division by the softmax's
//! sum comes once at the end. The plain loop (other CPUs, other head sizes) stays as the
//! reference. Both sum in a fixed order that does not depend on the other rows of a batch.

use std::ops::Range;

/// The rows of one head of a `[b, heads, s, hd]` cache: position `j` starts at
/// `start + j * stride` of `data`, `hd` contiguous values.
#[derive(Clone, Copy)]
pub(super) struct HeadRows<'a> {
    pub data: &'a [f32],
    pub start: usize,
    pub stride: usize,
}

impl HeadRows<'_> {
    fn row(&self, j: usize, hd: usize) -> &[f32] {
        &self.data[self.start + j * self.stride..][..hd]
    }
}

/// Reused between heads: the raw scores and their exponentials.
#[derive(Default)]
pub(super) struct Scratch {
    scores: Vec<f32>,
    exps: Vec<f32>,
}

/// `out = sum_j softmax_j(scale * q . k_j) v_j` over `positions` (at least one).
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_head(
    q: &[f32],
    keys: HeadRows<'_>,
    values: HeadRows<'_>,
    positions: Range<usize>,
    scale: f32,
    scratch: &mut Scratch,
    out: &mut [f32],
    simd: bool,
) {
    let hd = q.len();
    assert!(out.len() == hd && !positions.is_empty());
    // Everything the vector kernels read lies within the slices.
    let last = positions.end - 1;
    let _ = (keys.row(last, hd), values.row(last, hd));
    #[cfg(target_arch = "x86_64")]
    if simd && hd.is_multiple_of(8) {
        // SAFETY: `simd` says the CPU has AVX2 and FMA; every row read was checked above.
        return unsafe { avx2::attend_head(q, keys, values, positions, scale, scratch, out) };
    }
    let _ = simd;
    let Scratch { scores, .. } = scratch;
    scores.clear();
    scores.extend(positions.clone().map(|j| {
        q.iter()
            .zip(keys.row(j, hd))
            .map(|(a, b)| a * b)
            .sum::<f32>()
            * scale
    }));
    super::softmax_row(scores);
    out.fill(0.0);
    for (&p, j) in scores.iter().zip(positions) {
        for (o, &v) in out.iter_mut().zip(values.row(j, hd)) {
            *o += p * v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{HeadRows, Range, Scratch};
    use std::arch::x86_64::*;

    /// Keys scored together: one accumulator each.
    const KEYS: usize = 8;

    /// # Safety
    /// The CPU has AVX2 and FMA; `q.len()` is a multiple of 8 and every position's rows of
    /// `keys` and `values` hold `q.len()` values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend_head(
        q: &[f32],
        keys: HeadRows<'_>,
        values: HeadRows<'_>,
        positions: Range<usize>,
        scale: f32,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        let hd = q.len();
        let Scratch { scores, exps } = scratch;
        scores.clear();
        let key = |j: usize| keys.data.as_ptr().add(keys.start + j * keys.stride);
        let mut j = positions.start;
        while j + KEYS <= positions.end {
            let rows: [*const f32; KEYS] = std::array::from_fn(|p| key(j + p));
            let mut acc = [_mm256_setzero_ps(); KEYS];
            for c in (0..hd).step_by(8) {
                let qv = _mm256_loadu_ps(q.as_ptr().add(c));
                for (a, row) in acc.iter_mut().zip(&rows) {
                    *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(row.add(c)), *a);
                }
            }
            let mut eight = [0f32; KEYS];
            _mm256_storeu_ps(eight.as_mut_ptr(), reduce8(acc));
            scores.extend_from_slice(&eight);
            j += KEYS;
        }
        for j in j..positions.end {
            let mut acc = _mm256_setzero_ps();
            for c in (0..hd).step_by(8) {
                let qv = _mm256_loadu_ps(q.as_ptr().add(c));
                acc = _mm256_fmadd_ps(qv, _mm256_loadu_ps(key(j).add(c)), acc);
            }
            scores.push(crate::matmul::avx2::sum8(acc));
        }
        let sum = crate::fastmath::exp_from_max(scores, scale, exps);
        let inverse = _mm256_set1_ps(1.0 / sum);
        let value = |j: usize| values.data.as_ptr().add(values.start + j * values.stride);
        let mut c = 0;
        while c + 64 <= hd {
            weighted::<8>(exps, &value, positions.start, c, inverse, out);
            c += 64;
        }
        while c < hd {
            weighted::<1>(exps, &value, positions.start, c, inverse, out);
            c += 8;
        }
    }

    /// Columns `c..c + 8 V` of `out`: the values weighted by `exps` (position `first + i` by
    /// `exps[i]`), summed in registers, times `inverse`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn weighted<const V: usize>(
        exps: &[f32],
        value: &impl Fn(usize) -> *const f32,
        first: usize,
        c: usize,
        inverse: __m256,
        out: &mut [f32],
    ) {
        let mut acc = [_mm256_setzero_ps(); V];
        for (i, &e) in exps.iter().enumerate() {
            let row = value(first + i).add(c);
            let p = _mm256_set1_ps(e);
            for (v, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(p, _mm256_loadu_ps(row.add(8 * v)), *a);
            }
        }
        for (v, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(c + 8 * v), _mm256_mul_ps(*a, inverse));
        }
    }

    /// The lane sums of eight accumulators, in their order.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn reduce8(a: [__m256; KEYS]) -> __m256 {
        let h01 = _mm256_hadd_ps(a[0], a[1]);
        let h23 = _mm256_hadd_ps(a[2], a[3]);
        let h45 = _mm256_hadd_ps(a[4], a[5]);
        let h67 = _mm256_hadd_ps(a[6], a[7]);
        // Lanes 0-3: the first four accumulators' sums over lanes 0-3, lanes 4-7 over 4-7.
        let first = _mm256_hadd_ps(h01, h23);
        let second = _mm256_hadd_ps(h45, h67);
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(first, second),
            _mm256_permute2f128_ps::<0x31>(first, second),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_matches_the_definition_at_every_head_size_and_length() {
        let paths = if crate::matmul::has_avx2_fma() {
            vec![false, true]
        } else {
            vec![false]
        };
        let value = |i: usize, salt: f32| (i as f32 * 0.731 + salt).sin() * 2.0;
        // Head sizes off the vector width, under, at and around the 64 columns kept in
        // registers; lengths around the 8 keys scored together; positions that skip the
        // oldest keys (a window), rows strided past their own values.
        for hd in [12, 16, 64, 72, 256] {
            for len in [1, 7, 8, 9, 40, 301] {
                let (first, stride, start) = (3, hd + 5, 2);
                let n = start + (first + len) * stride;
                let kd: Vec<f32> = (0..n).map(|i| value(i, 0.5)).collect();
                let vd: Vec<f32> = (0..n).map(|i| value(i, 0.9)).collect();
                let q: Vec<f32> = (0..hd).map(|i| value(i, 0.1)).collect();
                let scale = 0.3;
                let rows_of = |d: &[f32]| -> Vec<Vec<f32>> {
                    (first..first + len)
                        .map(|j| d[start + j * stride..][..hd].to_vec())
                        .collect()
                };
                let want = crate::serial::tests::naive(&q, &rows_of(&kd), &rows_of(&vd), scale);
                for &simd in &paths {
                    let rows = |data| HeadRows {
                        data,
                        start,
                        stride,
                    };
                    let mut out = vec![f32::NAN; hd];
                    attend_head(
                        &q,
                        rows(&kd),
                        rows(&vd),
                        first..first + len,
                        scale,
                        &mut Scratch::default(),
                        &mut out,
                        simd,
                    );
                    for (d, (a, b)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (*a as f64 - b).abs() < 2e-5,
                            "simd {simd} hd {hd} len {len} column {d}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
