use std::path::PathBuf;

use anyhow::Result;
use mode_core::ExpertFile;

/// Print what an expert file holds: header and tensors.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// An expert file (*.expert.safetensors)
    file: PathBuf,
    /// Print the header as JSON only
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let file = ExpertFile::load(&args.file, &candle_core::Device::Cpu)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&file.meta)?);
        return Ok(());
    }
    let m = &file.meta;
    println!("{}", args.file.display());
    println!("  domain            {}", m.domain);
    println!(
        "  backbone          {} (fingerprint {})",
        m.backbone_source, m.backbone_fingerprint
    );
    println!(
        "  layout            blocks {:?}, {} expert layers per block",
        m.layout.boundaries, m.layout.expert_layers_per_block
    );
    println!(
        "  dims              {} hidden {}, mlp {}, heads {}/{} x {}",
        m.dims.architecture,
        m.dims.hidden_size,
        m.dims.intermediate_size,
        m.dims.num_attention_heads,
        m.dims.num_key_value_heads,
        m.dims.head_dim
    );
    let t = &m.training;
    println!(
        "  training          {} steps, {} tokens, init {}, seed {}",
        t.steps, t.tokens, t.init, t.seed
    );
    println!(
        "  final losses      train {:.4}, validation {:.4} (accuracy {:.2}%)",
        t.final_train_loss.unwrap_or(f64::NAN),
        t.final_val_loss.unwrap_or(f64::NAN),
        100.0 * t.final_val_accuracy.unwrap_or(f64::NAN)
    );
    if let Some(d) = &t.data_fingerprint {
        println!("  data fingerprint  {d}");
    }
    let params: usize = file.tensors.values().map(|t| t.elem_count()).sum();
    println!(
        "  tensors           {} ({:.2}M parameters)",
        file.tensors.len(),
        params as f64 / 1e6
    );
    println!(
        "  format            v{}, written by mode {}",
        m.format_version, m.tool_version
    );
    Ok(())
}
