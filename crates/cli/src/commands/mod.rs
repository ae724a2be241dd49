pub mod baseline;
pub mod bench;
pub mod compose;
pub mod data;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod train;
pub mod training;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use mode_io::Tokenizer;
use mode_model::Backbone;

/// Which backbone to load and how to store its weights.
#[derive(clap::Args, Debug, Clone)]
pub struct BackboneArgs {
    /// `smollm2-135m` (fetched on first use), or a path to a .gguf file or Hugging Face folder
    /// [default: smollm2-135m, or the one a --model was composed over]
    #[arg(long)]
    pub backbone: Option<String>,
    /// In-memory dtype of the frozen weights: f32, f16 or bf16 (activations stay f32)
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    pub weight_dtype: DType,
}

fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(format!("`{other}` is not one of f32, f16, bf16")),
    }
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
        let (model, tokenizer) = Backbone::open(&path, self.weight_dtype, &Device::Cpu)
            .with_context(|| format!("loading backbone {}", path.display()))?;
        eprintln!(
            "mode: loaded {} ({:?}, {} layers, {:.1}M parameters) in {:.2}s",
            path.display(),
            model.config.architecture,
            model.config.num_hidden_layers,
            model.config.num_parameters() as f64 / 1e6,
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
    /// A composed model folder (from `mode compose`): its experts and gates
    #[arg(long, conflicts_with = "expert")]
    pub model: Option<PathBuf>,
    /// An expert file to run beside the backbone, with its stage-1 gates
    #[arg(long)]
    pub expert: Vec<PathBuf>,
}

/// A loaded model: the plain backbone, or a MoDE model.
pub enum LoadedModel {
    Backbone(Box<Backbone>),
    Mode(Box<mode_core::ModeModel>),
}

impl LoadedModel {
    pub fn lm(&self) -> &dyn mode_model::CausalLm {
        match self {
            LoadedModel::Backbone(b) => b.as_ref(),
            LoadedModel::Mode(m) => m.as_ref(),
        }
    }

    /// Mean gate weights since the last call (MoDE models only).
    pub fn take_gate_stats(&self) -> Option<Vec<Vec<f64>>> {
        match self {
            LoadedModel::Backbone(_) => None,
            LoadedModel::Mode(m) => Some(m.take_gate_stats().0),
        }
    }
}

impl ModelArgs {
    fn load_baseline(&self, dir: &std::path::Path) -> Result<(LoadedModel, Tokenizer)> {
        let manifest = mode_core::baseline::read_manifest(dir)?;
        let (backbone, tokenizer, path) = self.backbone.load_or(&manifest.backbone_source)?;
        let (backbone, manifest) = mode_core::baseline::load_baseline(dir, backbone)
            .with_context(|| format!("loading {} over {}", dir.display(), path.display()))?;
        eprintln!(
            "mode: {} baseline {} ({:.2}M trained parameters)",
            manifest.kind,
            dir.display(),
            manifest.trainable_parameters as f64 / 1e6
        );
        Ok((LoadedModel::Backbone(Box::new(backbone)), tokenizer))
    }

    pub fn load(&self) -> Result<(LoadedModel, Tokenizer)> {
        if let Some(dir) = &self.model {
            if mode_core::composed::model_kind(dir)? != "mode" {
                return self.load_baseline(dir);
            }
            let manifest = mode_core::composed::read_manifest(dir)?;
            let (backbone, tokenizer, path) = self.backbone.load_or(&manifest.backbone_source)?;
            let (model, manifest) = mode_core::load_composed(dir, backbone)
                .with_context(|| format!("loading {} over {}", dir.display(), path.display()))?;
            eprintln!(
                "mode: composed model {} ({} blocks x {} layers; experts: {})",
                dir.display(),
                manifest.layout.num_blocks(),
                manifest.layout.expert_layers_per_block,
                manifest
                    .experts
                    .iter()
                    .map(|e| e.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            return Ok((LoadedModel::Mode(Box::new(model)), tokenizer));
        }
        let (backbone, tokenizer, path) = self.backbone.load()?;
        match self.expert.as_slice() {
            [] => Ok((LoadedModel::Backbone(Box::new(backbone)), tokenizer)),
            [file] => {
                let expert_file = mode_core::ExpertFile::load(file, &Device::Cpu)?;
                let fingerprint = backbone.fingerprint()?;
                let dims = mode_core::file::ExpertDims::of(&backbone.config);
                expert_file
                    .check_compatible(file, &fingerprint, &dims, None)
                    .with_context(|| format!("loading expert into backbone {}", path.display()))?;
                let expert = expert_file.expert(&backbone, file)?;
                let gates = expert_file.gates(file)?;
                let layout = expert_file.meta.layout.clone();
                eprintln!(
                    "mode: expert `{}` ({} blocks x {} layers, {:.2}M parameters)",
                    expert.name,
                    layout.num_blocks(),
                    layout.expert_layers_per_block,
                    expert.num_parameters() as f64 / 1e6
                );
                let model = mode_core::ModeModel::new(backbone, layout, vec![expert], gates)?;
                Ok((LoadedModel::Mode(Box::new(model)), tokenizer))
            }
            _ => anyhow::bail!(
                "several --expert files need gates trained together: compose them first \
                 (mode compose), then use --model"
            ),
        }
    }
}
