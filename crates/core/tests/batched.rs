//! A packed step (`ModeModel::step_packed`, what the server runs) gives every sequence what it
//! gets alone: on tiny random backbones of every architecture, with two experts (one of each
//! form) and random gates, sequences of different lengths, each under its own routing (dense,
//! backbone alone, one expert, top-1, a threshold), joining the batch at different steps and
//! reading their prompts in chunks beside the others' decoding, get the same logits and decode
//! the same greedy tokens.

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
            // The server runs experts loaded from files, packed; keep one of each kind.
            if j == 0 {
                e.pack_for_inference().unwrap();
            }
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

/// Reads `prompt` into a fresh cache, CHUNK tokens a forward, as the server reads a prompt
/// (under sparse routing an expert's cache holds the positions of the chunks it ran on, so the
/// chunking is part of what a sequence computes); the last position's logits.
fn prefill(m: &ModeModel, prompt: &[u32], routing: &Routing, cache: &mut KvCache) -> Tensor {
    let mut h = None;
    for chunk in prompt.chunks(CHUNK) {
        let ids = Tensor::new(chunk, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        h = Some(m.forward_routed(&ids, Some(cache), routing, None).unwrap());
    }
    let h = h.expect("a prompt has tokens");
    let t = h.dims()[1];
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

/// Prompt tokens a sequence reads per packed step: prompts take several steps, beside the
/// other sequences' decoding.
const CHUNK: usize = 4;

#[test]
fn a_packed_step_gives_each_sequence_its_solo_tokens() {
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

        // Sequence k joins at step k and reads its prompt CHUNK tokens a step, packed with the
        // sequences already decoding: rows differ in length and the batch changes size.
        let mut caches: Vec<KvCache> = (0..n).map(|_| m.new_cache()).collect();
        let mut read = vec![0; n];
        let mut logits: Vec<Vec<Tensor>> = vec![Vec::new(); n];
        let mut packed_prompts = 0;
        for step in 0..3 * n + STEPS {
            let active: Vec<usize> = (0..n.min(step + 1))
                .filter(|&k| logits[k].len() <= STEPS)
                .collect();
            if active.is_empty() {
                continue;
            }
            let chunks: Vec<Vec<u32>> = active
                .iter()
                .map(|&k| match logits[k].last() {
                    Some(l) => vec![argmax(&l.to_vec1::<f32>().unwrap())],
                    None => {
                        let p = prompt(k);
                        p[read[k]..p.len().min(read[k] + CHUNK)].to_vec()
                    }
                })
                .collect();
            if chunks.iter().filter(|c| c.len() > 1).count() > 0 && active.len() > 1 {
                packed_prompts += 1;
            }
            let rows: Vec<&Routing> = active.iter().map(|&k| &routings[k]).collect();
            let mut row_caches: Vec<&mut KvCache> = caches
                .iter_mut()
                .enumerate()
                .filter(|(k, _)| active.contains(k))
                .map(|(_, c)| c)
                .collect();
            let chunk_refs: Vec<&[u32]> = chunks.iter().map(|c| c.as_slice()).collect();
            let out = m.step_packed(&chunk_refs, &mut row_caches, &rows).unwrap();
            assert_eq!(out.dims(), [active.len(), m.backbone.config.vocab_size]);
            for (r, &k) in active.iter().enumerate() {
                if logits[k].is_empty() {
                    read[k] += chunks[r].len();
                    if read[k] < prompt(k).len() {
                        continue;
                    }
                }
                logits[k].push(out.i(r).unwrap());
            }
        }
        assert!(
            packed_prompts > 2,
            "{arch:?}: prompts were never packed with other rows"
        );
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
fn a_packed_step_refuses_mismatched_rows() {
    let m = model(Architecture::Llama);
    let mut c = m.new_cache();
    let dense = Routing::default();
    let err = m
        .decode_step(&[1, 2], &mut [&mut c], &[&dense])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("one cache and one routing per sequence"),
        "{err}"
    );
    let err = m
        .step_packed(&[&[]], &mut [&mut c], &[&dense])
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 without tokens"), "{err}");
    let bad = Routing {
        experts: Some(vec![5]),
        ..Routing::default()
    };
    assert!(m.decode_step(&[1], &mut [&mut c], &[&bad]).is_err());
}
