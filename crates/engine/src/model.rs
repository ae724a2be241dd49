//! Loss and gradients of a whole backbone for one batch: the forward pass keeps activations only
//! from the first layer that needs a backward pass, and the backward pass computes weight
//! gradients only for trainable parts.

use candle_core::{Result, Tensor};
use mode_model::Backbone;

use crate::{layer, ops};

/// Which parts of a backbone train.
#[derive(Debug, Clone, PartialEq)]
pub struct Trainable {
    /// Per decoder layer.
    pub layers: Vec<bool>,
    /// Token embeddings (and the LM head when tied).
    pub embeddings: bool,
    /// Final norm scale.
    pub final_norm: bool,
    /// The LM head, when it is not tied to the embeddings.
    pub lm_head: bool,
}

impl Trainable {
    /// Everything trains: full fine-tuning.
    pub fn all(num_layers: usize) -> Self {
        Self {
            layers: vec![true; num_layers],
            embeddings: true,
            final_norm: true,
            lm_head: true,
        }
    }

    /// Nothing trains (loss only, or gradients for parts outside the backbone).
    pub fn none(num_layers: usize) -> Self {
        Self {
            layers: vec![false; num_layers],
            embeddings: false,
            final_norm: false,
            lm_head: false,
        }
    }

    /// Index of the first layer whose backward pass is needed, if any.
    fn first_backward_layer(&self) -> Option<usize> {
        if self.embeddings {
            return Some(0);
        }
        self.layers.iter().position(|&t| t)
    }
}

/// Loss statistics and gradients of one batch.
pub struct BatchGrads {
    pub loss_sum: f64,
    pub count: usize,
    pub correct: usize,
    /// Gradients of the mean loss, under Hugging Face tensor names.
    pub grads: Vec<(String, Tensor)>,
}

/// Mean cross-entropy of `ids: [b, t]` against `targets` (`b * t` ids, [`ops::IGNORE`] to skip),
/// and its gradients with respect to the trainable parts of `model`.
pub fn loss_and_grads(
    model: &Backbone,
    ids: &Tensor,
    targets: &[u32],
    trainable: &Trainable,
) -> Result<BatchGrads> {
    let (b, t) = ids.dims2()?;
    let h = model.config.hidden_size;
    let (cos, sin) = model
        .rope
        .tables_as(0, t, model.embed_tokens.dtype(), ids.device())
        .map_err(candle_core::Error::wrap)?;
    let first = trainable.first_backward_layer();
    let flat_ids = ids.flatten_all()?;
    let mut x = model
        .embed_tokens
        .index_select(&flat_ids, 0)?
        .reshape((b, t, h))?;
    let mut saved = Vec::new();
    for (i, l) in model.layers.iter().enumerate() {
        if first.is_some_and(|f| i >= f) {
            let (y, acts) = layer::forward(l, &x, &cos, &sin)?;
            saved.push(acts);
            x = y;
        } else {
            // Before the first trainable parameter: forward only, nothing kept.
            x = l
                .forward(&x, &cos, &sin, None)
                .map_err(candle_core::Error::wrap)?;
        }
    }
    let x2d = x.reshape((b * t, h))?;
    let (hn, rstd) = ops::rms_norm(&x2d, &model.norm.weight, model.norm.eps as f64)?;
    let count = targets.iter().filter(|&&x| x != ops::IGNORE).count();
    let tied = model.lm_head_tied;
    let head_trains = if tied {
        trainable.embeddings
    } else {
        trainable.lm_head
    };
    let ce = ops::lm_head_cross_entropy(
        &hn,
        &model.lm_head.weight,
        targets,
        1.0 / count.max(1) as f64,
        head_trains,
        256,
    )?;
    let mut grads = Vec::new();
    let mut head_grad = ce.d_weight;
    if !tied {
        if let Some(g) = head_grad.take() {
            grads.push(("lm_head.weight".to_string(), g));
        }
    }
    if let Some(first) = first {
        let (dx, dw_norm) = ops::rms_norm_backward(&ce.d_hidden, &x2d, &model.norm.weight, &rstd)?;
        if trainable.final_norm {
            grads.push(("model.norm.weight".to_string(), dw_norm));
        }
        let mut dx = dx.reshape((b, t, h))?;
        for (i, acts) in (first..model.layers.len()).zip(saved.iter()).rev() {
            let (d, layer_grads) =
                layer::backward(&model.layers[i], acts, &dx, &cos, &sin, trainable.layers[i])?;
            dx = d;
            grads.extend(
                layer_grads
                    .into_iter()
                    .map(|(n, g)| (format!("model.layers.{i}.{n}"), g)),
            );
        }
        if trainable.embeddings {
            let mut de = ops::embedding_backward(
                &flat_ids,
                &dx.reshape((b * t, h))?,
                model.config.vocab_size,
            )?;
            if let Some(g) = head_grad {
                de = (de + g)?;
            }
            grads.push(("model.embed_tokens.weight".to_string(), de));
        }
    } else if trainable.final_norm {
        let (_, dw_norm) = ops::rms_norm_backward(&ce.d_hidden, &x2d, &model.norm.weight, &rstd)?;
        grads.push(("model.norm.weight".to_string(), dw_norm));
    }
    Ok(BatchGrads {
        loss_sum: ce.loss_sum,
        count: ce.count,
        correct: ce.correct,
        grads,
    })
}
