//! What a demo measured: one [`RunResult`] per run (per seed) with its score on every window,
//! and what follows from them: table rows with 95% intervals pooled over seeds, the paper's
//! claims read from paired intervals, and the learning-forgetting trade-off.

use std::collections::BTreeMap;

use mode_eval::stats::{self, Interval, Verdict};
use mode_eval::{Totals, WindowScore};
use serde::{Deserialize, Serialize};

use crate::method::{Method, Recipe, RunSpec};
use crate::select_lr::LrSelection;
use crate::select_recipe::RecipeSelection;
use crate::{Budget, Preset};

/// The held-out sets, in table order: two targets, two retention sets.
pub const MATH: &str = "math";
pub const CODE: &str = "code";
pub const ENGLISH: &str = "english";
pub const PROSE: &str = "prose";
pub const TARGET_SETS: [&str; 2] = [MATH, CODE];
pub const RETENTION_SETS: [&str; 2] = [ENGLISH, PROSE];
/// The sets of the paper's average column.
pub const AVERAGE_SETS: [&str; 3] = [MATH, CODE, ENGLISH];

/// One run's score on one held-out set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SetScore {
    /// Next-token accuracy (percent) over all the set's windows.
    pub accuracy: f64,
    /// Mean cross-entropy (nats per token).
    pub loss: f64,
    /// Every window's counts, in text order; every run of the demo has the same windows.
    pub windows: Vec<WindowScore>,
}

/// One trained and scored run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub spec: RunSpec,
    /// By held-out set (or validation split when choosing learning rates).
    pub sets: BTreeMap<String, SetScore>,
    /// Parameters that received gradients at any stage of the method.
    pub trainable_parameters: usize,
    /// Parameters the method adds to the backbone.
    pub added_parameters: usize,
    /// Training tokens, all stages together.
    pub tokens: usize,
    /// Training wall time, all stages together (shared stage-1 experts count for each method
    /// that uses them).
    pub train_seconds: f64,
    pub eval_seconds: f64,
    /// The learning rate of each stage it trained.
    #[serde(default)]
    pub learning_rates: BTreeMap<String, f64>,
    /// Mean gate weight per block and branch, per held-out set (MoDE models).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gate_weights: BTreeMap<String, Vec<Vec<f64>>>,
    /// Branch names of the gates: `backbone` then the experts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub branches: Vec<String>,
    /// Training curve(s): (step, training loss), per stage.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub curves: BTreeMap<String, Vec<(usize, f64)>>,
}

impl RunResult {
    /// The per-window totals of `set` (all tokens, or answer tokens alone).
    pub fn windows(&self, set: &str, answers: bool) -> Vec<Totals> {
        self.sets.get(set).map_or_else(Vec::new, |s| {
            s.windows
                .iter()
                .map(|w| if answers { w.answer } else { w.all })
                .collect()
        })
    }
}

/// One line of the table: every seed of one setting, pooled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub name: String,
    pub spec: RunSpec,
    pub seeds: Vec<u64>,
    /// Accuracy (percent) per set, pooled over seeds, with its 95% interval over windows.
    pub accuracy: BTreeMap<String, Interval>,
    /// Accuracy per set of each seed, in `seeds` order.
    pub seed_accuracy: BTreeMap<String, Vec<f64>>,
    /// Math accuracy on the answer tokens alone.
    pub math_answer: Option<Interval>,
    /// The paper's average: the mean of Math, Code and English.
    pub average: Option<Interval>,
    /// Mean loss per set over seeds.
    pub loss: BTreeMap<String, f64>,
    pub added_parameters: usize,
    pub trainable_parameters: usize,
    pub tokens: usize,
    /// Mean over seeds.
    pub train_seconds: f64,
    pub learning_rates: BTreeMap<String, f64>,
}

/// One of the paper's findings, read from a paired interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    pub text: String,
    /// The MoDE row and the row it is compared with.
    pub mode: String,
    pub other: String,
    /// The sets whose mean accuracy is compared.
    pub sets: Vec<String>,
    /// The claim is `mode - other >= margin` (points of accuracy).
    pub margin: f64,
    pub mode_value: f64,
    pub other_value: f64,
    /// Paired bootstrap interval of `mode - other` over windows, seeds pooled.
    pub difference: Interval,
    pub verdict: Verdict,
}

