//! Causal self-attention with grouped key/value heads, and its KV cache: one sequence (or a
//! batch sharing positions) at a time, or several sequences packed in one batch, each reading
//! its next tokens (a server's step: one token of each decoding sequence, a chunk of a prompt).

use candle_core::{Device, Module, Tensor, D};

use crate::layers::{Linear, RmsNorm};
use crate::rope::RopeTables;
use crate::Result;

/// Cached keys and values of one layer: `[batch, kv_heads, capacity, head_dim]` buffers whose
/// first `len` positions are filled. New positions are written in place, so a decode step
/// copies one position per layer, not the whole cache; the buffers grow by doubling.
#[derive(Debug, Default)]
pub struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
    len: usize,
    /// Positions to allocate room for at the first write.
    capacity_hint: usize,
}

impl LayerCache {
    /// Number of positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Positions to allocate room for at the first write, if it has not happened yet.
    pub fn reserve(&mut self, positions: usize) {
        self.capacity_hint = positions;
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Views of the cached keys and values (`[batch, kv_heads, len, head_dim]`); `None` before
    /// the first write.
    pub fn keys_values(&self) -> Option<(Tensor, Tensor)> {
        let (k, v) = self.kv.as_ref()?;
        Some((
            k.narrow(2, 0, self.len).ok()?,
            v.narrow(2, 0, self.len).ok()?,
        ))
    }

    /// The first `positions` cached positions (at most all of them) in buffers of their own,
    /// with room for `capacity` positions before they grow.
    pub fn copy_prefix(&self, positions: usize, capacity: usize) -> Result<LayerCache> {
        let mut out = LayerCache {
            capacity_hint: capacity,
            ..LayerCache::default()
        };
        let positions = positions.min(self.len);
        if let (Some((k, v)), true) = (&self.kv, positions > 0) {
            out.extend(k.narrow(2, 0, positions)?, v.narrow(2, 0, positions)?)?;
        }
        Ok(out)
    }

    /// Appends new keys and values (`[batch, kv_heads, seq, head_dim]`, contiguous); returns
    /// views of all of them.
    fn extend(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, t, d) = k.dims4()?;
        let need = self.len + t;
        let capacity = self.kv.as_ref().map_or(0, |(ck, _)| ck.dims()[2]);
        if need > capacity {
            let grown = need.max(self.capacity_hint).max(2 * capacity).max(16);
            let fresh = || Tensor::zeros((b, h, grown, d), k.dtype(), k.device());
            let (nk, nv) = (fresh()?, fresh()?);
            if let Some((ck, cv)) = &self.kv {
                nk.slice_set(&ck.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&cv.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            self.kv = Some((nk, nv));
        }
        let (ck, cv) = self.kv.as_ref().expect("allocated above");
        ck.slice_set(&k.contiguous()?, 2, self.len)?;
        cv.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = need;
        Ok((ck.narrow(2, 0, need)?, cv.narrow(2, 0, need)?))
    }
}

/// Causal self-attention with grouped key/value heads.
#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// `Some(n)`: a sliding-window layer, each position sees the last `n` (itself included)
    /// and uses the local RoPE tables; `None`: a global layer.
    pub window: Option<usize>,
    /// `q_proj`, `k_proj` and `v_proj` stacked, when all three are Q8_0 views of one storage
    /// (see [`crate::layers::fuse_quantized`]): one pass over the weights for the three.
    pub qkv: Option<Linear>,
}

impl Attention {
    /// `x`: `[batch, seq, hidden]`; `rope` for the new positions; `cache` is extended.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (q, k, v) = self.project(x, rope)?;
        let (k, v) = match cache {
            Some(cache) => cache.extend(k, v)?,
            None => (k, v),
        };
        let out = self.attend(&q, &k, &v)?;
        Ok(self.o_proj.forward(&out.reshape((b, t, ()))?)?)
    }

    /// Several sequences packed in one batch, each reading its next tokens: `x` is `[rows, 1,
    /// hidden]`, one token per row; the first `lens[0]` rows continue `caches[0]`, the next
    /// `lens[1]` rows `caches[1]`, and so on (a decode step has every length 1; a prompt being
    /// read adds a longer run). `rope` has one table row per token (`[rows, 1, head_dim / 2]`,
    /// see [`RopeTables::at_positions`]). The projections run on all rows at once; each token
    /// attends over its own sequence's cache up to its own position, so a row gets what
    /// [`Self::forward`] gives its sequence alone.
    pub fn forward_packed(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        caches: &mut [&mut LayerCache],
        lens: &[usize],
    ) -> Result<Tensor> {
        let (rows, t, _) = x.dims3()?;
        if t != 1 || lens.len() != caches.len() || lens.iter().sum::<usize>() != rows {
            return Err(candle_core::Error::Msg(format!(
                "a packed batch takes one token per row and one cache per sequence: got [{rows}, {t}] \
                 for {} caches and runs of {lens:?}",
                caches.len()
            ))
            .into());
        }
        let (q, k, v) = self.project(x, rope)?;
        // Each sequence's new keys and values go to its cache; every token then sees a view of
        // its cache that ends at its own position, which is the causal mask.
        let mut seen = Vec::with_capacity(rows);
        let mut first = 0;
        for (cache, &len) in caches.iter_mut().zip(lens) {
            let part = |t: &Tensor| t.narrow(0, first, len)?.transpose(0, 2);
            let past = cache.len();
            let (ck, cv) = cache.extend(part(&k)?, part(&v)?)?;
            for i in 0..len {
                seen.push((
                    ck.narrow(2, 0, past + i + 1)?,
                    cv.narrow(2, 0, past + i + 1)?,
                ));
            }
            first += len;
        }
        let out = match self.attend_one(&q, &seen)? {
            Some(out) => out,
            None => {
                let mut outs = Vec::with_capacity(rows);
                for (r, (k, v)) in seen.iter().enumerate() {
                    outs.push(self.attend(&q.narrow(0, r, 1)?, k, v)?);
                }
                Tensor::cat(&outs, 0)?
            }
        };
        Ok(self.o_proj.forward(&out.reshape((rows, 1, ()))?)?)
    }

