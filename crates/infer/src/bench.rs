//! Decoding speed, measured the way `mode bench infer|decode` reports it: greedy generation
//! that never stops early (so every run decodes the same number of tokens), configurations run
//! round-robin (one run of each in turn, so that load on a shared machine hits them alike),
//! medians over the timed runs after one warm-up round.

use std::time::Instant;

use candle_core::{IndexOp, Tensor};
use mode_io::Tokenizer;
use mode_model::CausalLm;
use serde::Serialize;

use crate::Result;

/// Public-domain text (the opening of Moby-Dick), the benchmarks' input.
pub const TEXT: &str = "Call me Ishmael. Some years ago—never mind how long precisely—having little or no money \
in my purse, and nothing particular to interest me on shore, I thought I would sail about a little and see \
the watery part of the world. It is a way I have of driving off the spleen and regulating the circulation. \
Whenever I find myself growing grim about the mouth; whenever it is a damp, drizzly November in my soul; \
whenever I find myself involuntarily pausing before coffin warehouses, and bringing up the rear of every \
funeral I meet; and especially whenever my hypos get such an upper hand of me, that it requires a strong \
moral principle to prevent me from deliberately stepping into the street, and methodically knocking \
people's hats off—then, I account it high time to get to sea as soon as I can. ";

/// `tokens` ids of [`TEXT`], repeated as often as needed.
pub fn text_ids(tokenizer: &Tokenizer, tokens: usize) -> Result<Vec<u32>> {
    let once = tokenizer.encode(TEXT)?;
    let mut ids = Vec::with_capacity(tokens + once.len());
    while ids.len() < tokens && !once.is_empty() {
        ids.extend_from_slice(&once);
    }
    ids.truncate(tokens);
    Ok(ids)
}

/// The timing of one greedy generation.
#[derive(Debug, Clone, Copy)]
pub struct GreedyTiming {
    pub prefill_tokens_per_sec: f64,
    /// Prompt in, first new token out.
    pub first_token_secs: f64,
    pub decode_tokens_per_sec: f64,
}

/// Times a greedy generation of `new_tokens` after `prompt`, with a KV cache; it never stops
/// early.
pub fn time_greedy(
    model: &dyn CausalLm,
    prompt: &[u32],
    new_tokens: usize,
) -> Result<GreedyTiming> {
    let device = model.device();
    let mut cache = model.new_cache();
    let argmax_last = |hidden: &Tensor| -> Result<u32> {
        let t = hidden.dims()[1];
        let last = hidden.i((0, t - 1..t, ..))?.contiguous()?;
        Ok(model
            .logits(&last)?
            .flatten_all()?
            .argmax(0)?
            .to_scalar::<u32>()?)
    };
    let start = Instant::now();
    let ids = Tensor::new(prompt, device)?.unsqueeze(0)?;
    let mut next = argmax_last(&model.hidden_states(&ids, Some(&mut cache))?)?;
    let first_token_secs = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..new_tokens {
        let ids = Tensor::new(&[next], device)?.unsqueeze(0)?;
        next = argmax_last(&model.hidden_states(&ids, Some(&mut cache))?)?;
    }
    Ok(GreedyTiming {
        prefill_tokens_per_sec: prompt.len() as f64 / first_token_secs,
        first_token_secs,
        decode_tokens_per_sec: new_tokens as f64 / start.elapsed().as_secs_f64(),
    })
}

/// Aggregate greedy decode tokens/s of `streams` sequences decoded together, one batched step
/// ([`mode_core::ModeModel::decode_step`]) per token for all of them, as `mode serve` decodes
/// its running requests; each sequence first reads `prompt` with its own cache (not timed).
pub fn time_batched_greedy(
    model: &mode_core::ModeModel,
    prompt: &[u32],
    streams: usize,
    new_tokens: usize,
) -> Result<f64> {
    let routing = mode_core::Routing::default();
    let mut caches = Vec::with_capacity(streams);
    let mut next = Vec::with_capacity(streams);
    let ids = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
    for _ in 0..streams {
        let mut cache = model.new_cache();
        cache.reserve(prompt.len() + new_tokens);
        let hidden = model.forward_routed(&ids, Some(&mut cache), &routing, None)?;
        let t = hidden.dims()[1];
        let logits = model.logits(&hidden.i((0, t - 1..t, ..))?.contiguous()?)?;
        next.push(logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?);
        caches.push(cache);
    }
    let routings = vec![&routing; streams];
    let start = Instant::now();
    for _ in 0..new_tokens {
        let mut refs: Vec<&mut mode_model::KvCache> = caches.iter_mut().collect();
        let logits = model.decode_step(&next, &mut refs, &routings)?;
        next = logits.argmax(1)?.to_vec1::<u32>()?;
    }
    Ok((streams * new_tokens) as f64 / start.elapsed().as_secs_f64())
}

/// Medians of one configuration over the timed runs.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeRow {
    pub config: String,
    pub first_token_secs: f64,
    pub prefill_tokens_per_sec: f64,
    pub decode_tokens_per_sec: f64,
    /// Decode speed relative to the first configuration (the reference).
    pub decode_vs_reference: f64,
}

/// Runs every configuration `runs` times (after a warm-up round), round-robin, and returns
/// their medians; `on_run(run, name, timing)` sees every run, run 0 being the warm-up.
pub fn round_robin(
    configs: &[(&str, &dyn CausalLm)],
    prompt: &[u32],
    new_tokens: usize,
    runs: usize,
    mut on_run: impl FnMut(usize, &str, &GreedyTiming),
) -> Result<Vec<DecodeRow>> {
    let mut timings: Vec<Vec<GreedyTiming>> = configs.iter().map(|_| Vec::new()).collect();
    for run in 0..=runs {
        for (i, (name, model)) in configs.iter().enumerate() {
            let g = time_greedy(*model, prompt, new_tokens)?;
            on_run(run, name, &g);
            if run > 0 {
                timings[i].push(g);
            }
        }
    }
    let med = |i: usize, f: fn(&GreedyTiming) -> f64| {
        median(&timings[i].iter().map(f).collect::<Vec<_>>())
    };
    let reference = med(0, |g| g.decode_tokens_per_sec);
    Ok(configs
        .iter()
        .enumerate()
        .map(|(i, (name, _))| DecodeRow {
            config: name.to_string(),
            first_token_secs: med(i, |g| g.first_token_secs),
            prefill_tokens_per_sec: med(i, |g| g.prefill_tokens_per_sec),
            decode_tokens_per_sec: med(i, |g| g.decode_tokens_per_sec),
            decode_vs_reference: med(i, |g| g.decode_tokens_per_sec) / reference,
        })
        .collect())
}

/// The median (the upper one of an even count); NaN for no values.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_text_ids() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert!(median(&[]).is_nan());
        let ids = text_ids(&Tokenizer::byte_level(), 2000).unwrap();
        assert_eq!(ids.len(), 2000);
        assert_eq!(
            ids[..10],
            Tokenizer::byte_level().encode(TEXT).unwrap()[..10]
        );
    }
}
