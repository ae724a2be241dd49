//! Where a backbone's tensors come from, always addressed by Hugging Face tensor names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mode_io::{GgufFile, HfFolder};

use crate::{Architecture, Config, Error, Result};

/// A source of named tensors: a GGUF file, a Hugging Face folder, or tensors in memory.
pub enum Weights {
    Gguf(GgufFile),
    Hf(HfFolder),
    Map {
        tensors: HashMap<String, Tensor>,
        label: PathBuf,
    },
}

impl Weights {
    /// The file or folder the weights come from (for errors and fingerprints).
    pub fn path(&self) -> &Path {
        match self {
            Weights::Gguf(g) => g.path(),
            Weights::Hf(h) => h.dir(),
            Weights::Map { label, .. } => label,
        }
    }

    /// Loads `name` (a Hugging Face tensor name), checks it has `shape`, converts it to `dtype`.
    ///
    /// GGUF files store llama Q/K projections with rows permuted for interleaved RoPE, and Gemma
    /// norm scales as `1 + weight`; both are undone here so that every source yields the Hugging
    /// Face layout.
    pub fn get(
        &self,
        config: &Config,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let (tensor, stored_name) = match self {
            Weights::Gguf(g) => {
                let gguf_name = gguf_name(config.architecture, name);
                let stored = g.tensor_shape(&gguf_name)?;
                check_shape(g.path(), &gguf_name, shape, &stored)?;
                let mut t = g.tensor(&gguf_name, dtype, device)?;
                match config.architecture {
                    Architecture::Llama if name.ends_with("self_attn.q_proj.weight") => {
                        t = unpermute_rope_rows(&t, config.num_attention_heads)?;
                    }
                    Architecture::Llama if name.ends_with("self_attn.k_proj.weight") => {
                        t = unpermute_rope_rows(&t, config.num_key_value_heads)?;
                    }
                    _ if name.ends_with("norm.weight") && config.norm_weight_offset() != 0.0 => {
                        t = t.affine(1.0, -config.norm_weight_offset())?;
                    }
                    _ => {}
                }
                (t, gguf_name)
            }
            Weights::Hf(h) => {
                let stored = h.tensor_shape(name)?;
                check_shape(h.dir(), name, shape, &stored)?;
                (h.tensor(name, dtype, device)?, name.to_string())
            }
            Weights::Map { tensors, label } => {
                let t = tensors
                    .get(name)
                    .ok_or_else(|| mode_io::Error::MissingTensor {
                        path: label.clone(),
                        name: name.to_string(),
                    })?;
                check_shape(label, name, shape, t.dims())?;
                (t.to_dtype(dtype)?.to_device(device)?, name.to_string())
            }
        };
        // One pass over the values (a sum: NaN and infinities propagate), so that broken
        // weights are refused here rather than turning every loss and logit into NaN later.
        let sum = tensor.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        if !sum.is_finite() {
            return Err(Error::NonFinite {
                path: self.path().to_path_buf(),
                name: stored_name,
            });
        }
        Ok(tensor)
    }

    /// Whether a tensor of this Hugging Face name exists.
    pub fn contains(&self, config: &Config, name: &str) -> bool {
        match self {
            Weights::Gguf(g) => g.has_tensor(&gguf_name(config.architecture, name)),
            Weights::Hf(h) => h.has_tensor(name),
            Weights::Map { tensors, .. } => tensors.contains_key(name),
        }
    }

    /// Llama 3.x GGUF files store the RoPE scaling as per-frequency divisors.
    pub fn gguf_rope_freq_factors(&self) -> Result<Option<Vec<f32>>> {
        match self {
            Weights::Gguf(g) if g.has_tensor("rope_freqs.weight") => {
                let t = g.tensor("rope_freqs.weight", DType::F32, &Device::Cpu)?;
                Ok(Some(t.flatten_all()?.to_vec1()?))
            }
            _ => Ok(None),
        }
    }
}

fn check_shape(path: &Path, name: &str, expected: &[usize], got: &[usize]) -> Result<()> {
    if expected != got {
        return Err(Error::Shape {
            path: path.to_path_buf(),
            name: name.to_string(),
            expected: expected.to_vec(),
            got: got.to_vec(),
        });
    }
    Ok(())
}

