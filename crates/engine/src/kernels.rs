//! Fused CPU kernels for the elementwise parts of the training ops (RMSNorm, RoPE, SwiGLU and
//! the softmax backward): one parallel pass each instead of a chain of candle ops, every one of
//! which would allocate and sweep memory again. f32 and f64 (the gradient checks run in f64).
//!
//! Each kernel's inner loop over a row is compiled twice (`multiversion`): for the baseline
//! x86-64 the binary targets and for AVX2+FMA, picked at run time. Loops are written so that
//! the compiler can vectorise them: native arithmetic in the tensor's own type, reductions
//! split into [`LANES`] independent partial sums (a single running sum is a dependency chain
//! no compiler may reorder), and, in f32, an exponential ([`exp_f32`]) that is plain
//! arithmetic instead of a libm call.

use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};
use multiversion::multiversion;
use rayon::prelude::*;

/// Float types the kernels run on: f32 for training, f64 for the gradient checks.
pub trait Float:
    WithDType
    + Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + AddAssign
    + MulAssign
    + Sub<Output = Self>
    + SubAssign
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
    fn f(self) -> f64;
    fn of(v: f64) -> Self;
    /// `e^self`: [`exp_f32`] in f32, libm's `exp` in f64.
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
}

impl Float for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn f(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn of(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Float for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline(always)]
    fn f(self) -> f64 {
        self
    }
    #[inline(always)]
    fn of(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// `e^x` in f32 without branches or calls, so that loops over it vectorise: `x = n ln2 + r`
/// with `n` rounded to nearest (the 1.5 * 2^23 trick) and `ln2` split in two (Cody-Waite), a
/// degree-7 polynomial for `e^r` on `|r| <= ln2/2` (the Cephes `expf` coefficients), and
/// `2^n` built in the exponent bits. Relative error below 2e-7 over the normal range; NaN stays
/// NaN, arguments above 88.7 give infinity and below -87.3 the smallest normal number.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = if x < -87.336_55 { -87.336_55 } else { x };
    let x = if x > 88.722_84 { 88.722_84 } else { x };
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // The low mantissa bits of `shifted` hold n + 2^22; move n + 127 into the exponent field.
    let n_bits = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let two_n = f32::from_bits((n_bits.wrapping_add(127) as u32).wrapping_shl(23));
    e * two_n
}

/// Partial sums per reduction; 8 f32 fill one AVX2 register.
pub const LANES: usize = 8;

/// `sum_{i < n} term(i)` in [`LANES`] partial sums: the one reduction loop of the kernels.
/// The order of additions is fixed (lane by lane, then the lanes onto the tail), so results do
/// not depend on the thread count.
#[inline(always)]
fn lane_sum<A: Copy + Add<Output = A>>(n: usize, zero: A, term: impl Fn(usize) -> A) -> A {
    let mut acc = [zero; LANES];
    let full = n - n % LANES;
    for i in (0..full).step_by(LANES) {
        for (l, acc) in acc.iter_mut().enumerate() {
            *acc = *acc + term(i + l);
        }
    }
    let tail = (full..n).fold(zero, |s, i| s + term(i));
    acc.iter().fold(tail, |s, &v| s + v)
}

/// `sum_i a[i] * b[i]`, in [`LANES`] partial sums.
#[inline(always)]
pub fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    lane_sum(n, T::ZERO, |i| a[i] * b[i])
}

/// `sum_i a[i]` accumulated in f64, in [`LANES`] partial sums.
#[inline(always)]
pub fn sum_f64<T: Float>(a: &[T]) -> f64 {
    lane_sum(a.len(), 0.0, |i| a[i].f())
}

