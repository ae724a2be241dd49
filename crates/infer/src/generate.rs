//! Autoregressive generation with a KV cache, streaming text as it is produced.

use std::time::Instant;

use candle_core::{IndexOp, Tensor};
use mode_io::Tokenizer;
use mode_model::CausalLm;

use crate::{Error, Result, Sampler};

/// Timing of one generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    /// Generation ended at an end-of-turn token (not at the token limit or on request).
    pub ended_at_eos: bool,
}

impl GenerationStats {
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }

    /// Tokens per second after the first one (which comes out of the prefill).
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.new_tokens.saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// Generates up to `max_new_tokens` after `prompt`, stopping at an end-of-turn token. Each
/// piece of new text is passed to `on_text` as soon as it decodes to whole characters;
/// `on_text` returning `false` stops generation (a client that went away).
pub fn generate(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    max_new_tokens: usize,
    sampler: &mut Sampler,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<(Vec<u32>, GenerationStats)> {
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt is empty".into()));
    }
    let device = model.device();
    let mut cache = model.new_cache();
    let mut stream = TextStream::default();
    let mut out = Vec::new();
    let mut stats = GenerationStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };

    let start = Instant::now();
    let ids = Tensor::new(prompt, device)?.unsqueeze(0)?;
    let mut logits = last_logits(model, &ids, &mut cache)?;
    stats.prefill_secs = start.elapsed().as_secs_f64();

    let decode_start = Instant::now();
    for step in 0..max_new_tokens {
        let next = sampler.sample(&logits);
        if tokenizer.eos_ids().contains(&next) {
            stats.ended_at_eos = true;
            break;
        }
        out.push(next);
        if let Some(text) = stream.push(tokenizer, next)? {
            if !on_text(&text) {
                break;
            }
        }
        if step + 1 == max_new_tokens {
            break;
        }
        let ids = Tensor::new(&[next], device)?.unsqueeze(0)?;
        logits = last_logits(model, &ids, &mut cache)?;
    }
    if let Some(text) = stream.flush(tokenizer)? {
        on_text(&text);
    }
    stats.decode_secs = decode_start.elapsed().as_secs_f64();
    stats.new_tokens = out.len();
    Ok((out, stats))
}

fn last_logits(
    model: &dyn CausalLm,
    ids: &Tensor,
    cache: &mut mode_model::KvCache,
) -> Result<Vec<f32>> {
    let hidden = model.hidden_states(ids, Some(cache))?;
    let t = hidden.dims()[1];
    let last = hidden.i((0, t - 1..t, ..))?.contiguous()?;
    let logits = model.logits(&last)?;
    Ok(logits
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?)
}

/// Incremental detokenisation: emits text only once it decodes to whole characters, so
/// multi-byte characters split across tokens are never printed half-way.
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    printed: usize,
}

impl TextStream {
    /// Adds a token; returns the newly completed text, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = tokenizer.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}')
            || text.len() <= self.printed
            || !text.is_char_boundary(self.printed)
        {
            return Ok(None);
        }
        let new = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(Some(new))
    }

    /// Whatever is left, even if incomplete.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        let text = tokenizer.decode(&self.ids)?;
        if text.len() > self.printed && text.is_char_boundary(self.printed) {
            let new = text[self.printed..].to_string();
            self.printed = text.len();
            return Ok(Some(new));
        }
        Ok(None)
    }
}
