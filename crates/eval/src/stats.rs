//! Intervals for scores measured over evaluation windows.
//!
//! Tokens inside one window are not independent (a model that misreads a passage misses many
//! of its tokens), so the unit of resampling is the window: a percentile bootstrap over
//! windows, stratified by held-out set. Methods scored on the same windows are compared
//! *paired*: one resample of window indices serves both sides, so the variation the two share
//! (hard passages are hard for everyone) cancels out of their difference.

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::Totals;

/// Resamples per interval: enough for stable 2.5% / 97.5% percentiles.
pub const RESAMPLES: usize = 2000;

/// A point estimate with a 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub estimate: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Interval {
    /// Half the interval's width, for compact `estimate ± half_width` display.
    pub fn half_width(&self) -> f64 {
        (self.hi - self.lo) / 2.0
    }
}

/// Accuracy (percent) over windows, pooled: all correct predictions over all predictions.
pub fn accuracy(windows: &[Totals]) -> f64 {
    let (c, n) = windows
        .iter()
        .fold((0, 0), |(c, n), w| (c + w.correct, n + w.predictions));
    100.0 * c as f64 / n.max(1) as f64
}

/// Accuracy (percent) of the windows picked by `indices` (a bootstrap resample).
pub fn accuracy_of(windows: &[Totals], indices: &[usize]) -> f64 {
    let (c, n) = indices.iter().fold((0, 0), |(c, n), &i| {
        (c + windows[i].correct, n + windows[i].predictions)
    });
    100.0 * c as f64 / n.max(1) as f64
}

/// Window totals of several runs of one method (seeds) on the same windows, added window by
/// window: the pooled score of the method on each window.
pub fn pool(runs: &[&[Totals]]) -> Vec<Totals> {
    let n = runs.iter().map(|r| r.len()).min().unwrap_or(0);
    (0..n)
        .map(|i| {
            let mut t = Totals::default();
            for r in runs {
                t.add(r[i]);
            }
            t
        })
        .collect()
}

/// Percentile bootstrap of `stat`, stratified: `strata[s]` windows in stratum `s`; each
/// resample draws that many window indices with replacement in every stratum and calls `stat`
/// with one index list per stratum. The estimate is `stat` on the windows as they are.
/// Deterministic for a given `seed`.
pub fn bootstrap(
    strata: &[usize],
    resamples: usize,
    seed: u64,
    stat: impl Fn(&[Vec<usize>]) -> f64,
) -> Interval {
    let identity: Vec<Vec<usize>> = strata.iter().map(|&n| (0..n).collect()).collect();
    let estimate = stat(&identity);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut draws = identity;
    let mut values: Vec<f64> = (0..resamples.max(1))
        .map(|_| {
            for (d, &n) in draws.iter_mut().zip(strata) {
                for x in d.iter_mut() {
                    *x = rng.random_range(0..n);
                }
            }
            stat(&draws)
        })
        .collect();
    values.sort_by(f64::total_cmp);
    let at =
        |q: f64| values[((q * (values.len() - 1) as f64).round() as usize).min(values.len() - 1)];
    Interval {
        estimate,
        lo: at(0.025),
        hi: at(0.975),
    }
}

/// The 95% interval of one accuracy over its windows.
pub fn accuracy_interval(windows: &[Totals], seed: u64) -> Interval {
    bootstrap(&[windows.len()], RESAMPLES, seed, |idx| {
        accuracy_of(windows, &idx[0])
    })
}

/// The paired 95% interval of `mean over sets (accuracy of a) - mean over sets (accuracy of
/// b)`, where `a[s]` and `b[s]` are two methods' totals on the same windows of set `s`.
pub fn mean_difference_interval(a: &[&[Totals]], b: &[&[Totals]], seed: u64) -> Interval {
    assert_eq!(a.len(), b.len(), "both sides need the same sets");
    let strata: Vec<usize> = a.iter().zip(b).map(|(x, y)| x.len().min(y.len())).collect();
    bootstrap(&strata, RESAMPLES, seed, |idx| {
        let diffs: f64 = idx
            .iter()
            .enumerate()
            .map(|(s, i)| accuracy_of(a[s], i) - accuracy_of(b[s], i))
            .sum();
        diffs / idx.len().max(1) as f64
    })
}

/// What an interval says about a claim `difference >= margin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The whole interval is at or above the margin.
    Holds,
    /// The whole interval is below the margin.
    DoesNotHold,
    /// The interval contains the margin: the data cannot tell.
    Inconclusive,
}

