//! Crash safety: `mode train` killed with SIGKILL at random moments and rerun until it
//! finishes ends at exactly the expert of an uninterrupted run, and no kill ever leaves a
//! half-written artifact behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use mode_io::Tokenizer;
use mode_model::{Architecture, Backbone, Config};

fn mode(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mode"));
    c.args(args).stdout(Stdio::null()).stderr(Stdio::null());
    c
}

/// A small random Llama saved as a Hugging Face folder with the byte-level tokenizer.
fn tiny_backbone(dir: &Path) -> PathBuf {
    let mut config = Config::tiny(Architecture::Llama);
    config.vocab_size = 257;
    config.num_hidden_layers = 4;
    config.hidden_size = 128;
    config.intermediate_size = 256;
    config.head_dim = 32;
    let bb = Backbone::random(config.clone(), 5, DType::F32, &Device::Cpu).unwrap();
    let path = dir.join("tiny");
    bb.save_hf_folder(&path, &Tokenizer::byte_level()).unwrap();
    path
}

fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let map = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = map
        .into_iter()
        .map(|(k, t): (String, Tensor)| (k, t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A small deterministic generator for kill delays (seeded from the clock, printed).
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn training_killed_at_random_moments_resumes_to_the_same_expert() {
    let tmp = tempfile::tempdir().unwrap();
    let backbone = tiny_backbone(tmp.path());
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..40 {
        let text = format!("def f_{i}(x):\n    return x * {i} + 1\n\n").repeat(8);
        std::fs::write(src.join(format!("m{i}.py")), text).unwrap();
    }
    let data = tmp.path().join("data");
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let status = mode(&[
        "data",
        "prepare",
        "--backbone",
        &p(&backbone),
        "--input",
        &p(&src),
        "--out",
        &p(&data),
    ])
    .status()
    .unwrap();
    assert!(status.success());

    let train = |out: &Path| {
        mode(&[
            "train",
            "--threads",
            "2",
            "--backbone",
            &p(&backbone),
            "--data",
            &p(&data),
            "--out",
            &p(out),
            "--blocks",
            "2",
            "--expert-layers-per-block",
            "1",
            "--steps",
            "40",
            "--seq-len",
            "64",
            "--batch-tokens",
            "256",
            "--val-every",
            "10",
            "--checkpoint-every",
            "2",
        ])
    };
    let reference = tmp.path().join("ref").join("code.expert.safetensors");
    let t = Instant::now();
    assert!(train(&reference).status().unwrap().success());
    let full_run = t.elapsed();

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("kill-delay seed {seed}; an uninterrupted run takes {full_run:?}");
    let mut rng = XorShift(seed);
    let out_dir = tmp.path().join("killed");
    let out = out_dir.join("code.expert.safetensors");
    let mut kills = 0;
    for _ in 0..60 {
        let mut child = train(&out).spawn().unwrap();
        // Short delays, so that several kills land before a run gets to finish.
        let delay = Duration::from_millis(rng.below(full_run.as_millis() as u64 / 4 + 1));
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
        // Whatever the moment, the expert file is either absent or complete.
        if out.exists() {
            mode_core::ExpertFile::load(&out, &Device::Cpu).unwrap();
            break;
        }
    }
    if !out.exists() {
        assert!(train(&out).status().unwrap().success());
    }
    assert!(kills >= 3, "only {kills} kills landed");
    assert_eq!(
        tensors(&out),
        tensors(&reference),
        "after {kills} kills the expert differs from the uninterrupted run"
    );
    // The metrics hold each step once, as an uninterrupted run's do.
    let metrics = std::fs::read_to_string(out_dir.join("code.expert.metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .filter(|l| l.contains("\"train\""))
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=40).collect::<Vec<_>>());
    // Nothing temporary is left beside the artifact.
    let leftovers: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
