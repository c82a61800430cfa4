//! Element-wise and row-wise ops of the encoder: exact (erf) GELU, LayerNorm, softmax,
//! L2 normalisation. Plain loops written so LLVM vectorises them; the hot ones are compiled twice
//! (baseline and AVX2) and picked at run time, with the same arithmetic in both so results agree.

use rayon::prelude::*;

/// erf(x) for f32 as a rational function on [-4, 4] (odd degree-13 numerator over even degree-8
/// denominator, the form XLA and Eigen use); beyond ±4 erf is ±1 in f32. No exp and no branch,
/// so it vectorises. Max absolute error ≈ 1e-7, measured against f64 erf in the tests.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_600_1e-3;
    p = p * x2 + -1.609_603_3e-2;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329_3e-3;
    q = q * x2 + -1.426_474e-2;
    x * p / q
}

/// GELU with the exact erf form used by BERT: `0.5·x·(1 + erf(x/√2))`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

dispatch_avx2! {
    /// Bias-free in-place GELU over a slice (the bias was added by the GEMM), on the calling
    /// thread.
    pub fn gelu_serial(xs: &mut [f32]) {
        for x in xs.iter_mut() {
            *x = gelu(*x);
        }
    }
}

/// In-place GELU, parallel over large slices.
pub fn gelu_inplace(xs: &mut [f32]) {
    xs.par_chunks_mut(1 << 14).for_each(gelu_serial);
}

dispatch_avx2! {
    /// `x ← LayerNorm(x + r)` over one row (two-pass mean/variance in f32, as PyTorch computes).
    fn add_layernorm_row(x: &mut [f32], r: Option<&[f32]>, gamma: &[f32], beta: &[f32], eps: f32) {
        if let Some(r) = r {
            for (a, b) in x.iter_mut().zip(r) {
                *a += *b;
            }
        }
        let n = x.len() as f32;
        let mean = sum_lanes(x) / n;
        let mut sq = [0.0f32; 8];
        let chunks = x.chunks_exact(8);
        let tail: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
        for c in chunks {
            for l in 0..8 {
                sq[l] += (c[l] - mean) * (c[l] - mean);
            }
        }
        let var = (sq.iter().sum::<f32>() + tail) / n;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, g), b) in x.iter_mut().zip(gamma).zip(beta) {
            *v = (*v - mean) * inv * g + b;
        }
    }
}

/// Row-wise `x ← LayerNorm(x + residual)` over a `[rows × cols]` matrix, parallel over rows.
pub fn add_layernorm(
    x: &mut [f32],
    residual: Option<&[f32]>,
    cols: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    match residual {
        Some(r) => x
            .par_chunks_mut(cols)
            .zip(r.par_chunks(cols))
            .with_min_len(32)
            .for_each(|(row, r)| add_layernorm_row(row, Some(r), gamma, beta, eps)),
        None => x
            .par_chunks_mut(cols)
            .with_min_len(32)
            .for_each(|row| add_layernorm_row(row, None, gamma, beta, eps)),
    }
}

/// exp(x) for f32 without a libm call, so loops over it vectorise: round-to-nearest range
/// reduction x = n·ln2 + r (|r| ≤ ln2/2, ln2 split in two for exactness), a degree-6 polynomial
/// for e^r (the Cephes expf coefficients), and 2^n built in the exponent bits. Relative error
/// ≈ 2e-7 (tested against f64); inputs below -87.3 give 0, so -inf (a masked score) gives 0.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer
    let xc = x.clamp(-87.3, 88.7);
    let n = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // n as an integer without a float→int cast (Rust's saturating cast does not vectorise):
    // the low mantissa bits of n + 1.5·2^23 hold n in two's complement.
    let ni = (n + ROUND).to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(ni.wrapping_add(127) << 23);
    if x < -87.3 {
        0.0
    } else {
        y * scale
    }
}

/// Sum in 8 interleaved lanes, then the lanes in order: a fixed order (so deterministic) that
/// vectorises, where a single running f32 sum would be a serial dependency chain.
#[inline(always)]
pub fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Maximum in 8 interleaved lanes (see [`sum_lanes`]); -inf for an empty slice.
#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for l in 0..8 {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// In-place softmax of one row. Entries equal to -inf get probability 0.
#[inline(always)]
pub fn softmax_row(x: &mut [f32]) {
    let max = max_lanes(x);
    for v in x.iter_mut() {
        *v = exp(*v - max);
    }
    let sum = sum_lanes(x);
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Scales a vector to unit L2 norm (a zero vector stays zero, as torch's normalize with eps does).
pub fn l2_normalize(x: &mut [f32]) {
    let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
    let inv = 1.0 / norm.max(1e-12);
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_f64_reference() {
        let mut worst = 0.0f64;
        let mut x = -6.0f32;
        while x <= 6.0 {
            let err = (erf(x) as f64 - libm::erf(x as f64)).abs();
            worst = worst.max(err);
            x += 1.0 / 1024.0;
        }
        // f32 has ~6e-8 resolution near 1; a few ulps is as exact as libm's erff.
        assert!(worst < 5e-7, "worst abs error {worst}");
    }

    #[test]
    fn exp_matches_f64_reference() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64 - want) / want).abs());
            x += 1.0 / 64.0;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
    }

    #[test]
    fn gelu_dispatch_matches_scalar() {
        let mut xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 50.0).collect();
        let want: Vec<f32> = xs
            .iter()
            .map(|&x| (0.5 * x as f64 * (1.0 + libm::erf(x as f64 / 2f64.sqrt()))) as f32)
            .collect();
        gelu_inplace(&mut xs);
        for (a, b) in xs.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn layernorm_unit_stats() {
        let mut x: Vec<f32> = (0..64).map(|i| (i as f32).sin() * 3.0 + 1.0).collect();
        let g = vec![1.0; 64];
        let b = vec![0.0; 64];
        add_layernorm(&mut x, None, 64, &g, &b, 1e-12);
        let mean: f32 = x.iter().sum::<f32>() / 64.0;
        let var: f32 = x.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 64.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5);
    }

    #[test]
    fn softmax_masks_neg_inf() {
        let mut x = vec![1.0, f32::NEG_INFINITY, 2.0];
        softmax_row(&mut x);
        assert_eq!(x[1], 0.0);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
