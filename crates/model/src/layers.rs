//! The decoder layer shared by all supported architectures, and its parts.
//!
//! This is the inference path: it uses candle's fused kernels (softmax, RMSNorm, RoPE), which
//! have no backward pass. Training goes through the training engine's own ops.

use candle_core::{DType, Device, Module, Tensor, D};

pub use crate::attention::{causal_mask, Attention, LayerCache};
use crate::compact::{BlockFormat, QMatrix};
use crate::packed::PackedF32;
pub use crate::rope::{Rope, RopeTables};
use crate::{Activation, Config, Result, Weights};

mod fuse;
pub use fuse::fuse_quantized;
pub(crate) use fuse::fused;

/// `y = x W^T (+ b)`. The weight may be stored compactly (f16/bf16 tensors, or Q8_0/Q4_1
/// blocks); it is widened to the activation dtype at use.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
    /// A low-rank adapter added to the output, when LoRA is attached.
    pub lora: Option<Lora>,
}

/// A projection's `[out, in]` matrix: a tensor (f32, f16, bf16, or f64 in gradient checks), or
/// quantised blocks, which only inference reads.
#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    Quantized(QMatrix),
    /// f32, also held transposed in panels for few-row products (inference only; see
    /// [`crate::packed`]).
    Packed(PackedF32),
}

impl Weight {
    /// The matrix as a tensor; an error for quantised blocks, which training cannot use.
    pub fn tensor(&self) -> candle_core::Result<&Tensor> {
        match self {
            Weight::Dense(t) => Ok(t),
            Weight::Packed(p) => Ok(p.tensor()),
            Weight::Quantized(q) => candle_core::bail!(
                "this operation needs the frozen weights as tensors (--weight-dtype f32, f16 or \
                 bf16); they were loaded as {}, which only inference reads",
                q.format().name()
            ),
        }
    }

    /// `[out, in]`.
    pub fn dims2(&self) -> (usize, usize) {
        match self {
            Weight::Dense(t) => (t.dims()[0], t.dims()[1]),
            Weight::Packed(p) => (p.tensor().dims()[0], p.tensor().dims()[1]),
            Weight::Quantized(q) => (q.rows(), q.cols()),
        }
    }

    /// The matrix as a tensor where it is one (dense or packed); `None` for quantised blocks.
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(t) => Some(t),
            Weight::Packed(p) => Some(p.tensor()),
            Weight::Quantized(_) => None,
        }
    }
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
            weight: Weight::Dense(weight),
            bias,
            lora: None,
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims2().1
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims2().0
    }

    /// Holds the weight as `format` blocks from now on (kept as it is when its rows are not
    /// whole blocks). Inference only: training needs [`Weight::Dense`].
    pub fn quantize(&mut self, format: BlockFormat) -> candle_core::Result<()> {
        if let Weight::Dense(t) = &self.weight {
            if self
                .in_features()
                .is_multiple_of(crate::compact::BLOCK_VALUES)
            {
                self.weight = Weight::Quantized(QMatrix::quantize(t, format)?);
            }
        }
        Ok(())
    }

    /// Holds an f32 weight transposed in panels too from now on, for faster few-row products
    /// ([`crate::packed`]); other weights stay as they are. Inference only: the copy is not
    /// updated if the tensor is trained.
    pub fn pack(&mut self) -> candle_core::Result<()> {
        if let Weight::Dense(t) = &self.weight {
            if let Some(p) = PackedF32::pack(t)? {
                self.weight = Weight::Packed(p);
            }
        }
        Ok(())
    }
}

