//! Whole-model gradients of tiny random backbones, in f64, against finite differences; and the
//! frozen parts get no gradient at all.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use mode_engine::model::{loss_and_grads, Plan, Trainable};
use mode_engine::ops::IGNORE;
use mode_model::{random_weights, Architecture, Backbone, Config, Weights};

const ARCHES: [Architecture; 4] = [
    Architecture::Llama,
    Architecture::Qwen2,
    Architecture::Qwen3,
    Architecture::Gemma3,
];

fn batch() -> (Tensor, Vec<u32>) {
    let ids = [[5u32, 17, 200, 3, 99, 7], [255, 0, 42, 64, 64, 1]];
    let mut targets = Vec::new();
    for row in &ids {
        targets.extend_from_slice(&row[1..]);
        targets.push(IGNORE);
    }
    targets[6] = IGNORE;
    (Tensor::new(&ids, &Device::Cpu).unwrap(), targets)
}

fn tensors(w: &Weights) -> HashMap<String, Tensor> {
    match w {
        Weights::Map { tensors, .. } => tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(DType::F64).unwrap()))
            .collect(),
        _ => unreachable!(),
    }
}

fn load(config: &Config, tensors: HashMap<String, Tensor>) -> Backbone {
    let weights = Weights::Map {
        tensors,
        label: "test".into(),
    };
    Backbone::load(config.clone(), &weights, DType::F64, &Device::Cpu).unwrap()
}

fn mean_loss(model: &Backbone) -> f64 {
    let (ids, targets) = batch();
    let r = loss_and_grads(
        model,
        &Plan::backbone(Trainable::none(model.layers.len())),
        &ids,
        &targets,
    )
    .unwrap();
    r.loss_sum / r.count as f64
}

#[test]
fn full_model_gradients_match_finite_differences() {
    for arch in ARCHES {
        let config = Config::tiny(arch);
        let base = tensors(&random_weights(&config, 31));
        let model = load(&config, base.clone());
        let (ids, targets) = batch();
        let all = Trainable::all(config.num_hidden_layers);
        let r = loss_and_grads(&model, &Plan::backbone(all), &ids, &targets).unwrap();
        let grads: HashMap<String, Tensor> = r.grads.into_iter().collect();
        // Every parameter of the model got a gradient of its own shape.
        assert_eq!(
            grads.len(),
            base.len(),
            "{arch:?}: {:?}",
            grads.keys().collect::<Vec<_>>()
        );
        for (name, t) in &base {
            assert_eq!(grads[name].dims(), t.dims(), "{arch:?} {name}");
        }
        let mut names: Vec<&String> = base.keys().collect();
        names.sort();
        let mut checked = 0;
        for name in names {
            let value: Vec<f64> = base[name].flatten_all().unwrap().to_vec1().unwrap();
            let grad: Vec<f64> = grads[name].flatten_all().unwrap().to_vec1().unwrap();
            // A few entries per tensor, spread over it.
            for k in 0..3 {
                let i = (k * 7919 + 13) % value.len();
                let at = |delta: f64| {
                    let mut v = value.clone();
                    v[i] += delta;
                    let mut m = base.clone();
                    m.insert(
                        name.clone(),
                        Tensor::from_vec(v, base[name].dims(), &Device::Cpu).unwrap(),
                    );
                    mean_loss(&load(&config, m))
                };
                let eps = 1e-5;
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                let err = (numeric - grad[i]).abs() / (1e-4 + numeric.abs());
                assert!(
                    err < 1e-4,
                    "{arch:?} {name}[{i}]: analytic {} numeric {numeric}",
                    grad[i]
                );
                checked += 1;
            }
        }
        eprintln!("{arch:?}: {checked} entries checked");
    }
}

#[test]
fn frozen_layers_get_no_gradient_and_trainable_ones_match_full() {
    let config = Config::tiny(Architecture::Llama);
    let model = load(&config, tensors(&random_weights(&config, 32)));
    let (ids, targets) = batch();
    let full: HashMap<String, Tensor> =
        loss_and_grads(&model, &Plan::backbone(Trainable::all(2)), &ids, &targets)
            .unwrap()
            .grads
            .into_iter()
            .collect();
    let mut only_last = Trainable::none(2);
    only_last.layers[1] = true;
    let partial = loss_and_grads(&model, &Plan::backbone(only_last), &ids, &targets).unwrap();
    assert!(!partial.grads.is_empty());
    for (name, g) in &partial.grads {
        assert!(
            name.starts_with("model.layers.1."),
            "frozen parameter {name} got a gradient"
        );
        let diff: f64 = (g - &full[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-12, "{name}: {diff}");
    }
    assert_eq!(partial.grads.len(), 9);
    let none = loss_and_grads(&model, &Plan::backbone(Trainable::none(2)), &ids, &targets).unwrap();
    assert!(none.grads.is_empty());
    assert_eq!(none.count, 9);
}
