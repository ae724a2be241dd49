//! The f32 kernels against the same kernels in f64.
//!
//! The finite-difference checks (gradcheck.rs) verify the f64 path. Training runs in f32, where
//! the kernels use their own exponential and vectorised partial sums, so every kernel is run in
//! both types on the same inputs here; the f32 result must match the f64 one to f32 precision.
//! Row lengths are not multiples of the 8 partial sums, so the scalar tails run too.

use candle_core::{DType, Device, Tensor};
use mode_engine::kernels::{self, exp_f32};
use mode_engine::ops;
use mode_model::Activation;
use rand::{Rng, SeedableRng};

fn randn(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n)
        .map(|_| scale * rng.random_range(-1.0..1.0))
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn f32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F32).unwrap()
}

/// `max |a - b| / max |b|` (normwise, so that entries near zero after cancellation do not
/// count as large relative errors), `a` in f32 and `b` in f64.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a: Vec<f64> = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f64> = b.flatten_all().unwrap().to_vec1().unwrap();
    let err = a
        .iter()
        .zip(&b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    err / b.iter().map(|b| b.abs()).fold(f64::MIN_POSITIVE, f64::max)
}

fn assert_close(name: &str, a: &Tensor, b: &Tensor) {
    let d = rel_diff(a, b);
    assert!(d < 1e-5, "{name}: f32 differs from f64 by {d:e} (relative)");
}

#[test]
fn exp_f32_is_accurate_over_the_whole_range() {
    let mut worst = 0f64;
    let mut x = -87.0f32;
    while x < 88.0 {
        let got = exp_f32(x) as f64;
        let want = (x as f64).exp();
        worst = worst.max((got - want).abs() / want);
        x += 0.001_37;
    }
    assert!(worst < 3e-7, "worst relative error {worst:e}");
    assert!(exp_f32(f32::NAN).is_nan());
    assert_eq!(exp_f32(0.0), 1.0);
    assert!(exp_f32(100.0).is_infinite());
    assert!(exp_f32(f32::NEG_INFINITY) < 1.2e-38);
}

#[test]
fn reductions_match_a_plain_loop() {
    for n in [0, 1, 7, 8, 9, 61] {
        let a: Vec<f64> = (0..n).map(|i| ((i * 37) % 11) as f64 - 5.0).collect();
        let b: Vec<f64> = (0..n).map(|i| ((i * 13) % 7) as f64 - 3.0).collect();
        let plain_dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert_eq!(kernels::dot(&a, &b), plain_dot, "dot, n = {n}");
        assert_eq!(kernels::sum_f64(&a), a.iter().sum::<f64>(), "sum, n = {n}");
        let plain_max = a.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(kernels::max(&a), plain_max, "max, n = {n}");
    }
    assert_eq!(
        kernels::max(&[1.0, f64::NAN, 3.0]),
        3.0,
        "NaN entries are skipped"
    );
}

#[test]
fn rms_norm_and_its_backward() {
    let (x, w, dy) = (
        randn(&[5, 13], 1, 2.0),
        randn(&[13], 2, 1.0),
        randn(&[5, 13], 3, 1.0),
    );
    let (y64, r64) = ops::rms_norm(&x, &w, 1e-5).unwrap();
    let (y32, r32) = ops::rms_norm(&f32(&x), &f32(&w), 1e-5).unwrap();
    assert_close("rms_norm y", &y32, &y64);
    assert_close("rms_norm rstd", &r32, &r64);
    let (dx64, dw64) = ops::rms_norm_backward(&dy, &x, &w, &r64).unwrap();
    let (dx32, dw32) = ops::rms_norm_backward(&f32(&dy), &f32(&x), &f32(&w), &r32).unwrap();
    assert_close("rms_norm dx", &dx32, &dx64);
    assert_close("rms_norm dw", &dw32, &dw64);
}

