//! The gated forward of a [`ModeModel`] at inference: one sequence (or a batch sharing one
//! cache) for evaluation and generation, or a batched decode step where every row is its own
//! sequence with its own cache and its own routing, as a server batching requests runs it.
//! Both go through [`ModeModel::forward_mix`], the one implementation of the mix.

use candle_core::{Device, IndexOp, Module, Tensor};
use mode_model::{CausalLm, DecoderLayer, KvCache, LayerCache, RopeTables};

use crate::{Error, ExpertForm, ModeModel, Result, Routing};

/// Where a forward's keys and values go.
enum Caches<'a, 'b> {
    /// The whole batch continues one cache, or none (a full forward).
    Shared(Option<&'a mut KvCache>),
    /// A batched decode step: row `r` continues `caches[r]`.
    PerRow(&'a mut [&'b mut KvCache]),
}

impl Caches<'_, '_> {
    /// Runs `layer` (cache slot `slot`) on `x`: every row, or the rows marked in `rows` when
    /// `x` holds only those (per-row caches only).
    fn run_layer(
        &mut self,
        layer: &DecoderLayer,
        slot: usize,
        x: &Tensor,
        rope: &RopeTables,
        rows: Option<&[bool]>,
    ) -> mode_model::Result<Tensor> {
        match self {
            Caches::Shared(cache) => {
                layer.forward(x, rope, cache.as_mut().map(|c| &mut c.layers[slot]))
            }
            Caches::PerRow(caches) => {
                let mut picked: Vec<&mut LayerCache> = caches
                    .iter_mut()
                    .enumerate()
                    .filter(|(r, _)| rows.is_none_or(|rows| rows[*r]))
                    .map(|(_, c)| &mut c.layers[slot])
                    .collect();
                layer.forward_rows(x, rope, &mut picked)
            }
        }
    }
}

