//! Frozen weights held in fewer bytes than f32, and the rows of them the matmul kernels read.
//!
//! Decoding one token reads every weight once, so its speed is the memory bandwidth divided by
//! the bytes of the weights: f16/bf16 halve them, Q8_0 (blocks of 32 signed bytes sharing one
//! scale, the GGUF format) quarters them, Q4_1 (blocks of 32 four-bit values with a scale and a
//! minimum) takes about a sixth. f16/bf16 rows are widened to f32 in L1 and multiplied there;
//! Q8_0 and Q4_1 rows are multiplied by activations rounded to Q8_0, with integer dot products
//! (`crate::q8`), as llama.cpp does.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

mod quantize;
use quantize::quantize_q4_1;
pub use quantize::quantize_q8_0;

/// Values per quantised block (Q8_0 and Q4_1 alike).
pub const BLOCK_VALUES: usize = 32;

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
    /// GGUF's Q4_1 for every projection, Q8_0 for the LM head (as llama.cpp's Q4 files keep
    /// it), embeddings in f16. Over a Q4_1 GGUF this holds the file's own blocks again.
    /// Inference only.
    Q4_1,
}

impl WeightDtype {
    /// The candle dtype the weights are loaded in before any quantisation.
    pub fn load_dtype(self) -> DType {
        match self {
            WeightDtype::F32 | WeightDtype::Q8_0 | WeightDtype::Q4_1 => DType::F32,
            WeightDtype::F16 => DType::F16,
            WeightDtype::BF16 => DType::BF16,
        }
    }

    /// The block format of the projections, for the quantised dtypes.
    pub fn block_format(self) -> Option<BlockFormat> {
        match self {
            WeightDtype::Q8_0 => Some(BlockFormat::Q8_0),
            WeightDtype::Q4_1 => Some(BlockFormat::Q4_1),
            WeightDtype::F32 | WeightDtype::F16 | WeightDtype::BF16 => None,
        }
    }

    /// Whether training can run over weights held this way (it needs them as tensors).
    pub fn trainable(self) -> bool {
        self.block_format().is_none()
    }
}

impl fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::BF16 => "bf16",
            WeightDtype::Q8_0 => "q8_0",
            WeightDtype::Q4_1 => "q4_1",
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
            "q4_1" => Ok(WeightDtype::Q4_1),
            other => Err(format!(
                "`{other}` is not one of f32, f16, bf16, q8_0, q4_1"
            )),
        }
    }
}

/// GGUF block formats that the integer kernels multiply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// 32 signed bytes times a scale.
    Q8_0,
    /// 32 four-bit values times a scale plus a minimum; byte `i` holds value `i` in its low
    /// nibble and value `i + 16` in its high one.
    Q4_1,
}

impl BlockFormat {
    /// The name `--weight-dtype` and GGUF tools use.
    pub const fn name(self) -> &'static str {
        match self {
            BlockFormat::Q8_0 => "q8_0",
            BlockFormat::Q4_1 => "q4_1",
        }
    }

    /// Bytes of quantised values in a block (its scale and minimum apart).
    pub const fn quant_bytes(self) -> usize {
        match self {
            BlockFormat::Q8_0 => BLOCK_VALUES,
            BlockFormat::Q4_1 => BLOCK_VALUES / 2,
        }
    }
}

/// Weight rows stored together: one 32-byte vector holds four consecutive values of each of
/// them, so that one integer instruction computes a piece of eight dot products at once.
pub const GROUP_ROWS: usize = 8;

/// A `[rows, cols]` matrix in Q8_0 or Q4_1 blocks: GGUF's values (scales and minimums in f16
/// as the file stores them, so a block reads no more bytes than llama.cpp's), with the rows
/// interleaved in groups of [`GROUP_ROWS`] for the integer kernels (the last group padded with
/// zero rows).
///
/// Group `g`, block `b` (values `32b..32b + 32` of each of its rows) holds, for Q8_0, eight
/// vectors of 32 bytes, vector `c` being values `4c..4c + 4` of rows `8g..8g + 8` in turn; for
/// Q4_1 four vectors, vector `c` holding values `4c..4c + 4` in the low nibbles and
/// `16 + 4c..16 + 4c + 4` in the high ones. The group's 8 scales (and minimums) of each block
/// lie in their own arrays, in the same order. A kernel reads a group's blocks in order, each
/// as a few vectors.
///
/// Several matrices can share one storage ([`QMatrix::stack`]): each is then a view of its own
/// rows, and the stack computes all of their outputs in one pass.
#[derive(Debug, Clone)]
pub struct QMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    /// The first of this matrix's rows in the storage (a multiple of [`GROUP_ROWS`]).
    first_row: usize,
    quants: Arc<[u8]>,
    scales: Arc<[f16]>,
    /// Q4_1's per-block minimums; empty for Q8_0.
    mins: Arc<[f16]>,
}

