//! `y = x W^T` for a few rows of `x` (decoding: one row per sequence in the batch).
//!
//! A general matrix product (candle's `gemm`) packs `W^T` into panels before multiplying: worth
//! it when many rows reuse them, but at a decode step's 2 to 64 rows the packing reads and
//! writes the whole weight matrix again, and the step costs several times the single-row one.
//! Here every weight row is read once, straight from its row-major storage, and multiplied
//! against all rows of `x` while it sits in L1: a decode step reads the weights once however
//! many sequences it serves, which is the whole point of batching on a CPU.

use candle_core::{DType, Tensor};

use crate::compact::{QMatrix, Rows};

/// Up to this many rows of `x` go through [`matmul_rows`]; more go to `gemm`, whose packing
/// pays off once enough rows reuse it.
pub const MAX_ROWS: usize = 64;

/// Weight rows (columns of `y`) per parallel task.
pub(crate) const ROWS_PER_TASK: usize = 32;

/// Weight rows widened and multiplied together: 6 rows of up to 1,024 values take 24 KiB of L1,
/// and each group of four `x` rows is read from L2 once per panel rather than once per triple.
const PANEL: usize = 6;

/// `y[i, j] = sum_k x[i, k] * w[j, k]`: `x` is `[m, k]`, `w` is `[n, k]`, both row-major (`w`
/// in any stored element type); returns `y` as `[m, n]`.
pub fn matmul_rows(x: &[f32], m: usize, w: Rows<'_>, n: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x is not [{m}, {k}]");
    assert_eq!(w.len_values(), n * k, "w is not [{n}, {k}]");
    by_columns(m, n, |cols, y| {
        block(x, m, w, cols.start, cols.len(), n, k, y)
    })
}

/// `y` (`[m, n]`) filled by `fill(columns, y)` for blocks of [`ROWS_PER_TASK`] columns (weight
/// rows) spread over candle's worker pool; each call must write only its own columns of `y`.
///
/// candle's pool, which its elementwise and quantised ops use too: a second pool (rayon's)
/// beside it puts more threads than cores in every decode step, and the switches between them
/// cost more than the small matrices of a decode step take to multiply.
pub(crate) fn by_columns(
    m: usize,
    n: usize,
    fill: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    let out = OutPtr(y.as_mut_ptr());
    let tasks = n.div_ceil(ROWS_PER_TASK);
    candle_core::utils::barrier_pool().execute_chunked(tasks, |range| {
        for task in range {
            let j0 = task * ROWS_PER_TASK;
            // SAFETY: each task writes only its own columns of y (the contract of `fill`),
            // disjoint across tasks, and y outlives the parallel loop.
            let y = unsafe { std::slice::from_raw_parts_mut(out.get(), m * n) };
            fill(j0..n.min(j0 + ROWS_PER_TASK), y);
        }
    });
    y
}

/// Below this many values touched, the small parallel loops of inference stay on the calling
/// thread: handing them to candle's pool would cost more than they take.
pub(crate) const MIN_PARALLEL_VALUES: usize = 1 << 14;

/// Runs `f` over chunks of `0..items`: in one call on the calling thread when the loop touches
/// fewer than [`MIN_PARALLEL_VALUES`] values, else in chunks spread over candle's pool.
pub(crate) fn chunked(items: usize, values: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    if values < MIN_PARALLEL_VALUES {
        f(0..items);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(items, f);
    }
}

/// Whether this CPU runs the AVX2 + FMA kernels.
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Deterministic values in (-1, 1) for the kernels' tests.
#[cfg(test)]
pub(crate) fn test_values(len: usize, salt: f32) -> Vec<f32> {
    (0..len)
        .map(|i| ((i as f32 * 0.618 + salt).sin() * 1000.0).fract())
        .collect()
}

/// `f` of `x`'s values as one f32 slice: borrowed from its storage when `x` is a contiguous
/// f32 tensor on the CPU (copying a step's activations out was a measurable share of serving),
/// copied otherwise.
pub(crate) fn with_values<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    if x.dtype() == DType::F32 {
        let (storage, layout) = x.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(d)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&d[a..b]));
        }
    }
    let values = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(f(&values))
}

/// `x W^T` through [`matmul_rows`] when `x` (`[rows, in]`) has a few rows and `w` is in memory
/// as f32 (2 to `MAX_ROWS` rows: one row is a matrix-vector product, which gemm does well
/// without packing) or f16/bf16 (1 to `MAX_ROWS` rows: widened a row at a time instead of
/// converting the whole matrix); `None` otherwise.
pub fn few_rows_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (rows, k) = x.dims2()?;
    let min_rows = if w.dtype() == DType::F32 { 2 } else { 1 };
    if !(min_rows..=MAX_ROWS).contains(&rows) || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let (storage, layout) = w.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    let rows_of = match &*storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(d)) => Rows::F32(&d[start..end]),
        candle_core::Storage::Cpu(candle_core::CpuStorage::F16(d)) => Rows::F16(&d[start..end]),
        candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(d)) => Rows::BF16(&d[start..end]),
        _ => return Ok(None),
    };
    let n = w.dims()[0];
    let y = with_values(x, |xs| matmul_rows(xs, rows, rows_of, n, k))?;
    Ok(Some(Tensor::from_vec(y, (rows, n), x.device())?))
}

