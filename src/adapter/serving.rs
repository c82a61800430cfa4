//! The adapter on the serving path: one query's k candidates (k ≈ 100) scored with weights
//! prepared once per adapter ([`ServingWeights`]) and working memory reused across calls
//! ([`AdapterScratch`]). Same function as [`super::scoring::score`], organised for latency.
//!
//! Per query it forms `u_q = (W1a + W1c)·q + b1` and `M_q = (W1c − W1a) + W1b·diag(q)` (see the
//! fused algebra in [`super::scoring`]), so a pair costs h·d multiply-adds for the first layer
//! and h·d for `W2·g`. Two parallel phases:
//! 1. **over hidden units**, in panels of [`PANEL`]: each task forms `u_q` and `M_qᵀ` for its
//!    panels from the pre-packed `(W1c − W1a)ᵀ` and `W1bᵀ` (each weight read once per query,
//!    by one thread), and applies each panel to all k candidates while it is in L1/L2;
//! 2. **over candidates**: the GELU, `a = c + W2·g + b2` against pre-packed `W2ᵀ` panels, then
//!    the geometry (cosines, alpha) and the logit, per pair.
//!
//! Both products run on [`panel_product`], whose elements are each one FMA chain in a fixed
//! order: the logits do not depend on the thread count or the CPU's vector width. The sums are
//! associated differently from [`super::scoring::score`]'s, so the two agree to fp32 rounding
//! (~1e-6 relative), not bit for bit.

use rayon::prelude::*;

use super::scoring::{check_contexts, check_inputs, pair_stats, sum_diff};
use super::AdapterParams;
use crate::cpu::gemm::linear_serial;
use crate::cpu::math::gelu_serial;
use crate::cpu::panel_gemm::{pack_panels, panel_product, SharedOut, PANEL};
use crate::error::{Error, Result};

/// An adapter's weights prepared for [`query_logits`]: built once per adapter (about 4·h·d
/// floats), never per query. Parameters whose shapes disagree are an error.
#[derive(Debug, Clone)]
pub struct ServingWeights {
    d: usize,
    h: usize,
    /// `W1a + W1c`, `[h × d]` (applied to the query).
    w_sum: Vec<f32>,
    /// `(W1c − W1a)ᵀ` in panels of hidden units (`M_q`'s constant part).
    diff_panels: Vec<f32>,
    /// `W1bᵀ` in panels of hidden units (`M_q`'s part scaled by q).
    hadamard_panels: Vec<f32>,
    /// `W2ᵀ` in panels of output dimensions.
    w2_panels: Vec<f32>,
}

impl ServingWeights {
    pub fn of(params: &AdapterParams) -> Result<ServingWeights> {
        params.check()?;
        let (d, h) = (params.d, params.h);
        let (w_sum, w_diff) = sum_diff(params);
        let w_b: Vec<f32> = (params.w1.chunks_exact(3 * d))
            .flat_map(|row| &row[d..2 * d])
            .copied()
            .collect();
        Ok(ServingWeights {
            d,
            h,
            w_sum,
            diff_panels: pack_panels(&w_diff, h, d),
            hadamard_panels: pack_panels(&w_b, h, d),
            w2_panels: pack_panels(&params.w2, d, h),
        })
    }

    fn check(&self, params: &AdapterParams) -> Result<()> {
        if (self.d, self.h) != (params.d, params.h) {
            return Err(Error::InvalidArgument(format!(
                "serving weights of d = {}, h = {} used with an adapter of d = {}, h = {}",
                self.d, self.h, params.d, params.h
            )));
        }
        Ok(())
    }
}

/// Reusable working memory of [`query_logits`]. The caller owns it (not a thread-local): a
/// pool thread waiting inside the candidates' fork-join may pick up another query's scoring,
/// which must not find this one's buffers borrowed.
#[derive(Debug, Default)]
pub struct AdapterScratch {
    buf: Vec<f32>,
    stats: Vec<[f32; 5]>,
}

/// Fewest candidates per task in phase 2: below this the fork-join costs more than the
/// products it splits.
const MIN_PAIRS_PER_TASK: usize = 16;

