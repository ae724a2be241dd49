//! `y = x W^T` for a Q8_0 `W`, with integer dot products.
//!
//! The rows of `x` are rounded to Q8_0 blocks too (scales kept in f32), and each pair of
//! blocks is multiplied with 8-bit dot products, then scaled by the product of the two blocks'
//! scales in f32: AVX-512 VNNI's `vpdpbusd` where the CPU has it (the weights offset to
//! unsigned, the offset taken back out of each lane's starting value), AVX2's `vpmaddubsw`
//! otherwise (`x` gives its magnitudes, the weights take `x`'s signs). This is what llama.cpp
//! does: the weights are read as bytes, and the arithmetic runs 32 multiply-adds an
//! instruction.
//!
//! Every output element is summed in the same order however many rows `x` has and wherever a
//! row sits among them, so a sequence decoded in a batch gets bit for bit the logits it gets
//! alone.

use crate::compact::{quantize_q8_0, Q8Rows, Q8_0_BLOCK};

/// How many groups of weight rows ahead of the one being multiplied the kernels prefetch. The
/// hardware prefetcher alone kept a thread at a third of the bandwidth a plain streaming read
/// reaches here; asking for the rows a few groups ahead gets most of it.
const PREFETCH_GROUPS: usize = 2;

/// Rows of `x` rounded to Q8_0: `quants` row-major, one f32 scale per block.
struct Activations {
    quants: Vec<i8>,
    scales: Vec<f32>,
}

impl Activations {
    /// Rounds `x` (whole blocks) to Q8_0, in chunks of blocks spread over candle's pool when
    /// `x` is large (prefill, a batched decode step's down projection).
    fn quantize(x: &[f32]) -> Self {
        let blocks = x.len() / Q8_0_BLOCK;
        let mut quants = vec![0i8; x.len()];
        let mut scales = vec![0f32; blocks];
        let q_ptr = crate::matmul::OutPtr(quants.as_mut_ptr());
        let s_ptr = crate::matmul::OutPtr(scales.as_mut_ptr());
        let chunks = blocks.div_ceil(BLOCKS_PER_QUANTIZE_TASK);
        crate::matmul::chunked(chunks, x.len(), |range| {
            for chunk in range {
                let b0 = chunk * BLOCKS_PER_QUANTIZE_TASK;
                let n = BLOCKS_PER_QUANTIZE_TASK.min(blocks - b0);
                let values = n * Q8_0_BLOCK;
                // SAFETY: each chunk writes only its own blocks of `quants` and `scales`, which
                // outlive the loop.
                let (q, s) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(q_ptr.get().add(b0 * Q8_0_BLOCK), values),
                        std::slice::from_raw_parts_mut(s_ptr.get().add(b0), n),
                    )
                };
                quantize_q8_0(&x[b0 * Q8_0_BLOCK..][..values], q, s, |d| d);
            }
        });
        Self { quants, scales }
    }
}

/// Blocks of `x` quantised per parallel task.
const BLOCKS_PER_QUANTIZE_TASK: usize = 64;

/// `y[i, j] = sum_k x[i, k] * w[j, k]` with `x` rounded to Q8_0: `x` is `[m, k]` in f32, `w`
/// is `[n, k]` in Q8_0 blocks (`k` a multiple of 32); returns `y` as `[m, n]`.
pub fn matmul(x: &[f32], m: usize, w: Q8Rows<'_>, n: usize, k: usize) -> Vec<f32> {
    assert!(
        k.is_multiple_of(Q8_0_BLOCK),
        "k = {k} is not whole Q8_0 blocks"
    );
    assert_eq!(x.len(), m * k, "x is not [{m}, {k}]");
    assert_eq!(w.quants.len(), n * k, "w is not [{n}, {k}]");
    assert_eq!(
        w.scales.len(),
        n * k / Q8_0_BLOCK,
        "w's scales are not [{n}, {k} / 32]"
    );
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
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
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

/// Columns `cols` of `y`: two weight rows at a time, against groups of up to four rows of `x`.
#[allow(clippy::too_many_arguments)]
fn columns(
    isa: Isa,
    xq: &Activations,
    m: usize,
    w: Q8Rows<'_>,
    cols: std::ops::Range<usize>,
    n: usize,
    k: usize,
    y: &mut [f32],
) {
    let blocks = k / Q8_0_BLOCK;
    // What every tile below reads and writes lies within these.
    assert!(cols.end <= n && y.len() >= m * n);
    assert!(xq.quants.len() >= m * k && xq.scales.len() >= m * blocks);
    assert!(w.quants.len() >= n * k && w.scales.len() >= n * blocks);
    let task = Task {
        x: XRows {
            quants: xq.quants.as_ptr(),
            scales: xq.scales.as_ptr(),
            k,
        },
        m,
        w,
        cols,
        n,
        y: y.as_mut_ptr(),
    };
    // SAFETY: the reads and writes stay within the slices checked above; the CPU has the
    // features of the kernel `Isa::detect` picked.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Vnni if m < 4 => x86::columns_vnni_pairs(task),
            #[cfg(target_arch = "x86_64")]
            Isa::Vnni => x86::columns_vnni(task),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::columns_avx2(task),
            Isa::Scalar => task.run::<Scalar, 2>(),
        }
    }
}

