//! Causal softmax of attention scores and its backward.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use multiversion::multiversion;
use rayon::prelude::*;

use super::{dot, max, slice, sum_f64, Float};

struct CausalSoftmax {
    scale: f64,
    /// Query rows per kv head are `rep` groups of `t` positions.
    t: usize,
    /// Keys visible to a query: at most this many, ending at its own position.
    window: usize,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    /// `scores [..., rep * t, t]` -> softmax over each row of `scale * scores` with keys after
    /// the query's position, and those `window` or more before it, masked out (probability 0).
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let t = self.t;
        by_dtype!(s, self.name(), |T| {
            let x = slice::<T>(s, l, self.name())?;
            let mut out = vec![T::of(0.0); x.len()];
            out.par_chunks_mut(t)
                .zip(x.par_chunks(t))
                .enumerate()
                .with_min_len(16)
                .for_each(|(row, (o, x))| {
                    let end = row % t + 1;
                    let start = end.saturating_sub(self.window);
                    softmax_row(&x[start..end], T::of(self.scale), &mut o[start..end]);
                });
            Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
        })
    }
}

/// `o = softmax(scale * x)` for `scale > 0`.
#[multiversion(targets("x86_64+avx2+fma"))]
fn softmax_row<T: Float>(x: &[T], scale: T, o: &mut [T]) {
    let top = max(x) * scale;
    let o = &mut o[..x.len()];
    for (o, &x) in o.iter_mut().zip(x) {
        *o = (x * scale - top).exp();
    }
    let inv = T::of(1.0 / sum_f64(o));
    for o in o.iter_mut() {
        *o *= inv;
    }
}

/// Softmax of `scale * scores` over keys, causal (and within `window` when given), for folded
/// query rows (`rep` groups of `t`).
pub fn causal_softmax(
    scores: &Tensor,
    scale: f64,
    t: usize,
    window: Option<usize>,
) -> Result<Tensor> {
    let window = window.unwrap_or(usize::MAX);
    scores
        .contiguous()?
        .apply_op1_no_bwd(&CausalSoftmax { scale, t, window })
}

struct SoftmaxBwd {
    scale: f64,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "softmax-bwd"
    }

    /// `dS = scale * P * (dP - rowsum(dP * P))`.
    fn cpu_fwd(
        &self,
        ps: &CpuStorage,
        pl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let width = *pl.shape().dims().last().unwrap_or(&1);
        by_dtype!(ps, self.name(), |T| {
            let p = slice::<T>(ps, pl, self.name())?;
            let dp = slice::<T>(ds, dl, self.name())?;
            let mut out = vec![T::of(0.0); p.len()];
            out.par_chunks_mut(width)
                .zip(p.par_chunks(width).zip(dp.par_chunks(width)))
                .with_min_len(16)
                .for_each(|(o, (p, dp))| softmax_backward_row(p, dp, T::of(self.scale), o));
            Ok((T::to_cpu_storage_owned(out), pl.shape().clone()))
        })
    }
}

#[multiversion(targets("x86_64+avx2+fma"))]
fn softmax_backward_row<T: Float>(p: &[T], dp: &[T], scale: T, o: &mut [T]) {
    let n = p.len();
    let (dp, o) = (&dp[..n], &mut o[..n]);
    let d = dot(p, dp);
    for j in 0..n {
        o[j] = scale * p[j] * (dp[j] - d);
    }
}

/// Gradient of the pre-softmax scores (including the `scale` the forward applied).
pub fn softmax_backward(probs: &Tensor, d_probs: &Tensor, scale: f64) -> Result<Tensor> {
    probs
        .contiguous()?
        .apply_op2_no_bwd(&d_probs.contiguous()?, &SoftmaxBwd { scale })
}
