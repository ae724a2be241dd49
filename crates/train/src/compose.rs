//! Stage 2 of MoDE: N stage-1 experts in one model with N+1-way gates, tuned briefly on mixed
//! data (gates only, or gates and experts). Produces a composed-model folder.

use std::path::Path;

use mode_core::composed::{ComposedManifest, COMPOSED_FORMAT_VERSION};
use mode_core::file::ExpertDims;
use mode_core::{Gate, GateInput, LoadedExpertFile, ModeModel};
use mode_data::DataMix;
use mode_model::Backbone;

use crate::methods::ModeTraining;
use crate::stage1::{check_tokenizer, side_paths};
use crate::trainer::{train, Error, Event, TrainConfig, TrainReport};

/// How the composed gates start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateInit {
    /// Zero weights; the backbone gets `gate_init_backbone_prob`, the experts share the rest.
    Fresh,
    /// From each expert's stage-1 gates (see [`Gate::from_stage1`]).
    Stage1,
}

impl std::str::FromStr for GateInit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fresh" => Ok(Self::Fresh),
            "stage1" => Ok(Self::Stage1),
            other => Err(format!("`{other}` is not one of fresh, stage1")),
        }
    }
}

/// What stage 2 trains.
#[derive(Debug, Clone)]
pub struct ComposeOptions {
    /// Train the gates only; the experts stay as stage 1 left them.
    pub freeze_experts: bool,
    pub gate_init: GateInit,
    pub gate_init_backbone_prob: f64,
    /// With [`GateInit::Stage1`]: the backbone keeps its stage-1 odds against the experts
    /// together instead of being diluted by each one added (see [`Gate::from_stage1`]).
    pub keep_backbone_prior: bool,
    /// The gates' learning rate relative to `train.lr`.
    pub gate_lr_scale: f64,
    /// What the composed gates read; `None`: what the experts' stage-1 gates read. With
    /// [`GateInit::Stage1`] it must be that.
    pub gate_input: Option<GateInput>,
    pub train: TrainConfig,
}

