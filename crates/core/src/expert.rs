//! Experts and gates.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use mode_model::{random_weights, Backbone, DecoderLayer, Weights};

use crate::{BlockLayout, Result};

/// How a new expert's layers start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertInit {
    /// Random, scaled as the backbone was initialised (std 0.02, norm scales 1).
    Random,
    /// Copies of the backbone's layers of the same block (the first `expert_layers_per_block`).
    Copy,
    /// Copies whose output projections (attention `o_proj`, MLP `down_proj`) are zero, in the
    /// [`ExpertForm::Residual`] form: each layer starts as the identity, so the expert's branch
    /// equals the backbone's and the model is the backbone at step 0 whatever the gates say.
    Preserve,
}

impl ExpertInit {
    /// The form an expert started this way runs in.
    pub fn form(self) -> ExpertForm {
        match self {
            Self::Random | Self::Copy => ExpertForm::Replace,
            Self::Preserve => ExpertForm::Residual,
        }
    }

    /// The name `--init` takes and expert files record.
    pub fn name(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::Copy => "copy",
            Self::Preserve => "preserve",
        }
    }
}

impl std::str::FromStr for ExpertInit {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        [Self::Random, Self::Copy, Self::Preserve]
            .into_iter()
            .find(|i| i.name() == s)
            .ok_or_else(|| format!("`{s}` is not one of random, copy, preserve"))
    }
}

/// What an expert's branch of a block outputs, from the block input `x`, the backbone block's
/// output `B(x)` and the expert's layers `L(x)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpertForm {
    /// `L(x)`: the expert's layers stand in for the block (the paper's form).
    #[default]
    Replace,
    /// `B(x) + L(x) - x`: what the expert's layers add to their input is added to the block's
    /// output, so the branch is a correction of the backbone. The mix is then
    /// `B(x) + sum_j g_j (L_j(x) - x)`.
    Residual,
}

/// A domain expert: `expert_layers_per_block` decoder layers for every block.
pub struct Expert {
    pub name: String,
    /// `blocks[i]` runs beside backbone block `i`.
    pub blocks: Vec<Vec<DecoderLayer>>,
    pub form: ExpertForm,
}

/// The backbone layer that expert layer `l` of block `b` mirrors: the one it is copied from, and
/// whose kind of attention (global or sliding window) it has.
fn mirrored_layer(layout: &BlockLayout, b: usize, l: usize) -> usize {
    let block = layout.block(b);
    block.start + l.min(block.len() - 1)
}

impl Expert {
    /// A new expert for `layout` over `backbone`, deterministic in `seed`.
    pub fn new(
        name: &str,
        backbone: &Backbone,
        layout: &BlockLayout,
        init: ExpertInit,
        seed: u64,
    ) -> Result<Self> {
        let dtype = backbone.embed_tokens.dtype();
        let device = backbone.device();
        let mut blocks = Vec::new();
        for b in 0..layout.num_blocks() {
            let mut layers = Vec::new();
            for l in 0..layout.expert_layers_per_block {
                let layer = match init {
                    ExpertInit::Copy | ExpertInit::Preserve => {
                        let src = mirrored_layer(layout, b, l);
                        let mut layer = backbone.layers[src].deep_copy()?;
                        if init == ExpertInit::Preserve {
                            layer.zero_output_projections()?;
                        }
                        layer
                    }
                    ExpertInit::Random => {
                        let mut config = backbone.config.clone();
                        config.num_hidden_layers = 1;
                        let w = random_weights(
                            &config,
                            seed.wrapping_mul(1000).wrapping_add((b * 100 + l) as u64),
                        );
                        let window = backbone.config.layer_window(mirrored_layer(layout, b, l));
                        DecoderLayer::load(&config, &w, "model.layers.0", window, dtype, device)?
                    }
                };
                layers.push(layer);
            }
            blocks.push(layers);
        }
        Ok(Self {
            name: name.to_string(),
            blocks,
            form: init.form(),
        })
    }