/// One point of the learning-forgetting trade-off: a row against the backbone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TradeoffPoint {
    pub row: String,
    pub method: Method,
    /// The paper's recipe, or a retention-aware one (for the baselines: replay of general prose).
    #[serde(default)]
    pub recipe: Recipe,
    pub steps: usize,
    /// Mean accuracy change on Math and Code (points), paired interval.
    pub target_gain: Interval,
    /// Mean accuracy change on the retention sets (points), paired interval.
    pub retention_change: Interval,
}

/// The whole run: `results.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub preset: Preset,
    pub budget: Budget,
    pub backbone: String,
    /// Every run by name, with its window scores.
    pub runs: BTreeMap<String, RunResult>,
    /// The table, in order.
    pub rows: Vec<Row>,
    pub claims: Vec<Claim>,
    pub tradeoff: Vec<TradeoffPoint>,
    /// How the learning rates were chosen.
    pub lr_selection: LrSelection,
    /// How the retention-aware recipe was chosen.
    #[serde(default = "RecipeSelection::committed")]
    pub recipe_selection: RecipeSelection,
    /// Wall time of the invocation that wrote this file; runs it reused from an earlier
    /// (interrupted) invocation keep their own times.
    pub total_seconds: f64,
    /// Training documents per domain (math, code): where the scaling sweep's "all" sits.
    #[serde(default)]
    pub train_documents: BTreeMap<String, usize>,
}

/// Seed of every bootstrap of the report, so that rerunning the report gives its numbers again.
const BOOTSTRAP_SEED: u64 = 0x00de_5eed;

impl Results {
    /// Rows, claims and trade-off from the runs.
    pub fn new(
        preset: Preset,
        budget: Budget,
        backbone: String,
        runs: BTreeMap<String, RunResult>,
        lr_selection: LrSelection,
    ) -> Self {
        let rows = rows(&budget, &runs);
        let claims = claims(&rows, &runs, &budget);
        let tradeoff = tradeoff(&rows, &runs, &budget);
        Self {
            preset,
            budget,
            backbone,
            runs,
            rows,
            claims,
            tradeoff,
            lr_selection,
            recipe_selection: RecipeSelection::committed(),
            total_seconds: 0.0,
            train_documents: BTreeMap::new(),
        }
    }

    pub fn row(&self, name: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.name == name)
    }
}

/// The runs of a row, in seed order.
fn runs_of<'a>(row: &str, runs: &'a BTreeMap<String, RunResult>, b: &Budget) -> Vec<&'a RunResult> {
    let mut v: Vec<&RunResult> = runs
        .values()
        .filter(|r| r.spec.row_name(b) == row)
        .collect();
    v.sort_by_key(|r| r.spec.seed);
    v
}

/// Window totals of a row's runs on `set`, pooled window by window over seeds.
fn pooled(runs: &[&RunResult], set: &str, answers: bool) -> Vec<Totals> {
    let per_seed: Vec<Vec<Totals>> = runs.iter().map(|r| r.windows(set, answers)).collect();
    let refs: Vec<&[Totals]> = per_seed.iter().map(Vec::as_slice).collect();
    stats::pool(&refs)
}

/// The order of the table: methods as the paper lists them, the budget's own runs first.
fn order_key(spec: &RunSpec, b: &Budget) -> impl Ord {
    let kind = match spec.method {
        Method::Backbone => 0,
        Method::FullFt => 1,
        Method::Lora { .. } => 2,
        Method::Expert { .. } => 3,
        Method::Composed {
            freeze_experts: false,
        } => 4,
        Method::Composed {
            freeze_experts: true,
        } => 5,
        Method::FreshMix { .. } => 6,
    };
    let extra =
        spec.steps != spec.method.budget_steps(b) || spec.documents.is_some() || spec.lr.is_some();
    let variant = match spec.method {
        Method::Lora { rank } => rank != b.lora_rank,
        Method::FreshMix { layers } => layers != b.expert_layers_per_block,
        _ => false,
    };
    (
        extra,
        spec.steps / spec.method.budget_steps(b).max(1),
        kind,
        !spec.recipe.is_paper(),
        variant,
        spec.documents.map_or(0, |d| usize::MAX - d),
        spec.method,
        spec.lr.map(f64::to_bits),
    )
}

