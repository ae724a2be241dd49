//! `mode demo`: the paper's experiment end to end at our scale, as a comparison that can tell
//! methods apart. One run fetches the backbone and the data, trains every method at one token
//! budget with its own learning rate (chosen on validation by `--select-lr`, see
//! [`select_lr`]), scores all of them on the same windows of held-out Math, Code and two
//! retention sets (Shakespeare, Wikipedia prose), and writes `results.json` (every window's
//! counts) and a self-contained `report.html`: cells with 95% intervals, claims read from
//! paired bootstrap intervals ([`results`]), seeds, and the learning-forgetting trade-off.
//!
//! Every run's outcome is saved as soon as it is known (`runs/NAME.json`), and training
//! resumes from checkpoints, so a demo that is stopped picks up where it was.

pub mod continual;
pub mod data;
pub mod method;
pub mod report;
pub mod results;
mod runner;
pub mod select_lr;
pub mod select_recipe;
pub mod svg;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use mode_data::PreparedData;
use mode_model::Backbone;
use mode_train::trainer::{Event, TrainConfig};
use serde::{Deserialize, Serialize};

use method::{Domain, Method, RunSpec};
use results::{Results, RunResult};
use runner::{Runner, Scoring};
use select_lr::{LearningRates, LrSelection};
use select_recipe::RecipeSelection;

