//! Gated linear units `act(g) * u` forward and backward: SwiGLU (`silu`) and GeGLU with the
//! tanh approximation of GELU (Gemma's `gelu_pytorch_tanh`).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use mode_model::Activation;
use multiversion::multiversion;
use rayon::prelude::*;

use super::{slice, Float, ELEMS_PER_TASK};

/// `sqrt(2 / pi)` and the cubic coefficient of the tanh approximation of GELU.
const GELU_K: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044_715;

struct GluFwd(Activation);

impl CustomOp2 for GluFwd {
    fn name(&self) -> &'static str {
        "glu-fwd"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let act = self.0;
        by_dtype!(gs, self.name(), |T| {
            let g = slice::<T>(gs, gl, self.name())?;
            let u = slice::<T>(us, ul, self.name())?;
            let mut out = vec![T::ZERO; g.len()];
            out.par_chunks_mut(ELEMS_PER_TASK)
                .zip(
                    g.par_chunks(ELEMS_PER_TASK)
                        .zip(u.par_chunks(ELEMS_PER_TASK)),
                )
                .for_each(|(o, (g, u))| match act {
                    Activation::Silu => swiglu_chunk(g, u, o),
                    Activation::GeluTanh => geglu_chunk(g, u, o),
                });
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

/// `tanh(z)` as `1 - 2 / (1 + e^{2z})`: one exponential, and the limits come out exact (the
/// exponential overflows to infinity or underflows to zero).
#[inline(always)]
fn tanh<T: Float>(z: T) -> T {
    T::ONE - T::of(2.0) / (T::ONE + (z + z).exp())
}

#[multiversion(targets("x86_64+avx2+fma"))]
fn geglu_chunk<T: Float>(g: &[T], u: &[T], o: &mut [T]) {
    let (k, c, half) = (T::of(GELU_K), T::of(GELU_C), T::of(0.5));
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        let th = tanh(k * (g + c * g * g * g));
        *o = half * g * (T::ONE + th) * u;
    }
}

/// `act(g) * u`.
pub fn glu(act: Activation, g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.contiguous()?
        .apply_op2_no_bwd(&u.contiguous()?, &GluFwd(act))
}

struct GluBwd(Activation);

impl CustomOp3 for GluBwd {
    fn name(&self) -> &'static str {
        "glu-bwd"
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
        let act = self.0;
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
                .for_each(|((dg, du), ((dh, g), u))| match act {
                    Activation::Silu => swiglu_backward_chunk(dh, g, u, dg, du),
                    Activation::GeluTanh => geglu_backward_chunk(dh, g, u, dg, du),
                });
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

/// `gelu'(g) = (1 + th) / 2 + g / 2 * (1 - th^2) * k * (1 + 3c g^2)`, `th = tanh(k (g + c g^3))`.
#[multiversion(targets("x86_64+avx2+fma"))]
fn geglu_backward_chunk<T: Float>(dh: &[T], g: &[T], u: &[T], dg: &mut [T], du: &mut [T]) {
    let n = dg.len();
    let (dh, g, u, du) = (&dh[..n], &g[..n], &u[..n], &mut du[..n]);
    let (k, c, half, three) = (T::of(GELU_K), T::of(GELU_C), T::of(0.5), T::of(3.0));
    for i in 0..n {
        let x = g[i];
        let th = tanh(k * (x + c * x * x * x));
        let gelu = half * x * (T::ONE + th);
        let slope =
            half * (T::ONE + th) + half * x * (T::ONE - th * th) * k * (T::ONE + three * c * x * x);
        du[i] = dh[i] * gelu;
        dg[i] = dh[i] * u[i] * slope;
    }
}

/// Backward of [`glu`]: `(dg, du)`.
pub fn glu_backward(
    act: Activation,
    dh: &Tensor,
    g: &Tensor,
    u: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let out =
        dh.contiguous()?
            .apply_op3_no_bwd(&g.contiguous()?, &u.contiguous()?, &GluBwd(act))?;
    Ok((out.get(0)?, out.get(1)?))
}
