//! Tiny random-weight models of every supported architecture: shapes, causality, KV-cache
//! equivalence, and agreement with a naive f64 reference written independently below.

use candle_core::{DType, Device, IndexOp, Tensor};
use mode_model::{random_weights, Architecture, Backbone, Config, Weights};

const ARCHES: [Architecture; 4] = [
    Architecture::Llama,
    Architecture::Qwen2,
    Architecture::Qwen3,
    Architecture::Gemma3,
];

fn tiny(arch: Architecture, seed: u64) -> (Config, Weights, Backbone) {
    let config = Config::tiny(arch);
    let weights = random_weights(&config, seed);
    let model = Backbone::load(config.clone(), &weights, DType::F32, &Device::Cpu).unwrap();
    (config, weights, model)
}

fn ids(tokens: &[u32]) -> Tensor {
    Tensor::new(tokens, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

const TOKENS: [u32; 12] = [5, 17, 200, 3, 3, 99, 128, 7, 255, 0, 42, 64];

#[test]
fn logits_have_the_expected_shape() {
    for arch in ARCHES {
        let (config, _, model) = tiny(arch, 1);
        let batch = Tensor::new(&[[1u32, 2, 3], [4, 5, 6]], &Device::Cpu).unwrap();
        let logits = model.forward(&batch, None).unwrap();
        assert_eq!(logits.dims(), &[2, 3, config.vocab_size], "{arch:?}");
        let last = model.forward_last(&batch, None).unwrap();
        assert_eq!(last.dims(), &[2, config.vocab_size], "{arch:?}");
        assert!(max_abs_diff(&last, &logits.i((.., 2, ..)).unwrap()) < 1e-5);
    }
}

#[test]
fn future_tokens_do_not_change_past_logits() {
    for arch in ARCHES {
        let (_, _, model) = tiny(arch, 2);
        let a = model.forward(&ids(&TOKENS), None).unwrap();
        let mut changed = TOKENS;
        changed[8] = 11;
        let b = model.forward(&ids(&changed), None).unwrap();
        let prefix = |t: &Tensor| t.i((.., ..8, ..)).unwrap();
        assert!(
            max_abs_diff(&prefix(&a), &prefix(&b)) < 1e-6,
            "{arch:?}: past changed"
        );
        // ... and the change is visible from position 8 on, so the test can fail.
        let rest = |t: &Tensor| t.i((.., 8.., ..)).unwrap();
        assert!(
            max_abs_diff(&rest(&a), &rest(&b)) > 1e-4,
            "{arch:?}: change not seen"
        );
    }
}

#[test]
fn cached_decoding_equals_full_forward() {
    for arch in ARCHES {
        let (_, _, model) = tiny(arch, 3);
        let full = model.forward(&ids(&TOKENS), None).unwrap();
        let mut cache = model.new_cache();
        // Prefill 5 tokens, then 3 one at a time, then a chunk of 4.
        let mut pieces = vec![model.forward(&ids(&TOKENS[..5]), Some(&mut cache)).unwrap()];
        for i in 5..8 {
            pieces.push(
                model
                    .forward(&ids(&TOKENS[i..i + 1]), Some(&mut cache))
                    .unwrap(),
            );
        }
        pieces.push(model.forward(&ids(&TOKENS[8..]), Some(&mut cache)).unwrap());
        assert_eq!(cache.len(), TOKENS.len());
        let cached = Tensor::cat(&pieces, 1).unwrap();
        let diff = max_abs_diff(&full, &cached);
        assert!(diff < 1e-5, "{arch:?}: cached vs full differ by {diff}");
    }
}

#[test]
fn batched_rows_equal_single_rows() {
    for arch in ARCHES {
        let (_, _, model) = tiny(arch, 4);
        let a = &TOKENS[..6];
        let b = &TOKENS[6..];
        let batch = Tensor::new([a, b].concat(), &Device::Cpu)
            .unwrap()
            .reshape((2, 6))
            .unwrap();
        let both = model.forward(&batch, None).unwrap();
        let one = model.forward(&ids(b), None).unwrap();
        assert!(
            max_abs_diff(&both.i(1..2).unwrap(), &one) < 1e-5,
            "{arch:?}"
        );
    }
}

#[test]
fn compact_weights_stay_close_to_f32() {
    let (config, weights, model) = tiny(Architecture::Llama, 5);
    let full = model.forward(&ids(&TOKENS), None).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let compact = Backbone::load(config.clone(), &weights, dtype, &Device::Cpu).unwrap();
        let logits = compact.forward(&ids(&TOKENS), None).unwrap();
        let diff = max_abs_diff(&full, &logits);
        assert!(diff < 2e-2, "{dtype:?}: {diff}");
    }
}

#[test]
fn quantized_weights_stay_close_to_f32_and_batch_like_single_rows() {
    use mode_model::compact::BlockFormat;
    for (format, bound) in [(BlockFormat::Q8_0, 5e-2), (BlockFormat::Q4_1, 0.5)] {
        for arch in ARCHES {
            quantized_model_checks(arch, format, bound);
        }
    }
}

fn quantized_model_checks(
    arch: Architecture,
    format: mode_model::compact::BlockFormat,
    bound: f32,
) {
    {
        let (_, _, model) = tiny(arch, 6);
        let (_, _, mut q8) = tiny(arch, 6);
        q8.quantize(format).unwrap();
        assert!(q8.is_quantized(), "{arch:?}");
        let full = model.forward(&ids(&TOKENS), None).unwrap();
        let logits = q8.forward(&ids(&TOKENS), None).unwrap();
        let diff = max_abs_diff(&full, &logits);
        // The weights and the activations are rounded (to 8 or 4 bits); the change must show.
        assert!(diff < bound && diff > 0.0, "{arch:?} {format:?}: {diff}");

        // A decode step of two sequences at once gives each what it gets alone.
        let mut alone = Vec::new();
        for (i, prompt) in TOKENS.chunks(4).take(2).enumerate() {
            let mut cache = q8.new_cache();
            q8.forward(&ids(prompt), Some(&mut cache)).unwrap();
            let next = [TOKENS[11 - i]];
            alone.push(q8.forward_last(&ids(&next), Some(&mut cache)).unwrap());
        }
        let batch = Tensor::new(&[[5u32, 17, 200, 3], [3, 99, 128, 7]], &Device::Cpu).unwrap();
        let mut cache = q8.new_cache();
        q8.forward(&batch, Some(&mut cache)).unwrap();
        let next = Tensor::new(&[[TOKENS[11]], [TOKENS[10]]], &Device::Cpu).unwrap();
        let both = q8.forward_last(&next, Some(&mut cache)).unwrap();
        for (r, one) in alone.iter().enumerate() {
            let diff = max_abs_diff(&both.i(r..r + 1).unwrap(), one);
            assert!(diff < 1e-5, "{arch:?} {format:?} row {r}: {diff}");
        }
    }
}

/// Independent reference: the decoder written out with plain loops in f64, straight from the
/// Hugging Face modelling code's definitions (no candle ops, no GQA folding, rotate-half RoPE).
mod reference {
    use super::*;

    pub struct W<'a>(pub &'a Weights, pub &'a Config);

    impl W<'_> {
        pub fn get(&self, name: &str) -> Vec<f64> {
            let Weights::Map { tensors, .. } = self.0 else {
                unreachable!()
            };
            let t = &tensors[name];
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect()
        }
        fn has(&self, name: &str) -> bool {
            let Weights::Map { tensors, .. } = self.0 else {
                unreachable!()
            };
            tensors.contains_key(name)
        }
    }

    /// y[o] = sum_i w[o, i] x[i] (+ b[o])
    fn linear(w: &[f64], b: Option<&[f64]>, x: &[f64]) -> Vec<f64> {
        let n_in = x.len();
        (0..w.len() / n_in)
            .map(|o| {
                let dot: f64 = (0..n_in).map(|i| w[o * n_in + i] * x[i]).sum();
                dot + b.map_or(0.0, |b| b[o])
            })
            .collect()
    }

    /// Gemma's norms scale by `1 + w` (`Gemma3RMSNorm`), the others' by `w`.
    fn rms_norm(c: &Config, x: &[f64], w: &[f64]) -> Vec<f64> {
        let one = if c.architecture == Architecture::Gemma3 {
            1.0
        } else {
            0.0
        };
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + c.rms_norm_eps).sqrt();
        x.iter().zip(w).map(|(v, w)| v * r * (one + w)).collect()
    }

    /// `gelu_pytorch_tanh`
    fn gelu_tanh(x: f64) -> f64 {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
    }

    fn rope(x: &mut [f64], pos: usize, theta: f64) {
        let d = x.len();
        let orig = x.to_vec();
        for i in 0..d / 2 {
            let freq = 1.0 / theta.powf(2.0 * i as f64 / d as f64);
            let (c, s) = ((pos as f64 * freq).cos(), (pos as f64 * freq).sin());
            x[i] = orig[i] * c - orig[i + d / 2] * s;
            x[i + d / 2] = orig[i + d / 2] * c + orig[i] * s;
        }
    }

    pub fn logits(w: &W, tokens: &[u32]) -> Vec<Vec<f64>> {
        let c = w.1;
        let (h, hd, nh, nkv) = (
            c.hidden_size,
            c.head_dim,
            c.num_attention_heads,
            c.num_key_value_heads,
        );
        let gemma = c.architecture == Architecture::Gemma3;
        // Gemma3TextScaledWordEmbedding: times sqrt(hidden), rounded to f32.
        let embed_scale = if gemma {
            (h as f64).sqrt() as f32 as f64
        } else {
            1.0
        };
        let emb = w.get("model.embed_tokens.weight");
        let mut xs: Vec<Vec<f64>> = tokens
            .iter()
            .map(|&t| {
                emb[t as usize * h..(t as usize + 1) * h]
                    .iter()
                    .map(|v| v * embed_scale)
                    .collect()
            })
            .collect();
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            // Gemma 3: layer_types, one global layer every `global_every`; local layers see the
            // last `size` positions and rotate with their own base.
            let (window, theta) = match &c.sliding_window {
                Some(sw) if (l + 1) % sw.global_every != 0 => (sw.size, sw.local_rope_theta),
                _ => (usize::MAX, c.rope_theta),
            };
            let g = |n: &str| w.get(&format!("{p}.{n}"));
            let bias = |n: &str| {
                let name = format!("{p}.{n}");
                w.has(&name).then(|| w.get(&name))
            };
            let (wq, wk, wv, wo) = (
                g("self_attn.q_proj.weight"),
                g("self_attn.k_proj.weight"),
                g("self_attn.v_proj.weight"),
                g("self_attn.o_proj.weight"),
            );
            let (bq, bk, bv) = (
                bias("self_attn.q_proj.bias"),
                bias("self_attn.k_proj.bias"),
                bias("self_attn.v_proj.bias"),
            );
            let mut qs = Vec::new();
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            for (pos, x) in xs.iter().enumerate() {
                let n = rms_norm(c, x, &g("input_layernorm.weight"));
                let mut q = linear(&wq, bq.as_deref(), &n);
                let mut k = linear(&wk, bk.as_deref(), &n);
                for (heads, v, norm) in [
                    (nh, &mut q, "self_attn.q_norm.weight"),
                    (nkv, &mut k, "self_attn.k_norm.weight"),
                ] {
                    for head in 0..heads {
                        let slice = &mut v[head * hd..(head + 1) * hd];
                        if c.qk_norm {
                            let normed = rms_norm(c, slice, &g(norm));
                            slice.copy_from_slice(&normed);
                        }
                        rope(slice, pos, theta);
                    }
                }
                qs.push(q);
                ks.push(k);
                vs.push(linear(&wv, bv.as_deref(), &n));
            }
            let mut new_xs = Vec::new();
            for (t, x) in xs.iter().enumerate() {
                let mut attn = vec![0.0; nh * hd];
                for head in 0..nh {
                    let kvh = head / (nh / nkv);
                    let q = &qs[t][head * hd..(head + 1) * hd];
                    let first = (t + 1).saturating_sub(window);
                    let scores: Vec<f64> = (first..=t)
                        .map(|s| {
                            let k = &ks[s][kvh * hd..(kvh + 1) * hd];
                            q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                    for (i, score) in scores.iter().enumerate() {
                        let s = first + i;
                        let p = (score - m).exp() / z;
                        for d in 0..hd {
                            attn[head * hd + d] += p * vs[s][kvh * hd + d];
                        }
                    }
                }
                let mut o = linear(&wo, None, &attn);
                if gemma {
                    o = rms_norm(c, &o, &g("post_attention_layernorm.weight"));
                }
                let x1: Vec<f64> = x.iter().zip(&o).map(|(a, b)| a + b).collect();
                let pre_mlp = if gemma {
                    "pre_feedforward_layernorm.weight"
                } else {
                    "post_attention_layernorm.weight"
                };
                let n = rms_norm(c, &x1, &g(pre_mlp));
                let gate = linear(&g("mlp.gate_proj.weight"), None, &n);
                let up = linear(&g("mlp.up_proj.weight"), None, &n);
                let act: Vec<f64> = gate
                    .iter()
                    .zip(&up)
                    .map(|(&g, u)| {
                        let a = if gemma {
                            gelu_tanh(g)
                        } else {
                            g / (1.0 + (-g).exp())
                        };
                        a * u
                    })
                    .collect();
                let mut down = linear(&g("mlp.down_proj.weight"), None, &act);
                if gemma {
                    down = rms_norm(c, &down, &g("post_feedforward_layernorm.weight"));
                }
                new_xs.push(x1.iter().zip(&down).map(|(a, b)| a + b).collect());
            }
            xs = new_xs;
        }
        let head = if w.has("lm_head.weight") {
            w.get("lm_head.weight")
        } else {
            emb.clone()
        };
        xs.iter()
            .map(|x| linear(&head, None, &rms_norm(c, x, &w.get("model.norm.weight"))))
            .collect()
    }
}

#[test]
fn forward_matches_naive_f64_reference() {
    for arch in ARCHES {
        let (config, weights, model) = tiny(arch, 6);
        let ours = model
            .forward(&ids(&TOKENS), None)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let ours: Vec<Vec<f32>> = ours.to_vec2().unwrap();
        let reference = reference::logits(&reference::W(&weights, &config), &TOKENS);
        let mut worst = 0f64;
        for (a, b) in ours.iter().zip(&reference) {
            for (x, y) in a.iter().zip(b) {
                worst = worst.max((*x as f64 - y).abs());
            }
        }
        assert!(worst < 1e-4, "{arch:?}: max abs diff {worst}");
    }
}
