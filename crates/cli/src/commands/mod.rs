pub mod bench;
pub mod data;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod train;

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
    #[arg(long, default_value = mode_io::fetch::DEFAULT_BACKBONE)]
    pub backbone: String,
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
        let path = mode_io::fetch::resolve_backbone(&self.backbone)?;
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
    pub fn load(&self) -> Result<(LoadedModel, Tokenizer)> {
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
