//! The training loop every method shares: sampled batches from prepared data, AdamW with warm-up
//! and cosine decay, periodic validation, `metrics.jsonl`, atomic checkpoints and exact resume.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use mode_data::{DataMix, MixSource, Split, SplitData};
use mode_engine::model::{loss_and_grads, Batch, Plan};
use mode_engine::ops::IGNORE;
use mode_model::Backbone;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::checkpoint::CHECKPOINT_STATE;
pub use crate::checkpoint::{load_checkpoint, save_checkpoint};
use crate::{train_step, AdamW, AdamWConfig, LrSchedule, StepSettings};

/// What a training method trains: the engine plan and the named tensors it updates.
pub trait Method {
    fn backbone(&self) -> &Backbone;
    fn plan(&self) -> Plan<'_>;
    /// Trainable tensors, under the names the engine gives their gradients.
    fn params(&self) -> Vec<(String, &Tensor)>;
    /// What parameter `name`'s learning rate is, relative to the run's.
    fn lr_scale(&self, _name: &str) -> f64 {
        1.0
    }
}

/// Hyper-parameters of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub steps: usize,
    /// Tokens per optimizer step (rows of `seq_len`).
    pub batch_tokens: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub lr_warmup_steps: usize,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Validate every this many steps (0: only at the end).
    pub val_every: usize,
    /// Validation windows (of `seq_len`) taken from the start of the validation split.
    pub val_windows: usize,
    /// Checkpoint every this many steps (0: never).
    pub checkpoint_every: usize,
    /// Refuse to start when the estimated peak memory exceeds the memory available.
    pub check_memory: bool,
    /// Tokens per forward/backward pass (whole rows of `seq_len`); a step accumulates the
    /// gradients of `batch_tokens / micro_batch_tokens` passes. 0: one pass per step.
    #[serde(default)]
    pub micro_batch_tokens: usize,
    /// Recompute each layer's or block's activations in the backward pass instead of keeping
    /// them: less memory, about one more forward pass of compute.
    #[serde(default)]
    pub recompute_activations: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 200,
            batch_tokens: 1024,
            seq_len: 256,
            lr: 1e-3,
            lr_warmup_steps: 20,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            seed: 0,
            val_every: 50,
            val_windows: 16,
            checkpoint_every: 50,
            check_memory: true,
            micro_batch_tokens: 0,
            recompute_activations: false,
        }
    }
}

