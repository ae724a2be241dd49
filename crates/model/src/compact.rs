//! Frozen weights held in fewer bytes than f32, and the rows of them the matmul kernels read.
//!
//! Decoding one token reads every weight once, so its speed is the memory bandwidth divided by
//! the bytes of the weights: f16/bf16 halve them, Q8_0 (blocks of 32 signed bytes sharing one
//! f16 scale, 8.5 bits a weight, the GGUF format) quarters them. The kernels widen a couple of
//! weight rows at a time to f32 in L1 and multiply there, so the arithmetic stays f32 and only
//! the bytes read from memory shrink.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

/// Values per Q8_0 block.
pub const Q8_0_BLOCK: usize = 32;
/// Bytes per Q8_0 block: an f16 scale, then 32 signed bytes.
pub const Q8_0_BLOCK_BYTES: usize = 2 + Q8_0_BLOCK;

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

/// A `[rows, cols]` matrix in Q8_0 blocks, row-major (each row is `cols / 32` blocks).
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    tensor: Arc<QTensor>,
}

impl Q8Matrix {
    /// Quantises a `[rows, cols]` tensor; `cols` must be a multiple of 32.
    pub fn quantize(w: &Tensor) -> candle_core::Result<Self> {
        let (_, cols) = w.dims2()?;
        if !cols.is_multiple_of(Q8_0_BLOCK) {
            candle_core::bail!("Q8_0 needs rows of a multiple of {Q8_0_BLOCK} values, not {cols}");
        }
        let tensor = QTensor::quantize(&w.to_dtype(DType::F32)?, GgmlDType::Q8_0)?;
        Ok(Self {
            tensor: Arc::new(tensor),
        })
    }

    pub fn rows(&self) -> usize {
        self.tensor.shape().dims()[0]
    }

    pub fn cols(&self) -> usize {
        self.tensor.shape().dims()[1]
    }

    /// The blocks, as stored.
    pub fn bytes(&self) -> &[u8] {
        match self.tensor.data().expect("CPU storage") {
            std::borrow::Cow::Borrowed(b) => b,
            // Only device storage is copied out, and these matrices live on the CPU.
            std::borrow::Cow::Owned(_) => unreachable!("Q8Matrix is built on the CPU"),
        }
    }

    /// The quantised tensor, for candle's own one-row kernel.
    pub fn qtensor(&self) -> &Arc<QTensor> {
        &self.tensor
    }

    /// The whole matrix widened to f32.
    pub fn dequantize(&self) -> candle_core::Result<Tensor> {
        use rayon::prelude::*;
        let (rows, cols) = (self.rows(), self.cols());
        let mut out = vec![0f32; rows * cols];
        let src = Rows::Q8_0(self.bytes());
        out.par_chunks_mut(cols)
            .enumerate()
            .for_each(|(r, dst)| src.widen_row(r, cols, dst));
        Tensor::from_vec(out, (rows, cols), &Device::Cpu)
    }
}

/// The weight matrix a kernel reads, row-major, in its stored element type.
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    /// Q8_0 blocks, `cols / 32` of them per row.
    Q8_0(&'a [u8]),
}

impl Rows<'_> {
    /// Elements of one row, for checking a matrix's size.
    pub fn len_values(&self) -> usize {
        match self {
            Rows::F32(w) => w.len(),
            Rows::F16(w) => w.len(),
            Rows::BF16(w) => w.len(),
            Rows::Q8_0(b) => b.len() / Q8_0_BLOCK_BYTES * Q8_0_BLOCK,
        }
    }

    /// Writes row `r` (of `cols` values) widened to f32 into `out`.
    pub fn widen_row(&self, r: usize, cols: usize, out: &mut [f32]) {
        match *self {
            Rows::F32(w) => out.copy_from_slice(&w[r * cols..(r + 1) * cols]),
            Rows::F16(w) => widen_f16(&w[r * cols..(r + 1) * cols], out),
            Rows::BF16(w) => widen_bf16(&w[r * cols..(r + 1) * cols], out),
            Rows::Q8_0(b) => {
                let row_bytes = cols / Q8_0_BLOCK * Q8_0_BLOCK_BYTES;
                widen_q8_0(&b[r * row_bytes..(r + 1) * row_bytes], out);
            }
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
pub fn widen_q8_0(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len() / Q8_0_BLOCK_BYTES * Q8_0_BLOCK, dst.len());
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has the features the function is compiled for.
        unsafe { avx2::widen_q8_0(src, dst) };
        return;
    }
    for (block, out) in src
        .chunks_exact(Q8_0_BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(Q8_0_BLOCK))
    {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        for (o, &q) in out.iter_mut().zip(&block[2..]) {
            *o = d * q as i8 as f32;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Q8_0_BLOCK, Q8_0_BLOCK_BYTES};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    pub unsafe fn widen_q8_0(src: &[u8], dst: &mut [f32]) {
        let blocks = src.len() / Q8_0_BLOCK_BYTES;
        for b in 0..blocks {
            let p = src.as_ptr().add(b * Q8_0_BLOCK_BYTES);
            let d = half::f16::from_bits(u16::from_le_bytes([*p, *p.add(1)])).to_f32();
            let scale = _mm256_set1_ps(d);
            let out = dst.as_mut_ptr().add(b * Q8_0_BLOCK);
            for part in 0..4 {
                let bytes = _mm_loadl_epi64(p.add(2 + part * 8) as *const __m128i);
                let ints = _mm256_cvtepi8_epi32(bytes);
                let v = _mm256_mul_ps(_mm256_cvtepi32_ps(ints), scale);
                _mm256_storeu_ps(out.add(part * 8), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_rows_widen_to_what_candle_dequantises() {
        let values: Vec<f32> = (0..3 * 64)
            .map(|i| ((i as f32 * 0.37).sin() * 3.0).powi(3))
            .collect();
        let w = Tensor::from_vec(values, (3, 64), &Device::Cpu).unwrap();
        let q = Q8Matrix::quantize(&w).unwrap();
        let want: Vec<Vec<f32>> = q
            .qtensor()
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2()
            .unwrap();
        let rows = Rows::Q8_0(q.bytes());
        let mut buf = vec![0f32; 64];
        for (r, want) in want.iter().enumerate() {
            rows.widen_row(r, 64, &mut buf);
            assert_eq!(&buf, want, "row {r}");
        }
        assert_eq!(q.dequantize().unwrap().to_vec2::<f32>().unwrap(), want);
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
