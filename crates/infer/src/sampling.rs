//! Turning logits into the next token: greedy, temperature, nucleus (top-p).

use mode_model::fastmath::exp_from_max;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// How to pick tokens. `temperature == 0` is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_p: 0.9,
            seed: 42,
        }
    }
}

/// A seeded sampler: the same seed and logits give the same tokens.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// One row's probabilities, in vocabulary order; kept between calls so that a token does
    /// not cost a vocabulary-sized allocation.
    probs: Vec<f32>,
    /// The nucleus: (token, probability), most probable first.
    nucleus: Vec<(u32, f32)>,
}

/// Probability floors tried in turn for the nucleus before sorting the whole vocabulary: the
/// tokens at or above a floor are exactly the first ones of the full sorted order, so when
/// they already hold `top_p` of the mass the nucleus is among them (usually a few dozen
/// tokens instead of a sort of the vocabulary for every token generated).
const NUCLEUS_FLOORS: [f32; 4] = [1e-3, 3e-5, 1e-6, 0.0];

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self {
            params,
            rng,
            probs: Vec::new(),
            nucleus: Vec::new(),
        }
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        // A temperature below f32's range (1e-300) would become 0 and make the largest logit
        // 0/0 = NaN; at the smallest normal f32 every other token gets probability 0: greedy.
        let t = (self.params.temperature as f32).max(f32::MIN_POSITIVE);
        let total = exp_from_max(logits, 1.0 / t, &mut self.probs);
        if !(total.is_finite() && total > 0.0) {
            // Logits with NaN or all -inf: no distribution to draw from.
            return argmax(logits);
        }
        let inverse = 1.0 / total;
        self.probs.iter_mut().for_each(|p| *p *= inverse);
        let r = self.rng.random::<f32>();
        if self.params.top_p < 1.0 {
            self.find_nucleus(self.params.top_p as f32);
            draw(r, self.nucleus.iter().copied())
        } else {
            draw(
                r,
                self.probs.iter().enumerate().map(|(i, &p)| (i as u32, p)),
            )
        }
        .unwrap_or_else(|| argmax(logits))
    }

    /// Fills `nucleus` with the most probable tokens, in order (probability, then token id),
    /// up to the first whose running sum reaches `top_p`; all tokens when none does.
    fn find_nucleus(&mut self, top_p: f32) {
        for floor in NUCLEUS_FLOORS {
            self.nucleus.clear();
            self.nucleus.extend(
                self.probs
                    .iter()
                    .enumerate()
                    .filter(|(_, &p)| p >= floor)
                    .map(|(i, &p)| (i as u32, p)),
            );
            self.nucleus
                .sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut cumulative = 0.0;
            let reached = self.nucleus.iter().position(|p| {
                cumulative += p.1;
                cumulative >= top_p
            });
            if let Some(last) = reached {
                self.nucleus.truncate(last + 1);
                return;
            }
        }
    }
}

/// Draws from `tokens` (token, probability) with `r` uniform in [0, 1) scaled to their total
/// mass; `None` when no token has probability above 0.
fn draw(r: f32, tokens: impl IntoIterator<Item = (u32, f32)> + Clone) -> Option<u32> {
    let mass: f32 = tokens.clone().into_iter().map(|p| p.1).sum();
    let mut r = r * mass;
    let mut last = None;
    for (id, p) in tokens {
        if p > 0.0 {
            last = Some(id);
        }
        r -= p;
        // A draw of exactly 0 must not pick a token of probability 0.
        if r <= 0.0 && p > 0.0 {
            return Some(id);
        }
    }
    // Rounding left a little of `r`: the last token that can be drawn.
    last
}

/// Index of the largest value (the first one on ties; NaN counts as the smallest).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] || (values[best].is_nan() && !v.is_nan()) {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nucleus by its definition (on the same probabilities): the whole vocabulary sorted (probability, then token id),
    /// cut where the running sum reaches `top_p`; then the same draw.
    fn sample_by_full_sort(params: &SamplingParams, rng: &mut StdRng, logits: &[f32]) -> u32 {
        let mut exps = Vec::new();
        let total = exp_from_max(logits, 1.0 / params.temperature as f32, &mut exps);
        let mut probs: Vec<(u32, f32)> = exps
            .iter()
            .enumerate()
            .map(|(i, &e)| (i as u32, e * (1.0 / total)))
            .collect();
        let r = rng.random::<f32>();
        if params.top_p < 1.0 {
            probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cumulative += p.1;
                    cumulative >= params.top_p as f32
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        draw(r, probs).unwrap()
    }

    #[test]
    fn the_nucleus_is_the_head_of_the_fully_sorted_vocabulary() {
        let mut values = StdRng::seed_from_u64(3);
        // Peaked rows keep the nucleus above the first floor; flat ones (every token near
        // 1/3000) need the later floors or the whole vocabulary.
        for spread in [12.0f32, 4.0, 1.0, 0.05, 0.0] {
            let logits: Vec<f32> = (0..3000)
                .map(|_| spread * values.random::<f32>().powi(3) * 10.0)
                .collect();
            for temperature in [0.3, 0.7, 1.5] {
                for top_p in [0.5, 0.9, 0.99, 1.0] {
                    let params = SamplingParams {
                        temperature,
                        top_p,
                        seed: 11,
                    };
                    let mut ours = Sampler::new(params.clone());
                    let mut reference = StdRng::seed_from_u64(params.seed);
                    for _ in 0..20 {
                        assert_eq!(
                            ours.sample(&logits),
                            sample_by_full_sort(&params, &mut reference, &logits),
                            "spread {spread}, temperature {temperature}, top_p {top_p}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 1.9]), 1);
    }

    #[test]
    fn tiny_temperatures_are_greedy() {
        let logits = [0.5f32, 1.0, 3.0, 2.999, -1.0];
        for temperature in [1e-300, f64::MIN_POSITIVE, 1e-45, 1e-30, 1e-9] {
            for top_p in [1.0, 0.9] {
                for seed in 0..20 {
                    let mut s = Sampler::new(SamplingParams {
                        temperature,
                        top_p,
                        seed,
                    });
                    assert_eq!(s.sample(&logits), 2, "temperature {temperature:e}");
                }
            }
        }
        // Logits the model should never give still give a token, not a NaN draw.
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[f32::NAN, 1.0, 2.0]), 2);
        assert_eq!(s.sample(&[f32::NEG_INFINITY; 3]), 0);
    }

    #[test]
    fn tiny_top_p_is_greedy_and_seeds_repeat() {
        let logits = [0.5f32, 1.0, 3.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.01,
            seed: 1,
        });
        assert!((0..20).all(|_| s.sample(&logits) == 2));
        let params = SamplingParams {
            temperature: 1.5,
            top_p: 1.0,
            seed: 7,
        };
        let (mut a, mut b) = (Sampler::new(params.clone()), Sampler::new(params));
        let xs: Vec<u32> = (0..50).map(|_| a.sample(&logits)).collect();
        let ys: Vec<u32> = (0..50).map(|_| b.sample(&logits)).collect();
        assert_eq!(xs, ys);
        // At temperature 1.5 over 50 draws, more than one token shows up.
        assert!(xs.iter().any(|&x| x != xs[0]));
    }
}
