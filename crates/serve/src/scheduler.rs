//! Continuous batching: one thread runs every request's sequences together.
//!
//! Each step of the loop (1) admits waiting sequences while fewer than `parallel` run and
//! their KV caches fit the memory budget, and (2) runs one packed forward
//! ([`ModeModel::step_packed`]) in which every sequence past its prompt decodes one token and
//! the sequences still reading their prompt read at most `prefill_chunk` prompt tokens in all,
//! oldest first, so a long prompt delays the running streams by one chunk at a time, not by its
//! whole length. The backbone's weights are read once per step for all of them, and each expert
//! runs only on the rows of the requests that use it. A finished or abandoned sequence leaves
//! at once. Each of a request's `n` answers is its own sequence.
//!
//! The model lock is held while sequences run, so the model never changes under one (its
//! experts' indices and cache slots stay valid). Adding or removing an expert raises
//! `model_change`: no new sequence is admitted, the running ones finish, and the lock is
//! released for the change.

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use mode_core::{ModeModel, Routing};
use mode_infer::{Sampler, SamplingParams, StopText, TextStream};
use mode_io::Tokenizer;
use mode_model::{CausalLm, KvCache};
use tokio::sync::mpsc::UnboundedSender;

use crate::admission::Ticket;
use crate::error::{internal, ApiError};
use crate::experts::ExpertSet;
use crate::generation::{job_routing, Piece};
use crate::openai::Usage;
use crate::prompt_cache::PromptCache;
use crate::request::Job;

/// How the scheduler batches.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Most sequences decoded together.
    pub parallel: usize,
    /// Most prompt tokens read in one step, over all the prompts being read.
    pub prefill_chunk: usize,
    /// Memory for the running sequences' keys and values; a sequence reserves room for its
    /// prompt and its `max_tokens` when it starts.
    pub kv_cache_bytes: u64,
    /// Memory for the keys and values of prompts already read, so that a prompt starting the
    /// same way reads only the rest ([`PromptCache`]); 0 keeps none.
    pub prompt_cache_bytes: u64,
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            parallel: 16,
            prefill_chunk: 256,
            kv_cache_bytes: 2 << 30,
            prompt_cache_bytes: 256 << 20,
        }
    }
}

/// Counters of the scheduler's work, read by `GET /metrics`.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Sequences decoding or reading their prompt now.
    pub running: AtomicUsize,
    /// Sequences waiting to start.
    pub waiting: AtomicUsize,
    pub decode_steps: AtomicU64,
    /// Rows of all decode steps: tokens decoded in batches.
    pub decode_rows: AtomicU64,
    /// The most rows one decode step has had.
    pub max_rows: AtomicUsize,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens whose keys and values came from the prompt cache instead.
    pub cached_prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
}

