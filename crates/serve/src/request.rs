//! Completion requests: every field read, checked and turned into a [`Job`], or refused.
//!
//! A field the server does not act on is refused with a 400 naming it, unless its value asks
//! for nothing (`"logit_bias": {}`, `"presence_penalty": 0`), as clients often send such
//! defaults. Fields that only label a request (`user`, `metadata`) are accepted.

use axum::body::Bytes;
use axum::http::StatusCode;
use mode_infer::{ChatMessage, SamplingParams};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::{bad, bad_field, ApiError};
use crate::experts::unknown_expert;
use crate::AppState;

/// The two generation endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `POST /v1/completions`: a raw prompt.
    Completions,
    /// `POST /v1/chat/completions`: messages rendered with the chat template.
    Chat,
}

/// Most stop sequences a request may give, as in OpenAI's API.
pub(crate) const MAX_STOPS: usize = 4;

/// Longest stop sequence accepted, in bytes.
const MAX_STOP_BYTES: usize = 256;

/// A checked request, ready to generate.
pub(crate) struct Job {
    pub prompt: String,
    pub max_new_tokens: usize,
    /// Sampling of the first choice; choice `i` uses seed `seed + i`.
    pub params: SamplingParams,
    /// How many answers to generate (`n`).
    pub choices: usize,
    /// Each answer is cut before the first of these.
    pub stop: Vec<String>,
    pub stream: bool,
    /// Streaming: end with a chunk that carries the token counts (`stream_options`).
    pub include_usage: bool,
    /// Experts by name; `None` runs the server's default set, read when the job starts.
    pub experts: Option<Vec<String>>,
    pub top_k: Option<usize>,
    pub threshold: Option<f64>,
}

/// Parses a request body (a JSON object) for `endpoint` into a job.
pub(crate) fn job(s: &AppState, endpoint: Endpoint, body: &Bytes) -> Result<Job, ApiError> {
    let fields: Map<String, Value> = parse(body)?;
    for (key, value) in &fields {
        check_field(endpoint, key, value)?;
    }
    let prompt = match endpoint {
        Endpoint::Completions => prompt_text(fields.get("prompt"))?,
        Endpoint::Chat => {
            let messages: Vec<ChatMessage> = required(&fields, "messages")?;
            if messages.is_empty() {
                return Err(bad_field("messages", "`messages` is empty"));
            }
            s.chat.render(&messages, true).map_err(|e| {
                bad_field("messages", format!("cannot render the chat template: {e}"))
            })?
        }
    };

    let limits = s.limits;
    let max_new_tokens = field::<usize>(&fields, "max_completion_tokens")?
        .or(field::<usize>(&fields, "max_tokens")?)
        .unwrap_or(256.min(limits.max_new_tokens));
    if max_new_tokens == 0 || max_new_tokens > limits.max_new_tokens {
        return Err(bad_field(
            "max_tokens",
            format!(
                "max_tokens must be between 1 and {}, got {max_new_tokens}",
                limits.max_new_tokens
            ),
        ));
    }
    let temperature = field::<f64>(&fields, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad_field(
            "temperature",
            format!("temperature must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = field::<f64>(&fields, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad_field(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let choices = field::<usize>(&fields, "n")?.unwrap_or(1);
    if choices == 0 || choices > limits.max_choices {
        return Err(bad_field(
            "n",
            format!(
                "n must be between 1 and {}, got {choices}",
                limits.max_choices
            ),
        ));
    }
    let stop = stop_sequences(fields.get("stop"))?;
    let stream = field::<bool>(&fields, "stream")?.unwrap_or(false);
    let include_usage = match fields.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => {
            if let Some(k) = o.keys().find(|k| k.as_str() != "include_usage") {
                return Err(bad_field(
                    "stream_options",
                    format!("stream_options: unsupported option `{k}`"),
                ));
            }
            field::<bool>(o, "include_usage")?.unwrap_or(false)
        }
        Some(_) => {
            return Err(bad_field(
                "stream_options",
                "stream_options must be an object",
            ))
        }
    };

    let mut experts = field::<Vec<String>>(&fields, "experts")?;
    if let Some(m) = field::<String>(&fields, "model")? {
        match m.strip_prefix(&format!("{}/", s.name)) {
            // `NAME/EXPERT`, as /v1/models lists it: that expert alone, unless `experts` says.
            Some(expert) => {
                experts.get_or_insert_with(|| vec![expert.to_string()]);
            }
            None if m == s.name => {}
            None => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!(
                        "model `{m}` is not served here; GET /v1/models lists `{}`",
                        s.name
                    ),
                )
                .param("model"))
            }
        }
    }
    // Checked now to answer at once; checked again when the job starts, as experts may come
    // and go while it waits.
    if let Some(names) = &experts {
        let loaded = s.expert_set().loaded;
        if let Some(name) = names.iter().find(|n| !loaded.contains(n)) {
            return Err(unknown_expert(name, &loaded).param("experts"));
        }
    }
    let threshold = field::<f64>(&fields, "gate_threshold")?.or(s.threshold);
    if let Some(t) = threshold {
        if !(0.0..1.0).contains(&t) {
            return Err(bad_field(
                "gate_threshold",
                format!("gate_threshold must be in [0, 1), got {t}"),
            ));
        }
    }
    Ok(Job {
        prompt,
        max_new_tokens,
        params: SamplingParams {
            temperature,
            top_p,
            seed: field::<u64>(&fields, "seed")?.unwrap_or(0),
        },
        choices,
        stop,
        stream,
        include_usage,
        experts,
        top_k: field::<usize>(&fields, "gate_top_k")?.or(s.top_k),
        threshold,
    })
}

