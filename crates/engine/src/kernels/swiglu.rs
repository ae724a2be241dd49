//! SwiGLU (`silu(g) * u`) forward and backward.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use multiversion::multiversion;
use rayon::prelude::*;

use super::{slice, Float, ELEMS_PER_TASK};

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
