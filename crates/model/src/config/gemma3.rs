//! What a Gemma 3 configuration adds to the common fields: the sliding-window layout, two RoPE
//! bases, and the settings `mode` checks rather than implements (soft-capping, a query scale
//! other than the head size, other activations).

use mode_io::GgufFile;
use serde_json::Value;

use super::{present, Config, SlidingWindow};

/// Hugging Face's Gemma 3 defaults, for keys a `config.json` leaves out.
const DEFAULT_ROPE_THETA: f64 = 1_000_000.0;
const DEFAULT_LOCAL_ROPE_THETA: f64 = 10_000.0;
const DEFAULT_WINDOW: usize = 4096;
const DEFAULT_GLOBAL_EVERY: usize = 6;

/// Completes `config` (read with the common rules) from a Gemma 3 `config.json`; `Err(msg)`
/// names the key that is wrong or not supported.
pub(super) fn complete_from_hf(config: &mut Config, json: &Value) -> Result<(), String> {
    for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
        if present(json.get(key)).is_some() {
            return Err(format!("`{key}` is set; soft-capping is not supported yet"));
        }
    }
    if present(json.get("use_bidirectional_attention")).and_then(Value::as_bool) == Some(true) {
        return Err(
            "`use_bidirectional_attention = true` (an embedding model) is not a causal LM".into(),
        );
    }
    let activation = present(json.get("hidden_activation"))
        .or_else(|| present(json.get("hidden_act")))
        .map_or(Some("gelu_pytorch_tanh"), Value::as_str);
    if !matches!(activation, Some("gelu_pytorch_tanh" | "gelu_tanh")) {
        return Err(format!(
            "`hidden_activation` {activation:?} is not supported (only gelu_pytorch_tanh)"
        ));
    }
    let number = |v: Option<&Value>, key: &str| -> Result<Option<f64>, String> {
        present(v)
            .map(|v| {
                v.as_f64()
                    .ok_or(format!("`{key}` must be a number, got {v}"))
            })
            .transpose()
    };
    let scalar = number(json.get("query_pre_attn_scalar"), "query_pre_attn_scalar")?
        .unwrap_or(config.head_dim as f64);
    if scalar != config.head_dim as f64 {
        return Err(format!(
            "`query_pre_attn_scalar` {scalar} differs from `head_dim` {}; only queries scaled by \
             1/sqrt(head_dim) are supported",
            config.head_dim
        ));
    }

    // RoPE: transformers 5 nests the two bases under `rope_parameters.{full,sliding}_attention`;
    // older files say `rope_theta` and `rope_local_base_freq`.
    let nested = |kind: &str| json.get("rope_parameters").and_then(|r| r.get(kind));
    for kind in ["full_attention", "sliding_attention"] {
        let rope_type = nested(kind).and_then(|r| present(r.get("rope_type")));
        if let Some(t) = rope_type.filter(|t| t.as_str() != Some("default")) {
            return Err(format!(
                "RoPE type {t} for {kind} layers is not supported yet (only default)"
            ));
        }
    }
    config.rope_theta = match number(json.get("rope_theta"), "rope_theta")? {
        Some(theta) => theta,
        None => number(
            nested("full_attention").and_then(|r| r.get("rope_theta")),
            "rope_parameters.full_attention.rope_theta",
        )?
        .unwrap_or(DEFAULT_ROPE_THETA),
    };
    let local_rope_theta = match number(json.get("rope_local_base_freq"), "rope_local_base_freq")? {
        Some(theta) => theta,
        None => number(
            nested("sliding_attention").and_then(|r| r.get("rope_theta")),
            "rope_parameters.sliding_attention.rope_theta",
        )?
        .unwrap_or(DEFAULT_LOCAL_ROPE_THETA),
    };
    let size = match present(json.get("sliding_window")) {
        None => DEFAULT_WINDOW,
        Some(v) => v.as_u64().filter(|&n| n > 0).ok_or(format!(
            "`sliding_window` must be a positive integer, got {v}"
        ))? as usize,
    };
    let global_every = global_every(json, config.num_hidden_layers)?;
    config.sliding_window = Some(SlidingWindow {
        size,
        global_every,
        local_rope_theta,
    });
    config.qk_norm = true;
    config.tie_word_embeddings = present(json.get("tie_word_embeddings"))
        .map_or(Some(true), Value::as_bool)
        .ok_or("`tie_word_embeddings` must be true or false")?;
    Ok(())
}

