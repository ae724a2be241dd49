//! Training: one loop for every method (`trainer`: mixtures, validation, checkpoints and
//! resume, metrics, non-finite checks), the methods that plug into it (`stage1`, `compose`,
//! `baseline`), the optimizer (AdamW with decoupled weight decay and bias correction), the
//! learning-rate schedule (linear warm-up, cosine decay), global-norm gradient clipping,
//! accumulation over micro-batches, the memory estimate and `bench train`. Parameters are
//! candle tensors updated in place; only trainable ones get optimizer state, so a frozen
//! backbone costs nothing here.

pub mod baseline;
pub mod bench;
pub mod checkpoint;
pub mod compose;
pub mod grads;
pub mod memory;
pub mod methods;
pub mod optim;
pub mod schedule;
pub mod stage1;
pub mod step;
pub mod trainer;

pub use grads::global_norm;
pub use optim::{AdamW, AdamWConfig};
pub use schedule::LrSchedule;
pub use step::{train_step, StepSettings, StepStats};
