//! Bidirectional scaled dot-product attention of one sequence, all heads:
//! `ctx_h = softmax(Q_h K_hᵀ / √d) · V_h`, reading Q, K, V in place from the fused
//! `[len × 3h]` projection. Sequences are packed without padding (see `model::bert`), so no
//! mask is needed: every key a query sees belongs to its own sequence.
//!
//! Sequences are short (≤ 512) and head dims small (32–128), where a GEMM library's packing
//! costs more than the math; so K is transposed once per head and both products are written as
//! AXPYs over contiguous rows, which LLVM vectorises (AVX2 when present).

use super::math::softmax_row;

dispatch_avx2! {
    /// `qkv`: `[len × 3h]` (Q | K | V), `out`: `[len × h]`, `heads` heads of width `h / heads`.
    pub fn attention_sequence(qkv: &[f32], len: usize, h: usize, heads: usize, out: &mut [f32]) {
        const W: usize = 8; // one AVX2 register of f32
        let dh = h / heads;
        let scale = 1.0 / (dh as f32).sqrt();
        let lp = len.div_ceil(W) * W; // keys padded to whole registers (zeros, scored then dropped)
        let mut kt = vec![0.0f32; dh * lp];
        let mut v = vec![0.0f32; len * dh];
        let mut scores = vec![0.0f32; lp];
        let mut q = vec![0.0f32; dh];
        for hd in 0..heads {
            for j in 0..len {
                let row = &qkv[j * 3 * h..(j + 1) * 3 * h];
                let k = &row[h + hd * dh..h + (hd + 1) * dh];
                for d in 0..dh {
                    kt[d * lp + j] = k[d];
                }
                v[j * dh..(j + 1) * dh].copy_from_slice(&row[2 * h + hd * dh..2 * h + (hd + 1) * dh]);
            }
            for i in 0..len {
                for (qd, x) in q.iter_mut().zip(&qkv[i * 3 * h + hd * dh..i * 3 * h + (hd + 1) * dh]) {
                    *qd = x * scale;
                }
                // scores[j] = q · k_j, W keys at a time with the accumulator held in a register.
                for (jc, s) in scores.chunks_exact_mut(W).enumerate() {
                    let mut acc = [0.0f32; W];
                    for (d, &qd) in q.iter().enumerate() {
                        let kr = &kt[d * lp + jc * W..d * lp + jc * W + W];
                        for l in 0..W {
                            acc[l] += qd * kr[l];
                        }
                    }
                    s.copy_from_slice(&acc);
                }
                let p = &mut scores[..len];
                softmax_row(p);
                // ctx_i = Σ_j p_j v_j, 32 output lanes at a time held in registers.
                let o = &mut out[i * h + hd * dh..i * h + (hd + 1) * dh];
                for (dc, oc) in o.chunks_mut(32).enumerate() {
                    let mut acc = [0.0f32; 32];
                    let w = oc.len();
                    for (j, &pj) in p.iter().enumerate() {
                        let vr = &v[j * dh + dc * 32..j * dh + dc * 32 + w];
                        for (a, b) in acc.iter_mut().zip(vr) {
                            *a += pj * b;
                        }
                    }
                    oc.copy_from_slice(&acc[..w]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_f64() {
        let (len, h, heads) = (7, 12, 3);
        let dh = h / heads;
        let qkv: Vec<f32> = (0..len * 3 * h).map(|i| ((i * 37 % 29) as f32 - 14.0) / 9.0).collect();
        let mut out = vec![0.0f32; len * h];
        attention_sequence(&qkv, len, h, heads, &mut out);
        for hd in 0..heads {
            for i in 0..len {
                let at = |r: usize, part: usize, d: usize| qkv[r * 3 * h + part * h + hd * dh + d] as f64;
                let s: Vec<f64> = (0..len)
                    .map(|j| (0..dh).map(|d| at(i, 0, d) * at(j, 1, d)).sum::<f64>() / (dh as f64).sqrt())
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for d in 0..dh {
                    let want: f64 = (0..len).map(|j| (s[j] - m).exp() / z * at(j, 2, d)).sum();
                    let got = out[i * h + hd * dh + d] as f64;
                    // f32 sums of ≤ 7 terms of magnitude ≤ 2: well inside 1e-5.
                    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
                }
            }
        }
    }
}
