use std::time::Instant;

use anyhow::{bail, Result};
use mode_infer::bench::{self, median};
use mode_model::{Backbone, CausalLm};

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
    /// Time to first token and decode tokens/s: backbone alone, +1 expert, +2 experts, sparse
    Decode(DecodeArgs),
}

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Runs the configurations round-robin (one run of each in turn), so that load \
    on the machine hits them alike, and reports medians. Without --model or --expert, the experts \
    are copies of each block's first layers with fresh gates (backbone weight 0.9): their speed is \
    a trained expert's speed, but top-k and threshold routing only show their real effect on \
    trained gates.\n\n\
    Example:\n  mode bench decode --model models/code-math --runs 5"
)]
struct DecodeArgs {
    #[command(flatten)]
    backbone: BackboneArgs,
    /// A composed model whose experts and gates to use (at least two experts)
    #[arg(long, conflicts_with = "expert")]
    model: Option<std::path::PathBuf>,
    /// Expert files to use (two or more), instead of --model
    #[arg(long)]
    expert: Vec<std::path::PathBuf>,
    /// Blocks of made-up experts (without --model or --expert)
    #[arg(long, default_value_t = 3)]
    blocks: usize,
    /// Layers per block of made-up experts
    #[arg(long, default_value_t = 2)]
    expert_layers: usize,
    /// Timed runs per configuration (after one warm-up round); medians are reported
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Prompt length: time to first token covers its prefill
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens generated per run (greedy, KV cache)
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Print one JSON line instead of a table
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Each mode runs in its own process so that peak RSS is per mode. The \
    default backbone's real weights are used when cached, random weights of its shape otherwise.\n\
    Compare with the PyTorch peer: make bench-train."
)]
struct TrainArgs {
    /// What trains: full, lora, branch, or all (each in a child process)
    #[arg(long, value_enum, default_value_t = TrainBenchMode::All)]
    mode: TrainBenchMode,
    /// A known name (`smollm2-135m`, `gemma3-270m`: fetched on first use), a .gguf file or HF
    /// folder; default: SmolLM2-135M (cached weights, or random of its shape)
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
    /// Recompute activations in the backward pass (trades compute for peak memory)
    #[arg(long)]
    recompute_activations: bool,
}

/// `mode bench train --mode`: one of the library's modes, or each in turn.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum TrainBenchMode {
    All,
    Full,
    Lora,
    Branch,
}