fn rows(b: &Budget, runs: &BTreeMap<String, RunResult>) -> Vec<Row> {
    let mut names: Vec<(String, RunSpec)> = Vec::new();
    for r in runs.values() {
        let name = r.spec.row_name(b);
        if !names.iter().any(|(n, _)| *n == name) {
            names.push((name, r.spec));
        }
    }
    names.sort_by_key(|(_, s)| order_key(s, b));
    names
        .into_iter()
        .map(|(name, _)| row(&name, &runs_of(&name, runs, b)))
        .collect()
}

fn row(name: &str, runs: &[&RunResult]) -> Row {
    let first = runs[0];
    let sets: Vec<&String> = first.sets.keys().collect();
    let mut accuracy = BTreeMap::new();
    let mut seed_accuracy = BTreeMap::new();
    let mut loss = BTreeMap::new();
    for set in &sets {
        let windows = pooled(runs, set, false);
        accuracy.insert(
            set.to_string(),
            stats::accuracy_interval(&windows, BOOTSTRAP_SEED),
        );
        let per_seed: Vec<f64> = runs
            .iter()
            .map(|r| r.sets.get(*set).map_or(f64::NAN, |s| s.accuracy))
            .collect();
        seed_accuracy.insert(set.to_string(), per_seed);
        let mean_loss = runs
            .iter()
            .map(|r| r.sets.get(*set).map_or(f64::NAN, |s| s.loss))
            .sum::<f64>()
            / runs.len() as f64;
        loss.insert(set.to_string(), mean_loss);
    }
    let math_answer = {
        let w = pooled(runs, MATH, true);
        (w.iter().any(|t| t.predictions > 0)).then(|| stats::accuracy_interval(&w, BOOTSTRAP_SEED))
    };
    let average = AVERAGE_SETS
        .iter()
        .all(|s| first.sets.contains_key(*s))
        .then(|| {
            let w: Vec<Vec<Totals>> = AVERAGE_SETS
                .iter()
                .map(|s| pooled(runs, s, false))
                .collect();
            let strata: Vec<usize> = w.iter().map(Vec::len).collect();
            stats::bootstrap(&strata, stats::RESAMPLES, BOOTSTRAP_SEED, |idx| {
                idx.iter()
                    .zip(&w)
                    .map(|(i, w)| stats::accuracy_of(w, i))
                    .sum::<f64>()
                    / w.len() as f64
            })
        });
    Row {
        name: name.to_string(),
        spec: first.spec,
        seeds: runs.iter().map(|r| r.spec.seed).collect(),
        accuracy,
        seed_accuracy,
        math_answer,
        average,
        loss,
        added_parameters: first.added_parameters,
        trainable_parameters: first.trainable_parameters,
        tokens: first.tokens,
        train_seconds: runs.iter().map(|r| r.train_seconds).sum::<f64>() / runs.len() as f64,
        learning_rates: first.learning_rates.clone(),
    }
}

/// The paired interval of `mean over sets (a) - mean over sets (b)`, seeds pooled.
fn difference(a: &[&RunResult], b: &[&RunResult], sets: &[&str]) -> Interval {
    let wa: Vec<Vec<Totals>> = sets.iter().map(|s| pooled(a, s, false)).collect();
    let wb: Vec<Vec<Totals>> = sets.iter().map(|s| pooled(b, s, false)).collect();
    let ra: Vec<&[Totals]> = wa.iter().map(Vec::as_slice).collect();
    let rb: Vec<&[Totals]> = wb.iter().map(Vec::as_slice).collect();
    stats::mean_difference_interval(&ra, &rb, BOOTSTRAP_SEED)
}

