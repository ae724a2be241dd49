use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use mode_core::{GateInput, LoadedExpertFile};
use mode_train::compose::{ComposeOptions, GateInit};
use mode_train::stage1::side_paths;

use super::training::{
    check_out_apart, check_out_folder, summary, TrainFlags, TrainProgress, ADAPTER_LR,
};
use super::BackboneArgs;

/// Stage 2: put several experts in one model and tune gates (and experts) on mixed data.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Writes the folder OUT (model.json, gates.safetensors, experts/*.expert.safetensors) \
    and OUT.metrics.jsonl beside it; while running, OUT.ckpt/ holds checkpoints (a rerun resumes).\n\
    `mode eval --model OUT` and `mode generate --model OUT` load the result.\n\n\
    Example:\n  mode compose --expert experts/code.expert.safetensors --expert experts/math.expert.safetensors \\\n    \
    --data data/code=0.5 --data data/math=0.5 --steps 100 --out models/code-math"
)]
pub struct Args {
    #[command(flatten)]
    backbone: BackboneArgs,
    /// A stage-1 expert file; repeat for each expert (at least one)
    #[arg(long, required = true)]
    expert: Vec<PathBuf>,
    /// Prepared data folder, or DIR=WEIGHT repeated for a mixture
    #[arg(long, required = true)]
    data: Vec<String>,
    /// The composed-model folder to write
    #[arg(long)]
    out: PathBuf,
    /// Tune the gates only; the experts stay as stage 1 left them
    #[arg(long)]
    freeze_experts: bool,
    /// How the N+1-way gates start: `stage1` (from each expert's stage-1 gates: the backbone
    /// row averaged, each expert's row kept) or `fresh` (backbone at
    /// --gate-init-backbone-prob, experts sharing the rest)
    #[arg(long, default_value = "stage1")]
    gate_init: GateInit,
    /// Initial probability of the backbone branch in fresh gates
    #[arg(long, default_value_t = mode_core::expert::GATE_INIT_BACKBONE_PROB)]
    gate_init_backbone_prob: f64,
    /// With `--gate-init stage1`: add ln N to the backbone's gate bias, so that the backbone
    /// keeps its stage-1 odds against the N experts together rather than against each
    #[arg(long)]
    keep_backbone_prior: bool,
    /// The gates' learning rate as a multiple of --lr (0: the gates stay as they start)
    #[arg(long, default_value_t = 1.0)]
    gate_lr_scale: f64,
    /// What the gates read: `raw` or `normalized` (see `mode train --help`). Default: what the
    /// experts' stage-1 gates read; another input needs `--gate-init fresh`
    #[arg(long)]
    gate_input: Option<GateInput>,
    #[command(flatten)]
    train: TrainFlags,
}

pub fn run(args: Args) -> Result<()> {
    let experts: Vec<&Path> = args.expert.iter().map(|p| p.as_path()).collect();
    check_out_apart(&args.out, &args.data, &args.backbone, &experts)?;
    check_out_folder(&args.out, args.train.force)?;
    super::check_range(
        "--gate-lr-scale",
        args.gate_lr_scale,
        0.0,
        super::train::MAX_GATE_LR_SCALE,
    )?;
    if args.keep_backbone_prior && args.gate_init != GateInit::Stage1 {
        anyhow::bail!("--keep-backbone-prior applies to --gate-init stage1 only");
    }
    let train = args.train.config(ADAPTER_LR, &args.backbone)?;
    let data = args.train.open_data(&args.data)?;
    let (backbone, tokenizer, path) = args.backbone.load()?;
    let experts = args
        .expert
        .iter()
        .map(|p| {
            LoadedExpertFile::load(p, &Device::Cpu)
                .with_context(|| format!("loading expert {}", p.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let (ckpt, _) = side_paths(&args.out);
    args.train.prepare_checkpoint(&ckpt)?;
    eprintln!(
        "mode: composing {} on {} ({}, gates {:?})",
        experts
            .iter()
            .map(|e| mode_io::term::printable(&e.file.meta.domain))
            .collect::<Vec<_>>()
            .join(" + "),
        data.describe(),
        if args.freeze_experts {
            "experts frozen"
        } else {
            "experts tuned"
        },
        args.gate_init
    );
    let opts = ComposeOptions {
        freeze_experts: args.freeze_experts,
        gate_init: args.gate_init,
        gate_init_backbone_prob: args.gate_init_backbone_prob,
        keep_backbone_prior: args.keep_backbone_prior,
        gate_lr_scale: args.gate_lr_scale,
        gate_input: args.gate_input,
        train,
    };
    let progress = TrainProgress::new(opts.train.steps);
    let (manifest, report) = mode_train::compose::compose(
        backbone,
        &path.display().to_string(),
        &tokenizer.fingerprint(),
        experts,
        &data,
        &opts,
        &args.out,
        |e| progress.on_event(e),
    )?;
    progress.finish();
    if manifest.is_some() {
        println!("wrote {}: {}", args.out.display(), summary(&report));
    }
    Ok(())
}
