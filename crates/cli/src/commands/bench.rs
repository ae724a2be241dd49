use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{IndexOp, Tensor};
use mode_model::{Backbone, CausalLm};
use mode_train::bench::median;

use super::BackboneArgs;

/// Speed benchmarks. Report medians of several runs; compare with peers measured in the same
/// session (see bench/peer/).
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand, Debug)]
enum What {
    /// Prefill, greedy decode and evaluation tokens/s of a backbone
    Infer(InferArgs),
    /// Training tokens/s, CPU-s, peak RSS and MFU: full fine-tuning, LoRA, frozen + branch
    Train(TrainArgs),
}

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Each mode runs in its own process so that peak RSS is per mode. The \
    default backbone's real weights are used when cached, random weights of its shape otherwise.\n\
    Compare with the PyTorch peer: make bench-train."
)]
struct TrainArgs {
    /// full, lora, branch, or all (each in a child process)
    #[arg(long, default_value = "all")]
    mode: String,
    /// A .gguf file or HF folder; default: SmolLM2-135M (cached weights, or random of its shape)
    #[arg(long)]
    backbone: Option<String>,
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Timed steps (medians are reported)
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first
    #[arg(long, default_value_t = 1)]
    warmup: usize,
}

#[derive(clap::Args, Debug)]
struct InferArgs {
    #[command(flatten)]
    backbone: BackboneArgs,
    /// Timed runs per measurement (after one warm-up); medians are reported
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Prompt length for the prefill measurement
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens generated per decode run
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Tokens scored per evaluation run (windows of --seq-len)
    #[arg(long, default_value_t = 2048)]
    eval_tokens: usize,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Print one JSON line instead of a table
    #[arg(long)]
    json: bool,
}

/// Public-domain text (the opening of Moby-Dick) used as benchmark input.
const TEXT: &str = "Call me Ishmael. Some years ago—never mind how long precisely—having little or no money \
in my purse, and nothing particular to interest me on shore, I thought I would sail about a little and see \
the watery part of the world. It is a way I have of driving off the spleen and regulating the circulation. \
Whenever I find myself growing grim about the mouth; whenever it is a damp, drizzly November in my soul; \
whenever I find myself involuntarily pausing before coffin warehouses, and bringing up the rear of every \
funeral I meet; and especially whenever my hypos get such an upper hand of me, that it requires a strong \
moral principle to prevent me from deliberately stepping into the street, and methodically knocking \
people's hats off—then, I account it high time to get to sea as soon as I can. ";

pub fn run(args: Args) -> Result<()> {
    match args.what {
        What::Infer(a) => infer(a),
        What::Train(a) => train(a),
    }
}

fn infer(args: InferArgs) -> Result<()> {
    if args.runs == 0 || args.prompt_tokens == 0 || args.new_tokens == 0 || args.eval_tokens < 2 {
        bail!("--runs, --prompt-tokens and --new-tokens must be positive and --eval-tokens >= 2");
    }
    let (model, tokenizer, path) = args.backbone.load()?;
    let mut ids = Vec::new();
    let text_ids = tokenizer.encode(TEXT)?;
    while ids.len() < args.prompt_tokens.max(args.eval_tokens) {
        ids.extend_from_slice(&text_ids);
    }
    let threads = candle_core::utils::get_num_threads();

    let (mut prefill, mut decode, mut eval) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..=args.runs {
        let (p, d) = prefill_and_decode(&model, &ids[..args.prompt_tokens], args.new_tokens)?;
        let start = Instant::now();
        mode_eval::evaluate_ids(
            &model,
            &ids[..args.eval_tokens],
            args.seq_len,
            4,
            None,
            |_| {},
        )?;
        let e = args.eval_tokens as f64 / start.elapsed().as_secs_f64();
        if run > 0 {
            prefill.push(p);
            decode.push(d);
            eval.push(e);
        }
        eprintln!(
            "mode: run {run}{}: prefill {p:.1}, decode {d:.1}, eval {e:.1} tokens/s",
            if run == 0 { " (warm-up)" } else { "" }
        );
    }
    let (p, d, e) = (median(&prefill), median(&decode), median(&eval));
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "backbone": path.display().to_string(),
                "threads": threads,
                "prefill_tokens_per_sec": p,
                "decode_tokens_per_sec": d,
                "eval_tokens_per_sec": e,
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens,
                "eval_tokens": args.eval_tokens,
                "runs": args.runs,
            })
        );
    } else {
        println!(
            "backbone {} ({threads} threads), medians of {} runs",
            path.display(),
            args.runs
        );
        println!(
            "  prefill  {p:>8.1} tokens/s  ({} prompt tokens)",
            args.prompt_tokens
        );
        println!(
            "  decode   {d:>8.1} tokens/s  ({} new tokens, greedy, KV cache)",
            args.new_tokens
        );
        println!(
            "  eval     {e:>8.1} tokens/s  ({} tokens, seq-len {})",
            args.eval_tokens, args.seq_len
        );
    }
    Ok(())
}

