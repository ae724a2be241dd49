//! Gates on the normalised block input (`--gate-input normalized`): the inference forward and
//! the training engine agree, the normalisation changes the mix (and only the scale of each
//! token's input is thrown away), expert files and composed models keep what their gates read,
//! and gates that read different inputs are never combined.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{backbone, ids, max_diff, meta, random_gates};
use mode_core::{
    BlockLayout, Expert, ExpertFile, ExpertInit, Gate, GateInput, LoadedExpertFile, ModeModel,
};
use mode_model::CausalLm;

/// A model over backbone `seed` with two random experts and random gates reading `input`.
fn model(seed: u64, input: GateInput) -> ModeModel {
    let bb = backbone(seed);
    let layout = BlockLayout::even(4, 2, 2).unwrap();
    let experts = (0..2)
        .map(|j| Expert::new(&format!("e{j}"), &bb, &layout, ExpertInit::Random, j).unwrap())
        .collect();
    let gates = random_gates(bb.config.hidden_size, 2, seed)
        .into_iter()
        .map(|g| g.reading(input))
        .collect();
    ModeModel::new(bb, layout, experts, gates).unwrap()
}

fn logits(m: &ModeModel) -> Tensor {
    m.logits(&m.hidden_states(&ids(), None).unwrap()).unwrap()
}

#[test]
fn inference_and_engine_agree_and_the_normalisation_changes_the_mix() {
    let m = model(3, GateInput::Normalized);
    let inference = logits(&m);
    let engine = mode_engine::model::logits(&m.backbone, &m.plan(true, true), &ids()).unwrap();
    let diff = max_diff(&inference, &engine);
    assert!(diff < 1e-5, "normalised gates: logits differ by {diff}");
    // The same weights on the raw input mix differently.
    let raw = logits(&model(3, GateInput::Raw));
    assert!(max_diff(&inference, &raw) > 1e-3);
}

#[test]
fn a_normalised_gate_ignores_the_scale_of_its_input() {
    let x = Tensor::randn(0f32, 3.0, (5, 16), &Device::Cpu).unwrap();
    let (u, rstd) = mode_engine::ops::gate_input(&x, true).unwrap();
    let (u10, _) = mode_engine::ops::gate_input(&(&x * 10.0).unwrap(), true).unwrap();
    assert!(max_diff(&u, &u10) < 1e-5);
    assert!(rstd.is_some());
    // Every row has unit RMS.
    let ms: Vec<f32> = u.sqr().unwrap().mean(1).unwrap().to_vec1().unwrap();
    assert!(ms.iter().all(|m| (m - 1.0).abs() < 1e-4), "{ms:?}");
    // Raw: the input itself.
    let (same, none) = mode_engine::ops::gate_input(&x, false).unwrap();
    assert_eq!(max_diff(&same, &x), 0.0);
    assert!(none.is_none());
}

/// Writes an expert of backbone `seed` whose stage-1 gates read `input`; returns its path.
fn expert_file(
    dir: &std::path::Path,
    domain: &str,
    seed: u64,
    input: GateInput,
) -> std::path::PathBuf {
    let bb = backbone(seed);
    let layout = BlockLayout::even(4, 2, 2).unwrap();
    let expert = Expert::new(domain, &bb, &layout, ExpertInit::Random, seed + 7).unwrap();
    let gates = random_gates(bb.config.hidden_size, 1, seed + 11)
        .into_iter()
        .map(|g| g.reading(input))
        .collect::<Vec<_>>();
    let path = dir.join(format!("{domain}.expert.safetensors"));
    ExpertFile::from_expert(meta(&bb, &layout, domain), &expert, &gates)
        .save(&path)
        .unwrap();
    path
}

#[test]
fn expert_files_keep_what_their_gates_read_and_its_format_version() {
    let dir = tempfile::tempdir().unwrap();
    for (input, version) in [(GateInput::Raw, 1), (GateInput::Normalized, 3)] {
        let path = expert_file(dir.path(), input.name(), 5, input);
        let loaded = ExpertFile::load(&path, &Device::Cpu).unwrap();
        assert_eq!(
            (loaded.meta.gate_input, loaded.meta.format_version),
            (input, version)
        );
        assert!(loaded
            .gates(&path)
            .unwrap()
            .iter()
            .all(|g| g.input == input));
        // A raw file's header says nothing new: earlier tools read it as before.
        let json = serde_json::to_string(&loaded.meta).unwrap();
        assert_eq!(json.contains("gate_input"), input != GateInput::Raw);
    }
}

