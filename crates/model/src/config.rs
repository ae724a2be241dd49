//! Model hyper-parameters, read from a Hugging Face `config.json` or GGUF metadata.

use std::path::Path;

use mode_io::GgufFile;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

mod gemma3;
mod hf;

/// The model families we can load. They share one decoder layer; the differences are flags in
/// [`Config`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Qwen2,
    Qwen3,
    /// Gemma 3 (text): sandwich norms with a `1 + weight` scale, GELU-tanh MLP, embeddings scaled
    /// by `sqrt(hidden)`, q/k norm, interleaved sliding-window attention ([`SlidingWindow`]).
    Gemma3,
}

/// How an MLP squashes its gate before multiplying by the up projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(g) * u` (SwiGLU: Llama, Qwen).
    Silu,
    /// `gelu_tanh(g) * u` (GeGLU with the tanh approximation: Gemma).
    GeluTanh,
}

/// Interleaved local and global attention (Gemma 3): every `global_every`-th layer attends to
/// the whole context with RoPE base `rope_theta`; the others see the last `size` positions
/// (themselves included) with RoPE base `local_rope_theta`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlidingWindow {
    pub size: usize,
    pub global_every: usize,
    pub local_rope_theta: f64,
}

/// Where a [`Config`] was read from, for the key names in errors.
#[derive(Clone, Copy)]
enum Source {
    Hf,
    Gguf,
}

impl Architecture {
    /// The architecture's name in GGUF metadata (`general.architecture`).
    fn gguf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Gemma3 => "gemma3",
        }
    }
}

/// A JSON value that is there and not `null` (Hugging Face writes `null` for "not set").
fn present(v: Option<&serde_json::Value>) -> Option<&serde_json::Value> {
    v.filter(|v| !v.is_null())
}

const SUPPORTED: &str = "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM \
     (GGUF: llama, qwen2, qwen3, gemma3)";

/// Llama 3.x frequency-dependent RoPE scaling (`rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Everything needed to build a backbone of a supported architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub attention_bias: bool,
    /// RMSNorm over each head of q and k before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Interleaved sliding-window attention (Gemma 3); `None`: every layer attends globally.
    /// Left out of the serialised form when `None`, so the fingerprints of configurations that
    /// predate it do not change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<SlidingWindow>,
}

impl Config {
    /// The SmolLM2-135M shape (the default backbone), used by benchmarks with random weights.
    pub fn smollm2_135m() -> Self {
        Self {
            architecture: Architecture::Llama,
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 100000.0,
            rope_scaling: None,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            attention_bias: false,
            qk_norm: false,
            sliding_window: None,
        }
    }

    /// A tiny model of the given architecture for tests: 2 layers, hidden 64, GQA 4/2. Gemma 3
    /// gets 3 layers, a window of 4 positions and a global layer every third, so that tests see
    /// both kinds of layer and a window that masks.
    pub fn tiny(architecture: Architecture) -> Self {
        let gemma = architecture == Architecture::Gemma3;
        Self {
            architecture,
            vocab_size: 256,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: if gemma { 3 } else { 2 },
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 512,
            tie_word_embeddings: architecture != Architecture::Qwen2,
            attention_bias: architecture == Architecture::Qwen2,
            qk_norm: matches!(architecture, Architecture::Qwen3 | Architecture::Gemma3),
            sliding_window: gemma.then_some(SlidingWindow {
                size: 4,
                global_every: 3,
                local_rope_theta: 100.0,
            }),
        }
    }

    /// The MLP's activation.
    pub fn activation(&self) -> Activation {
        match self.architecture {
            Architecture::Gemma3 => Activation::GeluTanh,
            _ => Activation::Silu,
        }
    }

    /// What RMSNorm adds to its stored weight before scaling: Gemma stores `weight` and scales by
    /// `1 + weight` (Hugging Face convention; GGUF files store `1 + weight`, undone at load).
    pub fn norm_weight_offset(&self) -> f64 {
        match self.architecture {
            Architecture::Gemma3 => 1.0,
            _ => 0.0,
        }
    }