/// (prefill tokens/s, decode tokens/s) for one greedy generation that never stops early.
fn prefill_and_decode(model: &Backbone, prompt: &[u32], new_tokens: usize) -> Result<(f64, f64)> {
    let device = model.device();
    let mut cache = model.new_cache();
    let start = Instant::now();
    let ids = Tensor::new(prompt, device)?.unsqueeze(0)?;
    let hidden = model.forward_hidden(&ids, Some(&mut cache))?;
    let last = hidden
        .i((0, prompt.len() - 1..prompt.len(), ..))?
        .contiguous()?;
    let mut next = model
        .logits(&last)?
        .flatten_all()?
        .argmax(0)?
        .to_scalar::<u32>()?;
    let prefill = prompt.len() as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..new_tokens {
        let ids = Tensor::new(&[next], device)?.unsqueeze(0)?;
        let hidden = model.forward_hidden(&ids, Some(&mut cache))?;
        next = CausalLm::logits(model, &hidden)?
            .flatten_all()?
            .argmax(0)?
            .to_scalar::<u32>()?;
    }
    Ok((prefill, new_tokens as f64 / start.elapsed().as_secs_f64()))
}

fn train(args: TrainArgs) -> Result<()> {
    use mode_train::bench::{BenchConfig, BenchMode};
    if args.mode == "all" {
        // One child process per mode, so each reports its own peak RSS.
        for mode in ["branch", "full", "lora"] {
            let mut cmd = std::process::Command::new(std::env::current_exe()?);
            cmd.args(["bench", "train", "--mode", mode])
                .args([
                    "--seq-len",
                    &args.seq_len.to_string(),
                    "--batch",
                    &args.batch.to_string(),
                ])
                .args([
                    "--steps",
                    &args.steps.to_string(),
                    "--warmup",
                    &args.warmup.to_string(),
                ]);
            if let Some(b) = &args.backbone {
                cmd.args(["--backbone", b]);
            }
            let status = cmd.status()?;
            if !status.success() {
                eprintln!("mode: bench train --mode {mode} failed ({status})");
            }
        }
        return Ok(());
    }
    let mode = match args.mode.as_str() {
        "full" => BenchMode::Full,
        "lora" => BenchMode::Lora,
        "branch" => BenchMode::Branch,
        other => bail!("--mode must be full, lora, branch or all, got `{other}`"),
    };
    if args.seq_len < 2 || args.batch == 0 || args.steps == 0 {
        bail!("--seq-len must be >= 2, --batch and --steps positive");
    }
    let device = candle_core::Device::Cpu;
    let (mut model, weights) = match &args.backbone {
        Some(spec) => {
            let path = mode_io::fetch::resolve_backbone(spec)?;
            (
                Backbone::open(&path, candle_core::DType::F32, &device)?.0,
                path.display().to_string(),
            )
        }
        None => {
            let path = mode_io::fetch::default_backbone_path();
            if path.exists() {
                (
                    Backbone::open(&path, candle_core::DType::F32, &device)?.0,
                    path.display().to_string(),
                )
            } else {
                let config = mode_model::Config::smollm2_135m();
                let weights = mode_model::random_weights(&config, 0);
                let model = Backbone::load(config, &weights, candle_core::DType::F32, &device)?;
                (model, "random SmolLM2-135M-shaped weights".to_string())
            }
        }
    };
    let config = BenchConfig {
        mode,
        seq_len: args.seq_len,
        batch: args.batch,
        steps: args.steps,
        warmup: args.warmup,
        seed: 0,
    };
    let result = mode_train::bench::run(&mut model, &config)?;
    let mut json = serde_json::to_value(&result)?;
    json["weights"] = serde_json::Value::String(weights);
    println!("{json}");
    Ok(())
}