    /// The expert's tensors as `blocks.{b}.layers.{l}.{param}`.
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out = Vec::new();
        for (b, layers) in self.blocks.iter().enumerate() {
            for (l, layer) in layers.iter().enumerate() {
                out.extend(
                    layer
                        .named_tensors()
                        .into_iter()
                        .map(|(n, t)| (format!("blocks.{b}.layers.{l}.{n}"), t)),
                );
            }
        }
        out
    }

    /// Rebuilds an expert from tensors named as [`Self::named_tensors`] does.
    pub fn from_tensors(
        name: &str,
        form: ExpertForm,
        backbone: &Backbone,
        layout: &BlockLayout,
        tensors: &HashMap<String, Tensor>,
        label: &std::path::Path,
    ) -> Result<Self> {
        let dtype = backbone.adapter_dtype();
        let mut blocks = Vec::new();
        for b in 0..layout.num_blocks() {
            let mut layers = Vec::new();
            for l in 0..layout.expert_layers_per_block {
                let prefix = format!("blocks.{b}.layers.{l}.");
                // Rename to the decoder layer's own names so the backbone's loader checks shapes.
                let map: HashMap<String, Tensor> = tensors
                    .iter()
                    .filter_map(|(k, v)| {
                        k.strip_prefix(&prefix)
                            .map(|r| (format!("model.layers.0.{r}"), v.clone()))
                    })
                    .collect();
                let w = Weights::Map {
                    tensors: map,
                    label: label.to_path_buf(),
                };
                let mut config = backbone.config.clone();
                config.num_hidden_layers = 1;
                let window = backbone.config.layer_window(mirrored_layer(layout, b, l));
                let device = backbone.device();
                let layer =
                    DecoderLayer::load(&config, &w, "model.layers.0", window, dtype, device)
                        .map_err(|e| file_names(e, &prefix))?;
                layers.push(layer);
            }
            blocks.push(layers);
        }
        Ok(Self {
            name: name.to_string(),
            blocks,
            form,
        })
    }

    /// Keeps the expert's f32 matrices transposed in panels too ([`mode_model::packed`]):
    /// batched decoding multiplies them faster, at a second copy of the weights. For experts
    /// loaded to run, not to train (the copy does not follow training).
    pub fn pack_for_inference(&mut self) -> Result<()> {
        for layer in self.blocks.iter_mut().flatten() {
            for (_, linear) in layer.linears_mut() {
                linear.pack()?;
            }
        }
        Ok(())
    }

    pub fn num_parameters(&self) -> usize {
        self.named_tensors()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum()
    }
}

/// An error about a layer loaded under the decoder's own names, with the tensor named as the
/// expert file names it (`blocks.{b}.layers.{l}.…`).
fn file_names(mut e: mode_model::Error, prefix: &str) -> crate::Error {
    let rename = |name: &mut String| {
        if let Some(rest) = name.strip_prefix("model.layers.0.") {
            *name = format!("{prefix}{rest}");
        }
    };
    match &mut e {
        mode_model::Error::Io(mode_io::Error::MissingTensor { name, .. })
        | mode_model::Error::Shape { name, .. }
        | mode_model::Error::NonFinite { name, .. } => rename(name),
        _ => {}
    }
    e.into()
}

/// What a gate reads from its block's input `x`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GateInput {
    /// `x` as it is (the paper's gate).
    #[default]
    Raw,
    /// `x / rms(x)` per token, without a scale ([`mode_engine::ops::gate_input`]): every
    /// block's gate reads rows of one scale, however large the residual stream has grown.
    Normalized,
}

impl GateInput {
    /// The name `--gate-input` takes and files record.
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Normalized => "normalized",
        }
    }

    pub(crate) fn normalizes(self) -> bool {
        self == Self::Normalized
    }
}

impl std::str::FromStr for GateInput {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        [Self::Raw, Self::Normalized]
            .into_iter()
            .find(|i| i.name() == s)
            .ok_or_else(|| format!("`{s}` is not one of raw, normalized"))
    }
}