/// Composes `experts` over `backbone`, tunes on `data`, and writes the folder `out`. A
/// checkpoint folder and a metrics file live next to it (`NAME.ckpt`, `NAME.metrics.jsonl`);
/// an existing checkpoint is resumed.
#[allow(clippy::too_many_arguments)]
pub fn compose(
    backbone: Backbone,
    backbone_source: &str,
    tokenizer_fingerprint: &str,
    experts: Vec<LoadedExpertFile>,
    data: &DataMix,
    opts: &ComposeOptions,
    out: &Path,
    on_event: impl FnMut(Event) -> bool,
) -> Result<(Option<ComposedManifest>, TrainReport), Error> {
    check_tokenizer(data, tokenizer_fingerprint, backbone_source)?;
    let p = opts.gate_init_backbone_prob;
    if !(p > 0.0 && p < 1.0) {
        return Err(Error::Data(format!(
            "--gate-init-backbone-prob must be in (0, 1), got {p}"
        )));
    }
    let Some(first) = experts.first() else {
        return Err(Error::Data("compose needs at least one --expert".into()));
    };
    let layout = first.file.meta.layout.clone();
    let fingerprint = backbone.fingerprint()?;
    let dims = ExpertDims::of(&backbone.config);
    let mut layers = Vec::with_capacity(experts.len());
    for (j, e) in experts.iter().enumerate() {
        e.file
            .check_compatible(&e.path, &fingerprint, &dims, Some(&layout))?;
        let name = &e.file.meta.domain;
        if let Some(other) = experts[..j].iter().find(|o| &o.file.meta.domain == name) {
            return Err(Error::Data(format!(
                "{} and {} are both experts for `{name}`; a composed model needs distinct domains",
                other.path.display(),
                e.path.display()
            )));
        }
        layers.push(e.file.expert(&backbone, &e.path)?);
    }
    let gate_input = composed_gate_input(&experts, opts)?;
    let dtype = backbone.embed_tokens.dtype();
    let gates = (0..layout.num_blocks())
        .map(|b| match opts.gate_init {
            GateInit::Fresh => Gate::new(
                backbone.config.hidden_size,
                experts.len(),
                opts.gate_init_backbone_prob,
                dtype,
                backbone.device(),
            )
            .map(|g| g.reading(gate_input)),
            GateInit::Stage1 => {
                let stage1 = experts
                    .iter()
                    .map(|e| e.file.gates(&e.path))
                    .collect::<mode_core::Result<Vec<_>>>()?;
                let block: Vec<&Gate> = stage1.iter().map(|g| &g[b]).collect();
                let g = Gate::from_stage1(&block, opts.keep_backbone_prior)?;
                Ok(Gate {
                    weight: g.weight.to_dtype(dtype)?,
                    bias: g.bias.to_dtype(dtype)?,
                    input: g.input,
                })
            }
        })
        .collect::<mode_core::Result<Vec<_>>>()?;
    let model = ModeModel::new(backbone, layout.clone(), layers, gates)?;
    let (ckpt, metrics) = side_paths(out);
    let method = ModeTraining {
        model: &model,
        experts: !opts.freeze_experts,
        gates: true,
        gate_lr_scale: opts.gate_lr_scale,
    };
    let report = train(&method, data, &opts.train, &ckpt, &metrics, on_event)?;
    if report.steps < opts.train.steps {
        // Stopped early: the checkpoint stays for a rerun to resume; no folder yet.
        return Ok((None, report));
    }
    let manifest = ComposedManifest {
        format_version: COMPOSED_FORMAT_VERSION,
        kind: "mode".into(),
        backbone_source: backbone_source.to_string(),
        backbone_fingerprint: fingerprint,
        layout,
        dims,
        experts: Vec::new(),
        gates_file: String::new(),
        gate_init: match (opts.gate_init, opts.keep_backbone_prior) {
            (GateInit::Stage1, true) => "stage1-kept-prior".into(),
            (init, _) => format!("{init:?}").to_lowercase(),
        },
        training: report.summary(
            data,
            opts.train.seed,
            if opts.freeze_experts {
                "frozen-experts"
            } else {
                "tuned-experts"
            },
        ),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        gate_input,
    };
    let manifest =
        mode_core::save_composed(out, &manifest, &model, &experts, !opts.freeze_experts)?;
    let _ = mode_io::atomic::remove_dir(&ckpt);
    Ok((Some(manifest), report))
}

/// What the composed gates read: `opts.gate_input`, or the experts' stage-1 gates' input,
/// which must then be one; gates started from stage 1 keep what those read.
fn composed_gate_input(
    experts: &[LoadedExpertFile],
    opts: &ComposeOptions,
) -> Result<GateInput, Error> {
    let first = &experts[0];
    let stage1 = first.file.meta.gate_input;
    if let Some(other) = experts.iter().find(|e| e.file.meta.gate_input != stage1) {
        if opts.gate_init == GateInit::Stage1 || opts.gate_input.is_none() {
            return Err(Error::Data(format!(
                "{}'s gates read the {} block input, {}'s the {} one; compose them with \
                 `--gate-init fresh --gate-input raw|normalized`",
                first.path.display(),
                stage1.name(),
                other.path.display(),
                other.file.meta.gate_input.name()
            )));
        }
    }
    match (opts.gate_init, opts.gate_input) {
        (GateInit::Stage1, Some(asked)) if asked != stage1 => Err(Error::Data(format!(
            "--gate-input {} with --gate-init stage1: the experts' stage-1 gates read the {} \
             block input; start fresh gates (`--gate-init fresh`) to read another",
            asked.name(),
            stage1.name()
        ))),
        (_, asked) => Ok(asked.unwrap_or(stage1)),
    }
}
