//! Which experts run at inference, and how sparsely.
//!
//! The gate gives every token a weight per branch (`[backbone, expert_1, ..., expert_N]`).
//! [`Routing`] restricts that mix: to the experts a request names, to the `k` heaviest experts
//! per token, or to experts above a weight threshold. The backbone always runs; the kept
//! weights are renormalised to sum to one. An expert that no token of a forward pass keeps is
//! not computed at all, which is where sparse gating saves time in decoding (one token per
//! pass). Its KV cache then skips those positions: later tokens that route to it attend only
//! to the positions it ran on, an approximation whose cost `mode eval --gate-top-k` measures.

use crate::{Error, Result};

/// A restriction of the gate's mix at inference. The default runs every expert densely, exactly
/// as trained.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routing {
    /// Experts that may run, by index into the model's experts; `None` allows all.
    pub experts: Option<Vec<usize>>,
    /// Per token, keep only the `k` experts with the highest gate weight.
    pub top_k: Option<usize>,
    /// Per token, drop experts whose (renormalised) gate weight is below this.
    pub threshold: Option<f64>,
}

impl Routing {
    /// Whether this routing leaves the gate's mix untouched.
    pub fn is_dense(&self) -> bool {
        self.experts.is_none() && self.top_k.is_none() && self.threshold.is_none_or(|t| t <= 0.0)
    }

    /// Checks the settings against a model with `num_experts` experts.
    pub fn check(&self, num_experts: usize) -> Result<()> {
        if let Some(bad) = self.experts.iter().flatten().find(|&&j| j >= num_experts) {
            return Err(Error::Layout(format!(
                "expert index {bad} is out of range: the model has {num_experts} experts"
            )));
        }
        if let Some(t) = self.threshold {
            if !(0.0..1.0).contains(&t) {
                return Err(Error::Layout(format!(
                    "the gate threshold must be in [0, 1), got {t}"
                )));
            }
        }
        Ok(())
    }

    /// Applies the routing to one token's gate weights `probs` (backbone first), in place.
    pub fn apply(&self, probs: &mut [f32]) {
        let keep = |p: &mut [f32]| {
            let sum: f32 = p.iter().sum();
            if sum > 0.0 {
                p.iter_mut().for_each(|x| *x /= sum);
            }
        };
        if let Some(allowed) = &self.experts {
            for (j, p) in probs.iter_mut().enumerate().skip(1) {
                if !allowed.contains(&(j - 1)) {
                    *p = 0.0;
                }
            }
            keep(probs);
        }
        if let Some(k) = self.top_k {
            let mut order: Vec<usize> = (1..probs.len()).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            for &j in order.iter().skip(k) {
                probs[j] = 0.0;
            }
        }
        if let Some(t) = self.threshold {
            for p in probs.iter_mut().skip(1) {
                if f64::from(*p) < t {
                    *p = 0.0;
                }
            }
        }
        keep(probs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(r: &Routing, p: &[f32]) -> Vec<f32> {
        let mut p = p.to_vec();
        r.apply(&mut p);
        p.iter().map(|x| (x * 1000.0).round() / 1000.0).collect()
    }

    #[test]
    fn dense_routing_changes_nothing() {
        let r = Routing::default();
        assert!(r.is_dense());
        assert_eq!(routed(&r, &[0.5, 0.3, 0.2]), vec![0.5, 0.3, 0.2]);
    }

    #[test]
    fn named_experts_renormalise_over_the_rest() {
        let r = Routing {
            experts: Some(vec![1]),
            ..Default::default()
        };
        assert_eq!(routed(&r, &[0.5, 0.3, 0.2]), vec![0.714, 0.0, 0.286]);
        let none = Routing {
            experts: Some(vec![]),
            ..Default::default()
        };
        assert_eq!(routed(&none, &[0.5, 0.3, 0.2]), vec![1.0, 0.0, 0.0]);
    }

    #[test]
    fn top_k_keeps_the_heaviest_experts_and_always_the_backbone() {
        let r = Routing {
            top_k: Some(1),
            ..Default::default()
        };
        // The backbone is heaviest but does not count against k.
        assert_eq!(routed(&r, &[0.6, 0.1, 0.3]), vec![0.667, 0.0, 0.333]);
        let zero = Routing {
            top_k: Some(0),
            ..Default::default()
        };
        assert_eq!(routed(&zero, &[0.6, 0.1, 0.3]), vec![1.0, 0.0, 0.0]);
    }

    #[test]
    fn threshold_drops_light_experts() {
        let r = Routing {
            threshold: Some(0.15),
            ..Default::default()
        };
        assert_eq!(routed(&r, &[0.6, 0.1, 0.3]), vec![0.667, 0.0, 0.333]);
        assert!(r.check(2).is_ok());
        assert!(Routing {
            threshold: Some(1.0),
            ..Default::default()
        }
        .check(2)
        .is_err());
        assert!(Routing {
            experts: Some(vec![2]),
            ..Default::default()
        }
        .check(2)
        .is_err());
    }
}
