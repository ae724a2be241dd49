//! Training and scoring one run ([`RunSpec`]) of the demo: every method goes through the same
//! trainer and data, and is scored on the same windows of the same held-out sets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use mode_core::baseline::{LoraSpec, LoraTargets};
use mode_core::{ExpertFile, ExpertInit, LoadedExpertFile, LoadedModel};
use mode_data::{DataMix, PreparedData, Split};
use mode_model::Backbone;
use mode_train::baseline::{train_baseline, BaselineKind};
use mode_train::compose::{compose, ComposeOptions, GateInit};
use mode_train::stage1::{train_expert, Stage1Options};
use mode_train::trainer::MetricsLine;

use crate::method::{Domain, Method, RunSpec};
use crate::results::{RunResult, SetScore};
use crate::{data, Budget, Error, Reporter, Result};

/// What every run of one demo folder shares.
pub(crate) struct Runner<'a> {
    pub out: PathBuf,
    pub budget: Budget,
    pub backbone_path: PathBuf,
    pub tokenizer: mode_io::Tokenizer,
    pub domains: data::Domains,
    pub reporter: &'a mut dyn Reporter,
}

/// Which held-out data a run is scored on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scoring {
    /// The test sets (the table).
    Test,
    /// The validation splits of the training domains and general prose (choosing learning
    /// rates and recipes).
    Validation,
    /// The test sets of the continual study's three domains and the retention sets.
    Continual,
}