/// The paper's headline findings (Table 1), each as `MoDE - other >= margin` over the mean
/// accuracy of some sets, read from the paired interval of the difference: composed MoDE at
/// least as good as full fine-tuning on average, retaining English (and general prose) at least
/// a point better, and at least as good as LoRA on each target domain. Empty when a method
/// they compare is missing.
fn claims(rows: &[Row], runs: &BTreeMap<String, RunResult>, b: &Budget) -> Vec<Claim> {
    let has = |n: &str| rows.iter().any(|r| r.name == n);
    let (paper, full, lora) = ("mode_composed", "full_ft", "lora");
    if !(has(paper) && has(full) && has(lora)) {
        return Vec::new();
    }
    let sets_of = |n: &str| -> Vec<String> {
        rows.iter()
            .find(|r| r.name == n)
            .map(|r| r.accuracy.keys().cloned().collect())
            .unwrap_or_default()
    };
    let mut list = Vec::new();
    let mut claim = |text: &str, mode: &str, other: &str, sets: &[&str], margin: f64| {
        let available = sets_of(mode);
        if !has(other) || !sets.iter().all(|s| available.iter().any(|a| a == s)) {
            return;
        }
        let (a, o) = (runs_of(mode, runs, b), runs_of(other, runs, b));
        let mean = |rs: &[&RunResult]| {
            sets.iter()
                .map(|s| stats::accuracy(&pooled(rs, s, false)))
                .sum::<f64>()
                / sets.len() as f64
        };
        let difference = difference(&a, &o, sets);
        list.push(Claim {
            text: text.to_string(),
            mode: mode.to_string(),
            other: other.to_string(),
            sets: sets.iter().map(|s| s.to_string()).collect(),
            margin,
            mode_value: mean(&a),
            other_value: mean(&o),
            verdict: Verdict::of(&difference, margin),
            difference,
        });
    };
    claim(
        "MoDE composed average >= full fine-tuning average",
        paper,
        full,
        &AVERAGE_SETS,
        0.0,
    );
    claim(
        "MoDE composed English >= full fine-tuning English + 1.0",
        paper,
        full,
        &[ENGLISH],
        1.0,
    );
    claim(
        "MoDE composed prose >= full fine-tuning prose + 1.0",
        paper,
        full,
        &[PROSE],
        1.0,
    );
    claim("MoDE composed Math >= LoRA Math", paper, lora, &[MATH], 0.0);
    claim("MoDE composed Code >= LoRA Code", paper, lora, &[CODE], 0.0);
    // The retention-aware recipe's goals: general prose kept within 0.3 points of the
    // backbone, Math+Code as good as full fine-tuning's.
    let aware = rows.iter().find(|r| {
        r.spec.method
            == Method::Composed {
                freeze_experts: false,
            }
            && !r.spec.recipe.is_paper()
            && r.spec.steps == r.spec.method.budget_steps(b)
            && r.spec.documents.is_none()
            && r.spec.lr.is_none()
    });
    if let Some(aware) = aware.map(|r| r.name.clone()) {
        let backbone = rows
            .iter()
            .find(|r| r.spec.method == Method::Backbone)
            .map(|r| r.name.clone())
            .unwrap_or_default();
        claim(
            "Retention-aware MoDE prose >= backbone prose - 0.3",
            &aware,
            &backbone,
            &[PROSE],
            -0.3,
        );
        claim(
            "Retention-aware MoDE Math+Code >= full fine-tuning Math+Code",
            &aware,
            full,
            &TARGET_SETS,
            0.0,
        );
        claim(
            "Retention-aware MoDE prose >= MoDE composed prose",
            &aware,
            paper,
            &[PROSE],
            0.0,
        );
    }
    list
}

/// Target gain against retention change, both against the backbone, for every row of full
/// fine-tuning, the budget's LoRA and composed MoDE: each training length of the paper's
/// recipe, and the retention-aware rows (replay for the baselines) at the length they ran.
fn tradeoff(rows: &[Row], runs: &BTreeMap<String, RunResult>, b: &Budget) -> Vec<TradeoffPoint> {
    let Some(base) = rows.iter().find(|r| r.spec.method == Method::Backbone) else {
        return Vec::new();
    };
    let base_runs = runs_of(&base.name, runs, b);
    let retention: Vec<&str> = RETENTION_SETS
        .iter()
        .copied()
        .filter(|s| base.accuracy.contains_key(*s))
        .collect();
    rows.iter()
        .filter(|r| r.spec.documents.is_none() && r.spec.lr.is_none())
        .filter(|r| {
            matches!(
                r.spec.method,
                Method::FullFt
                    | Method::Composed {
                        freeze_experts: false
                    }
            ) || r.spec.method == (Method::Lora { rank: b.lora_rank })
        })
        .map(|r| {
            let rs = runs_of(&r.name, runs, b);
            TradeoffPoint {
                row: r.name.clone(),
                method: r.spec.method,
                recipe: r.spec.recipe,
                steps: r.spec.steps,
                target_gain: difference(&rs, &base_runs, &TARGET_SETS),
                retention_change: difference(&rs, &base_runs, &retention),
            }
        })
        .collect()
}
