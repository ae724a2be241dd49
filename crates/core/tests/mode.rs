//! The MoDE model on tiny random backbones: forced gates reproduce the backbone exactly, only
//! experts and gates get gradients, cached decoding matches the full forward, expert files round
//! trip and refuse the wrong backbone or layout.

use std::collections::HashSet;

use candle_core::{DType, Device, Tensor};
mod common;

use common::{backbone, ids, max_diff, meta};
use mode_core::file::ExpertDims;
use mode_core::{BlockLayout, Expert, ExpertFile, ExpertInit, Gate, ModeModel};
use mode_model::{random_weights, Architecture, Backbone, CausalLm, Config};

fn mode_model(seed: u64, experts: usize, init: ExpertInit) -> ModeModel {
    let bb = backbone(seed);
    let layout = BlockLayout::even(4, 2, 2).unwrap();
    let experts: Vec<Expert> = (0..experts)
        .map(|j| Expert::new(&format!("e{j}"), &bb, &layout, init, j as u64).unwrap())
        .collect();
    let gates = (0..2)
        .map(|_| {
            Gate::new(
                bb.config.hidden_size,
                experts.len(),
                mode_core::expert::GATE_INIT_BACKBONE_PROB,
                DType::F32,
                &Device::Cpu,
            )
            .unwrap()
        })
        .collect();
    ModeModel::new(bb, layout, experts, gates).unwrap()
}

#[test]
fn gates_forced_to_the_backbone_reproduce_it_exactly() {
    let mut m = mode_model(1, 2, ExpertInit::Random);
    let reference = backbone(1).forward(&ids(), None).unwrap();
    for g in &mut m.gates {
        g.bias = Tensor::new(&[1e4f32, -1e4, -1e4], &Device::Cpu).unwrap();
    }
    let hidden = m.hidden_states(&ids(), None).unwrap();
    let logits = CausalLm::logits(&m, &hidden).unwrap();
    assert_eq!(max_diff(&logits, &reference), 0.0);
    let (means, n) = m.take_gate_stats();
    assert_eq!(n, 8);
    assert!((means[0][0] - 1.0).abs() < 1e-12);
}

#[test]
fn fresh_gates_favour_the_backbone_and_experts_change_the_output() {
    let m = mode_model(2, 1, ExpertInit::Random);
    let reference = backbone(2).forward(&ids(), None).unwrap();
    let hidden = m.hidden_states(&ids(), None).unwrap();
    let logits = CausalLm::logits(&m, &hidden).unwrap();
    assert!(max_diff(&logits, &reference) > 0.0);
    let (means, _) = m.take_gate_stats();
    for block in means {
        assert!(
            (block[0] - mode_core::expert::GATE_INIT_BACKBONE_PROB).abs() < 1e-6,
            "{block:?}"
        );
    }
}

