//! `mode demo`: the paper's experiment end to end at our scale. One run fetches the backbone
//! and the data, trains every method at one token budget (full fine-tuning, LoRA, MoDE stage 1
//! experts, their composition with tuned or frozen experts, one fresh expert on the mix),
//! evaluates all of them on held-out Math, Code and English, and writes `results.json` and a
//! self-contained `report.html`.
//!
//! Every method's outcome is saved as soon as it is known (`runs/NAME.json`), and training
//! resumes from checkpoints, so a demo that is stopped picks up where it was.

pub mod data;
pub mod report;
pub mod svg;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use mode_core::baseline::{LoraSpec, LoraTargets};
use mode_core::{ExpertFile, ExpertInit, LoadedExpertFile, LoadedModel};
use mode_data::{DataMix, PreparedData};
use mode_model::Backbone;
use mode_train::baseline::{train_baseline, BaselineKind};
use mode_train::compose::{compose, ComposeOptions, GateInit};
use mode_train::stage1::{train_expert, Stage1Options};
use mode_train::trainer::{Event, MetricsLine, TrainConfig};
use serde::{Deserialize, Serialize};

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
    /// About 30 minutes on a 2-core machine.
    Default,
    /// Longer training, plus a LoRA rank sweep.
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
    /// Extra LoRA ranks trained and evaluated (`--full`).
    pub lora_sweep: Vec<usize>,
    pub adapter_lr: f64,
    pub full_ft_lr: f64,
    /// Evaluation windows per held-out set, spread over it.
    pub eval_windows: usize,
    pub eval_seq_len: usize,
}

impl Budget {
    pub fn preset(p: Preset) -> Self {
        let base = Self {
            steps: 64,
            compose_steps: 16,
            batch_tokens: 1024,
            seq_len: 256,
            blocks: 3,
            expert_layers_per_block: 2,
            lora_rank: 16,
            lora_alpha: 32.0,
            lora_sweep: Vec::new(),
            adapter_lr: 1e-3,
            full_ft_lr: 1e-4,
            eval_windows: 16,
            eval_seq_len: 256,
        };
        match p {
            Preset::Default => base,
            Preset::Quick => Self {
                steps: 4,
                compose_steps: 2,
                batch_tokens: 256,
                seq_len: 128,
                expert_layers_per_block: 1,
                eval_windows: 2,
                eval_seq_len: 128,
                ..base
            },
            Preset::Full => Self {
                steps: 256,
                compose_steps: 64,
                lora_sweep: vec![4, 64],
                eval_windows: 64,
                ..base
            },
        }
    }

    /// Steps of each stage-1 expert of a composed method.
    pub fn expert_steps(&self) -> usize {
        (self.steps.saturating_sub(self.compose_steps) / 2).max(1)
    }