/// The period of global layers, from `layer_types` (newer files) or `sliding_window_pattern`;
/// refuses a list that is not "every n-th layer global".
fn global_every(json: &Value, layers: usize) -> Result<usize, String> {
    if let Some(types) = present(json.get("layer_types")) {
        let types = types
            .as_array()
            .ok_or(format!("`layer_types` must be a list, got {types}"))?;
        let global: Vec<bool> = types
            .iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(true),
                Some("sliding_attention") => Ok(false),
                _ => Err(format!(
                    "`layer_types` holds {t}, not full_ or sliding_attention"
                )),
            })
            .collect::<Result<_, _>>()?;
        if global.len() != layers {
            return Err(format!(
                "`layer_types` lists {} layers, the model has {layers}",
                global.len()
            ));
        }
        let every = global.iter().position(|&g| g).map_or(layers + 1, |i| i + 1);
        let regular = global
            .iter()
            .enumerate()
            .all(|(i, &g)| g == (i + 1).is_multiple_of(every));
        if !regular {
            return Err(
                "`layer_types` is not one global layer every n layers; not supported yet".into(),
            );
        }
        return Ok(every);
    }
    match present(json.get("sliding_window_pattern"))
        .or_else(|| present(json.get("_sliding_window_pattern")))
    {
        None => Ok(DEFAULT_GLOBAL_EVERY),
        Some(v) => v
            .as_u64()
            .filter(|&n| n > 0)
            .map(|n| n as usize)
            .ok_or(format!(
                "`sliding_window_pattern` must be a positive integer, got {v}"
            )),
    }
}

/// The Gemma 3 keys of [`Config::to_hf_json`], added to the common ones.
pub(super) fn hf_json_extras(config: &Config, json: &mut Value) {
    let Some(w) = &config.sliding_window else {
        return;
    };
    let layer_types: Vec<&str> = (0..config.num_hidden_layers)
        .map(|i| match config.layer_window(i) {
            Some(_) => "sliding_attention",
            None => "full_attention",
        })
        .collect();
    json["model_type"] = "gemma3_text".into();
    json["hidden_activation"] = "gelu_pytorch_tanh".into();
    json["query_pre_attn_scalar"] = config.head_dim.into();
    json["sliding_window"] = w.size.into();
    json["layer_types"] = serde_json::json!(layer_types);
    json["rope_local_base_freq"] = w.local_rope_theta.into();
    json["rope_parameters"] = serde_json::json!({
        "full_attention": {"rope_type": "default", "rope_theta": config.rope_theta},
        "sliding_attention": {"rope_type": "default", "rope_theta": w.local_rope_theta},
    });
    json["final_logit_softcapping"] = Value::Null;
    json["attn_logit_softcapping"] = Value::Null;
}

/// Completes `config` from a `gemma3` GGUF file. Converted files hold the window size but not
/// the layout nor the local RoPE base; like llama.cpp, take Gemma 3's (a global layer every
/// sixth, local base 10,000) unless the file says otherwise
/// (`gemma3.attention.sliding_window_pattern`, `gemma3.rope.freq_base_swa`).
pub(super) fn complete_from_gguf(config: &mut Config, gguf: &GgufFile) -> Result<(), String> {
    let text = |e: mode_io::Error| e.to_string();
    if let Some(kind) = gguf.metadata("gemma3.rope.scaling.type") {
        let factor = gguf.opt_f64("gemma3.rope.scaling.factor").map_err(text)?;
        if factor.is_some_and(|f| f != 1.0) {
            return Err(format!(
                "RoPE scaling {kind:?} (factor {factor:?}) is not supported yet"
            ));
        }
    }
    // Gemma 3 27B scales queries by 1/sqrt(hidden / heads), which the file does not say.
    if config.num_hidden_layers == 62 {
        return Err("Gemma 3 27B (62 layers) scales queries differently; not supported yet".into());
    }
    let size = gguf
        .opt_u64("gemma3.attention.sliding_window")
        .map_err(text)?
        .map_or(DEFAULT_WINDOW, |n| n as usize);
    if size == 0 {
        return Err("`gemma3.attention.sliding_window` must be positive, got 0".into());
    }
    let local_rope_theta = gguf
        .opt_f64("gemma3.rope.freq_base_swa")
        .map_err(text)?
        .unwrap_or(DEFAULT_LOCAL_ROPE_THETA);
    let global_every = match gguf
        .opt_u64("gemma3.attention.sliding_window_pattern")
        .map_err(text)?
    {
        None => DEFAULT_GLOBAL_EVERY,
        Some(0) => return Err("`gemma3.attention.sliding_window_pattern` must be positive".into()),
        Some(n) => n as usize,
    };
    config.sliding_window = Some(SlidingWindow {
        size,
        global_every,
        local_rope_theta,
    });
    if gguf
        .opt_f64("gemma3.attention.layer_norm_rms_epsilon")
        .map_err(text)?
        .is_none()
    {
        config.rms_norm_eps = 1e-6;
    }
    if gguf
        .opt_f64("gemma3.rope.freq_base")
        .map_err(text)?
        .is_none()
    {
        config.rope_theta = DEFAULT_ROPE_THETA;
    }
    Ok(())
}
