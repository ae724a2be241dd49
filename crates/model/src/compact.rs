//! Frozen weights held in fewer bytes than f32, and the rows of them the matmul kernels read.
//!
//! Decoding one token reads every weight once, so its speed is the memory bandwidth divided by
//! the bytes of the weights: f16/bf16 halve them, Q8_0 (blocks of 32 signed bytes sharing one
//! scale, the GGUF format) quarters them. f16/bf16 rows are widened to f32 in L1 and multiplied
//! there; Q8_0 rows are multiplied by activations rounded to Q8_0 too, with integer dot products
//! (`crate::q8`), as llama.cpp does.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

/// Values per Q8_0 block.
pub const Q8_0_BLOCK: usize = 32;

/// How the frozen backbone's large matrices are held in memory (`--weight-dtype`); activations,
/// norms, experts and gates are f32 whatever this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    #[default]
    F32,
    F16,
    BF16,
    /// GGUF's Q8_0 for every projection and the LM head; embeddings in f16. Inference only.
    Q8_0,
}

impl WeightDtype {
    /// The candle dtype the weights are loaded in before any quantisation.
    pub fn load_dtype(self) -> DType {
        match self {
            WeightDtype::F32 | WeightDtype::Q8_0 => DType::F32,
            WeightDtype::F16 => DType::F16,
            WeightDtype::BF16 => DType::BF16,
        }
    }

    /// Whether training can run over weights held this way (it needs them as tensors).
    pub fn trainable(self) -> bool {
        self != WeightDtype::Q8_0
    }
}

impl fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::BF16 => "bf16",
            WeightDtype::Q8_0 => "q8_0",
        })
    }
}

impl FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(WeightDtype::F32),
            "f16" => Ok(WeightDtype::F16),
            "bf16" => Ok(WeightDtype::BF16),
            "q8_0" | "q8" => Ok(WeightDtype::Q8_0),
            other => Err(format!("`{other}` is not one of f32, f16, bf16, q8_0")),
        }
    }
}

/// A `[rows, cols]` matrix in Q8_0 blocks: GGUF's values (32 signed bytes per block, the
/// block's scale rounded to f16), held as one array of bytes and one of scales (widened to f32
/// once, at load) so that the integer kernels read 32 aligned bytes per block and never convert
/// a scale in their inner loop.
///
/// Several matrices can share one storage ([`Q8Matrix::stack`]): each is then a view of its own
/// rows, and the stack multiplies all of them in one pass.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    /// The first of this matrix's rows in the storage.
    first_row: usize,
    quants: Arc<[i8]>,
    scales: Arc<[f32]>,
}

impl Q8Matrix {
    /// Quantises a `[rows, cols]` tensor as GGUF's Q8_0 does; `cols` must be a multiple of 32.
    pub fn quantize(w: &Tensor) -> candle_core::Result<Self> {
        let (rows, cols) = w.dims2()?;
        if !cols.is_multiple_of(Q8_0_BLOCK) {
            candle_core::bail!("Q8_0 needs rows of a multiple of {Q8_0_BLOCK} values, not {cols}");
        }
        let values = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut quants = vec![0i8; rows * cols];
        let mut scales = vec![0f32; rows * cols / Q8_0_BLOCK];
        quantize_q8_0(&values, &mut quants, &mut scales, |d| {
            f16::from_f32(d).to_f32()
        });
        Ok(Self {
            rows,
            cols,
            first_row: 0,
            quants: quants.into(),
            scales: scales.into(),
        })
    }

