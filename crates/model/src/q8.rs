//! `y = x W^T` for a `W` in Q8_0 or Q4_1 blocks, with integer dot products.
//!
//! The rows of `x` are rounded to Q8_0 blocks (scales kept in f32), and each pair of blocks is
//! multiplied with 8-bit dot products, then scaled by the product of the two blocks' scales in
//! f32; Q4_1's minimum adds `min * scale_x * sum(x's block)`, from sums taken when `x` is
//! rounded. The weights are stored in groups of 8 interleaved rows ([`crate::compact::QMatrix`]):
//! four values of `x`, broadcast, meet four values of each of the 8 rows in one instruction, so
//! each lane of the accumulator is one output and a block costs one conversion to f32 for 8
//! outputs. AVX-512 VNNI's `vpdpbusd` where the CPU has it (Q8_0 weights offset to unsigned,
//! the offset taken back out of the accumulator's starting value; Q4_1's nibbles are unsigned
//! already), AVX2's `vpmaddubsw` otherwise (for Q8_0, `x` gives its magnitudes and the weights
//! take `x`'s signs). As in llama.cpp, the weights are read as bytes, and the arithmetic runs
//! 32 multiply-adds an instruction.
//!
//! Every output element is summed in the same order however many rows `x` has and wherever a
//! row sits among them, so a sequence decoded in a batch gets bit for bit the logits it gets
//! alone.

use crate::compact::{quantize_q8_0, BlockFormat, QRows, BLOCK_VALUES, GROUP_ROWS};

/// How many groups of weight rows ahead of the one being multiplied the kernels prefetch. The
/// hardware prefetcher alone kept a thread at a third of the bandwidth a plain streaming read
/// reaches here; asking for the rows a few groups ahead gets most of it.
const PREFETCH_GROUPS: usize = 2;

/// Rows of `x` rounded to Q8_0: `quants` row-major, one f32 scale per block, and per block
/// the sum of its levels (what VNNI's offset takes back) and its scale times that sum (what a
/// Q4_1 block's minimum multiplies).
struct Activations {
    quants: Vec<i8>,
    scales: Vec<f32>,
    level_sums: Vec<i32>,
    sums: Vec<f32>,
}

impl Activations {
    /// Rounds `x` (whole blocks) to Q8_0, in chunks of blocks spread over candle's pool when
    /// `x` is large (prefill, a batched decode step's down projection).
    fn quantize(x: &[f32]) -> Self {
        let blocks = x.len() / BLOCK_VALUES;
        let mut quants = vec![0i8; x.len()];
        let mut scales = vec![0f32; blocks];
        let mut sums = vec![0f32; blocks];
        let mut level_sums = vec![0i32; blocks];
        let q_ptr = crate::matmul::OutPtr(quants.as_mut_ptr());
        let l_ptr = crate::matmul::OutPtr(level_sums.as_mut_ptr());
        let s_ptr = crate::matmul::OutPtr(scales.as_mut_ptr());
        let sum_ptr = crate::matmul::OutPtr(sums.as_mut_ptr());
        let chunks = blocks.div_ceil(BLOCKS_PER_QUANTIZE_TASK);
        crate::matmul::chunked(chunks, x.len(), |range| {
            for chunk in range {
                let b0 = chunk * BLOCKS_PER_QUANTIZE_TASK;
                let n = BLOCKS_PER_QUANTIZE_TASK.min(blocks - b0);
                let values = n * BLOCK_VALUES;
                // SAFETY: each chunk writes only its own blocks of `quants`, `scales`,
                // `level_sums` and `sums`, which outlive the loop.
                let (q, s, l, sum) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(q_ptr.get().add(b0 * BLOCK_VALUES), values),
                        std::slice::from_raw_parts_mut(s_ptr.get().add(b0), n),
                        std::slice::from_raw_parts_mut(l_ptr.get().add(b0), n),
                        std::slice::from_raw_parts_mut(sum_ptr.get().add(b0), n),
                    )
                };
                quantize_q8_0(&x[b0 * BLOCK_VALUES..][..values], q, s, |d| d);
                for (b, q) in q.chunks_exact(BLOCK_VALUES).enumerate() {
                    l[b] = q.iter().map(|&v| v as i32).sum();
                    sum[b] = s[b] * l[b] as f32;
                }
            }
        });
        Self {
            quants,
            scales,
            level_sums,
            sums,
        }
    }
}

