//! Decoder ops, forward and backward. Shapes use `n` for rows (batch x sequence flattened),
//! `h` for features. All ops work in f32 and f64 (the finite-difference checks run in f64).

use candle_core::{DType, Result, Tensor};
use mode_model::Activation;

use crate::kernels::{self, Float};

/// `y = x W^T (+ b)` for `x: [n, in]`, `w: [out, in]`. A compact (f16/bf16) frozen weight is
/// widened to the activation dtype.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let w = widen(w, x.dtype())?;
    let y = x.matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(&widen(b, x.dtype())?),
        None => Ok(y),
    }
}

/// Gradient of [`linear`] with respect to its input: `dx = dy W`.
pub fn linear_backward_input(dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    dy.matmul(&widen(w, dy.dtype())?)
}

/// Gradient of [`linear`] with respect to its weight: `dW = dy^T x`.
pub fn linear_backward_weight(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    dy.t()?.matmul(x)
}

/// Gradient of [`linear`] with respect to its bias: `db = sum_n dy`.
pub fn linear_backward_bias(dy: &Tensor) -> Result<Tensor> {
    dy.sum(0)
}

fn widen(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        Ok(t.clone())
    } else {
        t.to_dtype(dtype)
    }
}

/// RMSNorm `y = x / rms(x) * w` over the last dimension of `x: [n, h]`. Returns `y` and the
/// per-row reciprocal RMS `[n, 1]` that the backward pass needs.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    kernels::rms_norm(x, &widen(w, x.dtype())?, eps)
}

/// Backward of [`rms_norm`]: `(dx, dw)`.
///
/// With `xh = x * rstd` and `g = dy * w`: `dw = sum_n dy * xh` and
/// `dx = rstd * (g - xh * mean(g * xh))`.
pub fn rms_norm_backward(
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
) -> Result<(Tensor, Tensor)> {
    kernels::rms_norm_backward(dy, x, w, rstd)
}

/// Epsilon of a gate's input normalisation ([`gate_input`]).
pub const GATE_NORM_EPS: f64 = 1e-6;

/// What a gate reads from the block input `x: [n, h]`: `x` itself, or with `normalize`
/// `x / rms(x)` per row (an RMSNorm without a scale). The residual stream's scale differs from
/// block to block and token to token, so a gate on the raw input sees inputs of very different
/// scales; normalised, every block's gate reads unit-RMS rows. Returns the gate's input and, when normalised, the per-row
/// reciprocal RMS `[n, 1]` that [`gate_input_backward`] needs.
pub fn gate_input(x: &Tensor, normalize: bool) -> Result<(Tensor, Option<Tensor>)> {
    if !normalize {
        return Ok((x.clone(), None));
    }
    let ones = Tensor::ones(x.dim(1)?, x.dtype(), x.device())?;
    let (u, rstd) = rms_norm(x, &ones, GATE_NORM_EPS)?;
    Ok((u, Some(rstd)))
}

/// Backward of [`gate_input`]: the input gradient from the gradient `du` of the gate's input.
pub fn gate_input_backward(du: &Tensor, x: &Tensor, rstd: Option<&Tensor>) -> Result<Tensor> {
    match rstd {
        None => Ok(du.clone()),
        Some(rstd) => {
            let ones = Tensor::ones(x.dim(1)?, x.dtype(), x.device())?;
            Ok(rms_norm_backward(du, x, &ones, rstd)?.0)
        }
    }
}

/// Rotary embedding in the Hugging Face (rotate-half) layout: `x: [b, heads, t, d]`,
/// `cos`/`sin: [t, d/2]`. Pair i is (x[i], x[i + d/2]).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    kernels::rope(x, cos, sin)
}

/// Backward of [`rope`]: the transpose of the rotation, i.e. a rotation by the opposite angle.
pub fn rope_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    kernels::rope_backward(dy, cos, sin)
}