/// One parallel task: columns `cols` of `y` (`[m, n]`).
struct Task<'a> {
    x: XRows,
    m: usize,
    w: Q8Rows<'a>,
    cols: std::ops::Range<usize>,
    n: usize,
    y: *mut f32,
}

/// Consecutive rows of quantised `x`, `k` values each.
#[derive(Clone, Copy)]
struct XRows {
    quants: *const i8,
    scales: *const f32,
    k: usize,
}

/// `NR` consecutive weight rows, and where the rows to prefetch start (past the matrix's end
/// near its last rows: a prefetch never faults, and nothing there is read).
#[derive(Clone, Copy)]
struct WeightRows<const NR: usize> {
    quants: [*const i8; NR],
    scales: [*const f32; NR],
    ahead: *const i8,
}

/// A tile kernel: `MR` rows of `x` against `NR` weight rows, `[row][weight]`.
trait Tile<const NR: usize> {
    /// # Safety
    /// `MR` rows of `x` and the `NR` weight rows hold `blocks` whole blocks.
    unsafe fn tile<const MR: usize>(x: XRows, w: WeightRows<NR>, blocks: usize) -> [[f32; NR]; MR];
}

impl Task<'_> {
    /// Inlined into each instruction set's entry point, so that its tiles inline too.
    ///
    /// # Safety
    /// `cols.end <= n`, `y` holds `m * n` values, `x` `m` rows and `w` `n` rows of `k`.
    #[inline(always)]
    unsafe fn run<T: Tile<NR>, const NR: usize>(self) {
        let k = self.x.k;
        let blocks = k / Q8_0_BLOCK;
        let (wq, ws) = (self.w.quants.as_ptr(), self.w.scales.as_ptr());
        for j in self.cols.clone().step_by(NR) {
            // Past the last row the group repeats it; those results are dropped.
            let rows: [usize; NR] = std::array::from_fn(|s| (j + s).min(self.cols.end - 1));
            let group = WeightRows {
                quants: rows.map(|r| wq.add(r * k)),
                scales: rows.map(|r| ws.add(r * blocks)),
                ahead: wq.wrapping_add((j + NR * PREFETCH_GROUPS) * k),
            };
            let mut i = 0;
            while i < self.m {
                let mr = (self.m - i).min(4);
                let x = XRows {
                    quants: self.x.quants.add(i * k),
                    scales: self.x.scales.add(i * blocks),
                    k,
                };
                let out = self.y.add(i * self.n);
                match mr {
                    4 => store(T::tile::<4>(x, group, blocks), out, self.n, rows),
                    3 => store(T::tile::<3>(x, group, blocks), out, self.n, rows),
                    2 => store(T::tile::<2>(x, group, blocks), out, self.n, rows),
                    _ => store(T::tile::<1>(x, group, blocks), out, self.n, rows),
                }
                i += mr;
            }
        }
    }
}

/// Writes a tile's sums into consecutive rows of `y` (`n` wide) from `out`, at columns `cols`
/// (a repeat of the previous column is dropped).
///
/// # Safety
/// `MR` rows of `n` values from `out` are inside `y`; every column is below `n`.
#[inline(always)]
unsafe fn store<const MR: usize, const NR: usize>(
    sums: [[f32; NR]; MR],
    out: *mut f32,
    n: usize,
    cols: [usize; NR],
) {
    for (r, row) in sums.iter().enumerate() {
        for (s, &v) in row.iter().enumerate() {
            if s == 0 || cols[s] > cols[s - 1] {
                *out.add(r * n + cols[s]) = v;
            }
        }
    }
}