/// Blocks of `x` quantised per parallel task.
const BLOCKS_PER_QUANTIZE_TASK: usize = 64;

/// `y[i, j] = sum_k x[i, k] * w[j, k]` with `x` rounded to Q8_0: `x` is `[m, k]` in f32, `w`
/// is `[n, k]` in quantised blocks (`k` a multiple of 32); returns `y` as `[m, n]`.
pub fn matmul(x: &[f32], m: usize, w: QRows<'_>, n: usize, k: usize) -> Vec<f32> {
    assert!(
        k.is_multiple_of(BLOCK_VALUES),
        "k = {k} is not whole blocks of {BLOCK_VALUES}"
    );
    assert_eq!(x.len(), m * k, "x is not [{m}, {k}]");
    assert_eq!((w.rows, w.cols), (n, k), "w is not [{n}, {k}]");
    let group_blocks = n.div_ceil(GROUP_ROWS) * (k / BLOCK_VALUES);
    assert_eq!(
        w.quants.len(),
        group_blocks * GROUP_ROWS * w.format.quant_bytes(),
        "w's blocks are not [{n}, {k}] in groups"
    );
    assert_eq!(
        w.scales.len(),
        group_blocks * GROUP_ROWS,
        "w's scales are not [{n}, {k} / 32]"
    );
    if w.format == BlockFormat::Q4_1 {
        assert_eq!(
            w.mins.len(),
            w.scales.len(),
            "w's minimums are not [{n}, {k} / 32]"
        );
    }
    let xq = Activations::quantize(x);
    let isa = Isa::detect();
    crate::matmul::by_columns(m, n, |cols, y| columns(isa, &xq, m, w, cols, n, k, y))
}

/// The instructions the dot products use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Vnni,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Scalar,
}

impl Isa {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
            {
                return Isa::Vnni;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }
}

/// Columns `cols` of `y` (a range starting at a whole group of weight rows): one group of 8
/// weight rows at a time, against up to [`Tile::MAX_ROWS`] rows of `x` at a time.
#[allow(clippy::too_many_arguments)]
fn columns(
    isa: Isa,
    xq: &Activations,
    m: usize,
    w: QRows<'_>,
    cols: std::ops::Range<usize>,
    n: usize,
    k: usize,
    y: &mut [f32],
) {
    let blocks = k / BLOCK_VALUES;
    let groups = n.div_ceil(GROUP_ROWS);
    // What every tile below reads and writes lies within these.
    assert!(cols.start.is_multiple_of(GROUP_ROWS) && cols.end <= n && y.len() >= m * n);
    assert!(xq.quants.len() >= m * k && xq.scales.len() >= m * blocks);
    assert!(xq.sums.len() >= m * blocks && xq.level_sums.len() >= m * blocks);
    assert!(w.quants.len() >= groups * blocks * GROUP_ROWS * w.format.quant_bytes());
    assert!(w.scales.len() >= groups * blocks * GROUP_ROWS);
    assert!(w.format == BlockFormat::Q8_0 || w.mins.len() >= groups * blocks * GROUP_ROWS);
    let task = Task {
        x: XRows {
            quants: xq.quants.as_ptr(),
            scales: xq.scales.as_ptr(),
            sums: xq.sums.as_ptr(),
            level_sums: xq.level_sums.as_ptr(),
            k,
        },
        m,
        w,
        cols,
        n,
        y: y.as_mut_ptr(),
    };
    use BlockFormat::{Q4_1, Q8_0};
    // SAFETY: the reads and writes stay within the slices checked above; the CPU has the
    // features of the kernel `Isa::detect` picked.
    unsafe {
        match (isa, w.format) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Vnni, Q8_0) => x86::q8_0_vnni(task),
            #[cfg(target_arch = "x86_64")]
            (Isa::Vnni, Q4_1) => x86::q4_1_vnni(task),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, Q8_0) => x86::q8_0_avx2(task),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, Q4_1) => x86::q4_1_avx2(task),
            (Isa::Scalar, Q8_0) => task.run::<Scalar<false>>(),
            (Isa::Scalar, Q4_1) => task.run::<Scalar<true>>(),
        }
    }
}

