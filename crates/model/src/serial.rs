//! The small operations of a decode step, on the calling thread: softmax, and attention of one
//! new position over the cache.
//!
//! candle-nn's fused softmax hands every call to rayon's pool, even the few short rows of a
//! decode step's attention scores, and candle's matmul goes through gemm's setup for products
//! of a few hundred values; a decode step makes a few such calls per layer, and handing each
//! to another thread (beside candle's own pool, which the weight matmuls use) cost more than
//! the arithmetic. Inputs of up to [`MAX_SERIAL_VALUES`] values are computed here; larger
//! ones (prefill, evaluation) go to candle.

use candle_core::{CpuStorage, DType, Storage, Tensor};

/// Inputs up to this many values run on the calling thread.
pub const MAX_SERIAL_VALUES: usize = 1 << 16;

/// One-position attention runs on the calling thread up to this many values of `q` times the
/// keys it sees (heads x positions x head size: about 1,800 positions of SmolLM2-135M, a few
/// hundred microseconds a layer).
pub const MAX_SERIAL_ATTENTION: usize = 1 << 20;

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

/// Attention of one query position: `q` is `[b, heads, 1, hd]`, `k` and `v` are `[b, kv_heads,
/// s, hd]` (views of a cache are fine), and the query sees the last `seen` of the `s` keys.
/// Returns `[b, 1, heads, hd]`, or `None` when the inputs are not f32 on the CPU.
pub fn attend_one(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    seen: usize,
) -> candle_core::Result<Option<Tensor>> {
    let (b, nh, t, hd) = q.dims4()?;
    let (_, nkv, s, _) = k.dims4()?;
    if t != 1 || q.dtype() != DType::F32 || nkv == 0 || !nh.is_multiple_of(nkv) {
        return Ok(None);
    }
    let q = q.flatten_all()?.to_vec1::<f32>()?;
    let (Some(keys), Some(values)) = (Strided::of(k)?, Strided::of(v)?) else {
        return Ok(None);
    };
    let (k_store, v_store) = (k.storage_and_layout().0, v.storage_and_layout().0);
    let (Storage::Cpu(CpuStorage::F32(k_data)), Storage::Cpu(CpuStorage::F32(v_data))) =
        (&*k_store, &*v_store)
    else {
        return Ok(None);
    };
    let rep = nh / nkv;
    let first = s - seen.min(s);
    let mut out = vec![0f32; b * nh * hd];
    let mut scores = vec![0f32; s - first];
    for bi in 0..b {
        for h in 0..nh {
            let g = h / rep;
            let qh = &q[(bi * nh + h) * hd..][..hd];
            for (score, j) in scores.iter_mut().zip(first..s) {
                *score = dot(qh, &k_data[keys.row(bi, g, j)..][..hd]) * scale;
            }
            softmax_row(&mut scores);
            let oh = &mut out[(bi * nh + h) * hd..][..hd];
            for (&p, j) in scores.iter().zip(first..s) {
                for (o, &x) in oh.iter_mut().zip(&v_data[values.row(bi, g, j)..][..hd]) {
                    *o += p * x;
                }
            }
        }
    }
    Ok(Some(Tensor::from_vec(out, (b, 1, nh, hd), k.device())?))
}

/// Where the rows of a `[b, heads, s, hd]` f32 tensor on the CPU lie in its storage, when
/// each row of `hd` values is contiguous in it.
struct Strided {
    start: usize,
    strides: [usize; 3],
}

impl Strided {
    fn of(t: &Tensor) -> candle_core::Result<Option<Self>> {
        let layout = t.layout();
        let st = layout.stride();
        if t.dtype() != DType::F32 || !t.device().is_cpu() || st.len() != 4 || st[3] != 1 {
            return Ok(None);
        }
        Ok(Some(Self {
            start: layout.start_offset(),
            strides: [st[0], st[1], st[2]],
        }))
    }

    fn row(&self, b: usize, head: usize, pos: usize) -> usize {
        self.start + b * self.strides[0] + head * self.strides[1] + pos * self.strides[2]
    }
}

/// A dot product in eight lanes, which the compiler keeps in one vector register.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
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
