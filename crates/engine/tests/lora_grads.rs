//! LoRA adapters: a fresh adapter changes nothing; adapter gradients match finite differences
//! and only adapters get gradients; the inference forward agrees with the training forward.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use mode_engine::model::{loss_and_grads, Plan, Trainable};
use mode_engine::ops::IGNORE;
use mode_model::{random_weights, Architecture, Backbone, Config, Weights};

const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn f64_model(arch: Architecture) -> Backbone {
    let config = Config::tiny(arch);
    let w = match random_weights(&config, 61) {
        Weights::Map { tensors, label } => Weights::Map {
            tensors: tensors
                .into_iter()
                .map(|(k, v)| (k, v.to_dtype(DType::F64).unwrap()))
                .collect(),
            label,
        },
        _ => unreachable!(),
    };
    Backbone::load(config, &w, DType::F64, &Device::Cpu).unwrap()
}

fn batch() -> (Tensor, Vec<u32>) {
    let ids = [[5u32, 17, 200, 3, 99, 7], [255, 0, 42, 64, 64, 1]];
    let mut targets = Vec::new();
    for row in &ids {
        targets.extend_from_slice(&row[1..]);
        targets.push(IGNORE);
    }
    (Tensor::new(&ids, &Device::Cpu).unwrap(), targets)
}

fn mean_loss(model: &Backbone) -> f64 {
    let (ids, targets) = batch();
    let r = loss_and_grads(model, &Plan::backbone(Trainable::none(2)), &ids, &targets).unwrap();
    r.loss_sum / r.count as f64
}

/// Gives every adapter's B random values, so that gradients of A are not trivially zero.
fn randomise_b(model: &mut Backbone, seed: u64) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for layer in &mut model.layers {
        for (_, l) in layer.linears_mut() {
            if let Some(a) = &mut l.lora {
                let n = a.b.elem_count();
                let v: Vec<f64> = (0..n).map(|_| rng.random_range(-0.1..0.1)).collect();
                a.b = Tensor::from_vec(v, a.b.dims(), &Device::Cpu).unwrap();
            }
        }
    }
}

#[test]
fn fresh_adapters_leave_the_model_unchanged() {
    let mut model = f64_model(Architecture::Llama);
    let (ids, _) = batch();
    let before = model.forward(&ids, None).unwrap();
    model.attach_lora(4, 8.0, &TARGETS, 1).unwrap();
    assert_eq!(model.lora_tensors().len(), 2 * 7 * 2);
    let after = model.forward(&ids, None).unwrap();
    let diff: f64 = (before - after)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn adapter_gradients_match_finite_differences() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let mut model = f64_model(arch);
        model.attach_lora(4, 8.0, &TARGETS, 2).unwrap();
        randomise_b(&mut model, 3);
        let (ids, targets) = batch();

        // The inference forward computes the same loss as the training forward.
        let logits: Vec<Vec<f64>> = model
            .forward(&ids, None)
            .unwrap()
            .flatten_to(1)
            .unwrap()
            .to_vec2()
            .unwrap();
        let (mut sum, mut n) = (0.0, 0);
        for (row, &t) in logits.iter().zip(&targets) {
            if t == IGNORE {
                continue;
            }
            let z: f64 = row.iter().map(|x| x.exp()).sum();
            sum += z.ln() - row[t as usize];
            n += 1;
        }
        assert!(
            (sum / n as f64 - mean_loss(&model)).abs() < 1e-10,
            "{arch:?}"
        );

        let r =
            loss_and_grads(&model, &Plan::backbone(Trainable::lora(2)), &ids, &targets).unwrap();
        let grads: HashMap<String, Tensor> = r.grads.into_iter().collect();
        let names: Vec<String> = model.lora_tensors().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            grads.len(),
            names.len(),
            "only adapters get gradients: {:?}",
            grads.keys()
        );
        for name in &names {
            let grad: Vec<f64> = grads[name].flatten_all().unwrap().to_vec1().unwrap();
            let i = 7 % grad.len();
            let at = |delta: f64| {
                let mut m = f64_model(arch);
                m.attach_lora(4, 8.0, &TARGETS, 2).unwrap();
                randomise_b(&mut m, 3);
                let (layer, rest) = name
                    .strip_prefix("model.layers.")
                    .unwrap()
                    .split_once('.')
                    .unwrap();
                let layer: usize = layer.parse().unwrap();
                for (proj, l) in m.layers[layer].linears_mut() {
                    let Some(a) = &mut l.lora else { continue };
                    let t = if rest == format!("{proj}.lora_A") {
                        &mut a.a
                    } else if rest == format!("{proj}.lora_B") {
                        &mut a.b
                    } else {
                        continue;
                    };
                    let mut v: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
                    v[i] += delta;
                    *t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
                }
                mean_loss(&m)
            };
            let eps = 1e-5;
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            let err = (numeric - grad[i]).abs() / (1e-4 + numeric.abs());
            assert!(
                err < 1e-4,
                "{arch:?} {name}[{i}]: analytic {} numeric {numeric}",
                grad[i]
            );
        }
    }
}
