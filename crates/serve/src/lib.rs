//! `mode serve`: an OpenAI-compatible HTTP API over a loaded model.
//!
//! - `POST /v1/completions` and `POST /v1/chat/completions`, whole or streamed as server-sent
//!   events (`"stream": true`), in the OpenAI wire format the official clients read;
//! - `GET /v1/models`, `GET /health`, `GET /metrics` (the batch's counters, for Prometheus);
//! - `GET /v1/experts`, `POST /v1/experts` (hot-add an expert file from a directory the operator
//!   allowed), `DELETE /v1/experts/{name}`.
//!
//! A request may choose its experts (`"experts": ["code"]`, `[]` for the backbone alone) and
//! gate sparsely (`"gate_top_k"`, `"gate_threshold"`); the server's flags give the defaults.
//!
//! Requests are batched continuously (`scheduler.rs`): up to `Batching::parallel` sequences
//! decode together, one token each per step in one forward, each under its own experts; new
//! ones join between steps, their prompts read in chunks so running streams keep flowing, and
//! each reserves its KV cache from a memory budget. Adding and removing experts wait for the
//! running sequences to finish, so they never change the model under one. A client that
//! disconnects stops its generation. At most `Limits::max_queue` generation requests are in
//! the server at once (running or waiting); more get 503 with `Retry-After` (`admission.rs`). Bad requests are answered with 4xx and an
//! OpenAI-style error body naming the field at fault; a field the server does not act on
//! (`logit_bias`, `logprobs`, tools) is refused unless its value asks for nothing. `stop`
//! (a string or up to four) and `n` (answers generated side by side, choice `i` with
//! seed `seed + i`) are implemented. With an API key set, requests must carry it as a Bearer
//! token (401 otherwise).
//!
//! Files: `request.rs` reads and checks requests, `generation.rs` hands them to the scheduler
//! and writes the answers (typed in `openai.rs`), `scheduler.rs` batches and runs them,
//! `experts.rs` serves the expert endpoints, `error.rs` shapes errors.

mod admission;
mod error;
mod experts;
mod generation;
mod openai;
mod prompt_cache;
mod request;
mod scheduler;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use candle_core::Device;
use mode_core::file::ExpertDims;
use mode_core::ModeModel;
use mode_infer::ChatTemplate;
use mode_io::Tokenizer;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use error::ApiError;
use experts::{add_expert, list_experts, remove_expert, ExpertSet};
use generation::now;
use request::{Endpoint, MAX_STOPS};
pub use scheduler::Batching;
use scheduler::{Scheduler, Submission};

/// Limits that protect the server from requests it cannot serve.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest prompt accepted, in tokens.
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_new_tokens: usize,
    /// Largest `n` (answers per request) a request may ask for.
    pub max_choices: usize,
    /// Most generation requests in the server at once, running or waiting for the engine;
    /// more are refused with 503 and `Retry-After`.
    pub max_queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_prompt_tokens: 4096,
            max_new_tokens: 1024,
            max_choices: 8,
            max_queue: 64,
        }
    }
}

/// Routing for requests that do not choose their own, from `mode serve`'s flags.
#[derive(Debug, Clone, Default)]
pub struct RoutingDefaults {
    /// Experts a request runs when it names none; `None` runs every loaded expert. A hot-added
    /// expert joins this set and a deleted one leaves it, so the operator's choice survives.
    pub experts: Option<Vec<String>>,
    /// Per token, run only the `k` experts with the highest gate weight.
    pub top_k: Option<usize>,
    /// Per token, skip experts whose gate weight is below this, in [0, 1).
    pub threshold: Option<f64>,
}

/// What the server runs.
pub struct Served {
    /// The model name clients pass as `model` (any name is accepted; this one is reported).
    pub name: String,
    /// The backbone and the experts it starts with; `POST /v1/experts` adds more.
    pub model: ModeModel,
    pub tokenizer: Tokenizer,
    pub limits: Limits,
    pub routing: RoutingDefaults,
    pub batching: Batching,
    /// When set, every request but `GET /health` must carry `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Computed once: every hot-added expert file is checked against it.
    fingerprint: String,
    /// Directories `POST /v1/experts` may read from, as given and canonicalised.
    expert_dirs: Vec<(PathBuf, PathBuf)>,
}

