//! The decoder layer shared by all supported architectures, and its parts.
//!
//! This is the inference path: it uses candle's fused kernels (softmax, RMSNorm, RoPE), which
//! have no backward pass. Training goes through the training engine's own ops.

use candle_core::{DType, Device, Module, Tensor};

use crate::{Config, Result, Weights};

/// `y = x W^T (+ b)`. The weight may be stored in a compact dtype (f16/bf16); it is widened to
/// the activation dtype at use.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// A low-rank adapter added to the output, when LoRA is attached.
    pub lora: Option<Lora>,
}

/// LoRA: `y += scale * (x A^T) B^T` with `A: [rank, in]`, `B: [out, rank]`, `scale = alpha / rank`.
#[derive(Debug, Clone)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl Lora {
    /// A fresh adapter as LoRA initialises it: `A` uniform in +-1/sqrt(in) (Kaiming-uniform),
    /// `B` zero, so the layer starts out unchanged.
    pub fn new(
        in_features: usize,
        out_features: usize,
        rank: usize,
        alpha: f64,
        rng: &mut impl rand::Rng,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (in_features as f64).sqrt();
        let a: Vec<f64> = (0..rank * in_features)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        Ok(Self {
            a: Tensor::from_vec(a, (rank, in_features), device)?.to_dtype(dtype)?,
            b: Tensor::zeros((out_features, rank), dtype, device)?,
            scale: alpha / rank as f64,
        })
    }
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = if self.weight.dtype() == x.dtype() {
            self.weight.clone()
        } else {
            self.weight.to_dtype(x.dtype())?
        };
        let dims = x.dims();
        let in_features = dims[dims.len() - 1];
        let rows = x.elem_count() / in_features;
        let y = x.reshape((rows, in_features))?.matmul(&w.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        };
        let y = match &self.lora {
            Some(l) => {
                let (a, b) = (l.a.to_dtype(x.dtype())?, l.b.to_dtype(x.dtype())?);
                let xa = x.reshape((rows, in_features))?.matmul(&a.t()?)?;
                (y + (xa.matmul(&b.t()?)? * l.scale)?)?
            }
            None => y,
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("non-empty dims") = self.out_features();
        y.reshape(out_dims)
    }
}

/// Root-mean-square layer norm with a learned scale.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f32,
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.weight.to_dtype(x.dtype())?;
        if x.dtype() == DType::F64 {
            // The fused kernel has no f64 version; f64 models exist for gradient checks.
            return candle_nn::ops::rms_norm_slow(x, &w, self.eps);
        }
        candle_nn::ops::rms_norm(&x.contiguous()?, &w, self.eps)
    }
}

/// Rotary position embedding: inverse frequencies (with Llama 3 scaling applied) and the
/// cos/sin tables for a range of positions.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
}

impl Rope {
    pub fn new(config: &Config, gguf_freq_factors: Option<&[f32]>) -> Self {
        let d = config.head_dim;
        let mut inv_freq: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / config.rope_theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        if let Some(s) = &config.rope_scaling {
            let low_wavelen = s.original_max_position_embeddings as f64 / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings as f64 / s.high_freq_factor;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                *f = if wavelen < high_wavelen {
                    *f
                } else if wavelen > low_wavelen {
                    *f / s.factor
                } else {
                    let smooth = (s.original_max_position_embeddings as f64 / wavelen
                        - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * *f / s.factor + smooth * *f
                };
            }
        }
        if let Some(factors) = gguf_freq_factors {
            for (f, div) in inv_freq.iter_mut().zip(factors) {
                *f /= *div as f64;
            }
        }
        Self { inv_freq }
    }

    /// The inverse frequency of each rotary pair, scaling applied.
    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// cos and sin tables, each `[len, head_dim / 2]` in f32, for positions `start..start + len`.
    pub fn tables(&self, start: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        self.tables_as(start, len, DType::F32, device)
    }