impl TrainConfig {
    /// Rows per forward/backward pass (0: the whole batch).
    pub fn micro_batch_rows(&self) -> usize {
        self.micro_batch_tokens / self.seq_len.max(1)
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsLine {
    pub step: usize,
    pub kind: String,
    pub loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_sec: Option<f64>,
    /// Validation per source of a mixture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<BTreeMap<String, Score>>,
}

/// What the loop tells its caller as it goes.
pub enum Event<'a> {
    Step {
        step: usize,
        total: usize,
        loss: f64,
        tokens_per_sec: f64,
    },
    Validation(&'a MetricsLine),
    Checkpoint(&'a Path),
}

/// Outcome of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainReport {
    pub steps: usize,
    pub tokens: usize,
    pub final_train_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub final_val_accuracy: Option<f64>,
    pub seconds: f64,
}

impl TrainReport {
    /// What a trained artifact records about its run: this report, the data it saw, the
    /// `seed` and how it started (`init`).
    pub fn summary(
        &self,
        data: &DataMix,
        seed: u64,
        init: impl Into<String>,
    ) -> mode_core::file::TrainingSummary {
        mode_core::file::TrainingSummary {
            steps: self.steps,
            tokens: self.tokens,
            final_train_loss: self.final_train_loss,
            final_val_loss: self.final_val_loss,
            final_val_accuracy: self.final_val_accuracy,
            data_fingerprint: Some(data.fingerprint()),
            seed,
            init: init.into(),
        }
    }
}

/// Errors of the training loop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    #[error("{0}")]
    Data(String),
    #[error("training stopped at step {step}: {what} is not finite; no model was written and the last good checkpoint is kept (lower --lr, or check the data)")]
    NonFinite { step: usize, what: String },
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Mode(#[from] mode_core::Error),
    #[error(transparent)]
    Model(#[from] mode_model::Error),
}

/// The batch of step `step`: rows of `seq_len + 1` tokens at random offsets of the training
/// split, each row from a source of the mixture drawn by weight, from an RNG seeded by
/// (seed, step) so a resumed run sees the same batches.
pub fn sample_batch(
    data: &DataMix,
    cfg: &TrainConfig,
    step: usize,
    device: &Device,
) -> Result<Batch, Error> {
    let rows = (cfg.batch_tokens / cfg.seq_len).max(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        cfg.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    let mut ids = Vec::with_capacity(rows * cfg.seq_len);
    let mut targets = Vec::with_capacity(rows * cfg.seq_len);
    for _ in 0..rows {
        let source = if data.sources.len() == 1 {
            &data.sources[0]
        } else {
            data.pick(rng.random::<f64>())
        };
        let split = source.data.split(Split::Train);
        let n = split.len();
        if n < cfg.seq_len + 1 {
            return Err(Error::Data(format!(
                "{}: the training split has {n} tokens, fewer than one window of {} + 1",
                source.data.dir.display(),
                cfg.seq_len
            )));
        }
        let start = rng.random_range(0..=n - cfg.seq_len - 1);
        let bos = source.data.manifest.bos_id;
        push_row(split, start, cfg.seq_len, bos, &mut ids, &mut targets);
    }
    let row_len = ids.len() / rows;
    Ok(Batch {
        ids: Tensor::from_vec(ids, (rows, row_len), device)?,
        targets,
    })
}

/// Appends the row of `seq_len` tokens at `start` of `split` and its next-token targets
/// ([`IGNORE`] where the loss mask leaves a token out); with a `bos`, the row begins with it
/// and its prediction is not counted, as in evaluation (see `mode_eval`).
fn push_row(
    split: &mode_data::SplitData,
    start: usize,
    seq_len: usize,
    bos: Option<u32>,
    ids: &mut Vec<u32>,
    targets: &mut Vec<u32>,
) {
    if let Some(bos) = bos {
        ids.push(bos);
        targets.push(IGNORE);
    }
    ids.extend_from_slice(&split.tokens()[start..start + seq_len]);
    targets.extend((start + 1..start + seq_len + 1).map(|i| {
        if split.mask()[i] == 1 {
            split.tokens()[i]
        } else {
            IGNORE
        }
    }));
}

/// Loss and next-token accuracy on held-out data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub loss: f64,
    pub accuracy: f64,
    pub tokens: usize,
}

/// Validation of a mixture: pooled over all sources, and per source.
#[derive(Debug, Clone, PartialEq)]
pub struct Validation {
    pub total: Score,
    pub sources: Vec<(String, Score)>,
}

/// Scores `method` on the first `val_windows` windows of each source's validation split (or
/// test split when the validation split is shorter than a window).
pub fn validate(
    method: &dyn Method,
    data: &DataMix,
    cfg: &TrainConfig,
) -> Result<Validation, Error> {
    let mut plan = method.plan();
    freeze(&mut plan);
    let (mut loss_all, mut correct_all, mut count_all) = (0.0, 0, 0);
    let mut sources = Vec::with_capacity(data.sources.len());
    for source in &data.sources {
        let split = validation_split(source, cfg.seq_len);
        let tokens = split.tokens();
        let (mut loss, mut correct, mut count) = (0.0, 0, 0);
        for w in 0..cfg.val_windows {
            let start = w * cfg.seq_len;
            if start + cfg.seq_len + 1 > tokens.len() {
                break;
            }
            let (mut ids, mut targets) = (Vec::new(), Vec::new());
            let bos = source.data.manifest.bos_id;
            push_row(split, start, cfg.seq_len, bos, &mut ids, &mut targets);
            let shape = (1, ids.len());
            let ids = Tensor::from_vec(ids, shape, method.backbone().device())?;
            let r = loss_and_grads(method.backbone(), &plan, &ids, &targets)?;
            loss += r.loss_sum;
            correct += r.correct;
            count += r.count;
        }
        sources.push((source.name.clone(), score(loss, correct, count)));
        loss_all += loss;
        correct_all += correct;
        count_all += count;
    }
    Ok(Validation {
        total: score(loss_all, correct_all, count_all),
        sources,
    })
}

/// The split [`validate`] scores for `source`: its validation split, or its test split when the
/// validation split is shorter than a window.
fn validation_split(source: &MixSource, seq_len: usize) -> &SplitData {
    let split = source.data.split(Split::Val);
    if split.len() > seq_len {
        split
    } else {
        source.data.split(Split::Test)
    }
}

/// The sources of `data` that hold no validation window of `seq_len` tokens (neither their
/// validation nor their test split is long enough): [`validate`] scores nothing of them.
pub fn sources_without_validation(data: &DataMix, seq_len: usize) -> Vec<&str> {
    data.sources
        .iter()
        .filter(|source| validation_split(source, seq_len).len() <= seq_len)
        .map(|source| source.name.as_str())
        .collect()
}

fn score(loss_sum: f64, correct: usize, count: usize) -> Score {
    if count == 0 {
        return Score {
            loss: f64::NAN,
            accuracy: f64::NAN,
            tokens: 0,
        };
    }
    Score {
        loss: loss_sum / count as f64,
        accuracy: correct as f64 / count as f64,
        tokens: count,
    }
}

fn freeze(plan: &mut Plan) {
    plan.backbone = mode_engine::model::Trainable::none(plan.backbone.layers.len());
    for b in &mut plan.blocks {
        b.train_gate = false;
        b.train_experts.iter_mut().for_each(|t| *t = false);
    }
}

/// Runs (or resumes, when `checkpoint_dir` holds a checkpoint) training of `method`.
/// `on_event` sees progress; returning `false` stops the run after the current event (the
/// last checkpoint stays, and a later call resumes from it).
pub fn train(
    method: &dyn Method,
    data: &DataMix,
    cfg: &TrainConfig,
    checkpoint_dir: &Path,
    metrics_path: &Path,
    mut on_event: impl FnMut(Event) -> bool,
) -> Result<TrainReport, Error> {
    let schedule = LrSchedule {
        peak_lr: cfg.lr,
        lr_warmup_steps: cfg.lr_warmup_steps,
        total_steps: cfg.steps,
        min_lr_ratio: cfg.min_lr_ratio,
    };
    let mut optimizer = AdamW::new(AdamWConfig {
        weight_decay: cfg.weight_decay,
        ..Default::default()
    });
    let vocab_size = method.backbone().config.vocab_size;
    for source in &data.sources {
        source
            .data
            .check_vocab(vocab_size)
            .map_err(|e| Error::Data(e.to_string()))?;
    }
    let params = method.params();
    if cfg.micro_batch_tokens != 0 && cfg.micro_batch_tokens < cfg.seq_len {
        return Err(Error::Data(format!(
            "a micro-batch of {} tokens holds no row of {} tokens",
            cfg.micro_batch_tokens, cfg.seq_len
        )));
    }
    let mut plan = method.plan();
    plan.recompute_activations = cfg.recompute_activations;
    if cfg.check_memory {
        let trainable = params.iter().map(|(_, t)| t.elem_count()).sum();
        let pass_tokens = match cfg.micro_batch_rows() {
            0 => cfg.batch_tokens,
            rows => (rows * cfg.seq_len).min(cfg.batch_tokens),
        };
        let estimate = crate::memory::estimate_training(
            method.backbone(),
            &plan,
            trainable,
            pass_tokens,
            cfg.seq_len,
        );
        crate::memory::check(&estimate, crate::memory::available_bytes()).map_err(Error::Data)?;
    }
    let mut first_step = 0;
    mode_io::atomic::recover_dir(checkpoint_dir).map_err(|e| Error::File {
        path: checkpoint_dir.to_path_buf(),
        msg: e.to_string(),
    })?;
    if checkpoint_dir.join(CHECKPOINT_STATE).exists() {
        first_step = load_checkpoint(checkpoint_dir, &params, &mut optimizer)?;
    }
    mode_io::atomic::parent_of(metrics_path).map_err(|e| Error::File {
        path: metrics_path.to_path_buf(),
        msg: e.to_string(),
    })?;
    if first_step > 0 {
        // Lines a killed run logged after its last checkpoint are about to be redone.
        truncate_metrics(metrics_path, first_step)?;
    }
    // A fresh run starts the metrics file over; a resumed one appends to it.
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(first_step > 0)
        .write(true)
        .truncate(first_step == 0)
        .open(metrics_path)
        .map_err(|e| Error::File {
            path: metrics_path.to_path_buf(),
            msg: e.to_string(),
        })?;
    let mut log = |line: &MetricsLine| -> Result<(), Error> {
        let json = serde_json::to_string(line).expect("metrics serialise");
        writeln!(metrics, "{json}").map_err(|e| Error::File {
            path: metrics_path.to_path_buf(),
            msg: e.to_string(),
        })
    };
    let device = method.backbone().device().clone();
    let start = Instant::now();
    let mut report = TrainReport::default();
    for step in first_step..cfg.steps {
        let batch = sample_batch(data, cfg, step, &device)?;
        let lr = schedule.lr(step);
        let t = Instant::now();
        let settings = StepSettings {
            lr,
            max_grad_norm: cfg.max_grad_norm,
            micro_batch_rows: cfg.micro_batch_rows(),
        };
        let stats = train_step(
            method.backbone(),
            &plan,
            &params,
            &mut optimizer,
            &batch,
            settings,
            &|name| method.lr_scale(name),
        )?;
        if !(stats.loss.is_finite() && stats.grad_norm.is_finite()) {
            return Err(Error::NonFinite {
                step: step + 1,
                what: format!(
                    "the loss ({}) or the gradient norm ({})",
                    stats.loss, stats.grad_norm
                ),
            });
        }
        let tokens_per_sec = batch.targets.len() as f64 / t.elapsed().as_secs_f64();
        report.tokens += batch.targets.len();
        report.final_train_loss = Some(stats.loss);
        log(&MetricsLine {
            step: step + 1,
            kind: "train".into(),
            loss: stats.loss,
            accuracy: Some(stats.correct as f64 / stats.tokens.max(1) as f64),
            lr: Some(lr),
            grad_norm: Some(stats.grad_norm),
            tokens_per_sec: Some(tokens_per_sec),
            sources: None,
        })?;
        let mut go_on = on_event(Event::Step {
            step: step + 1,
            total: cfg.steps,
            loss: stats.loss,
            tokens_per_sec,
        });
        let last = step + 1 == cfg.steps;
        if last || (cfg.val_every > 0 && (step + 1) % cfg.val_every == 0) {
            let v = validate(method, data, cfg)?;
            let (loss, accuracy) = (v.total.loss, v.total.accuracy);
            // With no validation window in any source (the CLI says so before training) there
            // is nothing to report, and an empty mean is not a diverged run.
            if v.total.tokens > 0 {
                let sources: Vec<_> = v
                    .sources
                    .into_iter()
                    .filter(|(_, s)| s.tokens > 0)
                    .collect();
                let line = MetricsLine {
                    step: step + 1,
                    kind: "val".into(),
                    loss,
                    accuracy: Some(accuracy),
                    lr: None,
                    grad_norm: None,
                    tokens_per_sec: None,
                    sources: (sources.len() > 1).then(|| sources.into_iter().collect()),
                };
                log(&line)?;
                go_on &= on_event(Event::Validation(&line));
                report.final_val_loss = Some(loss);
                report.final_val_accuracy = Some(accuracy);
            }
        }
        if !last && cfg.checkpoint_every > 0 && (step + 1) % cfg.checkpoint_every == 0 {
            check_finite(&params, step + 1)?;
            save_checkpoint(checkpoint_dir, step + 1, &params, &optimizer)?;
            go_on &= on_event(Event::Checkpoint(checkpoint_dir));
        }
        report.steps = step + 1;
        if !go_on {
            break;
        }
    }
    // The last update is checked like a checkpoint's: a run never ends "done" with weights or
    // a validation loss that are not finite (the caller writes its artifact on success).
    check_finite(&params, report.steps)?;
    if let Some(loss) = report.final_val_loss.filter(|l| !l.is_finite()) {
        return Err(Error::NonFinite {
            step: report.steps,
            what: format!("the validation loss ({loss})"),
        });
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// An error naming the first parameter that holds a value that is not finite at `step`.
fn check_finite(params: &[(String, &Tensor)], step: usize) -> Result<(), Error> {
    match params.iter().find(|(_, t)| !all_finite(t)) {
        Some((name, _)) => Err(Error::NonFinite {
            step,
            what: format!("parameter `{name}`"),
        }),
        None => Ok(()),
    }
}

/// Whether every value of `t` is finite (a tensor that cannot be read counts as not finite).
fn all_finite(t: &Tensor) -> bool {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .is_ok_and(|v| v.iter().all(|x| x.is_finite()))
}

/// Keeps the lines of a metrics file up to and including `step`.
fn truncate_metrics(path: &Path, step: usize) -> Result<(), Error> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<MetricsLine>(l).is_ok_and(|m| m.step <= step))
        .map(|l| format!("{l}\n"))
        .collect();
    mode_io::atomic::write_file(path, kept.as_bytes()).map_err(|e| Error::File {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}
