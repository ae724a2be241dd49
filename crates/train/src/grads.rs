//! Gradient bookkeeping: global norm (for clipping) and accumulation over micro-batches.

use std::collections::HashMap;

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

/// Sums gradients of several micro-batches, each weighted by its share of the tokens, so the
/// result is the gradient of the mean loss over all of them.
#[derive(Default)]
pub struct GradAccumulator {
    sums: HashMap<String, Tensor>,
    tokens: usize,
}

impl GradAccumulator {
    /// Adds the gradients of a micro-batch's mean loss over `tokens` targets.
    pub fn add(&mut self, grads: Vec<(String, Tensor)>, tokens: usize) -> Result<()> {
        let w = tokens as f64;
        for (name, g) in grads {
            let g = (g * w)?;
            let sum = match self.sums.remove(&name) {
                Some(s) => (s + g)?,
                None => g,
            };
            self.sums.insert(name, sum);
        }
        self.tokens += tokens;
        Ok(())
    }

    /// The gradients of the mean loss over every token added, and the token count.
    pub fn finish(self) -> Result<(HashMap<String, Tensor>, usize)> {
        let scale = 1.0 / self.tokens.max(1) as f64;
        let grads = self
            .sums
            .into_iter()
            .map(|(k, v)| Ok((k, (v * scale)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Ok((grads, self.tokens))
    }
}
