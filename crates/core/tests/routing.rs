//! Routing at inference on tiny random models: experts chosen per request, sparse gating, and
//! experts added to and removed from a running model.

mod common;

use candle_core::{Device, Tensor};
use common::{ids, max_diff, meta};
use mode_core::{BlockLayout, Expert, ExpertFile, ExpertInit, Gate, GateInput, ModeModel, Routing};
use mode_model::{Backbone, CausalLm};

fn backbone() -> Backbone {
    common::backbone(11)
}

fn layout() -> BlockLayout {
    BlockLayout::even(4, 2, 1).unwrap()
}

/// `blocks` gates over `experts` experts with random weights, so that every token mixes
/// differently.
fn random_gates(hidden: usize, experts: usize, blocks: usize, seed: u64) -> Vec<Gate> {
    (0..blocks)
        .map(|b| {
            let dev = &Device::Cpu;
            let w = Tensor::randn(0f32, 0.5, (experts + 1, hidden), dev).unwrap();
            let bias = Tensor::new(
                &(0..=experts)
                    .map(|j| ((seed + b as u64 + j as u64) % 3) as f32 * 0.3)
                    .collect::<Vec<_>>()[..],
                dev,
            )
            .unwrap();
            Gate {
                weight: w,
                bias,
                input: GateInput::Raw,
            }
        })
        .collect()
}

/// A stage-1 expert file named `domain` with `layout`, saved under `dir`.
fn expert_file_with_layout(
    bb: &Backbone,
    domain: &str,
    seed: u64,
    dir: &std::path::Path,
    layout: &BlockLayout,
) -> std::path::PathBuf {
    let expert = Expert::new(domain, bb, layout, ExpertInit::Random, seed).unwrap();
    let gates = random_gates(bb.config.hidden_size, 1, layout.num_blocks(), seed);
    let path = dir.join(format!("{domain}.expert.safetensors"));
    ExpertFile::from_expert(meta(bb, layout, domain), &expert, &gates)
        .save(&path)
        .unwrap();
    path
}

/// A stage-1 expert file named `domain` with the tests' 2-block layout.
fn expert_file(
    bb: &Backbone,
    domain: &str,
    seed: u64,
    dir: &std::path::Path,
) -> std::path::PathBuf {
    expert_file_with_layout(bb, domain, seed, dir, &layout())
}

fn add(m: &mut ModeModel, path: &std::path::Path) -> String {
    let fp = m.backbone.fingerprint().unwrap();
    let file = ExpertFile::load(path, &Device::Cpu).unwrap();
    m.add_expert_file(&file, path, &fp, None).unwrap()
}

fn hidden(m: &dyn CausalLm) -> Tensor {
    m.hidden_states(&ids(), None).unwrap()
}

fn routing(experts: Option<Vec<usize>>, top_k: Option<usize>, threshold: Option<f64>) -> Routing {
    Routing {
        experts,
        top_k,
        threshold,
    }
}

#[test]
fn a_bare_model_and_a_model_routed_to_no_expert_are_the_backbone_exactly() {
    let reference = hidden(&backbone());
    let bare = ModeModel::bare(backbone()).unwrap();
    assert_eq!(max_diff(&reference, &hidden(&bare)), 0.0);

    let dir = tempfile::tempdir().unwrap();
    let mut m = ModeModel::bare(backbone()).unwrap();
    let f = expert_file(&m.backbone, "code", 1, dir.path());
    add(&mut m, &f);
    let f = expert_file(&m.backbone, "math", 2, dir.path());
    add(&mut m, &f);
    assert!(
        max_diff(&reference, &hidden(&m)) > 1e-3,
        "experts change the output"
    );
    for r in [
        routing(Some(vec![]), None, None),
        routing(None, Some(0), None),
        routing(None, None, Some(0.999)),
    ] {
        let routed = m.routed(r.clone()).unwrap();
        assert_eq!(max_diff(&reference, &hidden(&routed)), 0.0, "{r:?}");
    }
    // Dense routing is the model as trained.
    let dense = m.routed(Routing::default()).unwrap();
    assert_eq!(max_diff(&hidden(&m), &hidden(&dense)), 0.0);
}

