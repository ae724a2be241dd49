//! `mode serve`: an OpenAI-compatible HTTP API over a loaded model.
//!
//! - `POST /v1/completions` and `POST /v1/chat/completions`, whole or streamed as server-sent
//!   events (`"stream": true`), in the OpenAI wire format the official clients read;
//! - `GET /v1/models`, `GET /health`;
//! - `GET /v1/experts`, `POST /v1/experts` (hot-add an expert file from a directory the operator
//!   allowed), `DELETE /v1/experts/{name}`.
//!
//! A request may choose its experts (`"experts": ["code"]`, `[]` for the backbone alone) and
//! gate sparsely (`"gate_top_k"`, `"gate_threshold"`); the server's flags give the defaults.
//!
//! Generation is CPU-bound and uses every core, so requests run one at a time in arrival order
//! (a FIFO lock): concurrent clients queue fairly instead of slowing each other down. Adding and
//! removing experts take the same lock, so they never change the model under a running request.
//! A client that disconnects stops its generation. Bad requests are answered with 4xx and an
//! OpenAI-style error body.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{self, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use candle_core::Device;
use mode_core::file::ExpertDims;
use mode_core::{ExpertFile, ModeModel, Routing};
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

/// The experts' names, readable without waiting for the model; changed only while holding the
/// engine lock, right after the model itself changes.
#[derive(Debug, Clone)]
struct ExpertSet {
    loaded: Vec<String>,
    default: Option<Vec<String>>,
}

struct AppState {
    name: String,
    limits: Limits,
    chat: ChatTemplate,
    top_k: Option<usize>,
    threshold: Option<f64>,
    fingerprint: String,
    dims: ExpertDims,
    device: Device,
    expert_dirs: Vec<(PathBuf, PathBuf)>,
    experts: std::sync::Mutex<ExpertSet>,
    /// The model and tokenizer; the lock is FIFO-fair, so requests run in arrival order.
    engine: Arc<Mutex<(ModeModel, Tokenizer)>>,
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
}

/// The router of the API, ready to serve.
pub fn router(served: Served) -> Router {
    let chat = ChatTemplate::of(&served.tokenizer);
    let experts = ExpertSet {
        loaded: served.model.expert_names(),
        default: served.routing.experts,
    };
    let state = Arc::new(AppState {
        name: served.name,
        limits: served.limits,
        chat,
        top_k: served.routing.top_k,
        threshold: served.routing.threshold,
        fingerprint: served.fingerprint,
        dims: ExpertDims::of(&served.model.backbone.config),
        device: served.model.backbone.device().clone(),
        expert_dirs: served.expert_dirs,
        experts: std::sync::Mutex::new(experts),
        engine: Arc::new(Mutex::new((served.model, served.tokenizer))),
    });
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/experts", get(list_experts).post(add_expert))
        .route("/v1/experts/{name}", delete(remove_expert))
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

fn status(status: StatusCode, message: impl AsRef<str>) -> ApiError {
    error(status, message.as_ref())
}

/// The backbone model, then one entry per loaded expert (`NAME/EXPERT`, which a request may pass
/// as `model` to run that expert alone).
async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    let created = now();
    let mut data =
        vec![json!({"id": s.name, "object": "model", "created": created, "owned_by": "mode"})];
    data.extend(s.expert_set().loaded.iter().map(|e| {
        json!({"id": format!("{}/{e}", s.name), "object": "model", "created": created, "owned_by": "mode", "parent": s.name})
    }));
    Json(json!({"object": "list", "data": data}))
}

fn unknown_expert(name: &str, loaded: &[String]) -> ApiError {
    let loaded = if loaded.is_empty() {
        "none".to_string()
    } else {
        loaded.join(", ")
    };
    bad(format!(
        "unknown expert `{name}`; loaded experts: {loaded} (GET /v1/experts)"
    ))
}

fn expert_list(set: &ExpertSet) -> Value {
    json!({"experts": set.loaded, "default_experts": set.default.as_ref().unwrap_or(&set.loaded)})
}

/// `GET /v1/experts`: the loaded experts and those a request runs when it names none.
async fn list_experts(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(expert_list(&s.expert_set()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddExpertRequest {
    path: PathBuf,
    #[serde(default)]
    name: Option<String>,
}

/// A name a client may give an expert: it appears in URLs and in model ids `NAME/EXPERT`.
fn check_expert_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "expert name `{name}`: use 1 to 64 letters, digits, `-`, `_` or `.`"
        )))
    }
}