/// A block's gate: `softmax(W u + b)` over `[backbone, expert_1, ..., expert_N]`, where `u` is
/// the block input as [`Gate::input`] says.
pub struct Gate {
    pub weight: Tensor,
    pub bias: Tensor,
    pub input: GateInput,
}

/// Default initial probability of the backbone branch in a fresh gate.
pub const GATE_INIT_BACKBONE_PROB: f64 = 0.9;

impl Gate {
    /// A fresh gate over `experts` experts on the raw block input (see [`Self::reading`]):
    /// zero weights (every token alike) and a bias that gives the backbone `backbone_prob` and
    /// the experts the rest, equally. With a high `backbone_prob` training starts close to the
    /// backbone's behaviour while the experts still get gradient.
    pub fn new(
        hidden: usize,
        experts: usize,
        backbone_prob: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if !(backbone_prob > 0.0 && backbone_prob < 1.0) {
            return Err(crate::Error::Layout(format!(
                "the gate's initial backbone probability must be in (0, 1), got {backbone_prob}"
            )));
        }
        let p_expert = (1.0 - backbone_prob) / experts.max(1) as f64;
        let mut bias = vec![(backbone_prob / p_expert).ln()];
        bias.extend(std::iter::repeat_n(0.0, experts));
        Ok(Self {
            weight: Tensor::zeros((experts + 1, hidden), dtype, device)?,
            bias: Tensor::from_vec(bias, experts + 1, device)?.to_dtype(dtype)?,
            input: GateInput::Raw,
        })
    }

    /// The same weights reading `input`. With the zero weights of [`Self::new`] the gate's
    /// output does not change; trained weights mean something only for the input they were
    /// trained on.
    pub fn reading(self, input: GateInput) -> Self {
        Self { input, ..self }
    }

    /// A gate over N experts built from their N stage-1 gates (each over `[backbone, expert_j]`):
    /// the backbone row is the mean of the stage-1 backbone rows, expert `j`'s row is its own
    /// stage-1 row. Each expert's logit relative to the backbone thus starts near what it
    /// learned in stage 1. The backbone's share then shrinks as experts are added (two
    /// experts that each gave it 0.9 leave it 0.82); with `keep_backbone_prior` its bias gains
    /// `ln N`, so that where the experts agree the backbone keeps its stage-1 odds against all of
    /// them together (0.9 again). The stage-1 gates must read the same input.
    pub fn from_stage1(stage1: &[&Gate], keep_backbone_prior: bool) -> Result<Self> {
        if stage1.is_empty() || stage1.iter().any(|g| g.num_branches() != 2) {
            return Err(crate::Error::Layout(
                "stage-1 gates must each have two branches (backbone, expert)".into(),
            ));
        }
        let input = stage1[0].input;
        if let Some(other) = stage1.iter().find(|g| g.input != input) {
            return Err(crate::Error::Layout(format!(
                "the experts' stage-1 gates read different inputs ({} and {}): gates trained on \
                 one cannot be combined with gates trained on the other",
                input.name(),
                other.input.name()
            )));
        }
        let n = stage1.len() as f64;
        let mean_row = |f: fn(&Gate) -> &Tensor| -> Result<Tensor> {
            let rows = stage1
                .iter()
                .map(|g| f(g).narrow(0, 0, 1))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok((Tensor::cat(&rows, 0)?.sum_keepdim(0)? / n)?)
        };
        let mut weights = vec![mean_row(|g| &g.weight)?];
        let prior = if keep_backbone_prior { n.ln() } else { 0.0 };
        let mut biases = vec![(mean_row(|g| &g.bias)? + prior)?];
        for g in stage1 {
            weights.push(g.weight.narrow(0, 1, 1)?);
            biases.push(g.bias.narrow(0, 1, 1)?);
        }
        Ok(Self {
            weight: Tensor::cat(&weights, 0)?.contiguous()?,
            bias: Tensor::cat(&biases, 0)?.contiguous()?,
            input,
        })
    }

    pub fn num_branches(&self) -> usize {
        self.bias.dims()[0]
    }
}
