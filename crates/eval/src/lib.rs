//! Evaluation: next-token accuracy (the paper's metric), loss and perplexity on held-out text.
//!
//! The protocol, which later work and external checks compare against:
//! - each file is tokenised whole (plain text; JSONL: the `text` fields joined by newlines), with
//!   no BOS/EOS added;
//! - the ids are cut into consecutive non-overlapping windows of `seq_len` tokens, keeping a last
//!   shorter window if it has at least 2 tokens;
//! - in each window, position t predicts token t + 1;
//! - for a model whose tokenizer asks for a BOS at the start of every sequence (Gemma:
//!   `add_bos_token`), each window is fed with that BOS in front; the BOS's own prediction (of
//!   the window's first token) is not scored, so the scored predictions are the same with or
//!   without it. Models without it (SmolLM2) see the windows as they are.

pub mod gates;
pub mod stats;

use std::ops::Range;
use std::path::Path;

use candle_core::Tensor;
use mode_data::Split;
use mode_io::Tokenizer;
use mode_model::CausalLm;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Errors from reading evaluation data or running the model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{}: line {line}: {msg}", path.display())]
    Jsonl {
        path: std::path::PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{}: {msg}", path.display())]
    Data {
        path: std::path::PathBuf,
        msg: String,
    },
    #[error(transparent)]
    Model(#[from] mode_model::Error),
    #[error(transparent)]
    Io(#[from] mode_io::Error),
    #[error(transparent)]
    Mode(#[from] mode_core::Error),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Results for one file, as printed by `mode eval --json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FileReport {
    /// Fraction (0..1) of predictions whose argmax equals the next token.
    pub next_token_accuracy: f64,
    /// 95% interval of the accuracy (percent), bootstrapped over windows ([`stats`]).
    pub accuracy_interval: stats::Interval,
    /// Mean cross-entropy in nats per predicted token.
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
    pub predictions: usize,
    /// Windows scored.
    pub windows: usize,
    /// Accuracy on answer tokens alone, for prepared data with prompts (see [`EvalSet`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer_predictions: Option<usize>,
    /// Mean gate weight per block and branch (backbone first), for models with experts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gate_weights: Option<Vec<Vec<f64>>>,
}

/// Running sums over predictions; merge them to combine windows or files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub correct: usize,
    pub predictions: usize,
    pub loss_sum: f64,
}

impl Totals {
    pub fn add(&mut self, other: Totals) {
        self.correct += other.correct;
        self.predictions += other.predictions;
        self.loss_sum += other.loss_sum;
    }

    /// The sum of many.
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a Totals>) -> Totals {
        let mut t = Totals::default();
        for x in all {
            t.add(*x);
        }
        t
    }

    /// Mean cross-entropy in nats per prediction.
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.predictions.max(1) as f64
    }

    fn count(&mut self, correct: bool, loss: f64) {
        self.correct += correct as usize;
        self.predictions += 1;
        self.loss_sum += loss;
    }
}

/// The scores of one window: every prediction, and the predictions of answer tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowScore {
    pub all: Totals,
    /// Zero predictions when the set marks no answers.
    pub answer: Totals,
}

/// The report of a list of window scores (in window order) over a set of `tokens` tokens.
pub fn report(scores: &[WindowScore], tokens: usize, has_answers: bool) -> FileReport {
    let all = Totals::sum(scores.iter().map(|w| &w.all));
    let answer = Totals::sum(scores.iter().map(|w| &w.answer));
    let per_window: Vec<Totals> = scores.iter().map(|w| w.all).collect();
    let n = all.predictions.max(1) as f64;
    FileReport {
        next_token_accuracy: all.correct as f64 / n,
        accuracy_interval: stats::accuracy_interval(&per_window, 0),
        loss: all.loss(),
        perplexity: all.loss().exp(),
        tokens,
        predictions: all.predictions,
        windows: scores.len(),
        answer_accuracy: has_answers
            .then(|| answer.correct as f64 / answer.predictions.max(1) as f64),
        answer_predictions: has_answers.then_some(answer.predictions),
        gate_weights: None,
    }
}

