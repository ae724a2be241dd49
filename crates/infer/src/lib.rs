//! Inference: sampling, streaming generation with a KV cache, and stop sequences (chat
//! templates live in `mode_io::chat` and are re-exported here).

pub mod bench;
pub mod generate;
pub mod sampling;
pub mod stop;

pub use generate::{generate, GenerationStats, TextStream};
pub use mode_io::chat::{ChatMessage, ChatTemplate};
pub use sampling::{Sampler, SamplingParams};
pub use stop::StopText;

/// Errors from generation and templating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] mode_model::Error),
    #[error(transparent)]
    Core(#[from] mode_core::Error),
    #[error(transparent)]
    Io(#[from] mode_io::Error),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;
