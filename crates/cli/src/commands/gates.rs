use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use mode_eval::gates;

use super::{LoadedModel, ModelArgs, RoutingArgs};

/// Show how each block's gate mixes backbone and experts over a text, token by token.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "The text runs in consecutive windows of --seq-len tokens, each with a fresh \
    context (as in `mode eval`). Without --html, prints the mean weight per block and branch; \
    with --html, also writes a self-contained page (no scripts) showing every token coloured by \
    its gate weights per block, with the exact weights on hover.\n\n\
    Example:\n  mode gates --model models/code-math --data sample.py --html gates.html\n  \
    mode gates --model models/code-math --data sample.py --gate-top-k 1"
)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    routing: RoutingArgs,
    /// A text file (.jsonl: its `text` fields joined by newlines), or a folder from
    /// `mode data prepare` (its test split)
    #[arg(long)]
    data: PathBuf,
    /// Write the HTML page here
    #[arg(long, value_name = "FILE.html")]
    html: Option<PathBuf>,
    /// Replace the --html file if it already exists
    #[arg(long)]
    force: bool,
    /// Show at most this many tokens, from the start of the data
    #[arg(long, default_value_t = 2000)]
    max_tokens: usize,
    /// Window length in tokens
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
}

pub fn run(args: Args) -> Result<()> {
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    super::check_range("--seq-len", args.seq_len, 1, super::MAX_TOKENS)?;
    super::check_input(&args.data)?;
    if let Some(html) = &args.html {
        let mut inputs: Vec<&std::path::Path> = vec![&args.data];
        inputs.extend(args.model.model.as_deref());
        inputs.extend(args.model.expert.iter().map(|p| p.as_path()));
        let backbone = args
            .model
            .backbone
            .backbone
            .as_deref()
            .map(std::path::Path::new);
        inputs.extend(backbone.filter(|p| p.exists()));
        mode_io::input::check_apart(html, &inputs)
            .map_err(|m| anyhow::anyhow!("--html {}: {m}", html.display()))?;
        if html.exists() && !args.force {
            bail!(
                "{}: already exists; pass --force to replace it",
                html.display()
            );
        }
    }
    let (model, tokenizer) = args.model.load()?;
    let LoadedModel::Mode(mode) = &model else {
        bail!(
            "the model has no gates: `mode gates` needs experts (--model with a folder from \
             `mode compose`, or --expert FILE)"
        );
    };
    let routing = args.routing.routing(&model)?;
    let mut ids = mode_eval::eval_ids(&args.data, &tokenizer)
        .with_context(|| format!("reading {}", args.data.display()))?;
    if ids.is_empty() {
        bail!("{}: no tokens to show", args.data.display());
    }
    ids.truncate(args.max_tokens);
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("gates [{bar:30}] {pos}/{len} windows, {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let trace = gates::trace(
        mode,
        &routing,
        &tokenizer,
        &ids,
        args.seq_len,
        |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )
    .with_context(|| format!("running the model over {}", args.data.display()))?;
    bar.finish_and_clear();
    // The branches are named after the experts' domains, from their files' headers.
    print!(
        "{}",
        mode_io::term::printable_lines(&gates::summary_table(&trace))
    );
    if let Some(path) = &args.html {
        let about = gates::About {
            model: match &args.model.model {
                Some(dir) => dir.display().to_string(),
                None => args
                    .model
                    .expert
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" + "),
            },
            data: args.data.display().to_string(),
            routing: gates::describe_routing(&routing, &mode.expert_names()),
            seq_len: args.seq_len,
        };
        mode_io::atomic::write_file(path, gates::html(&trace, &about).as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        println!(
            "wrote {} ({} tokens x {} blocks)",
            path.display(),
            trace.ids.len(),
            trace.blocks.len()
        );
    }
    Ok(())
}
