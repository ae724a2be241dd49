//! The training loop on a tiny MoDE model and real prepared data: the loss goes down, a run
//! stopped at a checkpoint and resumed ends at exactly the weights of an uninterrupted run.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use mode_core::{BlockLayout, Expert, ExpertInit, Gate, ModeModel};
use mode_data::{prepare, DataMix, Format, PrepareOptions, PreparedData};
use mode_io::Tokenizer;
use mode_model::{Architecture, Backbone, Config};
use mode_train::methods::ModeTraining;
use mode_train::trainer::{
    sample_batch, sources_without_validation, train, Event, Method, TrainConfig,
};

fn data(dir: &Path) -> DataMix {
    DataMix::single(prepared(dir, "code", |i| {
        format!("def add_{i}(a, b):\n    return a + b + {i}\n\n").repeat(4)
    }))
}

/// A prepared folder `dir/name` of 40 documents made by `text`.
fn prepared(dir: &Path, name: &str, text: impl Fn(usize) -> String) -> PreparedData {
    prepared_split(dir, name, text, 0.1)
}

/// [`prepared`], with `held_out` of the documents in each of the validation and test splits.
fn prepared_split(
    dir: &Path,
    name: &str,
    text: impl Fn(usize) -> String,
    held_out: f64,
) -> PreparedData {
    let src = dir.join(format!("{name}-src"));
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..40 {
        std::fs::write(src.join(format!("f{i}.py")), text(i)).unwrap();
    }
    let out = dir.join(name);
    let opts = PrepareOptions {
        inputs: vec![src],
        out: out.clone(),
        glob: Some("*.py".into()),
        format: Format::Auto,
        column: None,
        val_fraction: held_out,
        test_fraction: held_out,
        seed: 0,
        force: false,
    };
    prepare(&opts, &Tokenizer::byte_level(), None, |_, _| {}).unwrap();
    PreparedData::open(out).unwrap()
}

fn model() -> ModeModel {
    let mut config = Config::tiny(Architecture::Llama);
    config.vocab_size = 257;
    config.num_hidden_layers = 4;
    let bb = Backbone::random(config.clone(), 1, DType::F32, &Device::Cpu).unwrap();
    let layout = BlockLayout::even(4, 2, 1).unwrap();
    let expert = Expert::new("code", &bb, &layout, ExpertInit::Random, 2).unwrap();
    let gates = (0..2)
        .map(|_| Gate::new(64, 1, 0.9, DType::F32, &Device::Cpu).unwrap())
        .collect();
    ModeModel::new(bb, layout, vec![expert], gates).unwrap()
}

fn config() -> TrainConfig {
    TrainConfig {
        steps: 8,
        batch_tokens: 128,
        seq_len: 32,
        lr: 3e-3,
        lr_warmup_steps: 2,
        val_every: 4,
        val_windows: 4,
        checkpoint_every: 3,
        ..Default::default()
    }
}

/// Training of `m`'s experts and gates at the base learning rate.
fn experts_and_gates(m: &ModeModel) -> ModeTraining<'_> {
    ModeTraining {
        model: m,
        experts: true,
        gates: true,
        gate_lr_scale: 1.0,
    }
}

