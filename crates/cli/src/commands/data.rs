use std::path::PathBuf;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use mode_data::{Format, PrepareOptions, Split};
use mode_io::{ChatTemplate, GgufFile, Tokenizer};

/// Prepare corpora for training and evaluation.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand, Debug)]
enum What {
    /// Tokenise, split by document and pack inputs into a folder that trains and evaluates fast
    Prepare(PrepareArgs),
}

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Inputs: text files (one document each), folders (every file, or those \
    matching --glob), JSONL with `text`, `prompt`+`completion` (loss on the completion only) or \
    chat `messages` (loss on assistant turns, rendered with the backbone's chat template), \
    Parquet (one document per row) with a `text` column, `prompt`+`completion` columns, or a \
    single string column.\n\
    Records that cannot be used (empty, null, not UTF-8, a line over 1 MiB) are skipped, \
    counted and listed with file and line or row.\n\n\
    Examples:\n  mode data prepare --input django/ --glob '*.py' --out data/code\n  \
    mode data prepare --input train-00000.parquet --column content --out data/web"
)]
struct PrepareArgs {
    /// A file or folder; repeatable
    #[arg(long, required = true)]
    input: Vec<PathBuf>,
    /// Output folder (manifest.json and token shards)
    #[arg(long)]
    out: PathBuf,
    /// Only files whose name (or path) matches this glob, inside folders
    #[arg(long)]
    glob: Option<String>,
    /// auto (by extension: .jsonl, .parquet, anything else text), text, jsonl or parquet
    #[arg(long, default_value = "auto")]
    format: Format,
    /// The JSONL field or Parquet column that holds the text [default: `text`; Parquet: else
    /// `prompt`+`completion`, else the only string column]
    #[arg(long, value_name = "C")]
    column: Option<String>,
    /// Fraction of documents held out for validation
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    /// Fraction of documents held out for testing
    #[arg(long, default_value_t = 0.05)]
    test_fraction: f64,
    /// Seed of the document split
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Replace --out if it exists
    #[arg(long)]
    force: bool,
    /// Backbone whose tokenizer to use: smollm2-135m, or a .gguf file or Hugging Face folder
    #[arg(long, default_value = mode_io::fetch::DEFAULT_BACKBONE)]
    backbone: String,
}

pub fn run(args: Args) -> Result<()> {
    match args.what {
        What::Prepare(a) => prepare(a),
    }
}

fn prepare(args: PrepareArgs) -> Result<()> {
    let path = mode_io::fetch::resolve_backbone(&args.backbone)?;
    let tokenizer = if path.is_dir() {
        Tokenizer::from_hf_dir(&path)?
    } else {
        Tokenizer::from_gguf(&GgufFile::open(&path)?)?
    };
    let chat = ChatTemplate::own(&tokenizer);
    let opts = PrepareOptions {
        inputs: args.input,
        out: args.out.clone(),
        glob: args.glob,
        format: args.format,
        column: args.column,
        val_fraction: args.val_fraction,
        test_fraction: args.test_fraction,
        seed: args.seed,
        force: args.force,
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("reading [{bar:30}] {pos}/{len} files ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let manifest = mode_data::prepare(&opts, &tokenizer, chat.as_ref(), |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    println!(
        "prepared {} from {} files",
        args.out.display(),
        manifest.sources.len()
    );
    for split in Split::ALL {
        let s = &manifest.splits[&split];
        println!(
            "  {:<5} {:>8} documents {:>12} tokens ({} with loss)",
            split.name(),
            s.documents,
            s.tokens,
            s.loss_tokens
        );
    }
    let held_out = [Split::Val, Split::Test].map(|split| manifest.splits[&split].documents);
    if held_out == [0, 0] && args.val_fraction + args.test_fraction > 0.0 {
        // Splits are by document: a single file (or a few) leaves nothing to validate on.
        eprintln!(
            "mode: warning: validation and test got no document ({} in all): nothing is held out \
             to validate or test on; give it more documents (several files, or one JSONL row each)",
            manifest.splits[&Split::Train].documents
        );
    }
    if manifest.skipped_total > 0 {
        println!("  skipped {} records:", manifest.skipped_total);
        for s in manifest.skipped.iter().take(10) {
            // Both may quote the input's own bytes.
            println!(
                "    {}: {}",
                mode_io::term::printable(&s.location),
                mode_io::term::printable(&s.reason)
            );
        }
        if manifest.skipped_total > 10 {
            println!("    ... (the first 100 are listed in manifest.json)");
        }
    }
    Ok(())
}
