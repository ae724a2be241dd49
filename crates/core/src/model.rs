//! The MoDE model: backbone blocks, experts beside them, gates mixing them.

use std::path::Path;
use std::sync::Mutex;

use candle_core::Tensor;
use mode_engine::model::{Block, Mix, Plan, Trainable};
use mode_model::Backbone;

use crate::file::ExpertDims;
use crate::{BlockLayout, Error, Expert, ExpertFile, ExpertForm, Gate, GateInput, Result};

/// A backbone with experts and per-block gates.
pub struct ModeModel {
    pub backbone: Backbone,
    pub layout: BlockLayout,
    pub experts: Vec<Expert>,
    /// One per block, over `1 + experts.len()` branches.
    pub gates: Vec<Gate>,
    /// Sums of gate probabilities per block and branch, and token count, since the last
    /// [`ModeModel::take_gate_stats`].
    pub(crate) gate_sums: Mutex<(Vec<Vec<f64>>, usize)>,
}

impl ModeModel {
    /// Checks that the parts of a model fit together: what [`Self::new`] refuses.
    pub fn check_parts(
        backbone: &Backbone,
        layout: &BlockLayout,
        experts: &[Expert],
        gates: &[Gate],
    ) -> Result<()> {
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
        for e in experts {
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
        Ok(())
    }

    /// Puts the parts together, checking that they fit.
    pub fn new(
        backbone: Backbone,
        layout: BlockLayout,
        experts: Vec<Expert>,
        gates: Vec<Gate>,
    ) -> Result<Self> {
        Self::check_parts(&backbone, &layout, &experts, &gates)?;
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

    /// The backbone with no experts: one block over all layers, whose one-branch gate gives the
    /// backbone weight exactly 1, so the output is the backbone's own. Experts can then be added
    /// with [`Self::add_expert_file`]; the first one brings its layout.
    pub fn bare(backbone: Backbone) -> Result<Self> {
        let layers = backbone.layers.len();
        let layout = BlockLayout::explicit(vec![0, layers], layers, 1)?;
        let (hidden, dtype, device) = (
            backbone.config.hidden_size,
            backbone.adapter_dtype(),
            backbone.device().clone(),
        );
        let gate = Gate {
            weight: Tensor::zeros((1, hidden), dtype, &device)?,
            bias: Tensor::zeros(1, dtype, &device)?,
            input: GateInput::Raw,
        };
        Self::new(backbone, layout, Vec::new(), vec![gate])
    }

    /// Adds the expert in a stage-1 expert file, checked against this backbone (its
    /// `backbone_fingerprint`) and, when the model has experts, against their layout; named
    /// `name` or after the file's domain. A model without experts takes the file's layout and
    /// stage-1 gates as they are; otherwise see [`Self::add_expert`]. The expert is loaded to
    /// run ([`Expert::pack_for_inference`]). Nothing changes when it fails. Returns the expert's
    /// name.
    pub fn add_expert_file(
        &mut self,
        file: &ExpertFile,
        path: &Path,
        backbone_fingerprint: &str,
        name: Option<&str>,
    ) -> Result<String> {
        let dims = ExpertDims::of(&self.backbone.config);
        let layout = (!self.experts.is_empty()).then_some(&self.layout);
        file.check_compatible(path, backbone_fingerprint, &dims, layout)?;
        let mut expert = file.expert(&self.backbone, path)?;
        expert.pack_for_inference()?;
        if let Some(name) = name {
            mode_io::names::check_name(name).map_err(|msg| Error::File {
                path: path.to_path_buf(),
                msg: format!("the expert's name: {msg}"),
            })?;
            expert.name = name.to_string();
        }
        let name = expert.name.clone();
        let gates = file.gates(path)?;
        if self.experts.is_empty() {
            let layout = file.meta.layout.clone();
            let experts = vec![expert];
            Self::check_parts(&self.backbone, &layout, &experts, &gates)?;
            (self.layout, self.experts, self.gates) = (layout, experts, gates);
            self.reset_gate_stats();
        } else {
            self.add_expert(expert, &gates)?;
        }
        Ok(name)
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
                residual: self
                    .experts
                    .iter()
                    .map(|e| e.form == ExpertForm::Residual)
                    .collect(),
                mix: Mix::Gate {
                    weight: &self.gates[b].weight,
                    bias: &self.gates[b].bias,
                    normalize_input: self.gates[b].input.normalizes(),
                },
                train_experts: vec![train_experts; self.experts.len()],
                train_gate: train_gates,
            })
            .collect();
        Plan {
            backbone: Trainable::none(self.backbone.layers.len()),
            blocks,
            recompute_activations: false,
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
                            layer
                                .named_tensors()
                                .into_iter()
                                .map(|(n, t)| (mode_engine::names::expert_tensor(b, j, l, &n), t)),
                        );
                    }
                }
            }
        }
        if gates {
            for (b, g) in self.gates.iter().enumerate() {
                out.push((mode_engine::names::gate_weight(b), &g.weight));
                out.push((mode_engine::names::gate_bias(b), &g.bias));
            }
        }
        out
    }

    /// Whether `name`, as [`Self::trainable_tensors`] names tensors, is a gate's.
    pub fn is_gate_tensor(name: &str) -> bool {
        mode_engine::names::is_gate(name)
    }

    /// Mean gate probability per block and branch over the tokens seen since the last call,
    /// and the token count; resets the sums.
    pub fn take_gate_stats(&self) -> (Vec<Vec<f64>>, usize) {
        let mut g = self.gate_sums.lock().expect("gate stats lock");
        let (sums, n) = std::mem::replace(&mut *g, self.zero_gate_sums());
        let means = sums
            .into_iter()
            .map(|row| row.into_iter().map(|s| s / n.max(1) as f64).collect())
            .collect();
        (means, n)
    }

    /// Indices of the experts called `names`, in order; an unknown name is an error that lists
    /// the experts there are.
    pub fn expert_indices(&self, names: &[String]) -> Result<Vec<usize>> {
        names
            .iter()
            .map(|n| {
                self.experts
                    .iter()
                    .position(|e| &e.name == n)
                    .ok_or_else(|| {
                        Error::Layout(format!(
                            "no expert `{n}`; the model has: {}",
                            self.expert_names().join(", ")
                        ))
                    })
            })
            .collect()
    }

    /// The experts' names, in gate order.
    pub fn expert_names(&self) -> Vec<String> {
        self.experts.iter().map(|e| e.name.clone()).collect()
    }

    /// Adds an expert trained in stage 1 alone, with its stage-1 gates (`[backbone, expert]`
    /// per block). Each gate gains a row that gives the new expert, against the backbone, the
    /// log-odds it learned in stage 1: `row = backbone_row + (stage1_expert_row -
    /// stage1_backbone_row)`; the other rows stay as they are. The stage-1 gates must read the
    /// input the model's gates read (a model without experts takes theirs).
    pub fn add_expert(&mut self, expert: Expert, stage1_gates: &[Gate]) -> Result<()> {
        if self.experts.iter().any(|e| e.name == expert.name) {
            return Err(Error::Layout(format!(
                "the model already has an expert `{}`",
                expert.name
            )));
        }
        let blocks = self.layout.num_blocks();
        if stage1_gates.len() != blocks || stage1_gates.iter().any(|g| g.num_branches() != 2) {
            return Err(Error::Layout(format!(
                "expert `{}` needs {blocks} stage-1 gates over [backbone, expert]",
                expert.name
            )));
        }
        for (gate, s1) in self.gates.iter().zip(stage1_gates) {
            if gate.num_branches() > 1 && gate.input != s1.input {
                return Err(Error::Layout(format!(
                    "expert `{}`'s gates read the {} block input, this model's gates the {} one: \
                     an expert trained with `--gate-input {}` cannot join them",
                    expert.name,
                    s1.input.name(),
                    gate.input.name(),
                    s1.input.name()
                )));
            }
        }
        if expert.blocks.len() != blocks
            || expert
                .blocks
                .iter()
                .any(|b| b.len() != self.layout.expert_layers_per_block)
        {
            return Err(Error::Layout(format!(
                "expert `{}` does not have the model's block layout",
                expert.name
            )));
        }
        let mut gates = Vec::with_capacity(blocks);
        for (gate, s1) in self.gates.iter().zip(stage1_gates) {
            let row = |t: &Tensor, s1t: &Tensor| -> Result<Tensor> {
                let dtype = t.dtype();
                let log_odds = (s1t.narrow(0, 1, 1)? - s1t.narrow(0, 0, 1)?)?.to_dtype(dtype)?;
                Ok(Tensor::cat(&[t, &(t.narrow(0, 0, 1)? + log_odds)?], 0)?.contiguous()?)
            };
            gates.push(Gate {
                weight: row(&gate.weight, &s1.weight)?,
                bias: row(&gate.bias.unsqueeze(1)?, &s1.bias.unsqueeze(1)?)?.squeeze(1)?,
                input: s1.input,
            });
        }
        self.gates = gates;
        self.experts.push(expert);
        self.reset_gate_stats();
        Ok(())
    }

    /// Removes the expert called `name` and its gate rows; the others keep their weights, so
    /// the remaining mix is the old one renormalised without it.
    pub fn remove_expert(&mut self, name: &str) -> Result<Expert> {
        let j = self.expert_indices(&[name.to_string()])?[0];
        let mut gates = Vec::with_capacity(self.gates.len());
        for gate in &self.gates {
            let drop_row = |t: &Tensor| -> Result<Tensor> {
                let n = t.dims()[0];
                let before = t.narrow(0, 0, j + 1)?;
                if j + 2 == n {
                    return Ok(before);
                }
                Ok(Tensor::cat(&[&before, &t.narrow(0, j + 2, n - j - 2)?], 0)?.contiguous()?)
            };
            gates.push(Gate {
                weight: drop_row(&gate.weight)?,
                bias: drop_row(&gate.bias)?,
                input: gate.input,
            });
        }
        self.gates = gates;
        let expert = self.experts.remove(j);
        self.reset_gate_stats();
        Ok(expert)
    }

    fn reset_gate_stats(&self) {
        *self.gate_sums.lock().expect("gate stats lock") = self.zero_gate_sums();
    }

    /// Empty gate-weight sums for the current blocks and branches.
    fn zero_gate_sums(&self) -> (Vec<Vec<f64>>, usize) {
        (
            vec![vec![0.0; self.experts.len() + 1]; self.layout.num_blocks()],
            0,
        )
    }

    pub(crate) fn expert_cache_offset(&self, expert: usize, block: usize) -> usize {
        let per_expert = self.layout.num_blocks() * self.layout.expert_layers_per_block;
        self.backbone.layers.len()
            + expert * per_expert
            + block * self.layout.expert_layers_per_block
    }
}
