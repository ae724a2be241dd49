//! Decoder-only transformer backbones: Llama (SmolLM2, TinyLlama, Llama 3.x), Qwen2, Qwen3 and
//! Gemma 3.
//!
//! One plain [`Config`], one [`DecoderLayer`] shared by every architecture (the differences are
//! flags: attention bias, q/k norm, RoPE scaling, sandwich norms, activation, sliding window), and a [`Backbone`] that owns embeddings, layers,
//! final norm and LM head. Weights come from GGUF files, Hugging Face folders, or an in-memory map
//! (tests, random initialisation), always under Hugging Face tensor names.

pub mod attention;
pub mod backbone;
pub mod compact;
pub mod config;
pub mod error;
pub mod fastmath;
pub mod layers;
pub mod matmul;
pub mod packed;
pub mod q8;
pub mod rope;
pub mod serial;
pub mod weights;

pub use backbone::{random_weights, Backbone, KvCache};
pub use compact::WeightDtype;
pub use config::{Activation, Architecture, Config, RopeScaling, SlidingWindow};
pub use error::{Error, Result};
pub use layers::{DecoderLayer, LayerCache, Weight};
pub use rope::{Rope, RopeTables};
pub use weights::Weights;

/// A causal language model the evaluator and the generator drive: hidden states for token ids
/// (optionally continuing a KV cache), then logits. The backbone implements it (with LoRA
/// adapters inside when a baseline has them), and so do the gated models of `mode-core`.
pub trait CausalLm {
    /// Final-normed hidden states `[batch, seq, hidden]` for `ids` `[batch, seq]`; with a cache,
    /// positions continue after what it holds and it is extended.
    fn hidden_states(
        &self,
        ids: &candle_core::Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<candle_core::Tensor>;
    /// Logits `[..., vocab]` for hidden states `[..., hidden]`.
    fn logits(&self, hidden: &candle_core::Tensor) -> Result<candle_core::Tensor>;
    /// An empty cache sized for this model.
    fn new_cache(&self) -> KvCache;
    fn device(&self) -> &candle_core::Device;
}

/// A borrowed model is a model, so a caller can hand out `Box<dyn CausalLm + '_>` views.
impl<T: CausalLm + ?Sized> CausalLm for &T {
    fn hidden_states(
        &self,
        ids: &candle_core::Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<candle_core::Tensor> {
        (**self).hidden_states(ids, cache)
    }
    fn logits(&self, hidden: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        (**self).logits(hidden)
    }
    fn new_cache(&self) -> KvCache {
        (**self).new_cache()
    }
    fn device(&self) -> &candle_core::Device {
        (**self).device()
    }
}

impl CausalLm for Backbone {
    fn hidden_states(
        &self,
        ids: &candle_core::Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<candle_core::Tensor> {
        self.forward_hidden(ids, cache)
    }
    fn logits(&self, hidden: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        Backbone::logits(self, hidden)
    }
    fn new_cache(&self) -> KvCache {
        Backbone::new_cache(self)
    }
    fn device(&self) -> &candle_core::Device {
        Backbone::device(self)
    }
}