/// `x W^T` for a tensor `w`: the few-row kernel where it applies, else gemm.
fn dense_matmul(x2: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    match crate::matmul::few_rows_matmul(x2, w)? {
        Some(y) => Ok(y),
        None if w.dtype() == x2.dtype() => x2.matmul(&w.t()?),
        None => x2.matmul(&w.to_dtype(x2.dtype())?.t()?),
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let in_features = dims[dims.len() - 1];
        let rows = x.elem_count() / in_features;
        let x2 = x.reshape((rows, in_features))?;
        let y = match &self.weight {
            Weight::Quantized(q) => crate::matmul::quantized_matmul(&x2, q)?,
            Weight::Packed(p) => match p.few_rows_matmul(&x2)? {
                Some(y) => y,
                None => dense_matmul(&x2, p.tensor())?,
            },
            Weight::Dense(w) => dense_matmul(&x2, w)?,
        };
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

/// Root-mean-square layer norm with a learned scale `offset + weight` (`offset` is 1 for Gemma,
/// whose checkpoints store the scale minus one, and 0 elsewhere).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
    pub offset: f32,
}

impl RmsNorm {
    /// The scale the normalised input is multiplied by: `offset + weight`.
    pub fn scale(&self) -> candle_core::Result<Tensor> {
        if self.offset == 0.0 {
            Ok(self.weight.clone())
        } else {
            self.weight.affine(1.0, self.offset as f64)
        }
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.scale()?.to_dtype(x.dtype())?;
        if x.dtype() == DType::F64 {
            // The fused kernel has no f64 version (and takes an f32 eps); f64 models exist for
            // gradient checks, which want eps exactly.
            let mean_square = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
            let rstd = (mean_square + self.eps)?.sqrt()?.recip()?;
            return x.broadcast_mul(&rstd)?.broadcast_mul(&w);
        }
        candle_nn::ops::rms_norm(&x.contiguous()?, &w, self.eps as f32)
    }
}

/// Gated MLP: `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub activation: Activation,
    /// `gate_proj` and `up_proj` stacked, when both are quantised views of one storage (see
    /// [`fuse_quantized`]): one pass over the weights for the two.
    pub gate_up: Option<Linear>,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (gate, up) = match fused(&self.gate_up, [&self.gate_proj, &self.up_proj]) {
            Some(gate_up) => {
                let both = gate_up.forward(x)?;
                if let Some(h) = crate::serial::gated(&both, self.activation)? {
                    return self.down_proj.forward(&h);
                }
                let i = self.gate_proj.out_features();
                (both.narrow(D::Minus1, 0, i)?, both.narrow(D::Minus1, i, i)?)
            }
            None => (self.gate_proj.forward(x)?, self.up_proj.forward(x)?),
        };
        let gate = match self.activation {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
            // candle's `gelu` is the tanh approximation.
            Activation::GeluTanh => gate.gelu()?,
        };
        self.down_proj.forward(&(gate * up)?)
    }
}

/// One pre-norm transformer decoder layer: `x + [attn_out_norm](attn(attn_norm(x)))`, then
/// `+ [mlp_out_norm](mlp(mlp_norm(.)))`; the bracketed norms exist in sandwich-norm models
/// (Gemma) only.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub attn_norm: RmsNorm,
    pub self_attn: Attention,
    pub attn_out_norm: Option<RmsNorm>,
    pub mlp_norm: RmsNorm,
    pub mlp: Mlp,
    pub mlp_out_norm: Option<RmsNorm>,
}

