//! Peak-memory estimates, checked against the memory the machine has free before a run starts,
//! so that a run too big for the machine is refused with numbers instead of being killed.

use mode_engine::model::Plan;
use mode_model::{Backbone, Config};

/// Where the bytes of a training run go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Backbone weights as held in memory, plus trainable parameters outside it.
    pub weights: u64,
    /// Gradients and AdamW's two moments of every trainable parameter (f32).
    pub optimizer: u64,
    /// Activations kept for the backward pass, plus the LM head's working chunk.
    pub activations: u64,
}

impl MemoryEstimate {
    /// All bytes together (saturating: an absurd estimate stays absurd, never wraps to small).
    pub fn total(&self) -> u64 {
        self.weights
            .saturating_add(self.optimizer)
            .saturating_add(self.activations)
    }
}

// The estimates are computed in f64: sizes from flags and configs can be large enough to
// overflow u64, which would wrap to a small number that passes the check. `as u64` saturates.

/// Bytes of the activations one decoder layer keeps for `tokens` tokens in rows of `seq_len`.
fn layer_activation_bytes(c: &Config, tokens: f64, seq_len: f64) -> f64 {
    let h = c.hidden_size as f64;
    let q = c.num_attention_heads as f64 * c.head_dim as f64;
    let kv = c.num_key_value_heads as f64 * c.head_dim as f64;
    let i = c.intermediate_size as f64;
    // Norm inputs and outputs, q/k/v (before and after RoPE), attention output, residuals,
    // and the MLP's gate, up and activated values.
    let per_token = 6.0 * h + 3.0 * q + 4.0 * kv + 3.0 * i;
    let rows = (tokens / seq_len.max(1.0)).ceil();
    let softmax = rows * c.num_attention_heads as f64 * seq_len * seq_len;
    4.0 * (tokens * per_token + softmax)
}

/// Estimates the peak memory of training `plan` over `backbone` with `trainable_params`
/// parameters on `batch_tokens` tokens per step in rows of `seq_len`.
pub fn estimate_training(
    backbone: &Backbone,
    plan: &Plan,
    trainable_params: usize,
    batch_tokens: usize,
    seq_len: usize,
) -> MemoryEstimate {
    let c = &backbone.config;
    let weight_bytes = backbone.embed_tokens.dtype().size_in_bytes() as f64;
    let layers = backbone.layers.len();
    // Layers from the first trainable one on keep activations; earlier ones run forward only.
    let first_block = plan
        .blocks
        .iter()
        .filter(|b| b.train_gate || b.train_experts.iter().any(|&t| t))
        .map(|b| b.layers.start);
    let first_layer = (0..layers).find(|&i| plan.backbone.layers[i]);
    let first = first_block.chain(first_layer).min().unwrap_or(
        if plan.backbone.embeddings || plan.backbone.lora {
            0
        } else {
            layers
        },
    );
    let expert_layers: usize = plan
        .blocks
        .iter()
        .filter(|b| b.layers.start >= first)
        .map(|b| b.experts.iter().map(|e| e.len()).sum::<usize>())
        .sum();
    let (tokens, seq) = (batch_tokens as f64, seq_len as f64);
    let per_layer = layer_activation_bytes(c, tokens, seq);
    let activations = if plan.recompute_activations {
        // Each stage's input is kept, and the largest stage's activations live at a time.
        let inputs = (layers - first.min(layers)) as f64 * 4.0 * tokens * c.hidden_size as f64;
        let largest_block = plan
            .blocks
            .iter()
            .map(|b| b.layers.len() + b.experts.iter().map(|e| e.len()).sum::<usize>())
            .max()
            .unwrap_or(1);
        inputs + largest_block as f64 * per_layer
    } else {
        (layers - first.min(layers) + expert_layers) as f64 * per_layer
    };
    let lm_head_chunk = 2.0 * 4.0 * 256.0 * c.vocab_size as f64;
    let trainable = trainable_params as f64;
    MemoryEstimate {
        weights: (c.num_parameters() as f64 * weight_bytes + 4.0 * trainable) as u64,
        optimizer: (3.0 * 4.0 * trainable) as u64,
        activations: (activations + lm_head_chunk) as u64,
    }
}

pub use mode_io::memory::available_bytes;

/// Refuses an estimate above `available` bytes, with the numbers and what to do.
pub fn check(estimate: &MemoryEstimate, available: Option<u64>) -> Result<(), String> {
    use mode_io::memory::gib;
    match available {
        Some(free) if estimate.total() > free => Err(format!(
            "this run needs about {:.2} GiB (weights {:.2}, gradients and optimizer {:.2}, activations {:.2}) \
             but only {:.2} GiB are available; lower --batch-tokens or --seq-len, keep the weights \
             in --weight-dtype bf16 where the method allows, or pass --no-memory-check to try anyway",
            gib(estimate.total()),
            gib(estimate.weights),
            gib(estimate.optimizer),
            gib(estimate.activations),
            gib(free)
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use mode_engine::model::Trainable;
    use mode_model::Architecture;

    fn backbone() -> Backbone {
        let c = Config::tiny(Architecture::Llama);
        Backbone::random(c.clone(), 1, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn more_training_costs_more_memory_and_too_much_is_refused() {
        let bb = backbone();
        let frozen = Plan::backbone(Trainable::none(2));
        let full = Plan::backbone(Trainable::all(2));
        let n = bb.config.num_parameters();
        let a = estimate_training(&bb, &frozen, 0, 256, 64);
        let b = estimate_training(&bb, &full, n, 256, 64);
        let c = estimate_training(&bb, &full, n, 1024, 64);
        assert_eq!(a.optimizer, 0);
        assert!(b.optimizer == 12 * n as u64 && b.activations > a.activations);
        assert!(c.activations > b.activations && c.total() > b.total());
        assert!(check(&c, Some(c.total() + 1)).is_ok());
        assert!(check(&c, None).is_ok());
        let e = check(&c, Some(c.total() / 2)).unwrap_err();
        assert!(e.contains("GiB") && e.contains("--no-memory-check"), "{e}");
        // Recomputation keeps stage inputs instead of every layer's activations.
        let mut recompute = Plan::backbone(Trainable::all(2));
        recompute.recompute_activations = true;
        let r = estimate_training(&bb, &recompute, n, 1024, 64);
        assert!(r.activations < c.activations, "{r:?} vs {c:?}");
        assert_eq!(r.weights, c.weights);
    }
}
