pub mod baseline;
pub mod bench;
pub mod compose;
pub mod data;
pub mod demo;
pub mod eval;
pub mod gates;
pub mod generate;
pub mod inspect;
pub mod serve;
pub mod train;
pub mod training;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use mode_io::Tokenizer;
use mode_model::{Backbone, WeightDtype};

/// The most tokens a token-count flag accepts (`--max-new-tokens`, `--seq-len` of eval,
/// bench lengths): a million, far beyond any context we run, far below sizes that overflow.
pub const MAX_TOKENS: usize = 1 << 20;

/// Refuses a numeric flag outside `min..=max`, naming it: values beyond what makes sense would
/// otherwise overflow a size, allocate without end or run for days.
pub fn check_range<T: PartialOrd + std::fmt::Display>(
    flag: &str,
    value: T,
    min: T,
    max: T,
) -> Result<()> {
    if !(value >= min && value <= max) {
        anyhow::bail!("{flag} must be between {min} and {max}, got {value}");
    }
    Ok(())
}

/// Refuses an input that does not exist, or that is not a regular file or folder (a named pipe
/// would block the read forever), naming it.
pub fn check_input(path: &std::path::Path) -> Result<()> {
    if !path.exists() {
        anyhow::bail!("{}: no such file or folder", path.display());
    }
    mode_io::input::check(path).with_context(|| path.display().to_string())
}

/// Which backbone to load and how to store its weights.
#[derive(clap::Args, Debug, Clone)]
pub struct BackboneArgs {
    /// `smollm2-135m` or `gemma3-270m` (fetched on first use), or a path to a .gguf file or Hugging Face folder
    /// [default: smollm2-135m, or the one a --model was composed over]
    #[arg(long)]
    pub backbone: Option<String>,
    /// How the frozen backbone's weights are held in memory: f32, f16, bf16, q8_0 or q4_1.
    /// q8_0 and q4_1 are GGUF's block formats: the projections are quantised at load (q4_1 over
    /// a Q4_1 file, such as the default backbone, gives back the file's own blocks) and
    /// multiplied with integer dot products, their inputs rounded to 8 bits as llama.cpp does;
    /// the LM head is Q8_0 and the embeddings f16 with either; generation, eval, serve and bench
    /// only. Experts, gates and the activations between layers stay f32; fewer bytes make
    /// decoding faster, at a small cost in accuracy
    #[arg(long, default_value = "f32")]
    pub weight_dtype: WeightDtype,
    /// Go ahead even when the estimated peak memory (of loading, or of training) exceeds what
    /// the machine has available
    #[arg(long)]
    pub no_memory_check: bool,
}

/// Sets how many rounds candle's idle workers spin before they sleep
/// (`CANDLE_BARRIER_POOL_SPIN_LIMIT`, unless the user set it). candle's pool runs its elementwise
/// ops and, with quantised (q8_0, q4_1) weights, every matmul; rayon's runs the gemms of
/// f32/f16/bf16 weights and the training kernels. Beside rayon, a short spin leaves the cores to
/// the next gemm (training steps 10-18% faster on 2 cores, `mode bench train`). With quantised
/// weights the matmuls are candle's own, and a long spin keeps its workers awake across the gaps
/// between a decode step's matmuls: waking a sleeping worker took longer than a matmul (decode
/// about 30% faster on 2 cores, `mode bench infer --weight-dtype q8_0`). Takes effect when
/// candle's pool starts: call it at start-up and before loading weights.
pub fn set_worker_spin(weights: WeightDtype) {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    static FROM_USER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *FROM_USER.get_or_init(|| std::env::var_os(VAR).is_some()) {
        return;
    }
    let rounds = match weights {
        WeightDtype::Q8_0 | WeightDtype::Q4_1 => 2_000_000,
        WeightDtype::F32 | WeightDtype::F16 | WeightDtype::BF16 => 200,
    };
    std::env::set_var(VAR, rounds.to_string());
}

impl BackboneArgs {
    /// Resolves (and if needed fetches) the backbone, then loads it with its tokenizer.
    pub fn load(&self) -> Result<(Backbone, Tokenizer, PathBuf)> {
        self.load_or(mode_io::fetch::DEFAULT_BACKBONE)
    }

