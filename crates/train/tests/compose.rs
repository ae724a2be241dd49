//! Stage 2 on a tiny backbone: two real stage-1 experts composed and tuned on a mixture, the
//! folder round trip, frozen experts staying bit-identical, and the errors a user can hit.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mode_core::{load_composed, Gate, GateInput, LoadedExpertFile};
use mode_data::{prepare, DataMix, Format, PrepareOptions, PreparedData};
use mode_io::Tokenizer;
use mode_model::{Architecture, Backbone, CausalLm, Config};
use mode_train::compose::{compose, ComposeOptions, GateInit};
use mode_train::stage1::{train_expert, Stage1Options};
use mode_train::trainer::TrainConfig;

fn backbone(seed: u64) -> Backbone {
    let mut config = Config::tiny(Architecture::Llama);
    config.vocab_size = 257;
    config.num_hidden_layers = 4;
    Backbone::random(config.clone(), seed, DType::F32, &Device::Cpu).unwrap()
}

fn prepared(dir: &Path, name: &str, text: impl Fn(usize) -> String) -> PreparedData {
    let src = dir.join(format!("{name}-src"));
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..30 {
        std::fs::write(src.join(format!("d{i}.txt")), text(i)).unwrap();
    }
    let out = dir.join(name);
    let opts = PrepareOptions {
        column: None,
        inputs: vec![src],
        out: out.clone(),
        glob: None,
        format: Format::Auto,
        val_fraction: 0.1,
        test_fraction: 0.1,
        seed: 0,
        force: false,
    };
    prepare(&opts, &Tokenizer::byte_level(), None, |_, _| {}).unwrap();
    PreparedData::open(out).unwrap()
}

fn cfg(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        batch_tokens: 64,
        seq_len: 32,
        lr: 3e-3,
        lr_warmup_steps: 1,
        val_every: 0,
        val_windows: 2,
        checkpoint_every: 0,
        ..Default::default()
    }
}

fn fingerprint() -> String {
    Tokenizer::byte_level().fingerprint()
}

/// Trains a stage-1 expert for `domain` on `data` and returns its file.
fn expert(dir: &Path, domain: &str, data: PreparedData) -> PathBuf {
    expert_reading(dir, domain, data, GateInput::Raw)
}

/// [`expert`] with stage-1 gates that read `gate_input`.
fn expert_reading(dir: &Path, domain: &str, data: PreparedData, gate_input: GateInput) -> PathBuf {
    let out = dir.join(format!("{domain}.expert.safetensors"));
    let opts = Stage1Options {
        domain: domain.into(),
        blocks: 2,
        expert_layers_per_block: 1,
        init: mode_core::ExpertInit::Copy,
        gate_init_backbone_prob: 0.5,
        gate_lr_scale: 1.0,
        gate_input,
        train: cfg(2),
    };
    train_expert(
        backbone(1),
        "tiny",
        &fingerprint(),
        &DataMix::single(data),
        &opts,
        &out,
        |_| true,
    )
    .unwrap();
    out
}

