//! Turning logits into the next token: greedy, temperature, nucleus (top-p).

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
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        // A temperature below f32's range (1e-300) would become 0 and make the largest logit
        // 0/0 = NaN; at the smallest normal f32 every other token gets probability 0: greedy.
        let t = (self.params.temperature as f32).max(f32::MIN_POSITIVE);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        if !(total.is_finite() && total > 0.0) {
            // Logits with NaN or all -inf: no distribution to draw from.
            return argmax(logits);
        }
        probs.iter_mut().for_each(|p| p.1 /= total);
        if self.params.top_p < 1.0 {
            probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cumulative += p.1;
                if cumulative >= self.params.top_p as f32 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let mass: f32 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f32>() * mass;
        for &(id, p) in &probs {
            r -= p;
            // A draw of exactly 0 must not pick a token of probability 0.
            if r <= 0.0 && p > 0.0 {
                return id;
            }
        }
        // Rounding left a little of `r`: the last token that can be drawn.
        probs
            .iter()
            .rev()
            .find(|p| p.1 > 0.0)
            .map_or_else(|| argmax(logits), |p| p.0)
    }
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
