//! Stage 1 of MoDE: one domain, one expert; the expert and its gates train, the backbone stays
//! frozen. Produces an expert file.

use std::path::{Path, PathBuf};

use mode_core::file::ExpertDims;
use mode_core::{
    BlockLayout, Expert, ExpertFile, ExpertInit, ExpertMeta, Gate, GateInput, ModeModel,
};
use mode_data::DataMix;
use mode_model::Backbone;

use crate::methods::ModeTraining;
use crate::trainer::{train, Error, Event, TrainConfig, TrainReport};

/// What to train.
#[derive(Debug, Clone)]
pub struct Stage1Options {
    pub domain: String,
    pub blocks: usize,
    pub expert_layers_per_block: usize,
    pub init: ExpertInit,
    /// Initial probability of the backbone branch in the fresh gates.
    pub gate_init_backbone_prob: f64,
    /// The gates' learning rate relative to `train.lr`.
    pub gate_lr_scale: f64,
    /// What the gates read from the block input.
    pub gate_input: GateInput,
    pub train: TrainConfig,
}

/// Files a run writes next to its output.
pub fn side_paths(out: &Path) -> (PathBuf, PathBuf) {
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("expert");
    let stem = name.strip_suffix(".safetensors").unwrap_or(name);
    let dir = out.parent().unwrap_or(Path::new("."));
    (
        dir.join(format!("{stem}.ckpt")),
        dir.join(format!("{stem}.metrics.jsonl")),
    )
}

/// Trains an expert on `data` and writes it to `out`. A checkpoint folder and a metrics file
/// live next to `out` (`NAME.ckpt`, `NAME.metrics.jsonl`); an existing checkpoint is resumed.
pub fn train_expert(
    backbone: Backbone,
    backbone_source: &str,
    tokenizer_fingerprint: &str,
    data: &DataMix,
    opts: &Stage1Options,
    out: &Path,
    on_event: impl FnMut(Event) -> bool,
) -> Result<(ExpertMeta, TrainReport), Error> {
    check_tokenizer(data, tokenizer_fingerprint, backbone_source)?;
    let fingerprint = backbone.fingerprint()?;
    let dims = ExpertDims::of(&backbone.config);
    let layout = BlockLayout::even(
        backbone.layers.len(),
        opts.blocks,
        opts.expert_layers_per_block,
    )?;
    let expert = Expert::new(&opts.domain, &backbone, &layout, opts.init, opts.train.seed)?;
    let dtype = backbone.embed_tokens.dtype();
    let gates = (0..layout.num_blocks())
        .map(|_| {
            Gate::new(
                backbone.config.hidden_size,
                1,
                opts.gate_init_backbone_prob,
                dtype,
                backbone.device(),
            )
            .map(|g| g.reading(opts.gate_input))
        })
        .collect::<mode_core::Result<Vec<_>>>()?;
    let model = ModeModel::new(backbone, layout.clone(), vec![expert], gates)?;
    let (ckpt, metrics) = side_paths(out);
    let method = ModeTraining {
        model: &model,
        experts: true,
        gates: true,
        gate_lr_scale: opts.gate_lr_scale,
    };
    let report = train(&method, data, &opts.train, &ckpt, &metrics, on_event)?;
    let meta = ExpertMeta {
        format_version: mode_core::file::format_version(opts.init.form(), opts.gate_input),
        domain: opts.domain.clone(),
        backbone_fingerprint: fingerprint,
        backbone_source: backbone_source.to_string(),
        layout,
        dims,
        training: report.summary(data, opts.train.seed, opts.init.name()),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        form: opts.init.form(),
        gate_input: opts.gate_input,
    };
    if report.steps < opts.train.steps {
        // Stopped early: the checkpoint stays for a rerun to resume; no expert file yet.
        return Ok((meta, report));
    }
    ExpertFile::from_expert(meta.clone(), &model.experts[0], &model.gates).save(out)?;
    let _ = mode_io::atomic::remove_dir(&ckpt);
    Ok((meta, report))
}

/// Checks that every source of `data` was tokenised by the backbone's tokenizer.
pub fn check_tokenizer(
    data: &DataMix,
    tokenizer_fingerprint: &str,
    backbone_source: &str,
) -> Result<(), Error> {
    match data
        .sources
        .iter()
        .find(|s| s.data.manifest.tokenizer_fingerprint != tokenizer_fingerprint)
    {
        Some(s) => Err(Error::Data(format!(
            "{} was prepared with another tokenizer than this backbone's; prepare it again with --backbone {backbone_source}",
            s.data.dir.display()
        ))),
        None => Ok(()),
    }
}