fn load(paths: &[&PathBuf]) -> Vec<LoadedExpertFile> {
    paths
        .iter()
        .map(|p| LoadedExpertFile::load(p, &Device::Cpu).unwrap())
        .collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn mix(dir: &Path) -> DataMix {
    DataMix::new(vec![
        (
            prepared(dir, "code-mix", |i| "def f(x): return x\n".repeat(3 + i)),
            1.0,
        ),
        (
            prepared(dir, "math-mix", |i| {
                format!("{i} + {i} = {}\n", 2 * i).repeat(5)
            }),
            1.0,
        ),
    ])
    .unwrap()
}

#[test]
fn composing_two_experts_writes_a_folder_that_loads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let code = expert(
        tmp.path(),
        "code",
        prepared(tmp.path(), "code", |i| "def f(x): return x\n".repeat(3 + i)),
    );
    let math = expert(
        tmp.path(),
        "math",
        prepared(tmp.path(), "math", |i| {
            format!("{i} * 2 = {}\n", 2 * i).repeat(5)
        }),
    );
    let data = mix(tmp.path());
    let out = tmp.path().join("models").join("code-math");
    for (freeze, init) in [(false, GateInit::Fresh), (true, GateInit::Stage1)] {
        let opts = ComposeOptions {
            freeze_experts: freeze,
            gate_init: init,
            gate_init_backbone_prob: 0.8,
            keep_backbone_prior: freeze,
            gate_lr_scale: 1.0,
            gate_input: None,
            train: cfg(3),
        };
        let (manifest, report) = compose(
            backbone(1),
            "tiny",
            &fingerprint(),
            load(&[&code, &math]),
            &data,
            &opts,
            &out,
            |_| true,
        )
        .unwrap();
        assert_eq!(report.steps, 3);
        let manifest = manifest.unwrap();
        let names: Vec<&str> = manifest.experts.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["code", "math"]);
        assert!(manifest.experts.iter().all(|e| e.tuned != freeze));
        assert!(out.join("model.json").exists() && out.join("gates.safetensors").exists());
        assert!(!tmp.path().join("models").join("code-math.ckpt").exists());

        let (model, loaded) = load_composed(&out, backbone(1)).unwrap();
        assert_eq!(loaded, manifest);
        assert_eq!(model.gates[0].num_branches(), 3);
        // Frozen experts come back bit-identical to stage 1; tuned ones moved.
        let stage1 = load(&[&code]).remove(0);
        let stage1_expert = stage1.file.expert(&backbone(1), &code).unwrap();
        let same = stage1_expert
            .named_tensors()
            .iter()
            .zip(model.experts[0].named_tensors())
            .all(|((_, a), (_, b))| values(a) == values(b));
        assert_eq!(same, freeze, "frozen={freeze}");
        // The gates trained away from their initial values.
        let initial = match init {
            GateInit::Fresh => Gate::new(64, 2, 0.8, DType::F32, &Device::Cpu).unwrap(),
            GateInit::Stage1 => {
                let g1 = stage1.file.gates(&code).unwrap();
                let g2 = load(&[&math]).remove(0).file.gates(&math).unwrap();
                Gate::from_stage1(&[&g1[0], &g2[0]], true).unwrap()
            }
        };
        assert_ne!(values(&model.gates[0].bias), values(&initial.bias));
        // What loads is what ran: a second load gives the same logits.
        let ids = Tensor::new(&[[5u32, 70, 71, 72, 40, 41]], &Device::Cpu).unwrap();
        let (again, _) = load_composed(&out, backbone(1)).unwrap();
        let a = model.hidden_states(&ids, None).unwrap();
        let b = again.hidden_states(&ids, None).unwrap();
        assert_eq!(values(&a), values(&b));
    }

    // The wrong backbone is refused, naming the manifest.
    let e = load_composed(&out, backbone(2)).err().unwrap().to_string();
    assert!(
        e.contains("model.json") && e.contains("different backbone"),
        "{e}"
    );
    // An expert file changed after composing is caught.
    let inside = out.join("experts").join("code.expert.safetensors");
    std::fs::copy(&math, &inside).unwrap();
    let e = load_composed(&out, backbone(1)).err().unwrap().to_string();
    assert!(e.contains("SHA-256"), "{e}");
    // Not a composed folder.
    let e = load_composed(tmp.path(), backbone(1))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("mode compose"), "{e}");

    // Two experts for one domain.
    let opts = ComposeOptions {
        freeze_experts: false,
        gate_init: GateInit::Fresh,
        gate_init_backbone_prob: 0.8,
        keep_backbone_prior: false,
        gate_lr_scale: 1.0,
        gate_input: None,
        train: cfg(1),
    };
    let e = compose(
        backbone(1),
        "tiny",
        &fingerprint(),
        load(&[&code, &code]),
        &data,
        &opts,
        &tmp.path().join("dup"),
        |_| true,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("distinct domains"), "{e}");
    // An expert trained on another backbone.
    let e = compose(
        backbone(3),
        "tiny",
        &fingerprint(),
        load(&[&code]),
        &data,
        &opts,
        &tmp.path().join("other"),
        |_| true,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("different backbone"), "{e}");
}

