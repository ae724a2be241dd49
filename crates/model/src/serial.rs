//! The small operations of a decode step, kept off rayon's pool: softmax, and attention of
//! one new position over the cache.
//!
//! candle-nn's fused softmax hands every call to rayon's pool, even the few short rows of a
//! decode step's attention scores, and candle's matmul goes through gemm's setup for products
//! of a few hundred values; a decode step makes a few such calls per layer, and handing each
//! to rayon's threads (beside candle's own pool, which the weight matmuls use) cost more than
//! the arithmetic. Softmax of up to [`MAX_SERIAL_VALUES`] values runs on the calling thread
//! (larger inputs go to candle-nn); one-position attention on the calling thread when small,
//! else spread over candle's pool.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

use crate::Activation;

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

/// Attention of one query position for each of several sequences: `q` is `[rows, heads, 1,
/// hd]`, `kv[r]` holds row `r`'s keys and values (`[1, kv_heads, s_r, hd]`; views of a cache
/// are fine), and each query sees the last `seen` of its keys. Returns `[rows, 1, heads, hd]`,
/// or `None` when the inputs are not f32 on the CPU. The (row, head) pairs are spread over
/// candle's worker pool when there are enough of them to pay for the hand-off.
pub fn attend_one(
    q: &Tensor,
    kv: &[(Tensor, Tensor)],
    scale: f32,
    seen: usize,
) -> candle_core::Result<Option<Tensor>> {
    let (rows, nh, t, hd) = q.dims4()?;
    if t != 1 || q.dtype() != DType::F32 || rows != kv.len() || rows == 0 {
        return Ok(None);
    }
    let nkv = kv[0].0.dims4()?.1;
    if nkv == 0 || !nh.is_multiple_of(nkv) {
        return Ok(None);
    }
    let mut layouts = Vec::with_capacity(rows);
    for (k, v) in kv {
        let (Some(keys), Some(values)) = (Strided::of(k)?, Strided::of(v)?) else {
            return Ok(None);
        };
        let (_, heads, s, d) = k.dims4()?;
        if heads != nkv || d != hd || v.dims4()? != (1, nkv, s, hd) {
            candle_core::bail!(
                "row keys {:?} and values {:?} do not match",
                k.dims(),
                v.dims()
            );
        }
        layouts.push((keys, values, s));
    }
    let guards: Vec<_> = kv
        .iter()
        .map(|(k, v)| (k.storage_and_layout().0, v.storage_and_layout().0))
        .collect();
    let mut data = Vec::with_capacity(rows);
    for (k_store, v_store) in &guards {
        let (Storage::Cpu(CpuStorage::F32(k)), Storage::Cpu(CpuStorage::F32(v))) =
            (&**k_store, &**v_store)
        else {
            return Ok(None);
        };
        data.push((k.as_slice(), v.as_slice()));
    }
    let q = q.flatten_all()?.to_vec1::<f32>()?;
    let rep = nh / nkv;
    let simd = crate::matmul::has_avx2_fma();
    let mut out = vec![0f32; rows * nh * hd];
    let out_ptr = crate::matmul::OutPtr(out.as_mut_ptr());
    let head = |pair: usize, scratch: &mut head::Scratch| {
        let (r, h) = (pair / nh, pair % nh);
        let ((keys, values, s), (k, v)) = (&layouts[r], data[r]);
        let g = h / rep;
        let rows = |layout: &Strided, data| head::HeadRows {
            data,
            start: layout.row(0, g, 0),
            stride: layout.strides[2],
        };
        // SAFETY: each (row, head) pair writes only its own hd values of `out`, which outlives
        // the parallel loop.
        let oh = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(pair * hd), hd) };
        head::attend_head(
            &q[pair * hd..][..hd],
            rows(keys, k),
            rows(values, v),
            s - seen.min(*s)..*s,
            scale,
            scratch,
            oh,
            simd,
        );
    };
    let work: usize = layouts.iter().map(|(_, _, s)| s * nh * hd).sum();
    crate::matmul::chunked(rows * nh, work, |range| {
        let mut scratch = head::Scratch::default();
        range.for_each(|pair| head(pair, &mut scratch));
    });
    drop(guards);
    Ok(Some(Tensor::from_vec(
        out,
        (rows, 1, nh, hd),
        &Device::Cpu,
    )?))
}

