//! The contrastive loss as one fused op: InfoNCE forward and backward together.
//!
//! Every query `b` is scored against every document of the batch (its positive, its own hard
//! negatives, and all other queries' positives and negatives — the in-batch negatives):
//! `s_bj = <q_b, d_j> / tau` and
//! `L_b = -s_b,t(b) + log Σ_j w_bj · exp(s_bj)`, `L = mean_b L_b`,
//! where `t(b)` is the query's positive. The weights enter in log form, `log w_bj`:
//! `-inf` removes a document from the query's candidates (another positive of the same query
//! must never serve as its negative), finite values down-weight a negative (the soft mode of
//! RRRA resampling). The positive's own weight is always 1.
//!
//! Fused: one pass per query row computes its scores, their log-sum-exp (max-subtracted, in
//! f64), the loss and the score gradient `g_bj = (w_bj e^{s_bj} / Z_b − [j = t]) / B`, and
//! immediately scatters `g` into the query and document gradients. Only one row of scores
//! exists at a time, the CPU twin of a kernel that never materialises the B × D matrix.
//! Document gradients are accumulated query by query in a fixed order: deterministic.

use crate::error::{Error, Result};

/// What the loss saw, for logging.
#[derive(Debug, Clone, PartialEq)]
pub struct InfoNceStats {
    /// Mean loss over the queries.
    pub loss: f64,
    /// Share of queries whose positive outscores every candidate negative.
    pub accuracy: f64,
    /// Mean raw similarity `<q, d+>` (before 1/tau).
    pub mean_positive: f64,
    /// Mean raw similarity of the candidate negatives (weighted out ones excluded).
    pub mean_negative: f64,
}

/// Inputs of [`info_nce`]. Row-major: `queries` is `[B × dim]`, `docs` `[D × dim]`,
/// `log_weights` (when given) `[B × D]`.
pub struct InfoNceInput<'a> {
    pub queries: &'a [f32],
    pub docs: &'a [f32],
    pub dim: usize,
    /// `targets[b]`: the index in `docs` of query b's positive.
    pub targets: &'a [usize],
    /// `log w_bj`; `None` means every document is a candidate with weight 1.
    pub log_weights: Option<&'a [f32]>,
    pub tau: f32,
}

impl InfoNceInput<'_> {
    /// Checks shapes, targets and the temperature (the CPU and GPU losses share it); returns
    /// the number of queries B and of documents D.
    pub fn check(&self) -> Result<(usize, usize)> {
        let dim = self.dim;
        let b_n = self.targets.len();
        if dim == 0 || b_n == 0 {
            return Err(Error::InvalidArgument(
                "InfoNCE needs at least one query and a non-zero dimension".into(),
            ));
        }
        let d_n = self.docs.len() / dim;
        let shapes_ok = self.queries.len() == b_n * dim
            && self.docs.len() == d_n * dim
            && self.log_weights.is_none_or(|w| w.len() == b_n * d_n);
        if !shapes_ok {
            return Err(Error::InvalidArgument(format!(
                "InfoNCE shapes disagree: {b_n} queries, {} query floats, {} doc floats, dim {dim}",
                self.queries.len(),
                self.docs.len()
            )));
        }
        if let Some(&t) = self.targets.iter().find(|&&t| t >= d_n) {
            return Err(Error::InvalidArgument(format!(
                "InfoNCE target {t} is outside the {d_n} documents"
            )));
        }
        if !(self.tau > 0.0 && self.tau.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "temperature must be positive, got {}",
                self.tau
            )));
        }
        Ok((b_n, d_n))
    }
}

