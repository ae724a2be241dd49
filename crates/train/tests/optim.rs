//! AdamW against the textbook update written out independently; frozen parameters untouched and
//! stateless; a trainable tensor without a gradient refused; clipping.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use mode_train::grads::clip_scale;
use mode_train::{global_norm, AdamW, AdamWConfig};

#[test]
fn adamw_matches_the_textbook_update() {
    let config = AdamWConfig {
        beta1: 0.8,
        beta2: 0.95,
        eps: 1e-6,
        weight_decay: 0.1,
    };
    let init = [0.5f64, -1.0, 2.0, 0.0];
    let w = Tensor::new(&init, &Device::Cpu)
        .unwrap()
        .reshape((2, 2))
        .unwrap();
    let frozen = Tensor::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
    let mut opt = AdamW::new(config.clone());
    let grads_seq = [
        [0.1, -0.2, 0.3, 0.0],
        [-0.5, 0.4, 0.1, 1.0],
        [0.2, 0.2, -0.2, -1.0],
    ];
    let (mut m, mut v, mut x) = ([0.0; 4], [0.0; 4], init);
    for (step, g) in grads_seq.iter().enumerate() {
        let lr = 0.01 * (step + 1) as f64;
        let scale = 0.5;
        let grads = HashMap::from([(
            "w".to_string(),
            Tensor::new(g, &Device::Cpu)
                .unwrap()
                .reshape((2, 2))
                .unwrap(),
        )]);
        let rate = |name: &str| if name == "frozen" { 0.0 } else { lr };
        opt.update(
            &[("w", &w), ("frozen", &frozen)],
            &grads,
            rate,
            scale,
            |_| true,
        )
        .unwrap();
        let t = (step + 1) as i32;
        for i in 0..4 {
            let gi = g[i] * scale;
            m[i] = config.beta1 * m[i] + (1.0 - config.beta1) * gi;
            v[i] = config.beta2 * v[i] + (1.0 - config.beta2) * gi * gi;
            let mh = m[i] / (1.0 - config.beta1.powi(t));
            let vh = v[i] / (1.0 - config.beta2.powi(t));
            x[i] = x[i] - lr * config.weight_decay * x[i] - lr * mh / (vh.sqrt() + config.eps);
        }
        let got: Vec<f64> = w.flatten_all().unwrap().to_vec1().unwrap();
        for i in 0..4 {
            assert!(
                (got[i] - x[i]).abs() < 1e-6 * (1.0 + x[i].abs()),
                "step {step} [{i}]: {} vs {}",
                got[i],
                x[i]
            );
        }
    }
    // The parameter at rate 0 did not move and holds no state.
    assert_eq!(frozen.to_vec1::<f64>().unwrap(), vec![1.0, 2.0]);
    assert!(!opt.state.contains_key("frozen"));
    assert_eq!(opt.state.len(), 1);
    assert_eq!(opt.state_bytes(), 2 * 4 * 4);
}

#[test]
fn a_trainable_parameter_without_a_gradient_is_an_error() {
    let w = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    let grads = HashMap::from([("w".to_string(), w.ones_like().unwrap())]);
    let mut opt = AdamW::new(AdamWConfig::default());
    let e = opt
        .update(&[("w_misnamed", &w)], &grads, |_| 0.1, 1.0, |_| true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("w_misnamed") && e.contains("no gradient"), "{e}");
    assert_eq!(w.to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
}

#[test]
fn clipping() {
    let a = Tensor::new(&[3.0f32, 0.0], &Device::Cpu).unwrap();
    let b = Tensor::new(&[4.0f32], &Device::Cpu).unwrap();
    let norm = global_norm([&a, &b]).unwrap();
    assert!((norm - 5.0).abs() < 1e-12);
    assert!((clip_scale(norm, 1.0) * norm - 1.0).abs() < 1e-6);
    assert_eq!(clip_scale(norm, 10.0), 1.0);
}