impl QMatrix {
    /// Quantises a `[rows, cols]` tensor as GGUF does; `cols` must be a multiple of 32.
    pub fn quantize(w: &Tensor, format: BlockFormat) -> candle_core::Result<Self> {
        let (rows, cols) = w.dims2()?;
        if !cols.is_multiple_of(BLOCK_VALUES) {
            candle_core::bail!(
                "{format:?} needs rows of a multiple of {BLOCK_VALUES} values, not {cols}"
            );
        }
        let values = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let blocks = rows * cols / BLOCK_VALUES;
        // Row by row first, as GGUF stores them; then interleaved.
        let mut quants = vec![0u8; blocks * format.quant_bytes()];
        let mut scales = vec![0f32; blocks];
        let mut mins = vec![0f32; blocks];
        let to_f16 = |d: f32| f16::from_f32(d).to_f32();
        match format {
            BlockFormat::Q8_0 => {
                quantize_q8_0(&values, bytemuck_i8(&mut quants), &mut scales, to_f16);
            }
            BlockFormat::Q4_1 => quantize_q4_1(&values, &mut quants, &mut scales, &mut mins),
        }
        let level = |r: usize, c: usize| -> u8 {
            let block = (r * cols + c) / BLOCK_VALUES;
            let v = c % BLOCK_VALUES;
            match format {
                BlockFormat::Q8_0 => quants[block * BLOCK_VALUES + v],
                BlockFormat::Q4_1 => {
                    let byte = quants[block * BLOCK_VALUES / 2 + v % 16];
                    if v < 16 {
                        byte & 0x0F
                    } else {
                        byte >> 4
                    }
                }
            }
        };
        let (groups, row_blocks) = (rows.div_ceil(GROUP_ROWS), cols / BLOCK_VALUES);
        let group_block_bytes = GROUP_ROWS * format.quant_bytes();
        let mut packed = vec![0u8; groups * row_blocks * group_block_bytes];
        let mut packed_scales = vec![f16::ZERO; groups * row_blocks * GROUP_ROWS];
        let mut packed_mins = match format {
            BlockFormat::Q8_0 => Vec::new(),
            BlockFormat::Q4_1 => vec![f16::ZERO; packed_scales.len()],
        };
        for r in 0..rows {
            let (g, i) = (r / GROUP_ROWS, r % GROUP_ROWS);
            for b in 0..row_blocks {
                let at = (g * row_blocks + b) * GROUP_ROWS + i;
                // Exact: the quantisers round scales and minimums to f16.
                packed_scales[at] = f16::from_f32(scales[r * row_blocks + b]);
                if let Some(m) = packed_mins.get_mut(at) {
                    *m = f16::from_f32(mins[r * row_blocks + b]);
                }
                let base = (g * row_blocks + b) * group_block_bytes + i * 4;
                for v in 0..BLOCK_VALUES {
                    let q = level(r, b * BLOCK_VALUES + v);
                    let (vector, high) = match format {
                        BlockFormat::Q8_0 => (v / 4, false),
                        BlockFormat::Q4_1 => ((v / 4) % 4, v >= 16),
                    };
                    let byte = &mut packed[base + vector * 32 + v % 4];
                    *byte |= if high { q << 4 } else { q };
                }
            }
        }
        Ok(Self {
            format,
            rows,
            cols,
            first_row: 0,
            quants: packed.into(),
            scales: packed_scales.into(),
            mins: packed_mins.into(),
        })
    }

