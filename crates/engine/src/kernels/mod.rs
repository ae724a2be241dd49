//! Fused CPU kernels for the elementwise parts of the training ops (RMSNorm, RoPE, gated units and
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

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};
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

pub use mode_model::fastmath::exp_f32;

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

mod glu;
mod norm;
mod rope;
mod softmax;

pub use glu::{glu, glu_backward};
pub use norm::{rms_norm, rms_norm_backward};
pub use rope::{rope, rope_backward};
pub use softmax::{causal_softmax, softmax_backward};

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
