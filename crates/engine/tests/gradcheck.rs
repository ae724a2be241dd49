//! Finite-difference checks, in f64 on tiny shapes, of every op's backward pass.
//!
//! Each check builds a scalar loss `L = sum(op(inputs) * R)` with a fixed random `R`, so the
//! upstream gradient is `R`, and compares the analytic gradient of every input entry with the
//! central difference `(L(x + e) - L(x - e)) / 2e`.

use candle_core::{DType, Device, Tensor};
use mode_engine::ops;
use mode_model::Activation;
use rand::{Rng, SeedableRng};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    (a * b)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Compares `analytic` with central differences of `loss` around `x`, entry by entry.
fn check(name: &str, x: &Tensor, analytic: &Tensor, loss: impl Fn(&Tensor) -> f64) {
    assert_eq!(x.dims(), analytic.dims(), "{name}: gradient shape");
    let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let grad: Vec<f64> = analytic.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-6;
    let mut worst = 0f64;
    for i in 0..base.len() {
        let at = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            loss(&Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap())
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        let err = (numeric - grad[i]).abs() / (1.0 + numeric.abs());
        worst = worst.max(err);
        assert!(
            err < 1e-6,
            "{name}[{i}]: analytic {} vs numeric {numeric}",
            grad[i]
        );
    }
    // The gradient is not trivially zero, so the check can fail.
    assert!(
        grad.iter().any(|g| g.abs() > 1e-3),
        "{name}: gradient is all zero"
    );
    eprintln!(
        "{name}: {} entries, worst relative error {worst:.2e}",
        base.len()
    );
}

#[test]
fn linear_gradients() {
    let (x, w, b) = (randn(&[5, 4], 1), randn(&[3, 4], 2), randn(&[3], 3));
    let r = randn(&[5, 3], 4);
    let dx = ops::linear_backward_input(&r, &w).unwrap();
    let dw = ops::linear_backward_weight(&r, &x).unwrap();
    let db = ops::linear_backward_bias(&r).unwrap();
    check("linear dx", &x, &dx, |x| {
        dot(&ops::linear(x, &w, Some(&b)).unwrap(), &r)
    });
    check("linear dw", &w, &dw, |w| {
        dot(&ops::linear(&x, w, Some(&b)).unwrap(), &r)
    });
    check("linear db", &b, &db, |b| {
        dot(&ops::linear(&x, &w, Some(b)).unwrap(), &r)
    });
}

#[test]
fn rms_norm_gradients() {
    let (x, w) = (randn(&[4, 6], 5), randn(&[6], 6));
    let r = randn(&[4, 6], 7);
    let eps = 1e-5;
    let (_, rstd) = ops::rms_norm(&x, &w, eps).unwrap();
    let (dx, dw) = ops::rms_norm_backward(&r, &x, &w, &rstd).unwrap();
    check("rms_norm dx", &x, &dx, |x| {
        dot(&ops::rms_norm(x, &w, eps).unwrap().0, &r)
    });
    check("rms_norm dw", &w, &dw, |w| {
        dot(&ops::rms_norm(&x, w, eps).unwrap().0, &r)
    });
}

#[test]
fn rope_gradients() {
    let x = randn(&[1, 2, 3, 4], 8);
    let angles = randn(&[3, 2], 9);
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    let r = randn(&[1, 2, 3, 4], 10);
    let dx = ops::rope_backward(&r, &cos, &sin).unwrap();
    check("rope dx", &x, &dx, |x| {
        dot(&ops::rope(x, &cos, &sin).unwrap(), &r)
    });
}

#[test]
fn rope_matches_the_inference_kernel() {
    // The training op and candle's fused inference kernel implement the same rotation.
    let x = randn(&[1, 2, 3, 4], 11).to_dtype(DType::F32).unwrap();
    let angles = randn(&[3, 2], 12).to_dtype(DType::F32).unwrap();
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    let ours = ops::rope(&x, &cos, &sin).unwrap();
    let fused = candle_nn::rotary_emb::rope(&x, &cos, &sin).unwrap();
    let diff: f32 = (ours - fused)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff < 1e-6, "{diff}");
}

#[test]
fn attention_gradients() {
    // 4 query heads over 2 key/value heads: grouped-query attention.
    let (q, k, v) = (
        randn(&[1, 4, 3, 2], 13),
        randn(&[1, 2, 3, 2], 14),
        randn(&[1, 2, 3, 2], 15),
    );
    let r = randn(&[1, 4, 3, 2], 16);
    // A window of 2 over 3 positions: the last query no longer sees the first key.
    for window in [None, Some(2)] {
        let attn = |q: &Tensor, k: &Tensor, v: &Tensor| {
            dot(&ops::attention(q, k, v, window).unwrap().0, &r)
        };
        let (_, probs) = ops::attention(&q, &k, &v, window).unwrap();
        let (dq, dk, dv) = ops::attention_backward(&r, &q, &k, &v, &probs).unwrap();
        check("attention dq", &q, &dq, |q| attn(q, &k, &v));
        check("attention dk", &k, &dk, |k| attn(&q, k, &v));
        check("attention dv", &v, &dv, |v| attn(&q, &k, v));
    }
}

