//! Bidirectional scaled dot-product attention of one sequence, all heads:
//! `ctx_h = softmax(Q_h K_hᵀ / √d) · V_h`, reading Q, K, V in place from the fused
//! `[len × 3h]` projection. Sequences are packed without padding (see `model::bert`), so no
//! mask is needed: every key a query sees belongs to its own sequence.
//!
//! Sequences are short (≤ 512) and head dims small (32–128), where a GEMM library's packing
//! costs more than the math; so K is transposed once per head and both products are written as
//! AXPYs over contiguous rows, which LLVM vectorises (AVX2 when present).

use super::math::softmax_row;

/// f32 lanes of one AVX2 register.
pub(super) const W: usize = 8;
/// Keys scored together: four independent register accumulators hide the add latency.
pub(super) const KB: usize = 4 * W;

dispatch_avx2! {
    /// `qkv`: `[len × 3h]` (Q | K | V), `out`: `[len × h]`, `heads` heads of width `h / heads`.
    pub fn attention_sequence(qkv: &[f32], len: usize, h: usize, heads: usize, out: &mut [f32]) {
        let dh = h / heads;
        let scale = 1.0 / (dh as f32).sqrt();
        let lp = len.div_ceil(KB) * KB; // keys padded to whole blocks (zeros, scored then dropped)
        // Per-thread working memory, reused: a query's encode allocates nothing here. Nothing
        // below enters the thread pool, so the borrow can never be met again on this thread.
        SCRATCH.with_borrow_mut(|buf| {
        buf.clear();
        buf.resize(dh * lp + len * dh + lp + dh, 0.0);
        let (kt, rest) = buf.split_at_mut(dh * lp);
        let (v, rest) = rest.split_at_mut(len * dh);
        let (scores, q) = rest.split_at_mut(lp);
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
                qk_scores(q, kt, lp, scores);
                let p = &mut scores[..len];
                softmax_row(p);
                let o = &mut out[i * h + hd * dh..i * h + (hd + 1) * dh];
                match dh {
                    32 => weighted_sum::<4>(p, v, o),
                    64 => weighted_sum::<8>(p, v, o),
                    128 => weighted_sum::<16>(p, v, o),
                    _ => weighted_sum_any(p, v, o),
                }
            }
        }
        });
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `scores[j] = q · k_j` for all padded keys, from `kt` = Kᵀ (`[dh × lp]`), one block of `KB`
/// keys at a time with its accumulators held in registers across the whole `d` loop.
#[inline(always)]
pub(super) fn qk_scores(q: &[f32], kt: &[f32], lp: usize, scores: &mut [f32]) {
    for (jb, s) in scores.chunks_exact_mut(KB).enumerate() {
        let mut acc = [0.0f32; KB];
        for (d, &qd) in q.iter().enumerate() {
            let kr: &[f32; KB] = kt[d * lp + jb * KB..d * lp + (jb + 1) * KB]
                .try_into()
                .unwrap();
            for l in 0..KB {
                acc[l] += qd * kr[l];
            }
        }
        s.copy_from_slice(&acc);
    }
}

/// `o = Σ_j p_j · v_j` for head width `C·W`, the output held in `C` registers.
#[inline(always)]
pub(super) fn weighted_sum<const C: usize>(p: &[f32], v: &[f32], o: &mut [f32]) {
    let mut acc = [[0.0f32; W]; C];
    for (j, &pj) in p.iter().enumerate() {
        let vr = &v[j * C * W..(j + 1) * C * W];
        for c in 0..C {
            let vc: &[f32; W] = vr[c * W..(c + 1) * W].try_into().unwrap();
            for l in 0..W {
                acc[c][l] += pj * vc[l];
            }
        }
    }
    for c in 0..C {
        o[c * W..(c + 1) * W].copy_from_slice(&acc[c]);
    }
}

/// Any head width (the general, slower path).
#[inline(always)]
pub(super) fn weighted_sum_any(p: &[f32], v: &[f32], o: &mut [f32]) {
    let dh = o.len();
    o.fill(0.0);
    for (j, &pj) in p.iter().enumerate() {
        for (ov, vv) in o.iter_mut().zip(&v[j * dh..(j + 1) * dh]) {
            *ov += pj * vv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_f64() {
        // head widths 4 (general path), 32 and 64 (register paths); lengths around a key block
        for (len, h, heads) in [(7, 12, 3), (33, 64, 2), (70, 128, 2)] {
            check(len, h, heads);
        }
    }

    fn check(len: usize, h: usize, heads: usize) {
        let dh = h / heads;
        let qkv: Vec<f32> = (0..len * 3 * h)
            .map(|i| ((i * 37 % 29) as f32 - 14.0) / 9.0)
            .collect();
        let mut out = vec![0.0f32; len * h];
        attention_sequence(&qkv, len, h, heads, &mut out);
        for hd in 0..heads {
            for i in 0..len {
                let at = |r: usize, part: usize, d: usize| {
                    qkv[r * 3 * h + part * h + hd * dh + d] as f64
                };
                let s: Vec<f64> = (0..len)
                    .map(|j| {
                        (0..dh).map(|d| at(i, 0, d) * at(j, 1, d)).sum::<f64>() / (dh as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for d in 0..dh {
                    let want: f64 = (0..len).map(|j| (s[j] - m).exp() / z * at(j, 2, d)).sum();
                    let got = out[i * h + hd * dh + d] as f64;
                    // f32 sums of ≤ 128 terms of magnitude ≤ 2 with a softmax: well inside 1e-5.
                    assert!(
                        (got - want).abs() < 1e-5,
                        "{got} vs {want} (len {len}, h {h})"
                    );
                }
            }
        }
    }
}