    /// [`Self::tables`] in `dtype`; angles are computed in f64 before rounding.
    pub fn tables_as(
        &self,
        start: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for pos in start..start + len {
            for f in &self.inv_freq {
                let angle = pos as f64 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let table = |v: Vec<f64>| Tensor::from_vec(v, (len, half), device)?.to_dtype(dtype);
        Ok((table(cos)?, table(sin)?))
    }
}

/// Cached keys and values of one layer, `[batch, kv_heads, seq, head_dim]` each.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    pub kv: Option<(Tensor, Tensor)>,
}

impl LayerCache {
    /// Number of positions cached so far.
    pub fn len(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Causal self-attention with grouped key/value heads.
#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    /// `x`: `[batch, seq, hidden]`; `cos`/`sin` for the new positions; `cache` is extended.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let mut q = self.q_proj.forward(x)?.reshape((b, t, nh, hd))?;
        let mut k = self.k_proj.forward(x)?.reshape((b, t, nkv, hd))?;
        let v = self.v_proj.forward(x)?.reshape((b, t, nkv, hd))?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let (cos, sin) = (cos.to_dtype(q.dtype())?, sin.to_dtype(q.dtype())?);
        let q = candle_nn::rotary_emb::rope(&q.transpose(1, 2)?.contiguous()?, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope(&k.transpose(1, 2)?.contiguous()?, &cos, &sin)?;
        let v = v.transpose(1, 2)?.contiguous()?;

        let (k, v) = match cache {
            Some(cache) => {
                let (k, v) = match cache.kv.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                cache.kv = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };
        let s = k.dims()[2];
        let past = s - t;
        let rep = nh / nkv;

        // Fold the query heads that share a key/value head into the sequence axis, so grouped
        // attention runs as one matmul per kv head without copying keys and values.
        let scale = 1.0 / (hd as f64).sqrt();
        let q = (q * scale)?.reshape((b, nkv, rep * t, hd))?;
        let scores = q.matmul(&k.t()?)?; // [b, nkv, rep*t, s]
        let scores = if t > 1 {
            let mask = causal_mask(t, s, past, x.device())?.to_dtype(scores.dtype())?;
            scores
                .reshape((b, nkv, rep, t, s))?
                .broadcast_add(&mask)?
                .reshape((b, nkv, rep * t, s))?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?; // [b, nkv, rep*t, hd]
        let out = out
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        Ok(self.o_proj.forward(&out)?)
    }
}

/// `[t, s]` additive mask: query i (at absolute position past + i) sees keys 0..=past + i.
pub fn causal_mask(t: usize, s: usize, past: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (t, s), device)?)
}

/// Gated MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}

/// One pre-norm transformer decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// Loads layer `index` under the Hugging Face prefix `model.layers.{index}`.
    pub fn load(
        config: &Config,
        weights: &Weights,
        prefix: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let h = config.hidden_size;
        let q_dim = config.num_attention_heads * config.head_dim;
        let kv_dim = config.num_key_value_heads * config.head_dim;
        let get = |name: &str, shape: &[usize], dt: DType| {
            weights.get(config, &format!("{prefix}.{name}"), shape, dt, device)
        };
        // Norm scales and biases are tiny; keep them in full precision whatever the weight dtype.
        let small = small_dtype(dtype);
        let norm = |name: &str, size: usize| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: get(name, &[size], small)?,
                eps: config.rms_norm_eps as f32,
            })
        };
        let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let weight = get(&format!("{name}.weight"), &[out, inp], dtype)?;
            let bias = if bias {
                Some(get(&format!("{name}.bias"), &[out], small)?)
            } else {
                None
            };
            Ok(Linear::new(weight, bias))
        };
        let bias = config.attention_bias;
        let (q_norm, k_norm) = if config.qk_norm {
            (
                Some(norm("self_attn.q_norm.weight", config.head_dim)?),
                Some(norm("self_attn.k_norm.weight", config.head_dim)?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            input_layernorm: norm("input_layernorm.weight", h)?,
            self_attn: Attention {
                q_proj: linear("self_attn.q_proj", q_dim, h, bias)?,
                k_proj: linear("self_attn.k_proj", kv_dim, h, bias)?,
                v_proj: linear("self_attn.v_proj", kv_dim, h, bias)?,
                o_proj: linear("self_attn.o_proj", h, q_dim, false)?,
                q_norm,
                k_norm,
                num_heads: config.num_attention_heads,
                num_kv_heads: config.num_key_value_heads,
                head_dim: config.head_dim,
            },
            post_attention_layernorm: norm("post_attention_layernorm.weight", h)?,
            mlp: Mlp {
                gate_proj: linear("mlp.gate_proj", config.intermediate_size, h, false)?,
                up_proj: linear("mlp.up_proj", config.intermediate_size, h, false)?,
                down_proj: linear("mlp.down_proj", h, config.intermediate_size, false)?,
            },
        })
    }

    /// The seven projections with their names relative to the layer.
    pub fn linears(&self) -> [(&'static str, &Linear); 7] {
        let a = &self.self_attn;
        [
            ("self_attn.q_proj", &a.q_proj),
            ("self_attn.k_proj", &a.k_proj),
            ("self_attn.v_proj", &a.v_proj),
            ("self_attn.o_proj", &a.o_proj),
            ("mlp.gate_proj", &self.mlp.gate_proj),
            ("mlp.up_proj", &self.mlp.up_proj),
            ("mlp.down_proj", &self.mlp.down_proj),
        ]
    }

    /// Mutable access to the seven projections, for attaching adapters.
    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        let a = &mut self.self_attn;
        [
            ("self_attn.q_proj", &mut a.q_proj),
            ("self_attn.k_proj", &mut a.k_proj),
            ("self_attn.v_proj", &mut a.v_proj),
            ("self_attn.o_proj", &mut a.o_proj),
            ("mlp.gate_proj", &mut self.mlp.gate_proj),
            ("mlp.up_proj", &mut self.mlp.up_proj),
            ("mlp.down_proj", &mut self.mlp.down_proj),
        ]
    }

    /// Whether any projection carries a LoRA adapter.
    pub fn has_lora(&self) -> bool {
        self.linears().iter().any(|(_, l)| l.lora.is_some())
    }

    /// LoRA adapter tensors (`self_attn.q_proj.lora_A`, `...lora_B`) of the layer.
    pub fn lora_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out = Vec::new();
        for (name, l) in self.linears() {
            if let Some(a) = &l.lora {
                out.push((format!("{name}.lora_A"), &a.a));
                out.push((format!("{name}.lora_B"), &a.b));
            }
        }
        out
    }

    /// Every tensor of the layer under its name relative to the layer
    /// (`self_attn.q_proj.weight`, ...).
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let a = &self.self_attn;
        let mut out = vec![
            (
                "input_layernorm.weight".to_string(),
                &self.input_layernorm.weight,
            ),
            (
                "post_attention_layernorm.weight".to_string(),
                &self.post_attention_layernorm.weight,
            ),
        ];
        for (name, l) in self.linears() {
            out.push((format!("{name}.weight"), &l.weight));
            if let Some(b) = &l.bias {
                out.push((format!("{name}.bias"), b));
            }
        }
        if let (Some(q), Some(k)) = (&a.q_norm, &a.k_norm) {
            out.push(("self_attn.q_norm.weight".to_string(), &q.weight));
            out.push(("self_attn.k_norm.weight".to_string(), &k.weight));
        }
        out
    }

    /// A copy whose tensors own fresh storage, so that training it in place leaves `self` as
    /// it was (an expert initialised from a backbone layer).
    pub fn deep_copy(&self) -> Result<Self> {
        let copy = |t: &Tensor| t.copy();
        let lin = |l: &Linear| -> Result<Linear> {
            Ok(Linear::new(
                copy(&l.weight)?,
                l.bias.as_ref().map(copy).transpose()?,
            ))
        };
        let norm = |n: &RmsNorm| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: copy(&n.weight)?,
                eps: n.eps,
            })
        };
        let a = &self.self_attn;
        Ok(Self {
            input_layernorm: norm(&self.input_layernorm)?,
            self_attn: Attention {
                q_proj: lin(&a.q_proj)?,
                k_proj: lin(&a.k_proj)?,
                v_proj: lin(&a.v_proj)?,
                o_proj: lin(&a.o_proj)?,
                q_norm: a.q_norm.as_ref().map(norm).transpose()?,
                k_norm: a.k_norm.as_ref().map(norm).transpose()?,
                num_heads: a.num_heads,
                num_kv_heads: a.num_kv_heads,
                head_dim: a.head_dim,
            },
            post_attention_layernorm: norm(&self.post_attention_layernorm)?,
            mlp: Mlp {
                gate_proj: lin(&self.mlp.gate_proj)?,
                up_proj: lin(&self.mlp.up_proj)?,
                down_proj: lin(&self.mlp.down_proj)?,
            },
        })
    }

    /// Zeroes the attention's and the MLP's output projections (weights and biases): the layer
    /// then adds nothing to its input, whatever its other weights, and still receives gradient
    /// through them.
    pub fn zero_output_projections(&mut self) -> Result<()> {
        for l in [&mut self.self_attn.o_proj, &mut self.mlp.down_proj] {
            l.weight = l.weight.zeros_like()?;
            l.bias = l.bias.as_ref().map(|b| b.zeros_like()).transpose()?;
        }
        Ok(())
    }

    /// `x + attn(norm(x))`, then `+ mlp(norm(.))`.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, cos, sin, cache)?;
        let x = (x + h)?;
        let h = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + h)?)
    }
}

/// The dtype of small tensors (norm scales, biases): f64 for an f64 model, else f32.
pub fn small_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}
