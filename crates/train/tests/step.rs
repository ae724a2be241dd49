//! A training step on a tiny backbone with a trainable branch: frozen parameters never change
//! and hold no optimizer state; trainable ones change and the loss goes down.

use candle_core::{DType, Device, Tensor};
use mode_engine::model::{Batch, Block, Mix, Plan, Trainable};
use mode_model::{Architecture, Backbone, Config, DecoderLayer};
use mode_train::{train_step, AdamW, AdamWConfig, StepSettings};

/// A 3-layer tiny Llama with random weights.
fn tiny_model(seed: u64, dtype: DType) -> Backbone {
    let mut config = Config::tiny(Architecture::Llama);
    config.num_hidden_layers = 3;
    Backbone::random(config.clone(), seed, dtype, &Device::Cpu).unwrap()
}

/// A trainable copy of layer 1, as a one-layer branch beside it.
fn branch(model: &Backbone) -> Vec<DecoderLayer> {
    model.layers[1..2]
        .iter()
        .map(|l| l.deep_copy().unwrap())
        .collect()
}

/// The branch's parameters under the names the engine gives their gradients.
fn branch_params(expert: &[DecoderLayer]) -> Vec<(String, &Tensor)> {
    expert[0]
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (mode_engine::names::expert_tensor(0, 0, 0, &n), t))
        .collect()
}

/// The frozen backbone with the branch beside layer 1, mixed half and half.
fn branch_plan(expert: &[DecoderLayer], recompute_activations: bool) -> Plan<'_> {
    Plan {
        backbone: Trainable::none(3),
        blocks: vec![Block {
            layers: 1..2,
            experts: vec![expert],
            residual: vec![false],
            mix: Mix::Fixed(vec![0.5, 0.5]),
            train_experts: vec![true],
            train_gate: false,
        }],
        recompute_activations,
    }
}

fn settings(micro_batch_rows: usize) -> StepSettings {
    StepSettings {
        lr: 1e-2,
        max_grad_norm: 1.0,
        micro_batch_rows,
    }
}

#[test]
fn frozen_parameters_never_move_and_hold_no_state() {
    let model = tiny_model(51, DType::F32);
    let expert = branch(&model);
    let frozen_before: Vec<(String, Tensor)> = model
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.copy().unwrap()))
        .collect();
    let params = branch_params(&expert);
    let expert_before: Vec<Tensor> = params.iter().map(|(_, t)| t.copy().unwrap()).collect();
    let plan = branch_plan(&expert, false);
    let ids = Tensor::new(
        &[[1u32, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]],
        &Device::Cpu,
    )
    .unwrap();
    let batch = Batch::next_token(ids).unwrap();
    assert_eq!(batch.targets.len(), 16);
    let mut opt = AdamW::new(AdamWConfig::default());
    let mut losses = Vec::new();
    for _ in 0..5 {
        losses.push(
            train_step(
                &model,
                &plan,
                &params,
                &mut opt,
                &batch,
                settings(0),
                &|_| 1.0,
            )
            .unwrap()
            .loss,
        );
    }
    assert!(losses[4] < losses[0], "loss did not go down: {losses:?}");
    let max_diff = |a: &Tensor, b: &Tensor| -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    for ((name, before), (_, now)) in frozen_before.iter().zip(model.named_tensors()) {
        assert_eq!(max_diff(before, now), 0.0, "frozen {name} changed");
    }
    for ((name, now), before) in params.iter().zip(&expert_before) {
        assert!(
            max_diff(before, now) > 0.0,
            "trainable {name} did not change"
        );
    }
    let mut state: Vec<&String> = opt.state.keys().collect();
    state.sort();
    let mut names: Vec<&String> = params.iter().map(|(n, _)| n).collect();
    names.sort();
    assert_eq!(
        state, names,
        "optimizer state must exist for trainable parameters only"
    );
}

#[test]
fn accumulated_micro_batches_make_the_same_step_as_the_whole_batch() {
    // f64, so that AdamW's sign-like first steps do not magnify rounding.
    let model = tiny_model(52, DType::F64);
    let ids = Tensor::new(
        &[
            [1u32, 2, 3, 4, 5, 6, 7, 8],
            [8, 7, 6, 5, 4, 3, 2, 1],
            [9, 9, 4, 4, 2, 2, 7, 7],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let mut batch = Batch::next_token(ids).unwrap();
    // Rows with different numbers of counted tokens: a plain mean of the passes' means would
    // weigh them wrongly.
    for t in &mut batch.targets[8..13] {
        *t = mode_engine::ops::IGNORE;
    }
    let run = |micro: usize, recompute: bool| -> Vec<Vec<f64>> {
        let expert = branch(&model);
        let params = branch_params(&expert);
        let plan = branch_plan(&expert, recompute);
        let mut opt = AdamW::new(AdamWConfig::default());
        for _ in 0..3 {
            train_step(
                &model,
                &plan,
                &params,
                &mut opt,
                &batch,
                settings(micro),
                &|_| 1.0,
            )
            .unwrap();
        }
        params
            .iter()
            .map(|(_, t)| t.flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    let whole = run(0, false);
    for (micro, recompute) in [(1, false), (2, false), (1, true)] {
        let other = run(micro, recompute);
        let worst = whole
            .iter()
            .flatten()
            .zip(other.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        assert!(worst < 1e-9, "micro {micro} recompute {recompute}: {worst}");
    }
}

#[test]
fn a_misnamed_trainable_parameter_is_caught() {
    let model = tiny_model(52, DType::F32);
    let expert = branch(&model);
    // The spelling of a second place that names parameters, off by one letter.
    let params: Vec<(String, &Tensor)> = expert[0]
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (format!("blocks.0.expert.0.layers.0.{n}"), t))
        .collect();
    let plan = branch_plan(&expert, false);
    let ids = Tensor::new(&[[1u32, 2, 3, 4, 5, 6, 7, 8]], &Device::Cpu).unwrap();
    let batch = Batch::next_token(ids).unwrap();
    let mut opt = AdamW::new(AdamWConfig::default());
    let step = train_step(
        &model,
        &plan,
        &params,
        &mut opt,
        &batch,
        settings(0),
        &|_| 1.0,
    );
    let Err(e) = step else {
        panic!("a parameter the engine gives no gradient must stop the step");
    };
    let e = e.to_string();
    assert!(
        e.contains("blocks.0.expert.0.layers.0.") && e.contains("no gradient"),
        "{e}"
    );
}
