//! Choosing each method's learning rate on validation data (`mode demo --select-lr`).
//!
//! A small grid per stage, each point trained at the default budget and scored on windows
//! spread over the validation splits of Math and Code (never a test set, never a retention
//! set). The rate with the lowest mean validation loss wins. The result is committed as
//! `crates/demo/lr_selection.json`, which sets the demo's rates and is shown in its report.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::method::{lr_label, Domain, Method, RunSpec, Stage};
use crate::results::{RunResult, CODE, MATH};
use crate::runner::{Runner, Scoring};
use crate::{Error, Result};

/// The rates tried per stage.
pub fn grid(stage: Stage) -> [f64; 3] {
    match stage {
        Stage::FullFt => [3e-5, 1e-4, 3e-4],
        Stage::Lora | Stage::Expert | Stage::Compose => [3e-4, 1e-3, 3e-3],
    }
}

/// A learning rate per training stage.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LearningRates {
    pub full_ft: f64,
    pub lora: f64,
    /// MoDE stage 1 (experts, and the fresh expert on the mix).
    pub expert: f64,
    /// MoDE stage 2.
    pub compose: f64,
}

impl LearningRates {
    pub fn of(&self, stage: Stage) -> f64 {
        match stage {
            Stage::FullFt => self.full_ft,
            Stage::Lora => self.lora,
            Stage::Expert => self.expert,
            Stage::Compose => self.compose,
        }
    }

    fn set(&mut self, stage: Stage, lr: f64) {
        match stage {
            Stage::FullFt => self.full_ft = lr,
            Stage::Lora => self.lora = lr,
            Stage::Expert => self.expert = lr,
            Stage::Compose => self.compose = lr,
        }
    }
}

/// The outcome of a grid: the chosen rates and the validation losses that chose them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrSelection {
    pub chosen: LearningRates,
    /// Mean Math+Code validation loss (nats/token) per stage and rate; empty when the rates
    /// were not selected on validation.
    /// A rate whose training diverged has no loss.
    pub losses: BTreeMap<String, BTreeMap<String, Option<f64>>>,
    /// The budget the grid trained at: steps, tokens per step, validation windows per domain.
    pub steps: usize,
    pub batch_tokens: usize,
    pub windows: usize,
    /// The backbone the grid ran on.
    pub backbone: String,
}

/// Whether a choice made on `chosen_on` (a known backbone name) applies to `backbone` (that
/// name, or a path under its cache folder `.../backbones/NAME/`).
pub fn same_backbone(chosen_on: &str, backbone: &str) -> bool {
    backbone == chosen_on || backbone.contains(&format!("/{chosen_on}/"))
}

/// The selections committed with the code, one per backbone they were chosen on; the first is
/// the default backbone's and serves any backbone without its own. A new backbone's grid
/// (`mode demo --select-lr --backbone NAME`) goes in as `lr_selection.NAME.json` and a row here.
const COMMITTED: &[&str] = &[
    include_str!("../lr_selection.json"),
    include_str!("../lr_selection.gemma3-270m.json"),
];

impl LrSelection {
    /// The default backbone's committed selection: the demo's learning rates.
    pub fn committed() -> Self {
        Self::parse(COMMITTED[0])
    }

    /// The committed selection chosen on `backbone` (a known name or a path under its name's
    /// cache folder), else the default backbone's (see [`Self::other_backbone_note`]).
    pub fn committed_for(backbone: &str) -> Self {
        COMMITTED
            .iter()
            .map(|s| Self::parse(s))
            .find(|s| s.other_backbone_note(backbone).is_none())
            .unwrap_or_else(Self::committed)
    }

    fn parse(text: &str) -> Self {
        serde_json::from_str(text).expect("a committed crates/demo/lr_selection*.json is valid")
    }

    /// A warning when the rates were chosen on another backbone than `backbone` (a name such
    /// as `gemma3-270m` or the path of a file), or None when they were chosen on it.
    pub fn other_backbone_note(&self, backbone: &str) -> Option<String> {
        (!same_backbone(&self.backbone, backbone)).then(|| {
            format!(
                "these rates were chosen on {}'s validation data, not on this backbone's: run \
                 `mode demo --select-lr --backbone ...` to choose its own",
                self.backbone
            )
        })
    }

