//! What the demo trains: methods as an enum, runs as (method, steps, seed, ...) specs, and the
//! one place that turns a run into its name (its file names and table row follow from it).

use serde::{Deserialize, Serialize};

use mode_core::GateInput;

use crate::Budget;

/// A training domain of the demo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Domain {
    Math,
    Code,
    /// C sources: the continual demo's third domain, unlike both.
    C,
}

impl Domain {
    /// The table's training domains (MoDE composes an expert for each).
    pub const ALL: [Domain; 2] = [Domain::Math, Domain::Code];
    /// The order in which the continual demo adds domains.
    pub const SEQUENCE: [Domain; 3] = [Domain::Math, Domain::Code, Domain::C];

    pub fn name(self) -> &'static str {
        match self {
            Domain::Math => "math",
            Domain::Code => "code",
            Domain::C => "c",
        }
    }
}

/// One way of adapting the backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Method {
    /// The backbone alone.
    Backbone,
    /// Every backbone weight trained on the Math+Code mix.
    FullFt,
    /// LoRA of this rank on the attention projections, on the mix.
    Lora { rank: usize },
    /// One MoDE stage-1 expert on its own domain.
    Expert { domain: Domain },
    /// The math and code experts composed and tuned on the mix (stage 2); with
    /// `freeze_experts`, only the gates train.
    Composed { freeze_experts: bool },
    /// One fresh expert of `layers` per block trained on the mix.
    FreshMix { layers: usize },
}

impl Method {
    /// The stage whose learning rate the method trains with.
    pub fn stage(self) -> Option<Stage> {
        match self {
            Method::Backbone => None,
            Method::FullFt => Some(Stage::FullFt),
            Method::Lora { .. } => Some(Stage::Lora),
            Method::Expert { .. } | Method::FreshMix { .. } => Some(Stage::Expert),
            Method::Composed { .. } => Some(Stage::Compose),
        }
    }

    /// Steps of the budget's own run of this method: a stage-1 expert alone gets the share it
    /// has inside a composed run; everything else the budget's steps.
    pub fn budget_steps(self, b: &Budget) -> usize {
        match self {
            Method::Expert { .. } => b.expert_steps(b.steps),
            _ => b.steps,
        }
    }

    /// The base of its run names, with the budget's own rank and layer count left implicit
    /// (the names earlier demos wrote).
    fn base_name(self, b: &Budget) -> String {
        match self {
            Method::Backbone => "backbone".into(),
            Method::FullFt => "full_ft".into(),
            Method::Lora { rank } if rank == b.lora_rank => "lora".into(),
            Method::Lora { rank } => format!("lora_r{rank}"),
            Method::Expert { domain } => format!("mode_{}_expert", domain.name()),
            Method::Composed {
                freeze_experts: false,
            } => "mode_composed".into(),
            Method::Composed {
                freeze_experts: true,
            } => "mode_frozen_experts".into(),
            Method::FreshMix { layers } if layers == b.expert_layers_per_block => {
                "mode_fresh_mix".into()
            }
            Method::FreshMix { layers } => format!("mode_fresh_mix_l{layers}"),
        }
    }
}

/// A training stage with a learning rate of its own, selected on validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    FullFt,
    Lora,
    /// MoDE stage 1 (an expert and its gates).
    Expert,
    /// MoDE stage 2 (composition).
    Compose,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::FullFt, Stage::Lora, Stage::Expert, Stage::Compose];

    pub fn name(self) -> &'static str {
        match self {
            Stage::FullFt => "full_ft",
            Stage::Lora => "lora",
            Stage::Expert => "expert",
            Stage::Compose => "compose",
        }
    }
}

/// What a run does beyond the paper's recipe, to keep general ability (retention-aware
/// routing). The default is the paper's recipe.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Recipe {
    /// Percent of each training batch drawn from general prose (the prose set's train split),
    /// at every stage: replay for the baselines, examples of text to leave to the backbone for
    /// MoDE's gates.
    pub general_percent: u32,
    /// MoDE experts start function-preserving ([`mode_core::ExpertInit::Preserve`]) instead of
    /// as copies.
    pub preserve_start: bool,
    /// Composition keeps the backbone's stage-1 odds against all experts together.
    pub keep_backbone_prior: bool,
    /// The gates' learning rate as a multiple of their stage's.
    pub gate_lr_scale: f64,
    /// What the gates read ([`GateInput`]), at both stages. Left out of the JSON when raw, so
    /// that results written before it existed read and compare as they were.
    #[serde(skip_serializing_if = "is_raw")]
    pub gate_input: GateInput,
}

fn is_raw(input: &GateInput) -> bool {
    *input == GateInput::Raw
}

impl Default for Recipe {
    fn default() -> Self {
        Self::PAPER
    }
}