impl DecoderLayer {
    /// Loads the layer whose tensors are named `{prefix}.{name}` (Hugging Face names, e.g.
    /// `model.layers.3`); `window` is its attention window ([`Config::layer_window`] of the
    /// backbone layer it is or mirrors).
    pub fn load(
        config: &Config,
        weights: &Weights,
        prefix: &str,
        window: Option<usize>,
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
                weight: get(&format!("{name}.weight"), &[size], small)?,
                eps: config.rms_norm_eps,
                offset: config.norm_weight_offset() as f32,
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
                Some(norm("self_attn.q_norm", config.head_dim)?),
                Some(norm("self_attn.k_norm", config.head_dim)?),
            )
        } else {
            (None, None)
        };
        let names = crate::weights::norm_names(config.sandwich_norms());
        Ok(Self {
            attn_norm: norm(names.attn, h)?,
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
                window,
                qkv: None,
            },
            attn_out_norm: names.attn_out.map(|n| norm(n, h)).transpose()?,
            mlp_norm: norm(names.mlp, h)?,
            mlp: Mlp {
                gate_proj: linear("mlp.gate_proj", config.intermediate_size, h, false)?,
                up_proj: linear("mlp.up_proj", config.intermediate_size, h, false)?,
                down_proj: linear("mlp.down_proj", h, config.intermediate_size, false)?,
                activation: config.activation(),
                gate_up: None,
            },
            mlp_out_norm: names.mlp_out.map(|n| norm(n, h)).transpose()?,
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

    /// The layer's norms with their tensor names relative to the layer
    /// (`input_layernorm.weight`, ...), in a fixed order: attention, attention output, MLP, MLP
    /// output, then q and k.
    pub fn norms(&self) -> Vec<(String, &RmsNorm)> {
        let names = crate::weights::norm_names(self.attn_out_norm.is_some());
        let a = &self.self_attn;
        let mut out = vec![(names.attn, &self.attn_norm)];
        if let (Some(n), Some(name)) = (&self.attn_out_norm, names.attn_out) {
            out.push((name, n));
        }
        out.push((names.mlp, &self.mlp_norm));
        if let (Some(n), Some(name)) = (&self.mlp_out_norm, names.mlp_out) {
            out.push((name, n));
        }
        if let (Some(q), Some(k)) = (&a.q_norm, &a.k_norm) {
            out.push(("self_attn.q_norm", q));
            out.push(("self_attn.k_norm", k));
        }
        out.into_iter()
            .map(|(name, n)| (format!("{name}.weight"), n))
            .collect()
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
    /// (`self_attn.q_proj.weight`, ...). Quantised matrices are not tensors and are left out.
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut norms = self.norms().into_iter().map(|(n, norm)| (n, &norm.weight));
        // The order is the one from before sandwich norms: two norms, projections, the rest.
        let mut out: Vec<(String, &Tensor)> = norms.by_ref().take(2).collect();
        for (name, l) in self.linears() {
            if let Some(w) = l.weight.dense() {
                out.push((format!("{name}.weight"), w));
            }
            if let Some(b) = &l.bias {
                out.push((format!("{name}.bias"), b));
            }
        }
        out.extend(norms);
        out
    }

    /// A copy whose tensors own fresh storage, so that training it in place leaves `self` as
    /// it was (an expert initialised from a backbone layer). Quantised matrices come back
    /// widened to f32 tensors.
    pub fn deep_copy(&self) -> Result<Self> {
        let copy = |t: &Tensor| t.copy();
        let lin = |l: &Linear| -> Result<Linear> {
            let weight = match &l.weight {
                Weight::Dense(w) => copy(w)?,
                Weight::Packed(p) => copy(p.tensor())?,
                Weight::Quantized(q) => q.dequantize()?,
            };
            Ok(Linear::new(weight, l.bias.as_ref().map(copy).transpose()?))
        };
        let norm = |n: &RmsNorm| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: copy(&n.weight)?,
                eps: n.eps,
                offset: n.offset,
            })
        };
        let a = &self.self_attn;
        Ok(Self {
            attn_norm: norm(&self.attn_norm)?,
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
                window: a.window,
                qkv: None,
            },
            attn_out_norm: self.attn_out_norm.as_ref().map(norm).transpose()?,
            mlp_norm: norm(&self.mlp_norm)?,
            mlp: Mlp {
                gate_proj: lin(&self.mlp.gate_proj)?,
                up_proj: lin(&self.mlp.up_proj)?,
                down_proj: lin(&self.mlp.down_proj)?,
                activation: self.mlp.activation,
                gate_up: None,
            },
            mlp_out_norm: self.mlp_out_norm.as_ref().map(norm).transpose()?,
        })
    }

    /// Stacks q/k/v and gate/up into one projection each where they are quantised, so that a
    /// decode step makes one pass over each stack's weights (and one hand-off to the worker
    /// threads) instead of three and two.
    pub fn fuse_quantized(&mut self) -> Result<()> {
        let a = &mut self.self_attn;
        a.qkv = fuse_quantized(&mut [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj])?;
        let m = &mut self.mlp;
        m.gate_up = fuse_quantized(&mut [&mut m.gate_proj, &mut m.up_proj])?;
        Ok(())
    }

    /// Zeroes the attention's and the MLP's output projections (weights and biases): the layer
    /// then adds nothing to its input, whatever its other weights (an output norm of zero is
    /// zero), and still receives gradient through them.
    pub fn zero_output_projections(&mut self) -> Result<()> {
        for l in [&mut self.self_attn.o_proj, &mut self.mlp.down_proj] {
            l.weight = match &l.weight {
                Weight::Dense(w) => Weight::Dense(w.zeros_like()?),
                Weight::Packed(p) => Weight::Dense(p.tensor().zeros_like()?),
                Weight::Quantized(q) => Weight::Dense(Tensor::zeros(
                    (q.rows(), q.cols()),
                    DType::F32,
                    &Device::Cpu,
                )?),
            };
            l.bias = l.bias.as_ref().map(|b| b.zeros_like()).transpose()?;
        }
        Ok(())
    }

    /// `x + attn(norm(x))`, then `+ mlp(norm(.))`, with the output norms where the layer has
    /// them.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        self.forward_with(x, |h| self.self_attn.forward(h, rope, cache))
    }

    /// [`Self::forward`] for sequences packed in one batch, one token per row, the rows of
    /// sequence `i` (`lens[i]` of them) continuing `caches[i]` (see [`Attention::forward_packed`]).
    pub fn forward_packed(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        caches: &mut [&mut LayerCache],
        lens: &[usize],
    ) -> Result<Tensor> {
        self.forward_with(x, |h| self.self_attn.forward_packed(h, rope, caches, lens))
    }

    fn forward_with(
        &self,
        x: &Tensor,
        attention: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let out_norm = |n: &Option<RmsNorm>, h: Tensor| -> Result<Tensor> {
            Ok(match n {
                Some(n) => n.forward(&h)?,
                None => h,
            })
        };
        let h = attention(&self.attn_norm.forward(x)?)?;
        let x = (x + out_norm(&self.attn_out_norm, h)?)?;
        let h = self.mlp.forward(&self.mlp_norm.forward(&x)?)?;
        Ok((x + out_norm(&self.mlp_out_norm, h)?)?)
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