#[derive(clap::Args, Debug)]
struct InferArgs {
    #[command(flatten)]
    backbone: BackboneArgs,
    /// Timed runs per measurement (after one warm-up); medians are reported
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Prompt length for the prefill measurement (the tokenizer's BOS, if it adds one, counts)
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
    /// Also time batched decoding: for each count N (comma-separated, e.g. 8,32), N sequences
    /// after the same prompt decoded together, one batched step per token as `mode serve` runs
    /// its requests; reports their aggregate tokens/s
    #[arg(long, value_delimiter = ',')]
    streams: Vec<usize>,
    /// Print one JSON line instead of a table
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    match args.what {
        What::Infer(a) => infer(a),
        What::Train(a) => train(a),
        What::Decode(a) => decode(a),
    }
}

/// The most sequences a batched decode measurement runs together.
const MAX_STREAMS: usize = 1024;

/// The most timed runs (or steps) a benchmark takes.
const MAX_RUNS: usize = 1000;

fn infer(args: InferArgs) -> Result<()> {
    if args.runs == 0 || args.prompt_tokens == 0 || args.new_tokens == 0 || args.eval_tokens < 2 {
        bail!("--runs, --prompt-tokens and --new-tokens must be positive and --eval-tokens >= 2");
    }
    super::check_range("--runs", args.runs, 1, MAX_RUNS)?;
    for (flag, n) in [
        ("--prompt-tokens", args.prompt_tokens),
        ("--new-tokens", args.new_tokens),
        ("--eval-tokens", args.eval_tokens),
        ("--seq-len", args.seq_len),
    ] {
        super::check_range(flag, n, 1, super::MAX_TOKENS)?;
    }
    for &n in &args.streams {
        super::check_range("--streams", n, 1, MAX_STREAMS)?;
    }
    let (backbone, tokenizer, path) = args.backbone.load()?;
    // The batched steps are the server's, on the backbone with no experts; the single stream
    // runs the backbone itself, as before.
    let bare = mode_core::ModeModel::bare(backbone)?;
    let model = &bare.backbone;
    let ids = bench::text_ids(&tokenizer, args.prompt_tokens.max(args.eval_tokens))?;
    // The prompt begins with the BOS where the tokenizer asks for one (Gemma), as a user's prompt
    // would and as the peer's plain-text prompt does (bench/peer/hf_generate.py); then the text.
    let prompt: Vec<u32> = tokenizer
        .leading_bos()
        .into_iter()
        .chain(ids.iter().copied())
        .take(args.prompt_tokens)
        .collect();
    let threads = candle_core::utils::get_num_threads();

    let (mut prefill, mut decode, mut eval) = (Vec::new(), Vec::new(), Vec::new());
    let mut batched: Vec<Vec<f64>> = vec![Vec::new(); args.streams.len()];
    for run in 0..=args.runs {
        let g = bench::time_greedy(model, &prompt, args.new_tokens)?;
        let (p, d) = (g.prefill_tokens_per_sec, g.decode_tokens_per_sec);
        let start = Instant::now();
        mode_eval::evaluate_ids(
            model,
            &mode_eval::EvalSet::plain(ids[..args.eval_tokens].to_vec())
                .with_bos(tokenizer.leading_bos()),
            args.seq_len,
            4,
            None,
            |_| {},
        )?;
        let e = args.eval_tokens as f64 / start.elapsed().as_secs_f64();
        let mut line = format!("prefill {p:.1}, decode {d:.1}, eval {e:.1}");
        for (i, &n) in args.streams.iter().enumerate() {
            let tps = bench::time_batched_greedy(&bare, &prompt, n, args.new_tokens)?;
            line += &format!(", {n} streams {tps:.1}");
            if run > 0 {
                batched[i].push(tps);
            }
        }
        if run > 0 {
            prefill.push(p);
            decode.push(d);
            eval.push(e);
        }
        eprintln!(
            "mode: run {run}{}: {line} tokens/s",
            if run == 0 { " (warm-up)" } else { "" }
        );
    }
    let (p, d, e) = (median(&prefill), median(&decode), median(&eval));
    let batched: Vec<(usize, f64)> = args
        .streams
        .iter()
        .zip(&batched)
        .map(|(&n, t)| (n, median(t)))
        .collect();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "backbone": path.display().to_string(),
                "threads": threads,
                "prefill_tokens_per_sec": p,
                "decode_tokens_per_sec": d,
                "eval_tokens_per_sec": e,
                "batched_decode_tokens_per_sec": batched
                    .iter()
                    .map(|(n, t)| (n.to_string(), *t))
                    .collect::<std::collections::BTreeMap<_, _>>(),
                "prompt_tokens": args.prompt_tokens,
                "prompt_bos": tokenizer.leading_bos(),
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
        for (n, t) in batched {
            println!("  decode   {t:>8.1} tokens/s  ({n} streams together, all rows' tokens)");
        }
    }
    Ok(())
}

/// The model `bench decode` measures: given experts, or made-up ones over `backbone`.
fn decode_model(args: &DecodeArgs) -> Result<(mode_core::ModeModel, mode_io::Tokenizer, String)> {
    use mode_core::{BlockLayout, Expert, ExpertInit, Gate, LoadedModel, ModeModel};
    let model_args = super::ModelArgs {
        backbone: args.backbone.clone(),
        model: args.model.clone(),
        expert: args.expert.clone(),
    };
    if args.model.is_some() || !args.expert.is_empty() {
        let (model, tokenizer) = model_args.load()?;
        let what = match (&args.model, &model) {
            (Some(dir), _) => dir.display().to_string(),
            _ => "expert files".to_string(),
        };
        let LoadedModel::Mode(m) = model else {
            bail!("{what} is not a MoDE model: bench decode needs experts");
        };
        if m.experts.len() < 2 {
            bail!(
                "{what} has {} expert(s); bench decode needs two",
                m.experts.len()
            );
        }
        return Ok((*m, tokenizer, what));
    }
    let (backbone, tokenizer, _) = args.backbone.load()?;
    let layout = BlockLayout::even(backbone.layers.len(), args.blocks, args.expert_layers)?;
    let experts = (0..2)
        .map(|j| {
            Expert::new(
                &format!("expert{j}"),
                &backbone,
                &layout,
                ExpertInit::Copy,
                j,
            )
        })
        .collect::<mode_core::Result<Vec<_>>>()?;
    let gates = (0..layout.num_blocks())
        .map(|_| {
            Gate::new(
                backbone.config.hidden_size,
                2,
                mode_core::expert::GATE_INIT_BACKBONE_PROB,
                backbone.embed_tokens.dtype(),
                backbone.device(),
            )
        })
        .collect::<mode_core::Result<Vec<_>>>()?;
    let what = format!(
        "made-up experts, {} blocks x {} layers",
        args.blocks, args.expert_layers
    );
    Ok((
        ModeModel::new(backbone, layout, experts, gates)?,
        tokenizer,
        what,
    ))
}

