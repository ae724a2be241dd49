//! Domains added one at a time (`mode demo --continual`): Math, then Code, then C, the setting
//! where modularity should win by construction. Fine-tuning must either keep training on the
//! new domain (and forget the earlier ones) or replay them; MoDE trains one new expert per
//! domain and adds it, with its stage-1 gates as they are (hot-add) or with the gates of all
//! experts re-tuned. After each addition every track is scored on the test sets of all three
//! domains and on the retention sets; forgetting is each earlier domain's drop from its best.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use mode_core::baseline::{BaselineManifest, LoraSpec, LoraTargets};
use mode_core::{LoadedExpertFile, LoadedModel, ModeModel};
use mode_data::{DataMix, PreparedData};
use mode_eval::stats::{self, Interval, Verdict};
use mode_train::baseline::{train_baseline, BaselineKind};
use mode_train::compose::{compose, ComposeOptions, GateInit};
use serde::{Deserialize, Serialize};

use crate::method::{Domain, Method, Recipe, RunSpec, Stage};
use crate::results::{RunResult, ENGLISH, PROSE};
use crate::runner::{Runner, Scoring};
use crate::select_recipe::RecipeSelection;
use crate::{Error, Result};

/// Training documents of each earlier domain kept for replay (the first ones of its train
/// split): a small buffer, the same for every track that replays.
pub const REPLAY_DOCUMENTS: usize = 32;
/// Share of each batch drawn from the replay buffer, split evenly over the earlier domains.
pub const REPLAY_SHARE: f64 = 0.2;

/// How a track learns a new domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Learner {
    /// Full fine-tuning, continued on each new domain.
    FullFt,
    /// One LoRA, continued on each new domain.
    Lora,
    /// One MoDE expert per domain added with its stage-1 gates; nothing is re-tuned.
    ModeHotAdd,
    /// One MoDE expert per domain, then the gates of all experts re-tuned (experts frozen).
    ModeRetuned,
}

/// One line of the continual study: a learner, with or without the replay buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Track {
    pub learner: Learner,
    pub replay: bool,
}

impl Track {
    /// Every track, in report order.
    pub const ALL: [Track; 7] = [
        Track::new(Learner::FullFt, false),
        Track::new(Learner::FullFt, true),
        Track::new(Learner::Lora, false),
        Track::new(Learner::Lora, true),
        Track::new(Learner::ModeHotAdd, false),
        Track::new(Learner::ModeRetuned, false),
        Track::new(Learner::ModeRetuned, true),
    ];

    pub const fn new(learner: Learner, replay: bool) -> Self {
        Self { learner, replay }
    }

    pub fn name(&self) -> String {
        let base = match self.learner {
            Learner::FullFt => "full_ft",
            Learner::Lora => "lora",
            Learner::ModeHotAdd => "mode_hot_add",
            Learner::ModeRetuned => "mode_retuned",
        };
        if self.replay {
            format!("{base}_replay")
        } else {
            base.to_string()
        }
    }

    /// The file name of the track's model after `step` (1-based).
    fn step_name(&self, step: usize) -> String {
        format!("{}_{step}", self.name())
    }
}

/// One track after one addition, scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    pub track: Track,
    /// 1-based: the number of domains added so far.
    pub step: usize,
    pub domain: Domain,
    /// Seconds and tokens of this step's training alone.
    pub step_seconds: f64,
    pub step_tokens: usize,
    pub result: RunResult,
}

/// An earlier domain's drop, after the last step, from its best accuracy on any step since it
/// was added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Forgetting {
    pub track: Track,
    pub domain: Domain,
    pub best_step: usize,
    /// `best - last` in points, paired bootstrap interval over the same windows.
    pub drop: Interval,
}

/// A goal of the study, read from an interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Goal {
    pub text: String,
    pub track: Track,
    /// Mean drop over the earlier domains (points), paired interval.
    pub drop: Interval,
    pub verdict: Verdict,
}

/// The study: `continual.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContinualResults {
    pub recipe: Recipe,
    pub steps_per_domain: usize,
    pub batch_tokens: usize,
    pub steps: Vec<StepResult>,
    pub forgetting: Vec<Forgetting>,
    pub goals: Vec<Goal>,
}

/// The held-out sets scored after each step: the three domains, then the retention sets.
pub fn sets() -> Vec<&'static str> {
    let mut v: Vec<&str> = Domain::SEQUENCE.iter().map(|d| d.name()).collect();
    v.extend([PROSE, ENGLISH]);
    v
}

