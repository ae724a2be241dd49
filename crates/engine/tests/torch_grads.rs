//! Gradients of tiny random models against PyTorch's autograd (fixtures written by
//! scripts/reference/torch_grads.py from Hugging Face transformers models in float64).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use mode_engine::model::{loss_and_grads, Plan, Trainable};
use mode_engine::ops::IGNORE;
use mode_model::{Architecture, Backbone, Config, Weights};

fn check(arch: Architecture, file: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(file);
    let fixture = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let params: HashMap<String, Tensor> = fixture
        .iter()
        .filter(|(k, _)| k.starts_with("model.") || k.as_str() == "lm_head.weight")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let config = Config::tiny(arch);
    let weights = Weights::Map {
        tensors: params.clone(),
        label: path.clone(),
    };
    let model = Backbone::load(config, &weights, DType::F64, &Device::Cpu).unwrap();
    let ids = fixture["input_ids"].to_dtype(DType::U32).unwrap();
    let targets: Vec<u32> = fixture["targets"]
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|t| if t < 0 { IGNORE } else { t as u32 })
        .collect();
    let r = loss_and_grads(
        &model,
        &Plan::backbone(Trainable::all(model.layers.len())),
        &ids,
        &targets,
    )
    .unwrap();
    let loss = r.loss_sum / r.count as f64;
    let expected_loss = fixture["loss"].to_vec1::<f64>().unwrap()[0];
    assert!(
        (loss - expected_loss).abs() < 1e-12,
        "{arch:?}: loss {loss} vs {expected_loss}"
    );
    let grads: HashMap<String, Tensor> = r.grads.into_iter().collect();
    assert_eq!(grads.len(), params.len(), "{arch:?}: gradient count");
    let mut worst = (0.0f64, String::new());
    for name in params.keys() {
        let ours = &grads[name];
        let theirs = &fixture[&format!("grad.{name}")];
        let scale: f64 = theirs
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let diff: f64 = (ours - theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(
            diff <= 1e-9 * scale,
            "{arch:?} {name}: max diff {diff} vs max |grad| {scale}"
        );
        assert!(scale > 0.0, "{arch:?} {name}: zero gradient in fixture");
        if diff / scale >= worst.0 {
            worst = (diff / scale, name.clone());
        }
    }
    // Shown with `--nocapture`: how far below the 1e-9 tolerance the backward is.
    eprintln!(
        "{arch:?}: loss {loss:.17} (fixture {expected_loss:.17}, diff {:.1e}); worst max|diff| / max|grad| \
         {:.2e} ({})",
        (loss - expected_loss).abs(),
        worst.0,
        worst.1
    );
}

#[test]
fn llama_gradients_match_pytorch() {
    check(Architecture::Llama, "grads_llama.safetensors");
}

#[test]
fn qwen2_gradients_match_pytorch() {
    check(Architecture::Qwen2, "grads_qwen2.safetensors");
}

#[test]
fn qwen3_gradients_match_pytorch() {
    check(Architecture::Qwen3, "grads_qwen3.safetensors");
}

#[test]
fn gemma3_gradients_match_pytorch() {
    check(Architecture::Gemma3, "grads_gemma3.safetensors");
}
