//! Loss and gradients of a backbone, optionally with parallel blocks (experts beside a range of
//! backbone layers, mixed by a per-token gate or fixed weights), for one batch.
//!
//! The forward pass keeps activations only where a backward pass will run: a stage needs one
//! when it trains or when anything before it trains. Everything before the first trainable
//! parameter runs forward only, through the fused inference kernels.

use std::ops::Range;

use candle_core::{Result, Tensor};
use mode_model::{Backbone, DecoderLayer, RopeTables};

use crate::block::{block_backward, block_forward, BlockContext, BlockSaved};
use crate::layer::{self, LayerActivations, LayerTraining};
use crate::ops;

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
    /// LoRA adapters, wherever attached.
    pub lora: bool,
}

impl Trainable {
    /// Everything trains: full fine-tuning.
    pub fn all(num_layers: usize) -> Self {
        Self {
            layers: vec![true; num_layers],
            embeddings: true,
            final_norm: true,
            lm_head: true,
            lora: true,
        }
    }

    /// Nothing in the backbone trains.
    pub fn none(num_layers: usize) -> Self {
        Self {
            layers: vec![false; num_layers],
            embeddings: false,
            final_norm: false,
            lm_head: false,
            lora: false,
        }
    }

    /// Only the LoRA adapters train.
    pub fn lora(num_layers: usize) -> Self {
        Self {
            lora: true,
            ..Self::none(num_layers)
        }
    }

    /// What trains in backbone layer `i` of `model`.
    pub fn layer(&self, model: &Backbone, i: usize) -> LayerTraining {
        LayerTraining {
            weights: self.layers[i],
            lora: self.lora && model.layers[i].has_lora(),
        }
    }
}

/// How a parallel block mixes its branches (backbone first, then experts).
pub enum Mix<'a> {
    /// Constant weights, one per branch.
    Fixed(Vec<f64>),
    /// Per-token softmax gate: `softmax(u W^T + b)`, `W: [branches, hidden]`, `b: [branches]`,
    /// where `u` is the block input `x`, or with `normalize_input` `x / rms(x)` per token
    /// ([`ops::gate_input`]).
    Gate {
        weight: &'a Tensor,
        bias: &'a Tensor,
        normalize_input: bool,
    },
}

/// Expert layer stacks running beside backbone layers `layers`, all reading the block input.
pub struct Block<'a> {
    pub layers: Range<usize>,
    pub experts: Vec<&'a [DecoderLayer]>,
    /// Per expert: its branch outputs `B(x) + L(x) - x` (the backbone block's output plus what
    /// the expert's layers add to the block input) instead of `L(x)`.
    ///
    /// The block computes its mix as `B(x) + sum_j w_j D_j` with `D_j = L_j(x) - x` (residual)
    /// or `L_j(x) - B(x)`: equal to `sum_j w_j branch_j` for weights that sum to one (a softmax
    /// gate, or a fixed mix that does), and exactly `B(x)` where every `D_j` is zero.
    pub residual: Vec<bool>,
    pub mix: Mix<'a>,
    pub train_experts: Vec<bool>,
    pub train_gate: bool,
}

impl Block<'_> {
    fn trains(&self, model: &Backbone, backbone: &Trainable) -> bool {
        self.train_gate
            || self.train_experts.iter().any(|&t| t)
            || self.layers.clone().any(|i| backbone.layer(model, i).any())
    }
}

/// Everything that trains in one batch.
pub struct Plan<'a> {
    pub backbone: Trainable,
    /// Non-overlapping, in layer order.
    pub blocks: Vec<Block<'a>>,
    /// Keep only each layer's or block's input during the forward pass and recompute its
    /// activations when the backward pass reaches it: about one more forward pass of compute
    /// for the activations of one stage at a time instead of all of them.
    pub recompute_activations: bool,
}

impl Plan<'_> {
    /// A plain backbone (full fine-tuning, or frozen).
    pub fn backbone(trainable: Trainable) -> Self {
        Self {
            backbone: trainable,
            blocks: Vec::new(),
            recompute_activations: false,
        }
    }
}

/// Token ids `[batch, seq]` and the target of each position ([`ops::IGNORE`] to skip).
pub struct Batch {
    pub ids: Tensor,
    pub targets: Vec<u32>,
}

impl Batch {
    /// Next-token targets for rows of ids: each position predicts the next; the last of each
    /// row predicts nothing.
    pub fn next_token(ids: Tensor) -> Result<Self> {
        let rows: Vec<Vec<u32>> = ids.to_vec2()?;
        let mut targets = Vec::with_capacity(rows.len() * rows.first().map_or(0, |r| r.len()));
        for row in &rows {
            targets.extend_from_slice(&row[1.min(row.len())..]);
            if !row.is_empty() {
                targets.push(ops::IGNORE);
            }
        }
        Ok(Self { ids, targets })
    }
}