const BOOTSTRAP_SEED: u64 = 0x00c0_7a11;

impl Runner<'_> {
    /// The training data of `track`'s step adding `domain` (after `earlier`): the domain itself,
    /// the recipe's share of general prose for MoDE, and with replay the earlier domains'
    /// buffer.
    fn continual_data(
        &self,
        track: Track,
        domain: Domain,
        earlier: &[Domain],
        recipe: &Recipe,
    ) -> Result<DataMix> {
        let general = match track.learner {
            Learner::ModeHotAdd | Learner::ModeRetuned => recipe.general_share(),
            Learner::FullFt | Learner::Lora => 0.0,
        };
        let replay = if track.replay && !earlier.is_empty() {
            REPLAY_SHARE
        } else {
            0.0
        };
        let mut parts = vec![(
            PreparedData::open(self.domains.training(domain))?,
            1.0 - general - replay,
        )];
        for d in earlier.iter().filter(|_| replay > 0.0) {
            let mut data = PreparedData::open(self.domains.training(*d))?;
            data.limit_train_documents(REPLAY_DOCUMENTS);
            parts.push((data, replay / earlier.len() as f64));
        }
        if general > 0.0 {
            parts.push((PreparedData::open(&self.domains.prose)?, general));
        }
        Ok(DataMix::new(parts)?)
    }

    /// The stage-1 expert of `domain` for the continual study: the budget's steps less those of
    /// the gate re-tuning, under `recipe`.
    fn continual_expert(&mut self, domain: Domain, recipe: Recipe) -> Result<(PathBuf, RunResult)> {
        let b = self.budget.clone();
        let spec = RunSpec::new(Method::Expert { domain }, &b)
            .with_steps(b.steps - b.compose_steps)
            .with_recipe(recipe);
        self.expert(&spec)
    }

    /// The model folder of a fine-tuning track after `step`: trained now, on from the folder
    /// of the step before (itself trained again first if it is gone, as after a restore of the
    /// results alone), unless it is already there.
    fn baseline_folder(
        &mut self,
        track: Track,
        step: usize,
        recipe: Recipe,
    ) -> Result<(PathBuf, BaselineManifest)> {
        let b = self.budget.clone();
        let name = track.step_name(step);
        let out = self.path(&["continual", "models", &name]);
        if let Ok(manifest) = mode_core::baseline::read_manifest(&out) {
            return Ok((out, manifest));
        }
        let start = match step {
            1 => None,
            _ => Some(self.baseline_folder(track, step - 1, recipe)?.0),
        };
        let (kind, stage) = match track.learner {
            Learner::FullFt => (BaselineKind::Full, Stage::FullFt),
            _ => (
                BaselineKind::Lora(LoraSpec {
                    rank: b.lora_rank,
                    alpha: b.lora_alpha,
                    targets: LoraTargets::Attn,
                }),
                Stage::Lora,
            ),
        };
        let lr = b.lr.of(stage);
        let domain = Domain::SEQUENCE[step - 1];
        self.reporter.stage(&format!(
            "continual {name}: training on {} (learning rate {lr:e})",
            domain.name()
        ));
        let data = self.continual_data(track, domain, &Domain::SEQUENCE[..step - 1], &recipe)?;
        let cfg = b.train_config(b.steps, lr, b.seed);
        let (backbone, source, fp) = self.training_inputs()?;
        let reporter = &mut self.reporter;
        let (manifest, _) = train_baseline(
            backbone,
            &source,
            &fp,
            &data,
            kind,
            &cfg,
            &out,
            start.as_deref(),
            |e| reporter.train(e),
        )?;
        let manifest = manifest.ok_or_else(|| Error::Step(format!("{name}: training stopped")))?;
        Ok((out, manifest))
    }

    /// Trains (or reads back) `track` through every step and scores each.
    fn continual_track(&mut self, track: Track, recipe: Recipe) -> Result<Vec<StepResult>> {
        let mut out = Vec::new();
        for (i, &domain) in Domain::SEQUENCE.iter().enumerate() {
            let step = i + 1;
            let name = track.step_name(step);
            let saved = self.path(&["continual", &format!("{name}.json")]);
            if let Ok(r) = std::fs::read_to_string(&saved)
                .map_err(|_| ())
                .and_then(|t| serde_json::from_str::<StepResult>(&t).map_err(|_| ()))
            {
                if r.track == track && r.step == step {
                    self.reporter
                        .stage(&format!("continual {name}: done in an earlier run"));
                    out.push(r);
                    continue;
                }
            }
            let earlier = &Domain::SEQUENCE[..i];
            let t = Instant::now();
            let (model, mut result, tokens) = self.continual_step(track, step, earlier, recipe)?;
            let seconds = t.elapsed().as_secs_f64();
            let spec = RunSpec::default();
            self.score(&spec, &name, &model, Scoring::Continual, &mut result, None)?;
            let r = StepResult {
                track,
                step,
                domain,
                step_seconds: seconds,
                step_tokens: tokens,
                result,
            };
            crate::save_json(&saved, &r)?;
            out.push(r);
        }
        Ok(out)
    }

    /// Trains one step of a track: the model after it, its result so far and the tokens the
    /// step trained on.
    fn continual_step(
        &mut self,
        track: Track,
        step: usize,
        earlier: &[Domain],
        recipe: Recipe,
    ) -> Result<(LoadedModel, RunResult, usize)> {
        let b = self.budget.clone();
        let domain = Domain::SEQUENCE[step - 1];
        let name = track.step_name(step);
        match track.learner {
            Learner::FullFt | Learner::Lora => {
                let (out, manifest) = self.baseline_folder(track, step, recipe)?;
                let (model, _) = mode_core::loaded::load_folder(&out, self.backbone()?)?;
                let tokens = manifest.training.tokens;
                let result = RunResult {
                    trainable_parameters: manifest.trainable_parameters,
                    tokens,
                    ..Default::default()
                };
                Ok((model, result, tokens))
            }
            Learner::ModeHotAdd | Learner::ModeRetuned => {
                let mut files = Vec::new();
                let mut tokens = 0;
                for (j, d) in Domain::SEQUENCE[..step].iter().enumerate() {
                    let (file, r) = self.continual_expert(*d, recipe)?;
                    if j + 1 == step {
                        tokens += r.tokens;
                    }
                    files.push(file);
                }
                if track.learner == Learner::ModeHotAdd {
                    let mut model = ModeModel::bare(self.backbone()?)?;
                    let fingerprint = model.backbone.fingerprint()?;
                    for f in &files {
                        let file = mode_core::ExpertFile::load(f, &Device::Cpu)?;
                        model.add_expert_file(&file, f, &fingerprint, None)?;
                    }
                    let model = LoadedModel::Mode(Box::new(model));
                    return Ok((model, RunResult::default(), tokens));
                }
                let lr = b.lr.of(Stage::Compose);
                self.reporter.stage(&format!(
                    "continual {name}: re-tuning the gates of {} experts (learning rate {lr:e})",
                    files.len()
                ));
                let data = self.continual_data(track, domain, earlier, &recipe)?;
                let out = self.path(&["continual", "models", &name]);
                let opts = ComposeOptions {
                    freeze_experts: true,
                    gate_init: GateInit::Stage1,
                    gate_init_backbone_prob: mode_core::expert::GATE_INIT_BACKBONE_PROB,
                    keep_backbone_prior: recipe.keep_backbone_prior,
                    gate_lr_scale: recipe.gate_lr_scale,
                    gate_input: Some(recipe.gate_input),
                    train: b.train_config(b.compose_steps, lr, b.seed),
                };
                let experts = files
                    .iter()
                    .map(|f| LoadedExpertFile::load(f, &Device::Cpu))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                let (backbone, source, fp) = self.training_inputs()?;
                let reporter = &mut self.reporter;
                let (manifest, report) =
                    compose(backbone, &source, &fp, experts, &data, &opts, &out, |e| {
                        reporter.train(e)
                    })?;
                manifest.ok_or_else(|| Error::Step(format!("{name}: training stopped")))?;
                let (model, _) = mode_core::loaded::load_folder(&out, self.backbone()?)?;
                Ok((model, RunResult::default(), tokens + report.tokens))
            }
        }
    }
}