/// Plain Rust, for CPUs without AVX2.
struct Scalar;

impl Tile<2> for Scalar {
    unsafe fn tile<const MR: usize>(x: XRows, w: WeightRows<2>, blocks: usize) -> [[f32; 2]; MR] {
        let mut out = [[0f32; 2]; MR];
        for (r, sums) in out.iter_mut().enumerate() {
            for (s, sum) in sums.iter_mut().enumerate() {
                for b in 0..blocks {
                    let xb = std::slice::from_raw_parts(
                        x.quants.add(r * x.k + b * Q8_0_BLOCK),
                        Q8_0_BLOCK,
                    );
                    let wb =
                        std::slice::from_raw_parts(w.quants[s].add(b * Q8_0_BLOCK), Q8_0_BLOCK);
                    let dot: i32 = xb.iter().zip(wb).map(|(&a, &c)| a as i32 * c as i32).sum();
                    *sum += dot as f32 * (*w.scales[s].add(b) * *x.scales.add(r * blocks + b));
                }
            }
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Task, Tile, WeightRows, XRows, Q8_0_BLOCK};
    use crate::matmul::avx2::sum8;
    use std::arch::x86_64::*;

    /// An instruction set's tile and entry point. Per block, `$prepare(x)` turns a block of x
    /// into what `$dot(prepared, w)` takes with a block of weights; `$dot` gives eight lanes
    /// of sums of four products each.
    macro_rules! kernel {
        (
            $isa:ident, $entry:ident, $features:literal, $nr:literal,
            prepare = |$x:ident| $prepare:expr,
            weight = |$w:ident| $weight:expr,
            dot = |$px:ident, $pw:ident| $dot:expr
        ) => {
            pub struct $isa;

            /// # Safety
            /// As [`Task::run`]; the CPU has the features.
            #[target_feature(enable = $features)]
            pub unsafe fn $entry(task: Task<'_>) {
                task.run::<$isa, $nr>()
            }

            impl Tile<$nr> for $isa {
                #[target_feature(enable = $features)]
                unsafe fn tile<const MR: usize>(
                    x: XRows,
                    w: WeightRows<$nr>,
                    blocks: usize,
                ) -> [[f32; $nr]; MR] {
                    let mut acc = [[_mm256_setzero_ps(); $nr]; MR];
                    for b in 0..blocks {
                        let off = b * Q8_0_BLOCK;
                        // The group PREFETCH_GROUPS ahead is NR k bytes, read while this one's
                        // k: NR / 2 cache lines a block.
                        for line in 0..$nr / 2 {
                            let at = w.ahead.wrapping_add($nr * off + 64 * line);
                            _mm_prefetch::<_MM_HINT_T0>(at);
                        }
                        let wv: [__m256i; $nr] = std::array::from_fn(|s| {
                            let $w = _mm256_loadu_si256(w.quants[s].add(off) as *const __m256i);
                            $weight
                        });
                        let dw: [__m256; $nr] =
                            std::array::from_fn(|s| _mm256_set1_ps(*w.scales[s].add(b)));
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let $x =
                                _mm256_loadu_si256(x.quants.add(r * x.k + off) as *const __m256i);
                            let $px = $prepare;
                            let dx = _mm256_set1_ps(*x.scales.add(r * blocks + b));
                            for s in 0..$nr {
                                let $pw = wv[s];
                                let dot: __m256i = $dot;
                                let scale = _mm256_mul_ps(dw[s], dx);
                                acc[s] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[s]);
                            }
                        }
                    }
                    let mut out = [[0f32; $nr]; MR];
                    for (o, a) in out.iter_mut().zip(&acc) {
                        for (o, &v) in o.iter_mut().zip(a) {
                            *o = sum8(v);
                        }
                    }
                    out
                }
            }
        };
    }

    // VNNI multiplies unsigned by signed bytes: the weights go in offset by 128 (a flip of the
    // top bit), and each lane's accumulator starts at minus 128 times its four x values, so
    // the sum comes out exact with no sign fix-up per pair (32 registers: 4 x 4 tiles fit).
    macro_rules! vnni {
        ($isa:ident, $entry:ident, $nr:literal) => {
            kernel!(
                $isa,
                $entry,
                "avx2,fma,avx512f,avx512vl,avx512vnni",
                $nr,
                prepare = |xv| (
                    xv,
                    _mm256_sub_epi32(
                        _mm256_setzero_si256(),
                        _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(-128), xv)
                    )
                ),
                weight = |wv| _mm256_xor_si256(wv, _mm256_set1_epi8(-128)),
                dot = |px, wu| _mm256_dpbusd_epi32(px.1, wu, px.0)
            );
        };
    }
    vnni!(Vnni, columns_vnni, 4);
    // A lone row (decoding one sequence) streams the weights faster two rows at a time.
    vnni!(VnniPairs, columns_vnni_pairs, 2);
    // AVX2's `vpmaddubsw` saturates at 16 bits, which offset weights would overflow: x gives
    // its magnitudes and each weight takes x's sign instead.
    kernel!(
        Avx2,
        columns_avx2,
        "avx2,fma",
        2,
        prepare = |xv| (_mm256_sign_epi8(xv, xv), xv),
        weight = |wv| wv,
        dot = |px, wv| _mm256_madd_epi16(
            _mm256_maddubs_epi16(px.0, _mm256_sign_epi8(wv, px.1)),
            _mm256_set1_epi16(1)
        )
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compact::Q8Matrix;
    use candle_core::{Device, Tensor};

    fn values(len: usize, salt: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 * 0.618 + salt).sin() * 1000.0).fract())
            .collect()
    }

    /// The product of the quantised values, exactly (in f64), one dot product at a time.
    fn naive(xq: &Activations, m: usize, w: Q8Rows<'_>, n: usize, k: usize) -> Vec<f64> {
        let blocks = k / Q8_0_BLOCK;
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|c| {
                        let (b, bi) = (c / Q8_0_BLOCK, i * blocks + c / Q8_0_BLOCK);
                        (xq.quants[i * k + c] as f64 * xq.scales[bi] as f64)
                            * (w.quants[j * k + c] as f64 * w.scales[j * blocks + b] as f64)
                    })
                    .sum();
            }
        }
        y
    }

    fn weights(n: usize, k: usize) -> Q8Matrix {
        let w = Tensor::from_vec(values(n * k, 0.4), (n, k), &Device::Cpu).unwrap();
        Q8Matrix::quantize(&w).unwrap()
    }

    #[test]
    fn every_instruction_set_matches_the_naive_product_at_every_shape_edge() {
        // Rows of x around the tile's 4 (and the 2-row kernel below 4), weight rows around
        // groups of 2 and 4 and a task's 32.
        for &(m, n, k) in &[
            (1, 1, 32),
            (1, 67, 64),
            (3, 33, 96),
            (5, 64, 576),
            (8, 7, 32),
        ] {
            let q = weights(n, k);
            let x = values(m * k, 1.1);
            let xq = Activations::quantize(&x);
            let want = naive(&xq, m, q.view(), n, k);
            let mut isas = vec![Isa::Scalar, Isa::detect()];
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                isas.push(Isa::Avx2);
            }
            for isa in isas {
                let mut y = vec![0f32; m * n];
                columns(isa, &xq, m, q.view(), 0..n, n, k, &mut y);
                for (idx, (g, e)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - e).abs() <= 1e-4 * e.abs().max(1.0),
                        "{isa:?} [{m}, {n}, {k}] element {idx}: {g} vs {e}"
                    );
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
        let q = weights(n, k);
        let batch = values(m * k, 2.5);
        let together = matmul(&batch, m, q.view(), n, k);
        let xq = Activations::quantize(&batch);
        let want = naive(&xq, m, q.view(), n, k);
        for (g, e) in together.iter().zip(&want) {
            assert!((*g as f64 - e).abs() <= 1e-4 * e.abs().max(1.0));
        }
        for i in 0..m {
            let alone = matmul(&batch[i * k..(i + 1) * k], 1, q.view(), n, k);
            assert_eq!(alone, together[i * n..(i + 1) * n], "row {i}");
        }
    }

    #[test]
    fn rounding_x_to_q8_0_stays_close_to_the_f32_product() {
        let (m, n, k) = (3, 40, 576);
        let q = weights(n, k);
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
                assert!(err <= bound * 1.01 + 1e-5, "{i},{j}: {err} > {bound}");
            }
        }
    }
}
