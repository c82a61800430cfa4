//! Reranking the retriever's top-k with the adapter (method notes 6):
//! `score_i = s_base,i · p_i^lambda` with `s_base = softmax over the top-k of s(q,d)/tau`.
//! Scores are kept as logarithms, `log s_base + lambda · log p`, which orders the list the same
//! way and never underflows to ties; ties are broken by the original rank. `lambda = 0` gives
//! back the retriever's order.

use super::fit::{score_lists, Embeddings};
use super::{log_sigmoid, AdapterParams};
use crate::error::{Error, Result};

/// The lambda values tried on the dev split.
pub const LAMBDA_GRID: [f64; 7] = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0];

/// One query's reranked list: (position in the input list, log score), best first.
/// `scores` are the raw retriever similarities in retriever order, `logits` the adapter's.
pub fn rerank_list(scores: &[f32], logits: &[f32], tau: f32, lambda: f64) -> Vec<(usize, f64)> {
    let mut out = Vec::with_capacity(scores.len());
    rerank_list_into(scores, logits, tau, lambda, &mut out);
    out
}

/// [`rerank_list`] into `out` (cleared first): allocates only while `out` grows.
pub fn rerank_list_into(
    scores: &[f32],
    logits: &[f32],
    tau: f32,
    lambda: f64,
    out: &mut Vec<(usize, f64)>,
) {
    let s = |v: f32| v as f64 / tau as f64;
    let max = scores
        .iter()
        .map(|&v| s(v))
        .fold(f64::NEG_INFINITY, f64::max);
    let lse = max + scores.iter().map(|&v| (s(v) - max).exp()).sum::<f64>().ln();
    out.clear();
    out.extend(scores.iter().zip(logits).enumerate().map(|(i, (&v, &l))| {
        let adapter = if lambda == 0.0 {
            0.0
        } else {
            lambda * log_sigmoid(l as f64)
        };
        (i, s(v) - lse + adapter)
    }));
    // A total order (ties by position), so the unstable sort (no buffer) is deterministic.
    out.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
}

/// Top-k lists of several queries with their adapter logits, ready to rerank with any lambda.
#[derive(Debug, Clone, Default)]
pub struct ScoredLists {
    /// Per query: (corpus row, raw similarity), retriever order.
    pub hits: Vec<Vec<(u32, f32)>>,
    pub logits: Vec<Vec<f32>>,
}

impl ScoredLists {
    /// Scores each query's hits with the adapter. `emb.queries` rows follow `hits`.
    pub fn score(
        params: &AdapterParams,
        emb: Embeddings<'_>,
        hits: Vec<Vec<(u32, f32)>>,
    ) -> Result<Self> {
        let docs: Vec<Vec<u32>> = hits
            .iter()
            .map(|h| h.iter().map(|x| x.0).collect())
            .collect();
        let lists: Vec<(usize, &[u32])> =
            docs.iter().enumerate().map(|(i, d)| (i, &d[..])).collect();
        let logits = score_lists(params, emb, &lists)?;
        Ok(ScoredLists { hits, logits })
    }

    /// The reranked lists: per query (corpus row, log score), best first.
    pub fn rerank(&self, tau: f32, lambda: f64) -> Vec<Vec<(u32, f64)>> {
        self.hits
            .iter()
            .zip(&self.logits)
            .map(|(h, l)| {
                let s: Vec<f32> = h.iter().map(|x| x.1).collect();
                rerank_list(&s, l, tau, lambda)
                    .into_iter()
                    .map(|(i, v)| (h[i].0, v))
                    .collect()
            })
            .collect()
    }
}

/// Picks the lambda of `grid` with the best `metric` (ties: the smaller lambda, the more
/// conservative change). Returns it with the whole table.
pub fn choose_lambda(
    grid: &[f64],
    mut metric: impl FnMut(f64) -> Result<f64>,
) -> Result<(f64, Vec<(f64, f64)>)> {
    if grid.is_empty() {
        return Err(Error::InvalidArgument("empty lambda grid".into()));
    }
    let mut table = Vec::with_capacity(grid.len());
    for &l in grid {
        if !(l >= 0.0 && l.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "lambda must be finite and >= 0, found {l}"
            )));
        }
        table.push((l, metric(l)?));
    }
    let best = table
        .iter()
        .copied()
        .fold(None::<(f64, f64)>, |acc, (l, m)| match acc {
            Some((bl, bm)) if bm > m || (bm == m && bl <= l) => Some((bl, bm)),
            _ => Some((l, m)),
        })
        .map(|(l, _)| l)
        .unwrap_or(1.0);
    Ok((best, table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lambda_zero_keeps_order_and_adapter_moves_items() {
        let s = [0.9f32, 0.85, 0.8, 0.8];
        let l = [-5.0f32, 3.0, 0.0, 0.0];
        let base: Vec<usize> = rerank_list(&s, &l, 0.05, 0.0).iter().map(|x| x.0).collect();
        assert_eq!(base, vec![0, 1, 2, 3]); // tie between 2 and 3 kept in rank order
        let rr: Vec<usize> = rerank_list(&s, &l, 0.05, 1.0).iter().map(|x| x.0).collect();
        assert_eq!(rr[0], 1);
        // log-score form equals log(softmax · p^lambda) computed directly
        let out = rerank_list(&s, &l, 0.05, 2.0);
        let z: f64 = s.iter().map(|&v| (v as f64 / 0.05).exp()).sum();
        for &(i, v) in &out {
            let p = 1.0 / (1.0 + (-(l[i] as f64)).exp());
            let direct = ((s[i] as f64 / 0.05).exp() / z * p.powf(2.0)).ln();
            // the direct form goes through exp/ln of values near e^18: ~1e-8 of rounding
            assert!((v - direct).abs() < 1e-7, "{v} vs {direct}");
        }
    }

    #[test]
    fn log_sigmoid_is_stable() {
        assert!((log_sigmoid(0.0) + std::f64::consts::LN_2).abs() < 1e-15);
        assert!((log_sigmoid(-800.0) + 800.0).abs() < 1e-9);
        assert!(log_sigmoid(800.0).abs() < 1e-300);
    }

    #[test]
    fn choose_lambda_prefers_best_then_smaller() {
        let (l, t) = choose_lambda(&LAMBDA_GRID, |l| {
            Ok(if (1.0..=2.0).contains(&l) { 0.7 } else { 0.6 })
        })
        .unwrap();
        assert_eq!(l, 1.0);
        assert_eq!(t.len(), 7);
        assert!(choose_lambda(&[], |_| Ok(0.0)).is_err());
        assert!(choose_lambda(&[-1.0], |_| Ok(0.0)).is_err());
    }
}
