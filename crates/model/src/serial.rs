//! Softmax over the last axis of small inputs, on the calling thread.
//!
//! candle-nn's fused softmax hands every call to rayon's pool, even the few short rows of a
//! decode step's attention scores; a decode step makes one such call per layer, and handing
//! each to another thread (beside candle's own pool, which the matmuls use) cost more than the
//! arithmetic. Inputs of up to [`MAX_SERIAL_VALUES`] values are computed here; larger ones
//! (prefill, evaluation) go to candle-nn.

use candle_core::{DType, Tensor};

/// Inputs up to this many values run on the calling thread.
pub const MAX_SERIAL_VALUES: usize = 1 << 16;

/// `softmax(x)` over the last axis.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.dtype() != DType::F32 || x.elem_count() > MAX_SERIAL_VALUES || x.rank() == 0 {
        return candle_nn::ops::softmax_last_dim(x);
    }
    let width = x.dims()[x.rank() - 1];
    let mut values = x.flatten_all()?.to_vec1::<f32>()?;
    if width > 0 {
        values.chunks_exact_mut(width).for_each(softmax_row);
    }
    Tensor::from_vec(values, x.shape(), x.device())
}

/// One row in place: `exp(v - max) / sum`, so a row of `-inf` but one entry is exact.
fn softmax_row(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inverse = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inverse;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn small_inputs_match_candle_nn_and_large_ones_go_to_it() {
        for dims in [vec![1, 3, 3, 17], vec![2, 5], vec![1, 1, 1, 300]] {
            let n: usize = dims.iter().product();
            let mut v: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin() * 20.0).collect();
            v[0] = f32::NEG_INFINITY; // a masked position
            let x = Tensor::from_vec(v, dims.as_slice(), &Device::Cpu).unwrap();
            let ours: Vec<f32> = softmax_last_dim(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let theirs: Vec<f32> = candle_nn::ops::softmax_last_dim(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (a, b) in ours.iter().zip(&theirs) {
                assert!((a - b).abs() <= 1e-6, "{dims:?}: {a} vs {b}");
            }
            assert_eq!(ours[0], 0.0);
        }
    }
}
