//! One optimizer step: loss and gradients, global-norm clipping, AdamW.

use std::collections::HashMap;

use candle_core::{Result, Tensor};
use mode_engine::model::{loss_and_grads, Batch, Plan};
use mode_model::Backbone;

use crate::grads::{clip_scale, global_norm};
use crate::optim::decay_matrices;
use crate::AdamW;

/// What one step measured.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    pub tokens: usize,
    pub correct: usize,
    pub grad_norm: f64,
}

/// Forward, backward and update of `params` (the named tensors the plan trains). A non-finite
/// loss or gradient norm skips the update.
pub fn train_step(
    model: &Backbone,
    plan: &Plan,
    params: &[(String, &Tensor)],
    optimizer: &mut AdamW,
    batch: &Batch,
    lr: f64,
    max_grad_norm: f64,
) -> Result<StepStats> {
    let r = loss_and_grads(model, plan, &batch.ids, &batch.targets)?;
    let grads: HashMap<String, Tensor> = r.grads.into_iter().collect();
    let grad_norm = global_norm(grads.values())?;
    let loss = r.loss_sum / r.count.max(1) as f64;
    if !(loss.is_finite() && grad_norm.is_finite()) {
        // No update: the weights stay those of the last good step for the caller to keep.
        return Ok(StepStats {
            loss,
            tokens: r.count,
            correct: r.correct,
            grad_norm,
        });
    }
    let scale = clip_scale(grad_norm, max_grad_norm);
    let by_name: HashMap<&str, &Tensor> = params.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    let named: Vec<(&str, &Tensor)> = params.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    optimizer.update(&named, &grads, lr, scale, |name| {
        by_name.get(name).is_some_and(|t| decay_matrices(t))
    })?;
    Ok(StepStats {
        loss,
        tokens: r.count,
        correct: r.correct,
        grad_norm,
    })
}