fn params(m: &ModeModel) -> Vec<(String, Vec<f32>)> {
    let method = experts_and_gates(m);
    method
        .params()
        .into_iter()
        .map(|(n, t): (String, &Tensor)| (n, t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

#[test]
fn training_lowers_the_loss_and_resume_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let cfg = config();

    // Uninterrupted.
    let a = model();
    let method = experts_and_gates(&a);
    let report = train(
        &method,
        &data,
        &cfg,
        &tmp.path().join("a.ckpt"),
        &tmp.path().join("a.jsonl"),
        |_| true,
    )
    .unwrap();
    assert_eq!(report.steps, 8);
    let metrics = std::fs::read_to_string(tmp.path().join("a.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train_losses: Vec<f64> = lines
        .iter()
        .filter(|l| l["kind"] == "train")
        .map(|l| l["loss"].as_f64().unwrap())
        .collect();
    assert_eq!(train_losses.len(), 8);
    assert!(train_losses[7] < train_losses[0], "{train_losses:?}");
    assert_eq!(lines.iter().filter(|l| l["kind"] == "val").count(), 2);

    // Stopped right after the checkpoint at step 6, then resumed from it by a fresh process
    // state (a new model with the same initialisation).
    let b = model();
    let method = experts_and_gates(&b);
    let ckpt = tmp.path().join("b.ckpt");
    let metrics_b = tmp.path().join("b.jsonl");
    let mut checkpoints = 0;
    let stopped = train(&method, &data, &cfg, &ckpt, &metrics_b, |e| {
        if let Event::Checkpoint(_) = e {
            checkpoints += 1;
        }
        checkpoints < 2
    })
    .unwrap();
    assert_eq!(stopped.steps, 6);
    let c = model();
    let method = experts_and_gates(&c);
    let resumed = train(&method, &data, &cfg, &ckpt, &metrics_b, |_| true).unwrap();
    assert_eq!(resumed.steps, 8);
    assert_eq!(
        params(&a),
        params(&c),
        "resumed weights differ from the uninterrupted run"
    );
    let lines = std::fs::read_to_string(&metrics_b).unwrap();
    assert_eq!(lines.lines().filter(|l| l.contains("\"train\"")).count(), 8);
}

#[test]
fn a_mixture_draws_rows_by_weight_and_validates_each_source() {
    let tmp = tempfile::tempdir().unwrap();
    // Byte-level tokens: `code` rows hold only letters, `math` rows only digits.
    let code = prepared(tmp.path(), "code", |i| "abcdefgh ".repeat(20 + i));
    let math = prepared(tmp.path(), "math", |i| "0123456789 ".repeat(20 + i));
    let mix = DataMix::new(vec![(code, 1.0), (math, 3.0)]).unwrap();
    assert_eq!(mix.describe(), "code (25%), math (75%)");
    let cfg = TrainConfig {
        batch_tokens: 32 * 8,
        ..config()
    };
    let a_id = Tokenizer::byte_level().encode("a").unwrap()[0];
    let (mut code_rows, mut math_rows) = (0, 0);
    for step in 0..50 {
        let batch = sample_batch(&mix, &cfg, step, &Device::Cpu).unwrap();
        for row in batch.ids.to_vec2::<u32>().unwrap() {
            // Byte-level ids follow the sorted alphabet: digits come before letters.
            let letters = row.iter().filter(|&&t| t >= a_id).count();
            if letters > row.len() / 2 {
                code_rows += 1;
            } else {
                math_rows += 1;
            }
        }
    }
    let share = math_rows as f64 / (code_rows + math_rows) as f64;
    assert!((share - 0.75).abs() < 0.06, "math share {share}");
    // The same step draws the same batch.
    assert_eq!(
        sample_batch(&mix, &cfg, 7, &Device::Cpu)
            .unwrap()
            .ids
            .to_vec2::<u32>()
            .unwrap(),
        sample_batch(&mix, &cfg, 7, &Device::Cpu)
            .unwrap()
            .ids
            .to_vec2::<u32>()
            .unwrap()
    );

    let m = model();
    let method = experts_and_gates(&m);
    let cfg = TrainConfig {
        steps: 2,
        val_every: 2,
        checkpoint_every: 0,
        ..config()
    };
    let metrics = tmp.path().join("mix.jsonl");
    train(
        &method,
        &mix,
        &cfg,
        &tmp.path().join("mix.ckpt"),
        &metrics,
        |_| true,
    )
    .unwrap();
    let text = std::fs::read_to_string(&metrics).unwrap();
    let val: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l["kind"] == "val")
        .unwrap();
    for name in ["code", "math"] {
        let acc = val["sources"][name]["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{name}: {val}");
        assert!(val["sources"][name]["tokens"].as_u64().unwrap() > 0);
    }
}

#[test]
fn a_diverging_run_stops_cleanly_and_keeps_its_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let m = model();
    let method = experts_and_gates(&m);
    // A learning rate no model survives: the weights blow up within a few steps.
    let cfg = TrainConfig {
        steps: 40,
        lr: 1e35,
        lr_warmup_steps: 0,
        max_grad_norm: 1e30,
        val_every: 0,
        checkpoint_every: 1,
        ..config()
    };
    let ckpt = tmp.path().join("d.ckpt");
    let e = train(
        &method,
        &data,
        &cfg,
        &ckpt,
        &tmp.path().join("d.jsonl"),
        |_| true,
    )
    .expect_err("the run diverges");
    let msg = e.to_string();
    assert!(
        msg.contains("not finite") && msg.contains("last good checkpoint"),
        "{msg}"
    );
    // The checkpoint left behind holds finite weights and resumes.
    let saved =
        candle_core::safetensors::load(ckpt.join("state.safetensors"), &Device::Cpu).unwrap();
    assert!(!saved.is_empty());
    for (name, t) in &saved {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name} is not finite");
    }
}

/// The values of `m`'s gate tensors (`gates`) or expert tensors.
fn part(m: &ModeModel, gates: bool) -> Vec<(String, Vec<f32>)> {
    params(m)
        .into_iter()
        .filter(|(n, _)| ModeModel::is_gate_tensor(n) == gates)
        .collect()
}

#[test]
fn a_gate_learning_rate_scale_of_zero_leaves_the_gates_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let cfg = TrainConfig {
        checkpoint_every: 0,
        ..config()
    };
    let before = model();
    let mut moved = Vec::new();
    for scale in [0.0, 1.0, 10.0] {
        let m = model();
        let method = ModeTraining {
            model: &m,
            experts: true,
            gates: true,
            gate_lr_scale: scale,
        };
        let name = format!("s{scale}");
        let ckpt = tmp.path().join(format!("{name}.ckpt"));
        let metrics = tmp.path().join(format!("{name}.jsonl"));
        train(&method, &data, &cfg, &ckpt, &metrics, |_| true).unwrap();
        assert_ne!(part(&m, false), part(&before, false), "experts train");
        let distance: f32 = part(&m, true)
            .iter()
            .zip(part(&before, true))
            .flat_map(|((_, a), (_, b))| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .collect::<Vec<_>>()
            })
            .sum();
        moved.push(distance);
    }
    assert_eq!(moved[0], 0.0, "gates moved at scale 0");
    assert!(moved[2] > moved[1] && moved[1] > 0.0, "{moved:?}");
}

