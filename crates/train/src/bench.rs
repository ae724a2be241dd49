//! `mode bench train`: training speed of full fine-tuning, LoRA and a frozen backbone with one
//! trainable branch, on the backbone's real shape, with the numbers needed to compare against a
//! peer measured on the same machine (tokens/s, CPU-seconds, peak RSS, model FLOPs utilisation).

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use mode_core::baseline::LoraTargets;
use mode_engine::model::{Batch, Block, Mix, Plan, Trainable};
use mode_infer::bench::median;
use mode_model::Backbone;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::{train_step, AdamW, AdamWConfig};

/// What trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchMode {
    /// Every parameter.
    Full,
    /// LoRA adapters on every linear layer.
    Lora,
    /// Frozen backbone plus copies of layers 10 and 11 reading the hidden state entering layer
    /// 10, mixed 0.5/0.5 into layer 11's output.
    Branch,
}

/// Sizes of a benchmark run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub mode: BenchMode,
    pub seq_len: usize,
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    pub seed: u64,
    /// Recompute activations in the backward pass (less memory, more compute).
    pub recompute_activations: bool,
}

/// Medians over the timed steps.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub mode: BenchMode,
    pub threads: usize,
    pub tokens_per_step: usize,
    pub tokens_per_sec: f64,
    pub sec_per_step: f64,
    pub cpu_sec_per_step: f64,
    pub peak_rss_mib: f64,
    pub trainable_params: usize,
    pub model_gflop_per_step: f64,
    pub gemm_peak_gflops: f64,
    pub mfu: f64,
    pub loss_first: f64,
    pub loss_last: f64,
    pub steps: usize,
}

/// Runs the benchmark on `model` (loaded in f32). LoRA mode attaches rank-16, alpha-32 adapters
/// to all seven projections of every layer.
pub fn run(model: &mut Backbone, cfg: &BenchConfig) -> Result<BenchResult> {
    if cfg.mode == BenchMode::Lora {
        model
            .attach_lora(16, 32.0, LoraTargets::AttnMlp.projections(), cfg.seed)
            .map_err(candle_core::Error::wrap)?;
    }
    let model = &*model;
    let layers = model.layers.len();
    let device = model.device().clone();
    let branch_layers = 10..12;
    let expert = match cfg.mode {
        BenchMode::Branch => {
            if layers < 13 {
                candle_core::bail!(
                    "the branch benchmark needs at least 13 layers, the model has {layers}"
                );
            }
            model.layers[branch_layers.clone()]
                .iter()
                .map(|l| l.deep_copy().map_err(candle_core::Error::wrap))
                .collect::<Result<Vec<_>>>()?
        }
        _ => Vec::new(),
    };
    let (plan, params): (Plan, Vec<(String, &Tensor)>) = match cfg.mode {
        BenchMode::Full => (
            Plan::backbone(Trainable::all(layers)),
            model.named_tensors(),
        ),
        BenchMode::Branch => {
            let params = expert
                .iter()
                .enumerate()
                .flat_map(|(l, layer)| {
                    layer
                        .named_tensors()
                        .into_iter()
                        .map(move |(n, t)| (mode_engine::names::expert_tensor(0, 0, l, &n), t))
                })
                .collect();
            let plan = Plan {
                backbone: Trainable::none(layers),
                blocks: vec![Block {
                    layers: branch_layers.clone(),
                    experts: vec![&expert],
                    residual: vec![false],
                    mix: Mix::Fixed(vec![0.5, 0.5]),
                    train_experts: vec![true],
                    train_gate: false,
                }],
                recompute_activations: false,
            };
            (plan, params)
        }
        BenchMode::Lora => (
            Plan::backbone(Trainable::lora(layers)),
            model.lora_tensors(),
        ),
    };
    let mut plan = plan;
    plan.recompute_activations = cfg.recompute_activations;
    let trainable_params = params.iter().map(|(_, t)| t.elem_count()).sum();
    let mut optimizer = AdamW::new(AdamWConfig::default());
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let vocab = model.config.vocab_size as u32;
    let (mut wall, mut cpu, mut losses) = (Vec::new(), Vec::new(), Vec::new());
    for step in 0..cfg.warmup + cfg.steps {
        let ids: Vec<u32> = (0..cfg.batch * cfg.seq_len)
            .map(|_| rng.random_range(0..vocab))
            .collect();
        let batch = Batch::next_token(Tensor::from_vec(ids, (cfg.batch, cfg.seq_len), &device)?)?;
        let (t0, c0) = (Instant::now(), process_cpu_seconds());
        let settings = crate::StepSettings {
            lr: 1e-4,
            max_grad_norm: 1.0,
            micro_batch_rows: 0,
        };
        let stats = train_step(
            model,
            &plan,
            &params,
            &mut optimizer,
            &batch,
            settings,
            &|_| 1.0,
        )?;
        let (dt, dc) = (t0.elapsed().as_secs_f64(), process_cpu_seconds() - c0);
        eprintln!(
            "mode: bench train {:?} step {step}{}: loss {:.4}, {:.2}s, {:.2} CPU-s",
            cfg.mode,
            if step < cfg.warmup { " (warm-up)" } else { "" },
            stats.loss,
            dt,
            dc
        );
        losses.push(stats.loss);
        if step >= cfg.warmup {
            wall.push(dt);
            cpu.push(dc);
        }
    }
    let tokens_per_step = cfg.batch * cfg.seq_len;
    let sec_per_step = median(&wall);
    let flops = model_flops_per_step(model, cfg, &plan, trainable_params);
    let peak = gemm_peak_gflops(&device)?;
    Ok(BenchResult {
        mode: cfg.mode,
        threads: candle_core::utils::get_num_threads(),
        tokens_per_step,
        tokens_per_sec: tokens_per_step as f64 / sec_per_step,
        sec_per_step,
        cpu_sec_per_step: median(&cpu),
        peak_rss_mib: peak_rss_bytes() as f64 / (1 << 20) as f64,
        trainable_params,
        model_gflop_per_step: flops / 1e9,
        gemm_peak_gflops: peak,
        mfu: flops / sec_per_step / (peak * 1e9),
        loss_first: losses[0],
        loss_last: *losses.last().expect("at least one step"),
        steps: cfg.steps,
    })
}