#[test]
fn cached_decoding_matches_the_full_forward() {
    let m = mode_model(3, 2, ExpertInit::Copy);
    let full = m.hidden_states(&ids(), None).unwrap();
    let mut cache = m.new_cache();
    let tokens: Vec<u32> = ids().flatten_all().unwrap().to_vec1().unwrap();
    let mut parts = vec![m
        .hidden_states(
            &Tensor::new(&tokens[..5], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            Some(&mut cache),
        )
        .unwrap()];
    for &t in &tokens[5..] {
        parts.push(
            m.hidden_states(
                &Tensor::new(&[t], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                Some(&mut cache),
            )
            .unwrap(),
        );
    }
    let cached = Tensor::cat(&parts, 1).unwrap();
    assert!(max_diff(&full, &cached) < 1e-5);
}

#[test]
fn only_experts_and_gates_get_gradients() {
    let m = mode_model(4, 2, ExpertInit::Random);
    let batch = mode_engine::model::Batch::next_token(ids()).unwrap();
    let plan = m.plan(true, true);
    let r =
        mode_engine::model::loss_and_grads(&m.backbone, &plan, &batch.ids, &batch.targets).unwrap();
    let got: HashSet<String> = r.grads.iter().map(|(n, _)| n.clone()).collect();
    let want: HashSet<String> = m
        .trainable_tensors(true, true)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(got, want);
    assert!(got.iter().all(|n| n.starts_with("blocks.")));
    // Experts frozen (stage 2 with --freeze-experts): gates only.
    let r = mode_engine::model::loss_and_grads(
        &m.backbone,
        &m.plan(false, true),
        &batch.ids,
        &batch.targets,
    )
    .unwrap();
    assert!(r.grads.iter().all(|(n, _)| n.contains(".gate.")));
    assert_eq!(r.grads.len(), 4);
}

#[test]
fn expert_files_round_trip_and_refuse_mismatches() {
    let m = mode_model(5, 1, ExpertInit::Random);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("code.expert.safetensors");
    let file = ExpertFile::from_expert(
        meta(&m.backbone, &m.layout, "code"),
        &m.experts[0],
        &m.gates,
    );
    file.save(&path).unwrap();

    let loaded = ExpertFile::load(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.meta, file.meta);
    let fp = m.backbone.fingerprint().unwrap();
    let dims = ExpertDims::of(&m.backbone.config);
    loaded
        .check_compatible(&path, &fp, &dims, Some(&m.layout))
        .unwrap();
    let expert = loaded.expert(&m.backbone, &path).unwrap();
    let gates = loaded.gates(&path).unwrap();
    let before = m.hidden_states(&ids(), None).unwrap();
    let m2 = ModeModel::new(backbone(5), m.layout.clone(), vec![expert], gates).unwrap();
    assert_eq!(
        max_diff(&before, &m2.hidden_states(&ids(), None).unwrap()),
        0.0
    );

    // Another backbone (other weights): refused, naming the file.
    let other = backbone(6).fingerprint().unwrap();
    assert_ne!(other, fp);
    let e = loaded
        .check_compatible(&path, &other, &dims, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("code.expert.safetensors") && e.contains("different backbone"),
        "{e}"
    );
    // Another layout.
    let layout = BlockLayout::even(4, 4, 2).unwrap();
    let e = loaded
        .check_compatible(&path, &fp, &dims, Some(&layout))
        .unwrap_err()
        .to_string();
    assert!(e.contains("layout"), "{e}");
    // Another shape.
    let mut wide = dims.clone();
    wide.intermediate_size += 1;
    assert!(loaded.check_compatible(&path, &fp, &wide, None).is_err());
    // Not an expert file at all.
    let junk = dir.path().join("junk.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([(
            "x".to_string(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        )]),
        &junk,
    )
    .unwrap();
    let e = ExpertFile::load(&junk, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not an expert file"), "{e}");
}

#[test]
fn experts_beside_a_compact_backbone_keep_their_trained_weights() {
    // Rounding the frozen backbone (f16, Q8_0, Q4_1) is a speed choice for the backbone alone:
    // an expert loaded beside it must keep the f32 values it was trained and saved with.
    let m = mode_model(7, 1, ExpertInit::Random);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("math.expert.safetensors");
    ExpertFile::from_expert(
        meta(&m.backbone, &m.layout, "math"),
        &m.experts[0],
        &m.gates,
    )
    .save(&path)
    .unwrap();
    let loaded = ExpertFile::load(&path, &Device::Cpu).unwrap();
    for format in [
        mode_model::compact::BlockFormat::Q8_0,
        mode_model::compact::BlockFormat::Q4_1,
    ] {
        let mut compact = backbone(7);
        compact.quantize(format).unwrap();
        let fp = compact.fingerprint().unwrap();
        let mut served = ModeModel::bare(compact).unwrap();
        assert_eq!(served.gates[0].weight.dtype(), DType::F32, "{format:?}");
        served.add_expert_file(&loaded, &path, &fp, None).unwrap();
        let trained = m.experts[0].named_tensors();
        let kept = served.experts[0].named_tensors();
        assert_eq!(kept.len(), trained.len());
        for ((name, a), (_, b)) in trained.iter().zip(&kept) {
            assert_eq!(b.dtype(), DType::F32, "{format:?} {name}");
            assert_eq!(max_diff(a, b), 0.0, "{format:?} {name}");
        }
    }
}

#[test]
fn fingerprints_are_deterministic_for_the_same_weights() {
    let mut config = Config::tiny(Architecture::Llama);
    config.num_hidden_layers = 2;
    let w = random_weights(&config, 9);
    let a = Backbone::load(config.clone(), &w, DType::F32, &Device::Cpu).unwrap();
    let b = Backbone::load(config.clone(), &w, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(a.fingerprint().unwrap(), b.fingerprint().unwrap());
    // The same weights held in f16 or bf16 are still the same backbone to experts.
    for dtype in [DType::F16, DType::BF16] {
        let c = Backbone::load(config.clone(), &w, dtype, &Device::Cpu).unwrap();
        assert_eq!(
            a.fingerprint().unwrap(),
            c.fingerprint().unwrap(),
            "{dtype:?}"
        );
    }
    let other = Backbone::random(config.clone(), 10, DType::F16, &Device::Cpu).unwrap();
    assert_ne!(a.fingerprint().unwrap(), other.fingerprint().unwrap());
}