/// One parallel task: columns `cols` of `y` (`[m, n]`).
struct Task<'a> {
    x: XRows,
    m: usize,
    w: QRows<'a>,
    cols: std::ops::Range<usize>,
    n: usize,
    y: *mut f32,
}

/// Consecutive rows of quantised `x`, `k` values each.
#[derive(Clone, Copy)]
struct XRows {
    quants: *const i8,
    scales: *const f32,
    sums: *const f32,
    level_sums: *const i32,
    k: usize,
}

/// One group of [`GROUP_ROWS`] interleaved weight rows (see [`crate::compact::QMatrix`]), and
/// where the group to prefetch starts (past the matrix's end near its last groups: a prefetch
/// never faults, and nothing there is read). `mins` is only read for Q4_1.
#[derive(Clone, Copy)]
struct Group {
    quants: *const u8,
    scales: *const half::f16,
    mins: *const half::f16,
    ahead: *const u8,
}

/// A tile kernel: `MR` rows of `x` against one group of weight rows of format `FORMAT`,
/// `[x row][weight row]`.
trait Tile {
    const FORMAT: BlockFormat;
    /// The most rows of `x` one tile takes: as many as the registers hold accumulators for,
    /// so that each block of weights, loaded (and for Q4_1 unpacked) once, meets them all.
    const MAX_ROWS: usize;
    /// # Safety
    /// `MR` rows of `x` and the group hold `blocks` whole blocks.
    unsafe fn tile<const MR: usize>(x: XRows, w: Group, blocks: usize) -> [[f32; GROUP_ROWS]; MR];
}

impl Task<'_> {
    /// Inlined into each kernel's entry point, so that its tiles inline too.
    ///
    /// # Safety
    /// `cols` starts at a whole group and ends at most at `n`, `y` holds `m * n` values, `x`
    /// `m` rows and `w` `n` rows of `k`.
    #[inline(always)]
    unsafe fn run<T: Tile>(self) {
        let k = self.x.k;
        let blocks = k / BLOCK_VALUES;
        let group_bytes = blocks * GROUP_ROWS * T::FORMAT.quant_bytes();
        let group_scales = blocks * GROUP_ROWS;
        let (wq, ws, wm) = (
            self.w.quants.as_ptr(),
            self.w.scales.as_ptr(),
            self.w.mins.as_ptr(),
        );
        for j in self.cols.clone().step_by(GROUP_ROWS) {
            let g = j / GROUP_ROWS;
            let group = Group {
                quants: wq.add(g * group_bytes),
                scales: ws.add(g * group_scales),
                mins: wm.wrapping_add(g * group_scales),
                ahead: wq.wrapping_add((g + PREFETCH_GROUPS) * group_bytes),
            };
            let width = (self.cols.end - j).min(GROUP_ROWS);
            let mut i = 0;
            while i < self.m {
                let mr = (self.m - i).min(T::MAX_ROWS);
                let x = XRows {
                    quants: self.x.quants.add(i * k),
                    scales: self.x.scales.add(i * blocks),
                    sums: self.x.sums.add(i * blocks),
                    level_sums: self.x.level_sums.add(i * blocks),
                    k,
                };
                let out = self.y.add(i * self.n + j);
                match mr {
                    8 => store(T::tile::<8>(x, group, blocks), out, self.n, width),
                    7 => store(T::tile::<7>(x, group, blocks), out, self.n, width),
                    6 => store(T::tile::<6>(x, group, blocks), out, self.n, width),
                    5 => store(T::tile::<5>(x, group, blocks), out, self.n, width),
                    4 => store(T::tile::<4>(x, group, blocks), out, self.n, width),
                    3 => store(T::tile::<3>(x, group, blocks), out, self.n, width),
                    2 => store(T::tile::<2>(x, group, blocks), out, self.n, width),
                    _ => store(T::tile::<1>(x, group, blocks), out, self.n, width),
                }
                i += mr;
            }
        }
    }
}

