//! One optimizer step: loss and gradients, global-norm clipping, AdamW.

use std::collections::HashMap;

use candle_core::{Result, Tensor};
use mode_engine::model::{loss_and_grads, Batch, Plan};
use mode_engine::ops::IGNORE;
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

/// How one optimizer step runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSettings {
    pub lr: f64,
    /// Gradients are scaled down to this global norm when above it.
    pub max_grad_norm: f64,
    /// Rows per forward/backward pass; the step's gradient is accumulated over as many passes
    /// as the batch needs (0: the whole batch in one pass). Less memory, same gradient.
    pub micro_batch_rows: usize,
}

/// Forward, backward and update of `params` (the named tensors the plan trains), each at
/// `settings.lr` times `lr_scale(name)`. A non-finite loss or gradient norm skips the update.
pub fn train_step(
    model: &Backbone,
    plan: &Plan,
    params: &[(String, &Tensor)],
    optimizer: &mut AdamW,
    batch: &Batch,
    settings: StepSettings,
    lr_scale: &dyn Fn(&str) -> f64,
) -> Result<StepStats> {
    let (rows, seq) = batch.ids.dims2()?;
    let micro = match settings.micro_batch_rows {
        0 => rows,
        n => n.min(rows),
    };
    let total = batch.targets.iter().filter(|&&t| t != IGNORE).count();
    let (mut loss_sum, mut count, mut correct) = (0.0, 0, 0);
    let mut grads: HashMap<String, Tensor> = HashMap::new();
    for start in (0..rows).step_by(micro.max(1)) {
        let n = micro.min(rows - start);
        let ids = batch.ids.narrow(0, start, n)?;
        let r = loss_and_grads(
            model,
            plan,
            &ids,
            &batch.targets[start * seq..(start + n) * seq],
        )?;
        // Each pass gives the gradient of its own mean loss; weigh it by its share of the
        // step's tokens so the sum is the gradient of the step's mean loss.
        let share = r.count as f64 / total.max(1) as f64;
        for (name, g) in r.grads {
            let g = if micro == rows { g } else { (g * share)? };
            let g = match grads.remove(&name) {
                Some(acc) => (acc + g)?,
                None => g,
            };
            grads.insert(name, g);
        }
        loss_sum += r.loss_sum;
        count += r.count;
        correct += r.correct;
    }
    let grad_norm = global_norm(grads.values())?;
    let loss = loss_sum / count.max(1) as f64;
    if !(loss.is_finite() && grad_norm.is_finite()) {
        // No update: the weights stay those of the last good step for the caller to keep.
        return Ok(StepStats {
            loss,
            tokens: count,
            correct,
            grad_norm,
        });
    }
    let scale = clip_scale(grad_norm, settings.max_grad_norm);
    let by_name: HashMap<&str, &Tensor> = params.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    let named: Vec<(&str, &Tensor)> = params.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    let lr = |name: &str| settings.lr * lr_scale(name);
    optimizer.update(&named, &grads, lr, scale, |name| {
        by_name.get(name).is_some_and(|t| decay_matrices(t))
    })?;
    Ok(StepStats {
        loss,
        tokens: count,
        correct,
        grad_norm,
    })
}
