//! Running a job: handed to the scheduler, its pieces sent back through a channel, and answered
//! whole or as server-sent events in OpenAI's wire format.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use mode_core::{ModeModel, Routing};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

use crate::admission::Ticket;
use crate::error::{bad, internal, ApiError};
use crate::experts::{unknown_expert, ExpertSet};
use crate::openai::{Choice, Completion, Message, Output, Usage};
use crate::request::{Endpoint, Job};
use crate::scheduler::Submission;
use crate::AppState;

/// What the scheduler sends back for a request. Its answers (choices) run side by side, so
/// their pieces interleave.
pub(crate) enum Piece {
    /// New text of choice `choice`, already cut at its stop sequences.
    Text {
        choice: usize,
        text: String,
    },
    /// Choice `choice` is complete.
    Finished {
        choice: usize,
        finish_reason: &'static str,
    },
    /// Every choice is complete: the token counts of them all.
    Done(Usage),
    Failed(ApiError),
}

/// The routing of `job` on `model` as it is now; names unknown by now answer 400.
pub(crate) fn job_routing(
    model: &ModeModel,
    set: &ExpertSet,
    job: &Job,
) -> Result<Routing, ApiError> {
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

/// Tokenises `job`'s prompt, checks it against the limits and hands the job to the scheduler;
/// its pieces come back through the returned channel. Dropping the channel (the client went
/// away) ends the job's sequences.
fn submit(
    s: &AppState,
    job: Job,
    ticket: Ticket,
) -> Result<mpsc::UnboundedReceiver<Piece>, ApiError> {
    let ids = s
        .tokenizer
        .encode_prompt(&job.prompt)
        .map_err(|e| bad(format!("cannot tokenise: {e}")))?;
    let limits = s.limits;
    if ids.is_empty() || ids.len() > limits.max_prompt_tokens {
        return Err(bad(format!(
            "the prompt has {} tokens; it must have between 1 and {}",
            ids.len(),
            limits.max_prompt_tokens
        ))
        .param("prompt"));
    }
    let per_token = s
        .kv_bytes_per_token
        .load(std::sync::atomic::Ordering::Relaxed);
    let need = (ids.len() + job.max_new_tokens) as u64 * per_token;
    if need > s.batching.kv_cache_bytes {
        return Err(bad(format!(
            "the prompt ({} tokens) and max_tokens ({}) need {} MiB of KV cache; the server has {} MiB (--kv-cache-mib)",
            ids.len(),
            job.max_new_tokens,
            need.div_ceil(1 << 20),
            s.batching.kv_cache_bytes >> 20
        ))
        .param("max_tokens"));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    s.scheduler
        .send(Submission {
            job,
            ids,
            tx,
            ticket,
        })
        .map_err(|_| internal("the scheduler has stopped"))?;
    Ok(rx)
}

/// Generates `job` and answers it, whole or streamed.
pub(crate) async fn run(
    s: Arc<AppState>,
    job: Job,
    endpoint: Endpoint,
    ticket: Ticket,
) -> Response {
    let chat = endpoint == Endpoint::Chat;
    let id = format!("{}-{}", if chat { "chatcmpl" } else { "cmpl" }, now_nanos());
    let created = now();
    // Answers name the model as the server calls it, whatever alias the request used.
    let model = s.name.clone();
    let (stream, include_usage, choices) = (job.stream, job.include_usage, job.choices);
    let mut rx = match submit(&s, job, ticket) {
        Ok(rx) => rx,
        Err(e) => return e.into_response(),
    };
    if !stream {
        let mut texts = vec![String::new(); choices];
        let mut finish = vec![None; choices];
        let mut usage = None;
        while let Some(piece) = rx.recv().await {
            match piece {
                Piece::Text { choice, text } => texts[choice].push_str(&text),
                Piece::Failed(e) => return e.into_response(),
                Piece::Finished {
                    choice,
                    finish_reason,
                } => finish[choice] = Some(finish_reason),
                Piece::Done(u) => usage = Some(u),
            }
        }
        let Some(usage) = usage.filter(|_| finish.iter().all(Option::is_some)) else {
            return internal("generation ended unexpectedly").into_response();
        };
        let answers = texts
            .into_iter()
            .zip(finish)
            .enumerate()
            .map(|(index, (text, finish_reason))| {
                let output = if chat {
                    Output::Message(Message {
                        role: Some("assistant"),
                        content: Some(text),
                    })
                } else {
                    Output::Text(text)
                };
                Choice::new(index, output, finish_reason)
            })
            .collect();
        return Json(Completion {
            id: &id,
            object: if chat {
                "chat.completion"
            } else {
                "text_completion"
            },
            created,
            model: &model,
            choices: answers,
            usage: Some(usage),
        })
        .into_response();
    }
    // Streaming: the first piece decides between an error status and a 200 event stream.
    let first = match rx.recv().await {
        Some(Piece::Failed(e)) => return e.into_response(),
        Some(p) => p,
        None => return internal("generation ended unexpectedly").into_response(),
    };
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let event = move |choices: Vec<Choice>, usage: Option<Usage>| -> Event {
        let chunk = Completion {
            id: &id,
            object,
            created,
            model: &model,
            choices,
            usage,
        };
        Event::default().data(serde_json::to_string(&chunk).unwrap_or_default())
    };
    let chunk =
        move |choice: usize, text: Option<String>, finish: Option<&'static str>, first: bool| {
            let output = if chat {
                Output::Delta(Message {
                    role: first.then_some("assistant"),
                    content: text,
                })
            } else {
                Output::Text(text.unwrap_or_default())
            };
            vec![Choice::new(choice, output, finish)]
        };
    let mut started = vec![false; choices];
    let events = tokio_stream::iter(std::iter::once(first))
        .chain(UnboundedReceiverStream::new(rx))
        .filter_map(move |piece| {
            let event = match piece {
                Piece::Text { choice, text } => {
                    let first = !std::mem::replace(&mut started[choice], true);
                    event(chunk(choice, Some(text), None, first), None)
                }
                Piece::Finished {
                    choice,
                    finish_reason,
                } => {
                    let first = !std::mem::replace(&mut started[choice], true);
                    event(chunk(choice, None, Some(finish_reason), first), None)
                }
                Piece::Done(usage) if include_usage => event(Vec::new(), Some(usage)),
                Piece::Done(_) => return None,
                Piece::Failed(_) => Event::default().data(
                    json!({"error": {"message": "generation failed", "type": "server_error"}})
                        .to_string(),
                ),
            };
            Some(Ok::<_, std::convert::Infallible>(event))
        })
        .chain(tokio_stream::iter(std::iter::once(Ok(
            Event::default().data("[DONE]")
        ))));
    Sse::new(events).into_response()
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