/// Causal grouped-query attention core. `q: [b, nh, t, d]`, `k`, `v: [b, nkv, t, d]` (RoPE
/// already applied); with a `window`, each position sees only the last `window` positions
/// (itself included). Returns the output `[b, nh, t, d]` and the attention probabilities
/// `[b, nkv, rep * t, t]` (query heads sharing a kv head folded into the row axis, so no key or
/// value is copied), which the backward pass reuses.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: Option<usize>,
) -> Result<(Tensor, Tensor)> {
    let (b, nh, t, d) = q.dims4()?;
    let nkv = k.dim(1)?;
    let rep = nh / nkv;
    let scale = 1.0 / (d as f64).sqrt();
    let qf = q.reshape((b, nkv, rep * t, d))?;
    let probs = kernels::causal_softmax(&qf.matmul(&k.t()?)?, scale, t, window)?;
    let out = probs.matmul(v)?.reshape((b, nh, t, d))?;
    Ok((out, probs))
}

/// Backward of [`attention`]: `(dq, dk, dv)`.
///
/// `dv = P^T dO`, `dP = dO V^T`, `dS = P * (dP - rowsum(dP * P))`, `dq = dS K * scale`,
/// `dk = dS^T Q * scale`.
pub fn attention_backward(
    d_out: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, nh, t, d) = q.dims4()?;
    let nkv = k.dim(1)?;
    let rep = nh / nkv;
    let scale = 1.0 / (d as f64).sqrt();
    let dof = d_out.reshape((b, nkv, rep * t, d))?;
    let qf = q.reshape((b, nkv, rep * t, d))?;
    let dv = probs.t()?.matmul(&dof)?;
    let ds = kernels::softmax_backward(probs, &dof.matmul(&v.t()?)?, scale)?;
    let dq = ds.matmul(k)?.reshape((b, nh, t, d))?;
    let dk = ds.t()?.matmul(&qf)?;
    Ok((dq, dk, dv))
}

/// Gated unit `act(g) * u`: SwiGLU (`silu`) or GeGLU (tanh-approximated GELU).
pub fn glu(act: Activation, g: &Tensor, u: &Tensor) -> Result<Tensor> {
    kernels::glu(act, g, u)
}

/// Backward of [`glu`]: `(dg, du)`; for SwiGLU `silu'(g) = s (1 + g (1 - s))`,
/// `s = sigmoid(g)`.
pub fn glu_backward(
    act: Activation,
    dh: &Tensor,
    g: &Tensor,
    u: &Tensor,
) -> Result<(Tensor, Tensor)> {
    kernels::glu_backward(act, dh, g, u)
}

/// Gradient of an embedding lookup: rows of `dx: [n, h]` added into a `[vocab, h]` matrix.
pub fn embedding_backward(ids: &Tensor, dx: &Tensor, vocab: usize) -> Result<Tensor> {
    let h = dx.dim(1)?;
    Tensor::zeros((vocab, h), dx.dtype(), dx.device())?.index_add(ids, dx, 0)
}

/// Targets with this id are ignored by [`lm_head_cross_entropy`] (prompt tokens, padding).
pub const IGNORE: u32 = u32::MAX;

/// Result of [`lm_head_cross_entropy`].
pub struct CrossEntropy {
    /// Sum over counted targets of `-log softmax(logits)[target]`.
    pub loss_sum: f64,
    /// Targets counted (not [`IGNORE`]).
    pub count: usize,
    /// Targets whose argmax logit is the target.
    pub correct: usize,
    /// Gradient of `loss_sum * grad_scale` with respect to the hidden states `[n, h]`.
    pub d_hidden: Tensor,
    /// Same, with respect to the head weight `[vocab, h]`, when asked for.
    pub d_weight: Option<Tensor>,
}