/// The real path of an expert file a client asks to load, if it lies under an allowed
/// directory. A missing file is reported as such only when its path is plainly under one, so
/// that answers say nothing about the rest of the server's filesystem.
fn allowed_expert_path(dirs: &[(PathBuf, PathBuf)], path: &Path) -> Result<PathBuf, ApiError> {
    let outside = || {
        let dirs: Vec<String> = dirs.iter().map(|d| d.1.display().to_string()).collect();
        status(
            StatusCode::FORBIDDEN,
            format!(
                "{} is outside the directories --allow-expert-dir allows ({})",
                path.display(),
                dirs.join(", ")
            ),
        )
    };
    match std::fs::canonicalize(path) {
        Ok(real) if dirs.iter().any(|(_, d)| real.starts_with(d)) => {
            if real.is_file() {
                Ok(real)
            } else {
                Err(bad(format!("{}: not a file", path.display())))
            }
        }
        Ok(_) => Err(outside()),
        Err(e) => {
            let plain = path
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
            if plain
                && dirs
                    .iter()
                    .any(|(given, real)| path.starts_with(given) || path.starts_with(real))
            {
                Err(status(
                    StatusCode::NOT_FOUND,
                    format!("{}: {e}", path.display()),
                ))
            } else {
                Err(outside())
            }
        }
    }
}

/// 409 when `name` is among the `loaded` experts; `path` is the file that would have added it.
fn name_taken(loaded: &[String], name: &str, path: &Path) -> Option<ApiError> {
    loaded.iter().any(|e| e == name).then(|| {
        status(
            StatusCode::CONFLICT,
            format!(
                "{}: the server already has an expert `{name}`; DELETE /v1/experts/{name} \
                 first, or pass another \"name\"",
                path.display()
            ),
        )
    })
}

