//! A parallel block of the training engine: the backbone's layers and each expert's layers
//! read the block input; the gate (or fixed weights) mixes them as `y = B + sum_j w_j D_j`,
//! where `D_j` is expert `j`'s difference from the backbone output (replace form) or from the
//! block input (residual form). Forward keeps what the backward pass reads; backward gives the
//! gradients of the experts, the gate and, when something before trains, the block input.

use candle_core::{Result, Tensor, D};
use mode_model::{Backbone, DecoderLayer, RopeTables};

use crate::layer::{self, LayerActivations, LayerTraining};
use crate::model::{forward_only, Block, Mix, Trainable};
use crate::ops;

/// What a block's forward pass kept for its backward pass.
pub(crate) struct BlockSaved {
    x: Tensor,
    /// Per branch (backbone first): activations of each layer, when the branch runs backward.
    acts: Vec<Option<Vec<LayerActivations>>>,
    /// The backbone branch's output `B(x)`, then each expert's difference `D_j` from it
    /// (`[n, h]` each).
    outputs: Vec<Tensor>,
    /// Mixing weights `[n, branches]`.
    weights: Tensor,
    gate_input: GateRead,
}

/// The block's output `[b, t, h]` for input `x`, and what its backward pass will read.
/// `upstream`: something before the block trains, so its input gradient will be needed.
pub(crate) fn block_forward(
    model: &Backbone,
    tr: &Trainable,
    block: &Block,
    x: &Tensor,
    rope: &RopeTables,
    upstream: bool,
) -> Result<(Tensor, BlockSaved)> {
    let (b, t, h) = x.dims3()?;
    let backbone_layers: Vec<&DecoderLayer> = model.layers[block.layers.clone()].iter().collect();
    let backbone_trains = block.layers.clone().any(|i| tr.layer(model, i).any());
    let mut branches: Vec<(Vec<&DecoderLayer>, bool)> =
        vec![(backbone_layers, upstream || backbone_trains)];
    for (e, layers) in block.experts.iter().enumerate() {
        branches.push((layers.iter().collect(), upstream || block.train_experts[e]));
    }
    let mut acts = Vec::new();
    let mut outputs = Vec::new();
    for (layers, backward) in branches {
        let mut y = x.clone();
        if backward {
            let mut saved = Vec::new();
            for l in layers {
                let (next, a) = layer::forward(l, &y, rope)?;
                saved.push(a);
                y = next;
            }
            acts.push(Some(saved));
        } else {
            for l in layers {
                y = forward_only(l, &y, rope)?;
            }
            acts.push(None);
        }
        outputs.push(y.reshape((b * t, h))?);
    }
    let x2d = x.reshape((b * t, h))?;
    for (j, &residual) in block.residual.iter().enumerate() {
        let base = if residual { &x2d } else { &outputs[0] };
        outputs[j + 1] = (&outputs[j + 1] - base)?;
    }
    let (weights, gate_input) = mix_weights(&block.mix, &x2d, outputs.len())?;
    let mut y = outputs[0].clone();
    for (j, delta) in outputs.iter().enumerate().skip(1) {
        y = (y + delta.broadcast_mul(&weights.narrow(1, j, 1)?)?)?;
    }
    Ok((
        y.reshape((b, t, h))?,
        BlockSaved {
            x: x2d,
            acts,
            outputs,
            weights,
            gate_input,
        },
    ))
}

/// What a gate read: its input `[n, h]` and, when normalised, the per-row reciprocal RMS.
type GateRead = Option<(Tensor, Option<Tensor>)>;

/// `[n, branches]` mixing weights, and what the gate read (none for a fixed mix).
fn mix_weights(mix: &Mix, x: &Tensor, branches: usize) -> Result<(Tensor, GateRead)> {
    match mix {
        Mix::Fixed(w) => {
            if w.len() != branches {
                candle_core::bail!("fixed mix has {} weights for {branches} branches", w.len());
            }
            let row = Tensor::new(w.as_slice(), x.device())?.to_dtype(x.dtype())?;
            let weights = row
                .unsqueeze(0)?
                .broadcast_as((x.dim(0)?, branches))?
                .contiguous()?;
            Ok((weights, None))
        }
        Mix::Gate {
            weight,
            bias,
            normalize_input,
        } => {
            let (u, rstd) = ops::gate_input(x, *normalize_input)?;
            let logits = ops::linear(&u, weight, Some(bias))?;
            Ok((candle_nn::ops::softmax_last_dim(&logits)?, Some((u, rstd))))
        }
    }
}

/// What a block's backward pass reads besides its saved activations.
pub(crate) struct BlockContext<'a> {
    pub model: &'a Backbone,
    pub trainable: &'a Trainable,
    pub index: usize,
    pub block: &'a Block<'a>,
    pub rope: &'a RopeTables,
    /// Something before the block trains: its input gradient is needed.
    pub upstream: bool,
}