impl Served {
    /// Serves `model` with default limits and routing, with hot-adding disabled until
    /// [`Self::allow_expert_dir`]. Fingerprints the backbone (a sample of its weights).
    pub fn new(name: String, model: ModeModel, tokenizer: Tokenizer) -> mode_core::Result<Self> {
        let fingerprint = model.backbone.fingerprint()?;
        Ok(Self {
            name,
            model,
            tokenizer,
            limits: Limits::default(),
            routing: RoutingDefaults::default(),
            batching: Batching::default(),
            api_key: None,
            fingerprint,
            expert_dirs: Vec::new(),
        })
    }

    /// Lets `POST /v1/experts` read expert files under `dir` (symlinks resolved, so a link
    /// cannot lead out of it). The paths clients send are read on the server's filesystem,
    /// hence nothing is allowed by default.
    pub fn allow_expert_dir(&mut self, dir: &Path) -> std::io::Result<()> {
        let real = std::fs::canonicalize(dir)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        if !real.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{}: not a directory", dir.display()),
            ));
        }
        let given = std::path::absolute(dir).unwrap_or_else(|_| real.clone());
        self.expert_dirs.push((given, real));
        Ok(())
    }
}

/// What every handler shares.
struct AppState {
    name: String,
    api_key: Option<String>,
    limits: Limits,
    chat: ChatTemplate,
    top_k: Option<usize>,
    threshold: Option<f64>,
    fingerprint: String,
    dims: ExpertDims,
    device: Device,
    expert_dirs: Vec<(PathBuf, PathBuf)>,
    experts: Arc<std::sync::Mutex<ExpertSet>>,
    /// Places for generation jobs (`Limits::max_queue`).
    admission: Arc<admission::Admission>,
    batching: Batching,
    /// KV cache bytes per token of one sequence with the experts loaded now.
    kv_bytes_per_token: AtomicU64,
    tokenizer: Arc<Tokenizer>,
    /// The model; the scheduler holds the lock while sequences run.
    model: Arc<Mutex<ModeModel>>,
    /// Expert changes waiting for the lock; while any wait, no new sequence starts.
    model_change: Arc<AtomicUsize>,
    /// Counts the changes of the model's experts (the scheduler's prompt cache is emptied
    /// after each).
    model_generation: Arc<AtomicU64>,
    /// Where jobs go to be run.
    scheduler: std::sync::mpsc::Sender<Submission>,
    stats: Arc<scheduler::Stats>,
}