/// The logits of one query's `k` candidates (`candidates`: `[k × d]`) into `out` (length k),
/// with the weights prepared once ([`ServingWeights::of`]). Nothing is kept for a backward pass.
pub fn query_logits(
    params: &AdapterParams,
    weights: &ServingWeights,
    query: &[f32],
    candidates: &[f32],
    out: &mut [f32],
    scratch: &mut AdapterScratch,
) -> Result<()> {
    let k = out.len();
    if k == 0 && candidates.is_empty() && query.len() == params.d {
        return Ok(());
    }
    check_inputs(params, query, candidates, k)?;
    check_contexts(params, None, k)?;
    weights.check(params)?;
    let (d, h) = (params.d, params.h);
    let panels = h.div_ceil(PANEL);
    let threads = rayon::current_num_threads().max(1);
    let panels_per_task = panels.div_ceil(threads);
    let tasks = panels.div_ceil(panels_per_task);
    let AdapterScratch { buf, stats } = scratch;
    buf.resize(h + k * h + k * d + tasks * d * PANEL, 0.0);
    stats.resize(k, [0.0; 5]);
    let (u, rest) = buf.split_at_mut(h);
    let (g, rest) = rest.split_at_mut(k * h);
    let (a, m_panel) = rest.split_at_mut(k * d);

    // Phase 1, over hidden units: g = u + C·M_qᵀ, a panel of M_qᵀ at a time.
    let g_out = SharedOut(g.as_mut_ptr());
    u.par_chunks_mut(panels_per_task * PANEL)
        .zip(m_panel.par_chunks_mut(d * PANEL))
        .enumerate()
        .for_each(|(task, (u_task, m))| {
            let g_out = &g_out;
            for (i, u_p) in u_task.chunks_mut(PANEL).enumerate() {
                let p = task * panels_per_task + i;
                let (j0, cols) = (p * PANEL, u_p.len());
                let w_sum = &weights.w_sum[j0 * d..(j0 + cols) * d];
                linear_serial(query, 1, d, w_sum, &params.b1[j0..j0 + cols], cols, u_p);
                let panel = p * d * PANEL..(p + 1) * d * PANEL;
                let diff = &weights.diff_panels[panel.clone()];
                let had = &weights.hadamard_panels[panel];
                for (((m_l, diff_l), had_l), &q_l) in m
                    .chunks_exact_mut(PANEL)
                    .zip(diff.chunks_exact(PANEL))
                    .zip(had.chunks_exact(PANEL))
                    .zip(query)
                {
                    for ((mv, &dv), &hv) in m_l.iter_mut().zip(diff_l).zip(had_l) {
                        *mv = dv + hv * q_l;
                    }
                }
                // SAFETY: candidates is k × d, m one d × PANEL panel, u_p `cols` floats; this
                // task alone writes columns j0..j0+cols of g (k × h), which outlives the loop.
                unsafe {
                    let g_p = g_out.0.add(j0);
                    panel_product(
                        candidates.as_ptr(),
                        d,
                        k,
                        d,
                        m.as_ptr(),
                        cols,
                        u_p.as_ptr(),
                        g_p,
                        h,
                    );
                }
            }
        });

    // Phase 2, over candidates: g ← GELU(g), a = c + W2·g + b2, then the geometry and the
    // logit.
    let per = k.div_ceil(threads).max(MIN_PAIRS_PER_TASK);
    a[..k * d]
        .par_chunks_mut(per * d)
        .zip(g.par_chunks_mut(per * h))
        .zip(stats[..k].par_chunks_mut(per))
        .zip(candidates.par_chunks(per * d))
        .for_each(|(((a, g), st), c)| {
            let rows = st.len();
            gelu_serial(g);
            for p in 0..d.div_ceil(PANEL) {
                let o0 = p * PANEL;
                let w2 = &weights.w2_panels[p * h * PANEL..(p + 1) * h * PANEL];
                // SAFETY: g is rows × h, w2 one h × PANEL panel, a rows × d with columns
                // o0..o0+cols in bounds, owned by this task.
                unsafe {
                    panel_product(
                        g.as_ptr(),
                        h,
                        rows,
                        h,
                        w2.as_ptr(),
                        (d - o0).min(PANEL),
                        params.b2[o0..].as_ptr(),
                        a[o0..].as_mut_ptr(),
                        d,
                    )
                }
            }
            // residual last, so W2 = 0, b2 = 0 gives a = c exactly
            for (av, &cv) in a.iter_mut().zip(c) {
                *av += cv;
            }
            for ((s, a), c) in st.iter_mut().zip(a.chunks_exact(d)).zip(c.chunks_exact(d)) {
                *s = pair_stats(params, query, c, a);
            }
        });
    for (o, st) in out.iter_mut().zip(stats.iter()) {
        *o = st[1];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::scoring::score;
    use crate::adapter::scoring::tests::{flat, max_err, naive, random, to64, trained_like};
    use crate::index::synthetic::Rng;

    /// The serving entry (prepared weights, `M_q` per query, reused buffers) against the f64
    /// definition and against [`score`] on the same query (fp32 tolerances, 1e-4 on a logit of
    /// magnitude ~10: the two re-associate the first layer's sum differently), at widths that
    /// are not multiples of a panel, and with lists of different lengths on one thread, so the
    /// reused buffers shrink and grow.
    #[test]
    fn query_logits_match_naive_and_score() {
        // Miri interprets every instruction: one small shape, still past one panel
        let shapes: &[(usize, usize)] = if cfg!(miri) {
            &[(7, 40)]
        } else {
            &[(48, 40), (7, 70)]
        };
        for &(d, h) in shapes {
            let params = trained_like(d, h, 5);
            let weights = ServingWeights::of(&params).unwrap();
            let mut rng = Rng::new(6);
            let w = flat(&params);
            let mut scratch = AdapterScratch::default();
            for k in [17, 3, 1, 40] {
                let q = random(&mut rng, d, 0.3);
                let c = random(&mut rng, k * d, 0.3);
                let mut got = vec![f32::NAN; k];
                query_logits(&params, &weights, &q, &c, &mut got, &mut scratch).unwrap();
                let want = naive(&w, d, h, &to64(&q), &to64(&c), k);
                assert!(max_err(&got, &want.logit) <= 1e-4, "d {d} h {h} k {k}");
                let out = score(&params, &q, &c, k).unwrap();
                let from_score: Vec<f64> = out.logit.iter().map(|&v| v as f64).collect();
                assert!(max_err(&got, &from_score) <= 1e-4, "d {d} h {h} k {k}");
            }
        }
        let (d, h) = (48, 40);
        let params = trained_like(d, h, 5);
        let weights = ServingWeights::of(&params).unwrap();
        let mut scratch = AdapterScratch::default();
        let other = ServingWeights::of(&trained_like(d, h + 1, 5)).unwrap();
        let (q, c) = (vec![0.1; d], vec![0.2; 2 * d]);
        assert!(query_logits(&params, &other, &q, &c, &mut [0.0; 2], &mut scratch).is_err());
        assert!(query_logits(&params, &weights, &q, &c, &mut [0.0; 3], &mut scratch).is_err());
        assert!(query_logits(&params, &weights, &q, &[], &mut [], &mut scratch).is_ok());
        let mut bad = params.clone();
        bad.w2.pop();
        assert!(ServingWeights::of(&bad).is_err());
    }

    /// Phase 1 splits hidden panels and phase 2 candidates over the threads; every element is
    /// one FMA chain in a fixed order, so any thread count gives the same bits.
    #[test]
    fn logits_do_not_depend_on_thread_count() {
        let (d, h, k) = if cfg!(miri) {
            (5, 40, 33)
        } else {
            (40, 100, 70)
        };
        let params = trained_like(d, h, 3);
        let weights = ServingWeights::of(&params).unwrap();
        let mut rng = Rng::new(4);
        let q = random(&mut rng, d, 0.3);
        let c = random(&mut rng, k * d, 0.3);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut got = vec![0.0f32; k];
            pool.install(|| {
                query_logits(&params, &weights, &q, &c, &mut got, &mut Default::default())
            })
            .unwrap();
            got.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
        };
        assert_eq!(run(1), run(2));
        assert_eq!(run(1), run(5));
    }
}