/// Matmul FLOPs of one step as this engine runs it: the forward pass, input gradients through
/// every layer after the first trainable one, weight gradients of trainable matrices, attention.
fn model_flops_per_step(model: &Backbone, cfg: &BenchConfig, plan: &Plan, trainable: usize) -> f64 {
    let c = &model.config;
    let tokens = (cfg.batch * cfg.seq_len) as f64;
    let (h, q, kv, f) = (
        c.hidden_size as f64,
        (c.num_attention_heads * c.head_dim) as f64,
        (c.num_key_value_heads * c.head_dim) as f64,
        c.intermediate_size as f64,
    );
    let layer_params = h * q + 2.0 * h * kv + q * h + 3.0 * h * f;
    let attn = 4.0 * (cfg.batch * cfg.seq_len * cfg.seq_len) as f64 * q;
    let layer_fwd = 2.0 * tokens * layer_params + attn;
    let head = 2.0 * tokens * h * c.vocab_size as f64;
    let layers = c.num_hidden_layers as f64;
    let (extra_layers, backward_layers) = match cfg.mode {
        BenchMode::Full => (0.0, layers),
        BenchMode::Lora => (0.0, layers),
        BenchMode::Branch => {
            let block = &plan.blocks[0];
            let expert_layers = block.experts[0].len() as f64;
            (
                expert_layers,
                layers - block.layers.end as f64 + expert_layers,
            )
        }
    };
    let forward = (layers + extra_layers) * layer_fwd + head;
    // Input gradients cost one forward matmul each; attention backward two.
    let backward_input = backward_layers * (2.0 * tokens * layer_params + 2.0 * attn) + head;
    let backward_weight = 2.0 * tokens * trainable as f64;
    forward + backward_input + backward_weight
}

/// Best f32 GEMM throughput of this machine on a transformer-shaped product
/// (512 x 576) x (576 x 1536), in GFLOP/s.
pub fn gemm_peak_gflops(device: &Device) -> Result<f64> {
    let (m, k, n) = (512, 576, 1536);
    let a = Tensor::ones((m, k), DType::F32, device)?;
    let b = Tensor::ones((k, n), DType::F32, device)?;
    let mut best = f64::INFINITY;
    for _ in 0..10 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        c.sum_all()?.to_scalar::<f32>()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (m * k * n) as f64 / best / 1e9)
}

/// User + system CPU time of this process so far, from /proc (0 where unavailable).
pub fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Peak resident set size of this process (VmHWM), in bytes (0 where unavailable).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
