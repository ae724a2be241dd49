//! Modular Domain Experts.
//!
//! A frozen backbone is cut into blocks ([`BlockLayout`]). An [`Expert`] holds a few decoder
//! layers per block that run beside the backbone's layers of that block, reading the same block
//! input. A per-block, per-token [`Gate`] mixes backbone and experts:
//! `[a_bb, a_1..a_N] = softmax(W x + b)`, `y = B(x) + sum_j a_j * D_j(x)`, where `B` is the
//! backbone's block and `D_j` expert `j`'s difference from it: `E_j(x) - B(x)` for a replacing
//! expert (so the mix is the softmax-weighted average), `E_j(x) - x` for a residual one
//! ([`ExpertForm`]).
//! [`ModeModel`] runs that forward (`forward.rs`: with KV caches, for evaluation and generation,
//! and batched over sequences for serving) and builds the training plan the engine
//! differentiates.

pub mod baseline;
pub mod composed;
pub mod expert;
pub mod file;
pub mod forward;
pub mod layout;
pub mod loaded;
pub mod model;
pub mod routing;

pub use composed::{load_composed, save_composed, ComposedManifest, LoadedExpertFile};
pub use expert::{Expert, ExpertForm, ExpertInit, Gate, GateInput};
pub use file::{ExpertFile, ExpertMeta};
pub use forward::Routed;
pub use layout::BlockLayout;
pub use loaded::LoadedModel;
pub use model::ModeModel;
pub use routing::Routing;

/// Errors of the MoDE layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Layout(String),
    #[error("{}: {msg}", path.display())]
    File {
        path: std::path::PathBuf,
        msg: String,
    },
    #[error(transparent)]
    Model(#[from] mode_model::Error),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