#[test]
fn a_last_update_that_overflows_is_an_error_not_a_finished_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let m = model();
    let method = experts_and_gates(&m);
    // One step at a rate beyond f32: the loss of the step is finite, its update is not.
    let cfg = TrainConfig {
        steps: 1,
        lr: 1e39,
        lr_warmup_steps: 0,
        val_every: 0,
        checkpoint_every: 0,
        ..config()
    };
    let e = train(
        &method,
        &data,
        &cfg,
        &tmp.path().join("x.ckpt"),
        &tmp.path().join("x.jsonl"),
        |_| true,
    )
    .expect_err("an overflowing update must not end as a finished run")
    .to_string();
    assert!(e.contains("not finite"), "{e}");
}

#[test]
fn a_run_without_validation_data_finishes_and_says_it_has_no_validation_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let text = |i: usize| format!("def add_{i}(a, b):\n    return a + b + {i}\n\n").repeat(4);
    let cfg = config();
    let run = |data: &DataMix, name: &str| {
        let m = model();
        let method = experts_and_gates(&m);
        let metrics = tmp.path().join(format!("{name}.jsonl"));
        let report = train(
            &method,
            data,
            &cfg,
            &tmp.path().join(format!("{name}.ckpt")),
            &metrics,
            |_| true,
        )
        .expect("a run without validation data is still a finished run");
        (report, std::fs::read_to_string(metrics).unwrap())
    };

    // Every document in training: nothing to validate on, and no NaN called a divergence.
    let alone = DataMix::single(prepared_split(tmp.path(), "all", text, 0.0));
    assert_eq!(sources_without_validation(&alone, cfg.seq_len), ["all"]);
    let (report, metrics) = run(&alone, "alone");
    assert_eq!(report.steps, cfg.steps);
    assert_eq!(
        (report.final_val_loss, report.final_val_accuracy),
        (None, None)
    );
    assert!(report.final_train_loss.is_some_and(f64::is_finite));
    assert!(!metrics.contains("\"val\""), "{metrics}");

    // Beside a source that has validation data, the run validates on that one alone.
    let mut mix = DataMix::single(prepared(tmp.path(), "held", text));
    mix.sources
        .extend(DataMix::single(prepared_split(tmp.path(), "all2", text, 0.0)).sources);
    assert_eq!(sources_without_validation(&mix, cfg.seq_len), ["all2"]);
    let (report, metrics) = run(&mix, "mix");
    let loss = report
        .final_val_loss
        .expect("the held-out source is validated");
    assert!(loss.is_finite(), "{loss}");
    let last_val = metrics.lines().rfind(|l| l.contains("\"val\"")).unwrap();
    assert!(
        !last_val.contains("null") && !last_val.contains("all2"),
        "{last_val}"
    );
}
