//! A decoder layer's forward pass that keeps what its backward pass needs, and that backward
//! pass. The same code trains a frozen backbone layer (input gradients only), an expert layer
//! (input and weight gradients) and a fully fine-tuned layer.

use candle_core::{Result, Tensor};
use mode_model::layers::{Linear, RmsNorm};
use mode_model::DecoderLayer;

use crate::ops;

/// Activations saved by [`forward`] for [`backward`].
pub struct LayerActivations {
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

fn lin(l: &Linear, x: &Tensor) -> Result<Tensor> {
    ops::linear(x, &l.weight, l.bias.as_ref())
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
    let q_pre = lin(&a.q_proj, &n1)?;
    let k_pre = lin(&a.k_proj, &n1)?;
    let v = lin(&a.v_proj, &n1)?;
    // q/k norm (Qwen3) acts on each head's vector.
    let (q_normed, q_rstd) = head_norm(a.q_norm.as_ref(), &q_pre, hd)?;
    let (k_normed, k_rstd) = head_norm(a.k_norm.as_ref(), &k_pre, hd)?;
    let heads = |m: &Tensor, n: usize| m.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous();
    let q = ops::rope(&heads(&q_normed, nh)?, cos, sin)?;
    let k = ops::rope(&heads(&k_normed, nkv)?, cos, sin)?;
    let v = heads(&v, nkv)?;
    let (o, probs) = ops::attention(&q, &k, &v)?;
    let attn = o.transpose(1, 2)?.reshape((b * t, nh * hd))?;
    let x1 = (&x2d + lin(&a.o_proj, &attn)?)?;
    let (n2, rstd2) = norm(&layer.post_attention_layernorm, &x1)?;
    let g = lin(&layer.mlp.gate_proj, &n2)?;
    let u = lin(&layer.mlp.up_proj, &n2)?;
    let act = ops::swiglu(&g, &u)?;
    let y = (&x1 + lin(&layer.mlp.down_proj, &act)?)?;
    let acts = LayerActivations {
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

/// Backward through the layer. `dy: [b, t, h]`. With `want_param_grads`, also returns the
/// gradients of every parameter of the layer; without, only the input gradient is computed
/// (a frozen layer: no weight gradients at all).
pub fn backward(
    layer: &DecoderLayer,
    acts: &LayerActivations,
    dy: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    want_param_grads: bool,
) -> Result<(Tensor, LayerGrads)> {
    let (b, t, h) = dy.dims3()?;
    let a = &layer.self_attn;
    let (nh, nkv, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
    let mut grads = LayerGrads::new();
    let mut lin_back = |name: &str, l: &Linear, dy: &Tensor, x: &Tensor| -> Result<Tensor> {
        if want_param_grads {
            let (dw, db) = ops::linear_backward_weight(dy, x)?;
            grads.push((format!("{name}.weight"), dw));
            if l.bias.is_some() {
                grads.push((format!("{name}.bias"), db));
            }
        }
        ops::linear_backward_input(dy, &l.weight)
    };
    let dy = dy.reshape((b * t, h))?;

    // MLP branch: y = x1 + down(swiglu(gate(n2), up(n2))).
    let d_act = lin_back("mlp.down_proj", &layer.mlp.down_proj, &dy, &acts.act)?;
    let (dg, du) = ops::swiglu_backward(&d_act, &acts.g, &acts.u)?;
    let dn2 = (lin_back("mlp.gate_proj", &layer.mlp.gate_proj, &dg, &acts.n2)?
        + lin_back("mlp.up_proj", &layer.mlp.up_proj, &du, &acts.n2)?)?;
    let ln2 = &layer.post_attention_layernorm;
    let (dx1_norm, dw_ln2) = ops::rms_norm_backward(&dn2, &acts.x1, &ln2.weight, &acts.rstd2)?;
    let dx1 = (&dy + dx1_norm)?;

    // Attention branch: x1 = x + o_proj(attn(rope(q), rope(k), v)).
    let d_attn = lin_back("self_attn.o_proj", &a.o_proj, &dx1, &acts.attn)?;
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
    let dn1 = ((lin_back("self_attn.q_proj", &a.q_proj, &dq, &acts.n1)?
        + lin_back("self_attn.k_proj", &a.k_proj, &dk, &acts.n1)?)?
        + lin_back("self_attn.v_proj", &a.v_proj, &dv, &acts.n1)?)?;
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