/// `x W^T` for a quantised `w` and `x: [rows, in]`, with integer dot products ([`crate::q8`])
/// at every row count: at many rows (prefill, evaluation) they also beat widening the weights
/// for gemm, and they run on the same worker pool as the rest of inference.
pub fn quantized_matmul(x: &Tensor, w: &QMatrix) -> candle_core::Result<Tensor> {
    let (rows, k) = x.dims2()?;
    let y = with_values(x, |xs| crate::q8::matmul(xs, rows, w.view(), w.rows(), k))?;
    Tensor::from_vec(y, (rows, w.rows()), x.device())?.to_dtype(x.dtype())
}

/// An output buffer shared by parallel tasks that write disjoint elements of it.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr<T>(pub(crate) *mut T);
// SAFETY: every user has its tasks write disjoint elements, and the buffer outlive them.
unsafe impl<T: Send> Send for OutPtr<T> {}
unsafe impl<T: Send> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not the field).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// Columns `j0..j0 + rows` of `y`, a panel of [`PANEL`] weight rows at a time: each row widened
/// to f32 once (into L1) for all `m` rows of `x`, and each group of four `x` rows (also in L1)
/// multiplied by the whole panel, three weight rows at a time, before the next group is read.
#[allow(clippy::too_many_arguments)]
fn block(
    x: &[f32],
    m: usize,
    w: Rows<'_>,
    j0: usize,
    rows: usize,
    n: usize,
    k: usize,
    y: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    let simd = k.is_multiple_of(8) && has_avx2_fma();
    let mut buf = vec![0f32; PANEL * k];
    for p0 in (0..rows).step_by(PANEL) {
        let pr = PANEL.min(rows - p0);
        let panel: Vec<&[f32]> = match w {
            Rows::F32(d) => (0..pr)
                .map(|r| &d[(j0 + p0 + r) * k..(j0 + p0 + r + 1) * k])
                .collect(),
            _ => {
                for (r, out) in buf.chunks_exact_mut(k).take(pr).enumerate() {
                    w.widen_row(j0 + p0 + r, k, out);
                }
                buf.chunks_exact(k).take(pr).collect()
            }
        };
        for i0 in (0..m).step_by(4) {
            let mr = (m - i0).min(4);
            let xq = &x[i0 * k..(i0 + mr) * k];
            let yq = &mut y[i0 * n..(i0 + mr) * n];
            for dj in (0..pr).step_by(3) {
                let nr = (pr - dj).min(3);
                let ws = [panel[dj], panel[dj + 1.min(nr - 1)], panel[dj + nr - 1]];
                let col = j0 + p0 + dj;
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: the CPU has the features the kernel is compiled for; k is a
                    // multiple of 8.
                    unsafe { avx2::triple(xq, mr, ws, nr, col, n, k, yq) };
                    continue;
                }
                for (s, wr) in ws.iter().enumerate().take(nr) {
                    for i in 0..mr {
                        let xr = &xq[i * k..(i + 1) * k];
                        yq[i * n + col + s] = xr.iter().zip(wr.iter()).map(|(a, b)| a * b).sum();
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// Three weight rows (repeated when `nr` is less) against four rows of `x` at a time:
    /// twelve 8-lane accumulators, three weight loads and four `x` loads per 8 values of `k`
    /// (a 4 x 2 tile needs six loads for eight products: the loads, not the products, bound it).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn triple(
        x: &[f32],
        m: usize,
        w: [&[f32]; 3],
        nr: usize,
        col: usize,
        n: usize,
        k: usize,
        y: &mut [f32],
    ) {
        let [w0, w1, w2] = w.map(|r| r.as_ptr());
        if m == 1 {
            // One row of x (a lone sequence decoding): two accumulators per weight row so that
            // consecutive FMAs do not wait on each other, instead of a 4-row tile that would
            // compute the same row four times.
            let xr = x.as_ptr();
            let mut acc = [_mm256_setzero_ps(); 6];
            let mut c = 0;
            while c + 16 <= k {
                let (v0, v1) = (_mm256_loadu_ps(xr.add(c)), _mm256_loadu_ps(xr.add(c + 8)));
                for (s, wr) in [w0, w1, w2].iter().enumerate() {
                    acc[2 * s] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(wr.add(c)), acc[2 * s]);
                    acc[2 * s + 1] =
                        _mm256_fmadd_ps(v1, _mm256_loadu_ps(wr.add(c + 8)), acc[2 * s + 1]);
                }
                c += 16;
            }
            if c < k {
                let v = _mm256_loadu_ps(xr.add(c));
                for (s, wr) in [w0, w1, w2].iter().enumerate() {
                    acc[2 * s] = _mm256_fmadd_ps(v, _mm256_loadu_ps(wr.add(c)), acc[2 * s]);
                }
            }
            for s in 0..nr {
                y[col + s] = sum8(_mm256_add_ps(acc[2 * s], acc[2 * s + 1]));
            }
            return;
        }
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(4);
            let xs: [*const f32; 4] =
                std::array::from_fn(|r| x.as_ptr().add((i + r.min(mr - 1)) * k));
            let mut acc = [[_mm256_setzero_ps(); 3]; 4];
            let mut c = 0;
            while c < k {
                let a = _mm256_loadu_ps(w0.add(c));
                let b = _mm256_loadu_ps(w1.add(c));
                let d = _mm256_loadu_ps(w2.add(c));
                for r in 0..4 {
                    let v = _mm256_loadu_ps(xs[r].add(c));
                    acc[r][0] = _mm256_fmadd_ps(v, a, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(v, b, acc[r][1]);
                    acc[r][2] = _mm256_fmadd_ps(v, d, acc[r][2]);
                }
                c += 8;
            }
            for (r, row) in acc.iter().enumerate().take(mr) {
                for (s, v) in row.iter().enumerate().take(nr) {
                    y[(i + r) * n + col + s] = sum8(*v);
                }
            }
            i += mr;
        }
    }

    /// The sum of the eight lanes.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn sum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_values as values;

    /// The product in f64, one dot product at a time.
    fn naive(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn matches_the_naive_product_at_every_shape_edge() {
        // Rows and columns that are and are not multiples of the kernel's 4 x 2 tile and of a
        // task's 32 columns; k a multiple of 8 (the vector path) and not (the scalar one).
        for &(m, n, k) in &[
            (1, 1, 8),
            (1, 67, 64),
            (3, 33, 24),
            (4, 64, 576),
            (5, 31, 40),
            (8, 100, 16),
            (13, 65, 12),
            (64, 7, 3),
        ] {
            let x = values(m * k, 0.3);
            let w = values(n * k, 1.7);
            let got = matmul_rows(&x, m, Rows::F32(&w), n, k);
            let want = naive(&x, m, &w, n, k);
            for (idx, (g, e)) in got.iter().zip(&want).enumerate() {
                let tol = 1e-5 * (k as f64).sqrt().max(1.0);
                assert!(
                    (*g as f64 - e).abs() <= tol,
                    "[{m}, {n}, {k}] element {idx}: {g} vs {e}"
                );
            }
        }
    }

    /// The product of `x` with the weights as the kernel sees them (widened to f32), in f64.
    fn naive_of(x: &[f32], m: usize, w: Rows<'_>, n: usize, k: usize) -> Vec<f64> {
        let mut wide = vec![0f32; n * k];
        for (j, row) in wide.chunks_exact_mut(k).enumerate() {
            w.widen_row(j, k, row);
        }
        naive(x, m, &wide, n, k)
    }

    #[test]
    fn compact_weights_match_the_naive_product_of_their_values() {
        use half::{bf16, f16};
        for &(m, n, k) in &[(1, 40, 64), (3, 33, 96), (8, 64, 576), (13, 7, 32)] {
            let x = values(m * k, 0.9);
            let w = values(n * k, 2.3);
            let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let wb16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            for rows in [Rows::F16(&w16), Rows::BF16(&wb16)] {
                let got = matmul_rows(&x, m, rows, n, k);
                let want = naive_of(&x, m, rows, n, k);
                for (g, e) in got.iter().zip(&want) {
                    assert!(
                        (*g as f64 - e).abs() <= 1e-5 * (k as f64).sqrt(),
                        "{rows:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn quantized_matmul_stays_close_to_the_product_of_the_widened_weights() {
        use crate::compact::BlockFormat;
        let (n, k) = (70, 96);
        let w = Tensor::from_vec(values(n * k, 0.4), (n, k), &candle_core::Device::Cpu).unwrap();
        for format in [BlockFormat::Q8_0, BlockFormat::Q4_1] {
            let q = QMatrix::quantize(&w, format).unwrap();
            let wide: Vec<f32> = q
                .dequantize()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            // The integer kernel rounds x to 8 bits too.
            for m in [1, 2, 5, 64, 67] {
                let xs = values(m * k, 1.1);
                let x = Tensor::from_vec(xs.clone(), (m, k), &candle_core::Device::Cpu).unwrap();
                let got: Vec<f32> = quantized_matmul(&x, &q)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let want = naive(&xs, m, &wide, n, k);
                for (idx, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - e).abs() <= 0.05,
                        "{format:?} m {m}, element {idx}: {g} vs {e}"
                    );
                }
                // And Q8_0's widened weights are close to the f32 ones they were quantised
                // from (Q4_1's quantiser is checked against candle's in `compact`).
                if format == BlockFormat::Q8_0 {
                    let exact = naive(&xs, m, &values(n * k, 0.4), n, k);
                    for (e, f) in want.iter().zip(&exact) {
                        assert!((e - f).abs() <= 0.1, "quantisation error {e} vs {f}");
                    }
                }
            }
        }
    }
}
