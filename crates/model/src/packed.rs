//! f32 weights held a second time, transposed into panels of 16 columns, for the few-row
//! products of serving (experts beside a compact backbone).
//!
//! [`crate::matmul::matmul_rows`] reads `W` as it is stored (`[out, in]`, row-major): each output
//! is a dot product, eight lanes summed at the end, and every 8 values of `k` cost a load of `x`
//! per product. Transposed into panels (`W^T`, 16 columns side by side for each `k`), one
//! broadcast value of `x` meets 16 weights in two fused multiply-adds and every lane is an output:
//! no horizontal sums, and a tile of 6 `x` rows by 16 columns keeps 12 accumulators busy per two
//! weight loads. Measured alone on this machine's core (16 x 576 times 576 x 1,536, weights
//! out of cache) it multiplies 1.4 times as fast. Packing copies the matrix, so only weights that
//! stay f32 and run at a few rows a step, the experts, are packed, and only for inference.

use std::sync::Arc;

use candle_core::{DType, Tensor};

/// Columns per panel: two 8-lane vectors.
const PANEL_COLS: usize = 16;

// A task of `by_columns` must hold whole panels.
const _: () = assert!(crate::matmul::ROWS_PER_TASK.is_multiple_of(PANEL_COLS));

/// Rows of `x` per tile (12 accumulators of the 16 vector registers).
const TILE_ROWS: usize = 6;

/// An f32 matrix `[n, k]` kept as a tensor (for everything but the few-row product) and as
/// `W^T` in panels: `panels[p][c][j] = w[p * 16 + j][c]`, columns past `n` zero.
#[derive(Debug, Clone)]
pub struct PackedF32 {
    tensor: Tensor,
    panels: Arc<[f32]>,
    n: usize,
    k: usize,
}

impl PackedF32 {
    /// Packs an f32 `[n, k]` tensor on the CPU; `None` for any other tensor.
    pub fn pack(w: &Tensor) -> candle_core::Result<Option<Self>> {
        if w.dtype() != DType::F32 || w.rank() != 2 || !w.device().is_cpu() {
            return Ok(None);
        }
        let (n, k) = w.dims2()?;
        let values = w.flatten_all()?.to_vec1::<f32>()?;
        let mut panels = vec![0f32; n.div_ceil(PANEL_COLS) * PANEL_COLS * k];
        for (row, w_row) in values.chunks_exact(k.max(1)).enumerate().take(n) {
            let (p, j) = (row / PANEL_COLS, row % PANEL_COLS);
            let panel = &mut panels[p * PANEL_COLS * k..][..PANEL_COLS * k];
            for (c, &v) in w_row.iter().enumerate() {
                panel[c * PANEL_COLS + j] = v;
            }
        }
        Ok(Some(Self {
            tensor: w.clone(),
            panels: panels.into(),
            n,
            k,
        }))
    }

    /// The matrix as a tensor, `[n, k]`.
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// `x W^T` for a tensor `x` `[rows, k]` through [`Self::matmul`] when `x` is f32 with 1
    /// to [`crate::matmul::MAX_ROWS`] rows; `None` otherwise (gemm on [`Self::tensor`] then).
    pub fn few_rows_matmul(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (rows, _) = x.dims2()?;
        if x.dtype() != DType::F32 || !(1..=crate::matmul::MAX_ROWS).contains(&rows) {
            return Ok(None);
        }
        let y = crate::matmul::with_values(x, |xs| self.matmul(xs, rows))?;
        Ok(Some(Tensor::from_vec(y, (rows, self.n), x.device())?))
    }

    /// `x W^T` for `x` `[m, k]` (row-major f32): `[m, n]`, panels spread over candle's worker
    /// pool. Each output is summed over `k` in order in its own lane, so a row gets the same
    /// bits whatever other rows share its step.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), m * k, "x is not [{m}, {k}]");
        let simd = crate::matmul::has_avx2_fma();
        crate::matmul::by_columns(m, n, |cols, y| {
            // Tasks start at multiples of 32 columns, so every task holds whole panels.
            for p in cols.start / PANEL_COLS..cols.end.div_ceil(PANEL_COLS) {
                let panel = &self.panels[p * PANEL_COLS * k..][..PANEL_COLS * k];
                let width = PANEL_COLS.min(n - p * PANEL_COLS);
                for i0 in (0..m).step_by(TILE_ROWS) {
                    let rows = TILE_ROWS.min(m - i0);
                    let mut tile = [[0f32; PANEL_COLS]; TILE_ROWS];
                    let xs = &x[i0 * k..(i0 + rows) * k];
                    #[cfg(target_arch = "x86_64")]
                    if simd {
                        // SAFETY: the CPU has AVX2 and FMA; `xs` holds `rows` rows of `k` and
                        // `panel` holds `k` rows of 16.
                        unsafe { avx2::tile(xs, rows, panel, k, &mut tile) };
                    }
                    if !simd {
                        scalar_tile(xs, rows, panel, k, &mut tile);
                    }
                    for (r, out) in tile.iter().enumerate().take(rows) {
                        let at = (i0 + r) * n + p * PANEL_COLS;
                        y[at..at + width].copy_from_slice(&out[..width]);
                    }
                }
            }
        })
    }
}

