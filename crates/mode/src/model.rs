//! The MoDE model: backbone blocks, experts beside them, gates mixing them.

use std::sync::Mutex;

use candle_core::{Device, IndexOp, Module, Tensor};
use mode_engine::model::{Block, Mix, Plan, Trainable};
use mode_model::{Backbone, CausalLm, KvCache};

use crate::{BlockLayout, Error, Expert, Gate, Result};

/// A backbone with experts and per-block gates.
pub struct ModeModel {
    pub backbone: Backbone,
    pub layout: BlockLayout,
    pub experts: Vec<Expert>,
    /// One per block, over `1 + experts.len()` branches.
    pub gates: Vec<Gate>,
    /// Sums of gate probabilities per block and branch, and token count, since the last
    /// [`ModeModel::take_gate_stats`].
    gate_sums: Mutex<(Vec<Vec<f64>>, usize)>,
}

impl ModeModel {
    /// Puts the parts together, checking that they fit.
    pub fn new(
        backbone: Backbone,
        layout: BlockLayout,
        experts: Vec<Expert>,
        gates: Vec<Gate>,
    ) -> Result<Self> {
        if layout.num_layers() != backbone.layers.len() {
            return Err(Error::Layout(format!(
                "the layout covers {} layers, the backbone has {}",
                layout.num_layers(),
                backbone.layers.len()
            )));
        }
        if gates.len() != layout.num_blocks()
            || gates.iter().any(|g| g.num_branches() != experts.len() + 1)
        {
            return Err(Error::Layout(format!(
                "need one gate per block ({}) over {} branches",
                layout.num_blocks(),
                experts.len() + 1
            )));
        }
        for e in &experts {
            if e.blocks.len() != layout.num_blocks()
                || e.blocks
                    .iter()
                    .any(|b| b.len() != layout.expert_layers_per_block)
            {
                return Err(Error::Layout(format!(
                    "expert `{}` does not have the layout's shape",
                    e.name
                )));
            }
        }
        let blocks = layout.num_blocks();
        let branches = experts.len() + 1;
        Ok(Self {
            backbone,
            layout,
            experts,
            gates,
            gate_sums: Mutex::new((vec![vec![0.0; branches]; blocks], 0)),
        })
    }

    /// The engine's training plan: all experts and gates of every block, with which of them
    /// train; the backbone stays frozen.
    pub fn plan(&self, train_experts: bool, train_gates: bool) -> Plan<'_> {
        let blocks = (0..self.layout.num_blocks())
            .map(|b| Block {
                layers: self.layout.block(b),
                experts: self
                    .experts
                    .iter()
                    .map(|e| e.blocks[b].as_slice())
                    .collect(),
                mix: Mix::Gate {
                    weight: &self.gates[b].weight,
                    bias: &self.gates[b].bias,
                },
                train_experts: vec![train_experts; self.experts.len()],
                train_gate: train_gates,
            })
            .collect();
        Plan {
            backbone: Trainable::none(self.backbone.layers.len()),
            blocks,
        }
    }

    /// The tensors that [`Self::plan`] trains, under the names the engine gives their gradients.
    pub fn trainable_tensors(&self, experts: bool, gates: bool) -> Vec<(String, &Tensor)> {
        let mut out = Vec::new();
        if experts {
            for (j, e) in self.experts.iter().enumerate() {
                for (b, layers) in e.blocks.iter().enumerate() {
                    for (l, layer) in layers.iter().enumerate() {
                        out.extend(
                            layer.named_tensors().into_iter().map(|(n, t)| {
                                (format!("blocks.{b}.experts.{j}.layers.{l}.{n}"), t)
                            }),
                        );
                    }
                }
            }
        }
        if gates {
            for (b, g) in self.gates.iter().enumerate() {
                out.push((format!("blocks.{b}.gate.weight"), &g.weight));
                out.push((format!("blocks.{b}.gate.bias"), &g.bias));
            }
        }
        out
    }

    /// Mean gate probability per block and branch over the tokens seen since the last call,
    /// and the token count; resets the sums.
    pub fn take_gate_stats(&self) -> (Vec<Vec<f64>>, usize) {
        let mut g = self.gate_sums.lock().expect("gate stats lock");
        let (sums, n) = std::mem::replace(
            &mut *g,
            (
                vec![vec![0.0; self.experts.len() + 1]; self.layout.num_blocks()],
                0,
            ),
        );
        let means = sums
            .into_iter()
            .map(|row| row.into_iter().map(|s| s / n.max(1) as f64).collect())
            .collect();
        (means, n)
    }

    fn expert_cache_offset(&self, expert: usize, block: usize) -> usize {
        let per_expert = self.layout.num_blocks() * self.layout.expert_layers_per_block;
        self.backbone.layers.len()
            + expert * per_expert
            + block * self.layout.expert_layers_per_block
    }
}

impl CausalLm for ModeModel {
    fn hidden_states(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> mode_model::Result<Tensor> {
        let bb = &self.backbone;
        let (b, t) = ids.dims2()?;
        let start = cache.as_ref().map_or(0, |c| c.len());
        let (cos, sin) = bb.rope.tables(start, t, bb.device())?;
        let mut x = bb.embed(ids)?;
        let mut stats = Vec::with_capacity(self.layout.num_blocks());
        for blk in 0..self.layout.num_blocks() {
            let mut outputs = Vec::with_capacity(self.experts.len() + 1);
            let mut y = x.clone();
            for i in self.layout.block(blk) {
                y = bb.layers[i].forward(
                    &y,
                    &cos,
                    &sin,
                    cache.as_mut().map(|c| &mut c.layers[i]),
                )?;
            }
            outputs.push(y);
            for (j, e) in self.experts.iter().enumerate() {
                let mut y = x.clone();
                let base = self.expert_cache_offset(j, blk);
                for (l, layer) in e.blocks[blk].iter().enumerate() {
                    y = layer.forward(
                        &y,
                        &cos,
                        &sin,
                        cache.as_mut().map(|c| &mut c.layers[base + l]),
                    )?;
                }
                outputs.push(y);
            }
            let gate = &self.gates[blk];
            let lin = mode_model::layers::Linear::new(gate.weight.clone(), Some(gate.bias.clone()));
            let probs = candle_nn::ops::softmax_last_dim(&lin.forward(&x)?)?; // [b, t, branches]
            stats.push(
                probs
                    .sum((0, 1))?
                    .to_dtype(candle_core::DType::F64)?
                    .to_vec1::<f64>()?,
            );
            let mut mixed = outputs[0].broadcast_mul(&probs.i((.., .., 0..1))?)?;
            for (j, out) in outputs.iter().enumerate().skip(1) {
                mixed = (mixed + out.broadcast_mul(&probs.i((.., .., j..j + 1))?)?)?;
            }
            x = mixed;
        }
        let mut g = self.gate_sums.lock().expect("gate stats lock");
        for (row, s) in g.0.iter_mut().zip(stats) {
            row.iter_mut().zip(s).for_each(|(a, b)| *a += b);
        }
        g.1 += b * t;
        Ok(bb.norm.forward(&x)?)
    }

    fn logits(&self, hidden: &Tensor) -> mode_model::Result<Tensor> {
        self.backbone.logits(hidden)
    }

    fn new_cache(&self) -> KvCache {
        let expert_layers =
            self.experts.len() * self.layout.num_blocks() * self.layout.expert_layers_per_block;
        KvCache::new(self.backbone.layers.len() + expert_layers)
    }

    fn device(&self) -> &Device {
        self.backbone.device()
    }
}