#[test]
fn hot_added_experts_must_read_what_the_model_reads() {
    let dir = tempfile::tempdir().unwrap();
    let norm_a = expert_file(dir.path(), "a", 9, GateInput::Normalized);
    let norm_b = expert_file(dir.path(), "b", 9, GateInput::Normalized);
    let raw_c = expert_file(dir.path(), "c", 9, GateInput::Raw);
    let mut m = ModeModel::bare(backbone(9)).unwrap();
    let fp = m.backbone.fingerprint().unwrap();
    let add = |m: &mut ModeModel, p: &std::path::Path| {
        let f = ExpertFile::load(p, &Device::Cpu).unwrap();
        m.add_expert_file(&f, p, &fp, None)
    };
    // The first expert brings its gates' input; the second joins them.
    add(&mut m, &norm_a).unwrap();
    add(&mut m, &norm_b).unwrap();
    assert!(m.gates.iter().all(|g| g.input == GateInput::Normalized));
    let before = logits(&m);
    let err = add(&mut m, &raw_c).unwrap_err().to_string();
    assert!(err.contains("raw") && err.contains("normalized"), "{err}");
    assert_eq!(m.expert_names(), ["a", "b"]);
    assert_eq!(max_diff(&before, &logits(&m)), 0.0);
    // The hot-added pair equals the two experts with their stage-1 log-odds, on the
    // normalised input: the engine agrees with the inference forward on it too.
    let engine = mode_engine::model::logits(&m.backbone, &m.plan(false, false), &ids()).unwrap();
    assert!(max_diff(&before, &engine) < 1e-5);
}

#[test]
fn stage1_gates_reading_different_inputs_are_not_combined() {
    let hidden = 8;
    let raw = Gate::new(hidden, 1, 0.9, DType::F32, &Device::Cpu).unwrap();
    let norm = Gate::new(hidden, 1, 0.9, DType::F32, &Device::Cpu)
        .unwrap()
        .reading(GateInput::Normalized);
    let err = match Gate::from_stage1(&[&raw, &norm], false) {
        Ok(_) => panic!("gates on different inputs were combined"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("different inputs"), "{err}");
    let both = Gate::from_stage1(&[&norm, &norm], true).unwrap();
    assert_eq!(both.input, GateInput::Normalized);
}

#[test]
fn composed_models_keep_what_their_gates_read() {
    let dir = tempfile::tempdir().unwrap();
    for input in [GateInput::Raw, GateInput::Normalized] {
        let sub = dir.path().join(input.name());
        std::fs::create_dir_all(&sub).unwrap();
        let files: Vec<LoadedExpertFile> = ["math", "code"]
            .iter()
            .map(|d| LoadedExpertFile::load(&expert_file(&sub, d, 4, input), &Device::Cpu).unwrap())
            .collect();
        let bb = backbone(4);
        let fp = bb.fingerprint().unwrap();
        let mut m = ModeModel::bare(bb).unwrap();
        for f in &files {
            m.add_expert_file(&f.file, &f.path, &fp, None).unwrap();
        }
        let manifest = mode_core::ComposedManifest {
            format_version: 0,
            kind: "mode".into(),
            backbone_source: "test".into(),
            backbone_fingerprint: fp.clone(),
            layout: m.layout.clone(),
            dims: mode_core::file::ExpertDims::of(&m.backbone.config),
            experts: Vec::new(),
            gates_file: String::new(),
            gate_init: "stage1".into(),
            training: Default::default(),
            tool_version: "test".into(),
            gate_input: GateInput::Raw,
        };
        let out = sub.join("model");
        let saved = mode_core::save_composed(&out, &manifest, &m, &files, false).unwrap();
        let version = match input {
            GateInput::Raw => 1,
            GateInput::Normalized => 2,
        };
        assert_eq!((saved.gate_input, saved.format_version), (input, version));
        let (loaded, _) = mode_core::load_composed(&out, backbone(4)).unwrap();
        assert!(loaded.gates.iter().all(|g| g.input == input));
        assert_eq!(max_diff(&logits(&m), &logits(&loaded)), 0.0);
    }
}