impl Runner<'_> {
    pub(crate) fn backbone(&self) -> Result<Backbone> {
        Ok(Backbone::open(&self.backbone_path, DType::F32, &Device::Cpu)?.0)
    }

    /// A fresh backbone to train, its source and its tokenizer's fingerprint.
    pub(crate) fn training_inputs(&self) -> Result<(Backbone, String, String)> {
        Ok((
            self.backbone()?,
            self.backbone_path.display().to_string(),
            self.tokenizer.fingerprint(),
        ))
    }

    pub(crate) fn path(&self, parts: &[&str]) -> PathBuf {
        parts.iter().fold(self.out.clone(), |p, s| p.join(s))
    }

    /// What `spec` trains on: Math and Code half and half, or `domain` alone; with the
    /// recipe's share of general prose beside them, and with `documents`, only that many of
    /// each source's training documents.
    fn training_data(&self, spec: &RunSpec, domain: Option<Domain>) -> Result<DataMix> {
        let general = spec.recipe.general_share();
        let targets = match domain {
            Some(d) => vec![d],
            None => Domain::ALL.to_vec(),
        };
        let mut parts = Vec::new();
        for d in &targets {
            let share = (1.0 - general) / targets.len() as f64;
            parts.push((PreparedData::open(self.domains.training(*d))?, share));
        }
        if general > 0.0 {
            parts.push((PreparedData::open(&self.domains.prose)?, general));
        }
        let mut mix = DataMix::new(parts)?;
        if let Some(n) = spec.documents {
            mix.limit_train_documents(n);
        }
        Ok(mix)
    }

    /// The result of run `spec` scored by `scoring`: read back from `runs/NAME.json` when an
    /// earlier invocation finished it, otherwise trained and scored now. Work is kept as it
    /// goes in `runs/NAME.partial.json` (the training's result, then each set's score), so an
    /// invocation stopped while scoring reloads the trained model and scores only what is left.
    pub fn run(&mut self, spec: &RunSpec, scoring: Scoring) -> Result<RunResult> {
        let name = spec.name(&self.budget);
        let saved = self.path(&["runs", &format!("{name}.json")]);
        if let Some(r) = read_result(&saved).filter(|r| r.spec == *spec) {
            self.reporter
                .stage(&format!("{name}: done in an earlier run"));
            return Ok(r);
        }
        let partial = self.path(&["runs", &format!("{name}.partial.json")]);
        let (model, mut result) = match read_result(&partial).filter(|r| r.spec == *spec) {
            Some(r) => {
                self.reporter
                    .stage(&format!("{name}: trained in an earlier run"));
                (self.trained(spec, &name)?, r)
            }
            None => {
                let t = Instant::now();
                let (model, mut result) = self.train(spec, &name)?;
                if spec.method != Method::Backbone {
                    result.train_seconds += t.elapsed().as_secs_f64();
                }
                crate::save_json(&partial, &result)?;
                (model, result)
            }
        };
        self.score(spec, &name, &model, scoring, &mut result, Some(&partial))?;
        crate::save_json(&saved, &result)?;
        let _ = std::fs::remove_file(&partial);
        Ok(result)
    }

    /// The model an earlier invocation trained for `spec`, loaded from where training left it.
    fn trained(&mut self, spec: &RunSpec, name: &str) -> Result<LoadedModel> {
        Ok(match spec.method {
            Method::Backbone => LoadedModel::Backbone(Box::new(self.backbone()?)),
            Method::Expert { .. } | Method::FreshMix { .. } => {
                let (file, _) = self.expert(spec)?;
                mode_core::loaded::load_with_expert(&file, self.backbone()?)?.0
            }
            Method::FullFt | Method::Lora { .. } | Method::Composed { .. } => {
                let out = self.path(&["models", name]);
                mode_core::loaded::load_folder(&out, self.backbone()?)?.0
            }
        })
    }

    fn train(&mut self, spec: &RunSpec, name: &str) -> Result<(LoadedModel, RunResult)> {
        let lr = |stage| spec.lr.unwrap_or(self.budget.lr.of(stage));
        let (model, result) = match spec.method {
            Method::Backbone => (
                LoadedModel::Backbone(Box::new(self.backbone()?)),
                RunResult::default(),
            ),
            Method::FullFt => {
                let lr = lr(crate::method::Stage::FullFt);
                self.baseline(spec, name, BaselineKind::Full, lr)?
            }
            Method::Lora { rank } => {
                let b = &self.budget;
                let kind = BaselineKind::Lora(LoraSpec {
                    rank,
                    alpha: b.lora_alpha * rank as f64 / b.lora_rank as f64,
                    targets: LoraTargets::Attn,
                });
                let lr = lr(crate::method::Stage::Lora);
                self.baseline(spec, name, kind, lr)?
            }
            Method::Expert { .. } | Method::FreshMix { .. } => {
                let (file, result) = self.expert(spec)?;
                let model = mode_core::loaded::load_with_expert(&file, self.backbone()?)?.0;
                (model, result)
            }
            Method::Composed { freeze_experts } => self.composed(spec, name, freeze_experts)?,
        };
        Ok((
            model,
            RunResult {
                spec: *spec,
                ..result
            },
        ))
    }

    fn baseline(
        &mut self,
        spec: &RunSpec,
        name: &str,
        kind: BaselineKind,
        lr: f64,
    ) -> Result<(LoadedModel, RunResult)> {
        self.reporter
            .stage(&format!("training {name} (learning rate {lr:e})"));
        let out = self.path(&["models", name]);
        let cfg = self.budget.train_config(spec.steps, lr, spec.seed);
        let mix = self.training_data(spec, None)?;
        let (backbone, source, fp) = self.training_inputs()?;
        let (manifest, report) =
            train_baseline(backbone, &source, &fp, &mix, kind, &cfg, &out, None, |e| {
                self.reporter.train(e)
            })?;
        let manifest = manifest.ok_or_else(|| Error::Step(format!("{name}: training stopped")))?;
        let (model, _) = mode_core::loaded::load_folder(&out, self.backbone()?)?;
        let result = RunResult {
            trainable_parameters: manifest.trainable_parameters,
            added_parameters: if manifest.lora.is_some() {
                manifest.trainable_parameters
            } else {
                0
            },
            tokens: report.tokens,
            learning_rates: BTreeMap::from([(name.to_string(), lr)]),
            curves: BTreeMap::from([(name.to_string(), read_curve(&metrics_of(&out)))]),
            ..Default::default()
        };
        Ok((model, result))
    }

    /// Trains (once) the expert of an `Expert` or `FreshMix` spec; returns its file and the
    /// result so far.
    pub(crate) fn expert(&mut self, spec: &RunSpec) -> Result<(PathBuf, RunResult)> {
        let b = self.budget.clone();
        let stem = spec.expert_file_stem(&b);
        let out = self.path(&["experts", &format!("{stem}.expert.safetensors")]);
        let (domain, layers, data) = match spec.method {
            Method::Expert { domain } => (
                domain.name(),
                b.expert_layers_per_block,
                self.training_data(spec, Some(domain))?,
            ),
            Method::FreshMix { layers } => ("mix", layers, self.training_data(spec, None)?),
            _ => unreachable!("not an expert"),
        };
        let lr = spec.lr.unwrap_or(b.lr.expert);
        let seconds_file = self.path(&["experts", &format!("{stem}.seconds")]);
        if !out.exists() {
            self.reporter.stage(&format!(
                "training the {stem} expert (stage 1, learning rate {lr:e})"
            ));
            let opts = Stage1Options {
                domain: domain.into(),
                blocks: b.blocks,
                expert_layers_per_block: layers,
                init: if spec.recipe.preserve_start {
                    ExpertInit::Preserve
                } else {
                    ExpertInit::Copy
                },
                gate_init_backbone_prob: mode_core::expert::GATE_INIT_BACKBONE_PROB,
                gate_lr_scale: spec.recipe.gate_lr_scale,
                gate_input: spec.recipe.gate_input,
                train: b.train_config(spec.steps, lr, spec.seed),
            };
            let t = Instant::now();
            let (backbone, source, fp) = self.training_inputs()?;
            let (_, report) = train_expert(backbone, &source, &fp, &data, &opts, &out, |e| {
                self.reporter.train(e)
            })?;
            if report.steps < spec.steps {
                return Err(Error::Step(format!("{stem} expert: training stopped")));
            }
            let _ = std::fs::write(&seconds_file, t.elapsed().as_secs_f64().to_string());
        }
        let file = ExpertFile::load(&out, &Device::Cpu)?;
        let params = file_parameters(&file);
        let seconds = std::fs::read_to_string(&seconds_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0.0);
        Ok((
            out.clone(),
            RunResult {
                trainable_parameters: params,
                added_parameters: params,
                tokens: file.meta.training.tokens,
                train_seconds: seconds,
                learning_rates: BTreeMap::from([(format!("{stem} expert"), lr)]),
                curves: BTreeMap::from([(format!("{stem} expert"), read_curve(&metrics_of(&out)))]),
                ..Default::default()
            },
        ))
    }

    fn composed(
        &mut self,
        spec: &RunSpec,
        name: &str,
        freeze: bool,
    ) -> Result<(LoadedModel, RunResult)> {
        let b = self.budget.clone();
        let mut files = Vec::new();
        let mut result = RunResult::default();
        for domain in Domain::ALL {
            let (file, r) = self.expert(&spec.expert_for(domain, &b))?;
            files.push(file);
            result.trainable_parameters += r.added_parameters;
            result.tokens += r.tokens;
            result.train_seconds += r.train_seconds;
            result.curves.extend(r.curves);
            result.learning_rates.extend(r.learning_rates);
        }
        let lr = spec.lr.unwrap_or(b.lr.compose);
        self.reporter
            .stage(&format!("composing {name} (stage 2, learning rate {lr:e})"));
        let out = self.path(&["models", name]);
        let opts = ComposeOptions {
            freeze_experts: freeze,
            gate_init: GateInit::Stage1,
            gate_init_backbone_prob: mode_core::expert::GATE_INIT_BACKBONE_PROB,
            keep_backbone_prior: spec.recipe.keep_backbone_prior,
            gate_lr_scale: spec.recipe.gate_lr_scale,
            gate_input: Some(spec.recipe.gate_input),
            train: b.train_config(b.compose_steps_for(spec.steps), lr, spec.seed),
        };
        let experts = files
            .iter()
            .map(|f| LoadedExpertFile::load(f, &Device::Cpu))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mix = self.training_data(spec, None)?;
        let (backbone, source, fp) = self.training_inputs()?;
        let (manifest, report) =
            compose(backbone, &source, &fp, experts, &mix, &opts, &out, |e| {
                self.reporter.train(e)
            })?;
        manifest.ok_or_else(|| Error::Step(format!("{name}: training stopped")))?;
        let (model, _) = mode_core::loaded::load_folder(&out, self.backbone()?)?;
        let gates: usize = match &model {
            LoadedModel::Mode(m) => m
                .trainable_tensors(false, true)
                .iter()
                .map(|(_, t)| t.elem_count())
                .sum(),
            LoadedModel::Backbone(_) => 0,
        };
        result.trainable_parameters += gates;
        result.added_parameters = result.trainable_parameters;
        result.tokens += report.tokens;
        result
            .curves
            .insert(format!("{name} stage 2"), read_curve(&metrics_of(&out)));
        result.learning_rates.insert(format!("{name} stage 2"), lr);
        Ok((model, result))
    }

    /// Scores `model` on every held-out set (or validation split) of the demo, window by window;
    /// sets already in `result` are kept. With `progress`, `result` is saved there after each
    /// set.
    pub(crate) fn score(
        &mut self,
        spec: &RunSpec,
        name: &str,
        model: &LoadedModel,
        scoring: Scoring,
        result: &mut RunResult,
        progress: Option<&Path>,
    ) -> Result<()> {
        let mut t = Instant::now();
        let b = self.budget.clone();
        let (sets, split, windows) = match scoring {
            Scoring::Test => (self.domains.eval_sets(), Split::Test, b.eval_windows),
            Scoring::Continual => {
                let sets = crate::continual::sets()
                    .into_iter()
                    .map(|name| {
                        let path = match Domain::SEQUENCE.iter().find(|d| d.name() == name) {
                            Some(d) => self.domains.test_set(*d).to_path_buf(),
                            None if name == crate::results::PROSE => self.domains.prose.clone(),
                            None => self.domains.english.clone(),
                        };
                        (name, path)
                    })
                    .collect();
                (sets, Split::Test, b.eval_windows)
            }
            Scoring::Validation => {
                let mut sets = self.domains.validation_sets();
                // An expert is chosen on its own domain.
                if let Method::Expert { domain } = spec.method {
                    sets.retain(|(n, _)| *n == domain.name());
                }
                (sets, Split::Val, b.select_windows)
            }
        };
        self.reporter.stage(&format!(
            "scoring {name} on {}{} ({} windows of {} tokens each)",
            if split == Split::Val {
                "the validation splits of "
            } else {
                ""
            },
            sets.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
            windows,
            b.eval_seq_len
        ));
        model.take_gate_stats();
        for (set, path) in sets {
            if result.sets.contains_key(set) {
                continue;
            }
            let (report, windows) = mode_eval::evaluate_path(
                model.lm(),
                &self.tokenizer,
                &path,
                split,
                b.eval_seq_len,
                4,
                Some(windows),
                |_, _| {},
            )?;
            result.sets.insert(
                set.to_string(),
                SetScore {
                    accuracy: 100.0 * report.next_token_accuracy,
                    loss: report.loss,
                    windows,
                },
            );
            if let Some(g) = model.take_gate_stats() {
                result.gate_weights.insert(set.to_string(), g);
            }
            result.eval_seconds += t.elapsed().as_secs_f64();
            t = Instant::now();
            if let Some(path) = progress {
                crate::save_json(path, result)?;
            }
        }
        if let LoadedModel::Mode(m) = model {
            result.branches = std::iter::once("backbone".to_string())
                .chain(m.experts.iter().map(|e| e.name.clone()))
                .collect();
        }
        Ok(())
    }
}

/// A run's result as saved, if `path` holds one.
fn read_result(path: &Path) -> Option<RunResult> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Parameters an expert file adds: its layers and stage-1 gates.
fn file_parameters(file: &ExpertFile) -> usize {
    file.tensors.values().map(|t| t.elem_count()).sum()
}

/// The metrics file a run writes next to its output.
fn metrics_of(out: &Path) -> PathBuf {
    mode_train::stage1::side_paths(out).1
}

/// (step, training loss) from a metrics file; empty when it cannot be read.
pub fn read_curve(metrics: &Path) -> Vec<(usize, f64)> {
    let Ok(text) = std::fs::read_to_string(metrics) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<MetricsLine>(l).ok())
        .filter(|l| l.kind == "train")
        .map(|l| (l.step, l.loss))
        .collect()
}