/// Reads an evaluation file: plain text as is; `.jsonl` as its `text` fields joined by newlines.
pub fn read_eval_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| Error::Data {
        path: path.to_path_buf(),
        msg: format!(
            "not valid UTF-8 (first bad byte at offset {})",
            e.utf8_error().valid_up_to()
        ),
    })?;
    if path.extension().is_none_or(|e| e != "jsonl") {
        return Ok(text);
    }
    let mut texts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |msg: String| Error::Jsonl {
            path: path.to_path_buf(),
            line: i + 1,
            msg,
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let t = value
            .get("text")
            .and_then(|t| t.as_str())
            .ok_or_else(|| err("no string field `text`".into()))?;
        texts.push(t.to_string());
    }
    Ok(texts.join("\n"))
}

/// The protocol's windows over `len` tokens, as ranges.
pub fn window_ranges(len: usize, seq_len: usize) -> Vec<Range<usize>> {
    let step = seq_len.max(2);
    (0..len)
        .step_by(step)
        .map(|s| s..(s + step).min(len))
        .filter(|r| r.len() >= 2)
        .collect()
}

/// The protocol's windows over `ids`.
pub fn windows(ids: &[u32], seq_len: usize) -> Vec<&[u32]> {
    window_ranges(ids.len(), seq_len)
        .into_iter()
        .map(|r| &ids[r])
        .collect()
}

/// At most `max_windows` of `windows`, spread evenly over them (all when there are fewer), so
/// a capped evaluation still sees the whole set rather than its beginning.
pub fn spread<T: Clone>(windows: Vec<T>, max_windows: Option<usize>) -> Vec<T> {
    match max_windows {
        Some(k) if k < windows.len() => (0..k)
            .map(|i| windows[i * windows.len() / k].clone())
            .collect(),
        _ => windows,
    }
}

/// Token ids to evaluate, and which of them are answer tokens.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalSet {
    pub ids: Vec<u32>,
    /// `answer[i]`: token `i` belongs to an answer (a completion or assistant turn of prepared
    /// data, without the end-of-document token). `None` when the set has no prompts.
    pub answer: Option<Vec<bool>>,
    /// Fed before every window and not scored (the tokenizer's [`Tokenizer::leading_bos`]).
    pub bos: Option<u32>,
}

impl EvalSet {
    /// Plain ids, no answers, no BOS.
    pub fn plain(ids: Vec<u32>) -> Self {
        Self {
            ids,
            answer: None,
            bos: None,
        }
    }

    /// The same set with `bos` fed before every window.
    pub fn with_bos(self, bos: Option<u32>) -> Self {
        Self { bos, ..self }
    }
}

/// Evaluates a set: full windows in batches of `batch_size`, then the shorter tail window;
/// with `max_windows`, only that many windows spread over the ids ([`spread`]). Returns one
/// score per window, in the order of the windows in the text. `progress` is called with the
/// number of windows finished so far.
pub fn evaluate_ids(
    model: &dyn CausalLm,
    set: &EvalSet,
    seq_len: usize,
    batch_size: usize,
    max_windows: Option<usize>,
    mut progress: impl FnMut(usize),
) -> Result<Vec<WindowScore>> {
    let all = spread(window_ranges(set.ids.len(), seq_len), max_windows);
    let mut scores = vec![WindowScore::default(); all.len()];
    let (full, tail): (Vec<usize>, Vec<usize>) =
        (0..all.len()).partition(|&i| all[i].len() == seq_len);
    let mut done = 0;
    for batch in full.chunks(batch_size.max(1)).chain(tail.chunks(1)) {
        let ranges: Vec<Range<usize>> = batch.iter().map(|&i| all[i].clone()).collect();
        for (&i, s) in batch.iter().zip(score_batch(model, set, &ranges)?) {
            scores[i] = s;
        }
        done += batch.len();
        progress(done);
    }
    Ok(scores)
}

