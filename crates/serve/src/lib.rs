//! `mode serve`: an OpenAI-compatible HTTP API over a loaded model.
//!
//! - `POST /v1/completions` and `POST /v1/chat/completions`, whole or streamed as server-sent
//!   events (`"stream": true`), in the OpenAI wire format the official clients read;
//! - `GET /v1/models`, `GET /health`.
//!
//! Generation is CPU-bound and uses every core, so requests run one at a time in arrival order
//! (a FIFO lock): concurrent clients queue fairly instead of slowing each other down. A client
//! that disconnects stops its generation. Bad requests are answered with 4xx and an OpenAI-style
//! error body.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mode_core::LoadedModel;
use mode_infer::{ChatMessage, ChatTemplate, Sampler, SamplingParams};
use mode_io::Tokenizer;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Mutex};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

/// Limits that protect the server from requests it cannot serve.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_prompt_tokens: usize,
    pub max_new_tokens: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_prompt_tokens: 4096,
            max_new_tokens: 1024,
        }
    }
}

/// What the server runs.
pub struct Served {
    /// The model name clients pass as `model` (any name is accepted; this one is reported).
    pub name: String,
    pub model: LoadedModel,
    pub tokenizer: Tokenizer,
    /// Names of the experts the model runs, reported by `/v1/models`.
    pub experts: Vec<String>,
    pub limits: Limits,
}

struct AppState {
    name: String,
    experts: Vec<String>,
    limits: Limits,
    chat: ChatTemplate,
    /// The model and tokenizer; the lock is FIFO-fair, so requests run in arrival order.
    engine: Arc<Mutex<(LoadedModel, Tokenizer)>>,
}

/// The router of the API, ready to serve.
pub fn router(served: Served) -> Router {
    let chat = ChatTemplate::of(&served.tokenizer);
    let state = Arc::new(AppState {
        name: served.name,
        experts: served.experts,
        limits: served.limits,
        chat,
        engine: Arc::new(Mutex::new((served.model, served.tokenizer))),
    });
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(state)
}

/// An error answered in OpenAI's format: `{"error": {"message", "type", ...}}`.
struct ApiError {
    status: StatusCode,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = if self.status.is_client_error() {
            "invalid_request_error"
        } else {
            "server_error"
        };
        (
            self.status,
            Json(json!({"error": {"message": self.message, "type": kind, "param": null, "code": null}})),
        )
            .into_response()
    }
}

fn error(status: StatusCode, message: &str) -> ApiError {
    ApiError {
        status,
        message: message.to_string(),
    }
}

fn bad(message: impl AsRef<str>) -> ApiError {
    error(StatusCode::BAD_REQUEST, message.as_ref())
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    let created = now();
    let mut data =
        vec![json!({"id": s.name, "object": "model", "created": created, "owned_by": "mode"})];
    data.extend(s.experts.iter().map(|e| {
        json!({"id": format!("{}/{e}", s.name), "object": "model", "created": created, "owned_by": "mode", "parent": s.name})
    }));
    Json(json!({"object": "list", "data": data}))
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Deserialize)]
struct Sampling {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stream: bool,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Value,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    sampling: Sampling,
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad(format!("invalid request body: {e}")))
}

/// A checked request, ready to generate.
struct Job {
    prompt: String,
    max_new_tokens: usize,
    params: SamplingParams,
    stream: bool,
    model: String,
}

fn job(s: &AppState, prompt: String, sampling: Sampling) -> Result<Job, ApiError> {
    let max_new_tokens = sampling
        .max_completion_tokens
        .or(sampling.max_tokens)
        .unwrap_or(256.min(s.limits.max_new_tokens));
    if max_new_tokens == 0 || max_new_tokens > s.limits.max_new_tokens {
        return Err(bad(format!(
            "max_tokens must be between 1 and {}, got {max_new_tokens}",
            s.limits.max_new_tokens
        )));
    }
    let temperature = sampling.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad(format!(
            "temperature must be between 0 and 2, got {temperature}"
        )));
    }
    let top_p = sampling.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad(format!("top_p must be in (0, 1], got {top_p}")));
    }
    if let Some(m) = &sampling.model {
        if m != &s.name && !m.starts_with(&format!("{}/", s.name)) {
            return Err(error(
                StatusCode::NOT_FOUND,
                &format!(
                    "model `{m}` is not served here; GET /v1/models lists `{}`",
                    s.name
                ),
            ));
        }
    }
    Ok(Job {
        prompt,
        max_new_tokens,
        params: SamplingParams {
            temperature,
            top_p,
            seed: sampling.seed.unwrap_or(0),
        },
        stream: sampling.stream,
        model: s.name.clone(),
    })
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let req: CompletionRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let prompt = match &req.prompt {
        Value::String(p) => p.clone(),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or("").into(),
        _ => return bad("`prompt` must be a string (or a list of one string)").into_response(),
    };
    match job(&s, prompt, req.sampling) {
        Ok(job) => run(s, job, false).await,
        Err(e) => e.into_response(),
    }
}