impl ModeModel {
    /// This model under `routing`, as a [`CausalLm`] for evaluation or generation.
    pub fn routed(&self, routing: Routing) -> Result<Routed<'_>> {
        routing.check(self.experts.len())?;
        Ok(Routed {
            model: self,
            routing,
        })
    }

    /// The forward pass under `routing`: normalised hidden states `[batch, seq, hidden]`. With
    /// `trace`, the gate weights each block used (`[batch, seq, 1 + experts]`, after routing) are
    /// pushed onto it, one tensor per block.
    pub fn forward_routed(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        routing: &Routing,
        trace: Option<&mut Vec<Tensor>>,
    ) -> mode_model::Result<Tensor> {
        self.forward_mix(ids, Caches::Shared(cache), &[routing], trace)
    }

    /// One decode step for several sequences at once: `tokens[r]` is the next token of the
    /// sequence cached in `caches[r]`, run under `routings[r]`. The backbone runs on all rows in
    /// one pass (its weights are read once for every sequence); each expert runs on the rows
    /// whose routing keeps it, and each row's keys and values go to its own cache. Returns the
    /// logits `[rows, vocab]`; row `r` is what [`Self::forward_routed`] gives that sequence
    /// alone, up to the rounding of batched matrix products.
    pub fn decode_step(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
        routings: &[&Routing],
    ) -> Result<Tensor> {
        if tokens.len() != caches.len() || tokens.len() != routings.len() || tokens.is_empty() {
            return Err(Error::Layout(format!(
                "a decode step needs one cache and one routing per token, got {} tokens, {} caches, {} routings",
                tokens.len(),
                caches.len(),
                routings.len()
            )));
        }
        for routing in routings {
            routing.check(self.experts.len())?;
        }
        let ids = Tensor::new(tokens, self.device())?.unsqueeze(1)?;
        let hidden = self.forward_mix(&ids, Caches::PerRow(caches), routings, None)?;
        Ok(self.backbone.logits(&hidden.squeeze(1)?)?)
    }

    /// The gated mix, block by block: `B(x) + sum_j g_j D_j(x)` (see
    /// `mode_engine::model::Block::residual`), exactly the backbone where every expert's
    /// difference is zero. `routings` holds one routing for the whole batch or one per row.
    fn forward_mix(
        &self,
        ids: &Tensor,
        mut caches: Caches<'_, '_>,
        routings: &[&Routing],
        mut trace: Option<&mut Vec<Tensor>>,
    ) -> mode_model::Result<Tensor> {
        let bb = &self.backbone;
        let (b, t) = ids.dims2()?;
        let rope = match &caches {
            Caches::Shared(cache) => {
                bb.rope
                    .tables(cache.as_ref().map_or(0, |c| c.len()), t, bb.device())?
            }
            Caches::PerRow(caches) => {
                let positions: Vec<usize> = caches.iter().map(|c| c.len()).collect();
                bb.rope.at_positions(&positions, bb.device())?
            }
        };
        // One sequence's cache cannot skip some of its rows, so with a shared cache an expert
        // runs on every row or none.
        let per_row = matches!(caches, Caches::PerRow(_));
        let branches = self.experts.len() + 1;
        let mut x = bb.embed(ids)?;
        let mut stats = Vec::with_capacity(self.layout.num_blocks());
        for blk in 0..self.layout.num_blocks() {
            let gate = &self.gates[blk];
            let lin = mode_model::layers::Linear::new(gate.weight.clone(), Some(gate.bias.clone()));
            let mut probs = candle_nn::ops::softmax_last_dim(&lin.forward(&x)?)?; // [b, t, branches]
                                                                                  // runs[j][r]: expert j runs on row r.
            let mut runs = vec![vec![true; b]; self.experts.len()];
            if !routings.iter().all(|r| r.is_dense()) {
                let mut p = probs
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                runs.iter_mut().for_each(|rows| rows.fill(false));
                for (k, token) in p.chunks_mut(branches).enumerate() {
                    let row = k / t;
                    routings[if routings.len() == 1 { 0 } else { row }].apply(token);
                    for (j, w) in token.iter().skip(1).enumerate() {
                        runs[j][row] |= *w > 0.0;
                    }
                }
                if !per_row {
                    for rows in runs.iter_mut() {
                        let any = rows.iter().any(|&r| r);
                        rows.fill(any);
                    }
                }
                probs = Tensor::from_vec(p, (b, t, branches), x.device())?.to_dtype(x.dtype())?;
            }
            stats.push(
                probs
                    .sum((0, 1))?
                    .to_dtype(candle_core::DType::F64)?
                    .to_vec1::<f64>()?,
            );
            let mut block_out = x.clone();
            for i in self.layout.block(blk) {
                block_out = caches.run_layer(&bb.layers[i], i, &block_out, &rope, None)?;
            }
            let mut mixed = block_out.clone();
            for (j, e) in self.experts.iter().enumerate() {
                let rows = &runs[j];
                let count = rows.iter().filter(|&&r| r).count();
                if count == 0 {
                    continue;
                }
                let weight = probs.i((.., .., j + 1..j + 2))?;
                let base = self.expert_cache_offset(j, blk);
                // Gather the rows that run this expert, compute, scatter their share back.
                let subset = if count < b {
                    let idx: Vec<u32> = (0..b as u32).filter(|&r| rows[r as usize]).collect();
                    let idx = Tensor::new(idx, x.device())?;
                    Some((
                        idx.clone(),
                        rope.select_rows(&idx)?,
                        x.index_select(&idx, 0)?,
                        block_out.index_select(&idx, 0)?,
                        probs.index_select(&idx, 0)?.i((.., .., j + 1..j + 2))?,
                    ))
                } else {
                    None
                };
                let (xs, rope_s, out_s, weight_s) = match &subset {
                    Some((_, rope, x, out, w)) => (x, rope, out, w),
                    None => (&x, &rope, &block_out, &weight),
                };
                let mut y = xs.clone();
                for (l, layer) in e.blocks[blk].iter().enumerate() {
                    let marked = subset.as_ref().map(|_| rows.as_slice());
                    y = caches.run_layer(layer, base + l, &y, rope_s, marked)?;
                }
                let delta = match e.form {
                    ExpertForm::Residual => (y - xs)?,
                    ExpertForm::Replace => (y - out_s)?,
                };
                let share = delta.broadcast_mul(weight_s)?;
                mixed = match &subset {
                    Some((idx, ..)) => mixed.index_add(idx, &share, 0)?,
                    None => (mixed + share)?,
                };
            }
            if let Some(trace) = trace.as_mut() {
                trace.push(probs);
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
}

impl CausalLm for ModeModel {
    fn hidden_states(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> mode_model::Result<Tensor> {
        self.forward_routed(ids, cache, &Routing::default(), None)
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

/// A [`ModeModel`] under a [`Routing`]: what generation and evaluation run when experts are
/// chosen per request or gated sparsely.
pub struct Routed<'a> {
    pub model: &'a ModeModel,
    pub routing: Routing,
}

impl CausalLm for Routed<'_> {
    fn hidden_states(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> mode_model::Result<Tensor> {
        self.model.forward_routed(ids, cache, &self.routing, None)
    }

    fn logits(&self, hidden: &Tensor) -> mode_model::Result<Tensor> {
        self.model.logits(hidden)
    }

    fn new_cache(&self) -> KvCache {
        self.model.new_cache()
    }

    fn device(&self) -> &Device {
        self.model.device()
    }
}