#[test]
fn gated_units_and_their_backward() {
    // Wide enough that large |g| exercises both ends of the exponential.
    let (g, u, dh) = (
        randn(&[3, 21], 4, 30.0),
        randn(&[3, 21], 5, 1.0),
        randn(&[3, 21], 6, 1.0),
    );
    for act in [Activation::Silu, Activation::GeluTanh] {
        let name = |what: &str| format!("{act:?} {what}");
        let y64 = ops::glu(act, &g, &u).unwrap();
        let y32 = ops::glu(act, &f32(&g), &f32(&u)).unwrap();
        assert_close(&name("y"), &y32, &y64);
        let (dg64, du64) = ops::glu_backward(act, &dh, &g, &u).unwrap();
        let (dg32, du32) = ops::glu_backward(act, &f32(&dh), &f32(&g), &f32(&u)).unwrap();
        assert_close(&name("dg"), &dg32, &dg64);
        assert_close(&name("du"), &du32, &du64);
    }
}

#[test]
fn rope_and_its_backward() {
    let (x, angles) = (randn(&[2, 3, 5, 10], 7, 1.0), randn(&[5, 5], 8, 3.0));
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    let y64 = ops::rope(&x, &cos, &sin).unwrap();
    let y32 = ops::rope(&f32(&x), &f32(&cos), &f32(&sin)).unwrap();
    assert_close("rope", &y32, &y64);
    let b64 = ops::rope_backward(&x, &cos, &sin).unwrap();
    let b32 = ops::rope_backward(&f32(&x), &f32(&cos), &f32(&sin)).unwrap();
    assert_close("rope backward", &b32, &b64);
}

#[test]
fn attention_and_its_backward() {
    // 4 query heads over 2 kv heads, 11 positions (rows of 1..=11 visible keys), head dim 6.
    let (q, k, v, d_out) = (
        randn(&[2, 4, 11, 6], 9, 2.0),
        randn(&[2, 2, 11, 6], 10, 2.0),
        randn(&[2, 2, 11, 6], 11, 1.0),
        randn(&[2, 4, 11, 6], 12, 1.0),
    );
    // Causal, and with a window of 4 that masks from the fifth position on.
    for window in [None, Some(4)] {
        let name = |what: &str| format!("attention {what} (window {window:?})");
        let (o64, p64) = ops::attention(&q, &k, &v, window).unwrap();
        let (o32, p32) = ops::attention(&f32(&q), &f32(&k), &f32(&v), window).unwrap();
        assert_close(&name("out"), &o32, &o64);
        assert_close(&name("probs"), &p32, &p64);
        let g64 = ops::attention_backward(&d_out, &q, &k, &v, &p64).unwrap();
        let (d, q32, k32, v32) = (f32(&d_out), f32(&q), f32(&k), f32(&v));
        let g32 = ops::attention_backward(&d, &q32, &k32, &v32, &p32).unwrap();
        assert_close(&name("dq"), &g32.0, &g64.0);
        assert_close(&name("dk"), &g32.1, &g64.1);
        assert_close(&name("dv"), &g32.2, &g64.2);
    }
}

#[test]
fn lm_head_cross_entropy() {
    // A vocabulary of 37 with a wide logit range; one ignored target.
    let (hidden, w) = (randn(&[6, 9], 13, 3.0), randn(&[37, 9], 14, 2.0));
    let targets = [3, 36, ops::IGNORE, 0, 17, 17];
    let ce64 = ops::lm_head_cross_entropy(&hidden, &w, &targets, 0.2, true, 4).unwrap();
    let ce32 = ops::lm_head_cross_entropy(&f32(&hidden), &f32(&w), &targets, 0.2, true, 4).unwrap();
    assert_eq!((ce32.count, ce32.correct), (ce64.count, ce64.correct));
    let loss_diff = (ce32.loss_sum - ce64.loss_sum).abs() / ce64.loss_sum;
    assert!(loss_diff < 1e-6, "loss differs by {loss_diff:e}");
    assert_close("d_hidden", &ce32.d_hidden, &ce64.d_hidden);
    assert_close(
        "d_weight",
        ce32.d_weight.as_ref().unwrap(),
        ce64.d_weight.as_ref().unwrap(),
    );
}

#[test]
fn sum_of_squares() {
    let x = randn(&[3, 1001], 15, 1.0);
    let want: f64 = x.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
    let got64 = kernels::sum_of_squares(&x).unwrap();
    let got32 = kernels::sum_of_squares(&f32(&x)).unwrap();
    assert!((got64 - want).abs() < 1e-9 * want, "{got64} vs {want}");
    assert!((got32 - want).abs() < 1e-6 * want, "{got32} vs {want}");
}