/// `act(gate) * up` from the stacked gate/up projection's output (`[.., 2 * width]`: each row
/// is its gate, then its up), in one pass: `[.., width]`. Rows are spread over candle's pool
/// when there are enough values to pay for the hand-off. `None` when it is not f32.
pub fn gated(both: &Tensor, activation: Activation) -> candle_core::Result<Option<Tensor>> {
    let dims = both.dims();
    if both.dtype() != DType::F32 || dims.is_empty() || !dims[dims.len() - 1].is_multiple_of(2) {
        return Ok(None);
    }
    let width = dims[dims.len() - 1] / 2;
    let out = crate::matmul::with_values(both, |values| {
        let rows = values.len() / (2 * width).max(1);
        let mut out = vec![0f32; rows * width];
        let out_ptr = crate::matmul::OutPtr(out.as_mut_ptr());
        let row = |r: usize| {
            let (gate, up) = values[r * 2 * width..][..2 * width].split_at(width);
            // SAFETY: each row writes only its own `width` values of `out`, which outlives the
            // parallel loop.
            let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(r * width), width) };
            for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                *o = activate(g, activation) * u;
            }
        };
        crate::matmul::chunked(rows, rows * width, |range| range.for_each(row));
        out
    })?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("non-empty dims") = width;
    Ok(Some(Tensor::from_vec(out, out_dims, both.device())?))
}

fn activate(g: f32, activation: Activation) -> f32 {
    match activation {
        Activation::Silu => g / (1.0 + (-g).exp()),
        Activation::GeluTanh => {
            const SQRT_2_OVER_PI: f32 = 0.797_884_6;
            0.5 * g * (1.0 + (SQRT_2_OVER_PI * (g + 0.044_715 * g * g * g)).tanh())
        }
    }
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

mod head;

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

    /// Attention of one query over keys and values, in f64, straight from the definition.
    pub(super) fn naive(q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>], scale: f32) -> Vec<f64> {
        let scores: Vec<f64> = k
            .iter()
            .map(|kr| {
                q.iter()
                    .zip(kr)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        (0..q.len())
            .map(|d| e.iter().zip(v).map(|(p, vr)| p / sum * vr[d] as f64).sum())
            .collect()
    }

    #[test]
    fn one_position_attention_matches_the_definition_alone_and_on_the_pool() {
        let (nh, nkv, hd) = (4, 2, 16);
        let value = |i: usize, salt: f32| (i as f32 * 0.731 + salt).sin() * 2.0;
        // Few keys (the calling thread) and many (the pool), rows of different lengths, and a
        // window that hides the oldest keys of the long row.
        for (lengths, seen) in [(vec![5, 3], usize::MAX), (vec![40, 300, 7], 64)] {
            let rows = lengths.len();
            let qv: Vec<f32> = (0..rows * nh * hd).map(|i| value(i, 0.1)).collect();
            let q = Tensor::from_vec(qv.clone(), (rows, nh, 1, hd), &Device::Cpu).unwrap();
            // Each row's cache is a view: the first s positions of a longer buffer.
            let kv: Vec<(Tensor, Tensor)> = lengths
                .iter()
                .enumerate()
                .map(|(r, &s)| {
                    let buffer = |salt: f32| {
                        let n = nkv * (s + 5) * hd;
                        let data: Vec<f32> = (0..n).map(|i| value(i, salt + r as f32)).collect();
                        Tensor::from_vec(data, (1, nkv, s + 5, hd), &Device::Cpu)
                            .unwrap()
                            .narrow(2, 0, s)
                            .unwrap()
                    };
                    (buffer(0.5), buffer(0.9))
                })
                .collect();
            let scale = 0.25;
            let got: Vec<f32> = attend_one(&q, &kv, scale, seen)
                .unwrap()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (r, (k, v)) in kv.iter().enumerate() {
                let (k, v) = (k.squeeze(0).unwrap(), v.squeeze(0).unwrap());
                for h in 0..nh {
                    let g = h / (nh / nkv);
                    let keys: Vec<Vec<f32>> = k.get(g).unwrap().to_vec2().unwrap();
                    let values: Vec<Vec<f32>> = v.get(g).unwrap().to_vec2().unwrap();
                    let first = keys.len() - seen.min(keys.len());
                    let qh = &qv[(r * nh + h) * hd..][..hd];
                    let want = naive(qh, &keys[first..], &values[first..], scale);
                    let got = &got[(r * nh + h) * hd..][..hd];
                    for (a, b) in got.iter().zip(&want) {
                        assert!((*a as f64 - b).abs() < 1e-5, "row {r} head {h}: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn gated_matches_candle_for_both_activations_alone_and_on_the_pool() {
        for rows in [3, 40] {
            let width = 512;
            let v: Vec<f32> = (0..rows * 2 * width)
                .map(|i| ((i as f32) * 0.013).sin() * 4.0)
                .collect();
            let both = Tensor::from_vec(v, (rows, 2 * width), &Device::Cpu).unwrap();
            let gate = both.narrow(1, 0, width).unwrap();
            let up = both.narrow(1, width, width).unwrap();
            for (activation, want) in [
                (Activation::Silu, candle_nn::ops::silu(&gate).unwrap()),
                (Activation::GeluTanh, gate.gelu().unwrap()),
            ] {
                let want = (want * &up).unwrap().to_vec2::<f32>().unwrap();
                let got = gated(&both, activation)
                    .unwrap()
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                    assert!(
                        (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                        "{activation:?}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