/// The GGUF (llama.cpp) name of a Hugging Face tensor name in a model of `arch`.
pub fn gguf_name(arch: Architecture, hf: &str) -> String {
    let gemma = arch == Architecture::Gemma3;
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        if let Some((layer, tail)) = rest.split_once('.') {
            let (module, suffix) = tail.rsplit_once('.').unwrap_or((tail, ""));
            let short = match module {
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "self_attn.q_norm" => "attn_q_norm",
                "self_attn.k_norm" => "attn_k_norm",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                "input_layernorm" => "attn_norm",
                "post_attention_layernorm" if gemma => "post_attention_norm",
                "post_attention_layernorm" => "ffn_norm",
                "pre_feedforward_layernorm" => "ffn_norm",
                "post_feedforward_layernorm" => "post_ffw_norm",
                _ => return hf.to_string(),
            };
            return format!("blk.{layer}.{short}.{suffix}");
        }
    }
    hf.to_string()
}

/// Undoes llama.cpp's row permutation of Q/K weights: rows are stored as (head, half, pair)
/// interleaved; Hugging Face keeps each head's two rotary halves contiguous.
fn unpermute_rope_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let head_dim = rows / heads;
    Ok(w.reshape((heads, head_dim / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// The Hugging Face names of a layer's norms, by role. Llama's second norm comes before the MLP
/// and is called `post_attention_layernorm`; Gemma's of that name norms the attention output.
pub(crate) struct NormNames {
    pub attn: &'static str,
    pub attn_out: Option<&'static str>,
    pub mlp: &'static str,
    pub mlp_out: Option<&'static str>,
}

const PRE_NORMS: NormNames = NormNames {
    attn: "input_layernorm",
    attn_out: None,
    mlp: "post_attention_layernorm",
    mlp_out: None,
};

const SANDWICH_NORMS: NormNames = NormNames {
    attn: "input_layernorm",
    attn_out: Some("post_attention_layernorm"),
    mlp: "pre_feedforward_layernorm",
    mlp_out: Some("post_feedforward_layernorm"),
};

pub(crate) fn norm_names(sandwich: bool) -> &'static NormNames {
    if sandwich {
        &SANDWICH_NORMS
    } else {
        &PRE_NORMS
    }
}

/// The names (relative to the layer, without `.weight`) of the hidden-size norms of a layer of
/// `config`'s architecture: the attention's, its output's, the MLP's, its output's.
pub fn hidden_norm_names(config: &Config) -> Vec<&'static str> {
    let n = norm_names(config.sandwich_norms());
    [Some(n.attn), n.attn_out, Some(n.mlp), n.mlp_out]
        .into_iter()
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names() {
        let gguf_name = |hf| gguf_name(Architecture::Llama, hf);
        assert_eq!(
            gguf_name("model.layers.3.self_attn.q_proj.weight"),
            "blk.3.attn_q.weight"
        );
        assert_eq!(
            gguf_name("model.layers.12.mlp.down_proj.weight"),
            "blk.12.ffn_down.weight"
        );
        assert_eq!(
            gguf_name("model.layers.0.self_attn.k_proj.bias"),
            "blk.0.attn_k.bias"
        );
        assert_eq!(
            gguf_name("model.layers.0.post_attention_layernorm.weight"),
            "blk.0.ffn_norm.weight"
        );
        assert_eq!(gguf_name("lm_head.weight"), "output.weight");
        let gemma = |hf| super::gguf_name(Architecture::Gemma3, hf);
        assert_eq!(
            gemma("model.layers.0.post_attention_layernorm.weight"),
            "blk.0.post_attention_norm.weight"
        );
        assert_eq!(
            gemma("model.layers.4.pre_feedforward_layernorm.weight"),
            "blk.4.ffn_norm.weight"
        );
        assert_eq!(
            gemma("model.layers.17.post_feedforward_layernorm.weight"),
            "blk.17.post_ffw_norm.weight"
        );
        assert_eq!(
            gemma("model.layers.2.self_attn.q_norm.weight"),
            "blk.2.attn_q_norm.weight"
        );
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() -> Result<()> {
        // llama.cpp: w.reshape(heads, 2, hd/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (heads, hd, cols) = (3, 8, 5);
        let w = Tensor::arange(0f32, (heads * hd * cols) as f32, &Device::Cpu)?
            .reshape((heads * hd, cols))?;
        let permuted = w
            .reshape((heads, 2, hd / 2, cols))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((heads * hd, cols))?;
        let back = unpermute_rope_rows(&permuted, heads)?;
        let diff = (back - &w)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }
}
