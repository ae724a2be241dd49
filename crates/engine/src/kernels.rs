//! Fused CPU kernels for the elementwise parts of the training ops (RMSNorm, RoPE, SwiGLU and
//! the softmax backward): one parallel pass each instead of a chain of candle ops, every one of
//! which would allocate and sweep memory again. f32 and f64 (the gradient checks run in f64).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

/// Float types the kernels run on.
pub trait Float: WithDType + Copy + Send + Sync {
    fn f(self) -> f64;
    fn of(v: f64) -> Self;
}

impl Float for f32 {
    fn f(self) -> f64 {
        self as f64
    }
    fn of(v: f64) -> Self {
        v as f32
    }
}

impl Float for f64 {
    fn f(self) -> f64 {
        self
    }
    fn of(v: f64) -> Self {
        v
    }
}

fn slice<'a, T: Float>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&T::cpu_storage_as_slice(s)?[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// Dispatches a kernel body on the storage dtype.
macro_rules! by_dtype {
    ($s:expr, $name:expr, |$t:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            _ => candle_core::bail!("{}: only f32 and f64 are supported", $name),
        }
    };
}

/// Rows of `width` elements, processed in parallel.
const MIN_ROWS_PER_TASK: usize = 8;

// ---------------------------------------------------------------------------------------------
// RMSNorm

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
                .for_each(|(o, x)| {
                    let ms = x.iter().map(|v| v.f() * v.f()).sum::<f64>() / h as f64;
                    let r = 1.0 / (ms + self.eps).sqrt();
                    for i in 0..h {
                        o[i] = T::of(x[i].f() * r * w[i].f());
                    }
                    o[h] = T::of(r);
                });
            Ok((T::to_cpu_storage_owned(out), Shape::from((n, h + 1))))
        })
    }
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
                .for_each(|((dx, (dy, x)), r)| {
                    let r = r.f();
                    // dx = r * (g - xh * mean(g * xh)), g = dy * w, xh = x * r
                    let proj = (0..h)
                        .map(|i| dy[i].f() * w[i].f() * x[i].f() * r)
                        .sum::<f64>()
                        / h as f64;
                    for i in 0..h {
                        dx[i] = T::of(r * (dy[i].f() * w[i].f() - x[i].f() * r * proj));
                    }
                });
            // dw = sum_rows dy * x * r, reduced over row blocks in parallel.
            let dw = dy
                .par_chunks(h)
                .zip(x.par_chunks(h))
                .zip(rstd.par_iter())
                .with_min_len(64)
                .fold(
                    || vec![0f64; h],
                    |mut acc, ((dy, x), r)| {
                        for i in 0..h {
                            acc[i] += dy[i].f() * x[i].f() * r.f();
                        }
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

// ---------------------------------------------------------------------------------------------
// SwiGLU

struct SwigluFwd;

impl CustomOp2 for SwigluFwd {
    fn name(&self) -> &'static str {
        "swiglu-fwd"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(gs, self.name(), |T| {
            let g = slice::<T>(gs, gl, self.name())?;
            let u = slice::<T>(us, ul, self.name())?;
            let out: Vec<T> = g
                .par_iter()
                .zip(u.par_iter())
                .with_min_len(4096)
                .map(|(g, u)| {
                    let g = g.f();
                    T::of(g / (1.0 + (-g).exp()) * u.f())
                })
                .collect();
            Ok((T::to_cpu_storage_owned(out), gl.shape().clone()))
        })
    }
}

/// `silu(g) * u`.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.contiguous()?
        .apply_op2_no_bwd(&u.contiguous()?, &SwigluFwd)
}

struct SwigluBwd;

impl CustomOp3 for SwigluBwd {
    fn name(&self) -> &'static str {
        "swiglu-bwd"
    }

    /// Output `[2, ...]`: dg then du.
    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        hl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype!(gs, self.name(), |T| {
            let dh = slice::<T>(hs, hl, self.name())?;
            let g = slice::<T>(gs, gl, self.name())?;
            let u = slice::<T>(us, ul, self.name())?;
            let n = g.len();
            let mut out = vec![T::of(0.0); 2 * n];
            let (dg, du) = out.split_at_mut(n);
            dg.par_iter_mut()
                .zip(du.par_iter_mut())
                .zip(dh.par_iter().zip(g.par_iter()).zip(u.par_iter()))
                .with_min_len(4096)
                .for_each(|((dg, du), ((dh, g), u))| {
                    let (dh, g, u) = (dh.f(), g.f(), u.f());
                    let s = 1.0 / (1.0 + (-g).exp());
                    *du = T::of(dh * g * s);
                    *dg = T::of(dh * u * s * (1.0 + g * (1.0 - s)));
                });
            let mut dims = vec![2];
            dims.extend_from_slice(gl.shape().dims());
            Ok((T::to_cpu_storage_owned(out), Shape::from(dims)))
        })
    }
}