impl Recipe {
    /// The paper's recipe: no general text, copied experts, diluted prior, one learning rate.
    pub const PAPER: Recipe = Recipe {
        general_percent: 0,
        preserve_start: false,
        keep_backbone_prior: false,
        gate_lr_scale: 1.0,
        gate_input: GateInput::Raw,
    };

    pub fn is_paper(&self) -> bool {
        *self == Self::PAPER
    }

    /// The share of general text in a batch, in [0, 1).
    pub fn general_share(&self) -> f64 {
        f64::from(self.general_percent) / 100.0
    }

    /// What sets it apart from the paper's, as a name suffix (`_g10_pres_prior_glr10_gnorm`); the
    /// parts that only a composition uses are left out with `stage1`.
    fn suffix(&self, stage1: bool) -> String {
        let mut s = String::new();
        if self.general_percent > 0 {
            s += &format!("_g{}", self.general_percent);
        }
        if self.preserve_start {
            s += "_pres";
        }
        if self.keep_backbone_prior && !stage1 {
            s += "_prior";
        }
        if self.gate_lr_scale != 1.0 {
            s += &format!("_glr{}", self.gate_lr_scale);
        }
        if self.gate_input == GateInput::Normalized {
            s += "_gnorm";
        }
        s
    }

    /// For the baselines only the general share means anything.
    pub fn for_baseline(self) -> Recipe {
        Recipe {
            general_percent: self.general_percent,
            ..Self::PAPER
        }
    }

    /// Words for the report: `paper`, or what differs (`10% general, preserving start`).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.general_percent > 0 {
            parts.push(format!("{}% general prose", self.general_percent));
        }
        if self.preserve_start {
            parts.push("function-preserving start".to_string());
        }
        if self.keep_backbone_prior {
            parts.push("backbone prior kept".to_string());
        }
        if self.gate_lr_scale != 1.0 {
            parts.push(format!("gate learning rate x{}", self.gate_lr_scale));
        }
        if self.gate_input == GateInput::Normalized {
            parts.push("normalised gate input".to_string());
        }
        if parts.is_empty() {
            "the paper's recipe".to_string()
        } else {
            parts.join(", ")
        }
    }
}

/// One run: a method trained for `steps` optimizer steps (all stages together) with `seed`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub method: Method,
    pub steps: usize,
    pub seed: u64,
    /// Only the first this many training documents of each domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub documents: Option<usize>,
    /// A learning rate other than the budget's (the learning-rate grid). For a composed
    /// method it is the stage-2 rate; its experts keep the budget's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// For a composed method: its experts' learning rate, when not the budget's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_lr: Option<f64>,
    /// Retention-aware options; the paper's recipe when absent.
    #[serde(default, skip_serializing_if = "Recipe::is_paper")]
    pub recipe: Recipe,
}

impl Default for RunSpec {
    fn default() -> Self {
        Self {
            method: Method::Backbone,
            steps: 0,
            seed: 0,
            documents: None,
            lr: None,
            expert_lr: None,
            recipe: Recipe::PAPER,
        }
    }
}

impl RunSpec {
    /// The budget's run of `method`: its steps ([`Method::budget_steps`]) and first seed.
    pub fn new(method: Method, b: &Budget) -> Self {
        Self {
            method,
            steps: method.budget_steps(b),
            seed: b.seed,
            documents: None,
            lr: None,
            expert_lr: None,
            recipe: Recipe::PAPER,
        }
    }

    /// The same run under `recipe` (for a baseline, only its general share).
    pub fn with_recipe(self, recipe: Recipe) -> Self {
        let recipe = match self.method {
            Method::FullFt | Method::Lora { .. } => recipe.for_baseline(),
            Method::Backbone => Recipe::PAPER,
            _ => recipe,
        };
        Self { recipe, ..self }
    }

    pub fn with_steps(self, steps: usize) -> Self {
        Self { steps, ..self }
    }

    pub fn with_seed(self, seed: u64) -> Self {
        Self { seed, ..self }
    }

    /// The name of the run's table row: every seed of one setting shares it.
    pub fn row_name(&self, b: &Budget) -> String {
        let mut name = self.method.base_name(b);
        if let Some(n) = self.documents {
            name += &format!("_n{n}");
        }
        if self.steps != self.method.budget_steps(b) && self.method != Method::Backbone {
            name += &format!("_t{}", self.steps);
        }
        if let Some(lr) = self.lr {
            name += &format!("_lr{}", lr_label(lr));
        }
        name += &self.recipe.suffix(false);
        name
    }

    /// The run's own name (its files): the row name, and the seed when it is not the first.
    pub fn name(&self, b: &Budget) -> String {
        let row = self.row_name(b);
        if self.seed == b.seed || self.method == Method::Backbone {
            row
        } else {
            format!("{row}_s{}", self.seed)
        }
    }