/// The LM head fused with cross-entropy, chunked over rows so that the `[n x vocab]` logit
/// matrix never exists whole. `hidden: [n, h]`, `w: [vocab, h]`, `targets.len() == n`.
/// Gradients are of `grad_scale * loss_sum` (pass `1 / tokens` for a mean loss).
///
/// Per chunk: one GEMM for the logits, one parallel pass that turns them in place into the
/// gradient `(softmax - onehot) * grad_scale` while collecting loss and accuracy, one GEMM back.
pub fn lm_head_cross_entropy(
    hidden: &Tensor,
    w: &Tensor,
    targets: &[u32],
    grad_scale: f64,
    want_weight_grad: bool,
    rows_per_chunk: usize,
) -> Result<CrossEntropy> {
    let (n, h) = hidden.dims2()?;
    if targets.len() != n {
        candle_core::bail!("{} targets for {n} rows", targets.len());
    }
    let dtype = hidden.dtype();
    let w = widen(w, dtype)?;
    let mut loss_sum = 0f64;
    let (mut count, mut correct) = (0, 0);
    let mut d_hidden = Vec::new();
    let mut d_weight: Option<Tensor> = None;
    let chunk = rows_per_chunk.max(1);
    for start in (0..n).step_by(chunk) {
        let rows = chunk.min(n - start);
        let hc = hidden.narrow(0, start, rows)?;
        let logits = hc.matmul(&w.t()?)?;
        let op = SoftmaxXentGrad {
            targets: &targets[start..start + rows],
            grad_scale,
            stats: std::cell::RefCell::new((0.0, 0, 0)),
        };
        logits.inplace_op1(&op)?;
        let (l, c, k) = op.stats.into_inner();
        loss_sum += l;
        count += c;
        correct += k;
        let dlogits = logits;
        d_hidden.push(dlogits.matmul(&w)?);
        if want_weight_grad {
            let dw = dlogits.t()?.matmul(&hc)?;
            d_weight = Some(match d_weight {
                Some(acc) => (acc + dw)?,
                None => dw,
            });
        }
    }
    let d_hidden = if d_hidden.is_empty() {
        Tensor::zeros((0, h), dtype, hidden.device())?
    } else {
        Tensor::cat(&d_hidden, 0)?
    };
    Ok(CrossEntropy {
        loss_sum,
        count,
        correct,
        d_hidden,
        d_weight,
    })
}

/// Turns a `[rows, vocab]` block of logits, in place, into `(softmax - onehot(target)) * scale`
/// (zero rows for ignored targets), accumulating (loss sum, counted, correct).
struct SoftmaxXentGrad<'a> {
    targets: &'a [u32],
    grad_scale: f64,
    stats: std::cell::RefCell<(f64, usize, usize)>,
}

impl candle_core::InplaceOp1 for SoftmaxXentGrad<'_> {
    fn name(&self) -> &'static str {
        "softmax-xent-grad"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("softmax-xent-grad: logits must be contiguous");
        };
        let rows = self.targets.len();
        let stats = match storage {
            candle_core::CpuStorage::F32(v) => {
                xent_rows(&mut v[start..end], rows, self.targets, self.grad_scale)
            }
            candle_core::CpuStorage::F64(v) => {
                xent_rows(&mut v[start..end], rows, self.targets, self.grad_scale)
            }
            _ => candle_core::bail!("softmax-xent-grad: logits must be f32 or f64"),
        };
        *self.stats.borrow_mut() = stats;
        Ok(())
    }
}

fn xent_rows<F: Float>(
    data: &mut [F],
    rows: usize,
    targets: &[u32],
    scale: f64,
) -> (f64, usize, usize) {
    use rayon::prelude::*;
    let vocab = data.len() / rows.max(1);
    data.par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(row, &target)| {
            if target == IGNORE {
                row.iter_mut().for_each(|x| *x = F::ZERO);
                return (0.0, 0, 0);
            }
            let t = target as usize;
            let (loss, arg) = xent_row(row, t, scale);
            (loss, 1, (arg == t) as usize)
        })
        .reduce(|| (0.0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2))
}

/// One row of [`SoftmaxXentGrad`]: returns the row's loss and argmax.
#[multiversion::multiversion(targets("x86_64+avx2+fma"))]
fn xent_row<F: Float>(row: &mut [F], t: usize, scale: f64) -> (f64, usize) {
    let top = kernels::max(row);
    // The first index holding the maximum, as a sequential scan would find it.
    let arg = row.iter().position(|&x| x == top).unwrap_or(0);
    let target_logit = row[t].f();
    // One exp per entry: keep exp(x - max) in place, then normalise.
    for x in row.iter_mut() {
        *x = (*x - top).exp();
    }
    let sum = kernels::sum_f64(row);
    let norm = F::of(scale / sum);
    for x in row.iter_mut() {
        *x *= norm;
    }
    row[t] -= F::of(scale);
    (top.f() + sum.ln() - target_logit, arg)
}
