//! Residual experts (`B(x) + L(x) - x`) and the function-preserving start on tiny random
//! backbones: step 0 is the backbone whatever the gates say, the inference forward and the
//! training engine agree on the loss for any mix of forms, cached decoding matches, and expert
//! files keep the form.

use candle_core::{DType, Device, Tensor, D};
mod common;

use common::{backbone, ids, max_diff, meta, random_gates};
use mode_core::{BlockLayout, Expert, ExpertFile, ExpertForm, ExpertInit, Gate, ModeModel};
use mode_model::CausalLm;

/// A model over backbone `seed` whose experts are `forms`, with random (non-identity) layers
/// and random gates.
fn mixed_model(seed: u64, forms: &[ExpertForm]) -> ModeModel {
    let bb = backbone(seed);
    let layout = BlockLayout::even(4, 2, 2).unwrap();
    let experts = forms
        .iter()
        .enumerate()
        .map(|(j, &form)| {
            let mut e =
                Expert::new(&format!("e{j}"), &bb, &layout, ExpertInit::Random, j as u64).unwrap();
            e.form = form;
            e
        })
        .collect();
    let gates = random_gates(bb.config.hidden_size, forms.len(), seed);
    ModeModel::new(bb, layout, experts, gates).unwrap()
}

#[test]
fn the_preserving_start_is_the_backbone_at_step_0_whatever_the_gates() {
    let bb = backbone(11);
    let reference = backbone(11).forward(&ids(), None).unwrap();
    let layout = BlockLayout::even(4, 2, 2).unwrap();
    let experts: Vec<Expert> = (0..2)
        .map(|j| Expert::new(&format!("e{j}"), &bb, &layout, ExpertInit::Preserve, j).unwrap())
        .collect();
    assert!(experts.iter().all(|e| e.form == ExpertForm::Residual));
    let gates = random_gates(bb.config.hidden_size, 2, 3);
    let m = ModeModel::new(bb, layout.clone(), experts, gates).unwrap();
    let logits = CausalLm::logits(&m, &m.hidden_states(&ids(), None).unwrap()).unwrap();
    let d = max_diff(&logits, &reference);
    assert!(d < 1e-5, "step-0 logits differ from the backbone's by {d}");
    // The copy start of one layer of each two-layer block is not the backbone at step 0: the
    // check above can fail.
    let bb = backbone(11);
    let layout = BlockLayout::even(4, 2, 1).unwrap();
    let copy = Expert::new("c", &bb, &layout, ExpertInit::Copy, 0).unwrap();
    let gates = random_gates(bb.config.hidden_size, 1, 3);
    let m = ModeModel::new(bb, layout, vec![copy], gates).unwrap();
    let logits = CausalLm::logits(&m, &m.hidden_states(&ids(), None).unwrap()).unwrap();
    assert!(max_diff(&logits, &reference) > 1e-3);
}

#[test]
fn gates_forced_to_the_backbone_reproduce_it_with_residual_experts() {
    let mut m = mixed_model(12, &[ExpertForm::Residual, ExpertForm::Replace]);
    let reference = backbone(12).forward(&ids(), None).unwrap();
    for g in &mut m.gates {
        g.bias = Tensor::new(&[1e4f32, -1e4, -1e4], &Device::Cpu).unwrap();
    }
    let logits = CausalLm::logits(&m, &m.hidden_states(&ids(), None).unwrap()).unwrap();
    assert!(max_diff(&logits, &reference) < 1e-5);
}

/// Mean next-token cross-entropy of `logits: [1, t, vocab]` over `ids`.
fn mean_loss(logits: &Tensor, ids: &Tensor) -> f64 {
    let t = ids.dim(1).unwrap();
    let logp = candle_nn::ops::log_softmax(&logits.squeeze(0).unwrap(), D::Minus1).unwrap();
    let tokens: Vec<u32> = ids.flatten_all().unwrap().to_vec1().unwrap();
    let rows: Vec<Vec<f32>> = logp.to_vec2().unwrap();
    -(0..t - 1)
        .map(|i| rows[i][tokens[i + 1] as usize] as f64)
        .sum::<f64>()
        / (t - 1) as f64
}

