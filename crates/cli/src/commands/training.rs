//! What every training command shares: schedule flags, data mixtures and the progress display.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use mode_train::trainer::{Event, TrainConfig, TrainReport};

/// The longest training row `--seq-len` allows (attention scores grow with its square).
pub const MAX_SEQ_LEN: usize = 1 << 20;
/// The most tokens per step `--batch-tokens` allows; far beyond what fits in memory, which the
/// memory check then says.
pub const MAX_BATCH_TOKENS: usize = 1 << 26;

/// Flags of the training loop, the same for `train`, `compose` and the baselines.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainFlags {
    /// Optimizer steps
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Tokens per step
    #[arg(long, default_value_t = 1024)]
    pub batch_tokens: usize,
    /// Sequence length of training rows
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Peak learning rate [default: 1e-4 for full fine-tuning, 1e-3 otherwise]
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Linear warm-up steps before cosine decay
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    /// Seed of initialisation and batch sampling
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Validate every N steps (and at the end; 0: only at the end)
    #[arg(long, default_value_t = 50)]
    pub val_every: usize,
    /// Validation windows per data source
    #[arg(long, default_value_t = 16)]
    pub val_windows: usize,
    /// Checkpoint every N steps (0: never)
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
    /// Start over even if a checkpoint exists
    #[arg(long)]
    pub restart: bool,
    /// Replace --out if it already exists (without it, an existing --out is refused and left
    /// as it is)
    #[arg(long)]
    pub force: bool,
    /// Tokens per forward/backward pass; each step accumulates gradients over
    /// --batch-tokens / this many passes (less memory, same step) [default: one pass per step]
    #[arg(long)]
    pub micro_batch_tokens: Option<usize>,
    /// Recompute activations in the backward pass instead of keeping them (less memory, about
    /// a third more compute)
    #[arg(long)]
    pub recompute_activations: bool,
    /// Train on only the first N training documents of each data source (validation stays
    /// whole): how a run with few examples is tried
    #[arg(long, value_name = "N")]
    pub max_train_documents: Option<usize>,
}

impl TrainFlags {
    /// Checks the flags and turns them into the loop's configuration; `default_lr` where
    /// --lr is not given; `backbone`'s --no-memory-check also covers training.
    pub fn config(&self, default_lr: f64, backbone: &super::BackboneArgs) -> Result<TrainConfig> {
        if !backbone.weight_dtype.trainable() {
            bail!(
                "training reads the frozen weights as tensors: use --weight-dtype f32, f16 or bf16, \
                 not {}",
                backbone.weight_dtype
            );
        }
        if self.seq_len < 2 || self.batch_tokens < self.seq_len || self.steps == 0 {
            bail!("need --seq-len >= 2, --batch-tokens >= --seq-len and --steps >= 1");
        }
        // Beyond these, sizes computed from the flags overflow (a panic, or a memory estimate
        // that wraps around to a small number and passes).
        if self.seq_len > MAX_SEQ_LEN {
            bail!(
                "--seq-len must be at most {MAX_SEQ_LEN}, got {}",
                self.seq_len
            );
        }
        if self.batch_tokens > MAX_BATCH_TOKENS {
            bail!(
                "--batch-tokens must be at most {MAX_BATCH_TOKENS}, got {}",
                self.batch_tokens
            );
        }
        if (self.steps as u64)
            .checked_mul(self.batch_tokens as u64)
            .is_none()
        {
            bail!(
                "--steps {} x --batch-tokens {} tokens cannot be counted; lower --steps",
                self.steps,
                self.batch_tokens
            );
        }
        if let Some(m) = self.micro_batch_tokens {
            if m < self.seq_len || m > self.batch_tokens {
                bail!("--micro-batch-tokens must be between --seq-len and --batch-tokens, got {m}");
            }
        }
        if self.val_windows == 0 {
            // Validation is what the run reports and what checkpoints are judged by.
            bail!("--val-windows must be at least 1");
        }
        let lr = self.lr.unwrap_or(default_lr);
        if !(lr.is_finite() && lr > 0.0) {
            bail!("--lr must be a positive number, got {lr}");
        }
        Ok(TrainConfig {
            steps: self.steps,
            batch_tokens: self.batch_tokens,
            seq_len: self.seq_len,
            lr,
            lr_warmup_steps: self.warmup,
            seed: self.seed,
            val_every: self.val_every,
            val_windows: self.val_windows,
            checkpoint_every: self.checkpoint_every,
            check_memory: !backbone.no_memory_check,
            micro_batch_tokens: self.micro_batch_tokens.unwrap_or(0),
            recompute_activations: self.recompute_activations,
            ..Default::default()
        })
    }

    /// Opens the `--data` mixture, limited by --max-train-documents.
    pub fn open_data(&self, specs: &[String]) -> Result<mode_data::DataMix> {
        let mut data = mode_data::DataMix::open(specs)?;
        if let Some(n) = self.max_train_documents {
            if n == 0 {
                bail!("--max-train-documents must be at least 1");
            }
            data.limit_train_documents(n);
        }
        let unvalidated = mode_train::trainer::sources_without_validation(&data, self.seq_len);
        if unvalidated.len() == data.sources.len() {
            eprintln!(
                "mode: warning: no --data folder has a validation (or test) split longer than \
                 --seq-len {}: the run will report no validation loss. `mode data prepare` splits \
                 by document, so give it several documents (files, or JSONL rows), or lower \
                 --seq-len",
                self.seq_len
            );
        } else {
            for name in unvalidated {
                eprintln!(
                    "mode: warning: `{name}` has no validation (or test) split longer than \
                     --seq-len {}: validation scores the other sources only",
                    self.seq_len
                );
            }
        }
        Ok(data)
    }