#[test]
fn an_added_expert_keeps_its_stage1_odds_against_the_backbone() {
    let dir = tempfile::tempdir().unwrap();
    let bb = backbone();
    let code = expert_file(&bb, "code", 1, dir.path());
    let math = expert_file(&bb, "math", 2, dir.path());

    // The math expert alone, as stage 1 trained it.
    let mut alone = ModeModel::bare(backbone()).unwrap();
    add(&mut alone, &math);
    let stage1 = hidden(&alone);

    // Added after the code expert and routed to math only, it mixes exactly as in stage 1.
    let mut both = ModeModel::bare(bb).unwrap();
    assert_eq!(add(&mut both, &code), "code");
    assert_eq!(add(&mut both, &math), "math");
    assert_eq!(both.expert_names(), vec!["code", "math"]);
    let only_math = both.expert_indices(&["math".to_string()]).unwrap();
    let routed = both.routed(routing(Some(only_math), None, None)).unwrap();
    assert!(max_diff(&stage1, &hidden(&routed)) < 1e-5);
    drop(routed);

    // Removing math gives back the code-only model exactly.
    let mut code_only = ModeModel::bare(backbone()).unwrap();
    add(&mut code_only, &code);
    both.remove_expert("math").unwrap();
    assert_eq!(max_diff(&hidden(&code_only), &hidden(&both)), 0.0);
    assert_eq!(both.gates[0].num_branches(), 2);

    // Errors: a duplicate name, an unknown name, another backbone, another layout.
    let file = ExpertFile::load(&code, &Device::Cpu).unwrap();
    let fp = both.backbone.fingerprint().unwrap();
    let e = both
        .add_expert_file(&file, &code, &fp, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already has an expert `code`"), "{e}");
    let e = both.remove_expert("poetry").err().unwrap().to_string();
    assert!(
        e.contains("no expert `poetry`") && e.contains("code"),
        "{e}"
    );
    let e = both
        .add_expert_file(&file, &code, "0000", Some("other"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("different backbone"), "{e}");
    let wide = BlockLayout::even(4, 4, 1).unwrap();
    let wide = expert_file_with_layout(&both.backbone, "wide", 9, dir.path(), &wide);
    let file = ExpertFile::load(&wide, &Device::Cpu).unwrap();
    let e = both
        .add_expert_file(&file, &wide, &fp, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("layout"), "{e}");
    assert_eq!(
        both.expert_names(),
        vec!["code"],
        "failed adds change nothing"
    );
}

#[test]
fn top_k_routing_decodes_with_a_cache_and_records_the_weights_it_used() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = ModeModel::bare(backbone()).unwrap();
    let f = expert_file(&m.backbone, "code", 1, dir.path());
    add(&mut m, &f);
    let f = expert_file(&m.backbone, "math", 2, dir.path());
    add(&mut m, &f);
    let top1 = routing(None, Some(1), None);

    let mut trace = Vec::new();
    let full = m
        .forward_routed(&ids(), None, &top1, Some(&mut trace))
        .unwrap();
    assert_eq!(trace.len(), 2);
    for probs in &trace {
        assert_eq!(probs.dims(), &[1, 8, 3]);
        for token in probs.squeeze(0).unwrap().to_vec2::<f32>().unwrap() {
            let sum: f32 = token.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5);
            assert!(token[0] > 0.0);
            assert!(
                token[1] == 0.0 || token[2] == 0.0,
                "one expert per token: {token:?}"
            );
        }
    }
    // Sparse routing changes the output, but less than dropping the experts does.
    let dense = hidden(&m);
    let none = hidden(&m.routed(routing(Some(vec![]), None, None)).unwrap());
    assert!(max_diff(&dense, &full) > 0.0);
    assert!(max_diff(&dense, &full) < max_diff(&dense, &none));

    // Token by token with a cache. The first token sees no skipped positions, so it matches the
    // full pass; later ones may differ where an expert skipped earlier tokens, but stay finite.
    let decode = |r: Routing| {
        let routed = m.routed(r).unwrap();
        let mut cache = routed.new_cache();
        let steps: Vec<Tensor> = (0..8)
            .map(|i| {
                let step = ids().narrow(1, i, 1).unwrap();
                routed.hidden_states(&step, Some(&mut cache)).unwrap()
            })
            .collect();
        Tensor::cat(&steps, 1).unwrap()
    };
    let sparse = decode(top1.clone());
    assert!(
        max_diff(
            &sparse.narrow(1, 0, 1).unwrap(),
            &full.narrow(1, 0, 1).unwrap()
        ) < 1e-5
    );
    assert!(sparse
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .is_finite());
    // Dense routing decodes exactly as the full pass.
    assert!(max_diff(&decode(Routing::default()), &dense) < 1e-4);

    // An out-of-range expert or threshold is refused.
    assert!(m.routed(routing(Some(vec![2]), None, None)).is_err());
    assert!(m.routed(routing(None, None, Some(1.5))).is_err());
}
