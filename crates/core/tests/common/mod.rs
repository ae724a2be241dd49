//! What the MoDE tests share: a tiny random backbone, a token sequence, a tensor distance and
//! expert-file metadata, gates.
#![allow(dead_code)] // each test file uses its own part of this

use candle_core::{DType, Device, Tensor};
use mode_core::file::{ExpertDims, TrainingSummary};
use mode_core::{BlockLayout, ExpertMeta, Gate, GateInput};
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
        gate_input: GateInput::Raw,
    }
}

/// Gates with pseudo-random weights and biases from `seed`: every token mixes the branches
/// differently.
pub fn random_gates(hidden: usize, experts: usize, seed: u64) -> Vec<Gate> {
    let values = |n: usize, salt: f32, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.731 + salt).sin() * 43758.547).fract() * scale)
            .collect()
    };
    (0..2)
        .map(|b| {
            let salt = (seed * 10 + b) as f32;
            let n = experts + 1;
            Gate {
                weight: Tensor::from_vec(values(n * hidden, salt, 1.0), (n, hidden), &Device::Cpu)
                    .unwrap(),
                bias: Tensor::from_vec(values(n, salt + 0.5, 2.0), n, &Device::Cpu).unwrap(),
                input: GateInput::Raw,
            }
        })
        .collect()
}