/// Loss statistics and gradients of one batch.
pub struct BatchGrads {
    pub loss_sum: f64,
    pub count: usize,
    pub correct: usize,
    /// Gradients of the mean loss: backbone parameters under Hugging Face names, block
    /// parameters under the names of [`crate::names`].
    pub grads: Vec<(String, Tensor)>,
}

enum Stage {
    Layer(usize),
    Block(usize),
}

/// What a stage's forward pass kept for its backward pass.
enum Saved {
    None,
    Layer(LayerActivations),
    Block(BlockSaved),
    /// The stage's input only; activations are recomputed in the backward pass.
    Input(Tensor),
}

fn stages(plan: &Plan, num_layers: usize) -> Vec<Stage> {
    let mut out = Vec::new();
    let mut i = 0;
    let mut blocks = plan.blocks.iter().enumerate().peekable();
    while i < num_layers {
        match blocks.peek() {
            Some((b, block)) if block.layers.start == i => {
                out.push(Stage::Block(*b));
                i = block.layers.end.max(i + 1);
                blocks.next();
            }
            _ => {
                out.push(Stage::Layer(i));
                i += 1;
            }
        }
    }
    out
}

/// Mean cross-entropy of `ids: [b, t]` against `targets` (`b * t` ids, [`ops::IGNORE`] to skip),
/// and its gradients with respect to everything `plan` trains.
pub fn loss_and_grads(
    model: &Backbone,
    plan: &Plan,
    ids: &Tensor,
    targets: &[u32],
) -> Result<BatchGrads> {
    let (b, t) = ids.dims2()?;
    let h = model.config.hidden_size;
    let dtype = model.embed_tokens.dtype();
    let rope = model
        .rope
        .tables_as(0, t, dtype, ids.device())
        .map_err(candle_core::Error::wrap)?;
    let tr = &plan.backbone;
    let stages = stages(plan, model.layers.len());
    // upstream[k]: something before stage k trains, so gradients must flow into it.
    let mut upstream = Vec::with_capacity(stages.len());
    let mut any = tr.embeddings;
    for s in &stages {
        upstream.push(any);
        any |= match s {
            Stage::Layer(i) => tr.layer(model, *i).any(),
            Stage::Block(bi) => plan.blocks[*bi].trains(model, tr),
        };
    }
    let needs_backward = |k: usize| {
        upstream[k]
            || match stages[k] {
                Stage::Layer(i) => tr.layer(model, i).any(),
                Stage::Block(bi) => plan.blocks[bi].trains(model, tr),
            }
    };

    let flat_ids = ids.flatten_all()?;
    let embedded = embed(model, ids)?;
    let backward: Vec<bool> = (0..stages.len()).map(needs_backward).collect();
    let (x, saved) = forward_stages(model, plan, &stages, &upstream, &backward, embedded, &rope)?;

    let x2d = x.reshape((b * t, h))?;
    let norm_scale = model.norm.scale()?;
    let (hn, rstd) = ops::rms_norm(&x2d, &norm_scale, model.norm.eps)?;
    let count = targets.iter().filter(|&&x| x != ops::IGNORE).count();
    let tied = model.lm_head_tied;
    let head_trains = if tied { tr.embeddings } else { tr.lm_head };
    let ce = ops::lm_head_cross_entropy(
        &hn,
        model.lm_head.weight.tensor()?,
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
    let any_backward = (0..stages.len()).any(needs_backward) || tr.embeddings;
    if tr.final_norm || any_backward {
        let (dx, dw_norm) = ops::rms_norm_backward(&ce.d_hidden, &x2d, &norm_scale, &rstd)?;
        if tr.final_norm {
            grads.push(("model.norm.weight".to_string(), dw_norm));
        }
        let mut dx = Some(dx.reshape((b, t, h))?);
        for (k, (stage, s)) in stages.iter().zip(saved.iter()).enumerate().rev() {
            let Some(dy) = dx.take() else { break };
            if !needs_backward(k) {
                break;
            }
            let recomputed;
            let s = match s {
                Saved::Input(x) => {
                    recomputed = match stage {
                        Stage::Layer(i) => {
                            Saved::Layer(layer::forward(&model.layers[*i], x, &rope)?.1)
                        }
                        Stage::Block(bi) => Saved::Block(
                            block_forward(model, tr, &plan.blocks[*bi], x, &rope, upstream[k])?.1,
                        ),
                    };
                    &recomputed
                }
                other => other,
            };
            dx = match (stage, s) {
                (Stage::Layer(i), Saved::Layer(acts)) => {
                    let (d, g) =
                        layer::backward(&model.layers[*i], acts, &dy, &rope, tr.layer(model, *i))?;
                    grads.extend(
                        g.into_iter()
                            .map(|(n, g)| (format!("model.layers.{i}.{n}"), g)),
                    );
                    upstream[k].then_some(d)
                }
                (Stage::Block(bi), Saved::Block(s)) => {
                    let block = &plan.blocks[*bi];
                    let ctx = BlockContext {
                        model,
                        trainable: tr,
                        index: *bi,
                        block,
                        rope: &rope,
                        upstream: upstream[k],
                    };
                    block_backward(&ctx, s, &dy, &mut grads)?
                }
                _ => unreachable!("stage and saved activations disagree"),
            };
        }
        if tr.embeddings {
            let dx = dx.expect("embeddings train, so the input gradient was kept");
            let dx = match embedding_scale(model) {
                Some(scale) => (dx * scale)?,
                None => dx,
            };
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
    }
    Ok(BatchGrads {
        loss_sum: ce.loss_sum,
        count: ce.count,
        correct: ce.correct,
        grads,
    })
}

/// Runs `stages` forward from the embedded input `x`, keeping for each stage what its backward
/// pass needs (`backward[k]`), or nothing.
fn forward_stages(
    model: &Backbone,
    plan: &Plan,
    stages: &[Stage],
    upstream: &[bool],
    backward: &[bool],
    mut x: Tensor,
    rope: &RopeTables,
) -> Result<(Tensor, Vec<Saved>)> {
    let tr = &plan.backbone;
    let mut saved = Vec::with_capacity(stages.len());
    for (k, stage) in stages.iter().enumerate() {
        let (y, s) = match stage {
            Stage::Layer(i) if backward[k] && plan.recompute_activations => (
                forward_only(&model.layers[*i], &x, rope)?,
                Saved::Input(x.clone()),
            ),
            Stage::Block(bi) if plan.recompute_activations => {
                let block = &plan.blocks[*bi];
                // The block's activations are dropped as soon as its output is known.
                let (y, _) = block_forward(model, tr, block, &x, rope, upstream[k])?;
                (y, Saved::Input(x.clone()))
            }
            Stage::Layer(i) => {
                let l = &model.layers[*i];
                if backward[k] {
                    let (y, acts) = layer::forward(l, &x, rope)?;
                    (y, Saved::Layer(acts))
                } else {
                    (forward_only(l, &x, rope)?, Saved::None)
                }
            }
            Stage::Block(bi) => {
                let block = &plan.blocks[*bi];
                let (y, s) = block_forward(model, tr, block, &x, rope, upstream[k])?;
                (y, Saved::Block(s))
            }
        };
        x = y;
        saved.push(s);
    }
    Ok((x, saved))
}

/// The logits `[b, t, vocab]` of `ids: [b, t]` through the same forward [`loss_and_grads`]
/// differentiates (nothing kept for a backward pass): what the parity tests hold the inference
/// forward to.
pub fn logits(model: &Backbone, plan: &Plan, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let h = model.config.hidden_size;
    let rope = model
        .rope
        .tables_as(0, t, model.embed_tokens.dtype(), ids.device())
        .map_err(candle_core::Error::wrap)?;
    let stages = stages(plan, model.layers.len());
    let none = vec![false; stages.len()];
    let x = embed(model, ids)?;
    let (x, _) = forward_stages(model, plan, &stages, &none, &none, x, &rope)?;
    let x2d = x.reshape((b * t, h))?;
    let (hn, _) = ops::rms_norm(&x2d, &model.norm.scale()?, model.norm.eps)?;
    hn.matmul(&model.lm_head.weight.tensor()?.t()?)?
        .reshape((b, t, model.config.vocab_size))
}

pub(crate) fn forward_only(l: &DecoderLayer, x: &Tensor, rope: &RopeTables) -> Result<Tensor> {
    l.forward(x, rope, None).map_err(candle_core::Error::wrap)
}

/// The factor embeddings are scaled by on the way in, in the embeddings' dtype, if any.
fn embedding_scale(model: &Backbone) -> Option<f64> {
    let dtype = model.embed_tokens.dtype();
    model
        .config
        .embedding_scale()
        .map(|s| mode_model::backbone::round_to(s, dtype))
}

/// Token embeddings `[b, t, h]` of `ids: [b, t]`, scaled where the architecture scales them
/// (the inference forward's [`Backbone::embed`], in the embeddings' own dtype).
fn embed(model: &Backbone, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let x = model
        .embed_tokens
        .index_select(&ids.flatten_all()?, 0)?
        .reshape((b, t, model.config.hidden_size))?;
    match embedding_scale(model) {
        Some(scale) => x * scale,
        None => Ok(x),
    }
}