    /// One matrix holding the rows of `parts` in order (all of one format and number of
    /// columns, each but the last a whole number of groups), and each part again as a view of
    /// its rows in it: the parts then share one storage, and the stack computes all of their
    /// outputs in one pass over it.
    pub fn stack(parts: &[&QMatrix]) -> candle_core::Result<(Self, Vec<Self>)> {
        let Some(first) = parts.first() else {
            candle_core::bail!("no matrices to stack");
        };
        let (cols, format) = (first.cols, first.format);
        if let Some(p) = parts.iter().find(|p| p.cols != cols || p.format != format) {
            candle_core::bail!(
                "cannot stack a [_, {}] {:?} matrix on [_, {cols}] {format:?} ones",
                p.cols,
                p.format
            );
        }
        if let Some(p) = parts[..parts.len() - 1]
            .iter()
            .find(|p| !p.rows.is_multiple_of(GROUP_ROWS))
        {
            candle_core::bail!(
                "cannot stack a matrix of {} rows: not whole groups of {GROUP_ROWS}",
                p.rows
            );
        }
        let (mut quants, mut scales, mut mins) = (Vec::new(), Vec::new(), Vec::new());
        for p in parts {
            let v = p.view();
            quants.extend_from_slice(v.quants);
            scales.extend_from_slice(v.scales);
            mins.extend_from_slice(v.mins);
        }
        let stacked = Self {
            format,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            first_row: 0,
            quants: quants.into(),
            scales: scales.into(),
            mins: mins.into(),
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

    pub fn format(&self) -> BlockFormat {
        self.format
    }

    /// This matrix's groups of rows, for the kernels.
    pub fn view(&self) -> QRows<'_> {
        let blocks = self.cols / BLOCK_VALUES;
        let (g0, groups) = (self.first_row / GROUP_ROWS, self.rows.div_ceil(GROUP_ROWS));
        let group_bytes = blocks * GROUP_ROWS * self.format.quant_bytes();
        let group_scales = blocks * GROUP_ROWS;
        let mins = match self.format {
            BlockFormat::Q8_0 => &self.mins[..],
            BlockFormat::Q4_1 => &self.mins[g0 * group_scales..][..groups * group_scales],
        };
        QRows {
            format: self.format,
            rows: self.rows,
            cols: self.cols,
            quants: &self.quants[g0 * group_bytes..][..groups * group_bytes],
            scales: &self.scales[g0 * group_scales..][..groups * group_scales],
            mins,
        }
    }

    /// The whole matrix widened to f32.
    pub fn dequantize(&self) -> candle_core::Result<Tensor> {
        use rayon::prelude::*;
        let (rows, cols) = (self.rows, self.cols);
        let mut out = vec![0f32; rows * cols];
        let v = self.view();
        out.par_chunks_mut(cols).enumerate().for_each(|(r, dst)| {
            for (c, o) in dst.iter_mut().enumerate() {
                *o = v.value(r, c);
            }
        });
        Tensor::from_vec(out, (rows, cols), &Device::Cpu)
    }
}

/// A matrix's groups of interleaved rows as the kernels read them (see [`QMatrix`]).
#[derive(Debug, Clone, Copy)]
pub struct QRows<'a> {
    pub format: BlockFormat,
    pub rows: usize,
    pub cols: usize,
    pub quants: &'a [u8],
    pub scales: &'a [f16],
    /// Empty for Q8_0.
    pub mins: &'a [f16],
}

impl QRows<'_> {
    /// Where row `r`'s scale (and minimum) of block `b` is.
    fn scale_at(&self, r: usize, b: usize) -> usize {
        ((r / GROUP_ROWS) * (self.cols / BLOCK_VALUES) + b) * GROUP_ROWS + r % GROUP_ROWS
    }

    /// The quantised level of value `c` of row `r`: signed for Q8_0, 0 to 15 for Q4_1.
    pub fn level(&self, r: usize, c: usize) -> i32 {
        let (b, v) = (c / BLOCK_VALUES, c % BLOCK_VALUES);
        let group_block = (r / GROUP_ROWS) * (self.cols / BLOCK_VALUES) + b;
        let base = group_block * GROUP_ROWS * self.format.quant_bytes() + (r % GROUP_ROWS) * 4;
        match self.format {
            BlockFormat::Q8_0 => self.quants[base + (v / 4) * 32 + v % 4] as i8 as i32,
            BlockFormat::Q4_1 => {
                let byte = self.quants[base + ((v / 4) % 4) * 32 + v % 4];
                (if v < 16 { byte & 0x0F } else { byte >> 4 }) as i32
            }
        }
    }

    /// Row `r`'s scale and minimum (0 for Q8_0) of block `b`.
    pub fn scale_min(&self, r: usize, b: usize) -> (f32, f32) {
        let at = self.scale_at(r, b);
        (
            self.scales[at].to_f32(),
            self.mins.get(at).map_or(0.0, |m| m.to_f32()),
        )
    }

    /// Value `c` of row `r`, widened to f32 as GGUF does.
    pub fn value(&self, r: usize, c: usize) -> f32 {
        let (d, m) = self.scale_min(r, c / BLOCK_VALUES);
        match self.format {
            BlockFormat::Q8_0 => d * self.level(r, c) as f32,
            BlockFormat::Q4_1 => d * self.level(r, c) as f32 + m,
        }
    }
}