/// Loss and gradients: `dq` (`[B × dim]`) and `dd` (`[D × dim]`) are overwritten with
/// `∂L/∂queries` and `∂L/∂docs`.
pub fn info_nce(inp: &InfoNceInput<'_>, dq: &mut [f32], dd: &mut [f32]) -> Result<InfoNceStats> {
    let (b_n, d_n) = inp.check()?;
    let dim = inp.dim;
    if dq.len() != b_n * dim || dd.len() != d_n * dim {
        return Err(Error::InvalidArgument(format!(
            "InfoNCE gradient buffers of {} and {} floats for {b_n} queries and {d_n} documents \
             of dimension {dim}",
            dq.len(),
            dd.len()
        )));
    }
    dq.fill(0.0);
    dd.fill(0.0);
    let inv_tau = 1.0 / inp.tau as f64;
    let inv_b = 1.0 / b_n as f64;
    let (mut loss, mut correct, mut pos_sum, mut neg_sum, mut neg_count) = (0.0, 0, 0.0, 0.0, 0);
    let mut raw = vec![0.0f64; d_n];
    let mut logit = vec![0.0f64; d_n];
    for (b, &t) in inp.targets.iter().enumerate() {
        let q = &inp.queries[b * dim..(b + 1) * dim];
        for (j, r) in raw.iter_mut().enumerate() {
            *r = dot(q, &inp.docs[j * dim..(j + 1) * dim]);
        }
        // logit_j = s_bj + log w_bj (the positive's weight is 1 whatever the input says)
        let mut max = f64::NEG_INFINITY;
        for j in 0..d_n {
            let lw = match inp.log_weights {
                Some(w) if j != t => w[b * d_n + j] as f64,
                _ => 0.0,
            };
            logit[j] = raw[j] * inv_tau + lw;
            max = max.max(logit[j]);
        }
        let z: f64 = logit.iter().map(|&l| (l - max).exp()).sum();
        let lse = max + z.ln();
        loss += lse - raw[t] * inv_tau;
        pos_sum += raw[t];
        let mut best_negative = f64::NEG_INFINITY;
        for j in (0..d_n).filter(|&j| j != t && logit[j] > f64::NEG_INFINITY) {
            best_negative = best_negative.max(raw[j]);
            neg_sum += raw[j];
            neg_count += 1;
        }
        if raw[t] > best_negative {
            correct += 1;
        }
        // g_j = ∂L/∂s_bj; ∂s_bj/∂q = d_j / tau and ∂s_bj/∂d_j = q / tau.
        let dqb = &mut dq[b * dim..(b + 1) * dim];
        for j in 0..d_n {
            let mut g = (logit[j] - lse).exp();
            if j == t {
                g -= 1.0;
            }
            if g == 0.0 {
                continue;
            }
            let gs = (g * inv_b * inv_tau) as f32;
            let d = &inp.docs[j * dim..(j + 1) * dim];
            for (o, &v) in dqb.iter_mut().zip(d) {
                *o += gs * v;
            }
            for (o, &v) in dd[j * dim..(j + 1) * dim].iter_mut().zip(q) {
                *o += gs * v;
            }
        }
    }
    Ok(InfoNceStats {
        loss: loss * inv_b,
        accuracy: correct as f64 * inv_b,
        mean_positive: pos_sum * inv_b,
        mean_negative: if neg_count > 0 {
            neg_sum / neg_count as f64
        } else {
            0.0
        },
    })
}