#[test]
fn stage1_gates_merge_into_one_gate() {
    let dev = Device::Cpu;
    let gate = |w: &[f32], b: &[f32]| Gate {
        weight: Tensor::from_slice(w, (2, 2), &dev).unwrap(),
        bias: Tensor::from_slice(b, 2, &dev).unwrap(),
        input: GateInput::Raw,
    };
    let a = gate(&[1.0, 2.0, 3.0, 4.0], &[0.5, -0.5]);
    let b = gate(&[3.0, 0.0, -1.0, 1.0], &[1.5, 2.0]);
    // One expert: the gate itself.
    for keep in [false, true] {
        let one = Gate::from_stage1(&[&a], keep).unwrap();
        assert_eq!(values(&one.weight), values(&a.weight));
        assert_eq!(values(&one.bias), values(&a.bias));
    }
    // Two: the backbone row is the mean, each expert keeps its own row.
    let two = Gate::from_stage1(&[&a, &b], false).unwrap();
    assert_eq!(values(&two.weight), [2.0, 1.0, 3.0, 4.0, -1.0, 1.0]);
    assert_eq!(values(&two.bias), [1.0, -0.5, 2.0]);
    // Keeping the prior adds ln 2 to the backbone's bias only.
    let kept = Gate::from_stage1(&[&a, &b], true).unwrap();
    assert_eq!(values(&kept.weight), values(&two.weight));
    let bias = values(&kept.bias);
    assert!((bias[0] - (1.0 + 2f32.ln())).abs() < 1e-6 && bias[1..] == [-0.5, 2.0]);
    // A gate that is not a stage-1 gate is refused.
    assert!(Gate::from_stage1(&[&two], false).is_err());
}

#[test]
fn gates_on_the_normalised_input_compose_and_never_mix_with_raw_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let code_text = |i: usize| "def f(x): return x\n".repeat(3 + i);
    let math_text = |i: usize| format!("{i} * 2 = {}\n", 2 * i).repeat(5);
    let code = expert_reading(
        tmp.path(),
        "code",
        prepared(tmp.path(), "code", code_text),
        GateInput::Normalized,
    );
    let math = expert_reading(
        tmp.path(),
        "math",
        prepared(tmp.path(), "math", math_text),
        GateInput::Normalized,
    );
    let raw_dir = tmp.path().join("raw");
    std::fs::create_dir_all(&raw_dir).unwrap();
    let raw_math = expert(&raw_dir, "math", prepared(&raw_dir, "math", math_text));
    let data = mix(tmp.path());
    let run = |files: &[&PathBuf], init: GateInit, input: Option<GateInput>, out: &str| {
        let opts = ComposeOptions {
            freeze_experts: true,
            gate_init: init,
            gate_init_backbone_prob: 0.8,
            keep_backbone_prior: false,
            gate_lr_scale: 1.0,
            gate_input: input,
            train: cfg(2),
        };
        compose(
            backbone(1),
            "tiny",
            &fingerprint(),
            load(files),
            &data,
            &opts,
            &tmp.path().join(out),
            |_| true,
        )
        .map(|(m, _)| m.unwrap())
        .map_err(|e| e.to_string())
    };
    // From stage 1: the composed gates read what the experts' gates read, and say so.
    let m = run(&[&code, &math], GateInit::Stage1, None, "norm").unwrap();
    assert_eq!((m.gate_input, m.format_version), (GateInput::Normalized, 2));
    let (model, _) = load_composed(&tmp.path().join("norm"), backbone(1)).unwrap();
    assert!(model.gates.iter().all(|g| g.input == GateInput::Normalized));
    // Another input needs fresh gates.
    let e = run(&[&code, &math], GateInit::Stage1, Some(GateInput::Raw), "a").unwrap_err();
    assert!(e.contains("--gate-init fresh"), "{e}");
    let m = run(&[&code, &math], GateInit::Fresh, Some(GateInput::Raw), "b").unwrap();
    assert_eq!((m.gate_input, m.format_version), (GateInput::Raw, 1));
    // Experts whose gates read different inputs: only fresh gates with a stated input.
    let e = run(&[&code, &raw_math], GateInit::Stage1, None, "c").unwrap_err();
    assert!(e.contains("raw") && e.contains("normalized"), "{e}");
    let e = run(&[&code, &raw_math], GateInit::Fresh, None, "d").unwrap_err();
    assert!(e.contains("--gate-input"), "{e}");
    let m = run(
        &[&code, &raw_math],
        GateInit::Fresh,
        Some(GateInput::Normalized),
        "e",
    )
    .unwrap();
    assert_eq!(m.gate_input, GateInput::Normalized);
}
