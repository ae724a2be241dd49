//! What the MoDE tests share: a tiny random backbone, a token sequence, a tensor distance and
//! expert-file metadata.

use candle_core::{DType, Device, Tensor};
use mode_core::file::{ExpertDims, TrainingSummary};
use mode_core::{BlockLayout, ExpertMeta};
use mode_model::{Architecture, Backbone, Config};

/// A 4-layer tiny Llama with random weights from `seed`.
pub fn backbone(seed: u64) -> Backbone {
    let mut config = Config::tiny(Architecture::Llama);
    config.num_hidden_layers = 4;
    Backbone::random(config.clone(), seed, DType::F32, &Device::Cpu).unwrap()
}

pub fn ids() -> Tensor {
    Tensor::new(&[[3u32, 14, 15, 92, 65, 35, 89, 79]], &Device::Cpu).unwrap()
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The header of an expert file for `domain` trained over `bb` with `layout`.
pub fn meta(bb: &Backbone, layout: &BlockLayout, domain: &str) -> ExpertMeta {
    ExpertMeta {
        format_version: mode_core::file::FORMAT_VERSION,
        domain: domain.into(),
        backbone_fingerprint: bb.fingerprint().unwrap(),
        backbone_source: "test".into(),
        layout: layout.clone(),
        dims: ExpertDims::of(&bb.config),
        training: TrainingSummary::default(),
        tool_version: "test".into(),
        form: mode_core::ExpertForm::Replace,
    }
}