/// Runs (or resumes) every track and reads forgetting and the goals from the scores.
pub(crate) fn run(runner: &mut Runner) -> Result<ContinualResults> {
    let selection = RecipeSelection::committed();
    let recipe = if selection.is_selected() {
        selection.chosen
    } else {
        Recipe::PAPER
    };
    let mut steps = Vec::new();
    for track in Track::ALL {
        steps.extend(runner.continual_track(track, recipe)?);
    }
    Ok(ContinualResults::new(
        recipe,
        runner.budget.steps,
        runner.budget.batch_tokens,
        steps,
    ))
}

impl ContinualResults {
    /// Forgetting and goals from scored steps.
    pub fn new(
        recipe: Recipe,
        steps_per_domain: usize,
        batch_tokens: usize,
        steps: Vec<StepResult>,
    ) -> Self {
        let forgetting: Vec<Forgetting> = Track::ALL
            .iter()
            .flat_map(|&t| forgetting(&steps, t))
            .collect();
        let goals = goals(&steps);
        Self {
            recipe,
            steps_per_domain,
            batch_tokens,
            steps,
            forgetting,
            goals,
        }
    }

    /// A track's result after `step`.
    pub fn at(&self, track: Track, step: usize) -> Option<&StepResult> {
        self.steps
            .iter()
            .find(|s| s.track == track && s.step == step)
    }
}