/// The tile's products in the same order as the vector kernel: for each output, `k` in order.
fn scalar_tile(
    xs: &[f32],
    rows: usize,
    panel: &[f32],
    k: usize,
    tile: &mut [[f32; PANEL_COLS]; TILE_ROWS],
) {
    for (r, out) in tile.iter_mut().enumerate().take(rows) {
        let xr = &xs[r * k..(r + 1) * k];
        for (c, &v) in xr.iter().enumerate() {
            for (o, w) in out
                .iter_mut()
                .zip(&panel[c * PANEL_COLS..(c + 1) * PANEL_COLS])
            {
                *o = v.mul_add(*w, *o);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{PANEL_COLS, TILE_ROWS};

    /// Up to six rows of `x` times one panel, dispatched to a kernel compiled for that count so
    /// that a lone row does not pay for six.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile(
        xs: &[f32],
        rows: usize,
        panel: &[f32],
        k: usize,
        out: &mut [[f32; PANEL_COLS]; TILE_ROWS],
    ) {
        match rows {
            1 => rows_of::<1>(xs, panel, k, out),
            2 => rows_of::<2>(xs, panel, k, out),
            3 => rows_of::<3>(xs, panel, k, out),
            4 => rows_of::<4>(xs, panel, k, out),
            5 => rows_of::<5>(xs, panel, k, out),
            _ => rows_of::<6>(xs, panel, k, out),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_of<const R: usize>(
        xs: &[f32],
        panel: &[f32],
        k: usize,
        out: &mut [[f32; PANEL_COLS]; TILE_ROWS],
    ) {
        let x: [*const f32; R] = std::array::from_fn(|r| xs.as_ptr().add(r * k));
        let w = panel.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for c in 0..k {
            let lo = _mm256_loadu_ps(w.add(c * PANEL_COLS));
            let hi = _mm256_loadu_ps(w.add(c * PANEL_COLS + 8));
            for r in 0..R {
                let v = _mm256_broadcast_ss(&*x[r].add(c));
                acc[r][0] = _mm256_fmadd_ps(v, lo, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(v, hi, acc[r][1]);
            }
        }
        for r in 0..R {
            _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r][0]);
            _mm256_storeu_ps(out[r].as_mut_ptr().add(8), acc[r][1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::test_values as values;
    use candle_core::Device;

    #[test]
    fn packed_products_match_the_naive_product_and_do_not_depend_on_the_batch() {
        // Row counts across tile edges (1, 5, 6, 7, 13, 64), columns across panel and task
        // edges (1, 15, 16, 17, 33, 100), k of any length.
        for &(m, n, k) in &[
            (1, 1, 8),
            (5, 15, 3),
            (6, 16, 64),
            (7, 17, 24),
            (13, 33, 576),
            (64, 100, 40),
        ] {
            let x = values(m * k, 0.3);
            let w = values(n * k, 1.7);
            let packed =
                PackedF32::pack(&Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap())
                    .unwrap()
                    .unwrap();
            let got = packed.matmul(&x, m);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                        .sum();
                    let g = got[i * n + j] as f64;
                    assert!(
                        (g - want).abs() <= 1e-5 * (k as f64).sqrt(),
                        "[{m}, {n}, {k}] ({i}, {j}): {g} vs {want}"
                    );
                }
                // Each row alone gives the same bits as in the batch.
                let alone = packed.matmul(&x[i * k..(i + 1) * k], 1);
                assert_eq!(alone, got[i * n..(i + 1) * n], "[{m}, {n}, {k}] row {i}");
            }
        }
    }

    #[test]
    fn only_f32_matrices_are_packed() {
        let w = Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(PackedF32::pack(&w).unwrap().is_some());
        assert!(PackedF32::pack(&w.to_dtype(DType::F16).unwrap())
            .unwrap()
            .is_none());
        assert!(
            PackedF32::pack(&Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap())
                .unwrap()
                .is_none()
        );
    }
}
