//! `y = x W^T` for a few rows of `x` (decoding: one row per sequence in the batch).
//!
//! A general matrix product (candle's `gemm`) packs `W^T` into panels before multiplying: worth
//! it when many rows reuse them, but at a decode step's 2 to 64 rows the packing reads and
//! writes the whole weight matrix again, and the step costs several times the single-row one.
//! Here every weight row is read once, straight from its row-major storage, and multiplied
//! against all rows of `x` while it sits in L1: a decode step reads the weights once however
//! many sequences it serves, which is the whole point of batching on a CPU.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

/// Up to this many rows of `x` go through [`matmul_rows`]; more go to `gemm`, whose packing
/// pays off once enough rows reuse it.
pub const MAX_ROWS: usize = 64;

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 32;

/// `y[i, j] = sum_k x[i, k] * w[j, k]`: `x` is `[m, k]`, `w` is `[n, k]`, both row-major; returns
/// `y` as `[m, n]`.
pub fn matmul_rows(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "x is not [{m}, {k}]");
    assert_eq!(w.len(), n * k, "w is not [{n}, {k}]");
    let mut y = vec![0f32; m * n];
    let out = OutPtr(y.as_mut_ptr());
    w.par_chunks(ROWS_PER_TASK * k.max(1))
        .enumerate()
        .for_each(|(task, rows)| {
            let j0 = task * ROWS_PER_TASK;
            // SAFETY: each task writes only columns j0..j0 + rows of y, disjoint across tasks,
            // and y outlives the parallel loop.
            let y = unsafe { std::slice::from_raw_parts_mut(out.get(), m * n) };
            block(x, m, rows, j0, n, k, y);
        });
    y
}

/// `x W^T` through [`matmul_rows`] when `x` (`[rows, in]`) has a few rows (2 to
/// `MAX_ROWS`) and both are f32 in memory; `None` otherwise.
pub fn few_rows_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (rows, k) = x.dims2()?;
    // One row is a matrix-vector product, which gemm does well without packing.
    if !(2..=MAX_ROWS).contains(&rows) || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return Ok(None);
    }
    let (storage, layout) = w.storage_and_layout();
    let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) = &*storage else {
        return Ok(None);
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    let n = w.dims()[0];
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let y = matmul_rows(&xs, rows, &data[start..end], n, k);
    Ok(Some(Tensor::from_vec(y, (rows, n), x.device())?))
}

/// The output buffer, shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: see `matmul_rows`: tasks write disjoint elements.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Columns `j0..j0 + w.len() / k` of `y`.
fn block(x: &[f32], m: usize, w: &[f32], j0: usize, n: usize, k: usize, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if k.is_multiple_of(8) && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the kernel is compiled for.
        unsafe { avx2::block(x, m, w, j0, n, k, y) };
        return;
    }
    for (dj, wr) in w.chunks_exact(k).enumerate() {
        for i in 0..m {
            let xr = &x[i * k..(i + 1) * k];
            y[i * n + j0 + dj] = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Two weight rows against four rows of `x` at a time: eight 8-lane accumulators, two
    /// weight loads and four `x` loads per 8 values of `k`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block(
        x: &[f32],
        m: usize,
        w: &[f32],
        j0: usize,
        n: usize,
        k: usize,
        y: &mut [f32],
    ) {
        let rows = w.len() / k;
        let mut dj = 0;
        while dj < rows {
            let nr = (rows - dj).min(2);
            let w0 = w.as_ptr().add(dj * k);
            let w1 = w.as_ptr().add((dj + nr - 1) * k);
            let mut i = 0;
            while i < m {
                let mr = (m - i).min(4);
                let xs: [*const f32; 4] =
                    std::array::from_fn(|r| x.as_ptr().add((i + r.min(mr - 1)) * k));
                let mut acc = [[_mm256_setzero_ps(); 2]; 4];
                let mut c = 0;
                while c < k {
                    let a = _mm256_loadu_ps(w0.add(c));
                    let b = _mm256_loadu_ps(w1.add(c));
                    for r in 0..4 {
                        let v = _mm256_loadu_ps(xs[r].add(c));
                        acc[r][0] = _mm256_fmadd_ps(v, a, acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(v, b, acc[r][1]);
                    }
                    c += 8;
                }
                for (r, pair) in acc.iter().enumerate().take(mr) {
                    for (s, v) in pair.iter().enumerate().take(nr) {
                        y[(i + r) * n + j0 + dj + s] = sum8(*v);
                    }
                }
                i += mr;
            }
            dj += nr;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn values(len: usize, salt: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 * 0.618 + salt).sin() * 1000.0).fract())
            .collect()
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
            let got = matmul_rows(&x, m, &w, n, k);
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
}