/// Writes a tile's sums into consecutive rows of `y` (`n` wide) from `out`: the first `width`
/// of each row's 8 (the rest are a padded group's).
///
/// # Safety
/// `MR` rows of `width` values from `out`, `n` apart, are inside `y`.
#[inline(always)]
unsafe fn store<const MR: usize>(
    sums: [[f32; GROUP_ROWS]; MR],
    out: *mut f32,
    n: usize,
    width: usize,
) {
    for (r, row) in sums.iter().enumerate() {
        std::ptr::copy_nonoverlapping(row.as_ptr(), out.add(r * n), width);
    }
}

/// Plain Rust, for CPUs without AVX2: Q8_0, or Q4_1 when `Q4_1` is true. Sums in the order
/// the vector kernels do, lane by lane.
struct Scalar<const Q4_1: bool>;

impl<const Q4_1: bool> Tile for Scalar<Q4_1> {
    const FORMAT: BlockFormat = if Q4_1 {
        BlockFormat::Q4_1
    } else {
        BlockFormat::Q8_0
    };
    const MAX_ROWS: usize = 4;

    unsafe fn tile<const MR: usize>(x: XRows, w: Group, blocks: usize) -> [[f32; GROUP_ROWS]; MR] {
        let bytes = GROUP_ROWS * Self::FORMAT.quant_bytes();
        let mut out = [[0f32; GROUP_ROWS]; MR];
        for b in 0..blocks {
            let packed = std::slice::from_raw_parts(w.quants.add(b * bytes), bytes);
            for (r, sums) in out.iter_mut().enumerate() {
                let xb = std::slice::from_raw_parts(
                    x.quants.add(r * x.k + b * BLOCK_VALUES),
                    BLOCK_VALUES,
                );
                let dx = *x.scales.add(r * blocks + b);
                for (i, sum) in sums.iter_mut().enumerate() {
                    let dot: i32 = (0..BLOCK_VALUES)
                        .map(|v| {
                            let level = if Q4_1 {
                                let byte = packed[((v / 4) % 4) * 32 + i * 4 + v % 4];
                                (if v < 16 { byte & 0x0F } else { byte >> 4 }) as i32
                            } else {
                                packed[(v / 4) * 32 + i * 4 + v % 4] as i8 as i32
                            };
                            xb[v] as i32 * level
                        })
                        .sum();
                    let d = (*w.scales.add(b * GROUP_ROWS + i)).to_f32();
                    *sum += dot as f32 * (d * dx);
                    if Q4_1 {
                        let min = (*w.mins.add(b * GROUP_ROWS + i)).to_f32();
                        *sum += min * *x.sums.add(r * blocks + b);
                    }
                }
            }
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compact::QMatrix;
    use crate::matmul::test_values as values;
    use candle_core::{Device, Tensor};

    const FORMATS: [BlockFormat; 2] = [BlockFormat::Q8_0, BlockFormat::Q4_1];

    /// Weight `c` of row `j`, in f64, from its block's parts.
    fn weight(w: QRows<'_>, j: usize, c: usize) -> f64 {
        let (d, m) = w.scale_min(j, c / BLOCK_VALUES);
        d as f64 * w.level(j, c) as f64 + m as f64
    }

    /// The product of the quantised values, exactly (in f64), one dot product at a time.
    fn naive(xq: &Activations, m: usize, w: QRows<'_>, n: usize, k: usize) -> Vec<f64> {
        let blocks = k / BLOCK_VALUES;
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|c| {
                        let x = xq.quants[i * k + c] as f64
                            * xq.scales[i * blocks + c / BLOCK_VALUES] as f64;
                        x * weight(w, j, c)
                    })
                    .sum();
            }
        }
        y
    }

    fn weights(n: usize, k: usize, format: BlockFormat) -> QMatrix {
        let w = Tensor::from_vec(values(n * k, 0.4), (n, k), &Device::Cpu).unwrap();
        QMatrix::quantize(&w, format).unwrap()
    }

    #[test]
    fn every_instruction_set_matches_the_naive_product_at_every_shape_edge() {
        // Rows of x around the tiles' 4 and 8, weight rows around a group's 8 (padded groups)
        // and a task's 32.
        for format in FORMATS {
            for &(m, n, k) in &[
                (1, 1, 32),
                (1, 67, 64),
                (3, 33, 96),
                (5, 64, 576),
                (8, 7, 32),
                (9, 16, 64),
                (13, 9, 96),
                (17, 24, 32),
            ] {
                let q = weights(n, k, format);
                let x = values(m * k, 1.1);
                let xq = Activations::quantize(&x);
                let want = naive(&xq, m, q.view(), n, k);
                let mut isas = vec![Isa::Scalar, Isa::detect()];
                #[cfg(target_arch = "x86_64")]
                if crate::matmul::has_avx2_fma() {
                    isas.push(Isa::Avx2);
                }
                for isa in isas {
                    let mut y = vec![0f32; m * n];
                    columns(isa, &xq, m, q.view(), 0..n, n, k, &mut y);
                    for (idx, (g, e)) in y.iter().zip(&want).enumerate() {
                        assert!(
                            (*g as f64 - e).abs() <= 1e-4 * e.abs().max(1.0),
                            "{format:?} {isa:?} [{m}, {n}, {k}] element {idx}: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_and_anywhere_in_a_batch() {
        // 40 rows of 576: the batch's x is quantised on the pool, a lone row's on this thread.
        let (m, n, k) = (40, 70, 576);
        assert!(
            m * k >= crate::matmul::MIN_PARALLEL_VALUES && k < crate::matmul::MIN_PARALLEL_VALUES
        );
        for format in FORMATS {
            let q = weights(n, k, format);
            let batch = values(m * k, 2.5);
            let together = matmul(&batch, m, q.view(), n, k);
            let xq = Activations::quantize(&batch);
            let want = naive(&xq, m, q.view(), n, k);
            for (g, e) in together.iter().zip(&want) {
                assert!((*g as f64 - e).abs() <= 1e-4 * e.abs().max(1.0));
            }
            for i in 0..m {
                let alone = matmul(&batch[i * k..(i + 1) * k], 1, q.view(), n, k);
                assert_eq!(alone, together[i * n..(i + 1) * n], "{format:?} row {i}");
            }
        }
    }

    #[test]
    fn rounding_x_to_q8_0_stays_close_to_the_f32_product() {
        let (m, n, k) = (3, 40, 576);
        for format in FORMATS {
            let q = weights(n, k, format);
            let x = values(m * k, 0.7);
            let got = matmul(&x, m, q.view(), n, k);
            let wide = q.dequantize().unwrap().to_vec2::<f32>().unwrap();
            for i in 0..m {
                for j in 0..n {
                    let exact: f32 = (0..k).map(|c| x[i * k + c] * wide[j][c]).sum();
                    // Each x value moves by at most half a step of its block's scale.
                    let bound: f32 = (0..k)
                        .map(|c| {
                            let block = &x[i * k + c / 32 * 32..][..32];
                            let step = block.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                            0.5 * step * wide[j][c].abs()
                        })
                        .sum();
                    let err = (got[i * n + j] - exact).abs();
                    assert!(
                        err <= bound * 1.01 + 1e-5,
                        "{format:?} {i},{j}: {err} > {bound}"
                    );
                }
            }
        }
    }
}
