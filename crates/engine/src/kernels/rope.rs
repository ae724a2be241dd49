//! Rotary position embeddings in the rotate-half layout, and their backward (the same
//! rotation with the sine negated).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use multiversion::multiversion;
use rayon::prelude::*;

use super::{slice, Float};

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
