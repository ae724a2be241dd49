//! A decoder layer's forward pass that keeps what its backward pass needs, and that backward
//! pass. The same code trains a frozen backbone layer (input gradients only), an expert layer
//! (input and weight gradients) and a fully fine-tuned layer.

use candle_core::{Result, Tensor};
use mode_model::layers::{Linear, RmsNorm};
use mode_model::{DecoderLayer, RopeTables};

use crate::ops;

/// Which parameters of a layer train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayerTraining {
    /// The layer's own weights, biases and norm scales.
    pub weights: bool,
    /// Its LoRA adapters, where attached.
    pub lora: bool,
}

impl LayerTraining {
    pub fn any(&self) -> bool {
        self.weights || self.lora
    }
}

/// An output norm's input and reciprocal RMS (sandwich-norm layers only).
struct OutNorm {
    x: Tensor,
    rstd: Tensor,
}

/// Activations saved by [`forward`] for [`backward`].
pub struct LayerActivations {
    /// `x A^T` of each projection's LoRA adapter (q, k, v, o, gate, up, down).
    lora_xa: [Option<Tensor>; 7],
    x: Tensor,
    rstd1: Tensor,
    n1: Tensor,
    q_pre: Tensor,
    k_pre: Tensor,
    q_rstd: Option<Tensor>,
    k_rstd: Option<Tensor>,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    probs: Tensor,
    attn: Tensor,
    attn_out: Option<OutNorm>,
    x1: Tensor,
    rstd2: Tensor,
    n2: Tensor,
    g: Tensor,
    u: Tensor,
    act: Tensor,
    mlp_out: Option<OutNorm>,
}

/// Gradients of a layer's parameters, under their names relative to the layer
/// (`self_attn.q_proj.weight`, ...).
pub type LayerGrads = Vec<(String, Tensor)>;

/// Projection forward; with a LoRA adapter also returns `x A^T` for the backward pass.
fn lin(l: &Linear, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
    let y = ops::linear(x, l.weight.tensor()?, l.bias.as_ref())?;
    match &l.lora {
        None => Ok((y, None)),
        Some(a) => {
            let xa = ops::linear(x, &a.a, None)?;
            let y = (y + (ops::linear(&xa, &a.b, None)? * a.scale)?)?;
            Ok((y, Some(xa)))
        }
    }
}