/// The body as JSON of type `T`, or a 400 saying why not.
pub(crate) fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad(format!("invalid request body: {e}")))
}

/// Field `key` as a `T`; absent and `null` are `None`.
fn field<T: DeserializeOwned>(
    fields: &Map<String, Value>,
    key: &str,
) -> Result<Option<T>, ApiError> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => T::deserialize(v)
            .map(Some)
            .map_err(|e| bad_field(key, format!("`{key}`: {e}"))),
    }
}

fn required<T: DeserializeOwned>(fields: &Map<String, Value>, key: &str) -> Result<T, ApiError> {
    field(fields, key)?.ok_or_else(|| bad_field(key, format!("`{key}` is required")))
}

fn prompt_text(prompt: Option<&Value>) -> Result<String, ApiError> {
    match prompt {
        Some(Value::String(p)) => Ok(p.clone()),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Ok(a[0].as_str().unwrap_or_default().to_string())
        }
        None | Some(Value::Null) => Err(bad_field("prompt", "`prompt` is required")),
        Some(_) => Err(bad_field(
            "prompt",
            "`prompt` must be a string (or a list of one string); token ids and batches of \
             prompts are not supported",
        )),
    }
}

/// `stop`: a string or a list of up to [`MAX_STOPS`] strings.
fn stop_sequences(stop: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let stops = match stop {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad_field("stop", "`stop` must be a string or a list of strings"))?,
        Some(_) => {
            return Err(bad_field(
                "stop",
                "`stop` must be a string or a list of strings",
            ))
        }
    };
    if stops.len() > MAX_STOPS {
        return Err(bad_field(
            "stop",
            format!("`stop` has {} sequences; at most {MAX_STOPS}", stops.len()),
        ));
    }
    if let Some(s) = stops
        .iter()
        .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(bad_field(
            "stop",
            format!(
                "each stop sequence must have 1 to {MAX_STOP_BYTES} bytes, got {}",
                s.len()
            ),
        ));
    }
    Ok(stops)
}

/// Accepts `key` for `endpoint` when the server acts on it, when it only labels the request,
/// or when its value asks for nothing; refuses it otherwise.
fn check_field(endpoint: Endpoint, key: &str, value: &Value) -> Result<(), ApiError> {
    const READ: &[&str] = &[
        "model",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stream",
        "stream_options",
        "stop",
        "n",
        "experts",
        "gate_top_k",
        "gate_threshold",
    ];
    const LABELS: &[&str] = &[
        "user",
        "metadata",
        "store",
        "service_tier",
        "parallel_tool_calls",
    ];
    let own = match endpoint {
        Endpoint::Completions => key == "prompt",
        Endpoint::Chat => key == "messages" || key == "max_completion_tokens",
    };
    if own || READ.contains(&key) || LABELS.contains(&key) {
        return Ok(());
    }
    let zero = |v: &Value| v.as_f64() == Some(0.0);
    let (neutral, needs): (bool, &str) = match key {
        "frequency_penalty" | "presence_penalty" => (zero(value), "0"),
        "logit_bias" => (
            value.as_object().is_some_and(|o| o.is_empty()),
            "an empty object",
        ),
        "logprobs" => (value == &Value::Bool(false), "false"),
        "top_logprobs" => (zero(value), "0"),
        "best_of" => (value.as_u64() == Some(1), "1"),
        "echo" => (value == &Value::Bool(false), "false"),
        "suffix" => (value.as_str() == Some(""), "empty"),
        "tools" | "functions" => (
            value.as_array().is_some_and(|a| a.is_empty()),
            "an empty list",
        ),
        "tool_choice" | "function_call" => (value.as_str() == Some("none"), "\"none\""),
        "response_format" => (
            value.get("type").and_then(Value::as_str) == Some("text"),
            "{\"type\": \"text\"}",
        ),
        _ => {
            return Err(bad_field(
                key,
                format!("unsupported field `{key}`: this server does not implement it"),
            ))
        }
    };
    if neutral || value.is_null() {
        Ok(())
    } else {
        Err(bad_field(
            key,
            format!("`{key}` is not supported by this server; it may only be {needs} or null"),
        ))
    }
}
