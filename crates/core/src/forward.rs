//! The gated forward of a [`ModeModel`] at inference: one sequence (or a batch sharing one
//! cache) for evaluation and generation, or several sequences packed in one batch, each with
//! its own cache and its own routing, each reading its next tokens (one when decoding, a chunk
//! of its prompt when starting), as a server batching requests runs it. Both go through
//! [`ModeModel::forward_mix`], the one implementation of the mix.

use candle_core::{Device, IndexOp, Module, Tensor};
use mode_model::{CausalLm, DecoderLayer, KvCache, LayerCache, RopeTables};

use crate::{Error, ExpertForm, GateInput, ModeModel, Result, Routing};

/// Where a forward's keys and values go.
enum Caches<'a, 'b> {
    /// The whole batch continues one cache, or none (a full forward).
    Shared(Option<&'a mut KvCache>),
    /// Sequences packed one token per row: the `lens[i]` rows of sequence `i` continue
    /// `caches[i]`.
    Packed {
        caches: &'a mut [&'b mut KvCache],
        lens: &'a [usize],
    },
}

impl Caches<'_, '_> {
    /// Runs `layer` (cache slot `slot`) on `x`: every row, or the rows marked in `rows` when
    /// `x` holds only those (packed sequences only, marked whole).
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
            Caches::Packed { caches, lens } => {
                let mut picked: Vec<&mut LayerCache> = Vec::with_capacity(caches.len());
                let mut picked_lens = Vec::with_capacity(caches.len());
                let mut first = 0;
                for (cache, &len) in caches.iter_mut().zip(lens.iter()) {
                    if rows.is_none_or(|rows| rows[first]) {
                        picked.push(&mut cache.layers[slot]);
                        picked_lens.push(len);
                    }
                    first += len;
                }
                layer.forward_packed(x, rope, &mut picked, &picked_lens)
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
    /// sequence cached in `caches[r]`, run under `routings[r]`. Returns the logits `[rows,
    /// vocab]`; see [`Self::step_packed`].
    pub fn decode_step(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
        routings: &[&Routing],
    ) -> Result<Tensor> {
        let chunks: Vec<&[u32]> = tokens.chunks(1).collect();
        self.step_packed(&chunks, caches, routings)
    }

    /// One step for several sequences packed in one batch: sequence `i` (cached in `caches[i]`,
    /// run under `routings[i]`) reads `chunks[i]`, one token when it is decoding, a part of its
    /// prompt when it is starting. The backbone runs on all tokens in one pass (its weights are
    /// read once for every sequence); each expert runs on the sequences whose routing keeps it,
    /// and each sequence's keys and values go to its own cache. Returns the logits after each
    /// chunk's last token, `[sequences, vocab]`; row `i` is what [`Self::forward_routed`] gives
    /// that sequence alone, up to the rounding of batched matrix products.
    pub fn step_packed(
        &self,
        chunks: &[&[u32]],
        caches: &mut [&mut KvCache],
        routings: &[&Routing],
    ) -> Result<Tensor> {
        if chunks.len() != caches.len()
            || chunks.len() != routings.len()
            || chunks.is_empty()
            || chunks.iter().any(|c| c.is_empty())
        {
            return Err(Error::Layout(format!(
                "a packed step needs one cache and one routing per sequence and at least one token \
                 each, got {} sequences ({} without tokens), {} caches, {} routings",
                chunks.len(),
                chunks.iter().filter(|c| c.is_empty()).count(),
                caches.len(),
                routings.len()
            )));
        }
        for routing in routings {
            routing.check(self.experts.len())?;
        }
        let lens: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
        let ids = Tensor::new(chunks.concat(), self.device())?.unsqueeze(1)?;
        let hidden = self.forward_mix(
            &ids,
            Caches::Packed {
                caches,
                lens: &lens,
            },
            routings,
            None,
        )?;
        let last: Vec<u32> = lens
            .iter()
            .scan(0u32, |end, &len| {
                *end += len as u32;
                Some(*end - 1)
            })
            .collect();
        let hidden = hidden
            .squeeze(1)?
            .index_select(&Tensor::new(last, self.device())?, 0)?;
        Ok(self.backbone.logits(&hidden)?)
    }

    /// The gated mix, block by block: `B(x) + sum_j g_j D_j(x)` (see
    /// `mode_engine::model::Block::residual`), exactly the backbone where every expert's
    /// difference is zero. `routings` holds one routing for the whole batch, or one per packed
    /// sequence.
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
            Caches::Packed { caches, lens } => {
                let positions: Vec<usize> = caches
                    .iter()
                    .zip(lens.iter())
                    .flat_map(|(c, &len)| c.len()..c.len() + len)
                    .collect();
                bb.rope.at_positions(&positions, bb.device())?
            }
        };
        // The rows of each sequence, and which routing each row follows. One sequence's cache
        // cannot skip some of its positions, so an expert runs on all of a sequence's rows or
        // on none.
        let groups: Vec<std::ops::Range<usize>> = match &caches {
            Caches::Shared(_) => std::iter::once(0..b).collect(),
            Caches::Packed { lens, .. } => lens
                .iter()
                .scan(0, |first, &len| {
                    *first += len;
                    Some(*first - len..*first)
                })
                .collect(),
        };
        let mut routing_of = vec![0; b];
        if routings.len() > 1 {
            for (i, rows) in groups.iter().enumerate() {
                routing_of[rows.clone()].fill(i);
            }
        }
        let branches = self.experts.len() + 1;
        let mut x = bb.embed(ids)?;
        let mut stats = Vec::with_capacity(self.layout.num_blocks());
        for blk in 0..self.layout.num_blocks() {
            let gate = &self.gates[blk];
            let lin = mode_model::layers::Linear::new(gate.weight.clone(), Some(gate.bias.clone()));
            let u = match gate.input {
                GateInput::Raw => x.clone(),
                GateInput::Normalized => {
                    let rows = x.reshape((b * t, x.dim(2)?))?;
                    mode_engine::ops::gate_input(&rows, true)?
                        .0
                        .reshape(x.shape())?
                }
            };
            let mut probs = candle_nn::ops::softmax_last_dim(&lin.forward(&u)?)?; // [b, t, branches]
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
                    routings[routing_of[row]].apply(token);
                    for (j, w) in token.iter().skip(1).enumerate() {
                        runs[j][row] |= *w > 0.0;
                    }
                }
                for rows in runs.iter_mut() {
                    for group in &groups {
                        let any = rows[group.clone()].iter().any(|&r| r);
                        rows[group.clone()].fill(any);
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