fn decode(args: DecodeArgs) -> Result<()> {
    use mode_core::Routing;
    if args.runs == 0 || args.prompt_tokens == 0 || args.new_tokens == 0 {
        bail!("--runs, --prompt-tokens and --new-tokens must be positive");
    }
    super::check_range("--runs", args.runs, 1, MAX_RUNS)?;
    super::check_range("--prompt-tokens", args.prompt_tokens, 1, super::MAX_TOKENS)?;
    super::check_range("--new-tokens", args.new_tokens, 1, super::MAX_TOKENS)?;
    super::check_range("--blocks", args.blocks, 1, 1024)?;
    super::check_range(
        "--expert-layers",
        args.expert_layers,
        1,
        super::train::MAX_EXPERT_LAYERS,
    )?;
    let (model, tokenizer, what) = decode_model(&args)?;
    let prompt = bench::text_ids(&tokenizer, args.prompt_tokens)?;
    let only = |experts: Vec<usize>| Routing {
        experts: Some(experts),
        ..Default::default()
    };
    let routings = [
        ("+1 expert", only(vec![0])),
        ("+2 experts", Routing::default()),
        (
            "+2 experts, top-1",
            Routing {
                top_k: Some(1),
                ..Default::default()
            },
        ),
        (
            "+2 experts, threshold 0.1",
            Routing {
                threshold: Some(0.1),
                ..Default::default()
            },
        ),
    ];
    let routed = routings
        .iter()
        .map(|(name, r)| Ok((*name, model.routed(r.clone())?)))
        .collect::<Result<Vec<_>>>()?;
    // The reference is the backbone's own forward, not the MoDE forward without experts.
    let mut configs: Vec<(&str, &dyn CausalLm)> = vec![("backbone", &model.backbone)];
    configs.extend(routed.iter().map(|(name, m)| (*name, m as &dyn CausalLm)));
    let threads = candle_core::utils::get_num_threads();
    let rows = bench::round_robin(
        &configs,
        &prompt,
        args.new_tokens,
        args.runs,
        |run, name, g| {
            eprintln!(
                "mode: run {run}{} {name}: first token {:.3}s, decode {:.1} tokens/s",
                if run == 0 { " (warm-up)" } else { "" },
                g.first_token_secs,
                g.decode_tokens_per_sec
            );
        },
    )?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "model": what,
                "threads": threads,
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens,
                "runs": args.runs,
                "configs": rows,
                "ratio_2experts": rows[2].decode_vs_reference,
            })
        );
        return Ok(());
    }
    println!(
        "{} ({threads} threads), {} prompt tokens, {} new tokens, medians of {} runs",
        mode_io::term::printable(&what),
        args.prompt_tokens,
        args.new_tokens,
        args.runs
    );
    println!(
        "  {:<28} {:>12} {:>12} {:>12} {:>10}",
        "config", "first tok s", "prefill t/s", "decode t/s", "vs bb"
    );
    for r in &rows {
        println!(
            "  {:<28} {:>12.3} {:>12.1} {:>12.1} {:>9.2}x",
            r.config,
            r.first_token_secs,
            r.prefill_tokens_per_sec,
            r.decode_tokens_per_sec,
            r.decode_vs_reference,
        );
    }
    Ok(())
}

fn train(args: TrainArgs) -> Result<()> {
    use mode_train::bench::{BenchConfig, BenchMode};
    let mode = match args.mode {
        TrainBenchMode::Full => BenchMode::Full,
        TrainBenchMode::Lora => BenchMode::Lora,
        TrainBenchMode::Branch => BenchMode::Branch,
        TrainBenchMode::All => {
            // One child process per mode, so each reports its own peak RSS.
            return train_each_in_a_process(&args);
        }
    };
    if args.seq_len < 2 || args.batch == 0 || args.steps == 0 {
        bail!("--seq-len must be >= 2, --batch and --steps positive");
    }
    super::check_range("--seq-len", args.seq_len, 2, super::MAX_TOKENS)?;
    super::check_range("--batch", args.batch, 1, 4096)?;
    super::check_range("--steps", args.steps, 1, MAX_RUNS)?;
    super::check_range("--warmup", args.warmup, 0, MAX_RUNS)?;
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
                let model = Backbone::random(config, 0, candle_core::DType::F32, &device)?;
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
        recompute_activations: args.recompute_activations,
    };
    let result = mode_train::bench::run(&mut model, &config)?;
    let mut json = serde_json::to_value(&result)?;
    json["weights"] = serde_json::Value::String(weights);
    println!("{json}");
    Ok(())
}

/// `mode bench train --mode all`: each mode in its own child process (its own peak RSS).
fn train_each_in_a_process(args: &TrainArgs) -> Result<()> {
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
        if args.recompute_activations {
            cmd.arg("--recompute-activations");
        }
        let status = cmd.status()?;
        if !status.success() {
            eprintln!("mode: bench train --mode {mode} failed ({status})");
        }
    }
    Ok(())
}