    fn train_config(&self, steps: usize, lr: f64) -> TrainConfig {
        TrainConfig {
            steps,
            batch_tokens: self.batch_tokens,
            seq_len: self.seq_len,
            lr,
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
    /// Use this folder (with `math/`, `code/`, `english/`) instead of fetching.
    pub data_dir: Option<PathBuf>,
    /// Discard earlier results in `out` (the prepared data stays).
    pub restart: bool,
    /// Also run the scaling sweeps ([`scaling_methods`]): the paper's Figure 3 at our scale.
    pub scaling: bool,
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
    if opts.restart || earlier.as_ref().is_some_and(|k| *k != key) {
        if !opts.restart {
            return Err(Error::Step(format!(
                "{} holds results of another budget or backbone; pass --restart to discard them, or choose another --out",
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
    let json = serde_json::to_vec_pretty(&key).expect("key serialises");
    mode_io::atomic::write_file(&path, &json).map_err(io(&path))
}

/// Accuracies (percent) and losses of one model on the held-out sets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MethodResult {
    pub math: f64,
    pub code: f64,
    pub english: f64,
    /// Mean of the three accuracies, as in the paper's table.
    pub average: f64,
    pub loss: BTreeMap<String, f64>,
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

/// The whole run: `results.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub preset: Preset,
    pub budget: Budget,
    pub backbone: String,
    /// By method name: backbone, full_ft, lora, mode_math_expert, mode_code_expert,
    /// mode_composed, mode_frozen_experts, mode_fresh_mix (and lora_rN for a sweep).
    pub methods: BTreeMap<String, MethodResult>,
    /// Wall time of the invocation that wrote this file; methods it reused from an earlier
    /// (interrupted) invocation keep their own times in `methods`.
    pub total_seconds: f64,
    /// Training documents per domain (math, code): where the scaling sweep's "all" sits.
    #[serde(default)]
    pub train_documents: BTreeMap<String, usize>,
}

/// Progress of a demo, for the caller to show.
pub trait Reporter {
    /// A new stage starts (`training full_ft`, `evaluating lora`).
    fn stage(&mut self, what: &str);
    /// A training loop event; the return value is the loop's go-on flag.
    fn train(&mut self, event: Event) -> bool;
}

/// Documents per domain of the "fewer training examples" runs of the scaling sweep.
pub const SCALING_DOCUMENTS: [usize; 2] = [32, 256];

/// The scaling sweep's extra methods (Figure 3 of the paper), all on the Math+Code mix at the
/// budget's steps: LoRA at ranks 4 and 64 and one fresh MoDE expert at 1 and 4 layers per block
/// (besides the table's own rank and layer count), then LoRA and the MoDE expert trained on only
/// the first [`SCALING_DOCUMENTS`] documents of each domain.
pub fn scaling_methods(b: &Budget) -> Vec<String> {
    let mut names: Vec<String> = [4, 64]
        .into_iter()
        .filter(|&r| r != b.lora_rank)
        .map(|r| format!("lora_r{r}"))
        .collect();
    names.extend(
        [1, 2, 4]
            .into_iter()
            .filter(|&l| l != b.expert_layers_per_block)
            .map(|l| format!("mode_fresh_mix_l{l}")),
    );
    for n in SCALING_DOCUMENTS {
        names.push(format!("lora_n{n}"));
        names.push(format!("mode_fresh_mix_n{n}"));
    }
    names
}

/// The number after `prefix` in a method name: `lora_r4` with `lora_r` gives 4.
pub(crate) fn numbered(name: &str, prefix: &str) -> Option<usize> {
    name.strip_prefix(prefix)?.parse().ok()
}

/// The methods in the order they run (and appear in the table).
pub const METHODS: [&str; 8] = [
    "backbone",
    "full_ft",
    "lora",
    "mode_math_expert",
    "mode_code_expert",
    "mode_composed",
    "mode_frozen_experts",
    "mode_fresh_mix",
];

struct Ctx<'a> {
    opts: &'a DemoOptions,
    backbone_path: PathBuf,
    backbone_source: String,
    tokenizer: mode_io::Tokenizer,
    domains: data::Domains,
    reporter: &'a mut dyn Reporter,
}

/// Runs (or resumes) the demo and writes `results.json` and `report.html` into `opts.out`.
pub fn run(opts: &DemoOptions, reporter: &mut dyn Reporter) -> Result<Results> {
    let start = Instant::now();
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
    let mut ctx = Ctx {
        opts,
        backbone_source: backbone_path.display().to_string(),
        backbone_path,
        tokenizer,
        domains,
        reporter,
    };
    let mut methods = BTreeMap::new();
    let mut names: Vec<String> = METHODS.iter().map(|s| s.to_string()).collect();
    names.extend(opts.budget.lora_sweep.iter().map(|r| format!("lora_r{r}")));
    if opts.scaling {
        for n in scaling_methods(&opts.budget) {
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    for name in &names {
        let result = ctx.method(name)?;
        methods.insert(name.clone(), result);
    }
    let mut train_documents = BTreeMap::new();
    for (domain, dir) in [("math", &ctx.domains.math), ("code", &ctx.domains.code)] {
        let data = PreparedData::open(dir)?;
        let docs = data.split(mode_data::Split::Train).doc_offsets().len() - 1;
        train_documents.insert(domain.to_string(), docs);
    }
    let results = Results {
        preset: opts.preset,
        budget: opts.budget.clone(),
        backbone: ctx.backbone_source.clone(),
        methods,
        total_seconds: start.elapsed().as_secs_f64(),
        train_documents,
    };
    report::write(&opts.out, &results)?;
    Ok(results)
}

impl Ctx<'_> {
    fn backbone(&self) -> Result<Backbone> {
        Ok(Backbone::open(&self.backbone_path, DType::F32, &Device::Cpu)?.0)
    }

    /// A fresh backbone to train, its source and its tokenizer's fingerprint.
    fn training_inputs(&self) -> Result<(Backbone, String, String)> {
        Ok((
            self.backbone()?,
            self.backbone_source.clone(),
            self.tokenizer.fingerprint(),
        ))
    }

    /// Stage-1 options of an expert for `domain` with `layers` per block, trained `steps` steps.
    fn stage1_options(&self, domain: &str, layers: usize, steps: usize) -> Stage1Options {
        let b = &self.opts.budget;
        Stage1Options {
            domain: domain.into(),
            blocks: b.blocks,
            expert_layers_per_block: layers,
            init: ExpertInit::Copy,
            gate_init_backbone_prob: mode_core::expert::GATE_INIT_BACKBONE_PROB,
            train: b.train_config(steps, b.adapter_lr),
        }
    }

    fn path(&self, parts: &[&str]) -> PathBuf {
        parts.iter().fold(self.opts.out.clone(), |p, s| p.join(s))
    }

    /// Math and Code half and half; with `documents`, only that many of each domain's
    /// training documents.
    fn mix(&self, documents: Option<usize>) -> Result<DataMix> {
        let mut mix = DataMix::new(vec![
            (PreparedData::open(&self.domains.math)?, 0.5),
            (PreparedData::open(&self.domains.code)?, 0.5),
        ])?;
        if let Some(n) = documents {
            mix.limit_train_documents(n);
        }
        Ok(mix)
    }

    fn single(&self, dir: &Path) -> Result<DataMix> {
        Ok(DataMix::single(PreparedData::open(dir)?))
    }

    /// The result of method `name`: read back from `runs/NAME.json` when an earlier run
    /// finished it, otherwise trained and evaluated now.
    fn method(&mut self, name: &str) -> Result<MethodResult> {
        let saved = self.path(&["runs", &format!("{name}.json")]);
        if let Ok(text) = std::fs::read_to_string(&saved) {
            if let Ok(r) = serde_json::from_str::<MethodResult>(&text) {
                self.reporter
                    .stage(&format!("{name}: done in an earlier run"));
                return Ok(r);
            }
        }
        let b = self.opts.budget.clone();
        let t = Instant::now();
        let (model, mut result) = match name {
            "backbone" => (
                LoadedModel::Backbone(Box::new(self.backbone()?)),
                MethodResult::default(),
            ),
            "full_ft" => self.baseline(name, BaselineKind::Full, b.full_ft_lr, None)?,
            "lora" => self.lora(name, b.lora_rank, None)?,
            "mode_math_expert" => self.expert_model("math")?,
            "mode_code_expert" => self.expert_model("code")?,
            "mode_composed" => self.composed(name, false)?,
            "mode_frozen_experts" => self.composed(name, true)?,
            "mode_fresh_mix" => self.fresh_mix(name, b.expert_layers_per_block, None)?,
            n => {
                if let Some(rank) = numbered(n, "lora_r") {
                    self.lora(n, rank, None)?
                } else if let Some(docs) = numbered(n, "lora_n") {
                    self.lora(n, b.lora_rank, Some(docs))?
                } else if let Some(layers) = numbered(n, "mode_fresh_mix_l") {
                    self.fresh_mix(n, layers, None)?
                } else if let Some(docs) = numbered(n, "mode_fresh_mix_n") {
                    self.fresh_mix(n, b.expert_layers_per_block, Some(docs))?
                } else {
                    return Err(Error::Step(format!("unknown method `{n}`")));
                }
            }
        };
        if name != "backbone" {
            result.train_seconds += t.elapsed().as_secs_f64();
        }
        self.evaluate(name, &model, &mut result)?;
        let json = serde_json::to_vec_pretty(&result).expect("result serialises");
        mode_io::atomic::write_file(&saved, &json).map_err(|e| Error::Io {
            path: saved.clone(),
            source: e,
        })?;
        Ok(result)
    }

    fn baseline(
        &mut self,
        name: &str,
        kind: BaselineKind,
        lr: f64,
        documents: Option<usize>,
    ) -> Result<(LoadedModel, MethodResult)> {
        self.reporter.stage(&format!("training {name}"));
        let out = self.path(&["models", name]);
        let cfg = self.opts.budget.train_config(self.opts.budget.steps, lr);
        let mix = self.mix(documents)?;
        let (backbone, source, fp) = self.training_inputs()?;
        let (manifest, report) =
            train_baseline(backbone, &source, &fp, &mix, kind, &cfg, &out, |e| {
                self.reporter.train(e)
            })?;
        let manifest = manifest.ok_or_else(|| Error::Step(format!("{name}: training stopped")))?;
        let (model, _) = mode_core::loaded::load_folder(&out, self.backbone()?)?;
        let result = MethodResult {
            trainable_parameters: manifest.trainable_parameters,
            added_parameters: if manifest.lora.is_some() {
                manifest.trainable_parameters
            } else {
                0
            },
            tokens: report.tokens,
            curves: BTreeMap::from([(name.to_string(), curve(&out))]),
            ..Default::default()
        };
        Ok((model, result))
    }

    fn lora(
        &mut self,
        name: &str,
        rank: usize,
        documents: Option<usize>,
    ) -> Result<(LoadedModel, MethodResult)> {
        let spec = LoraSpec {
            rank,
            alpha: self.opts.budget.lora_alpha * rank as f64 / self.opts.budget.lora_rank as f64,
            targets: LoraTargets::Attn,
        };
        self.baseline(
            name,
            BaselineKind::Lora(spec),
            self.opts.budget.adapter_lr,
            documents,
        )
    }

    /// Trains (once) the stage-1 expert of `domain`; returns its file and result so far.
    fn expert(&mut self, domain: &str) -> Result<(PathBuf, MethodResult)> {
        let out = self.path(&["experts", &format!("{domain}.expert.safetensors")]);
        let b = self.opts.budget.clone();
        let steps = b.expert_steps();
        if !out.exists() {
            self.reporter
                .stage(&format!("training the {domain} expert (stage 1)"));
            let data = match domain {
                "math" => self.single(&self.domains.math.clone())?,
                _ => self.single(&self.domains.code.clone())?,
            };
            let opts = self.stage1_options(domain, b.expert_layers_per_block, steps);
            let t = Instant::now();
            let (backbone, source, fp) = self.training_inputs()?;
            let (_, report) = train_expert(backbone, &source, &fp, &data, &opts, &out, |e| {
                self.reporter.train(e)
            })?;
            if report.steps < steps {
                return Err(Error::Step(format!("{domain} expert: training stopped")));
            }
            let seconds = t.elapsed().as_secs_f64();
            let side = self.path(&["experts", &format!("{domain}.seconds")]);
            let _ = std::fs::write(&side, seconds.to_string());
        }
        let file = ExpertFile::load(&out, &Device::Cpu)?;
        let params = file_parameters(&file);
        let seconds =
            std::fs::read_to_string(self.path(&["experts", &format!("{domain}.seconds")]))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0.0);
        let metrics = mode_train::stage1::side_paths(&out).1;
        Ok((
            out,
            MethodResult {
                trainable_parameters: params,
                added_parameters: params,
                tokens: file.meta.training.tokens,
                train_seconds: seconds,
                curves: BTreeMap::from([(format!("{domain} expert"), read_curve(&metrics))]),
                ..Default::default()
            },
        ))
    }

    fn expert_model(&mut self, domain: &str) -> Result<(LoadedModel, MethodResult)> {
        let (file, result) = self.expert(domain)?;
        let (model, _) = mode_core::loaded::load_with_expert(&file, self.backbone()?)?;
        Ok((model, result))
    }

    fn composed(&mut self, name: &str, freeze: bool) -> Result<(LoadedModel, MethodResult)> {
        let (math, rm) = self.expert("math")?;
        let (code, rc) = self.expert("code")?;
        self.reporter.stage(&format!("composing {name} (stage 2)"));
        let out = self.path(&["models", name]);
        let b = self.opts.budget.clone();
        let opts = ComposeOptions {
            freeze_experts: freeze,
            gate_init: GateInit::Stage1,
            gate_init_backbone_prob: mode_core::expert::GATE_INIT_BACKBONE_PROB,
            train: b.train_config(b.compose_steps, b.adapter_lr),
        };
        let experts = vec![
            LoadedExpertFile::load(&math, &Device::Cpu)?,
            LoadedExpertFile::load(&code, &Device::Cpu)?,
        ];
        let mix = self.mix(None)?;
        let (backbone, source, fp) = self.training_inputs()?;
        let (manifest, report) =
            compose(backbone, &source, &fp, experts, &mix, &opts, &out, |e| {
                self.reporter.train(e)
            })?;
        manifest.ok_or_else(|| Error::Step(format!("{name}: training stopped")))?;
        let (model, _) = mode_core::loaded::load_folder(&out, self.backbone()?)?;
        let gates = match &model {
            LoadedModel::Mode(m) => m
                .trainable_tensors(false, true)
                .iter()
                .map(|(_, t)| t.elem_count())
                .sum(),
            LoadedModel::Backbone(_) => 0,
        };
        let mut curves = rm.curves;
        curves.extend(rc.curves);
        curves.insert(format!("{name} stage 2"), curve(&out));
        let experts_params = rm.added_parameters + rc.added_parameters;
        Ok((
            model,
            MethodResult {
                trainable_parameters: experts_params + gates,
                added_parameters: experts_params + gates,
                tokens: rm.tokens + rc.tokens + report.tokens,
                train_seconds: rm.train_seconds + rc.train_seconds,
                curves,
                ..Default::default()
            },
        ))
    }

    /// One fresh expert of `layers` per block trained on the mix (of `documents` per domain).
    fn fresh_mix(
        &mut self,
        name: &str,
        layers: usize,
        documents: Option<usize>,
    ) -> Result<(LoadedModel, MethodResult)> {
        self.reporter
            .stage(&format!("training {name}: one fresh expert on the mix"));
        // The table's own run keeps the file name earlier demos wrote.
        let file = if name == "mode_fresh_mix" {
            "mix"
        } else {
            name
        };
        let out = self.path(&["experts", &format!("{file}.expert.safetensors")]);
        let b = self.opts.budget.clone();
        let opts = self.stage1_options("mix", layers, b.steps);
        let mix = self.mix(documents)?;
        let (backbone, source, fp) = self.training_inputs()?;
        let (_, report) = train_expert(backbone, &source, &fp, &mix, &opts, &out, |e| {
            self.reporter.train(e)
        })?;
        if report.steps < b.steps {
            return Err(Error::Step(format!("{name}: training stopped")));
        }
        let (model, _) = mode_core::loaded::load_with_expert(&out, self.backbone()?)?;
        let params = file_parameters(&ExpertFile::load(&out, &Device::Cpu)?);
        Ok((
            model,
            MethodResult {
                trainable_parameters: params,
                added_parameters: params,
                tokens: report.tokens,
                curves: BTreeMap::from([(
                    name.to_string(),
                    read_curve(&mode_train::stage1::side_paths(&out).1),
                )]),
                ..Default::default()
            },
        ))
    }

    fn evaluate(
        &mut self,
        name: &str,
        model: &LoadedModel,
        result: &mut MethodResult,
    ) -> Result<()> {
        self.reporter.stage(&format!("evaluating {name}"));
        let t = Instant::now();
        let b = &self.opts.budget;
        model.take_gate_stats();
        for (domain, path) in self.domains.eval_sets() {
            let r = mode_eval::evaluate_file(
                model.lm(),
                &self.tokenizer,
                path,
                b.eval_seq_len,
                4,
                Some(b.eval_windows),
                |_, _| {},
            )?;
            let acc = 100.0 * r.next_token_accuracy;
            match domain {
                "math" => result.math = acc,
                "code" => result.code = acc,
                _ => result.english = acc,
            }
            result.loss.insert(domain.to_string(), r.loss);
            if let Some(g) = model.take_gate_stats() {
                result.gate_weights.insert(domain.to_string(), g);
            }
        }
        if let LoadedModel::Mode(m) = model {
            result.branches = std::iter::once("backbone".to_string())
                .chain(m.experts.iter().map(|e| e.name.clone()))
                .collect();
        }
        result.average = (result.math + result.code + result.english) / 3.0;
        result.eval_seconds = t.elapsed().as_secs_f64();
        Ok(())
    }
}

/// Parameters an expert file adds: its layers and stage-1 gates.
fn file_parameters(file: &ExpertFile) -> usize {
    file.tensors.values().map(|t| t.elem_count()).sum()
}

/// The training curve of a model folder's run (`NAME.metrics.jsonl` beside it).
fn curve(out: &Path) -> Vec<(usize, f64)> {
    read_curve(&mode_train::stage1::side_paths(out).1)
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
