//! Elementwise math that vectorises: an exponential that is plain arithmetic ([`exp_f32`], also
//! the training kernels' one), and the exponentials of a row relative to its largest value
//! ([`exp_from_max`], the numerators of a softmax), compiled for AVX2+FMA when the CPU has it.

use multiversion::multiversion;

/// `e^x` in f32 without branches or calls, so that loops over it vectorise: `x = n ln2 + r`
/// with `n` rounded to nearest (the 1.5 * 2^23 trick) and `ln2` split in two (Cody-Waite), a
/// degree-7 polynomial for `e^r` on `|r| <= ln2/2` (the Cephes `expf` coefficients), and
/// `2^n` built in the exponent bits. Relative error below 2e-7 over the normal range; NaN stays
/// NaN, arguments above 88.7 give infinity and below -87.3 the smallest normal number.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = if x < -87.336_55 { -87.336_55 } else { x };
    let x = if x > 88.722_84 { 88.722_84 } else { x };
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // The low mantissa bits of `shifted` hold n + 2^22; move n + 127 into the exponent field.
    let n_bits = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let two_n = f32::from_bits((n_bits.wrapping_add(127) as u32).wrapping_shl(23));
    e * two_n
}

/// Independent partial maxima and sums: 8 f32 fill one AVX2 register, and a single running
/// sum would be a dependency chain no compiler may reorder.
const LANES: usize = 8;

/// Arguments below this give 0 instead of [`exp_f32`]'s smallest normal number, so that a
/// token far below the largest logit (or at -inf) gets no probability at all.
const EXP_UNDERFLOW: f32 = -87.0;

/// Fills `out` with `e^((x[i] - max) * scale)`, `max` the largest non-NaN value of `x`, and
/// returns their sum (in lane order, then the lanes and the tail: a fixed order). A NaN in `x`
/// makes the sum NaN; a row of -inf gives NaN too (no largest value to measure from).
#[multiversion(targets("x86_64+avx2+fma"))]
pub fn exp_from_max(x: &[f32], scale: f32, out: &mut Vec<f32>) -> f32 {
    let mut maxima = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail_max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for chunk in chunks {
        for l in 0..LANES {
            maxima[l] = maxima[l].max(chunk[l]);
        }
    }
    let max = maxima.iter().fold(tail_max, |m, &v| m.max(v));
    let term = |v: f32| {
        let a = (v - max) * scale;
        let e = exp_f32(a);
        if a < EXP_UNDERFLOW {
            0.0
        } else {
            e
        }
    };
    // Only a longer row than last time pays for zeroing: every value is written below.
    out.truncate(x.len());
    out.resize(x.len(), 0.0);
    let mut sums = [0f32; LANES];
    let full = x.len() - x.len() % LANES;
    for (o, v) in out[..full]
        .chunks_exact_mut(LANES)
        .zip(x[..full].chunks_exact(LANES))
    {
        for l in 0..LANES {
            o[l] = term(v[l]);
            sums[l] += o[l];
        }
    }
    let mut total = 0f32;
    for (o, &v) in out[full..].iter_mut().zip(&x[full..]) {
        *o = term(v);
        total += *o;
    }
    sums.iter().fold(total, |s, &v| s + v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn exponentials_from_the_maximum_match_the_definition() {
        let mut rng = StdRng::seed_from_u64(5);
        for len in [0usize, 1, 7, 8, 9, 100, 4099] {
            let x: Vec<f32> = (0..len).map(|_| rng.random_range(-40.0..40.0)).collect();
            for scale in [0.5f32, 1.0, 1.0 / 0.7, 30.0] {
                let mut out = vec![1.0; 3];
                let total = exp_from_max(&x, scale, &mut out);
                assert_eq!(out.len(), len);
                let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                let mut want_total = 0f64;
                for (&v, &o) in x.iter().zip(&out) {
                    let a = (v as f64 - max) * scale as f64;
                    let want = a.exp();
                    want_total += want;
                    // The argument is rounded to f32 first: its error, up to |a| ulps, shows
                    // as a relative error of the result.
                    let tolerance = 1e-6 + a.abs() * 2.0 * f32::EPSILON as f64;
                    if want < 1e-37 {
                        assert!(o == 0.0 || (o as f64 - want).abs() < 1e-37, "{o} vs {want}");
                    } else {
                        assert!((o as f64 / want - 1.0).abs() < tolerance, "{o} vs {want}");
                    }
                }
                assert!((total as f64 - want_total).abs() <= 1e-5 * want_total.max(1e-30));
            }
        }
        let mut out = Vec::new();
        let total = exp_from_max(&[1.0, f32::NEG_INFINITY, 3.0], 1.0, &mut out);
        assert_eq!(out[1], 0.0);
        assert_eq!(out[2], 1.0);
        assert!((total - (1.0 + (-2f32).exp())).abs() < 1e-6);
        assert!(exp_from_max(&[1.0, f32::NAN], 1.0, &mut out).is_nan());
        assert!(exp_from_max(&[f32::NEG_INFINITY; 2], 1.0, &mut out).is_nan());
    }
}