fn windows(r: &StepResult, set: &str) -> Vec<mode_eval::Totals> {
    r.result.windows(set, false)
}

/// Each earlier domain's drop from its best step to the last, for one track.
fn forgetting(steps: &[StepResult], track: Track) -> Vec<Forgetting> {
    let of: Vec<&StepResult> = steps.iter().filter(|s| s.track == track).collect();
    let Some(last) = of.iter().max_by_key(|s| s.step) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, domain) in Domain::SEQUENCE.iter().enumerate() {
        let added = i + 1;
        if added >= last.step {
            continue;
        }
        let best = of
            .iter()
            .filter(|s| s.step >= added)
            .max_by(|a, b| {
                let acc = |s: &StepResult| stats::accuracy(&windows(s, domain.name()));
                acc(a).total_cmp(&acc(b))
            })
            .expect("the step that added it");
        let (bw, lw) = (windows(best, domain.name()), windows(last, domain.name()));
        out.push(Forgetting {
            track,
            domain: *domain,
            best_step: best.step,
            drop: stats::mean_difference_interval(&[&bw], &[&lw], BOOTSTRAP_SEED),
        });
    }
    out
}

/// The study's goals: MoDE (re-tuned with replay) loses at most 0.5 points on the earlier
/// domains, sequential full fine-tuning at least 2; each read from the paired interval of the
/// mean drop from the step that added each domain to the last step.
fn goals(steps: &[StepResult]) -> Vec<Goal> {
    let mut out = Vec::new();
    let mut goal = |text: &str, track: Track, at_most: Option<f64>, at_least: Option<f64>| {
        let of: Vec<&StepResult> = steps.iter().filter(|s| s.track == track).collect();
        let Some(last) = of.iter().max_by_key(|s| s.step) else {
            return;
        };
        let earlier: Vec<(Domain, &StepResult)> = Domain::SEQUENCE[..last.step - 1]
            .iter()
            .enumerate()
            .filter_map(|(i, d)| of.iter().find(|s| s.step == i + 1).map(|s| (*d, *s)))
            .collect();
        if earlier.is_empty() {
            return;
        }
        let added: Vec<Vec<mode_eval::Totals>> =
            earlier.iter().map(|(d, s)| windows(s, d.name())).collect();
        let now: Vec<Vec<mode_eval::Totals>> = earlier
            .iter()
            .map(|(d, _)| windows(last, d.name()))
            .collect();
        let a: Vec<&[mode_eval::Totals]> = added.iter().map(Vec::as_slice).collect();
        let n: Vec<&[mode_eval::Totals]> = now.iter().map(Vec::as_slice).collect();
        let drop = stats::mean_difference_interval(&a, &n, BOOTSTRAP_SEED);
        // "drop <= x" is "-drop >= -x"; "drop >= x" reads the interval as it is.
        let verdict = match (at_most, at_least) {
            (Some(x), _) => Verdict::of(
                &Interval {
                    estimate: -drop.estimate,
                    lo: -drop.hi,
                    hi: -drop.lo,
                },
                -x,
            ),
            (_, Some(x)) => Verdict::of(&drop, x),
            _ => unreachable!("a goal has a bound"),
        };
        out.push(Goal {
            text: text.to_string(),
            track,
            drop,
            verdict,
        });
    };
    goal(
        "MoDE (gates re-tuned with replay) loses <= 0.5 points on earlier domains",
        Track::new(Learner::ModeRetuned, true),
        Some(0.5),
        None,
    );
    goal(
        "MoDE (hot-added experts) loses <= 0.5 points on earlier domains",
        Track::new(Learner::ModeHotAdd, false),
        Some(0.5),
        None,
    );
    goal(
        "Sequential full fine-tuning loses >= 2 points on earlier domains",
        Track::new(Learner::FullFt, false),
        None,
        Some(2.0),
    );
    out
}
