use std::path::PathBuf;

use anyhow::{bail, Result};
use mode_core::{ExpertInit, GateInput};
use mode_train::stage1::{side_paths, Stage1Options};

use super::training::{summary, TrainFlags, TrainProgress, ADAPTER_LR};
use super::BackboneArgs;

/// Stage 1: train one domain expert (and its gates) beside a frozen backbone.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Writes OUT (an expert file), OUT-stem.metrics.jsonl (one line per step and \
    per validation) and, while running, OUT-stem.ckpt/ (checkpoints; a rerun of the same command \
    resumes from it).\n\n\
    Example:\n  mode data prepare --input django/ --glob '*.py' --out data/code\n  \
    mode train --data data/code --out experts/code.expert.safetensors --steps 200"
)]
pub struct Args {
    #[command(flatten)]
    backbone: BackboneArgs,
    /// A folder written by `mode data prepare`; repeat as DIR=WEIGHT for a mixture
    /// (`--data data/code=0.5 --data data/math=0.5`: each training row is drawn from a folder
    /// with that probability)
    #[arg(long, required = true)]
    data: Vec<String>,
    /// The expert file to write (*.expert.safetensors)
    #[arg(long)]
    out: PathBuf,
    /// Domain name stored in the expert (default: the data folder's name)
    #[arg(long)]
    domain: Option<String>,
    /// Blocks the backbone is cut into
    #[arg(long, default_value_t = 3)]
    blocks: usize,
    /// Expert decoder layers beside each block
    #[arg(long, default_value_t = 2)]
    expert_layers_per_block: usize,
    /// How expert layers start: `copy` (copies of the block's first backbone layers),
    /// `random`, or `preserve` (copies whose output projections are zero, run as a correction
    /// added to the block's output: the model is exactly the backbone at step 0)
    #[arg(long, default_value = "copy")]
    init: ExpertInit,
    /// Initial probability of the backbone branch in the fresh gates
    #[arg(long, default_value_t = mode_core::expert::GATE_INIT_BACKBONE_PROB)]
    gate_init_backbone_prob: f64,
    /// The gates' learning rate as a multiple of --lr (0: the gates stay as they start)
    #[arg(long, default_value_t = 1.0)]
    gate_lr_scale: f64,
    /// What the gates read: `raw` (the block input as it is, the paper's gate) or `normalized`
    /// (divided by its RMS per token, so every block's gate reads inputs of one scale). An
    /// expert trained one way composes only with experts trained the same way, unless the
    /// composition starts fresh gates
    #[arg(long, default_value = "raw")]
    gate_input: GateInput,
    #[command(flatten)]
    train: TrainFlags,
}

/// The largest `--gate-lr-scale` accepted: far beyond any useful rate, short of overflow.
pub const MAX_GATE_LR_SCALE: f64 = 1e4;

/// The most expert layers per block `--expert-layers-per-block` accepts (each block of the
/// backbone has a handful of layers; more would only exhaust memory).
pub const MAX_EXPERT_LAYERS: usize = 256;

pub fn run(args: Args) -> Result<()> {
    if args.out.is_dir() {
        bail!(
            "{}: is a folder; --out names the expert file to write (NAME.expert.safetensors)",
            args.out.display()
        );
    }
    super::training::check_out_apart(&args.out, &args.data, &args.backbone, &[])?;
    super::training::check_not_there(&args.out, args.train.force)?;
    // Zero is refused by the block layout, which says why.
    super::check_range(
        "--expert-layers-per-block",
        args.expert_layers_per_block,
        0,
        MAX_EXPERT_LAYERS,
    )?;
    super::check_range(
        "--gate-lr-scale",
        args.gate_lr_scale,
        0.0,
        MAX_GATE_LR_SCALE,
    )?;
    let train = args.train.config(ADAPTER_LR, &args.backbone)?;
    let data = args.train.open_data(&args.data)?;
    let (backbone, tokenizer, path) = args.backbone.load()?;
    let (ckpt, _) = side_paths(&args.out);
    args.train.prepare_checkpoint(&ckpt)?;
    let domain = args.domain.clone().unwrap_or_else(|| {
        data.sources
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join("+")
    });
    mode_io::names::check_name(&domain).map_err(|e| match args.domain {
        Some(_) => anyhow::anyhow!("--domain: {e}"),
        None => anyhow::anyhow!(
            "the expert's name, made from the --data folders' names: {e}; pass --domain NAME"
        ),
    })?;
    eprintln!(
        "mode: training expert `{}` on {}",
        mode_io::term::printable(&domain),
        data.describe()
    );
    let opts = Stage1Options {
        domain,
        blocks: args.blocks,
        expert_layers_per_block: args.expert_layers_per_block,
        init: args.init,
        gate_init_backbone_prob: args.gate_init_backbone_prob,
        gate_lr_scale: args.gate_lr_scale,
        gate_input: args.gate_input,
        train,
    };
    let progress = TrainProgress::new(opts.train.steps);
    let (meta, report) = mode_train::stage1::train_expert(
        backbone,
        &path.display().to_string(),
        &tokenizer.fingerprint(),
        &data,
        &opts,
        &args.out,
        |e| progress.on_event(e),
    )?;
    progress.finish();
    println!(
        "wrote {} ({} expert, {} blocks x {} layers): {}",
        args.out.display(),
        mode_io::term::printable(&meta.domain),
        meta.layout.num_blocks(),
        meta.layout.expert_layers_per_block,
        summary(&report)
    );
    Ok(())
}
