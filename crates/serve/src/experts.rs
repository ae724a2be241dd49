//! The expert endpoints: list, hot-add from an allowed directory, remove.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{self, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use mode_core::ExpertFile;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{bad, internal, ApiError};
use crate::request::parse;
use crate::AppState;

/// The experts' names, readable without waiting for the model; changed only while holding the
/// model lock, right after the model itself changes.
#[derive(Debug, Clone)]
pub(crate) struct ExpertSet {
    pub loaded: Vec<String>,
    pub default: Option<Vec<String>>,
}

/// An expert change waiting for, or holding, the model lock: while one exists the scheduler
/// starts no new sequence, so the running ones drain and the change gets the lock.
struct ModelChange(Arc<std::sync::atomic::AtomicUsize>);

impl ModelChange {
    fn announce(s: &AppState) -> Self {
        s.model_change.fetch_add(1, Ordering::AcqRel);
        Self(s.model_change.clone())
    }
}

impl Drop for ModelChange {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(crate) fn unknown_expert(name: &str, loaded: &[String]) -> ApiError {
    let loaded = if loaded.is_empty() {
        "none".to_string()
    } else {
        loaded.join(", ")
    };
    bad(format!(
        "unknown expert `{name}`; loaded experts: {loaded} (GET /v1/experts)"
    ))
}

pub(crate) fn expert_list(set: &ExpertSet) -> Value {
    json!({"experts": set.loaded, "default_experts": set.default.as_ref().unwrap_or(&set.loaded)})
}

/// `GET /v1/experts`: the loaded experts and those a request runs when it names none.
pub(crate) async fn list_experts(State(s): State<Arc<AppState>>) -> Json<Value> {
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
    mode_io::names::check_name(name).map_err(|e| bad(format!("expert name {e}")).param("name"))
}

/// The real path of an expert file a client asks to load, if it lies under an allowed
/// directory. A missing file is reported as such only when its path is plainly under one, so
/// that answers say nothing about the rest of the server's filesystem.
fn allowed_expert_path(dirs: &[(PathBuf, PathBuf)], path: &Path) -> Result<PathBuf, ApiError> {
    let outside = || {
        let dirs: Vec<String> = dirs.iter().map(|d| d.1.display().to_string()).collect();
        ApiError::new(
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
                Err(ApiError::new(
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
        ApiError::new(
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
pub(crate) async fn add_expert(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    match add_expert_inner(s, body).await {
        Ok(v) => (StatusCode::CREATED, Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn add_expert_inner(s: Arc<AppState>, body: Bytes) -> Result<Value, ApiError> {
    if s.expert_dirs.is_empty() {
        return Err(ApiError::new(
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
        .map_err(|e| internal(e.to_string()))?
        .map_err(|e| bad(e.to_string()))?;
    file.check_compatible(&path, &s.fingerprint, &s.dims, None)
        .map_err(|e| bad(e.to_string()))?;
    let name = req.name.unwrap_or_else(|| file.meta.domain.clone());
    if let Some(e) = name_taken(&s.expert_set().loaded, &name, &path) {
        return Err(e);
    }
    let change = ModelChange::announce(&s);
    let mut guard = s.model.clone().lock_owned().await;
    let state = s.clone();
    tokio::task::spawn_blocking(move || {
        let _change = change;
        let model = &mut *guard;
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
                ApiError::new(code, e.to_string())
            })?;
        let mut set = state.expert_set();
        set.loaded = model.expert_names();
        if let Some(default) = &mut set.default {
            default.push(added.clone());
        }
        state.model_changed(model);
        state.set_experts(set.clone());
        let mut answer = expert_list(&set);
        answer["name"] = added.into();
        answer["path"] = path.display().to_string().into();
        Ok(answer)
    })
    .await
    .map_err(|e| internal(e.to_string()))?
}

/// `DELETE /v1/experts/{name}`: removes an expert from the running model.
pub(crate) async fn remove_expert(
    State(s): State<Arc<AppState>>,
    extract::Path(name): extract::Path<String>,
) -> Response {
    let _change = ModelChange::announce(&s);
    let mut guard = s.model.clone().lock_owned().await;
    let model = &mut *guard;
    if !model.expert_names().contains(&name) {
        let loaded = model.expert_names();
        let mut e = unknown_expert(&name, &loaded);
        e.status = StatusCode::NOT_FOUND;
        return e.into_response();
    }
    if let Err(e) = model.remove_expert(&name) {
        return internal(e.to_string()).into_response();
    }
    let mut set = s.expert_set();
    set.loaded = model.expert_names();
    if let Some(default) = &mut set.default {
        default.retain(|e| e != &name);
    }
    s.model_changed(model);
    s.set_experts(set.clone());
    let mut answer = expert_list(&set);
    answer["name"] = name.into();
    answer["deleted"] = true.into();
    Json(answer).into_response()
}