/// Errors of a demo run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Step(String),
    #[error(transparent)]
    Data(#[from] mode_data::Error),
    #[error(transparent)]
    Train(#[from] mode_train::trainer::Error),
    #[error(transparent)]
    Mode(#[from] mode_core::Error),
    #[error(transparent)]
    Model(#[from] mode_model::Error),
    #[error(transparent)]
    Eval(#[from] mode_eval::Error),
    #[error(transparent)]
    Fetch(#[from] mode_io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// How big a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// A smoke run of a few minutes; the numbers mean nothing.
    Quick,
    /// About 30 minutes on a 2-core machine: the headline methods (and composed MoDE under the
    /// committed retention-aware recipe), one seed.
    Default,
    /// Longer training, three seeds of the headline methods, every MoDE variant, more
    /// evaluation windows.
    Full,
}

/// The budget every method gets, and the shapes of the adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// Optimizer steps per method (tokens = steps x batch_tokens). MoDE's composed methods
    /// spend `compose_steps` of them in stage 2 and split the rest between the two experts.
    pub steps: usize,
    pub compose_steps: usize,
    pub batch_tokens: usize,
    pub seq_len: usize,
    pub blocks: usize,
    pub expert_layers_per_block: usize,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    /// Extra LoRA ranks trained and evaluated among the `--full` variants; every preset leaves
    /// it empty (`--scaling` sweeps LoRA ranks on its own).
    pub lora_sweep: Vec<usize>,
    /// Learning rate per stage (from `crates/demo/lr_selection*.json`, the one chosen on the
    /// backbone when there is one).
    pub lr: LearningRates,
    /// The first seed (data order, adapter initialisation).
    pub seed: u64,
    /// Seeds of the headline methods (full FT, LoRA, composed MoDE): `seed`, `seed + 1`, ...
    pub seeds: usize,
    /// Evaluation windows per held-out set, spread over it; the same for every method.
    pub eval_windows: usize,
    pub eval_seq_len: usize,
    /// Validation windows per domain when choosing learning rates.
    pub select_windows: usize,
    /// Steps of the learning-forgetting trade-off (`--tradeoff`).
    pub tradeoff_steps: Vec<usize>,
}

impl Budget {
    pub fn preset(p: Preset) -> Self {
        let base = Self {
            steps: 64,
            compose_steps: 16,
            batch_tokens: 512,
            seq_len: 256,
            blocks: 3,
            expert_layers_per_block: 2,
            lora_rank: 16,
            lora_alpha: 32.0,
            lora_sweep: Vec::new(),
            lr: LrSelection::committed().chosen,
            seed: 0,
            seeds: 1,
            eval_windows: 64,
            eval_seq_len: 256,
            select_windows: 64,
            // Each length at most 8x the table's, so that the whole study (about 2.5 hours
            // here) fits in one sitting.
            tradeoff_steps: vec![64, 256, 512],
        };
        match p {
            Preset::Default => base,
            Preset::Quick => Self {
                steps: 4,
                compose_steps: 2,
                batch_tokens: 256,
                seq_len: 128,
                expert_layers_per_block: 1,
                eval_windows: 4,
                eval_seq_len: 128,
                select_windows: 2,
                tradeoff_steps: vec![4, 8],
                ..base
            },
            // Twice the training and half again the windows, three seeds: about 2.5 hours here.
            // LoRA ranks are swept by `--scaling`.
            Preset::Full => Self {
                steps: 128,
                compose_steps: 32,
                seeds: 3,
                eval_windows: 96,
                ..base
            },
        }
    }

    /// Stage-2 steps of a composed run of `steps` in all (the budget's share).
    pub fn compose_steps_for(&self, steps: usize) -> usize {
        (self.compose_steps * steps / self.steps.max(1)).max(1)
    }

    /// Steps of each stage-1 expert of a composed run of `steps` in all.
    pub fn expert_steps(&self, steps: usize) -> usize {
        (steps.saturating_sub(self.compose_steps_for(steps)) / 2).max(1)
    }

    /// The trainer's settings for `steps` at `lr`.
    pub fn train_config(&self, steps: usize, lr: f64, seed: u64) -> TrainConfig {
        TrainConfig {
            steps,
            batch_tokens: self.batch_tokens,
            seq_len: self.seq_len,
            lr,
            seed,
            lr_warmup_steps: (steps / 10).max(1),
            val_every: (steps / 2).max(1),
            val_windows: 8,
            // A full fine-tuning checkpoint is the whole model plus AdamW state (~1.6 GB for
            // 135M parameters): worth writing only on runs long enough to lose.
            checkpoint_every: if steps > 48 { steps / 2 } else { 0 },
            ..Default::default()
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub out: PathBuf,
    pub preset: Preset,
    pub budget: Budget,
    /// `smollm2-135m` or a path.
    pub backbone: String,
    /// Use this folder (with `math/`, `code/`, `english/`, `prose/`) instead of fetching.
    pub data_dir: Option<PathBuf>,
    /// Discard earlier results in `out` (the prepared data stays).
    pub restart: bool,
    /// Also run the scaling sweeps ([`scaling_runs`]): the paper's Figure 3 at our scale.
    pub scaling: bool,
    /// Also run the learning-forgetting trade-off ([`Budget::tradeoff_steps`]).
    pub tradeoff: bool,
}

/// What a demo folder was run with: `demo.json`. Results from another budget or backbone are
/// never mixed into a table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RunKey {
    preset: Preset,
    budget: Budget,
    backbone: String,
}

/// Makes `out` hold results of this budget only: keeps them when `demo.json` matches, clears
/// them with `restart`, and refuses otherwise.
fn claim_output(opts: &DemoOptions) -> Result<()> {
    let key = RunKey {
        preset: opts.preset,
        budget: opts.budget.clone(),
        backbone: opts.backbone.clone(),
    };
    let path = opts.out.join("demo.json");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let earlier: Option<RunKey> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let other = earlier.as_ref().is_some_and(|k| *k != key)
        || (earlier.is_none() && opts.out.join("runs").exists());
    if opts.restart || other {
        if !opts.restart {
            return Err(Error::Step(format!(
                "{} holds results of another budget, backbone or version of the demo; pass \
                 --restart to discard them, or choose another --out",
                opts.out.display()
            )));
        }
        for sub in ["runs", "models", "experts"] {
            let dir = opts.out.join(sub);
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
            }
        }
    }
    std::fs::create_dir_all(opts.out.join("runs")).map_err(io(&opts.out))?;
    save_json(&path, &key)
}

/// Progress of a demo, for the caller to show.
pub trait Reporter {
    /// A new stage starts (`training full_ft`, `scoring lora`).
    fn stage(&mut self, what: &str);
    /// A training loop event; the return value is the loop's go-on flag.
    fn train(&mut self, event: Event) -> bool;
}

/// Documents per domain of the "fewer training examples" runs of the scaling sweep.
pub const SCALING_DOCUMENTS: [usize; 2] = [32, 256];

/// The scaling sweep (Figure 3 of the paper), all on the Math+Code mix at the budget's steps:
/// LoRA at ranks 4, 16 and 64 and one fresh MoDE expert at 1, 2 and 4 layers per block, then
/// LoRA and the MoDE expert trained on only the first [`SCALING_DOCUMENTS`] documents of each
/// domain.
pub fn scaling_runs(b: &Budget) -> Vec<RunSpec> {
    let mut specs: Vec<RunSpec> = [4, 16, 64]
        .into_iter()
        .map(|rank| RunSpec::new(Method::Lora { rank }, b))
        .collect();
    specs.extend(
        [1, 2, 4]
            .into_iter()
            .map(|layers| RunSpec::new(Method::FreshMix { layers }, b)),
    );
    for n in SCALING_DOCUMENTS {
        for method in [
            Method::Lora { rank: b.lora_rank },
            Method::FreshMix {
                layers: b.expert_layers_per_block,
            },
        ] {
            specs.push(RunSpec {
                documents: Some(n),
                ..RunSpec::new(method, b)
            });
        }
    }
    specs
}

/// The headline methods: what the paper's claims compare.
fn headline(b: &Budget) -> [Method; 3] {
    [
        Method::FullFt,
        Method::Lora { rank: b.lora_rank },
        Method::Composed {
            freeze_experts: false,
        },
    ]
}

/// Every run of a demo, in the order they run: the backbone, the headline methods for each
/// seed, then (`--full`) every MoDE variant and the budget's LoRA sweep, the scaling sweep and
/// the trade-off's longer runs when asked for.
pub fn plan(opts: &DemoOptions) -> Vec<RunSpec> {
    let b = &opts.budget;
    let mut specs = vec![RunSpec::new(Method::Backbone, b)];
    let recipe = RecipeSelection::committed();
    let aware = (recipe.is_selected() && !recipe.chosen.is_paper()).then_some(recipe.chosen);
    for s in 0..b.seeds.max(1) as u64 {
        for m in headline(b) {
            let spec = RunSpec::new(m, b).with_seed(b.seed + s);
            specs.push(spec);
            // The retention-aware recipe beside the paper's: composed MoDE always, the
            // baselines with the same general share ("+ replay") at full size.
            if let Some(r) = aware {
                if opts.preset == Preset::Full || matches!(m, Method::Composed { .. }) {
                    specs.push(spec.with_recipe(r));
                }
            }
        }
    }
    if opts.preset == Preset::Full {
        for domain in Domain::ALL {
            specs.push(RunSpec::new(Method::Expert { domain }, b));
        }
        specs.push(RunSpec::new(
            Method::Composed {
                freeze_experts: true,
            },
            b,
        ));
        specs.push(RunSpec::new(
            Method::FreshMix {
                layers: b.expert_layers_per_block,
            },
            b,
        ));
        for &rank in &b.lora_sweep {
            specs.push(RunSpec::new(Method::Lora { rank }, b));
        }
    }
    if opts.scaling {
        specs.extend(scaling_runs(b));
    }
    if opts.tradeoff {
        for &steps in b.tradeoff_steps.iter().filter(|&&s| s != b.steps) {
            for m in headline(b) {
                specs.push(RunSpec::new(m, b).with_steps(steps));
            }
        }
    }
    let mut unique: Vec<RunSpec> = Vec::new();
    for s in specs {
        if !unique.iter().any(|u| u.name(b) == s.name(b)) {
            unique.push(s);
        }
    }
    unique
}

/// Fetches the backbone and the data, prepares the data in `opts.out`, and returns a runner.
fn setup<'a>(opts: &DemoOptions, reporter: &'a mut dyn Reporter) -> Result<(Runner<'a>, String)> {
    claim_output(opts)?;
    reporter.stage("fetching the backbone");
    let backbone_path = mode_io::fetch::resolve_backbone(&opts.backbone)?;
    let (_, tokenizer) = Backbone::open(&backbone_path, DType::F32, &Device::Cpu)?;
    reporter.stage("fetching the data");
    let root = match &opts.data_dir {
        Some(d) => d.clone(),
        None => data::fetch()?,
    };
    reporter.stage("preparing the data");
    let domains = data::prepare_domains(&root, &opts.out.join("data"), &tokenizer)?;
    let source = backbone_path.display().to_string();
    Ok((
        Runner {
            out: opts.out.clone(),
            budget: opts.budget.clone(),
            backbone_path,
            tokenizer,
            domains,
            reporter,
        },
        source,
    ))
}

/// Runs (or resumes) the demo and writes `results.json` and `report.html` into `opts.out`.
pub fn run(opts: &DemoOptions, reporter: &mut dyn Reporter) -> Result<Results> {
    let start = Instant::now();
    let (mut runner, source) = setup(opts, reporter)?;
    let b = opts.budget.clone();
    let mut runs: BTreeMap<String, RunResult> = BTreeMap::new();
    for spec in plan(opts) {
        let result = runner.run(&spec, Scoring::Test)?;
        runs.insert(spec.name(&b), result);
    }
    let mut train_documents = BTreeMap::new();
    for domain in Domain::ALL {
        let data = PreparedData::open(runner.domains.training(domain))?;
        let docs = data.split(mode_data::Split::Train).doc_offsets().len() - 1;
        train_documents.insert(domain.name().to_string(), docs);
    }
    let lr = LrSelection::committed_for(&opts.backbone);
    let mut results = Results::new(opts.preset, b, source, runs, lr);
    results.total_seconds = start.elapsed().as_secs_f64();
    results.train_documents = train_documents;
    report::write(&opts.out, &results)?;
    Ok(results)
}

/// Runs (or resumes) the continual study ([`continual`]) in `opts.out` and writes
/// `continual.json` and `report.html` there.
pub fn continual(
    opts: &DemoOptions,
    reporter: &mut dyn Reporter,
) -> Result<continual::ContinualResults> {
    let (mut runner, _) = setup(opts, reporter)?;
    let results = continual::run(&mut runner)?;
    report::continual::write(&opts.out, &results)?;
    Ok(results)
}

/// Writes `value` as pretty JSON to `path`, atomically.
pub(crate) fn save_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let json = serde_json::to_vec_pretty(value).expect("demo records serialise");
    mode_io::atomic::write_file(path, &json).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

/// Runs (or resumes) the recipe grid ([`select_recipe`]) in `opts.out` and writes its outcome
/// to `recipe_selection.json` there.
pub fn select_recipe(opts: &DemoOptions, reporter: &mut dyn Reporter) -> Result<RecipeSelection> {
    let (mut runner, _) = setup(opts, reporter)?;
    let selection = select_recipe::select(&mut runner, &opts.backbone)?;
    save_json(&opts.out.join("recipe_selection.json"), &selection)?;
    Ok(selection)
}

/// Runs (or resumes) the learning-rate grid ([`select_lr`]) in `opts.out` and writes its
/// outcome to `lr_selection.json` there.
pub fn select_learning_rates(
    opts: &DemoOptions,
    reporter: &mut dyn Reporter,
) -> Result<LrSelection> {
    let (mut runner, _) = setup(opts, reporter)?;
    let selection = select_lr::select(&mut runner, &opts.backbone)?;
    save_json(&opts.out.join("lr_selection.json"), &selection)?;
    Ok(selection)
}
