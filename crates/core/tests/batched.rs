//! A batched decode step (`ModeModel::decode_step`, what the server runs) gives every sequence
//! what it gets decoded alone: on tiny random backbones of every architecture, with two experts
//! (one of each form) and random gates, sequences of different lengths, each under its own
//! routing (dense, backbone alone, one expert, top-1, a threshold), joining the batch at
//! different steps, decode the same greedy tokens with the same logits.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{max_diff, random_gates};
use mode_core::{BlockLayout, Expert, ExpertForm, ExpertInit, ModeModel, Routing};
use mode_model::{Architecture, Backbone, CausalLm, Config, KvCache};

fn model(arch: Architecture) -> ModeModel {
    let mut config = Config::tiny(arch);
    config.num_hidden_layers = 4;
    let bb = Backbone::random(config, 5, DType::F32, &Device::Cpu).unwrap();
    let layout = BlockLayout::even(4, 2, 2).unwrap();
    let experts = [ExpertForm::Residual, ExpertForm::Replace]
        .into_iter()
        .enumerate()
        .map(|(j, form)| {
            let mut e = Expert::new(
                &format!("e{j}"),
                &bb,
                &layout,
                ExpertInit::Random,
                50 + j as u64,
            )
            .unwrap();
            e.form = form;
            e
        })
        .collect();
    let gates = random_gates(bb.config.hidden_size, 2, 7);
    ModeModel::new(bb, layout, experts, gates).unwrap()
}

fn routings() -> Vec<Routing> {
    let r = |experts: Option<Vec<usize>>, top_k, threshold| Routing {
        experts,
        top_k,
        threshold,
    };
    vec![
        r(None, None, None),
        r(Some(vec![]), None, None),
        r(Some(vec![0]), None, None),
        r(Some(vec![1]), None, None),
        r(None, Some(1), None),
        r(None, None, Some(0.4)),
    ]
}

fn prompt(k: usize) -> Vec<u32> {
    (0..[3, 7, 1, 5, 9, 6][k])
        .map(|i| ((k * 37 + i * 11) % 250) as u32)
        .collect()
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Prefills `prompt` into a fresh cache; the last position's logits.
fn prefill(m: &ModeModel, prompt: &[u32], routing: &Routing, cache: &mut KvCache) -> Tensor {
    let ids = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let h = m.forward_routed(&ids, Some(cache), routing, None).unwrap();
    let t = prompt.len();
    m.logits(&h.i((0, t - 1, ..)).unwrap()).unwrap()
}

const STEPS: usize = 8;

/// Greedy decoding of sequence `k` alone: the logits of every step.
fn solo(m: &ModeModel, k: usize, routing: &Routing) -> Vec<Tensor> {
    let mut cache = m.new_cache();
    let mut logits = prefill(m, &prompt(k), routing, &mut cache);
    let mut out = vec![logits.clone()];
    for _ in 0..STEPS {
        let next = argmax(&logits.to_vec1::<f32>().unwrap());
        let ids = Tensor::new(&[[next]], &Device::Cpu).unwrap();
        let h = m
            .forward_routed(&ids, Some(&mut cache), routing, None)
            .unwrap();
        logits = m.logits(&h.i((0, 0, ..)).unwrap()).unwrap();
        out.push(logits.clone());
    }
    out
}

#[test]
fn a_batched_decode_step_gives_each_sequence_its_solo_tokens() {
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Gemma3,
    ] {
        let m = model(arch);
        let routings = routings();
        let n = routings.len();
        let expected: Vec<Vec<Tensor>> = (0..n).map(|k| solo(&m, k, &routings[k])).collect();

        // Sequence k joins at step k, so rows differ in length and the batch changes size.
        let mut caches: Vec<KvCache> = (0..n).map(|_| m.new_cache()).collect();
        let mut logits: Vec<Vec<Tensor>> = vec![Vec::new(); n];
        for step in 0..n + STEPS {
            if step < n {
                logits[step].push(prefill(
                    &m,
                    &prompt(step),
                    &routings[step],
                    &mut caches[step],
                ));
            }
            let active: Vec<usize> = (0..n)
                .filter(|&k| !logits[k].is_empty() && logits[k].len() <= STEPS)
                .collect();
            if active.is_empty() {
                continue;
            }
            let tokens: Vec<u32> = active
                .iter()
                .map(|&k| argmax(&logits[k].last().unwrap().to_vec1::<f32>().unwrap()))
                .collect();
            let rows: Vec<&Routing> = active.iter().map(|&k| &routings[k]).collect();
            let mut row_caches: Vec<&mut KvCache> = caches
                .iter_mut()
                .enumerate()
                .filter(|(k, _)| active.contains(k))
                .map(|(_, c)| c)
                .collect();
            let out = m.decode_step(&tokens, &mut row_caches, &rows).unwrap();
            assert_eq!(out.dims(), [active.len(), m.backbone.config.vocab_size]);
            for (r, &k) in active.iter().enumerate() {
                logits[k].push(out.i(r).unwrap());
            }
        }
        for k in 0..n {
            assert_eq!(logits[k].len(), STEPS + 1);
            for (step, (got, want)) in logits[k].iter().zip(&expected[k]).enumerate() {
                let diff = max_diff(got, want);
                assert!(
                    diff < 1e-4,
                    "{arch:?} sequence {k} step {step}: logits differ by {diff}"
                );
                let (g, w) = (
                    got.to_vec1::<f32>().unwrap(),
                    want.to_vec1::<f32>().unwrap(),
                );
                assert_eq!(argmax(&g), argmax(&w), "{arch:?} sequence {k} step {step}");
            }
        }
        // The routings matter: the sequences' first logits are not all the same model's.
        let a = solo(&m, 1, &routings[0]);
        let b = solo(&m, 1, &routings[1]);
        assert!(
            max_diff(&a[1], &b[1]) > 1e-3,
            "{arch:?}: routing changed nothing"
        );
    }
}

#[test]
fn a_decode_step_refuses_mismatched_rows() {
    let m = model(Architecture::Llama);
    let mut c = m.new_cache();
    let dense = Routing::default();
    let err = m
        .decode_step(&[1, 2], &mut [&mut c], &[&dense])
        .unwrap_err()
        .to_string();
    assert!(err.contains("one cache and one routing per token"), "{err}");
    let bad = Routing {
        experts: Some(vec![5]),
        ..Routing::default()
    };
    assert!(m.decode_step(&[1], &mut [&mut c], &[&bad]).is_err());
}
