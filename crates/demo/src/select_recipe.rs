//! Choosing composed MoDE's retention-aware recipe on validation data
//! (`mode demo --select-recipe`).
//!
//! Each recipe of a small grid ([`grid`]) trains the composed method at the default budget and
//! is scored on windows of the validation splits of Math, Code and general prose (never a test
//! set). The rule is the goal translated to validation: among the recipes that keep the prose
//! accuracy within [`RETENTION_MARGIN`] points of the backbone's, the best Math+Code average
//! wins; when none does, the one that loses least. The result is committed as
//! `crates/demo/recipe_selection.json`; the demo then adds the chosen recipe's composed row and
//! the baselines with the same share of general text ("+ replay").

use std::fmt::Write;

use mode_core::GateInput;
use serde::{Deserialize, Serialize};

use crate::method::{Method, Recipe, RunSpec};
use crate::results::{RunResult, CODE, MATH, PROSE};
use crate::runner::{Runner, Scoring};
use crate::Result;

/// Points of validation prose accuracy a recipe may lose against the backbone and still count
/// as retaining it.
pub const RETENTION_MARGIN: f64 = 0.3;

/// The recipes tried: the paper's, each option alone on top of the general share, and the
/// options together.
pub fn grid() -> Vec<Recipe> {
    let paper = Recipe::PAPER;
    let general = |percent| Recipe {
        general_percent: percent,
        ..paper
    };
    let preserving = |percent| Recipe {
        preserve_start: true,
        ..general(percent)
    };
    vec![
        paper,
        preserving(0),
        general(10),
        preserving(10),
        preserving(25),
        Recipe {
            keep_backbone_prior: true,
            ..preserving(10)
        },
        Recipe {
            keep_backbone_prior: true,
            gate_lr_scale: 10.0,
            ..preserving(10)
        },
        // Added after the first seven ran: a rerun of `--select-recipe` trains only these.
        Recipe {
            keep_backbone_prior: true,
            gate_input: GateInput::Normalized,
            ..preserving(10)
        },
        Recipe {
            keep_backbone_prior: true,
            gate_lr_scale: 10.0,
            gate_input: GateInput::Normalized,
            ..preserving(10)
        },
    ]
}

/// One recipe's validation scores (accuracy in percent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecipeScore {
    pub recipe: Recipe,
    pub math: f64,
    pub code: f64,
    pub prose: f64,
}

impl RecipeScore {
    fn of(recipe: Recipe, r: &RunResult) -> Self {
        let acc = |set: &str| r.sets.get(set).map_or(f64::NAN, |s| s.accuracy);
        Self {
            recipe,
            math: acc(MATH),
            code: acc(CODE),
            prose: acc(PROSE),
        }
    }

    pub fn target(&self) -> f64 {
        (self.math + self.code) / 2.0
    }
}

/// The outcome: the chosen recipe and the scores that chose it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecipeSelection {
    pub chosen: Recipe,
    /// The backbone's validation prose accuracy, the retention reference.
    pub backbone_prose: f64,
    pub scores: Vec<RecipeScore>,
    pub steps: usize,
    pub batch_tokens: usize,
    pub windows: usize,
    pub backbone: String,
}

const COMMITTED: &str = include_str!("../recipe_selection.json");

impl RecipeSelection {
    /// The selection committed with the code: the recipe the demo's retention-aware rows use.
    pub fn committed() -> Self {
        serde_json::from_str(COMMITTED).expect("crates/demo/recipe_selection.json is valid")
    }

    /// Whether the recipe comes from a grid on validation data.
    pub fn is_selected(&self) -> bool {
        !self.scores.is_empty()
    }

    /// A warning when the recipe was chosen on another backbone than `backbone` (see
    /// [`crate::select_lr::same_backbone`]), or None.
    pub fn other_backbone_note(&self, backbone: &str) -> Option<String> {
        (!crate::select_lr::same_backbone(&self.backbone, backbone)).then(|| {
            format!(
                "this recipe was chosen on {}'s validation data (its numbers above are that \
                 backbone's), not on this backbone's: run `mode demo --select-recipe --backbone ...` \
                 to choose its own",
                self.backbone
            )
        })
    }