#[test]
fn a_window_hides_keys_that_fell_out_of_it() {
    let (q, k, v) = (
        randn(&[1, 2, 5, 2], 30),
        randn(&[1, 1, 5, 2], 31),
        randn(&[1, 1, 5, 2], 32),
    );
    // With a window of 3, position 3 sees keys 1..=3 and position 4 sees 2..=4: changing key and
    // value 0 changes positions 0..=2 only.
    let replace_first = |t: &Tensor, first: [f64; 2]| {
        let first = Tensor::new(&[[[first]]], &Device::Cpu).unwrap();
        Tensor::cat(&[&first, &t.narrow(2, 1, 4).unwrap()], 2).unwrap()
    };
    let k2 = replace_first(&k, [5.0, -3.0]);
    let v2 = replace_first(&v, [-7.0, 2.0]);
    let (a, _) = ops::attention(&q, &k, &v, Some(3)).unwrap();
    let (b, _) = ops::attention(&q, &k2, &v2, Some(3)).unwrap();
    let diff = |from: usize, len: usize| -> f64 {
        (a.narrow(2, from, len).unwrap() - b.narrow(2, from, len).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    assert!(diff(0, 3) > 1e-3, "positions inside the window must change");
    assert!(
        diff(3, 2) < 1e-12,
        "positions past the window changed by {}",
        diff(3, 2)
    );
}

#[test]
fn attention_is_causal() {
    let (q, k, v) = (
        randn(&[1, 2, 4, 2], 17),
        randn(&[1, 1, 4, 2], 18),
        randn(&[1, 1, 4, 2], 19),
    );
    let (probs_first, _) = ops::attention(&q, &k, &v, None).unwrap();
    // Changing the last key and value leaves the first three outputs unchanged.
    let k2 = Tensor::cat(&[&k.narrow(2, 0, 3).unwrap(), &randn(&[1, 1, 1, 2], 20)], 2).unwrap();
    let v2 = Tensor::cat(&[&v.narrow(2, 0, 3).unwrap(), &randn(&[1, 1, 1, 2], 21)], 2).unwrap();
    let (out2, _) = ops::attention(&q, &k2, &v2, None).unwrap();
    let early = |t: &Tensor| t.narrow(2, 0, 3).unwrap();
    let diff: f64 = (early(&probs_first) - early(&out2))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff < 1e-12, "{diff}");
}

#[test]
fn gated_unit_gradients() {
    let (g, u) = (randn(&[3, 5], 22), randn(&[3, 5], 23));
    let r = randn(&[3, 5], 24);
    for act in [Activation::Silu, Activation::GeluTanh] {
        let (dg, du) = ops::glu_backward(act, &r, &g, &u).unwrap();
        check(&format!("{act:?} dg"), &g, &dg, |g| {
            dot(&ops::glu(act, g, &u).unwrap(), &r)
        });
        check(&format!("{act:?} du"), &u, &du, |u| {
            dot(&ops::glu(act, &g, u).unwrap(), &r)
        });
    }
}

#[test]
fn gelu_tanh_matches_its_definition() {
    // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written out here independently.
    let g = randn(&[4, 6], 33);
    let u = Tensor::ones((4, 6), DType::F64, &Device::Cpu).unwrap();
    let ours: Vec<Vec<f64>> = ops::glu(Activation::GeluTanh, &g, &u)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (row, grow) in ours.iter().zip(g.to_vec2::<f64>().unwrap()) {
        for (y, x) in row.iter().zip(grow) {
            let k = (2.0 / std::f64::consts::PI).sqrt();
            let want = 0.5 * x * (1.0 + (k * (x + 0.044715 * x.powi(3))).tanh());
            assert!((y - want).abs() < 1e-14, "gelu({x}) = {y}, want {want}");
        }
    }
}

#[test]
fn embedding_gradients() {
    let table = randn(&[6, 3], 25);
    let ids = Tensor::new(&[2u32, 5, 2, 0], &Device::Cpu).unwrap();
    let r = randn(&[4, 3], 26);
    let grad = ops::embedding_backward(&ids, &r, 6).unwrap();
    check("embedding", &table, &grad, |t| {
        dot(&t.index_select(&ids, 0).unwrap(), &r)
    });
}

#[test]
fn lm_head_cross_entropy_gradients() {
    let (h, w) = (randn(&[5, 4], 27), randn(&[7, 4], 28));
    let targets = [3, 0, ops::IGNORE, 6, 3];
    let scale = 1.0 / 4.0;
    // Chunks of 2 rows: the chunking itself is exercised.
    let ce = ops::lm_head_cross_entropy(&h, &w, &targets, scale, true, 2).unwrap();
    assert_eq!(ce.count, 4);
    let loss = |h: &Tensor, w: &Tensor| {
        scale
            * ops::lm_head_cross_entropy(h, w, &targets, scale, false, 2)
                .unwrap()
                .loss_sum
    };
    check("lm_head dh", &h, &ce.d_hidden, |h| loss(h, &w));
    check("lm_head dw", &w, ce.d_weight.as_ref().unwrap(), |w| {
        loss(&h, w)
    });
    // The loss equals the plain definition.
    let logits: Vec<Vec<f64>> = h.matmul(&w.t().unwrap()).unwrap().to_vec2().unwrap();
    let expected: f64 = targets
        .iter()
        .zip(&logits)
        .filter(|(t, _)| **t != ops::IGNORE)
        .map(|(&t, row)| row.iter().map(|x| x.exp()).sum::<f64>().ln() - row[t as usize])
        .sum();
    assert!((ce.loss_sum - expected).abs() < 1e-10);
}
