//! AdamW (Loshchilov & Hutter): Adam moments with bias correction, weight decay applied to the
//! parameters directly (decoupled), not through the gradient.
//!
//! The update runs fused over each parameter's memory (one pass, parallel over chunks), in place
//! on the candle storage: candle's own AdamW is a chain of unfused tensor ops that took seconds
//! per step over 135M parameters.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{CpuStorage, InplaceOp1, Layout, Result, Storage, Tensor};
use mode_engine::kernels::Float;
use rayon::prelude::*;

/// AdamW hyper-parameters (the learning rate comes per step from the schedule).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// First and second moments of one parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// The optimizer: hyper-parameters, step count and per-parameter moments.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Optimizer steps taken so far.
    pub step: u64,
    pub state: HashMap<String, Moments>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            state: HashMap::new(),
        }
    }

    /// Updates each parameter that has a gradient in `grads`, in place, at learning rate
    /// `lr(name)`; a parameter whose rate is 0 is left exactly as it is (and gets no moments).
    /// `grad_scale` multiplies every gradient first (gradient clipping); weight decay applies
    /// where `decays(name)`.
    pub fn update(
        &mut self,
        params: &[(&str, &Tensor)],
        grads: &HashMap<String, Tensor>,
        lr: impl Fn(&str) -> f64,
        grad_scale: f64,
        decays: impl Fn(&str) -> bool,
    ) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let c = &self.config;
        let hyper = Hyper {
            lr: 0.0,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            bias1: 1.0 - c.beta1.powi(t),
            bias2: 1.0 - c.beta2.powi(t),
            grad_scale,
            decay: 0.0,
        };
        for (name, param) in params {
            let lr = lr(name);
            if lr == 0.0 {
                continue;
            }
            // A trainable tensor without a gradient is a naming mismatch between the model and
            // the engine; skipping it would quietly stop it training.
            let Some(grad) = grads.get(*name) else {
                let mut known: Vec<&String> = grads.keys().collect();
                known.sort();
                known.truncate(4);
                candle_core::bail!(
                    "{name}: a trainable parameter received no gradient (gradients are named \
                     like {known:?}); its name and the engine's do not match"
                );
            };
            if grad.dims() != param.dims() {
                candle_core::bail!(
                    "{name}: gradient shape {:?} != parameter shape {:?}",
                    grad.dims(),
                    param.dims()
                );
            }
            let n = param.elem_count();
            let grad = grad.contiguous()?;
            let moments = self
                .state
                .entry(name.to_string())
                .or_insert_with(|| Moments {
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                });
            let (storage, layout) = grad.storage_and_layout();
            let Storage::Cpu(grad_storage) = &*storage else {
                candle_core::bail!("adamw: {name}: gradients must be on the CPU");
            };
            let op = Step {
                grad: (grad_storage, layout),
                moments: RefCell::new(moments),
                hyper: Hyper {
                    lr,
                    decay: if decays(name) { c.weight_decay } else { 0.0 },
                    ..hyper
                },
            };
            param.inplace_op1(&op)?;
        }
        Ok(())
    }

    /// Bytes held by optimizer state.
    pub fn state_bytes(&self) -> usize {
        self.state
            .values()
            .map(|m| 4 * (m.m.len() + m.v.len()))
            .sum()
    }
}

/// Weight decay for matrices, not for norm scales and biases (the usual choice).
pub fn decay_matrices(param: &Tensor) -> bool {
    param.rank() >= 2
}

#[derive(Debug, Clone, Copy)]
struct Hyper {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    bias1: f64,
    bias2: f64,
    grad_scale: f64,
    decay: f64,
}

struct Step<'a> {
    /// The gradient, read in place (a copy of every gradient was a large part of the step).
    grad: (&'a CpuStorage, &'a Layout),
    moments: RefCell<&'a mut Moments>,
    hyper: Hyper,
}

const CHUNK: usize = 1 << 14;

impl InplaceOp1 for Step<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("adamw: parameter is not contiguous");
        };
        let mut moments = self.moments.borrow_mut();
        let Moments { m, v } = &mut **moments;
        let (gs, gl) = self.grad;
        let Some((gstart, gend)) = gl.contiguous_offsets() else {
            candle_core::bail!("adamw: gradient is not contiguous");
        };
        let h = &self.hyper;
        match (storage, gs) {
            (CpuStorage::F32(p), CpuStorage::F32(g)) => {
                update(&mut p[start..end], &g[gstart..gend], m, v, h)
            }
            (CpuStorage::F32(p), CpuStorage::F64(g)) => {
                update(&mut p[start..end], &g[gstart..gend], m, v, h)
            }
            (CpuStorage::F64(p), CpuStorage::F64(g)) => {
                update(&mut p[start..end], &g[gstart..gend], m, v, h)
            }
            (CpuStorage::F64(p), CpuStorage::F32(g)) => {
                update(&mut p[start..end], &g[gstart..gend], m, v, h)
            }
            _ => candle_core::bail!("adamw: parameters and gradients must be f32 or f64"),
        }
        Ok(())
    }
}

fn update<F: Float, G: Float>(p: &mut [F], g: &[G], m: &mut [f32], v: &mut [f32], h: &Hyper) {
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| update_chunk(p, g, m, v, h));
}

/// One chunk of the update, in f64 whatever the storage (compiled for AVX2+FMA too, so that it
/// vectorises).
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn update_chunk<F: Float, G: Float>(p: &mut [F], g: &[G], m: &mut [f32], v: &mut [f32], h: &Hyper) {
    let n = p.len();
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    for i in 0..n {
        let grad = g[i].f() * h.grad_scale;
        let mi = h.beta1 * m[i] as f64 + (1.0 - h.beta1) * grad;
        let vi = h.beta2 * v[i] as f64 + (1.0 - h.beta2) * grad * grad;
        m[i] = mi as f32;
        v[i] = vi as f32;
        let m_hat = mi / h.bias1;
        let v_hat = vi / h.bias2;
        let x = p[i].f();
        let x = x - h.lr * h.decay * x - h.lr * m_hat / (v_hat.sqrt() + h.eps);
        p[i] = F::of(x);
    }
}
