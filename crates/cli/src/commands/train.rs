use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use mode_core::ExpertInit;
use mode_data::PreparedData;
use mode_train::stage1::{side_paths, Stage1Options};
use mode_train::trainer::{Event, TrainConfig};

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
    /// A folder written by `mode data prepare`
    #[arg(long)]
    data: PathBuf,
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
    /// How expert layers start: copies of the block's first backbone layers (measured better
    /// on code: 62.61% vs 62.22% held-out accuracy after 200 steps), or random
    #[arg(long, default_value = "copy")]
    init: ExpertInit,
    /// Initial probability of the backbone branch in the fresh gates
    #[arg(long, default_value_t = mode_core::expert::GATE_INIT_BACKBONE_PROB)]
    gate_init_backbone_prob: f64,
    /// Optimizer steps
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Tokens per step
    #[arg(long, default_value_t = 1024)]
    batch_tokens: usize,
    /// Sequence length of training rows
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Peak learning rate
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Linear warm-up steps before cosine decay
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Validate every N steps
    #[arg(long, default_value_t = 50)]
    val_every: usize,
    /// Checkpoint every N steps
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Start over even if a checkpoint exists
    #[arg(long)]
    restart: bool,
}

pub fn run(args: Args) -> Result<()> {
    if args.seq_len < 2 || args.batch_tokens < args.seq_len || args.steps == 0 {
        bail!("need --seq-len >= 2, --batch-tokens >= --seq-len and --steps >= 1");
    }
    let data = PreparedData::open(&args.data)?;
    let (backbone, tokenizer, path) = args.backbone.load()?;
    let (ckpt, _) = side_paths(&args.out);
    if args.restart && ckpt.exists() {
        std::fs::remove_dir_all(&ckpt).with_context(|| format!("removing {}", ckpt.display()))?;
    } else if ckpt.exists() {
        eprintln!("mode: resuming from {}", ckpt.display());
    }
    let domain = args.domain.clone().unwrap_or_else(|| {
        args.data
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "expert".into())
    });
    let opts = Stage1Options {
        domain,
        blocks: args.blocks,
        expert_layers_per_block: args.expert_layers_per_block,
        init: args.init,
        gate_init_backbone_prob: args.gate_init_backbone_prob,
        train: TrainConfig {
            steps: args.steps,
            batch_tokens: args.batch_tokens,
            seq_len: args.seq_len,
            lr: args.lr,
            lr_warmup_steps: args.warmup,
            seed: args.seed,
            val_every: args.val_every,
            checkpoint_every: args.checkpoint_every,
            ..Default::default()
        },
    };
    let bar = ProgressBar::new(args.steps as u64).with_style(
        ProgressStyle::with_template("step {pos}/{len} [{bar:30}] {msg} ({elapsed}, ETA {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let (meta, report) = mode_train::stage1::train_expert(
        backbone,
        &path.display().to_string(),
        &tokenizer.fingerprint(),
        &data,
        &opts,
        &args.out,
        |e| {
            match e {
                Event::Step {
                    step,
                    loss,
                    tokens_per_sec,
                    ..
                } => {
                    bar.set_position(step as u64);
                    bar.set_message(format!("loss {loss:.4}, {tokens_per_sec:.0} tokens/s"));
                }
                Event::Validation(v) => bar.println(format!(
                    "step {}: validation loss {:.4}, next-token accuracy {:.2}%",
                    v.step,
                    v.loss,
                    100.0 * v.accuracy.unwrap_or(f64::NAN)
                )),
                Event::Checkpoint(p) => bar.println(format!("checkpoint {}", p.display())),
            }
            true
        },
    )?;
    bar.finish_and_clear();
    println!(
        "wrote {} ({} expert, {} blocks x {} layers): {} steps, {} tokens in {:.0}s, final validation loss {:.4}, accuracy {:.2}%",
        args.out.display(),
        meta.domain,
        meta.layout.num_blocks(),
        meta.layout.expert_layers_per_block,
        report.steps,
        report.tokens,
        report.seconds,
        report.final_val_loss.unwrap_or(f64::NAN),
        100.0 * report.final_val_accuracy.unwrap_or(f64::NAN)
    );
    Ok(())
}
