//! The training engine: every method (MoDE experts and gates, LoRA, full fine-tuning) trains
//! through these ops.
//!
//! Each op has an explicit, tested backward pass instead of candle's autograd: candle's fused
//! softmax, RMSNorm and RoPE have no backward and silently cut gradients, and its matmul backward
//! computes weight gradients even for frozen weights. Here a frozen linear computes dX only, and
//! layers before the first trainable parameter run forward only.

mod block;
pub mod kernels;
pub mod layer;
pub mod model;
pub mod names;
pub mod ops;
