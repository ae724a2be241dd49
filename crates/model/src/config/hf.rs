//! `Config` from and to a Hugging Face `config.json`.

use std::path::Path;

use mode_io::HfFolder;

use super::*;

impl Config {
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
            Architecture::Gemma3 => "Gemma3ForCausalLM",
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
        gemma3::hf_json_extras(self, &mut json);
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
        let architecture =
            match arch_name {
                "LlamaForCausalLM" | "llama" => Architecture::Llama,
                "Qwen2ForCausalLM" | "qwen2" => Architecture::Qwen2,
                "Qwen3ForCausalLM" | "qwen3" => Architecture::Qwen3,
                "Gemma3ForCausalLM" | "gemma3_text" => Architecture::Gemma3,
                "Gemma3ForConditionalGeneration" | "gemma3" => return Err(err(
                    "this is the multimodal Gemma 3 (`Gemma3ForConditionalGeneration`); save its \
                     language model alone (`Gemma3ForCausalLM`) and load that"
                        .into(),
                )),
                other => {
                    return Err(Error::UnsupportedArchitecture {
                        path: path.to_path_buf(),
                        arch: other.to_string(),
                        supported: SUPPORTED,
                    })
                }
            };
        // Typed fields: an absent (or null) key takes its default, but a value of the wrong
        // type (`"hidden_size": "576"`) is an error naming the key, never a silent default.
        let typed = |key: &str, v: Option<&serde_json::Value>, want: &str| {
            err(format!(
                "`{key}` must be {want}, got {}",
                v.map_or("nothing".into(), |v| v.to_string())
            ))
        };
        let opt_usize = |key: &str| -> Result<Option<usize>> {
            present(json.get(key))
                .map(|v| {
                    v.as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| typed(key, Some(v), "a non-negative integer"))
                })
                .transpose()
        };
        let usize_field = |key: &str| -> Result<usize> {
            opt_usize(key)?.ok_or_else(|| err(format!("`{key}` is missing")))
        };
        let f64_in = |obj: &serde_json::Value, key: &str| -> Result<Option<f64>> {
            present(obj.get(key))
                .map(|v| v.as_f64().ok_or_else(|| typed(key, Some(v), "a number")))
                .transpose()
        };
        let hidden_size = usize_field("hidden_size")?;
        let num_attention_heads = usize_field("num_attention_heads")?;
        let num_key_value_heads = opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        let head_dim = opt_usize("head_dim")?.unwrap_or(hidden_size / num_attention_heads.max(1));
        // Newer transformers versions move RoPE settings into `rope_parameters`.
        let rope = json.get("rope_parameters").filter(|v| v.is_object());
        let rope_theta = match f64_in(json, "rope_theta")? {
            Some(theta) => Some(theta),
            None => rope.map(|r| f64_in(r, "rope_theta")).transpose()?.flatten(),
        }
        .unwrap_or(10000.0);
        let scaling = json.get("rope_scaling").filter(|v| v.is_object()).or(rope);
        let rope_scaling = match scaling {
            Some(s) => {
                let kind = match present(s.get("rope_type").or_else(|| s.get("type"))) {
                    None => "default",
                    Some(v) => v
                        .as_str()
                        .ok_or_else(|| typed("rope_type", Some(v), "a string"))?,
                };
                match kind {
                    "default" => None,
                    "llama3" => {
                        let f = |key: &str| {
                            f64_in(s, key)?.ok_or_else(|| {
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
        let bool_field = |key: &str, default: bool| -> Result<bool> {
            present(json.get(key)).map_or(Ok(default), |v| {
                v.as_bool()
                    .ok_or_else(|| typed(key, Some(v), "true or false"))
            })
        };
        if bool_field("mlp_bias", false)? {
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
            rms_norm_eps: f64_in(json, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: opt_usize("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: bool_field("tie_word_embeddings", false)?,
            attention_bias: match architecture {
                Architecture::Qwen2 => true,
                _ => bool_field("attention_bias", false)?,
            },
            qk_norm: architecture == Architecture::Qwen3,
            sliding_window: None,
        };
        let mut config = config;
        if architecture == Architecture::Gemma3 {
            gemma3::complete_from_hf(&mut config, json).map_err(err)?;
        }
        config.validate(path, Source::Hf)?;
        Ok(config)
    }
}