async fn chat_completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let req: ChatRequest = match parse(&body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if req.messages.is_empty() {
        return bad("`messages` is empty").into_response();
    }
    let prompt = match s.chat.render(&req.messages, true) {
        Ok(p) => p,
        Err(e) => return bad(format!("cannot render the chat template: {e}")).into_response(),
    };
    match job(&s, prompt, req.sampling) {
        Ok(job) => run(s, job, true).await,
        Err(e) => e.into_response(),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the generation task sends back.
enum Piece {
    Text(String),
    Done {
        prompt_tokens: usize,
        completion_tokens: usize,
        finish_reason: &'static str,
    },
    Failed(ApiError),
}

/// Runs a job in turn (FIFO) on a blocking thread, streaming pieces through a channel.
fn spawn_generation(s: Arc<AppState>, job: &Job) -> mpsc::Receiver<Piece> {
    let (tx, rx) = mpsc::channel(64);
    let engine = s.engine.clone();
    let (prompt, max_new, params, limits) = (
        job.prompt.clone(),
        job.max_new_tokens,
        job.params.clone(),
        s.limits,
    );
    tokio::spawn(async move {
        let guard = engine.lock_owned().await;
        let _ = tokio::task::spawn_blocking(move || {
            let (model, tokenizer) = &*guard;
            let ids = match tokenizer.encode(&prompt) {
                Ok(ids) => ids,
                Err(e) => {
                    let _ = tx.blocking_send(Piece::Failed(bad(format!("cannot tokenise: {e}"))));
                    return;
                }
            };
            if ids.is_empty() || ids.len() > limits.max_prompt_tokens {
                let _ = tx.blocking_send(Piece::Failed(bad(format!(
                    "the prompt has {} tokens; it must have between 1 and {}",
                    ids.len(),
                    limits.max_prompt_tokens
                ))));
                return;
            }
            let mut sampler = Sampler::new(params);
            let result =
                mode_infer::generate(model.lm(), tokenizer, &ids, max_new, &mut sampler, |t| {
                    tx.blocking_send(Piece::Text(t.to_string())).is_ok()
                });
            let _ = tx.blocking_send(match result {
                Ok((out, stats)) => Piece::Done {
                    prompt_tokens: ids.len(),
                    completion_tokens: out.len(),
                    finish_reason: if stats.ended_at_eos { "stop" } else { "length" },
                },
                Err(e) => Piece::Failed(error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())),
            });
        })
        .await;
    });
    rx
}

async fn run(s: Arc<AppState>, job: Job, chat: bool) -> Response {
    let id = format!("{}-{}", if chat { "chatcmpl" } else { "cmpl" }, now_nanos());
    let created = now();
    let mut rx = spawn_generation(s, &job);
    if !job.stream {
        let mut text = String::new();
        while let Some(piece) = rx.recv().await {
            match piece {
                Piece::Text(t) => text.push_str(&t),
                Piece::Failed(r) => return r.into_response(),
                Piece::Done {
                    prompt_tokens,
                    completion_tokens,
                    finish_reason,
                } => {
                    let choice = if chat {
                        json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason, "logprobs": null})
                    } else {
                        json!({"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": null})
                    };
                    return Json(json!({
                        "id": id,
                        "object": if chat { "chat.completion" } else { "text_completion" },
                        "created": created,
                        "model": job.model,
                        "choices": [choice],
                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
                    }))
                    .into_response();
                }
            }
        }
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "generation ended unexpectedly",
        )
        .into_response();
    }
    // Streaming: the first piece decides between an error status and a 200 event stream.
    let first = match rx.recv().await {
        Some(Piece::Failed(r)) => return r.into_response(),
        Some(p) => p,
        None => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "generation ended unexpectedly",
            )
            .into_response()
        }
    };
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let model = job.model.clone();
    let chunk = move |delta: Option<&str>, finish: Option<&str>, first: bool| -> Event {
        let choice = if chat {
            let mut d = serde_json::Map::new();
            if first {
                d.insert("role".into(), "assistant".into());
            }
            if let Some(t) = delta {
                d.insert("content".into(), t.into());
            }
            json!({"index": 0, "delta": d, "finish_reason": finish, "logprobs": null})
        } else {
            json!({"index": 0, "text": delta.unwrap_or(""), "finish_reason": finish, "logprobs": null})
        };
        Event::default().data(
            json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
                .to_string(),
        )
    };
    let mut started = false;
    let stream = ReceiverStream::new(rx);
    let events = tokio_stream::iter(std::iter::once(first))
        .chain(stream)
        .map(move |piece| {
            let first_chunk = !started;
            started = true;
            let event = match piece {
                Piece::Text(t) => chunk(Some(&t), None, first_chunk),
                Piece::Done { finish_reason, .. } => chunk(None, Some(finish_reason), first_chunk),
                Piece::Failed(_) => Event::default().data(
                    json!({"error": {"message": "generation failed", "type": "server_error"}})
                        .to_string(),
                ),
            };
            Ok::<_, std::convert::Infallible>(event)
        })
        .chain(tokio_stream::iter(std::iter::once(Ok(
            Event::default().data("[DONE]")
        ))));
    Sse::new(events).into_response()
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Serves `served` on `addr` until Ctrl-C.
pub async fn serve(served: Served, addr: std::net::SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router(served))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}
