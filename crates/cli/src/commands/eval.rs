use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::{ModelArgs, RoutingArgs};

/// Next-token accuracy, loss and perplexity on held-out files.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Protocol: each file is tokenised whole (plain text; JSONL: the `text` \
    fields joined by newlines) with no BOS/EOS, cut into consecutive windows of --seq-len tokens \
    (a last shorter window is kept if it has >= 2 tokens); position t predicts token t+1.\n\n\
    Routing flags measure what sparse gating costs: --gate-top-k 0 is the backbone alone, \
    --gate-top-k 1 runs one expert per token; the reported gate weights are the routed ones.\n\n\
    Example:\n  mode eval --data english.txt --data code.py --json\n  \
    mode eval --model models/code-math --data held_out.py --gate-top-k 1"
)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    routing: RoutingArgs,
    /// A file to evaluate (.txt or any text file; .jsonl uses its `text` fields), or a folder
    /// from `mode data prepare` (its test split); repeatable
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// Window length in tokens
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Windows per forward pass
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Evaluate at most this many windows per file, spread evenly over it (default: all)
    #[arg(long)]
    max_windows: Option<usize>,
    /// Print one JSON object keyed by file name instead of a table
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    if args.seq_len < 2 {
        bail!("--seq-len must be at least 2, got {}", args.seq_len);
    }
    super::check_range("--seq-len", args.seq_len, 2, super::MAX_TOKENS)?;
    // 0 was taken as 1 without a word.
    super::check_range("--batch-size", args.batch_size, 1, 4096)?;
    if args.max_windows == Some(0) {
        bail!("--max-windows must be at least 1");
    }
    for path in &args.data {
        super::check_input(path)?;
    }
    let (model, tokenizer) = args.model.load()?;
    // Dense routing runs the model exactly as trained.
    let lm = model.routed(args.routing.routing(&model)?)?;
    let mut reports = BTreeMap::new();
    for path in &args.data {
        let name = report_name(path, &args.data);
        let bar = ProgressBar::new(0).with_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} windows, {elapsed} (ETA {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(name.clone());
        let start = Instant::now();
        let mut report = mode_eval::evaluate_file(
            lm.as_ref(),
            &tokenizer,
            path,
            args.seq_len,
            args.batch_size,
            args.max_windows,
            |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            },
        )
        .with_context(|| format!("evaluating {}", path.display()))?;
        bar.finish_and_clear();
        report.gate_weights = model.take_gate_stats();
        eprintln!(
            "mode: {}: {} tokens in {:.1}s ({:.0} tokens/s)",
            mode_io::term::printable(&name),
            report.tokens,
            start.elapsed().as_secs_f64(),
            report.tokens as f64 / start.elapsed().as_secs_f64()
        );
        reports.insert(name, report);
    }
    if args.json {
        println!("{}", serde_json::to_string(&reports)?);
    } else {
        println!(
            "{:<32} {:>10} {:>15} {:>9} {:>11} {:>10} {:>12}",
            "file", "accuracy%", "95% interval", "loss", "perplexity", "tokens", "predictions"
        );
        for (name, r) in &reports {
            let i = r.accuracy_interval;
            println!(
                "{:<32} {:>10.2} {:>15} {:>9.4} {:>11.3} {:>10} {:>12}",
                mode_io::term::printable(name),
                100.0 * r.next_token_accuracy,
                format!("{:.2}-{:.2}", i.lo, i.hi),
                r.loss,
                r.perplexity,
                r.tokens,
                r.predictions
            );
            if let (Some(acc), Some(n)) = (r.answer_accuracy, r.answer_predictions) {
                println!(
                    "{:<32} answer tokens only: {:.2}% of {n} predictions",
                    "",
                    100.0 * acc
                );
            }
            if let Some(gates) = &r.gate_weights {
                let blocks: Vec<String> = gates
                    .iter()
                    .map(|b| {
                        b.iter()
                            .map(|w| format!("{w:.3}"))
                            .collect::<Vec<_>>()
                            .join("/")
                    })
                    .collect();
                println!(
                    "{:<32} gate weights per block (backbone/experts): {}",
                    "",
                    blocks.join("  ")
                );
            }
        }
    }
    Ok(())
}

/// The file's base name, or its full path when two inputs share a base name.
fn report_name(path: &std::path::Path, all: &[PathBuf]) -> String {
    let base = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let clashes = all
        .iter()
        .filter(|p| p.file_name() == path.file_name())
        .count()
        > 1;
    match base {
        Some(b) if !clashes => b,
        _ => path.display().to_string(),
    }
}
