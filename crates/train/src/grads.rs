//! Gradient bookkeeping: the global norm and the factor that clips it (accumulation over
//! micro-batches is in [`crate::train_step`]).

use candle_core::{Result, Tensor};

/// `sqrt(sum of squares)` over all gradients, in f64.
pub fn global_norm<'a>(grads: impl IntoIterator<Item = &'a Tensor>) -> Result<f64> {
    let mut sum = 0f64;
    for g in grads {
        sum += g
            .to_dtype(candle_core::DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

/// The factor that clips gradients of norm `norm` to at most `max_norm` (1 when already below).
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}