/// f32 inputs, f64 accumulation: scores stay exact to f32 input precision before 1/tau
/// magnifies them.
fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::synthetic::Rng;

    fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_f64() as f32) * 2.0 - 1.0)
            .collect()
    }

    /// f64 loss from scratch, for finite differences.
    fn loss_f64(
        q: &[f64],
        d: &[f64],
        dim: usize,
        t: &[usize],
        lw: Option<&[f32]>,
        tau: f64,
    ) -> f64 {
        let (b_n, d_n) = (t.len(), d.len() / dim);
        let mut total = 0.0;
        for b in 0..b_n {
            let s: Vec<f64> = (0..d_n)
                .map(|j| {
                    (0..dim)
                        .map(|k| q[b * dim + k] * d[j * dim + k])
                        .sum::<f64>()
                        / tau
                })
                .collect();
            let z: f64 = (0..d_n)
                .map(|j| {
                    let w = match lw {
                        Some(w) if j != t[b] => (w[b * d_n + j] as f64).exp(),
                        _ => 1.0,
                    };
                    w * s[j].exp()
                })
                .sum();
            total += z.ln() - s[t[b]];
        }
        total / b_n as f64
    }

    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = Rng::new(11);
        let (b_n, d_n, dim, tau) = (3, 7, 5, 0.5f32);
        let q = random(&mut rng, b_n * dim);
        let d = random(&mut rng, d_n * dim);
        let targets = [0usize, 3, 5];
        let mut lw: Vec<f32> = (0..b_n * d_n).map(|_| -(rng.next_f64() as f32)).collect();
        lw[d_n + 4] = f32::NEG_INFINITY; // a masked candidate
        let (mut dq, mut dd) = (vec![0.0; q.len()], vec![0.0; d.len()]);
        let inp = InfoNceInput {
            queries: &q,
            docs: &d,
            dim,
            targets: &targets,
            log_weights: Some(&lw),
            tau,
        };
        let stats = info_nce(&inp, &mut dq, &mut dd).unwrap();
        let q64: Vec<f64> = q.iter().map(|&v| v as f64).collect();
        let d64: Vec<f64> = d.iter().map(|&v| v as f64).collect();
        let want = loss_f64(&q64, &d64, dim, &targets, Some(&lw), tau as f64);
        assert!((stats.loss - want).abs() < 1e-12 * want.abs().max(1.0));
        // Central differences on the f64 loss (step 1e-5: truncation error ~1e-10, round-off
        // ~1e-11); the analytic gradient is stored in f32, so 1e-6 absolute is its precision.
        let h = 1e-5;
        for i in 0..q.len() {
            let (mut p, mut m) = (q64.clone(), q64.clone());
            p[i] += h;
            m[i] -= h;
            let fd = (loss_f64(&p, &d64, dim, &targets, Some(&lw), tau as f64)
                - loss_f64(&m, &d64, dim, &targets, Some(&lw), tau as f64))
                / (2.0 * h);
            assert!(
                (dq[i] as f64 - fd).abs() < 1e-6,
                "dq[{i}] {} vs {fd}",
                dq[i]
            );
        }
        for i in 0..d.len() {
            let (mut p, mut m) = (d64.clone(), d64.clone());
            p[i] += h;
            m[i] -= h;
            let fd = (loss_f64(&q64, &p, dim, &targets, Some(&lw), tau as f64)
                - loss_f64(&q64, &m, dim, &targets, Some(&lw), tau as f64))
                / (2.0 * h);
            assert!(
                (dd[i] as f64 - fd).abs() < 1e-6,
                "dd[{i}] {} vs {fd}",
                dd[i]
            );
        }
    }

    #[test]
    fn large_scores_do_not_overflow_and_masks_remove_candidates() {
        // unit vectors at tau = 0.001: scores up to 1000, exp would overflow without the max.
        let q = [1.0f32, 0.0];
        let d = [1.0f32, 0.0, 0.0, 1.0, 1.0, 0.0];
        let targets = [0usize];
        let (mut dq, mut dd) = ([0.0f32; 2], [0.0f32; 6]);
        let inp = |lw| InfoNceInput {
            queries: &q,
            docs: &d,
            dim: 2,
            targets: &targets,
            log_weights: lw,
            tau: 0.001,
        };
        // doc 2 equals the positive: loss log 2 + tiny, finite
        let s = info_nce(&inp(None), &mut dq, &mut dd).unwrap();
        assert!((s.loss - 2f64.ln()).abs() < 1e-9, "{}", s.loss);
        // masking doc 2 (say, another positive of the query) leaves a near-zero loss
        let lw = [0.0f32, 0.0, f32::NEG_INFINITY];
        let s = info_nce(&inp(Some(&lw)), &mut dq, &mut dd).unwrap();
        assert!(s.loss < 1e-9 && s.loss >= 0.0, "{}", s.loss);
        assert!(dd[4..].iter().all(|&g| g == 0.0));
        assert_eq!(s.accuracy, 1.0);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let (mut dq, mut dd) = ([0.0f32; 2], [0.0f32; 2]);
        let q = [1.0f32, 0.0];
        let base = InfoNceInput {
            queries: &q,
            docs: &q,
            dim: 2,
            targets: &[1],
            log_weights: None,
            tau: 0.05,
        };
        assert!(info_nce(&base, &mut dq, &mut dd).is_err());
        let zero_tau = InfoNceInput {
            targets: &[0],
            tau: 0.0,
            ..base
        };
        assert!(info_nce(&zero_tau, &mut dq, &mut dd).is_err());
    }
}