impl Verdict {
    /// Reads the interval of a difference against the claim's margin.
    pub fn of(difference: &Interval, margin: f64) -> Self {
        if difference.lo >= margin {
            Verdict::Holds
        } else if difference.hi < margin {
            Verdict::DoesNotHold
        } else {
            Verdict::Inconclusive
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Holds => "holds",
            Verdict::DoesNotHold => "does not hold",
            Verdict::Inconclusive => "inconclusive",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` windows of `per` predictions, each window with its own difficulty around `p` (as
    /// real passages are), then binomial draws inside it.
    fn synthetic(n: usize, per: usize, p: f64, rng: &mut impl Rng) -> Vec<Totals> {
        (0..n)
            .map(|_| {
                let q = (p + rng.random_range(-0.15..0.15)).clamp(0.0, 1.0);
                let correct = (0..per).filter(|_| rng.random_bool(q)).count();
                Totals {
                    correct,
                    predictions: per,
                    loss_sum: 0.0,
                }
            })
            .collect()
    }

    /// Two methods on the same windows: `b`'s per-window chance is `a`'s plus `shift`, so
    /// the windows' shared difficulty is paired, as for two models on one text.
    fn paired(n: usize, shift: f64, seed: u64) -> (Vec<Totals>, Vec<Totals>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let per = 255;
        let mut a = Vec::new();
        let mut b = Vec::new();
        for _ in 0..n {
            let q: f64 = 0.5 + rng.random_range(-0.15..0.15);
            let draw = |q: f64, rng: &mut rand::rngs::StdRng| Totals {
                correct: (0..per)
                    .filter(|_| rng.random_bool(q.clamp(0.0, 1.0)))
                    .count(),
                predictions: per,
                loss_sum: 0.0,
            };
            a.push(draw(q, &mut rng));
            b.push(draw(q + shift, &mut rng));
        }
        (a, b)
    }

    #[test]
    fn a_real_difference_is_found_and_a_null_one_is_inconclusive() {
        // 64 windows of 255 predictions, the default demo's size.
        let (a, b) = paired(64, 0.04, 1);
        let d = mean_difference_interval(&[&b], &[&a], 7);
        assert!(d.lo > 0.0, "a 4-point difference is found: {d:?}");
        assert_eq!(Verdict::of(&d, 0.0), Verdict::Holds);
        let reversed = mean_difference_interval(&[&a], &[&b], 7);
        assert_eq!(Verdict::of(&reversed, 0.0), Verdict::DoesNotHold);

        let (a, b) = paired(64, 0.0, 2);
        let d = mean_difference_interval(&[&b], &[&a], 7);
        assert!(d.lo < 0.0 && d.hi > 0.0, "no true difference: {d:?}");
        assert_eq!(Verdict::of(&d, 0.0), Verdict::Inconclusive);
        // A margin the difference clearly misses.
        assert_eq!(Verdict::of(&d, 5.0), Verdict::DoesNotHold);
    }

    #[test]
    fn intervals_cover_the_true_difference_about_95_percent_of_the_time() {
        let (trials, shift) = (200, 0.02);
        let covered = (0..trials)
            .filter(|&t| {
                let (a, b) = paired(64, shift, 100 + t);
                let d = bootstrap(&[64], 400, t, |idx| {
                    accuracy_of(&b, &idx[0]) - accuracy_of(&a, &idx[0])
                });
                d.lo <= 100.0 * shift && 100.0 * shift <= d.hi
            })
            .count();
        let rate = covered as f64 / trials as f64;
        // Binomial spread of 200 trials at 95% is about 1.5 points; the percentile bootstrap
        // runs a little narrow at 64 clusters.
        assert!((0.88..=0.99).contains(&rate), "coverage {rate}");
    }

    #[test]
    fn pairing_narrows_the_interval_of_a_difference() {
        let (a, b) = paired(64, 0.02, 3);
        let paired_d = mean_difference_interval(&[&b], &[&a], 1);
        // The same windows compared unpaired: independent resamples on each side.
        let unpaired = bootstrap(&[64, 64], RESAMPLES, 1, |idx| {
            accuracy_of(&b, &idx[0]) - accuracy_of(&a, &idx[1])
        });
        assert!(
            paired_d.half_width() < 0.6 * unpaired.half_width(),
            "{paired_d:?} vs {unpaired:?}"
        );
    }

    #[test]
    fn cell_intervals_shrink_with_more_windows_and_pool_seeds() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let small = synthetic(16, 255, 0.4, &mut rng);
        let large = synthetic(256, 255, 0.4, &mut rng);
        let (s, l) = (accuracy_interval(&small, 1), accuracy_interval(&large, 1));
        assert!(s.lo <= s.estimate && s.estimate <= s.hi);
        assert!(l.half_width() < 0.5 * s.half_width(), "{s:?} vs {l:?}");
        assert!((l.estimate - 40.0).abs() < 2.0, "{l:?}");
        let pooled = pool(&[&small, &small]);
        assert_eq!(pooled.len(), 16);
        assert_eq!(accuracy(&pooled), accuracy(&small));
        assert_eq!(pooled[3].predictions, 2 * small[3].predictions);
    }
}