    /// Removes the checkpoint with --restart, or says that the run resumes from it.
    pub fn prepare_checkpoint(&self, ckpt: &Path) -> Result<()> {
        if self.restart && ckpt.exists() {
            std::fs::remove_dir_all(ckpt)
                .with_context(|| format!("removing {}", ckpt.display()))?;
        } else if ckpt.join("state.json").exists() {
            eprintln!(
                "mode: resuming from {} (pass --restart to start over)",
                ckpt.display()
            );
        }
        Ok(())
    }
}

/// Refuses an `--out` that is an existing file where a model folder is to be written (it would
/// be replaced only after the whole run), and an existing folder without `force`.
pub fn check_out_folder(out: &Path, force: bool) -> Result<()> {
    if out.exists() && !out.is_dir() {
        bail!(
            "{}: is a file; --out names the model folder to write",
            out.display()
        );
    }
    check_not_there(out, force)
}

/// Refuses an `out` that is, lies inside or holds one of the run's inputs: the `--data`
/// folders, the backbone when given as a path, and `others` (expert files, model folders).
/// Not even `--force` replaces an input.
pub fn check_out_apart(
    out: &Path,
    data: &[String],
    backbone: &super::BackboneArgs,
    others: &[&Path],
) -> Result<()> {
    let mut inputs: Vec<PathBuf> = data
        .iter()
        .filter_map(|spec| mode_data::parse_mix_spec(spec).ok().map(|(path, _)| path))
        .collect();
    inputs.extend(
        backbone
            .backbone
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.exists()),
    );
    inputs.extend(others.iter().map(|p| p.to_path_buf()));
    let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    mode_io::input::check_apart(out, &inputs).map_err(|m| anyhow::anyhow!("{}: {m}", out.display()))
}

/// Refuses to write over an existing `out` unless `force`: a finished run is never replaced by
/// accident (an unfinished one resumes from its checkpoint, beside `out`).
pub fn check_not_there(out: &Path, force: bool) -> Result<()> {
    if out.exists() && !force {
        bail!(
            "{}: already exists; pass --force to replace it, or choose another --out",
            out.display()
        );
    }
    Ok(())
}

/// Default peak learning rate of experts, gates and LoRA adapters.
pub const ADAPTER_LR: f64 = 1e-3;
/// Default peak learning rate of full fine-tuning, where every backbone weight moves.
pub const FULL_FT_LR: f64 = 1e-4;

/// A progress bar driven by the training loop's events: step, loss, tokens/s, ETA, and a line
/// per validation and checkpoint.
pub struct TrainProgress {
    bar: ProgressBar,
    /// Without a terminal (logs, CI) the bar is hidden: print a line every this many steps.
    log_every: Option<usize>,
    start: std::time::Instant,
    /// The first step this process ran (a resumed run starts late).
    first_step: std::cell::Cell<Option<usize>>,
}

impl TrainProgress {
    pub fn new(steps: usize) -> Self {
        let bar = ProgressBar::new(steps as u64).with_style(
            ProgressStyle::with_template(
                "step {pos}/{len} [{bar:30}] {msg} ({elapsed}, ETA {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        use std::io::IsTerminal;
        let log_every = (!std::io::stderr().is_terminal()).then_some((steps / 20).max(1));
        Self {
            bar,
            log_every,
            start: std::time::Instant::now(),
            first_step: std::cell::Cell::new(None),
        }
    }

    /// Shows one event; always lets the run go on.
    pub fn on_event(&self, e: Event) -> bool {
        match e {
            Event::Step {
                step,
                total,
                loss,
                tokens_per_sec,
            } => {
                if self.first_step.get().is_none() {
                    self.first_step.set(Some(step));
                }
                if self
                    .log_every
                    .is_some_and(|n| step % n == 0 || step == total)
                {
                    let elapsed = self.start.elapsed().as_secs_f64();
                    let first = self.first_step.get().unwrap_or(step);
                    let done = (step + 1 - first) as f64;
                    let eta = elapsed / done * (total - step) as f64;
                    eprintln!(
                        "step {step}/{total}: loss {loss:.4}, {tokens_per_sec:.0} tokens/s ({elapsed:.0}s, ETA {eta:.0}s)"
                    );
                }
                self.bar.set_position(step as u64);
                self.bar
                    .set_message(format!("loss {loss:.4}, {tokens_per_sec:.0} tokens/s"));
            }
            Event::Validation(v) => {
                let mut line = format!(
                    "step {}: validation loss {:.4}, next-token accuracy {:.2}%",
                    v.step,
                    v.loss,
                    100.0 * v.accuracy.unwrap_or(f64::NAN)
                );
                for (name, s) in v.sources.iter().flatten() {
                    line.push_str(&format!("; {name} {:.2}%", 100.0 * s.accuracy));
                }
                self.bar.println(line);
            }
            Event::Checkpoint(p) => self.bar.println(format!("checkpoint {}", p.display())),
        }
        true
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// What a finished run reports after `wrote OUT (...)`: steps, tokens, time, final validation.
pub fn summary(report: &TrainReport) -> String {
    format!(
        "{} steps, {} tokens in {:.0}s, {}",
        report.steps,
        report.tokens,
        report.seconds,
        validation(report.final_val_loss, report.final_val_accuracy)
    )
}

/// "validation loss L (accuracy A%)", or what a run without validation data has.
pub fn validation(loss: Option<f64>, accuracy: Option<f64>) -> String {
    match (loss, accuracy) {
        (Some(loss), Some(accuracy)) => {
            format!(
                "validation loss {loss:.4} (accuracy {:.2}%)",
                100.0 * accuracy
            )
        }
        _ => "no validation data".to_string(),
    }
}
