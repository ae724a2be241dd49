//! What the real-backbone tests share: reading the reference fixtures and comparing with them.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use mode_model::Backbone;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Largest absolute difference between two tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The prompts of a logits fixture (`p{i}.input_ids`), in order.
pub fn fixture_prompts(fixture: &std::collections::HashMap<String, Tensor>) -> Vec<Vec<u32>> {
    (0..)
        .map_while(|i| fixture.get(&format!("p{i}.input_ids")))
        .map(|ids| {
            ids.to_vec1::<i64>()
                .unwrap()
                .into_iter()
                .map(|x| x as u32)
                .collect()
        })
        .collect()
}

/// `[T, V]` logits of one sequence, and their full-vocabulary argmax at every position (as the
/// fixtures store it).
pub fn logits_and_argmax(model: &Backbone, ids: &[u32]) -> (Tensor, Vec<i64>) {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&input, None).unwrap().squeeze(0).unwrap();
    let argmax = logits
        .argmax(1)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    (logits, argmax)
}

/// Runs `mode eval --json --seq-len 512` (plus `extra`) on `files` and checks each against
/// `hf_eval.py`'s output in `fixture`: the same token and prediction counts, accuracy within
/// `accuracy_points`, loss within 0.01 nats/token.
pub fn check_eval(extra: &[&str], files: &[PathBuf], fixture: &str, accuracy_points: f64) {
    for f in files {
        assert!(
            f.exists(),
            "{} missing: run scripts/fetch_sample_data.sh (make test runs it)",
            f.display()
        );
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mode"))
        .args(["eval", "--json", "--seq-len", "512"])
        .args(extra)
        .args(
            files
                .iter()
                .flat_map(|f| [std::ffi::OsStr::new("--data"), f.as_os_str()]),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = std::fs::read_to_string(fixtures().join(fixture)).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    for f in files {
        let name = f.file_name().unwrap().to_str().unwrap();
        let (a, b) = (&ours[name], &reference[name]);
        assert_eq!(a["tokens"], b["tokens"], "{name}: token counts differ");
        assert_eq!(a["predictions"], b["predictions"], "{name}");
        let acc = |v: &serde_json::Value| 100.0 * v["next_token_accuracy"].as_f64().unwrap();
        let loss = |v: &serde_json::Value| v["loss"].as_f64().unwrap();
        eprintln!(
            "{name}: accuracy {:.3} vs {:.3}, loss {:.4} vs {:.4}",
            acc(a),
            acc(b),
            loss(a),
            loss(b)
        );
        assert!(
            (acc(a) - acc(b)).abs() <= accuracy_points,
            "{name}: accuracy {} vs {}",
            acc(a),
            acc(b)
        );
        assert!(
            (loss(a) - loss(b)).abs() <= 0.01,
            "{name}: loss {} vs {}",
            loss(a),
            loss(b)
        );
    }
}
