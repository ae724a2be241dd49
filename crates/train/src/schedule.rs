//! Learning-rate schedule: linear warm-up to the peak, then cosine decay to a floor.

/// `lr(step)` for 0-based optimizer steps.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    pub peak_lr: f64,
    pub lr_warmup_steps: usize,
    pub total_steps: usize,
    /// The learning rate at the end of the decay, as a fraction of the peak.
    pub min_lr_ratio: f64,
}

impl LrSchedule {
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.lr_warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.lr_warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.lr_warmup_steps).max(1);
        let progress = ((step - self.lr_warmup_steps) as f64 / decay_steps as f64).min(1.0);
        let min_lr = self.peak_lr * self.min_lr_ratio;
        min_lr + 0.5 * (self.peak_lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = LrSchedule {
            peak_lr: 1e-3,
            lr_warmup_steps: 10,
            total_steps: 110,
            min_lr_ratio: 0.1,
        };
        assert!((s.lr(0) - 1e-4).abs() < 1e-12);
        assert!((s.lr(9) - 1e-3).abs() < 1e-12);
        assert!((s.lr(10) - 1e-3).abs() < 1e-12);
        // Half-way through the decay: the mean of peak and floor.
        assert!((s.lr(60) - 0.55e-3).abs() < 1e-12);
        assert!((s.lr(110) - 1e-4).abs() < 1e-12);
        assert!((s.lr(500) - 1e-4).abs() < 1e-12);
        assert!((1..110).all(|i| s.lr(i) <= s.lr(i - 1) || i <= 9));
    }
}