    /// Like [`Self::load`], with `default` when no --backbone was given.
    pub fn load_or(&self, default: &str) -> Result<(Backbone, Tokenizer, PathBuf)> {
        let spec = self.backbone.as_deref().unwrap_or(default);
        let path = mode_io::fetch::resolve_backbone(spec)?;
        let start = Instant::now();
        let open = if self.no_memory_check {
            Backbone::open_unchecked
        } else {
            Backbone::open
        };
        set_worker_spin(self.weight_dtype);
        let (mut model, tokenizer) = open(&path, self.weight_dtype.load_dtype(), &Device::Cpu)
            .context("loading the backbone")?;
        if let Some(format) = self.weight_dtype.block_format() {
            model
                .quantize(format)
                .with_context(|| format!("quantising the backbone to {}", format.name()))?;
            // The f32 weights just freed stay in the allocator's free lists, so a q8_0 process
            // would hold more memory than an f32 one; give them back to the system.
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only releases free memory; no pointer is invalidated.
            unsafe {
                libc::malloc_trim(0);
            }
        }
        eprintln!(
            "mode: loaded {} ({:?}, {} layers, {:.1}M parameters, {}) in {:.2}s",
            path.display(),
            model.config.architecture,
            model.config.num_hidden_layers,
            model.config.num_parameters() as f64 / 1e6,
            self.weight_dtype,
            start.elapsed().as_secs_f64()
        );
        Ok((model, tokenizer, path))
    }
}

/// A backbone, optionally with experts: what `eval` and `generate` run.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    #[command(flatten)]
    pub backbone: BackboneArgs,
    /// A model folder: from `mode compose` (its experts and gates) or `mode baseline`
    #[arg(long, conflicts_with = "expert")]
    pub model: Option<PathBuf>,
    /// An expert file to run beside the backbone, with its stage-1 gates; repeat it to run
    /// several experts never composed together (each keeps its stage-1 odds against the
    /// backbone; `mode compose` tunes gates for them jointly and usually does better)
    #[arg(long)]
    pub expert: Vec<PathBuf>,
}

/// Which experts run at inference, and how sparsely.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RoutingArgs {
    /// Run only these experts, by name (comma-separated) [default: all]
    #[arg(long, value_delimiter = ',')]
    pub active_experts: Option<Vec<String>>,
    /// Per token, run only the K experts with the highest gate weight (the backbone always runs)
    #[arg(long, value_name = "K")]
    pub gate_top_k: Option<usize>,
    /// Per token, skip experts whose gate weight is below P, in [0, 1)
    #[arg(long, value_name = "P")]
    pub gate_threshold: Option<f64>,
}

impl RoutingArgs {
    /// The routing these flags ask of `model`; names are checked against its experts.
    pub fn routing(&self, model: &LoadedModel) -> Result<mode_core::Routing> {
        let experts = match (&self.active_experts, model) {
            (None, _) => None,
            (Some(names), LoadedModel::Mode(m)) => Some(m.expert_indices(names)?),
            (Some(names), LoadedModel::Backbone(_)) if names.is_empty() => Some(Vec::new()),
            (Some(_), LoadedModel::Backbone(_)) => {
                anyhow::bail!("--active-experts: the model is the backbone alone, with no experts")
            }
        };
        let routing = mode_core::Routing {
            experts,
            top_k: self.gate_top_k,
            threshold: self.gate_threshold,
        };
        routing.check(model.expert_names().len())?;
        Ok(routing)
    }
}

pub use mode_core::LoadedModel;

impl ModelArgs {
    /// Loads what the flags name: a model folder, the backbone with one expert, or the backbone.
    pub fn load(&self) -> Result<(LoadedModel, Tokenizer)> {
        let (model, tokenizer, what) = if let Some(dir) = &self.model {
            let source = mode_core::loaded::folder_backbone_source(dir)?;
            let (backbone, tokenizer, path) = self.backbone.load_or(&source)?;
            let (model, what) = mode_core::loaded::load_folder(dir, backbone)
                .with_context(|| format!("loading {} over {}", dir.display(), path.display()))?;
            (model, tokenizer, Some(what))
        } else {
            let (backbone, tokenizer, path) = self.backbone.load()?;
            match self.expert.as_slice() {
                [] => (LoadedModel::Backbone(Box::new(backbone)), tokenizer, None),
                [file] => {
                    let (model, what) = mode_core::loaded::load_with_expert(file, backbone)
                        .with_context(|| {
                            format!("loading expert into backbone {}", path.display())
                        })?;
                    (model, tokenizer, Some(what))
                }
                files => {
                    let fingerprint = backbone.fingerprint()?;
                    let mut model = mode_core::ModeModel::bare(backbone)?;
                    for file in files {
                        let expert = mode_core::ExpertFile::load(file, &Device::Cpu)?;
                        model
                            .add_expert_file(&expert, file, &fingerprint, None)
                            .with_context(|| {
                                format!("adding expert {} to {}", file.display(), path.display())
                            })?;
                    }
                    let what = format!(
                        "{} experts never composed together: {}",
                        files.len(),
                        model.expert_names().join(", ")
                    );
                    (LoadedModel::Mode(Box::new(model)), tokenizer, Some(what))
                }
            }
        };
        if let Some(what) = what {
            // Names from the files' headers: escaped.
            eprintln!("mode: {}", mode_io::term::printable(&what));
        }
        Ok((model, tokenizer))
    }
}