    /// The factor token embeddings are multiplied by on the way in (`sqrt(hidden)` for Gemma).
    pub fn embedding_scale(&self) -> Option<f64> {
        match self.architecture {
            Architecture::Gemma3 => Some((self.hidden_size as f64).sqrt()),
            _ => None,
        }
    }

    /// Whether attention and MLP outputs are normed again before the residual add (Gemma's
    /// "sandwich" norms: four norms per layer instead of two).
    pub fn sandwich_norms(&self) -> bool {
        self.architecture == Architecture::Gemma3
    }

    /// The attention window of layer `layer`: `Some(size)` for a sliding-window layer, `None`
    /// for a global one.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        self.sliding_window
            .as_ref()
            .filter(|w| !(layer + 1).is_multiple_of(w.global_every))
            .map(|w| w.size)
    }

    /// Reads GGUF metadata (`general.architecture`, `<arch>.block_count`, ...).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let path = gguf.path();
        let arch_name = gguf.get_str("general.architecture")?;
        let architecture = match arch_name {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            "gemma3" => Architecture::Gemma3,
            other => {
                return Err(Error::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    arch: other.to_string(),
                    supported: SUPPORTED,
                })
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let get = |k: &str| -> Result<usize> { Ok(gguf.get_u64(&key(k))? as usize) };
        let hidden_size = get("embedding_length")?;
        let num_attention_heads = get("attention.head_count")?;
        let num_key_value_heads = gguf
            .opt_u64(&key("attention.head_count_kv"))?
            .map(|v| v as usize)
            .unwrap_or(num_attention_heads);
        let head_dim = gguf
            .opt_u64(&key("attention.key_length"))?
            .map(|v| v as usize)
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        let vocab_size = match gguf.opt_u64(&key("vocab_size"))? {
            Some(v) => v as usize,
            None => *gguf
                .tensor_shape("token_embd.weight")?
                .first()
                .ok_or_else(|| Error::Config {
                    path: path.to_path_buf(),
                    msg: format!(
                        "`{}` is not set and tensor `token_embd.weight` has no dimensions",
                        key("vocab_size")
                    ),
                })?,
        };
        let config = Self {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: get("feed_forward_length")?,
            num_hidden_layers: get("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: gguf
                .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_theta: gguf.opt_f64(&key("rope.freq_base"))?.unwrap_or(10000.0),
            // Llama 3.x GGUFs carry the scaling as a precomputed `rope_freqs.weight` tensor,
            // which `Backbone` applies when present.
            rope_scaling: None,
            max_position_embeddings: gguf
                .opt_u64(&key("context_length"))?
                .map(|v| v as usize)
                .unwrap_or(4096),
            tie_word_embeddings: !gguf.has_tensor("output.weight"),
            attention_bias: gguf.has_tensor("blk.0.attn_q.bias"),
            qk_norm: gguf.has_tensor("blk.0.attn_q_norm.weight"),
            sliding_window: None,
        };
        let mut config = config;
        if architecture == Architecture::Gemma3 {
            gemma3::complete_from_gguf(&mut config, gguf).map_err(|msg| Error::Config {
                path: path.to_path_buf(),
                msg,
            })?;
        }
        config.validate(path, Source::Gguf)?;
        Ok(config)
    }

    /// Refuses what would divide by zero, overflow or quietly give NaN further on; `source`
    /// picks the key names errors quote.
    fn validate(&self, path: &Path, source: Source) -> Result<()> {
        let err = |msg: String| {
            Err(Error::Config {
                path: path.to_path_buf(),
                msg,
            })
        };
        let sizes = [
            (
                "attention heads",
                self.num_attention_heads,
                "num_attention_heads",
                "attention.head_count",
            ),
            (
                "key/value heads",
                self.num_key_value_heads,
                "num_key_value_heads",
                "attention.head_count_kv",
            ),
            (
                "head dimension",
                self.head_dim,
                "head_dim",
                "attention.key_length",
            ),
            (
                "hidden size",
                self.hidden_size,
                "hidden_size",
                "embedding_length",
            ),
            // Zero divided the work among kernel threads by zero.
            (
                "feed-forward width",
                self.intermediate_size,
                "intermediate_size",
                "feed_forward_length",
            ),
            (
                "vocabulary size",
                self.vocab_size,
                "vocab_size",
                "vocab_size",
            ),
            (
                "layer count",
                self.num_hidden_layers,
                "num_hidden_layers",
                "block_count",
            ),
        ];
        for (what, value, hf_key, gguf_key) in sizes {
            if value == 0 {
                let key = match source {
                    Source::Hf => hf_key.to_string(),
                    Source::Gguf => format!("{}.{gguf_key}", self.architecture.gguf_name()),
                };
                return err(format!("{what} must be positive, got 0 (`{key}`)"));
            }
        }
        if self.checked_num_parameters().is_none() {
            return err(format!(
                "the sizes (hidden {}, feed-forward {}, vocabulary {}, {} layers, {} heads of {}) \
                 give more parameters than can be counted",
                self.hidden_size,
                self.intermediate_size,
                self.vocab_size,
                self.num_hidden_layers,
                self.num_attention_heads,
                self.head_dim
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return err(format!(
                "{} attention heads are not a multiple of {} key/value heads",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return err(format!(
                "head dimension {} is odd; RoPE needs it even",
                self.head_dim
            ));
        }
        // Zero, negative or NaN here would not fail: every logit would quietly be NaN.
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return err(format!(
                "RoPE base (rope_theta) must be a positive number, got {}",
                self.rope_theta
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return err(format!(
                "RMSNorm epsilon (rms_norm_eps) must be a positive number, got {}",
                self.rms_norm_eps
            ));
        }
        if let Some(w) = &self.sliding_window {
            if w.size == 0 || w.global_every == 0 {
                return err(format!(
                    "a sliding window needs a positive size and layer period, got {w:?}"
                ));
            }
            if !(w.local_rope_theta.is_finite() && w.local_rope_theta > 0.0) {
                return err(format!(
                    "the local RoPE base must be a positive number, got {}",
                    w.local_rope_theta
                ));
            }
        }
        if let Some(r) = &self.rope_scaling {
            let ok = |v: f64| v.is_finite() && v > 0.0;
            if !(ok(r.factor)
                && ok(r.low_freq_factor)
                && ok(r.high_freq_factor)
                && r.low_freq_factor != r.high_freq_factor
                && r.original_max_position_embeddings > 0)
            {
                return err(format!(
                    "RoPE scaling {r:?} needs positive factors, distinct low and high frequency \
                     factors and a positive original length"
                ));
            }
        }
        Ok(())
    }

    /// Parameter count of the whole backbone (embeddings counted once when tied); `usize::MAX`
    /// for sizes whose count overflows (a loaded config never has them: see
    /// [`Self::checked_num_parameters`]).
    pub fn num_parameters(&self) -> usize {
        self.checked_num_parameters().unwrap_or(usize::MAX)
    }

    /// Parameter count of the whole backbone, or `None` when it overflows (sizes from a
    /// damaged or hostile config).
    pub fn checked_num_parameters(&self) -> Option<usize> {
        let mul = |a: usize, b: usize| a.checked_mul(b);
        let h = self.hidden_size;
        let q = mul(self.num_attention_heads, self.head_dim)?;
        let kv = mul(self.num_key_value_heads, self.head_dim)?;
        let mut layer = [
            mul(h, q)?,
            mul(mul(2, h)?, kv)?,
            mul(q, h)?,
            mul(mul(3, h)?, self.intermediate_size)?,
            mul(2, h)?,
        ]
        .into_iter()
        .try_fold(0usize, |a, b| a.checked_add(b))?;
        if self.attention_bias {
            layer = layer.checked_add(q.checked_add(mul(2, kv)?)?)?;
        }
        if self.qk_norm {
            layer = layer.checked_add(mul(2, self.head_dim)?)?;
        }
        if self.sandwich_norms() {
            layer = layer.checked_add(mul(2, h)?)?;
        }
        let embed = mul(self.vocab_size, h)?;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        [embed, mul(self.num_hidden_layers, layer)?, h, head]
            .into_iter()
            .try_fold(0usize, |a, b| a.checked_add(b))
    }
}
