//! Parallel blocks (experts beside backbone layers, mixed by a learned gate or fixed weights):
//! gradients of expert and gate parameters, and of upstream backbone layers through the block,
//! against finite differences in f64.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use mode_engine::model::{loss_and_grads, Block, Mix, Plan, Trainable};
use mode_engine::ops::IGNORE;
use mode_model::{random_weights, Architecture, Backbone, Config, DecoderLayer, Weights};

type Params = HashMap<String, Tensor>;

fn f64_map(w: &Weights) -> Params {
    match w {
        Weights::Map { tensors, .. } => tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(DType::F64).unwrap()))
            .collect(),
        _ => unreachable!(),
    }
}

fn uniform(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    Tensor::from_vec(
        (0..n)
            .map(|_| rng.random_range(-0.5..0.5))
            .collect::<Vec<f64>>(),
        shape,
        &Device::Cpu,
    )
    .unwrap()
}

/// All parameters in one map: backbone under HF names, expert layers as
/// `blocks.0.experts.0.layers.{l}.*`, gate as `blocks.0.gate.*`.
fn setup(arch: Architecture) -> (Config, Params) {
    let config = Config::tiny(arch);
    let mut params = f64_map(&random_weights(&config, 41));
    let expert = f64_map(&random_weights(&config, 42));
    for (k, v) in expert {
        // The expert has two layers (tiny Gemma backbones have three).
        if let Some(rest) = k.strip_prefix("model.layers.") {
            if rest.starts_with("0.") || rest.starts_with("1.") {
                params.insert(format!("blocks.0.experts.0.layers.{rest}"), v);
            }
        }
    }
    params.insert(
        "blocks.0.gate.weight".into(),
        uniform(&[2, config.hidden_size], 43),
    );
    params.insert("blocks.0.gate.bias".into(), uniform(&[2], 44));
    (config, params)
}

struct Built {
    model: Backbone,
    expert: Vec<DecoderLayer>,
    gate_w: Tensor,
    gate_b: Tensor,
}

fn build(config: &Config, params: &Params) -> Built {
    let backbone: Params = params
        .iter()
        .filter(|(k, _)| !k.starts_with("blocks."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let weights = Weights::Map {
        tensors: backbone,
        label: "backbone".into(),
    };
    let model = Backbone::load(config.clone(), &weights, DType::F64, &Device::Cpu).unwrap();
    let expert_map: Params = params
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("blocks.0.experts.0.layers.")
                .map(|r| (format!("model.layers.{r}"), v.clone()))
        })
        .collect();
    let ew = Weights::Map {
        tensors: expert_map,
        label: "expert".into(),
    };
    let expert = (0..2)
        .map(|l| {
            DecoderLayer::load(
                config,
                &ew,
                &format!("model.layers.{l}"),
                config.layer_window(l),
                DType::F64,
                &Device::Cpu,
            )
            .unwrap()
        })
        .collect();
    Built {
        model,
        expert,
        gate_w: params["blocks.0.gate.weight"].clone(),
        gate_b: params["blocks.0.gate.bias"].clone(),
    }
}

fn batch() -> (Tensor, Vec<u32>) {
    let ids = [[5u32, 17, 200, 3, 99], [255, 0, 42, 64, 1]];
    let mut targets = Vec::new();
    for row in &ids {
        targets.extend_from_slice(&row[1..]);
        targets.push(IGNORE);
    }
    (Tensor::new(&ids, &Device::Cpu).unwrap(), targets)
}

/// How the test block mixes: fixed weights, a gate on the raw block input, or a gate on the
/// normalised input.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mixing {
    Fixed,
    Gate,
    NormalizedGate,
}

/// The block covers backbone layer 1 with one 2-layer expert (in the residual form: its branch
/// is `B(x) + L(x) - x`).
fn plan<'a>(b: &'a Built, mixing: Mixing, train_layer0: bool, residual: bool) -> Plan<'a> {
    let mut backbone = Trainable::none(b.model.layers.len());
    backbone.layers[0] = train_layer0;
    let mix = match mixing {
        Mixing::Fixed => Mix::Fixed(vec![0.3, 0.7]),
        Mixing::Gate | Mixing::NormalizedGate => Mix::Gate {
            weight: &b.gate_w,
            bias: &b.gate_b,
            normalize_input: mixing == Mixing::NormalizedGate,
        },
    };
    let gate = mixing != Mixing::Fixed;
    Plan {
        backbone,
        blocks: vec![Block {
            layers: 1..2,
            experts: vec![&b.expert],
            residual: vec![residual],
            mix,
            train_experts: vec![true],
            train_gate: gate,
        }],
        recompute_activations: false,
    }
}