/// Backward of [`swiglu`]: `(dg, du)`.
pub fn swiglu_backward(dh: &Tensor, g: &Tensor, u: &Tensor) -> Result<(Tensor, Tensor)> {
    let out = dh
        .contiguous()?
        .apply_op3_no_bwd(&g.contiguous()?, &u.contiguous()?, &SwigluBwd)?;
    Ok((out.get(0)?, out.get(1)?))
}

// ---------------------------------------------------------------------------------------------
// RoPE (rotate-half layout)

struct Rope {
    /// +1 forward, -1 backward (rotation by the opposite angle).
    sign: f64,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    /// `x [b, heads, t, d]`, `cos`, `sin [t, d/2]`.
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, _, t, d) = xl.shape().dims4()?;
        let half = d / 2;
        by_dtype!(xs, self.name(), |T| {
            let x = slice::<T>(xs, xl, self.name())?;
            let cos = slice::<T>(cs, cl, self.name())?;
            let sin = slice::<T>(ss, sl, self.name())?;
            let mut out = vec![T::of(0.0); x.len()];
            out.par_chunks_mut(d)
                .zip(x.par_chunks(d))
                .enumerate()
                .with_min_len(64)
                .for_each(|(row, (o, x))| {
                    let pos = row % t;
                    for i in 0..half {
                        let (c, s) = (cos[pos * half + i].f(), self.sign * sin[pos * half + i].f());
                        let (a, b) = (x[i].f(), x[i + half].f());
                        o[i] = T::of(a * c - b * s);
                        o[i + half] = T::of(b * c + a * s);
                    }
                });
            Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
        })
    }
}

/// Rotary embedding: pair i is (x[i], x[i + d/2]).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_signed(x, cos, sin, 1.0)
}

/// Backward of [`rope`]: the rotation by the opposite angle.
pub fn rope_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_signed(dy, cos, sin, -1.0)
}

fn rope_signed(x: &Tensor, cos: &Tensor, sin: &Tensor, sign: f64) -> Result<Tensor> {
    let dt = x.dtype();
    x.contiguous()?.apply_op3_no_bwd(
        &cos.to_dtype(dt)?.contiguous()?,
        &sin.to_dtype(dt)?.contiguous()?,
        &Rope { sign },
    )
}

// ---------------------------------------------------------------------------------------------
// Causal softmax and its backward

struct CausalSoftmax {
    scale: f64,
    /// Query rows per kv head are `rep` groups of `t` positions.
    t: usize,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    /// `scores [..., rep * t, t]` -> softmax over each row of `scale * scores` with keys after
    /// the query's position masked out.
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
                    let visible = row % t + 1;
                    let max = x[..visible]
                        .iter()
                        .map(|v| v.f() * self.scale)
                        .fold(f64::NEG_INFINITY, f64::max);
                    let mut sum = 0.0;
                    for j in 0..visible {
                        let e = (x[j].f() * self.scale - max).exp();
                        sum += e;
                        o[j] = T::of(e);
                    }
                    for v in &mut o[..visible] {
                        *v = T::of(v.f() / sum);
                    }
                });
            Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
        })
    }
}

/// Softmax of `scale * scores` over keys, causal, for folded query rows (`rep` groups of `t`).
pub fn causal_softmax(scores: &Tensor, scale: f64, t: usize) -> Result<Tensor> {
    scores
        .contiguous()?
        .apply_op1_no_bwd(&CausalSoftmax { scale, t })
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
                .for_each(|(o, (p, dp))| {
                    let dot: f64 = p.iter().zip(dp).map(|(p, d)| p.f() * d.f()).sum();
                    for j in 0..width {
                        o[j] = T::of(self.scale * p[j].f() * (dp[j].f() - dot));
                    }
                });
            Ok((T::to_cpu_storage_owned(out), pl.shape().clone()))
        })
    }
}

/// Gradient of the pre-softmax scores (including the `scale` the forward applied).
pub fn softmax_backward(probs: &Tensor, d_probs: &Tensor, scale: f64) -> Result<Tensor> {
    probs
        .contiguous()?
        .apply_op2_no_bwd(&d_probs.contiguous()?, &SoftmaxBwd { scale })
}

// ---------------------------------------------------------------------------------------------
// Reductions

/// Sum of squares of all elements, accumulated in f64, in parallel.
pub fn sum_of_squares(t: &Tensor) -> Result<f64> {
    struct SumSq;
    impl CustomOp1 for SumSq {
        fn name(&self) -> &'static str {
            "sum-of-squares"
        }
        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
            by_dtype!(s, self.name(), |T| {
                let x = slice::<T>(s, l, self.name())?;
                let sum: f64 = x
                    .par_chunks(1 << 14)
                    .map(|c| c.iter().map(|v| v.f() * v.f()).sum::<f64>())
                    .sum();
                Ok((CpuStorage::F64(vec![sum]), Shape::from(())))
            })
        }
    }
    t.contiguous()?.apply_op1_no_bwd(&SumSq)?.to_scalar::<f64>()
}