/// `max_i a[i]` (NaN entries are skipped; -inf for an empty slice), in [`LANES`] partial maxima.
#[inline(always)]
pub fn max<T: Float>(a: &[T]) -> T {
    let lowest = T::of(f64::NEG_INFINITY);
    let mut acc = [lowest; LANES];
    let chunks = a.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(lowest, |m, &x| if x > m { x } else { m });
    for x in chunks {
        for l in 0..LANES {
            acc[l] = if x[l] > acc[l] { x[l] } else { acc[l] };
        }
    }
    acc.iter().fold(tail, |m, &x| if x > m { x } else { m })
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

/// Elements per parallel task of the elementwise kernels.
const ELEMS_PER_TASK: usize = 1 << 14;

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
            let mut out = vec![T::ZERO; g.len()];
            out.par_chunks_mut(ELEMS_PER_TASK)
                .zip(
                    g.par_chunks(ELEMS_PER_TASK)
                        .zip(u.par_chunks(ELEMS_PER_TASK)),
                )
                .for_each(|(o, (g, u))| swiglu_chunk(g, u, o));
            Ok((T::to_cpu_storage_owned(out), gl.shape().clone()))
        })
    }
}

#[multiversion(targets("x86_64+avx2+fma"))]
fn swiglu_chunk<T: Float>(g: &[T], u: &[T], o: &mut [T]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g / (T::ONE + (-g).exp()) * u;
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
            let c = ELEMS_PER_TASK;
            dg.par_chunks_mut(c)
                .zip(du.par_chunks_mut(c))
                .zip(dh.par_chunks(c).zip(g.par_chunks(c)).zip(u.par_chunks(c)))
                .for_each(|((dg, du), ((dh, g), u))| swiglu_backward_chunk(dh, g, u, dg, du));
            let mut dims = vec![2];
            dims.extend_from_slice(gl.shape().dims());
            Ok((T::to_cpu_storage_owned(out), Shape::from(dims)))
        })
    }
}

#[multiversion(targets("x86_64+avx2+fma"))]
fn swiglu_backward_chunk<T: Float>(dh: &[T], g: &[T], u: &[T], dg: &mut [T], du: &mut [T]) {
    let n = dg.len();
    let (dh, g, u, du) = (&dh[..n], &g[..n], &u[..n], &mut du[..n]);
    for i in 0..n {
        let s = T::ONE / (T::ONE + (-g[i]).exp());
        du[i] = dh[i] * g[i] * s;
        dg[i] = dh[i] * u[i] * s * (T::ONE + g[i] * (T::ONE - s));
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
                    let angles = pos * half..(pos + 1) * half;
                    let (c, s) = (&cos[angles.clone()], &sin[angles]);
                    rope_row(x, c, s, T::of(self.sign), o);
                });
            Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
        })
    }
}

#[multiversion(targets("x86_64+avx2+fma"))]
fn rope_row<T: Float>(x: &[T], cos: &[T], sin: &[T], sign: T, o: &mut [T]) {
    let half = cos.len();
    let (x1, x2) = x.split_at(half);
    let (o1, o2) = o.split_at_mut(half);
    let (x2, sin, o2) = (&x2[..half], &sin[..half], &mut o2[..half]);
    for i in 0..half {
        let (c, s) = (cos[i], sign * sin[i]);
        o1[i] = x1[i] * c - x2[i] * s;
        o2[i] = x2[i] * c + x1[i] * s;
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
                    softmax_row(&x[..visible], T::of(self.scale), &mut o[..visible]);
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

// ---------------------------------------------------------------------------------------------
// Reductions

#[multiversion(targets("x86_64+avx2+fma"))]
fn sum_of_squares_chunk<T: Float>(x: &[T]) -> f64 {
    lane_sum(x.len(), 0.0, |i| x[i].f() * x[i].f())
}

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
                let sum: f64 = x.par_chunks(ELEMS_PER_TASK).map(sum_of_squares_chunk).sum();
                Ok((CpuStorage::F64(vec![sum]), Shape::from(())))
            })
        }
    }
    t.contiguous()?.apply_op1_no_bwd(&SumSq)?.to_scalar::<f64>()
}