    /// Whether the rates come from a grid on validation data.
    pub fn is_selected(&self) -> bool {
        !self.losses.is_empty()
    }

    /// The grid of a stage: (rate, validation loss or None where it diverged), by rate.
    pub fn grid_of(&self, stage: Stage) -> Vec<(f64, Option<f64>)> {
        let mut v: Vec<(f64, Option<f64>)> = self
            .losses
            .get(stage.name())
            .into_iter()
            .flatten()
            .filter_map(|(lr, loss)| lr.parse().ok().map(|lr: f64| (lr, *loss)))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    }

    /// The grid as a text table, the chosen rate of each stage marked.
    pub fn text(&self) -> String {
        let mut out = String::new();
        if !self.is_selected() {
            let _ = writeln!(
                out,
                "learning rates: not selected on validation (run `mode demo --select-lr`)"
            );
        }
        for stage in Stage::ALL {
            let chosen = self.chosen.of(stage);
            let mut line = format!("  {:<8} {:e}", stage.name(), chosen);
            let grid = self.grid_of(stage);
            if !grid.is_empty() {
                line += "   validation loss:";
                for (lr, loss) in grid {
                    let mark = if lr == chosen { "*" } else { "" };
                    match loss {
                        Some(l) => line += &format!("  {lr:e} {l:.4}{mark}"),
                        None => line += &format!("  {lr:e} diverged"),
                    }
                }
            }
            let _ = writeln!(out, "{line}");
        }
        out
    }
}

/// The validation loss a run is chosen on: the mean over Math and Code of what it was scored
/// on (an expert: its own domain only).
fn selection_loss(runs: &[RunResult]) -> f64 {
    let losses: Vec<f64> = runs
        .iter()
        .flat_map(|r| {
            [MATH, CODE]
                .into_iter()
                .filter_map(|s| r.sets.get(s).map(|x| x.loss))
        })
        .collect();
    losses.iter().sum::<f64>() / losses.len().max(1) as f64
}

/// How many times a stage's grid is extended past an edge that wins.
pub const MAX_EXTENSIONS: usize = 2;

/// The next rate on the half-decade ladder (1, 3, 10, 30, ...) above (`up`) or below `lr`.
pub fn next_rate(lr: f64, up: bool) -> f64 {
    let e = lr.log10().floor() as i32;
    let m = (lr / 10f64.powi(e)).round();
    let (m, e) = match (m < 2.0, up) {
        (true, true) => (3, e),
        (true, false) => (3, e - 1),
        (false, true) => (1, e + 1),
        (false, false) => (1, e),
    };
    // Parsed from text, so that 1e-3 is the double nearest 0.001, as the grid writes it.
    format!("{m}e{e}").parse().expect("a valid float")
}

/// The runs that score one rate of a stage.
fn stage_runs(stage: Stage, chosen: &LearningRates, b: &crate::Budget) -> Vec<RunSpec> {
    match stage {
        Stage::FullFt => vec![RunSpec::new(Method::FullFt, b)],
        Stage::Lora => vec![RunSpec::new(Method::Lora { rank: b.lora_rank }, b)],
        Stage::Expert => Domain::ALL
            .iter()
            .map(|&domain| RunSpec::new(Method::Expert { domain }, b))
            .collect(),
        Stage::Compose => vec![RunSpec {
            expert_lr: Some(chosen.expert),
            ..RunSpec::new(
                Method::Composed {
                    freeze_experts: false,
                },
                b,
            )
        }],
    }
}

