//! The baselines MoDE is compared with, through the same loop: full fine-tuning and LoRA.

use std::path::Path;

use mode_core::baseline::{
    load_baseline, save_baseline, BaselineManifest, LoraSpec, BASELINE_FORMAT_VERSION,
};
use mode_data::DataMix;
use mode_engine::model::Trainable;
use mode_model::Backbone;

use crate::methods::BackboneTraining;
use crate::stage1::{check_tokenizer, side_paths};
use crate::trainer::{train, Error, Event, Method, TrainConfig, TrainReport};

/// Which baseline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BaselineKind {
    /// Every backbone parameter trains.
    Full,
    /// Low-rank adapters on the chosen projections; the backbone stays frozen.
    Lora(LoraSpec),
}

/// Fine-tunes `backbone` as `kind` on `data` and writes the folder `out` (a checkpoint folder
/// and a metrics file live next to it; an existing checkpoint is resumed). With `start`, the
/// training continues a baseline folder of the same kind over the same backbone (sequential
/// fine-tuning, one domain after another) instead of starting from the backbone. Returns the
/// manifest once the run is complete.
#[allow(clippy::too_many_arguments)]
pub fn train_baseline(
    backbone: Backbone,
    backbone_source: &str,
    tokenizer_fingerprint: &str,
    data: &DataMix,
    kind: BaselineKind,
    cfg: &TrainConfig,
    out: &Path,
    start: Option<&Path>,
    on_event: impl FnMut(Event) -> bool,
) -> Result<(Option<BaselineManifest>, TrainReport), Error> {
    check_tokenizer(data, tokenizer_fingerprint, backbone_source)?;
    // Before training (full fine-tuning changes the weights in place) and before loading a
    // start: the folder belongs to the backbone it was first fine-tuned from.
    let fingerprint = backbone.fingerprint()?;
    let layers = backbone.layers.len();
    if let BaselineKind::Lora(spec) = kind {
        if spec.rank == 0 {
            return Err(Error::Data("LoRA needs --rank >= 1".into()));
        }
    }
    let backbone = match start {
        Some(dir) => continued(backbone, dir, kind)?,
        None => {
            let mut backbone = backbone;
            if let BaselineKind::Lora(spec) = kind {
                backbone.attach_lora(
                    spec.rank,
                    spec.alpha,
                    spec.targets.projections(),
                    cfg.seed,
                )?;
            }
            backbone
        }
    };
    let trainable = match kind {
        BaselineKind::Full => Trainable::all(layers),
        BaselineKind::Lora(_) => Trainable::lora(layers),
    };
    let (ckpt, metrics) = side_paths(out);
    let method = BackboneTraining {
        backbone: &backbone,
        trainable,
    };
    let trainable_parameters = method.params().iter().map(|(_, t)| t.elem_count()).sum();
    let report = train(&method, data, cfg, &ckpt, &metrics, on_event)?;
    if report.steps < cfg.steps {
        return Ok((None, report));
    }
    let manifest = BaselineManifest {
        format_version: BASELINE_FORMAT_VERSION,
        kind: match kind {
            BaselineKind::Full => "full".into(),
            BaselineKind::Lora(_) => "lora".into(),
        },
        lora: match kind {
            BaselineKind::Full => None,
            BaselineKind::Lora(spec) => Some(spec),
        },
        backbone_source: backbone_source.to_string(),
        backbone_fingerprint: fingerprint,
        trainable_parameters,
        training: report.summary(
            data,
            cfg.seed,
            match start {
                Some(dir) => format!("continued from {}", dir.display()),
                None => "backbone".into(),
            },
        ),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    save_baseline(out, &manifest, &backbone)?;
    let _ = mode_io::atomic::remove_dir(&ckpt);
    Ok((Some(manifest), report))
}

/// `backbone` with the baseline folder `dir` loaded onto it, which must be of `kind` (for LoRA,
/// the same shape).
fn continued(backbone: Backbone, dir: &Path, kind: BaselineKind) -> Result<Backbone, Error> {
    let (backbone, manifest) = load_baseline(dir, backbone)?;
    let wanted = match kind {
        BaselineKind::Full => None,
        BaselineKind::Lora(spec) => Some(spec),
    };
    if manifest.lora != wanted {
        let what = |l: Option<LoraSpec>| match l {
            None => "full fine-tuning".to_string(),
            Some(s) => format!("LoRA rank {} alpha {} on {:?}", s.rank, s.alpha, s.targets),
        };
        return Err(Error::Data(format!(
            "{}: holds {}, and this run trains {}; continue a folder of the same kind",
            dir.display(),
            what(manifest.lora),
            what(wanted)
        )));
    }
    Ok(backbone)
}
