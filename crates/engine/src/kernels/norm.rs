//! RMSNorm forward and backward, one parallel pass each.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use multiversion::multiversion;
use rayon::prelude::*;

use super::{dot, lane_sum, slice, Float, MIN_ROWS_PER_TASK};

struct RmsNormFwd {
    eps: f64,
}

impl CustomOp2 for RmsNormFwd {
    fn name(&self) -> &'static str {
        "rms-norm-fwd"
    }

    /// Output `[n, h + 1]`: the normalised rows, then each row's reciprocal RMS.
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h) = xl.shape().dims2()?;
        by_dtype!(xs, self.name(), |T| {
            let x = slice::<T>(xs, xl, self.name())?;
            let w = slice::<T>(ws, wl, self.name())?;
            let mut out = vec![T::of(0.0); n * (h + 1)];
            out.par_chunks_mut(h + 1)
                .with_min_len(MIN_ROWS_PER_TASK)
                .zip(x.par_chunks(h))
                .for_each(|(o, x)| rms_norm_row(x, w, self.eps, o));
            Ok((T::to_cpu_storage_owned(out), Shape::from((n, h + 1))))
        })
    }
}

/// One row of [`RmsNormFwd`]: `o[..h]` the normalised row, `o[h]` its reciprocal RMS.
#[multiversion(targets("x86_64+avx2+fma"))]
fn rms_norm_row<T: Float>(x: &[T], w: &[T], eps: f64, o: &mut [T]) {
    let h = x.len();
    let r = T::ONE / (dot(x, x) / T::of(h as f64) + T::of(eps)).sqrt();
    for ((o, &x), &w) in o[..h].iter_mut().zip(x).zip(&w[..h]) {
        *o = x * r * w;
    }
    o[h] = r;
}

/// RMSNorm forward: `(y [n, h], rstd [n, 1])`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let h = x.dim(1)?;
    let out = x
        .contiguous()?
        .apply_op2_no_bwd(&w.contiguous()?, &RmsNormFwd { eps })?;
    Ok((
        out.narrow(1, 0, h)?.contiguous()?,
        out.narrow(1, h, 1)?.contiguous()?,
    ))
}

struct RmsNormBwd;

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-bwd"
    }

    /// Inputs `dy [n, h]`, `x [n, h]`, `[w (h) ; rstd (n)]` packed; output `[n + 1, h]`: dx rows,
    /// then dw.
    fn cpu_fwd(
        &self,
        ds: &CpuStorage,
        dl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h) = xl.shape().dims2()?;
        by_dtype!(xs, self.name(), |T| {
            let dy = slice::<T>(ds, dl, self.name())?;
            let x = slice::<T>(xs, xl, self.name())?;
            let packed = slice::<T>(ps, pl, self.name())?;
            let (w, rstd) = packed.split_at(h);
            let mut dx = vec![T::of(0.0); n * h];
            dx.par_chunks_mut(h)
                .with_min_len(MIN_ROWS_PER_TASK)
                .zip(dy.par_chunks(h).zip(x.par_chunks(h)))
                .zip(rstd.par_iter())
                .for_each(|((dx, (dy, x)), &r)| rms_norm_backward_row(dy, x, w, r, dx));
            // dw = sum_rows dy * x * r, reduced over row blocks in parallel.
            let dw = dy
                .par_chunks(h)
                .zip(x.par_chunks(h))
                .zip(rstd.par_iter())
                .with_min_len(64)
                .fold(
                    || vec![0f64; h],
                    |mut acc, ((dy, x), &r)| {
                        rms_norm_dw_row(&mut acc, dy, x, r);
                        acc
                    },
                )
                .reduce(
                    || vec![0f64; h],
                    |mut a, b| {
                        a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                        a
                    },
                );
            dx.extend(dw.into_iter().map(T::of));
            Ok((T::to_cpu_storage_owned(dx), Shape::from((n + 1, h))))
        })
    }
}

/// One row of the RMSNorm input gradient: `dx = r * (g - xh * mean(g * xh))` with
/// `g = dy * w`, `xh = x * r`.
#[multiversion(targets("x86_64+avx2+fma"))]
fn rms_norm_backward_row<T: Float>(dy: &[T], x: &[T], w: &[T], r: T, dx: &mut [T]) {
    let h = x.len();
    let (dy, w, dx) = (&dy[..h], &w[..h], &mut dx[..h]);
    let proj = lane_sum(h, T::ZERO, |i| dy[i] * w[i] * x[i]) * r / T::of(h as f64);
    for i in 0..h {
        dx[i] = r * (dy[i] * w[i] - x[i] * r * proj);
    }
}

/// Adds one row's `dy * x * r` into the f64 column sums of the RMSNorm weight gradient.
#[multiversion(targets("x86_64+avx2+fma"))]
fn rms_norm_dw_row<T: Float>(acc: &mut [f64], dy: &[T], x: &[T], r: T) {
    let h = acc.len();
    for ((a, &dy), &x) in acc.iter_mut().zip(&dy[..h]).zip(&x[..h]) {
        *a += (dy * x * r).f();
    }
}

/// RMSNorm backward: `(dx [n, h], dw [h])`.
pub fn rms_norm_backward(
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let n = x.dim(0)?;
    let packed = Tensor::cat(
        &[&w.to_dtype(x.dtype())?.flatten_all()?, &rstd.flatten_all()?],
        0,
    )?;
    let out = dy
        .contiguous()?
        .apply_op3_no_bwd(&x.contiguous()?, &packed, &RmsNormBwd)?;
    Ok((out.narrow(0, 0, n)?, out.get(n)?))
}