/// `x: [b, t, h]`; `rope` for positions `0..t`. Returns the layer output and the saved
/// activations.
pub fn forward(
    layer: &DecoderLayer,
    x: &Tensor,
    rope: &RopeTables,
) -> Result<(Tensor, LayerActivations)> {
    let (b, t, h) = x.dims3()?;
    let a = &layer.self_attn;
    let (nh, nkv, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
    let (cos, sin) = rope.for_window(a.window);
    let x2d = x.reshape((b * t, h))?;
    let (n1, rstd1) = norm(&layer.attn_norm, &x2d)?;
    let (q_pre, xa_q) = lin(&a.q_proj, &n1)?;
    let (k_pre, xa_k) = lin(&a.k_proj, &n1)?;
    let (v, xa_v) = lin(&a.v_proj, &n1)?;
    // q/k norm (Qwen3, Gemma 3) acts on each head's vector.
    let (q_normed, q_rstd) = head_norm(a.q_norm.as_ref(), &q_pre, hd)?;
    let (k_normed, k_rstd) = head_norm(a.k_norm.as_ref(), &k_pre, hd)?;
    let heads = |m: &Tensor, n: usize| m.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous();
    let q = ops::rope(&heads(&q_normed, nh)?, cos, sin)?;
    let k = ops::rope(&heads(&k_normed, nkv)?, cos, sin)?;
    let v = heads(&v, nkv)?;
    let (o, probs) = ops::attention(&q, &k, &v, a.window)?;
    let attn = o.transpose(1, 2)?.reshape((b * t, nh * hd))?;
    let (o, xa_o) = lin(&a.o_proj, &attn)?;
    let (o, attn_out) = out_norm(layer.attn_out_norm.as_ref(), o)?;
    let x1 = (&x2d + o)?;
    let (n2, rstd2) = norm(&layer.mlp_norm, &x1)?;
    let (g, xa_g) = lin(&layer.mlp.gate_proj, &n2)?;
    let (u, xa_u) = lin(&layer.mlp.up_proj, &n2)?;
    let act = ops::glu(layer.mlp.activation, &g, &u)?;
    let (down, xa_d) = lin(&layer.mlp.down_proj, &act)?;
    let (down, mlp_out) = out_norm(layer.mlp_out_norm.as_ref(), down)?;
    let y = (&x1 + down)?;
    let acts = LayerActivations {
        lora_xa: [xa_q, xa_k, xa_v, xa_o, xa_g, xa_u, xa_d],
        x: x2d,
        rstd1,
        n1,
        q_pre,
        k_pre,
        q_rstd,
        k_rstd,
        q,
        k,
        v,
        probs,
        attn,
        attn_out,
        x1,
        rstd2,
        n2,
        g,
        u,
        act,
        mlp_out,
    };
    Ok((y.reshape((b, t, h))?, acts))
}

fn norm(n: &RmsNorm, x: &Tensor) -> Result<(Tensor, Tensor)> {
    ops::rms_norm(x, &n.scale()?, n.eps)
}

fn norm_backward(n: &RmsNorm, dy: &Tensor, x: &Tensor, rstd: &Tensor) -> Result<(Tensor, Tensor)> {
    // d(offset + w)/dw = 1: the scale's gradient is the weight's.
    ops::rms_norm_backward(dy, x, &n.scale()?, rstd)
}

/// A branch output through its output norm, where the layer has one.
fn out_norm(n: Option<&RmsNorm>, y: Tensor) -> Result<(Tensor, Option<OutNorm>)> {
    match n {
        None => Ok((y, None)),
        Some(n) => {
            let (normed, rstd) = norm(n, &y)?;
            Ok((normed, Some(OutNorm { x: y, rstd })))
        }
    }
}

fn head_norm(n: Option<&RmsNorm>, x: &Tensor, hd: usize) -> Result<(Tensor, Option<Tensor>)> {
    match n {
        None => Ok((x.clone(), None)),
        Some(n) => {
            let (rows, width) = x.dims2()?;
            let (y, rstd) = norm(n, &x.reshape((rows * width / hd, hd))?)?;
            Ok((y.reshape((rows, width))?, Some(rstd)))
        }
    }
}

/// Backward through the layer. `dy: [b, t, h]`. Returns the input gradient and the gradients of
/// the parameters `training` selects; a frozen layer computes input gradients only.
pub fn backward(
    layer: &DecoderLayer,
    acts: &LayerActivations,
    dy: &Tensor,
    rope: &RopeTables,
    training: LayerTraining,
) -> Result<(Tensor, LayerGrads)> {
    let (b, t, h) = dy.dims3()?;
    let a = &layer.self_attn;
    let (nh, nkv, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
    let (cos, sin) = rope.for_window(a.window);
    let mut grads = LayerGrads::new();
    let mut lin_back =
        |slot: usize, name: &str, l: &Linear, dy: &Tensor, x: &Tensor| -> Result<Tensor> {
            if training.weights {
                grads.push((
                    format!("{name}.weight"),
                    ops::linear_backward_weight(dy, x)?,
                ));
                if l.bias.is_some() {
                    grads.push((format!("{name}.bias"), ops::linear_backward_bias(dy)?));
                }
            }
            let dx = ops::linear_backward_input(dy, l.weight.tensor()?)?;
            match (&l.lora, &acts.lora_xa[slot]) {
                (Some(lora), Some(xa)) => {
                    // y += s * xa B^T, xa = x A^T
                    let d_xa = (ops::linear_backward_input(dy, &lora.b)? * lora.scale)?;
                    if training.lora {
                        let db = ops::linear_backward_weight(dy, xa)?;
                        grads.push((format!("{name}.lora_B"), (db * lora.scale)?));
                        let da = ops::linear_backward_weight(&d_xa, x)?;
                        grads.push((format!("{name}.lora_A"), da));
                    }
                    dx + ops::linear_backward_input(&d_xa, &lora.a)?
                }
                _ => Ok(dx),
            }
        };
    let through_out_norm =
        |n: Option<&RmsNorm>, saved: Option<&OutNorm>, d: &Tensor| match (n, saved) {
            (Some(n), Some(s)) => {
                let (dx, dw) = norm_backward(n, d, &s.x, &s.rstd)?;
                Ok::<_, candle_core::Error>((dx, Some(dw)))
            }
            _ => Ok((d.clone(), None)),
        };
    let dy = dy.reshape((b * t, h))?;

    // MLP branch: y = x1 + [out_norm](down(act(gate(n2)) * up(n2))).
    let (d_down, dw_mlp_out) =
        through_out_norm(layer.mlp_out_norm.as_ref(), acts.mlp_out.as_ref(), &dy)?;
    let d_act = lin_back(6, "mlp.down_proj", &layer.mlp.down_proj, &d_down, &acts.act)?;
    let (dg, du) = ops::glu_backward(layer.mlp.activation, &d_act, &acts.g, &acts.u)?;
    let dn2 = (lin_back(4, "mlp.gate_proj", &layer.mlp.gate_proj, &dg, &acts.n2)?
        + lin_back(5, "mlp.up_proj", &layer.mlp.up_proj, &du, &acts.n2)?)?;
    let (dx1_norm, dw_mlp) = norm_backward(&layer.mlp_norm, &dn2, &acts.x1, &acts.rstd2)?;
    let dx1 = (&dy + dx1_norm)?;

    // Attention branch: x1 = x + [out_norm](o_proj(attn(rope(q), rope(k), v))).
    let (d_o_proj, dw_attn_out) =
        through_out_norm(layer.attn_out_norm.as_ref(), acts.attn_out.as_ref(), &dx1)?;
    let d_attn = lin_back(3, "self_attn.o_proj", &a.o_proj, &d_o_proj, &acts.attn)?;
    let d_o = d_attn
        .reshape((b, t, nh, hd))?
        .transpose(1, 2)?
        .contiguous()?;
    let (dq, dk, dv) = ops::attention_backward(&d_o, &acts.q, &acts.k, &acts.v, &acts.probs)?;
    let flat = |m: Tensor, n: usize| -> Result<Tensor> {
        m.transpose(1, 2)?.contiguous()?.reshape((b * t, n * hd))
    };
    let dq = flat(ops::rope_backward(&dq, cos, sin)?, nh)?;
    let dk = flat(ops::rope_backward(&dk, cos, sin)?, nkv)?;
    let dv = flat(dv, nkv)?;
    let (dq, dw_q) = head_norm_backward(a.q_norm.as_ref(), &dq, &acts.q_pre, &acts.q_rstd, hd)?;
    let (dk, dw_k) = head_norm_backward(a.k_norm.as_ref(), &dk, &acts.k_pre, &acts.k_rstd, hd)?;
    let dn1 = ((lin_back(0, "self_attn.q_proj", &a.q_proj, &dq, &acts.n1)?
        + lin_back(1, "self_attn.k_proj", &a.k_proj, &dk, &acts.n1)?)?
        + lin_back(2, "self_attn.v_proj", &a.v_proj, &dv, &acts.n1)?)?;
    let (dx_norm, dw_attn) = norm_backward(&layer.attn_norm, &dn1, &acts.x, &acts.rstd1)?;
    let dx = (dx1 + dx_norm)?;
    if training.weights {
        // In the order of `DecoderLayer::norms`, which names them.
        let norm_grads = [
            Some(dw_attn),
            dw_attn_out,
            Some(dw_mlp),
            dw_mlp_out,
            dw_q,
            dw_k,
        ];
        let names = layer.norms().into_iter().map(|(name, _)| name);
        grads.extend(names.zip(norm_grads.into_iter().flatten()));
    }
    Ok((dx.reshape((b, t, h))?, grads))
}

/// Backward through a per-head norm: `(dx, dw)`, or `(dy, None)` without one.
fn head_norm_backward(
    n: Option<&RmsNorm>,
    dy: &Tensor,
    x: &Tensor,
    rstd: &Option<Tensor>,
    hd: usize,
) -> Result<(Tensor, Option<Tensor>)> {
    match (n, rstd) {
        (Some(n), Some(rstd)) => {
            let (rows, width) = dy.dims2()?;
            let shape = (rows * width / hd, hd);
            let (dx, dw) = norm_backward(n, &dy.reshape(shape)?, &x.reshape(shape)?, rstd)?;
            Ok((dx.reshape((rows, width))?, Some(dw)))
        }
        _ => Ok((dy.clone(), None)),
    }
}