    /// The grid as a text table, the chosen recipe marked.
    pub fn text(&self) -> String {
        let mut out = String::new();
        if !self.is_selected() {
            let _ = writeln!(
                out,
                "retention-aware recipe: not selected on validation (run `mode demo --select-recipe`)"
            );
            return out;
        }
        let _ = writeln!(
            out,
            "retention-aware recipe, chosen on validation (backbone prose {:.2}%; margin {RETENTION_MARGIN} points):",
            self.backbone_prose
        );
        for s in &self.scores {
            let mark = if s.recipe == self.chosen { "*" } else { " " };
            let _ = writeln!(
                out,
                " {mark} math {:6.2}  code {:6.2}  prose {:6.2} ({:+.2})  {}",
                s.math,
                s.code,
                s.prose,
                s.prose - self.backbone_prose,
                s.recipe.describe()
            );
        }
        out
    }
}

/// The rule: the best Math+Code average among recipes within the retention margin; else the
/// recipe that loses the least prose accuracy.
pub fn choose(scores: &[RecipeScore], backbone_prose: f64) -> Option<Recipe> {
    let drop = |s: &RecipeScore| backbone_prose - s.prose;
    let valid = scores
        .iter()
        .filter(|s| s.target().is_finite() && s.prose.is_finite());
    let retaining = valid
        .clone()
        .filter(|s| drop(s) <= RETENTION_MARGIN)
        .max_by(|a, b| a.target().total_cmp(&b.target()));
    retaining
        .or_else(|| valid.min_by(|a, b| drop(a).total_cmp(&drop(b))))
        .map(|s| s.recipe)
}

/// Runs (or resumes) the grid and chooses.
pub(crate) fn select(runner: &mut Runner, backbone: &str) -> Result<RecipeSelection> {
    let b = runner.budget.clone();
    let base = runner.run(&RunSpec::new(Method::Backbone, &b), Scoring::Validation)?;
    let backbone_prose = RecipeScore::of(Recipe::PAPER, &base).prose;
    let composed = RunSpec::new(
        Method::Composed {
            freeze_experts: false,
        },
        &b,
    );
    let mut scores = Vec::new();
    for recipe in grid() {
        let r = runner.run(&composed.with_recipe(recipe), Scoring::Validation)?;
        scores.push(RecipeScore::of(recipe, &r));
    }
    let chosen = choose(&scores, backbone_prose).unwrap_or(Recipe::PAPER);
    Ok(RecipeSelection {
        chosen,
        backbone_prose,
        scores,
        steps: b.steps,
        batch_tokens: b.batch_tokens,
        windows: b.select_windows,
        backbone: backbone.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(general_percent: u32, math: f64, code: f64, prose: f64) -> RecipeScore {
        RecipeScore {
            recipe: Recipe {
                general_percent,
                ..Recipe::PAPER
            },
            math,
            code,
            prose,
        }
    }

    #[test]
    fn the_best_target_among_the_retaining_recipes_wins() {
        let scores = [
            score(0, 60.0, 60.0, 40.0), // best target, loses 2 points
            score(10, 55.0, 56.0, 41.8),
            score(25, 54.0, 55.0, 42.0),
        ];
        let pick = |s: &[RecipeScore]| choose(s, 42.0).map(|r| r.general_percent);
        assert_eq!(pick(&scores), Some(10));
        // None retains: the one that loses least.
        assert_eq!(choose(&scores, 45.0).map(|r| r.general_percent), Some(25));
        // A diverged recipe (no scores) is never chosen.
        let with_nan = [score(0, f64::NAN, 60.0, 42.0), score(10, 50.0, 50.0, 41.0)];
        assert_eq!(pick(&with_nan), Some(10));
        assert_eq!(pick(&[]), None);
    }

    #[test]
    fn the_grid_starts_with_the_paper_and_has_no_repeats() {
        let g = grid();
        assert!(g[0].is_paper());
        for (i, a) in g.iter().enumerate() {
            assert!(g[i + 1..].iter().all(|b| b != a));
        }
    }

    #[test]
    fn the_committed_selection_reads() {
        let s = RecipeSelection::committed();
        assert!(!s.text().is_empty());
    }
}
