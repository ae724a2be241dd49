//! A decoder layer's forward pass that keeps what its backward pass needs, and that backward
//! pass. The same code trains a frozen backbone layer (input gradients only), an expert layer
//! (input and weight gradients) and a fully fine-tuned layer.

use candle_core::{Result, Tensor};
use mode_model::layers::{Linear, RmsNorm};
use mode_model::DecoderLayer;

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
    x1: Tensor,
    rstd2: Tensor,
    n2: Tensor,
    g: Tensor,
    u: Tensor,
    act: Tensor,
}

/// Gradients of a layer's parameters, under their names relative to the layer
/// (`self_attn.q_proj.weight`, ...).
pub type LayerGrads = Vec<(String, Tensor)>;

/// Projection forward; with a LoRA adapter also returns `x A^T` for the backward pass.
fn lin(l: &Linear, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
    let y = ops::linear(x, &l.weight, l.bias.as_ref())?;
    match &l.lora {
        None => Ok((y, None)),
        Some(a) => {
            let xa = ops::linear(x, &a.a, None)?;
            let y = (y + (ops::linear(&xa, &a.b, None)? * a.scale)?)?;
            Ok((y, Some(xa)))
        }
    }
}

/// `x: [b, t, h]`; `cos`, `sin: [t, head_dim / 2]`. Returns the layer output and the saved
/// activations.
pub fn forward(
    layer: &DecoderLayer,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, LayerActivations)> {
    let (b, t, h) = x.dims3()?;
    let a = &layer.self_attn;
    let (nh, nkv, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
    let x2d = x.reshape((b * t, h))?;
    let (n1, rstd1) = norm(&layer.input_layernorm, &x2d)?;
    let (q_pre, xa_q) = lin(&a.q_proj, &n1)?;
    let (k_pre, xa_k) = lin(&a.k_proj, &n1)?;
    let (v, xa_v) = lin(&a.v_proj, &n1)?;
    // q/k norm (Qwen3) acts on each head's vector.
    let (q_normed, q_rstd) = head_norm(a.q_norm.as_ref(), &q_pre, hd)?;
    let (k_normed, k_rstd) = head_norm(a.k_norm.as_ref(), &k_pre, hd)?;
    let heads = |m: &Tensor, n: usize| m.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous();
    let q = ops::rope(&heads(&q_normed, nh)?, cos, sin)?;
    let k = ops::rope(&heads(&k_normed, nkv)?, cos, sin)?;
    let v = heads(&v, nkv)?;
    let (o, probs) = ops::attention(&q, &k, &v)?;
    let attn = o.transpose(1, 2)?.reshape((b * t, nh * hd))?;
    let (o, xa_o) = lin(&a.o_proj, &attn)?;
    let x1 = (&x2d + o)?;
    let (n2, rstd2) = norm(&layer.post_attention_layernorm, &x1)?;
    let (g, xa_g) = lin(&layer.mlp.gate_proj, &n2)?;
    let (u, xa_u) = lin(&layer.mlp.up_proj, &n2)?;
    let act = ops::swiglu(&g, &u)?;
    let (down, xa_d) = lin(&layer.mlp.down_proj, &act)?;
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
        x1,
        rstd2,
        n2,
        g,
        u,
        act,
    };
    Ok((y.reshape((b, t, h))?, acts))
}

fn norm(n: &RmsNorm, x: &Tensor) -> Result<(Tensor, Tensor)> {
    ops::rms_norm(x, &n.weight, n.eps as f64)
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
    cos: &Tensor,
    sin: &Tensor,
    training: LayerTraining,
) -> Result<(Tensor, LayerGrads)> {
    let (b, t, h) = dy.dims3()?;
    let a = &layer.self_attn;
    let (nh, nkv, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
    let want_param_grads = training.weights;
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
            let dx = ops::linear_backward_input(dy, &l.weight)?;
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
    let dy = dy.reshape((b * t, h))?;

    // MLP branch: y = x1 + down(swiglu(gate(n2), up(n2))).
    let d_act = lin_back(6, "mlp.down_proj", &layer.mlp.down_proj, &dy, &acts.act)?;
    let (dg, du) = ops::swiglu_backward(&d_act, &acts.g, &acts.u)?;
    let dn2 = (lin_back(4, "mlp.gate_proj", &layer.mlp.gate_proj, &dg, &acts.n2)?
        + lin_back(5, "mlp.up_proj", &layer.mlp.up_proj, &du, &acts.n2)?)?;
    let ln2 = &layer.post_attention_layernorm;
    let (dx1_norm, dw_ln2) = ops::rms_norm_backward(&dn2, &acts.x1, &ln2.weight, &acts.rstd2)?;
    let dx1 = (&dy + dx1_norm)?;

    // Attention branch: x1 = x + o_proj(attn(rope(q), rope(k), v)).
    let d_attn = lin_back(3, "self_attn.o_proj", &a.o_proj, &dx1, &acts.attn)?;
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
    let mut norm_grads = Vec::new();
    let dq = head_norm_backward(
        a.q_norm.as_ref(),
        &dq,
        &acts.q_pre,
        acts.q_rstd.as_ref(),
        hd,
        "self_attn.q_norm.weight",
        &mut norm_grads,
    )?;
    let dk = head_norm_backward(
        a.k_norm.as_ref(),
        &dk,
        &acts.k_pre,
        acts.k_rstd.as_ref(),
        hd,
        "self_attn.k_norm.weight",
        &mut norm_grads,
    )?;
    let dn1 = ((lin_back(0, "self_attn.q_proj", &a.q_proj, &dq, &acts.n1)?
        + lin_back(1, "self_attn.k_proj", &a.k_proj, &dk, &acts.n1)?)?
        + lin_back(2, "self_attn.v_proj", &a.v_proj, &dv, &acts.n1)?)?;
    let ln1 = &layer.input_layernorm;
    let (dx_norm, dw_ln1) = ops::rms_norm_backward(&dn1, &acts.x, &ln1.weight, &acts.rstd1)?;
    let dx = (dx1 + dx_norm)?;
    if want_param_grads {
        grads.push(("post_attention_layernorm.weight".into(), dw_ln2));
        grads.push(("input_layernorm.weight".into(), dw_ln1));
        grads.extend(norm_grads);
    }
    Ok((dx.reshape((b, t, h))?, grads))
}

fn head_norm_backward(
    n: Option<&RmsNorm>,
    dy: &Tensor,
    x: &Tensor,
    rstd: Option<&Tensor>,
    hd: usize,
    name: &str,
    grads: &mut LayerGrads,
) -> Result<Tensor> {
    match (n, rstd) {
        (Some(n), Some(rstd)) => {
            let (rows, width) = dy.dims2()?;
            let shape = (rows * width / hd, hd);
            let (dx, dw) =
                ops::rms_norm_backward(&dy.reshape(shape)?, &x.reshape(shape)?, &n.weight, rstd)?;
            grads.push((name.to_string(), dw));
            dx.reshape((rows, width))
        }
        _ => Ok(dy.clone()),
    }
}
