use std::path::PathBuf;

use anyhow::{bail, Result};
use mode_core::baseline::{LoraSpec, LoraTargets};
use mode_model::WeightDtype;
use mode_train::baseline::BaselineKind;
use mode_train::stage1::side_paths;

use super::training::{
    check_out_apart, check_out_folder, summary, TrainFlags, TrainProgress, ADAPTER_LR, FULL_FT_LR,
};
use super::BackboneArgs;

/// The baselines MoDE is measured against, trained by the same loop on the same data.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Writes the folder OUT (model.json, weights.safetensors) and OUT.metrics.jsonl \
    beside it; `mode eval --model OUT` and `mode generate --model OUT` load it.\n\n\
    Examples:\n  mode baseline full --data data/code=0.5 --data data/math=0.5 --out models/full\n  \
    mode baseline lora --rank 16 --alpha 32 --targets attn --data data/code --out models/lora"
)]
pub struct Args {
    #[command(subcommand)]
    kind: Kind,
}

#[derive(clap::Subcommand, Debug)]
enum Kind {
    /// Full fine-tuning: every backbone weight trains (needs --weight-dtype f32)
    Full(Common),
    /// LoRA: low-rank adapters on the chosen projections, backbone frozen
    Lora(LoraArgs),
}

#[derive(clap::Args, Debug)]
struct Common {
    #[command(flatten)]
    backbone: BackboneArgs,
    /// Prepared data folder, or DIR=WEIGHT repeated for a mixture
    #[arg(long, required = true)]
    data: Vec<String>,
    /// The model folder to write
    #[arg(long)]
    out: PathBuf,
    /// Continue training a model folder of the same kind (from `mode baseline`) instead of
    /// starting from the backbone: sequential fine-tuning, one domain after another
    #[arg(long, value_name = "DIR")]
    continue_from: Option<PathBuf>,
    #[command(flatten)]
    train: TrainFlags,
}

#[derive(clap::Args, Debug)]
struct LoraArgs {
    #[command(flatten)]
    common: Common,
    /// Adapter rank
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Scaling numerator: the update is (alpha / rank) * B A
    #[arg(long, default_value_t = 32.0)]
    alpha: f64,
    /// Which projections get adapters: attn (q, k, v, o) or attn+mlp (also gate, up, down)
    #[arg(long, default_value = "attn")]
    targets: LoraTargets,
}

pub fn run(args: Args) -> Result<()> {
    let (common, kind, default_lr) = match args.kind {
        Kind::Full(c) => (c, BaselineKind::Full, FULL_FT_LR),
        Kind::Lora(l) => (
            l.common,
            BaselineKind::Lora(LoraSpec {
                rank: l.rank,
                alpha: l.alpha,
                targets: l.targets,
            }),
            ADAPTER_LR,
        ),
    };
    let continued: Vec<&std::path::Path> =
        common.continue_from.iter().map(|p| p.as_path()).collect();
    check_out_apart(&common.out, &common.data, &common.backbone, &continued)?;
    check_out_folder(&common.out, common.train.force)?;
    if let Some(dir) = &common.continue_from {
        super::check_input(dir)?;
    }
    if kind == BaselineKind::Full && common.backbone.weight_dtype != WeightDtype::F32 {
        bail!("full fine-tuning updates the backbone's weights: use --weight-dtype f32");
    }
    if let BaselineKind::Lora(spec) = &kind {
        // alpha 0 trains adapters that change nothing; NaN or infinity poisons the run.
        if !(spec.alpha.is_finite() && spec.alpha > 0.0) {
            bail!("--alpha must be a positive number, got {}", spec.alpha);
        }
    }
    let train = common.train.config(default_lr, &common.backbone)?;
    let data = common.train.open_data(&common.data)?;
    let (backbone, tokenizer, path) = common.backbone.load()?;
    if let BaselineKind::Lora(spec) = &kind {
        // Beyond the hidden size an adapter's matrices only grow; a huge rank overflowed
        // their allocation (a crash).
        let hidden = backbone.config.hidden_size;
        if spec.rank > hidden {
            bail!(
                "--rank must be at most the backbone's hidden size {hidden}, got {}",
                spec.rank
            );
        }
    }
    let (ckpt, _) = side_paths(&common.out);
    common.train.prepare_checkpoint(&ckpt)?;
    eprintln!("mode: {kind:?} fine-tuning on {}", data.describe());
    let progress = TrainProgress::new(train.steps);
    let (manifest, report) = mode_train::baseline::train_baseline(
        backbone,
        &path.display().to_string(),
        &tokenizer.fingerprint(),
        &data,
        kind,
        &train,
        &common.out,
        common.continue_from.as_deref(),
        |e| progress.on_event(e),
    )?;
    progress.finish();
    if let Some(m) = manifest {
        println!(
            "wrote {} ({}, {:.2}M trainable parameters): {}",
            common.out.display(),
            m.kind,
            m.trainable_parameters as f64 / 1e6,
            summary(&report)
        );
    }
    Ok(())
}