    /// Queries, keys and values `[batch, heads, seq, head_dim]`, normed and rotated.
    fn project(&self, x: &Tensor, rope: &RopeTables) -> Result<(Tensor, Tensor, Tensor)> {
        let (cos, sin) = rope.for_window(self.window);
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let parts = [&self.q_proj, &self.k_proj, &self.v_proj];
        let (q, k, v) = match crate::layers::fused(&self.qkv, parts) {
            Some(qkv) => {
                let all = qkv.forward(x)?;
                let (nq, nk) = (nh * hd, nkv * hd);
                (
                    all.narrow(D::Minus1, 0, nq)?,
                    all.narrow(D::Minus1, nq, nk)?,
                    all.narrow(D::Minus1, nq + nk, nk)?,
                )
            }
            None => (
                self.q_proj.forward(x)?,
                self.k_proj.forward(x)?,
                self.v_proj.forward(x)?,
            ),
        };
        let mut q = q.reshape((b, t, nh, hd))?;
        let mut k = k.reshape((b, t, nkv, hd))?;
        let v = v.reshape((b, t, nkv, hd))?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let (cos, sin) = (cos.to_dtype(q.dtype())?, sin.to_dtype(q.dtype())?);
        let q = candle_nn::rotary_emb::rope(&q.transpose(1, 2)?.contiguous()?, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope(&k.transpose(1, 2)?.contiguous()?, &cos, &sin)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        Ok((q, k, v))
    }

    /// `1 / sqrt(head_dim)`, the scores' scale.
    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// One new position per row, each over its own keys and values (`kv[r]`), on our kernel
    /// ([`crate::serial::attend_one`]); `None` where it does not apply (not f32 on the CPU).
    fn attend_one(&self, q: &Tensor, kv: &[(Tensor, Tensor)]) -> Result<Option<Tensor>> {
        let seen = self.window.unwrap_or(usize::MAX);
        Ok(crate::serial::attend_one(q, kv, self.scale() as f32, seen)?)
    }

    /// Causal attention of `q` (`[b, heads, t, hd]`, the last `t` positions) over `k`, `v`
    /// (`[b, kv_heads, s, hd]`, every position so far): `[b, t, heads, hd]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, _, t, _) = q.dims4()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let s = k.dims()[2];
        let past = s - t;
        let rep = nh / nkv;
        if t == 1 {
            let kv = (0..b)
                .map(|bi| Ok((k.narrow(0, bi, 1)?, v.narrow(0, bi, 1)?)))
                .collect::<Result<Vec<_>>>()?;
            if let Some(out) = self.attend_one(q, &kv)? {
                return Ok(out);
            }
        }
        // Fold the query heads that share a key/value head into the sequence axis, so grouped
        // attention runs as one matmul per kv head without copying keys and values.
        let q = (q * self.scale())?.reshape((b, nkv, rep * t, hd))?;
        let scores = q.matmul(&k.t()?)?; // [b, nkv, rep*t, s]
        let windowed = self.window.is_some_and(|w| s > w);
        let scores = if t > 1 || windowed {
            let mask =
                causal_mask(t, s, past, self.window, q.device())?.to_dtype(scores.dtype())?;
            scores
                .reshape((b, nkv, rep, t, s))?
                .broadcast_add(&mask)?
                .reshape((b, nkv, rep * t, s))?
        } else {
            scores
        };
        let probs = crate::serial::softmax_last_dim(&scores)?;
        let out = probs.matmul(v)?; // [b, nkv, rep*t, hd]
        Ok(out.reshape((b, nh, t, hd))?.transpose(1, 2)?)
    }
}

/// `[t, s]` additive mask: query i (at absolute position past + i) sees keys 0..=past + i, and
/// with a window of `n` only the last `n` of them.
pub fn causal_mask(
    t: usize,
    s: usize,
    past: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                let pos = past + i;
                if j <= pos && window.is_none_or(|w| pos - j < w) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (t, s), device)?)
}
