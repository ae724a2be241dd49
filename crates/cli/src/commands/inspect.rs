use std::path::PathBuf;

use anyhow::Result;
use mode_core::ExpertFile;
// Everything from the file's header may hold escape sequences: printed escaped.
use mode_io::term::printable as safe;

use super::training::validation;

/// Print what an expert file or a model folder (from `mode compose` or `mode baseline`) holds.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// An expert file (*.expert.safetensors) or a folder written by `mode compose` or
    /// `mode baseline`
    file: PathBuf,
    /// Print the header as JSON only
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    if args.file.is_dir() {
        return match mode_core::composed::model_kind(&args.file)?.as_str() {
            "mode" => composed(&args),
            _ => baseline(&args),
        };
    }
    let file = ExpertFile::load(&args.file, &candle_core::Device::Cpu)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&file.meta)?);
        return Ok(());
    }
    let m = &file.meta;
    println!("{}", safe(&args.file.display().to_string()));
    println!("  domain            {}", safe(&m.domain));
    print_backbone(&m.backbone_source, &m.backbone_fingerprint);
    print_layout(&m.layout);
    println!(
        "  dims              {} hidden {}, mlp {}, heads {}/{} x {}",
        safe(&m.dims.architecture),
        m.dims.hidden_size,
        m.dims.intermediate_size,
        m.dims.num_attention_heads,
        m.dims.num_key_value_heads,
        m.dims.head_dim
    );
    print_training(&m.training);
    let params: usize = file.tensors.values().map(|t| t.elem_count()).sum();
    println!(
        "  tensors           {} ({:.2}M parameters)",
        file.tensors.len(),
        params as f64 / 1e6
    );
    println!(
        "  format            v{}, written by mode {}",
        m.format_version,
        safe(&m.tool_version)
    );
    Ok(())
}

fn composed(args: &Args) -> Result<()> {
    let m = mode_core::composed::read_manifest(&args.file)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(());
    }
    println!(
        "{} (composed model)",
        safe(&args.file.display().to_string())
    );
    print_backbone(&m.backbone_source, &m.backbone_fingerprint);
    print_layout(&m.layout);
    for e in &m.experts {
        println!(
            "  expert            {} ({}, {}; from {})",
            safe(&e.name),
            safe(&e.file),
            if e.tuned {
                "tuned in stage 2"
            } else {
                "frozen"
            },
            safe(&e.source)
        );
    }
    let t = &m.training;
    println!(
        "  stage 2           {} steps, {} tokens, gates {}, seed {}, {}",
        t.steps,
        t.tokens,
        safe(&m.gate_init),
        t.seed,
        validation(t.final_val_loss, t.final_val_accuracy)
    );
    Ok(())
}

fn baseline(args: &Args) -> Result<()> {
    let m = mode_core::baseline::read_manifest(&args.file)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(());
    }
    let what = match &m.lora {
        Some(l) => format!(
            "LoRA baseline: rank {}, alpha {}, {:?} projections",
            l.rank, l.alpha, l.targets
        ),
        None => format!("{} baseline", safe(&m.kind)),
    };
    println!("{} ({what})", safe(&args.file.display().to_string()));
    print_backbone(&m.backbone_source, &m.backbone_fingerprint);
    println!(
        "  trainable         {:.2}M parameters",
        m.trainable_parameters as f64 / 1e6
    );
    print_training(&m.training);
    println!(
        "  format            v{}, written by mode {}",
        m.format_version,
        safe(&m.tool_version)
    );
    Ok(())
}

fn print_backbone(source: &str, fingerprint: &str) {
    println!(
        "  backbone          {} (fingerprint {})",
        safe(source),
        safe(fingerprint)
    );
}

fn print_layout(layout: &mode_core::BlockLayout) {
    println!(
        "  layout            blocks {:?}, {} expert layers per block",
        layout.boundaries, layout.expert_layers_per_block
    );
}

fn print_training(t: &mode_core::file::TrainingSummary) {
    println!(
        "  training          {} steps, {} tokens, init {}, seed {}",
        t.steps,
        t.tokens,
        safe(&t.init),
        t.seed
    );
    println!(
        "  final losses      train {:.4}, {}",
        t.final_train_loss.unwrap_or(f64::NAN),
        validation(t.final_val_loss, t.final_val_accuracy)
    );
    if let Some(d) = &t.data_fingerprint {
        println!("  data fingerprint  {}", safe(d));
    }
}
