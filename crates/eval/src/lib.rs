//! Evaluation: next-token accuracy (the paper's metric), loss and perplexity on held-out text.
//!
//! The protocol, which later work and external checks compare against:
//! - each file is tokenised whole (plain text; JSONL: the `text` fields joined by newlines), with
//!   no BOS/EOS added;
//! - the ids are cut into consecutive non-overlapping windows of `seq_len` tokens, keeping a last
//!   shorter window if it has at least 2 tokens;
//! - in each window, position t predicts token t + 1.

pub mod gates;

use std::path::Path;

use candle_core::Tensor;
use mode_io::Tokenizer;
use mode_model::CausalLm;
use rayon::prelude::*;
use serde::Serialize;

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
    /// Mean cross-entropy in nats per predicted token.
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
    pub predictions: usize,
    /// Mean gate weight per block and branch (backbone first), for models with experts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gate_weights: Option<Vec<Vec<f64>>>,
}

/// Running sums over predictions; merge them to combine windows or files.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
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

    pub fn report(&self, tokens: usize) -> FileReport {
        let n = self.predictions.max(1) as f64;
        let loss = self.loss_sum / n;
        FileReport {
            next_token_accuracy: self.correct as f64 / n,
            loss,
            perplexity: loss.exp(),
            tokens,
            predictions: self.predictions,
            gate_weights: None,
        }
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

/// The protocol's windows over `ids`.
pub fn windows(ids: &[u32], seq_len: usize) -> Vec<&[u32]> {
    ids.chunks(seq_len.max(2))
        .filter(|w| w.len() >= 2)
        .collect()
}

/// At most `max_windows` of `windows`, spread evenly over them (all when there are fewer), so
/// a capped evaluation still sees the whole set rather than its beginning.
pub fn spread(windows: Vec<&[u32]>, max_windows: Option<usize>) -> Vec<&[u32]> {
    match max_windows {
        Some(k) if k < windows.len() => (0..k).map(|i| windows[i * windows.len() / k]).collect(),
        _ => windows,
    }
}

/// Evaluates token ids: full windows in batches of `batch_size`, then the shorter tail window;
/// with `max_windows`, only that many windows spread over the ids ([`spread`]). `progress` is
/// called with the number of windows finished so far.
pub fn evaluate_ids(
    model: &dyn CausalLm,
    ids: &[u32],
    seq_len: usize,
    batch_size: usize,
    max_windows: Option<usize>,
    mut progress: impl FnMut(usize),
) -> Result<Totals> {
    let all = spread(windows(ids, seq_len), max_windows);
    let mut totals = Totals::default();
    let mut done = 0;
    let (full, tail): (Vec<&[u32]>, Vec<&[u32]>) = all.iter().partition(|w| w.len() == seq_len);
    for batch in full.chunks(batch_size.max(1)).chain(tail.chunks(1)) {
        totals.add(score_batch(model, batch)?);
        done += batch.len();
        progress(done);
    }
    Ok(totals)
}

/// Scores a batch of equal-length windows.
fn score_batch(model: &dyn CausalLm, batch: &[&[u32]]) -> Result<Totals> {
    let (b, t) = (batch.len(), batch[0].len());
    let flat: Vec<u32> = batch.iter().flat_map(|w| w.iter().copied()).collect();
    let ids = Tensor::from_vec(flat.clone(), (b, t), model.device())?;
    let hidden = model.hidden_states(&ids, None)?;
    let h = hidden.dims()[2];
    // Positions 0..t-1 of each window predict the next token; the last position predicts nothing.
    let hidden = hidden.narrow(1, 0, t - 1)?.reshape((b * (t - 1), h))?;
    let targets: Vec<u32> = batch.iter().flat_map(|w| w[1..].iter().copied()).collect();
    // The LM head is applied in row chunks so the [rows x vocab] logits never exist whole.
    const ROWS_PER_CHUNK: usize = 256;
    let mut totals = Totals::default();
    for (c, target_chunk) in targets.chunks(ROWS_PER_CHUNK).enumerate() {
        let rows = hidden.narrow(0, c * ROWS_PER_CHUNK, target_chunk.len())?;
        let logits = model.logits(&rows)?.to_dtype(candle_core::DType::F32)?;
        let vocab = logits.dims()[1];
        let values = logits.flatten_all()?.to_vec1::<f32>()?;
        let per_row: Vec<(bool, f64)> = values
            .par_chunks(vocab)
            .zip(target_chunk.par_iter())
            .map(|(row, &target)| score_row(row, target as usize))
            .collect();
        for (correct, loss) in per_row {
            totals.correct += correct as usize;
            totals.loss_sum += loss;
            totals.predictions += 1;
        }
    }
    Ok(totals)
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
    if path.is_dir() {
        let data = mode_data::PreparedData::open(path).map_err(|e| Error::Data {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        if data.manifest.tokenizer_fingerprint != tokenizer.fingerprint() {
            return Err(Error::Data {
                path: path.to_path_buf(),
                msg: "prepared with another tokenizer than this model's".into(),
            });
        }
        data.check_vocab(tokenizer.id_bound())
            .map_err(|e| Error::Data {
                path: path.to_path_buf(),
                msg: e.to_string(),
            })?;
        return Ok(data.split(mode_data::Split::Test).tokens().to_vec());
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
    Ok(tokenizer.encode(&text)?)
}

/// Evaluates a file or prepared folder (see [`eval_ids`]), on at most `max_windows` windows
/// spread over it.
pub fn evaluate_file(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    path: &Path,
    seq_len: usize,
    batch_size: usize,
    max_windows: Option<usize>,
    progress: impl FnMut(usize, usize),
) -> Result<FileReport> {
    let ids = eval_ids(path, tokenizer)?;
    let n_windows = spread(windows(&ids, seq_len), max_windows).len();
    if n_windows == 0 {
        return Err(Error::Data {
            path: path.to_path_buf(),
            msg: if path.is_dir() {
                format!(
                    "its test split has {} tokens: nothing to evaluate (prepare it with \
                     --test-fraction above 0)",
                    ids.len()
                )
            } else {
                format!(
                    "{} tokens: nothing to evaluate (need at least 2)",
                    ids.len()
                )
            },
        });
    }
    let mut progress = progress;
    let totals = evaluate_ids(model, &ids, seq_len, batch_size, max_windows, |done| {
        progress(done, n_windows)
    })?;
    let tokens = if n_windows < windows(&ids, seq_len).len() {
        totals.predictions + n_windows
    } else {
        ids.len()
    };
    Ok(totals.report(tokens))
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