#[test]
fn the_training_engine_and_the_inference_forward_agree_for_every_form() {
    for forms in [
        vec![ExpertForm::Replace],
        vec![ExpertForm::Residual],
        vec![ExpertForm::Residual, ExpertForm::Replace],
    ] {
        let m = mixed_model(13, &forms);
        let logits = CausalLm::logits(&m, &m.hidden_states(&ids(), None).unwrap()).unwrap();
        let inference = mean_loss(&logits, &ids());
        let batch = mode_engine::model::Batch::next_token(ids()).unwrap();
        let r = mode_engine::model::loss_and_grads(
            &m.backbone,
            &m.plan(true, true),
            &batch.ids,
            &batch.targets,
        )
        .unwrap();
        let engine = r.loss_sum / r.count as f64;
        assert!(
            (engine - inference).abs() < 1e-4 * inference,
            "{forms:?}: engine {engine}, inference {inference}"
        );
    }
    // The forms differ: the same weights in the other form give another loss.
    let a = mixed_model(13, &[ExpertForm::Replace]);
    let b = mixed_model(13, &[ExpertForm::Residual]);
    let la = mean_loss(
        &CausalLm::logits(&a, &a.hidden_states(&ids(), None).unwrap()).unwrap(),
        &ids(),
    );
    let lb = mean_loss(
        &CausalLm::logits(&b, &b.hidden_states(&ids(), None).unwrap()).unwrap(),
        &ids(),
    );
    assert!((la - lb).abs() > 1e-4, "{la} vs {lb}");
}

#[test]
fn cached_decoding_matches_the_full_forward_with_residual_experts() {
    let m = mixed_model(14, &[ExpertForm::Residual, ExpertForm::Replace]);
    let full = m.hidden_states(&ids(), None).unwrap();
    let mut cache = m.new_cache();
    let tokens: Vec<u32> = ids().flatten_all().unwrap().to_vec1().unwrap();
    let one = |t: &[u32]| Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mut parts = vec![m
        .hidden_states(&one(&tokens[..3]), Some(&mut cache))
        .unwrap()];
    for &t in &tokens[3..] {
        parts.push(m.hidden_states(&one(&[t]), Some(&mut cache)).unwrap());
    }
    let cached = Tensor::cat(&parts, 1).unwrap();
    assert!(max_diff(&full, &cached) < 1e-5);
}

#[test]
fn expert_files_keep_the_form_and_its_format_version() {
    let dir = tempfile::tempdir().unwrap();
    for (form, version) in [(ExpertForm::Replace, 1), (ExpertForm::Residual, 2)] {
        let m = mixed_model(15, &[form]);
        let path = dir.path().join(format!("{form:?}.expert.safetensors"));
        let stage1_gates: Vec<Gate> = (0..2)
            .map(|_| {
                Gate::new(
                    m.backbone.config.hidden_size,
                    1,
                    0.9,
                    DType::F32,
                    &Device::Cpu,
                )
            })
            .collect::<Result<_, _>>()
            .unwrap();
        ExpertFile::from_expert(
            meta(&m.backbone, &m.layout, "code"),
            &m.experts[0],
            &stage1_gates,
        )
        .save(&path)
        .unwrap();
        let loaded = ExpertFile::load(&path, &Device::Cpu).unwrap();
        assert_eq!(
            (loaded.meta.form, loaded.meta.format_version),
            (form, version)
        );
        let expert = loaded.expert(&m.backbone, &path).unwrap();
        assert_eq!(expert.form, form);
        let gates = random_gates(m.backbone.config.hidden_size, 1, 15);
        let m2 = ModeModel::new(backbone(15), m.layout.clone(), vec![expert], gates).unwrap();
        assert_eq!(
            max_diff(
                &m.hidden_states(&ids(), None).unwrap(),
                &m2.hidden_states(&ids(), None).unwrap()
            ),
            0.0
        );
    }
}