/// `POST /v1/experts {"path": ..., "name": ...}`: adds an expert file to the running model.
/// The file is read and checked against the backbone before queueing; only adding it waits
/// for the requests ahead.
async fn add_expert(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    match add_expert_inner(s, body).await {
        Ok(v) => (StatusCode::CREATED, Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn add_expert_inner(s: Arc<AppState>, body: Bytes) -> Result<Value, ApiError> {
    if s.expert_dirs.is_empty() {
        return Err(status(
            StatusCode::FORBIDDEN,
            "adding experts is disabled: start `mode serve` with --allow-expert-dir DIR to \
             allow expert files under DIR",
        ));
    }
    let req: AddExpertRequest = parse(&body)?;
    if let Some(name) = &req.name {
        check_expert_name(name)?;
    }
    if !req.path.is_absolute() {
        return Err(bad(format!(
            "`path` must be absolute, got {}",
            req.path.display()
        )));
    }
    let path = allowed_expert_path(&s.expert_dirs, &req.path)?;
    let device = s.device.clone();
    let read_path = path.clone();
    let file = tokio::task::spawn_blocking(move || ExpertFile::load(&read_path, &device))
        .await
        .map_err(|e| status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| bad(e.to_string()))?;
    file.check_compatible(&path, &s.fingerprint, &s.dims, None)
        .map_err(|e| bad(e.to_string()))?;
    let name = req.name.unwrap_or_else(|| file.meta.domain.clone());
    if let Some(e) = name_taken(&s.expert_set().loaded, &name, &path) {
        return Err(e);
    }
    let mut guard = s.engine.clone().lock_owned().await;
    let state = s.clone();
    tokio::task::spawn_blocking(move || {
        let (model, _) = &mut *guard;
        if let Some(e) = name_taken(&model.expert_names(), &name, &path) {
            return Err(e);
        }
        // A layout that differs from the loaded experts' conflicts with them, not with the
        // backbone.
        let conflict = !model.experts.is_empty() && file.meta.layout != model.layout;
        let added = model
            .add_expert_file(&file, &path, &state.fingerprint, Some(&name))
            .map_err(|e| {
                let code = if conflict {
                    StatusCode::CONFLICT
                } else {
                    StatusCode::BAD_REQUEST
                };
                status(code, e.to_string())
            })?;
        let mut set = state.expert_set();
        set.loaded = model.expert_names();
        if let Some(default) = &mut set.default {
            default.push(added.clone());
        }
        state.set_experts(set.clone());
        let mut answer = expert_list(&set);
        answer["name"] = added.into();
        answer["path"] = path.display().to_string().into();
        Ok(answer)
    })
    .await
    .map_err(|e| status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

/// `DELETE /v1/experts/{name}`: removes an expert from the running model.
async fn remove_expert(
    State(s): State<Arc<AppState>>,
    extract::Path(name): extract::Path<String>,
) -> Response {
    let mut guard = s.engine.clone().lock_owned().await;
    let (model, _) = &mut *guard;
    if !model.expert_names().contains(&name) {
        let loaded = model.expert_names();
        let mut e = unknown_expert(&name, &loaded);
        e.status = StatusCode::NOT_FOUND;
        return e.into_response();
    }
    if let Err(e) = model.remove_expert(&name) {
        return status(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    let mut set = s.expert_set();
    set.loaded = model.expert_names();
    if let Some(default) = &mut set.default {
        default.retain(|e| e != &name);
    }
    s.set_experts(set.clone());
    let mut answer = expert_list(&set);
    answer["name"] = name.into();
    answer["deleted"] = true.into();
    Json(answer).into_response()
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
    /// Experts to run, by name (default: the server's; `[]` runs the backbone alone).
    #[serde(default)]
    experts: Option<Vec<String>>,
    #[serde(default)]
    gate_top_k: Option<usize>,
    #[serde(default)]
    gate_threshold: Option<f64>,
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
    /// Experts by name; `None` runs the server's default set, read when the job starts.
    experts: Option<Vec<String>>,
    top_k: Option<usize>,
    threshold: Option<f64>,
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
    let mut experts = sampling.experts;
    if let Some(m) = &sampling.model {
        match m.strip_prefix(&format!("{}/", s.name)) {
            // `NAME/EXPERT`, as /v1/models lists it: that expert alone, unless `experts` says.
            Some(expert) => {
                experts.get_or_insert_with(|| vec![expert.to_string()]);
            }
            None if m == &s.name => {}
            None => {
                return Err(error(
                    StatusCode::NOT_FOUND,
                    &format!(
                        "model `{m}` is not served here; GET /v1/models lists `{}`",
                        s.name
                    ),
                ))
            }
        }
    }
    // Checked now to answer at once; checked again when the job starts, as experts may come
    // and go while it waits.
    if let Some(names) = &experts {
        let loaded = s.expert_set().loaded;
        if let Some(name) = names.iter().find(|n| !loaded.contains(n)) {
            return Err(unknown_expert(name, &loaded));
        }
    }
    let threshold = sampling.gate_threshold.or(s.threshold);
    if let Some(t) = threshold {
        if !(0.0..1.0).contains(&t) {
            return Err(bad(format!("gate_threshold must be in [0, 1), got {t}")));
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
        experts,
        top_k: sampling.gate_top_k.or(s.top_k),
        threshold,
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

/// The routing of `job` on `model` as it is now; names unknown by now answer 400.
fn job_routing(model: &ModeModel, set: &ExpertSet, job: &Job) -> Result<Routing, ApiError> {
    let loaded = model.expert_names();
    let experts = match job.experts.as_ref().or(set.default.as_ref()) {
        None => None,
        Some(names) => Some(
            names
                .iter()
                .map(|n| {
                    loaded
                        .iter()
                        .position(|e| e == n)
                        .ok_or_else(|| unknown_expert(n, &loaded))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let routing = Routing {
        experts,
        top_k: job.top_k,
        threshold: job.threshold,
    };
    routing
        .check(loaded.len())
        .map_err(|e| bad(e.to_string()))?;
    Ok(routing)
}

/// Runs a job in turn (FIFO) on a blocking thread, streaming pieces through a channel.
fn spawn_generation(s: Arc<AppState>, job: Job) -> mpsc::Receiver<Piece> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let guard = s.engine.clone().lock_owned().await;
        let _ = tokio::task::spawn_blocking(move || {
            let (model, tokenizer) = &*guard;
            let fail = |e: ApiError| {
                let _ = tx.blocking_send(Piece::Failed(e));
            };
            let routing = match job_routing(model, &s.expert_set(), &job) {
                Ok(r) => r,
                Err(e) => return fail(e),
            };
            let lm = match model.routed(routing) {
                Ok(lm) => lm,
                Err(e) => return fail(bad(e.to_string())),
            };
            let ids = match tokenizer.encode(&job.prompt) {
                Ok(ids) => ids,
                Err(e) => return fail(bad(format!("cannot tokenise: {e}"))),
            };
            let limits = s.limits;
            if ids.is_empty() || ids.len() > limits.max_prompt_tokens {
                return fail(bad(format!(
                    "the prompt has {} tokens; it must have between 1 and {}",
                    ids.len(),
                    limits.max_prompt_tokens
                )));
            }
            let mut sampler = Sampler::new(job.params.clone());
            let result = mode_infer::generate(
                &lm,
                tokenizer,
                &ids,
                job.max_new_tokens,
                &mut sampler,
                |t| tx.blocking_send(Piece::Text(t.to_string())).is_ok(),
            );
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
    let (stream, model) = (job.stream, job.model.clone());
    let mut rx = spawn_generation(s, job);
    if !stream {
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
                        "model": model,
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