/// Scores a batch of equal-length windows of `set`.
fn score_batch(
    model: &dyn CausalLm,
    set: &EvalSet,
    batch: &[Range<usize>],
) -> Result<Vec<WindowScore>> {
    let (b, t) = (batch.len(), batch[0].len());
    let lead = set.bos.is_some() as usize;
    let flat: Vec<u32> = batch
        .iter()
        .flat_map(|r| {
            set.bos
                .into_iter()
                .chain(set.ids[r.clone()].iter().copied())
        })
        .collect();
    let ids = Tensor::from_vec(flat, (b, lead + t), model.device())?;
    let hidden = model.hidden_states(&ids, None)?;
    let h = hidden.dims()[2];
    // Positions 0..t-1 of each window predict the next token; the last position predicts
    // nothing, and a leading BOS's prediction is not scored.
    let hidden = hidden.narrow(1, lead, t - 1)?.reshape((b * (t - 1), h))?;
    // (window, target index in the set) of every prediction, in row order.
    let targets: Vec<(usize, usize)> = batch
        .iter()
        .enumerate()
        .flat_map(|(w, r)| (r.start + 1..r.end).map(move |i| (w, i)))
        .collect();
    // The LM head is applied in row chunks so the [rows x vocab] logits never exist whole.
    const ROWS_PER_CHUNK: usize = 256;
    let mut scores = vec![WindowScore::default(); b];
    for (c, target_chunk) in targets.chunks(ROWS_PER_CHUNK).enumerate() {
        let rows = hidden.narrow(0, c * ROWS_PER_CHUNK, target_chunk.len())?;
        let logits = model.logits(&rows)?.to_dtype(candle_core::DType::F32)?;
        let vocab = logits.dims()[1];
        let values = logits.flatten_all()?.to_vec1::<f32>()?;
        let per_row: Vec<(bool, f64)> = values
            .par_chunks(vocab)
            .zip(target_chunk.par_iter())
            .map(|(row, &(_, i))| score_row(row, set.ids[i] as usize))
            .collect();
        for ((correct, loss), &(w, i)) in per_row.into_iter().zip(target_chunk) {
            scores[w].all.count(correct, loss);
            if set.answer.as_ref().is_some_and(|a| a[i]) {
                scores[w].answer.count(correct, loss);
            }
        }
    }
    Ok(scores)
}

/// (argmax == target, -log softmax(row)[target]) for one row of logits.
fn score_row(row: &[f32], target: usize) -> (bool, f64) {
    let (mut best, mut best_i) = (f32::NEG_INFINITY, 0);
    for (i, &v) in row.iter().enumerate() {
        if v > best {
            best = v;
            best_i = i;
        }
    }
    let sum: f64 = row.iter().map(|&v| ((v - best) as f64).exp()).sum();
    let log_z = best as f64 + sum.ln();
    (best_i == target, log_z - row[target] as f64)
}

/// The token ids a path stands for: a file is read and tokenised whole per the protocol; a
/// folder written by `mode data prepare` gives its test split (documents separated by EOS),
/// provided it was prepared with this tokenizer.
pub fn eval_ids(path: &Path, tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    Ok(eval_set(path, tokenizer, Split::Test)?.ids)
}

/// What [`eval_ids`] reads, with the answer tokens of prepared data: for a prepared folder,
/// `split` picks the split; the tokens its loss mask marks are answers (completions,
/// assistant turns), except each document's end token, when the mask leaves some tokens out.
pub fn eval_set(path: &Path, tokenizer: &Tokenizer, split: Split) -> Result<EvalSet> {
    if path.is_dir() {
        let data_err = |msg: String| Error::Data {
            path: path.to_path_buf(),
            msg,
        };
        let data = mode_data::PreparedData::open(path).map_err(|e| data_err(e.to_string()))?;
        if data.manifest.tokenizer_fingerprint != tokenizer.fingerprint() {
            return Err(data_err(
                "prepared with another tokenizer than this model's".into(),
            ));
        }
        data.check_vocab(tokenizer.id_bound())
            .map_err(|e| data_err(e.to_string()))?;
        let part = data.split(split);
        let mask = part.mask();
        let answer = mask.contains(&0).then(|| {
            let mut a: Vec<bool> = mask.iter().map(|&m| m != 0).collect();
            for &end in &part.doc_offsets()[1..] {
                if let Some(x) = (end as usize).checked_sub(1).and_then(|i| a.get_mut(i)) {
                    *x = false;
                }
            }
            a
        });
        return Ok(EvalSet {
            ids: part.tokens().to_vec(),
            answer,
            bos: tokenizer.leading_bos(),
        });
    }
    let text = read_eval_text(path)?;
    // As `mode data prepare` does: one huge pre-token is slow and memory-hungry to tokenise.
    if let Some((line, len)) = mode_data::read::long_line(&text) {
        return Err(Error::Data {
            path: path.to_path_buf(),
            msg: format!(
                "line {line} of the text is {len} bytes long, over the limit of {} bytes \
                 (minified or binary data?)",
                mode_data::read::MAX_LINE_BYTES
            ),
        });
    }
    Ok(EvalSet::plain(tokenizer.encode(&text)?).with_bos(tokenizer.leading_bos()))
}