/// Trains and scores one rate of a stage: its mean validation loss, or None when training
/// diverged.
fn score_rate(
    runner: &mut Runner,
    stage: Stage,
    lr: f64,
    chosen: &LearningRates,
) -> Result<Option<f64>> {
    let b = runner.budget.clone();
    let mut results = Vec::new();
    for spec in stage_runs(stage, chosen, &b) {
        let spec = RunSpec {
            lr: Some(lr),
            ..spec
        };
        match runner.run(&spec, Scoring::Validation) {
            Ok(r) => results.push(r),
            // A rate too high for the method: the grid records it and goes on.
            Err(Error::Train(e @ mode_train::trainer::Error::NonFinite { .. })) => {
                runner
                    .reporter
                    .stage(&format!("{} at {lr:e} diverged: {e}", stage.name()));
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Some(selection_loss(&results)).filter(|l| l.is_finite()))
}

/// Runs (or resumes) the grid, stage by stage; composition is tuned over experts trained at
/// the chosen expert rate. When the best rate is the grid's highest or lowest, the grid is
/// extended one half-decade past it (at most [`MAX_EXTENSIONS`] times), so that the choice is
/// not an artefact of where the grid stopped.
pub(crate) fn select(runner: &mut Runner, backbone: &str) -> Result<LrSelection> {
    let b = runner.budget.clone();
    let mut chosen = b.lr;
    let mut losses = BTreeMap::new();
    for stage in Stage::ALL {
        let mut tried: Vec<(f64, Option<f64>)> = Vec::new();
        let mut pending: Vec<f64> = grid(stage).to_vec();
        let mut extensions = 0;
        loop {
            for lr in pending.drain(..) {
                let loss = score_rate(runner, stage, lr, &chosen)?;
                tried.push((lr, loss));
            }
            let Some(best) = tried
                .iter()
                .filter_map(|&(lr, l)| l.map(|l| (l, lr)))
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, lr)| lr)
            else {
                return Err(Error::Step(format!(
                    "no rate of the {} grid gave a finite validation loss",
                    stage.name()
                )));
            };
            let lo = tried.iter().map(|t| t.0).fold(f64::INFINITY, f64::min);
            let hi = tried.iter().map(|t| t.0).fold(0.0, f64::max);
            if extensions == MAX_EXTENSIONS || (best != lo && best != hi) {
                chosen.set(stage, best);
                break;
            }
            runner.reporter.stage(&format!(
                "{}: the best rate {best:e} is at the grid's edge; trying one step past it",
                stage.name()
            ));
            pending.push(next_rate(best, best == hi));
            extensions += 1;
        }
        let by_rate = tried.into_iter().map(|(lr, l)| (lr_label(lr), l)).collect();
        losses.insert(stage.name().to_string(), by_rate);
    }
    Ok(LrSelection {
        chosen,
        losses,
        steps: b.steps,
        batch_tokens: b.batch_tokens,
        windows: b.select_windows,
        backbone: backbone.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_chosen_on_another_backbone_say_so() {
        let s = LrSelection::committed();
        let path = format!("/home/u/.cache/mode/backbones/{}/model.gguf", s.backbone);
        assert_eq!(s.other_backbone_note(&path), None);
        assert_eq!(s.other_backbone_note(&s.backbone), None);
        let note = s
            .other_backbone_note("/x/backbones/gemma3-270m/g.gguf")
            .unwrap();
        assert!(note.contains(&s.backbone), "{note}");
        // A backbone without its own grid falls back to the default's rates, and says so.
        let other = LrSelection::committed_for("/x/backbones/qwen3-0.6b/q.gguf");
        assert_eq!(other.backbone, s.backbone);
        assert!(other
            .other_backbone_note("/x/backbones/qwen3-0.6b/q.gguf")
            .is_some());
        assert_eq!(LrSelection::committed_for(&s.backbone).backbone, s.backbone);
        // Gemma 3 has its own grid, found by name or by a path under its cache folder.
        for name in ["gemma3-270m", "/x/backbones/gemma3-270m/g.gguf"] {
            let gemma = LrSelection::committed_for(name);
            assert_eq!(gemma.backbone, "gemma3-270m");
            assert_eq!(gemma.other_backbone_note(name), None);
            assert_ne!(gemma.chosen, s.chosen);
        }
    }

    #[test]
    fn rates_step_by_half_decades() {
        assert_eq!(next_rate(3e-4, true), 1e-3);
        assert_eq!(next_rate(1e-3, true), 3e-3);
        assert_eq!(next_rate(3e-3, true), 1e-2);
        assert_eq!(next_rate(3e-5, false), 1e-5);
        assert_eq!(next_rate(1e-4, false), 3e-5);
        assert_eq!(lr_label(next_rate(3e-3, true)), "1e-2");
    }
}