/// The block's gradients (pushed onto `grads`) from the output gradient `dy`; returns the
/// input gradient when `ctx.upstream`.
pub(crate) fn block_backward(
    ctx: &BlockContext,
    s: &BlockSaved,
    dy: &Tensor,
    grads: &mut Vec<(String, Tensor)>,
) -> Result<Option<Tensor>> {
    let BlockContext {
        model,
        trainable,
        index: bi,
        block,
        rope,
        upstream,
    } = *ctx;
    let (b, t, h) = dy.dims3()?;
    let dy2d = dy.reshape((b * t, h))?;
    let mut dx: Option<Tensor> = None;
    let mut add = |d: Tensor| -> Result<()> {
        dx = Some(match dx.take() {
            Some(acc) => (acc + d)?,
            None => d,
        });
        Ok(())
    };
    // `y = B + sum_j w_j D_j`: the backbone branch gets `1 - sum of the replacing experts'
    // weights`; a residual expert's `- x` sends its weight, negated, to the block input.
    let sum_of = |residual: bool| -> Result<Option<Tensor>> {
        let mut acc: Option<Tensor> = None;
        for (j, _) in block
            .residual
            .iter()
            .enumerate()
            .filter(|(_, &r)| r == residual)
        {
            let w = s.weights.narrow(1, j + 1, 1)?;
            acc = Some(match acc.take() {
                Some(a) => (a + w)?,
                None => w,
            });
        }
        Ok(acc)
    };
    let (replacing, residual) = (sum_of(false)?, sum_of(true)?);
    for (j, acts) in s.acts.iter().enumerate() {
        let Some(acts) = acts else { continue };
        let d = match (j, &replacing) {
            (0, Some(r)) => dy2d.broadcast_mul(&r.affine(-1.0, 1.0)?)?,
            (0, None) => dy2d.clone(),
            _ => dy2d.broadcast_mul(&s.weights.narrow(1, j, 1)?)?,
        };
        let mut d = d.reshape((b, t, h))?;
        let (layers, names): (Vec<&DecoderLayer>, Vec<(String, LayerTraining)>) = if j == 0 {
            block
                .layers
                .clone()
                .map(|i| {
                    (
                        &model.layers[i],
                        (format!("model.layers.{i}"), trainable.layer(model, i)),
                    )
                })
                .unzip()
        } else {
            block.experts[j - 1]
                .iter()
                .enumerate()
                .map(|(l, layer)| {
                    (
                        layer,
                        (
                            crate::names::expert_layer(bi, j - 1, l),
                            LayerTraining {
                                weights: block.train_experts[j - 1],
                                lora: false,
                            },
                        ),
                    )
                })
                .unzip()
        };
        for (l, a) in acts.iter().enumerate().rev() {
            let (prefix, trains) = &names[l];
            let (next, g) = layer::backward(layers[l], a, &d, rope, *trains)?;
            grads.extend(g.into_iter().map(|(n, g)| (format!("{prefix}.{n}"), g)));
            d = next;
        }
        if upstream {
            add(d)?;
        }
    }
    if let (true, Some(r)) = (upstream, &residual) {
        add(dy2d.broadcast_mul(r)?.neg()?.reshape((b, t, h))?)?;
    }
    if let Mix::Gate { weight, .. } = &block.mix {
        if block.train_gate || upstream {
            // d weight_j = <dy, D_j> per token (the backbone's weight does not appear in the
            // mix); then through the softmax.
            let mut da = vec![s.outputs[0].narrow(1, 0, 1)?.zeros_like()?];
            for delta in &s.outputs[1..] {
                da.push((&dy2d * delta)?.sum_keepdim(D::Minus1)?);
            }
            let da = Tensor::cat(&da, 1)?;
            let row = (&da * &s.weights)?.sum_keepdim(D::Minus1)?;
            let dlogits = (&s.weights * da.broadcast_sub(&row)?)?;
            let (u, rstd) = s.gate_input.as_ref().expect("a gate keeps what it read");
            if block.train_gate {
                let dw = ops::linear_backward_weight(&dlogits, u)?;
                let db = ops::linear_backward_bias(&dlogits)?;
                grads.push((crate::names::gate_weight(bi), dw));
                grads.push((crate::names::gate_bias(bi), db));
            }
            if upstream {
                let du = ops::linear_backward_input(&dlogits, weight)?;
                let dx = ops::gate_input_backward(&du, &s.x, rstd.as_ref())?;
                add(dx.reshape((b, t, h))?)?;
            }
        }
    }
    Ok(dx)
}