/// Bytes seen as the signed bytes Q8_0 stores.
fn bytemuck_i8(bytes: &mut [u8]) -> &mut [i8] {
    // SAFETY: u8 and i8 have the same size and alignment, and every bit pattern is valid in both.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut i8, bytes.len()) }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};

    /// Magnitudes over several orders, exact ties (x.5 after scaling), zeros, a zero block, a
    /// block of one repeated value.
    fn awkward_values() -> Tensor {
        let mut values: Vec<f32> = (0..4 * 64)
            .map(|i| ((i as f32 * 0.37).sin() * 3.0).powi(3))
            .collect();
        values[0..32].iter_mut().for_each(|v| *v = 0.0);
        values[64..96].iter_mut().for_each(|v| *v = -1.25);
        values[40] = 127.0;
        values[41] = 0.5;
        Tensor::from_vec(values, (4, 64), &Device::Cpu).unwrap()
    }

    #[test]
    fn blocks_match_what_candle_quantises_and_dequantises() {
        let w = awkward_values();
        for (format, ggml) in [
            (BlockFormat::Q8_0, GgmlDType::Q8_0),
            (BlockFormat::Q4_1, GgmlDType::Q4_1),
        ] {
            let want: Vec<Vec<f32>> = QTensor::quantize(&w, ggml)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec2()
                .unwrap();
            let q = QMatrix::quantize(&w, format).unwrap();
            let got = q.dequantize().unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(got.len(), want.len());
            for (r, (got, want)) in got.iter().zip(&want).enumerate() {
                assert_eq!(got, want, "{format:?} row {r}");
            }
        }
    }

    #[test]
    fn q4_1_blocks_quantised_again_come_back_unchanged() {
        // What makes --weight-dtype q4_1 over a Q4_1 file hold the file's own blocks: the
        // widened values of a Q4_1 block quantise to the same block.
        let once = QMatrix::quantize(&awkward_values(), BlockFormat::Q4_1).unwrap();
        let twice = QMatrix::quantize(&once.dequantize().unwrap(), BlockFormat::Q4_1).unwrap();
        assert_eq!(once.view().quants, twice.view().quants);
        assert_eq!(once.view().scales, twice.view().scales);
        assert_eq!(once.view().mins, twice.view().mins);
    }

    #[test]
    fn stacked_matrices_share_storage_and_keep_their_rows() {
        for format in [BlockFormat::Q8_0, BlockFormat::Q4_1] {
            let part = |rows: usize, salt: f32| {
                let v: Vec<f32> = (0..rows * 64)
                    .map(|i| (i as f32 * 0.11 + salt).cos())
                    .collect();
                let t = Tensor::from_vec(v, (rows, 64), &Device::Cpu).unwrap();
                QMatrix::quantize(&t, format).unwrap()
            };
            // Whole groups of rows but the last part's.
            let (a, b) = (part(8, 0.0), part(5, 1.0));
            let (stack, views) = QMatrix::stack(&[&a, &b]).unwrap();
            assert_eq!((stack.rows(), stack.cols()), (13, 64));
            for (view, original) in views.iter().zip([&a, &b]) {
                assert_eq!(view.view().quants, original.view().quants);
                assert_eq!(view.view().scales, original.view().scales);
                assert_eq!(view.view().mins, original.view().mins);
                assert!(Arc::ptr_eq(&view.quants, &stack.quants));
            }
            let whole = stack.dequantize().unwrap();
            let top = whole.narrow(0, 8, 5).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(top, b.dequantize().unwrap().to_vec2::<f32>().unwrap());
            assert!(
                QMatrix::stack(&[&b, &a]).is_err(),
                "5 rows end inside a group"
            );
            let zeros = Tensor::zeros((8, 32), DType::F32, &Device::Cpu).unwrap();
            let narrow = QMatrix::quantize(&zeros, format).unwrap();
            assert!(QMatrix::stack(&[&a, &narrow]).is_err());
        }
        let w = Tensor::zeros((8, 64), DType::F32, &Device::Cpu).unwrap();
        let q8 = QMatrix::quantize(&w, BlockFormat::Q8_0).unwrap();
        let q4 = QMatrix::quantize(&w, BlockFormat::Q4_1).unwrap();
        assert!(QMatrix::stack(&[&q8, &q4]).is_err());
    }

    #[test]
    fn rows_that_are_not_whole_blocks_are_refused() {
        let w = Tensor::zeros((2, 40), DType::F32, &Device::Cpu).unwrap();
        assert!(QMatrix::quantize(&w, BlockFormat::Q8_0).is_err());
        assert!(QMatrix::quantize(&w, BlockFormat::Q4_1).is_err());
    }

    #[test]
    fn weight_dtypes_parse_and_print_back() {
        for d in [
            WeightDtype::F32,
            WeightDtype::F16,
            WeightDtype::BF16,
            WeightDtype::Q8_0,
            WeightDtype::Q4_1,
        ] {
            assert_eq!(d.to_string().parse::<WeightDtype>(), Ok(d));
        }
        assert!("q4".parse::<WeightDtype>().is_err());
    }
}