impl AppState {
    fn expert_set(&self) -> ExpertSet {
        self.experts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_experts(&self, set: ExpertSet) {
        *self.experts.lock().unwrap_or_else(|e| e.into_inner()) = set;
    }

    /// Call after changing the model's experts, still holding the model lock.
    fn model_changed(&self, model: &ModeModel) {
        self.kv_bytes_per_token.store(
            scheduler::kv_bytes_per_token(model),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.model_generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The router of the API, ready to serve.
pub fn router(served: Served) -> Router {
    let chat = ChatTemplate::of(&served.tokenizer);
    let dims = ExpertDims::of(&served.model.backbone.config);
    let device = served.model.backbone.device().clone();
    let experts = ExpertSet {
        loaded: served.model.expert_names(),
        default: served.routing.experts,
    };
    let kv_bytes_per_token = AtomicU64::new(scheduler::kv_bytes_per_token(&served.model));
    let experts = Arc::new(std::sync::Mutex::new(experts));
    let model = Arc::new(Mutex::new(served.model));
    let tokenizer = Arc::new(served.tokenizer);
    let model_change = Arc::new(AtomicUsize::new(0));
    let model_generation = Arc::new(AtomicU64::new(0));
    let (scheduler, inbox) = std::sync::mpsc::channel();
    let stats = Arc::new(scheduler::Stats::default());
    let runner = Scheduler {
        model: model.clone(),
        tokenizer: tokenizer.clone(),
        experts: experts.clone(),
        batching: served.batching,
        model_change: model_change.clone(),
        model_generation: model_generation.clone(),
        stats: stats.clone(),
    };
    std::thread::Builder::new()
        .name("mode-scheduler".into())
        .spawn(move || runner.run(inbox))
        .expect("spawning the scheduler thread");
    let state = Arc::new(AppState {
        name: served.name,
        api_key: served.api_key,
        limits: served.limits,
        chat,
        top_k: served.routing.top_k,
        threshold: served.routing.threshold,
        fingerprint: served.fingerprint,
        dims,
        device,
        expert_dirs: served.expert_dirs,
        experts,
        admission: Arc::new(admission::Admission::new(
            served.limits.max_queue,
            served.batching.parallel,
        )),
        batching: served.batching,
        kv_bytes_per_token,
        tokenizer,
        model,
        model_change,
        model_generation,
        scheduler,
        stats,
    });
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/experts", get(list_experts).post(add_expert))
        .route("/v1/experts/{name}", delete(remove_expert))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

/// Refuses (401, as OpenAI does) a request without the server's API key, if it has one.
/// `/health` stays open for load balancers and supervisors.
async fn authorize(State(s): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let Some(key) = &s.api_key else {
        return next.run(request).await;
    };
    if request.uri().path() == "/health" {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme's name is case-insensitive (RFC 9110); the token is not.
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token);
    match given {
        Some(given) if same_secret(given.trim().as_bytes(), key.as_bytes()) => {
            next.run(request).await
        }
        _ => {
            let mut e = ApiError::new(
                StatusCode::UNAUTHORIZED,
                if given.is_some() {
                    "incorrect API key provided"
                } else {
                    "this server needs an API key: send `Authorization: Bearer KEY`"
                },
            );
            e.code = Some("invalid_api_key");
            e.into_response()
        }
    }
}

/// Compares secrets in time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    generate(s, Endpoint::Completions, body).await
}

async fn chat_completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    generate(s, Endpoint::Chat, body).await
}

async fn generate(s: Arc<AppState>, endpoint: Endpoint, body: Bytes) -> Response {
    let job = match request::job(&s, endpoint, &body) {
        Ok(job) => job,
        Err(e) => return e.into_response(),
    };
    match s.admission.try_admit() {
        Ok(ticket) => generation::run(s, job, endpoint, ticket).await,
        Err(retry_after_secs) => {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the server is full ({} requests in it); retry after {retry_after_secs} s",
                    s.limits.max_queue
                ),
            );
            e.retry_after_secs = Some(retry_after_secs);
            e.into_response()
        }
    }
}

/// The backbone model, then one entry per loaded expert (`NAME/EXPERT`, which a request may pass
/// as `model` to run that expert alone). Each states the per-request limits.
async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    let created = now();
    let limits = json!({
        "max_prompt_tokens": s.limits.max_prompt_tokens,
        "max_tokens": s.limits.max_new_tokens,
        "max_n": s.limits.max_choices,
        "max_queue": s.limits.max_queue,
        "parallel": s.batching.parallel,
        "max_stop_sequences": MAX_STOPS,
    });
    let mut data = vec![
        json!({"id": s.name, "object": "model", "created": created, "owned_by": "mode", "limits": limits}),
    ];
    data.extend(s.expert_set().loaded.iter().map(|e| {
        json!({"id": format!("{}/{e}", s.name), "object": "model", "created": created, "owned_by": "mode", "parent": s.name, "limits": limits})
    }));
    Json(json!({"object": "list", "data": data}))
}

/// `GET /metrics`: the scheduler's counters, in Prometheus' text format.
async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.stats.prometheus(),
    )
        .into_response()
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