    /// One matrix holding the rows of `parts` in order (all with the same number of columns),
    /// and each part again as a view of its rows in it: the parts then share one storage, and
    /// the stack computes all of their outputs in one pass over it.
    pub fn stack(parts: &[&Q8Matrix]) -> candle_core::Result<(Self, Vec<Self>)> {
        let Some(cols) = parts.first().map(|p| p.cols) else {
            candle_core::bail!("no matrices to stack");
        };
        if let Some(p) = parts.iter().find(|p| p.cols != cols) {
            candle_core::bail!("cannot stack a [_, {}] matrix on [_, {cols}] ones", p.cols);
        }
        let mut quants = Vec::new();
        let mut scales = Vec::new();
        for p in parts {
            let v = p.view();
            quants.extend_from_slice(v.quants);
            scales.extend_from_slice(v.scales);
        }
        let stacked = Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            first_row: 0,
            quants: quants.into(),
            scales: scales.into(),
        };
        let mut first_row = 0;
        let views = parts
            .iter()
            .map(|p| {
                let view = Self {
                    rows: p.rows,
                    first_row,
                    ..stacked.clone()
                };
                first_row += p.rows;
                view
            })
            .collect();
        Ok((stacked, views))
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// This matrix's blocks, for the kernels.
    pub fn view(&self) -> Q8Rows<'_> {
        let blocks = self.cols / Q8_0_BLOCK;
        Q8Rows {
            quants: &self.quants[self.first_row * self.cols..][..self.rows * self.cols],
            scales: &self.scales[self.first_row * blocks..][..self.rows * blocks],
        }
    }

    /// The whole matrix widened to f32.
    pub fn dequantize(&self) -> candle_core::Result<Tensor> {
        use rayon::prelude::*;
        let (rows, cols, blocks) = (self.rows, self.cols, self.cols / Q8_0_BLOCK);
        let mut out = vec![0f32; rows * cols];
        let v = self.view();
        out.par_chunks_mut(cols).enumerate().for_each(|(r, dst)| {
            widen_q8_0(
                &v.quants[r * cols..][..cols],
                &v.scales[r * blocks..][..blocks],
                dst,
            )
        });
        Tensor::from_vec(out, (rows, cols), &Device::Cpu)
    }
}

/// Q8_0 blocks as the kernels read them: `values / 32` scales, one per 32 consecutive values.
#[derive(Debug, Clone, Copy)]
pub struct Q8Rows<'a> {
    pub quants: &'a [i8],
    pub scales: &'a [f32],
}

/// Rounds `src` to Q8_0 blocks: each block's scale is its largest magnitude over 127 (passed
/// through `round_scale`: GGUF stores it as f16), each value `round(v / scale)`.
pub fn quantize_q8_0(
    src: &[f32],
    quants: &mut [i8],
    scales: &mut [f32],
    round_scale: impl Fn(f32) -> f32,
) {
    debug_assert_eq!(src.len(), quants.len());
    debug_assert_eq!(src.len(), scales.len() * Q8_0_BLOCK);
    for ((block, q), d) in src
        .chunks_exact(Q8_0_BLOCK)
        .zip(quants.chunks_exact_mut(Q8_0_BLOCK))
        .zip(scales.iter_mut())
    {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inverse = if scale == 0.0 { 0.0 } else { 1.0 / scale };
        for (q, v) in q.iter_mut().zip(block) {
            // Rounds half away from zero, as `f32::round` (a libm call without SSE4.1) does.
            let scaled = v * inverse;
            *q = (scaled + 0.5f32.copysign(scaled)) as i32 as i8;
        }
        *d = round_scale(scale);
    }
}

/// The weight matrix a kernel reads, row-major, in its stored element type.
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl Rows<'_> {
    /// Values in the whole matrix, for checking its size.
    pub fn len_values(&self) -> usize {
        match self {
            Rows::F32(w) => w.len(),
            Rows::F16(w) => w.len(),
            Rows::BF16(w) => w.len(),
        }
    }

    /// Writes row `r` (of `cols` values) widened to f32 into `out`.
    pub fn widen_row(&self, r: usize, cols: usize, out: &mut [f32]) {
        match *self {
            Rows::F32(w) => out.copy_from_slice(&w[r * cols..(r + 1) * cols]),
            Rows::F16(w) => widen_f16(&w[r * cols..(r + 1) * cols], out),
            Rows::BF16(w) => widen_bf16(&w[r * cols..(r + 1) * cols], out),
        }
    }
}

