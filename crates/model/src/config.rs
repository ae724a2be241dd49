//! Model hyper-parameters, read from a Hugging Face `config.json` or GGUF metadata.

use std::path::Path;

use mode_io::{GgufFile, HfFolder};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The model families we can load. They share one decoder layer; the differences are flags in
/// [`Config`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Qwen2,
    Qwen3,
}

const SUPPORTED: &str =
    "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM (GGUF: llama, qwen2, qwen3)";

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
    /// RMSNorm over each head of q and k before RoPE (Qwen3).
    pub qk_norm: bool,
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
        }
    }

    /// A tiny model of the given architecture for tests: 2 layers, hidden 64, GQA 4/2.
    pub fn tiny(architecture: Architecture) -> Self {
        Self {
            architecture,
            vocab_size: 256,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 512,
            tie_word_embeddings: architecture != Architecture::Qwen2,
            attention_bias: architecture == Architecture::Qwen2,
            qk_norm: architecture == Architecture::Qwen3,
        }
    }

    /// Reads a Hugging Face `config.json` (already parsed by [`HfFolder`]).
    pub fn from_hf(folder: &HfFolder) -> Result<Self> {
        Self::from_hf_json(folder.config(), &folder.config_path())
    }

    /// The Hugging Face `config.json` of this configuration (what [`Self::from_hf_json`] reads).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let arch = match self.architecture {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        };
        let mut json = serde_json::json!({
            "architectures": [arch],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
        });
        if let Some(r) = &self.rope_scaling {
            json["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3",
                "factor": r.factor,
                "low_freq_factor": r.low_freq_factor,
                "high_freq_factor": r.high_freq_factor,
                "original_max_position_embeddings": r.original_max_position_embeddings,
            });
        }
        json
    }

    /// Parses the fields of a Hugging Face `config.json`; `path` is used in errors.
    pub fn from_hf_json(json: &serde_json::Value, path: &Path) -> Result<Self> {
        let err = |msg: String| Error::Config {
            path: path.to_path_buf(),
            msg,
        };
        let arch_name = json
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .or_else(|| json.get("model_type").and_then(|m| m.as_str()))
            .ok_or_else(|| err("neither `architectures` nor `model_type` is set".into()))?;
        let architecture = match arch_name {
            "LlamaForCausalLM" | "llama" => Architecture::Llama,
            "Qwen2ForCausalLM" | "qwen2" => Architecture::Qwen2,
            "Qwen3ForCausalLM" | "qwen3" => Architecture::Qwen3,
            other => {
                return Err(Error::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    arch: other.to_string(),
                    supported: SUPPORTED,
                })
            }
        };
        let usize_field = |key: &str| -> Result<usize> {
            json.get(key)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| err(format!("`{key}` is missing or not an integer")))
        };
        let hidden_size = usize_field("hidden_size")?;
        let num_attention_heads = usize_field("num_attention_heads")?;
        let num_key_value_heads = usize_field("num_key_value_heads").unwrap_or(num_attention_heads);
        let head_dim = json
            .get("head_dim")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        // Newer transformers versions move RoPE settings into `rope_parameters`.
        let rope = json.get("rope_parameters").filter(|v| v.is_object());
        let rope_theta = json
            .get("rope_theta")
            .or_else(|| rope.and_then(|r| r.get("rope_theta")))
            .and_then(|v| v.as_f64())
            .unwrap_or(10000.0);
        let scaling = json.get("rope_scaling").filter(|v| v.is_object()).or(rope);
        let rope_scaling = match scaling {
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(|v| v.as_str())
                    .unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => {
                        let f = |key: &str| {
                            s.get(key).and_then(|v| v.as_f64()).ok_or_else(|| {
                                err(format!("rope scaling field `{key}` is missing"))
                            })
                        };
                        Some(RopeScaling {
                            factor: f("factor")?,
                            low_freq_factor: f("low_freq_factor")?,
                            high_freq_factor: f("high_freq_factor")?,
                            original_max_position_embeddings: f("original_max_position_embeddings")?
                                as usize,
                        })
                    }
                    other => {
                        return Err(err(format!("RoPE scaling `{other}` is not supported yet")))
                    }
                }
            }
            None => None,
        };
        let bool_field =
            |key: &str, default: bool| json.get(key).and_then(|v| v.as_bool()).unwrap_or(default);
        if bool_field("mlp_bias", false) {
            return Err(err("`mlp_bias = true` is not supported".into()));
        }
        let config = Self {
            architecture,
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_hidden_layers: usize_field("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: json
                .get("rms_norm_eps")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: usize_field("max_position_embeddings").unwrap_or(4096),
            tie_word_embeddings: bool_field("tie_word_embeddings", false),
            attention_bias: match architecture {
                Architecture::Qwen2 => true,
                _ => bool_field("attention_bias", false),
            },
            qk_norm: architecture == Architecture::Qwen3,
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Reads GGUF metadata (`general.architecture`, `<arch>.block_count`, ...).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let path = gguf.path();
        let arch_name = gguf.get_str("general.architecture")?;
        let architecture = match arch_name {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
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
        };
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let err = |msg: String| {
            Err(Error::Config {
                path: path.to_path_buf(),
                msg,
            })
        };
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 || self.head_dim == 0 {
            return err("attention heads and head dimension must be positive".into());
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
        if self.hidden_size == 0 || self.vocab_size == 0 || self.num_hidden_layers == 0 {
            return err("hidden size, vocabulary size and layer count must be positive".into());
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

    /// Parameter count of the whole backbone (embeddings counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let mut layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size + 2 * h;
        if self.attention_bias {
            layer += q + 2 * kv;
        }
        if self.qk_norm {
            layer += 2 * self.head_dim;
        }
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_hidden_layers * layer + h + head
    }
}