/// Evaluates a file or prepared folder (see [`eval_set`]; a folder's `split`), on at most
/// `max_windows` windows spread over it. Returns the report and the score of each window.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_path(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    path: &Path,
    split: Split,
    seq_len: usize,
    batch_size: usize,
    max_windows: Option<usize>,
    progress: impl FnMut(usize, usize),
) -> Result<(FileReport, Vec<WindowScore>)> {
    let set = eval_set(path, tokenizer, split)?;
    let all = window_ranges(set.ids.len(), seq_len);
    let all_windows = all.len();
    let n_windows = spread(all, max_windows).len();
    if n_windows == 0 {
        return Err(Error::Data {
            path: path.to_path_buf(),
            msg: if path.is_dir() {
                format!(
                    "its {} split has {} tokens: nothing to evaluate (prepare it with a \
                     larger fraction for that split)",
                    split.name(),
                    set.ids.len()
                )
            } else {
                format!(
                    "{} tokens: nothing to evaluate (need at least 2)",
                    set.ids.len()
                )
            },
        });
    }
    let mut progress = progress;
    let scores = evaluate_ids(model, &set, seq_len, batch_size, max_windows, |done| {
        progress(done, n_windows)
    })?;
    let predictions: usize = scores.iter().map(|w| w.all.predictions).sum();
    let tokens = if n_windows < all_windows {
        predictions + n_windows
    } else {
        set.ids.len()
    };
    Ok((report(&scores, tokens, set.answer.is_some()), scores))
}

/// Evaluates a file or prepared folder's test split (see [`evaluate_path`]).
pub fn evaluate_file(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    path: &Path,
    seq_len: usize,
    batch_size: usize,
    max_windows: Option<usize>,
    progress: impl FnMut(usize, usize),
) -> Result<FileReport> {
    Ok(evaluate_path(
        model,
        tokenizer,
        path,
        Split::Test,
        seq_len,
        batch_size,
        max_windows,
        progress,
    )?
    .0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_the_protocol() {
        let ids: Vec<u32> = (0..11).collect();
        let w = windows(&ids, 4);
        assert_eq!(w, vec![&ids[0..4], &ids[4..8], &ids[8..11]]);
        let ids: Vec<u32> = (0..9).collect();
        // A last window of a single token predicts nothing and is dropped.
        assert_eq!(windows(&ids, 4).len(), 2);
    }

    #[test]
    fn spread_windows_cover_the_whole_set() {
        let ids: Vec<u32> = (0..40).collect();
        let w = spread(windows(&ids, 4), Some(3));
        assert_eq!(w, vec![&ids[0..4], &ids[12..16], &ids[24..28]]);
        assert_eq!(spread(windows(&ids, 4), Some(50)).len(), 10);
        assert_eq!(spread(windows(&ids, 4), None).len(), 10);
    }

    #[test]
    fn score_row_matches_log_softmax() {
        let row = [1.0f32, 3.0, 2.0];
        let (correct, loss) = score_row(&row, 1);
        assert!(correct);
        let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
        assert!((loss - (z.ln() - 3.0)).abs() < 1e-12);
        let (correct, _) = score_row(&row, 2);
        assert!(!correct);
    }
}
