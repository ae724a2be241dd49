//! Rotary position embedding: inverse frequencies per base (with Llama 3 scaling applied) and
//! the cos/sin tables for a range of positions.

use candle_core::{DType, Device, Tensor};

use crate::{Config, Result};

/// RoPE of a model: the global layers' frequencies and, for a model with sliding-window layers
/// (Gemma 3), the local layers' frequencies from their own base.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
    local_inv_freq: Option<Vec<f64>>,
}

/// cos and sin tables, each `[len, head_dim / 2]` (or `[rows, 1, head_dim / 2]` for a packed
/// batch, one position per row), for the global layers and (when the model has them) the
/// sliding-window layers.
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
    pub local: Option<(Tensor, Tensor)>,
}

impl RopeTables {
    /// The tables a layer with attention window `window` uses (`None`: a global layer).
    pub fn for_window(&self, window: Option<usize>) -> (&Tensor, &Tensor) {
        match (window, &self.local) {
            (Some(_), Some((cos, sin))) => (cos, sin),
            _ => (&self.cos, &self.sin),
        }
    }

    /// The tables of the rows `rows` (a `u32` index tensor) of per-row tables.
    pub fn select_rows(&self, rows: &Tensor) -> Result<Self> {
        let pick = |t: &Tensor| t.index_select(rows, 0);
        Ok(Self {
            cos: pick(&self.cos)?,
            sin: pick(&self.sin)?,
            local: match &self.local {
                Some((c, s)) => Some((pick(c)?, pick(s)?)),
                None => None,
            },
        })
    }
}

fn base_inv_freq(theta: f64, head_dim: usize) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
        .collect()
}

impl Rope {
    pub fn new(config: &Config, gguf_freq_factors: Option<&[f32]>) -> Self {
        let d = config.head_dim;
        let mut inv_freq = base_inv_freq(config.rope_theta, d);
        if let Some(s) = &config.rope_scaling {
            let low_wavelen = s.original_max_position_embeddings as f64 / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings as f64 / s.high_freq_factor;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                *f = if wavelen < high_wavelen {
                    *f
                } else if wavelen > low_wavelen {
                    *f / s.factor
                } else {
                    let smooth = (s.original_max_position_embeddings as f64 / wavelen
                        - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * *f / s.factor + smooth * *f
                };
            }
        }
        if let Some(factors) = gguf_freq_factors {
            for (f, div) in inv_freq.iter_mut().zip(factors) {
                *f /= *div as f64;
            }
        }
        let local_inv_freq = config
            .sliding_window
            .as_ref()
            .map(|w| base_inv_freq(w.local_rope_theta, d));
        Self {
            inv_freq,
            local_inv_freq,
        }
    }

    /// The inverse frequency of each rotary pair of the global layers, scaling applied.
    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    /// Tables in f32 for positions `start..start + len`.
    pub fn tables(&self, start: usize, len: usize, device: &Device) -> Result<RopeTables> {
        self.tables_as(start, len, DType::F32, device)
    }

    /// [`Self::tables`] in `dtype`; angles are computed in f64 before rounding.
    pub fn tables_as(
        &self,
        start: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<RopeTables> {
        let (cos, sin) = cos_sin(&self.inv_freq, start..start + len, dtype, device)?;
        let local = match &self.local_inv_freq {
            Some(f) => Some(cos_sin(f, start..start + len, dtype, device)?),
            None => None,
        };
        Ok(RopeTables { cos, sin, local })
    }

    /// Per-row tables in f32 for a packed batch (one token per row): row `r` holds position
    /// `positions[r]`, each table `[rows, 1, head_dim / 2]`.
    pub fn at_positions(&self, positions: &[usize], device: &Device) -> Result<RopeTables> {
        let per_row = |f: &[f64]| -> Result<(Tensor, Tensor)> {
            let (cos, sin) = cos_sin(f, positions.iter().copied(), DType::F32, device)?;
            Ok((cos.unsqueeze(1)?, sin.unsqueeze(1)?))
        };
        let (cos, sin) = per_row(&self.inv_freq)?;
        let local = match &self.local_inv_freq {
            Some(f) => Some(per_row(f)?),
            None => None,
        };
        Ok(RopeTables { cos, sin, local })
    }
}

/// `[positions, inv_freq.len()]` tables of cos and sin of every position times every
/// frequency, computed in f64 and rounded to `dtype`.
fn cos_sin(
    inv_freq: &[f64],
    positions: impl ExactSizeIterator<Item = usize>,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (len, half) = (positions.len(), inv_freq.len());
    let mut cos = Vec::with_capacity(len * half);
    let mut sin = Vec::with_capacity(len * half);
    for pos in positions {
        for f in inv_freq {
            let angle = pos as f64 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let table = |v: Vec<f64>| Tensor::from_vec(v, (len, half), device)?.to_dtype(dtype);
    Ok((table(cos)?, table(sin)?))
}