fn check(arch: Architecture, mixing: Mixing, train_layer0: bool, residual: bool) {
    let (config, params) = setup(arch);
    let built = build(&config, &params);
    let (ids, targets) = batch();
    let gate = mixing != Mixing::Fixed;
    let r = loss_and_grads(
        &built.model,
        &plan(&built, mixing, train_layer0, residual),
        &ids,
        &targets,
    )
    .unwrap();
    let grads: HashMap<String, Tensor> = r.grads.into_iter().collect();
    let expected: Vec<&String> = params
        .keys()
        .filter(|k| {
            k.starts_with("blocks.0.experts.")
                || (gate && k.starts_with("blocks.0.gate."))
                || (train_layer0 && k.starts_with("model.layers.0."))
        })
        .collect();
    assert_eq!(
        grads.len(),
        expected.len(),
        "{arch:?}: {:?}",
        grads.keys().collect::<Vec<_>>()
    );
    for name in expected {
        let value: Vec<f64> = params[name].flatten_all().unwrap().to_vec1().unwrap();
        let grad: Vec<f64> = grads[name].flatten_all().unwrap().to_vec1().unwrap();
        for k in 0..2 {
            let i = (k * 7919 + 5) % value.len();
            let at = |delta: f64| {
                let mut v = value.clone();
                v[i] += delta;
                let mut p = params.clone();
                p.insert(
                    name.clone(),
                    Tensor::from_vec(v, params[name].dims(), &Device::Cpu).unwrap(),
                );
                let b = build(&config, &p);
                let p = plan(&b, mixing, false, residual);
                let r = loss_and_grads(&b.model, &p, &ids, &targets).unwrap();
                r.loss_sum / r.count as f64
            };
            let eps = 1e-5;
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            let err = (numeric - grad[i]).abs() / (1e-4 + numeric.abs());
            assert!(
                err < 1e-4,
                "{arch:?} {mixing:?} {name}[{i}]: analytic {} numeric {numeric}",
                grad[i]
            );
        }
    }
}

#[test]
fn expert_and_gate_gradients() {
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Gemma3,
    ] {
        check(arch, Mixing::Gate, false, false);
    }
}

#[test]
fn fixed_mix_gradients() {
    check(Architecture::Llama, Mixing::Fixed, false, false);
}

#[test]
fn normalized_gate_gradients() {
    check(Architecture::Llama, Mixing::NormalizedGate, false, false);
    check(Architecture::Gemma3, Mixing::NormalizedGate, false, true);
    // Through the normalisation to the layer before the block.
    check(Architecture::Qwen3, Mixing::NormalizedGate, true, false);
}

#[test]
fn gradients_flow_through_the_block_to_upstream_layers() {
    check(Architecture::Llama, Mixing::Gate, true, false);
    check(Architecture::Qwen3, Mixing::Fixed, true, false);
    check(Architecture::Gemma3, Mixing::Gate, true, false);
}

#[test]
fn residual_expert_gradients() {
    check(Architecture::Llama, Mixing::Gate, false, true);
    check(Architecture::Llama, Mixing::Gate, true, true);
    check(Architecture::Qwen3, Mixing::Fixed, true, true);
    check(Architecture::Gemma3, Mixing::Gate, true, true);
}

#[test]
fn recomputed_activations_give_the_same_loss_and_gradients() {
    let (config, params) = setup(Architecture::Llama);
    let built = build(&config, &params);
    let (ids, targets) = batch();
    for (mixing, train_layer0, residual) in [
        (Mixing::Gate, false, false),
        (Mixing::Gate, true, false),
        (Mixing::Fixed, true, false),
        (Mixing::Gate, true, true),
        (Mixing::NormalizedGate, true, false),
    ] {
        let saved = loss_and_grads(
            &built.model,
            &plan(&built, mixing, train_layer0, residual),
            &ids,
            &targets,
        )
        .unwrap();
        let mut p = plan(&built, mixing, train_layer0, residual);
        p.recompute_activations = true;
        let recomputed = loss_and_grads(&built.model, &p, &ids, &targets).unwrap();
        assert!((saved.loss_sum - recomputed.loss_sum).abs() < 1e-12 * saved.loss_sum.abs());
        let a: HashMap<String, Tensor> = saved.grads.into_iter().collect();
        let b: HashMap<String, Tensor> = recomputed.grads.into_iter().collect();
        assert_eq!(a.len(), b.len());
        assert!(!a.is_empty());
        for (name, g) in &a {
            let diff = (g - &b[name])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            // Equal up to summation order (threaded reductions), far below any real error.
            let scale = g
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(
                diff <= 1e-12 * scale.max(1e-6),
                "{name}: {mixing:?} layer0={train_layer0}: {diff} of {scale}"
            );
        }
    }
}
