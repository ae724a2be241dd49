pub mod bench;
pub mod data;
pub mod eval;
pub mod generate;

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