/// f16 to f32; `half` uses the F16C instruction where the CPU has it.
fn widen_f16(src: &[f16], dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(dst);
}

/// bf16 to f32: the upper half of an f32, so a shift.
fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s.to_bits() as u32) << 16);
    }
}

/// Q8_0 blocks to f32: each value is its byte times the block's scale.
fn widen_q8_0(quants: &[i8], scales: &[f32], dst: &mut [f32]) {
    debug_assert_eq!(quants.len(), dst.len());
    for ((out, q), d) in dst
        .chunks_exact_mut(Q8_0_BLOCK)
        .zip(quants.chunks_exact(Q8_0_BLOCK))
        .zip(scales)
    {
        for (o, &q) in out.iter_mut().zip(q) {
            *o = d * q as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_matches_what_candle_quantises_and_dequantises() {
        use candle_core::quantized::{GgmlDType, QTensor};
        // Magnitudes over several orders, exact ties (x.5 after scaling), zeros, a zero block.
        let mut values: Vec<f32> = (0..3 * 64)
            .map(|i| ((i as f32 * 0.37).sin() * 3.0).powi(3))
            .collect();
        values[0..32].iter_mut().for_each(|v| *v = 0.0);
        values[40] = 127.0;
        values[41] = 0.5;
        let w = Tensor::from_vec(values, (3, 64), &Device::Cpu).unwrap();
        let want: Vec<Vec<f32>> = QTensor::quantize(&w, GgmlDType::Q8_0)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2()
            .unwrap();
        let q = Q8Matrix::quantize(&w).unwrap();
        let got = q.dequantize().unwrap().to_vec2::<f32>().unwrap();
        for (r, (got, want)) in got.iter().zip(&want).enumerate() {
            assert_eq!(got, want, "row {r}");
        }
        assert_eq!(got.len(), want.len());
    }

    #[test]
    fn stacked_matrices_share_storage_and_keep_their_rows() {
        let part = |rows: usize, salt: f32| {
            let v: Vec<f32> = (0..rows * 64)
                .map(|i| (i as f32 * 0.11 + salt).cos())
                .collect();
            Q8Matrix::quantize(&Tensor::from_vec(v, (rows, 64), &Device::Cpu).unwrap()).unwrap()
        };
        let (a, b) = (part(3, 0.0), part(5, 1.0));
        let (stack, views) = Q8Matrix::stack(&[&a, &b]).unwrap();
        assert_eq!((stack.rows(), stack.cols()), (8, 64));
        for (view, original) in views.iter().zip([&a, &b]) {
            assert_eq!(view.view().quants, original.view().quants);
            assert_eq!(view.view().scales, original.view().scales);
            assert!(Arc::ptr_eq(&view.quants, &stack.quants));
        }
        let whole = stack.dequantize().unwrap();
        let top = whole.narrow(0, 3, 5).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(top, b.dequantize().unwrap().to_vec2::<f32>().unwrap());
        assert!(Q8Matrix::stack(&[&a, &part(2, 0.0)]).is_ok());
        let narrow = Q8Matrix::quantize(&Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap());
        assert!(Q8Matrix::stack(&[&a, &narrow.unwrap()]).is_err());
    }

    #[test]
    fn q8_0_refuses_rows_that_are_not_whole_blocks() {
        let w = Tensor::zeros((2, 40), DType::F32, &Device::Cpu).unwrap();
        assert!(Q8Matrix::quantize(&w).is_err());
    }

    #[test]
    fn weight_dtypes_parse_and_print_back() {
        for d in [
            WeightDtype::F32,
            WeightDtype::F16,
            WeightDtype::BF16,
            WeightDtype::Q8_0,
        ] {
            assert_eq!(d.to_string().parse::<WeightDtype>(), Ok(d));
        }
        assert!("q4".parse::<WeightDtype>().is_err());
    }
}