impl Stats {
    /// The counters in Prometheus' text format.
    pub fn prometheus(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let now = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        let lines = [
            (
                "mode_sequences_running",
                "gauge",
                "Sequences being decoded or reading their prompt.",
                now(&self.running) as u64,
            ),
            (
                "mode_sequences_waiting",
                "gauge",
                "Sequences waiting for a place in the batch.",
                now(&self.waiting) as u64,
            ),
            (
                "mode_decode_steps_total",
                "counter",
                "Batched decode steps run.",
                get(&self.decode_steps),
            ),
            (
                "mode_decode_rows_total",
                "counter",
                "Tokens decoded, summed over the rows of every decode step.",
                get(&self.decode_rows),
            ),
            (
                "mode_decode_rows_max",
                "gauge",
                "The most rows one decode step has had.",
                now(&self.max_rows) as u64,
            ),
            (
                "mode_prompt_tokens_total",
                "counter",
                "Prompt tokens read.",
                get(&self.prompt_tokens),
            ),
            (
                "mode_prompt_tokens_cached_total",
                "counter",
                "Prompt tokens taken from the prompt cache instead of read.",
                get(&self.cached_prompt_tokens),
            ),
            (
                "mode_generated_tokens_total",
                "counter",
                "Tokens generated.",
                get(&self.generated_tokens),
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in lines {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        }
        out
    }
}

/// Bytes of keys and values one token of one sequence holds in `model` (f32, every backbone
/// and expert layer).
pub(crate) fn kv_bytes_per_token(model: &ModeModel) -> u64 {
    let c = &model.backbone.config;
    let layers = model.new_cache().layers.len() as u64;
    layers * 2 * (c.num_key_value_heads * c.head_dim) as u64 * 4
}

/// A request handed to the scheduler: its prompt tokenised, where its pieces go, and its place
/// in the server.
pub(crate) struct Submission {
    pub job: Job,
    pub ids: Vec<u32>,
    pub tx: UnboundedSender<Piece>,
    pub ticket: Ticket,
}

/// What the sequences of one request share.
struct Request {
    job: Job,
    ids: Vec<u32>,
    routing: Routing,
    tx: UnboundedSender<Piece>,
    /// Answers not finished yet, and the completion tokens of those that are.
    open: std::cell::Cell<(usize, usize)>,
    _ticket: Ticket,
}

impl Request {
    fn send(&self, piece: Piece) -> bool {
        self.tx.send(piece).is_ok()
    }
}

/// One answer being generated.
struct Sequence {
    request: Rc<Request>,
    choice: usize,
    cache: KvCache,
    /// Prompt tokens read so far.
    read: usize,
    /// The token the next decode step feeds (sampled, not yet fed).
    next: Option<u32>,
    generated: usize,
    sampler: Sampler,
    stop: StopText,
    text: TextStream,
    reserved_bytes: u64,
    /// Finished (with its reason) or abandoned (`Some("")`: the client went away).
    done: Option<&'static str>,
}

/// What the scheduler thread needs.
pub(crate) struct Scheduler {
    pub model: Arc<tokio::sync::Mutex<ModeModel>>,
    pub tokenizer: Arc<Tokenizer>,
    pub experts: Arc<std::sync::Mutex<ExpertSet>>,
    pub batching: Batching,
    /// Expert changes waiting for the running sequences to finish.
    pub model_change: Arc<AtomicUsize>,
    /// Counts the changes of the model's experts (read while holding the model lock).
    pub model_generation: Arc<AtomicU64>,
    pub stats: Arc<Stats>,
}

impl Scheduler {
    /// Runs until every sender of `inbox` is gone.
    pub fn run(self, inbox: mpsc::Receiver<Submission>) {
        let mut waiting: VecDeque<Submission> = VecDeque::new();
        let mut queued: VecDeque<(Rc<Request>, usize)> = VecDeque::new();
        let mut running: Vec<Sequence> = Vec::new();
        let mut prompts = PromptCache::new(self.batching.prompt_cache_bytes);
        loop {
            if waiting.is_empty() && queued.is_empty() {
                match inbox.recv() {
                    Ok(s) => waiting.push_back(s),
                    Err(_) => return,
                }
            }
            // Let a pending expert change take the model first.
            while self.model_change.load(Ordering::Acquire) > 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
            let model = self.model.blocking_lock();
            prompts.sync(self.model_generation.load(Ordering::Acquire));
            loop {
                waiting.extend(inbox.try_iter());
                if self.model_change.load(Ordering::Acquire) == 0 {
                    self.admit(
                        &model,
                        &mut waiting,
                        &mut queued,
                        &mut running,
                        &mut prompts,
                    );
                }
                if running.is_empty() {
                    break;
                }
                self.step(&model, &mut running, &mut prompts);
                running.retain(|s| s.done.is_none());
                let waiting_seqs: usize =
                    queued.len() + waiting.iter().map(|s| s.job.choices).sum::<usize>();
                self.stats.running.store(running.len(), Ordering::Relaxed);
                self.stats.waiting.store(waiting_seqs, Ordering::Relaxed);
            }
        }
    }

    /// Starts waiting sequences while there is room, each from the longest start of its
    /// prompt that `prompts` holds.
    fn admit(
        &self,
        model: &ModeModel,
        waiting: &mut VecDeque<Submission>,
        queued: &mut VecDeque<(Rc<Request>, usize)>,
        running: &mut Vec<Sequence>,
        prompts: &mut PromptCache,
    ) {
        let per_token = kv_bytes_per_token(model);
        let mut reserved: u64 = running.iter().map(|s| s.reserved_bytes).sum();
        while running.len() < self.batching.parallel {
            if queued.is_empty() {
                let Some(sub) = waiting.pop_front() else {
                    return;
                };
                if let Some(request) = self.open(model, sub) {
                    let request = Rc::new(request);
                    queued.extend((0..request.job.choices).map(|c| (request.clone(), c)));
                }
                continue;
            }
            let (request, choice) = queued.front().expect("not empty").clone();
            let tokens = (request.ids.len() + request.job.max_new_tokens) as u64;
            let need = tokens * per_token;
            // Alone, a sequence always starts: the request check keeps it within the budget.
            if !running.is_empty() && reserved + need > self.batching.kv_cache_bytes {
                return;
            }
            queued.pop_front();
            if request.tx.is_closed() {
                continue;
            }
            reserved += need;
            let cached = prompts
                .lookup(&request.routing, &request.ids, tokens as usize)
                .unwrap_or_else(|e| {
                    eprintln!("mode serve: prompt cache: {e}");
                    None
                });
            let (cache, read) = cached.unwrap_or_else(|| {
                let mut cache = model.new_cache();
                cache.reserve(tokens as usize);
                (cache, 0)
            });
            self.stats
                .cached_prompt_tokens
                .fetch_add(read as u64, Ordering::Relaxed);
            running.push(Sequence {
                sampler: Sampler::new(SamplingParams {
                    seed: request.job.params.seed.wrapping_add(choice as u64),
                    ..request.job.params.clone()
                }),
                stop: StopText::new(request.job.stop.iter().cloned()),
                request,
                choice,
                cache,
                read,
                next: None,
                generated: 0,
                text: TextStream::default(),
                reserved_bytes: need,
                done: None,
            });
        }
    }

    /// The request of `sub` with its routing on the model as it is now; `None` (the client
    /// told why) when that fails.
    fn open(&self, model: &ModeModel, sub: Submission) -> Option<Request> {
        let set = self
            .experts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match job_routing(model, &set, &sub.job) {
            Ok(routing) => Some(Request {
                open: std::cell::Cell::new((sub.job.choices, 0)),
                job: sub.job,
                ids: sub.ids,
                routing,
                tx: sub.tx,
                _ticket: sub.ticket,
            }),
            Err(e) => {
                let _ = sub.tx.send(Piece::Failed(e));
                None
            }
        }
    }

    /// One packed forward for every running sequence: each decoding sequence feeds its next
    /// token, and sequences reading their prompt feed the next part of it (a prompt read to
    /// its end goes into `prompts`).
    fn step(&self, model: &ModeModel, running: &mut [Sequence], prompts: &mut PromptCache) {
        for seq in running.iter_mut() {
            if seq.request.tx.is_closed() {
                seq.done = Some("");
            }
        }
        // Prompts share one budget of `prefill_chunk` tokens per step, oldest first: many
        // short prompts start in one step, a long one is read over several.
        let mut budget = self.batching.prefill_chunk.max(1);
        let mut rows: Vec<&mut Sequence> = Vec::with_capacity(running.len());
        let mut chunks: Vec<Vec<u32>> = Vec::with_capacity(running.len());
        for seq in running.iter_mut().filter(|s| s.done.is_none()) {
            let chunk = match seq.next {
                Some(token) => vec![token],
                None if budget > 0 && seq.read < seq.request.ids.len() => {
                    let n = (seq.request.ids.len() - seq.read).min(budget);
                    budget -= n;
                    seq.request.ids[seq.read..seq.read + n].to_vec()
                }
                None => continue,
            };
            rows.push(seq);
            chunks.push(chunk);
        }
        if rows.is_empty() {
            return;
        }
        let decoding = rows.iter().filter(|s| s.next.is_some()).count();
        let stats = &self.stats;
        if decoding > 0 {
            stats.decode_steps.fetch_add(1, Ordering::Relaxed);
            stats
                .decode_rows
                .fetch_add(decoding as u64, Ordering::Relaxed);
            stats.max_rows.fetch_max(decoding, Ordering::Relaxed);
        }
        let routings: Vec<Routing> = rows.iter().map(|s| s.request.routing.clone()).collect();
        let routing_refs: Vec<&Routing> = routings.iter().collect();
        let chunk_refs: Vec<&[u32]> = chunks.iter().map(|c| c.as_slice()).collect();
        let logits = {
            let mut caches: Vec<&mut KvCache> = rows.iter_mut().map(|s| &mut s.cache).collect();
            model
                .step_packed(&chunk_refs, &mut caches, &routing_refs)
                .and_then(|l| Ok(l.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?))
        };
        let logits = match logits {
            Ok(logits) => logits,
            Err(e) => {
                for seq in rows {
                    fail(std::slice::from_mut(seq), internal(e.to_string()));
                }
                return;
            }
        };
        for ((seq, chunk), row) in rows.into_iter().zip(chunks).zip(logits) {
            if seq.next.is_none() {
                seq.read += chunk.len();
                stats
                    .prompt_tokens
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                if seq.read < seq.request.ids.len() {
                    continue;
                }
                let request = &seq.request;
                let per_token = kv_bytes_per_token(model);
                if let Err(e) =
                    prompts.insert(&request.routing, &request.ids, &seq.cache, per_token)
                {
                    eprintln!("mode serve: prompt cache: {e}");
                }
            }
            self.take_token(seq, &row);
        }
    }

    /// Samples `seq`'s next token from `logits`, sends its text, and ends the sequence at an
    /// end-of-turn token, a stop sequence or its token limit.
    fn take_token(&self, seq: &mut Sequence, logits: &[f32]) {
        let token = seq.sampler.sample(logits);
        seq.next = None;
        let choice = seq.choice;
        let send = |seq: &Sequence, text: String| {
            text.is_empty() || seq.request.send(Piece::Text { choice, text })
        };
        if self.tokenizer.eos_ids().contains(&token) {
            return self.finish(seq, "stop");
        }
        seq.generated += 1;
        self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        match seq.text.push(&self.tokenizer, token) {
            Ok(Some(text)) => {
                let cut = seq.stop.push(&text);
                if !send(seq, cut) {
                    seq.done = Some("");
                    return;
                }
            }
            Ok(None) => {}
            Err(e) => return fail(std::slice::from_mut(seq), internal(e.to_string())),
        }
        if seq.stop.stopped() {
            self.finish(seq, "stop");
        } else if seq.generated >= seq.request.job.max_new_tokens {
            self.finish(seq, "length");
        } else {
            seq.next = Some(token);
        }
    }

    /// Sends what is left of `seq`'s text and its end; the request's last answer also sends
    /// the token counts.
    fn finish(&self, seq: &mut Sequence, finish_reason: &'static str) {
        let choice = seq.choice;
        let mut rest = String::new();
        if !seq.stop.stopped() {
            if let Ok(Some(text)) = seq.text.flush(&self.tokenizer) {
                rest.push_str(&seq.stop.push(&text));
            }
        }
        rest.push_str(&seq.stop.finish());
        seq.done = Some(finish_reason);
        let request = &seq.request;
        if !rest.is_empty() && !request.send(Piece::Text { choice, text: rest }) {
            return;
        }
        if !request.send(Piece::Finished {
            choice,
            finish_reason,
        }) {
            return;
        }
        let (open, tokens) = request.open.get();
        request.open.set((open - 1, tokens + seq.generated));
        if open == 1 {
            let _ = request.send(Piece::Done(Usage::new(
                request.ids.len(),
                tokens + seq.generated,
            )));
        }
    }
}

/// Ends `seqs` with an error sent to their clients.
fn fail(seqs: &mut [Sequence], e: ApiError) {
    for seq in seqs {
        let _ = seq.request.send(Piece::Failed(e.clone()));
        seq.done = Some("");
    }
}