    /// The stage-1 expert of `domain` that a composed run of this spec uses: half of what is
    /// left after stage 2, with the same seed.
    pub fn expert_for(&self, domain: Domain, b: &Budget) -> RunSpec {
        RunSpec {
            method: Method::Expert { domain },
            steps: b.expert_steps(self.steps),
            lr: self.expert_lr,
            expert_lr: None,
            ..*self
        }
    }

    /// The file name stem of an expert run: the domain, then what sets it apart from the
    /// budget's own expert (the names earlier demos wrote for that one).
    pub fn expert_file_stem(&self, b: &Budget) -> String {
        let (domain, layers) = match self.method {
            Method::Expert { domain } => (domain.name().to_string(), None),
            Method::FreshMix { layers } => ("mix".to_string(), Some(layers)),
            _ => unreachable!("only experts have expert files"),
        };
        let mut stem = domain;
        if let Some(l) = layers.filter(|&l| l != b.expert_layers_per_block) {
            stem += &format!("_l{l}");
        }
        if let Some(n) = self.documents {
            stem += &format!("_n{n}");
        }
        if self.steps != self.method.budget_steps(b) {
            stem += &format!("_t{}", self.steps);
        }
        if let Some(lr) = self.lr {
            stem += &format!("_lr{}", lr_label(lr));
        }
        stem += &self.recipe.suffix(true);
        if self.seed != b.seed {
            stem += &format!("_s{}", self.seed);
        }
        stem
    }
}

/// A learning rate as a short, file-name-safe label: 3e-4 gives `3e-4`.
pub fn lr_label(lr: f64) -> String {
    format!("{lr:e}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Preset;

    #[test]
    fn names_keep_the_earlier_demos_and_tell_every_setting_apart() {
        let b = Budget::preset(Preset::Default);
        let name = |m| RunSpec::new(m, &b).name(&b);
        assert_eq!(name(Method::FullFt), "full_ft");
        assert_eq!(name(Method::Lora { rank: b.lora_rank }), "lora");
        assert_eq!(name(Method::Lora { rank: 4 }), "lora_r4");
        assert_eq!(
            name(Method::Composed {
                freeze_experts: true
            }),
            "mode_frozen_experts"
        );
        let lora = RunSpec::new(Method::Lora { rank: 16 }, &b);
        let seeded = lora.with_seed(b.seed + 2).with_steps(256);
        assert_eq!(seeded.row_name(&b), "lora_t256");
        assert_eq!(seeded.name(&b), "lora_t256_s2");
        let small = RunSpec {
            documents: Some(32),
            ..RunSpec::new(
                Method::FreshMix {
                    layers: b.expert_layers_per_block,
                },
                &b,
            )
        };
        assert_eq!(small.name(&b), "mode_fresh_mix_n32");
        assert_eq!(small.expert_file_stem(&b), "mix_n32");
        let composed = RunSpec::new(
            Method::Composed {
                freeze_experts: false,
            },
            &b,
        );
        let math = composed.expert_for(Domain::Math, &b);
        assert_eq!(math.expert_file_stem(&b), "math");
        assert_eq!(
            composed
                .with_steps(256)
                .with_seed(1)
                .expert_for(Domain::Code, &b)
                .expert_file_stem(&b),
            "code_t96_s1"
        );
        let grid = RunSpec {
            lr: Some(3e-4),
            ..RunSpec::new(Method::FullFt, &b)
        };
        assert_eq!(grid.name(&b), "full_ft_lr3e-4");
        let recipe = Recipe {
            general_percent: 10,
            preserve_start: true,
            keep_backbone_prior: true,
            gate_lr_scale: 10.0,
            gate_input: GateInput::Raw,
        };
        let aware = composed.with_recipe(recipe);
        assert_eq!(aware.name(&b), "mode_composed_g10_pres_prior_glr10");
        let normalized = composed.with_recipe(Recipe {
            gate_input: GateInput::Normalized,
            ..recipe
        });
        assert_eq!(
            normalized.name(&b),
            "mode_composed_g10_pres_prior_glr10_gnorm"
        );
        // The prior is a composition setting: experts with and without it are the same files.
        assert_eq!(
            aware.expert_for(Domain::Math, &b).expert_file_stem(&b),
            "math_g10_pres_glr10"
        );
        let replay = RunSpec::new(Method::FullFt, &b).with_recipe(recipe);
        assert_eq!(replay.name(&b), "full_ft_g10");
        // Results written before recipes existed read back as the paper's.
        let old: RunSpec =
            serde_json::from_str(r#"{"method":{"kind":"full_ft"},"steps":64,"seed":0}"#).unwrap();
        assert_eq!(old.recipe, Recipe::PAPER);
        assert!(!serde_json::to_string(&old).unwrap().contains("recipe"));
    }
}
