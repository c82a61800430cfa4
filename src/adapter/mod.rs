//! The RRRA adapter: a small residual MLP that, given a query `q` and a mined candidate `c`
//! (bi-encoder embeddings of dimension d), moves `c` to an adapted point `a` and reads off the
//! probability `p` that `c` is relevant to `q`, i.e. that a hard negative is a false negative:
//!
//! ```text
//! z     = [q − c ; q ⊙ c ; q + c]                        (3d relation features)
//! a     = c + W2 · GELU(W1 · z + b1) + b2               (W1: h × 3d, W2: d × h)
//! alpha = clip(<a − c, q − c> / ||q − c||², 0, 1)        (0 when q = c)
//! QA    = cos(q, a),  CA = cos(a, c)
//! p     = sigmoid(beta · (QA − CA) + beta0)
//! ```
//!
//! Positive-aware option (method notes 4, off by default): for training queries, whose labelled
//! positives are known, the MLP also reads `[c − d̄+ ; c ⊙ d̄+]` with d̄+ the mean embedding of
//! the query's labelled positives (`W1pos: h × 2d`), TriSampler's intuition that a negative
//! close to the positives is suspect.
//!
//! [`scoring`] holds the fused forward/backward op, [`serving`] the per-query serving path;
//! this file the parameters and the two training losses of the adapter,
//! `L = BCE_w(logit) + mu · L_norm(a)`: [`weighted_bce`] on the logit and
//! [`normalisation_loss`] keeping `a` on the segment [c, q].

pub mod calibrate;
pub mod file;
pub mod fit;
pub mod pairs;
pub mod rerank;
pub mod scoring;
pub mod serving;

pub use scoring::{backward, score, AdapterCache, AdapterOutput};

use crate::error::{Error, Result};
use crate::index::synthetic::Rng;

/// The adapter's weights, row-major in `torch.nn.Linear` layout (`[out × in]`).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterParams {
    /// Embedding dimension.
    pub d: usize,
    /// Hidden width of the MLP (default h = d).
    pub h: usize,
    /// `[h × 3d]`: columns `0..d` act on `q − c`, `d..2d` on `q ⊙ c`, `2d..3d` on `q + c`.
    pub w1: Vec<f32>,
    /// `[h]`.
    pub b1: Vec<f32>,
    /// `[d × h]`.
    pub w2: Vec<f32>,
    /// `[d]`.
    pub b2: Vec<f32>,
    /// Scale of the score difference QA − CA.
    pub beta: f32,
    /// Bias of the logit.
    pub beta0: f32,
    /// Positive-aware scoring: `[h × 2d]`, columns `0..d` act on `c − d̄+`, `d..2d` on
    /// `c ⊙ d̄+`; empty when the option is off.
    pub w1_pos: Vec<f32>,
}

impl AdapterParams {
    /// Initial parameters: `W1` entries drawn from normal(0, std = 1/√(3d)) (so a unit-scale
    /// `z` gives unit-scale pre-activations), `b1 = 0`; `W2 = 0` and `b2 = 0`, so the adapter
    /// starts as the identity `a = c`; `beta = 10`, `beta0 = 0`. Deterministic in `seed`.
    pub fn init(d: usize, h: usize, seed: u64) -> Result<Self> {
        Self::init_with(d, h, false, seed)
    }

    /// [`AdapterParams::init`], with the positive-aware block `W1pos` when `positive_aware`
    /// (drawn from the same normal after `W1`; the adapter still starts as `a = c`).
    pub fn init_with(d: usize, h: usize, positive_aware: bool, seed: u64) -> Result<Self> {
        if d == 0 || h == 0 {
            return Err(Error::InvalidArgument(format!(
                "adapter needs non-zero sizes, got d = {d}, h = {h}"
            )));
        }
        let std = 1.0 / ((3 * d) as f64).sqrt();
        let mut rng = Rng::new(seed);
        let mut normal = |n: usize| {
            let mut w = Vec::with_capacity(n + 1);
            while w.len() < n {
                let (x, y) = rng.normal_pair();
                w.push((x * std) as f32);
                w.push((y * std) as f32);
            }
            w.truncate(n);
            w
        };
        let w1 = normal(h * 3 * d);
        let w1_pos = if positive_aware {
            normal(h * 2 * d)
        } else {
            Vec::new()
        };
        Ok(AdapterParams {
            d,
            h,
            w1,
            w1_pos,
            b1: vec![0.0; h],
            w2: vec![0.0; d * h],
            b2: vec![0.0; d],
            beta: 10.0,
            beta0: 0.0,
        })
    }

    /// Same shapes, every value zero: a gradient accumulator for [`scoring::backward`].
    pub fn zeros_like(&self) -> Self {
        AdapterParams {
            d: self.d,
            h: self.h,
            w1: vec![0.0; self.w1.len()],
            b1: vec![0.0; self.b1.len()],
            w2: vec![0.0; self.w2.len()],
            b2: vec![0.0; self.b2.len()],
            beta: 0.0,
            beta0: 0.0,
            w1_pos: vec![0.0; self.w1_pos.len()],
        }
    }

    /// Whether the positive-aware block is present.
    pub fn positive_aware(&self) -> bool {
        !self.w1_pos.is_empty()
    }

    /// Number of scalar parameters.
    pub fn len(&self) -> usize {
        self.w1.len() + self.b1.len() + self.w2.len() + self.b2.len() + 2 + self.w1_pos.len()
    }

    /// Never true for checked parameters (beta and beta0 always exist); for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The parameter tensors in a fixed order (w1, b1, w2, b2, beta, beta0, then w1_pos when
    /// present), with their names: the optimizer's and the file's view.
    pub fn tensors(&self) -> Vec<(&'static str, &[f32])> {
        let mut t: Vec<(&'static str, &[f32])> = vec![
            ("w1", &self.w1),
            ("b1", &self.b1),
            ("w2", &self.w2),
            ("b2", &self.b2),
            ("beta", std::slice::from_ref(&self.beta)),
            ("beta0", std::slice::from_ref(&self.beta0)),
        ];
        if self.positive_aware() {
            t.push(("w1_pos", &self.w1_pos));
        }
        t
    }

    /// Mutable [`AdapterParams::tensors`], same order.
    pub fn tensors_mut(&mut self) -> Vec<&mut [f32]> {
        let pos = self.positive_aware();
        let mut t: Vec<&mut [f32]> = vec![
            &mut self.w1,
            &mut self.b1,
            &mut self.w2,
            &mut self.b2,
            std::slice::from_mut(&mut self.beta),
            std::slice::from_mut(&mut self.beta0),
        ];
        if pos {
            t.push(&mut self.w1_pos);
        }
        t
    }

    /// Every tensor has the size its `d` and `h` call for.
    pub fn check(&self) -> Result<()> {
        let (d, h) = (self.d, self.h);
        let ok = d > 0
            && h > 0
            && self.w1.len() == h * 3 * d
            && self.b1.len() == h
            && self.w2.len() == d * h
            && self.b2.len() == d
            && (self.w1_pos.is_empty() || self.w1_pos.len() == h * 2 * d);
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "adapter parameters disagree with d = {d}, h = {h}: w1 {}, b1 {}, w2 {}, b2 {}, \
                 w1_pos {}",
                self.w1.len(),
                self.b1.len(),
                self.w2.len(),
                self.b2.len(),
                self.w1_pos.len()
            )))
        }
    }
}

/// Weighted binary cross-entropy on logits, averaged over the pairs:
/// `L = (1/n) Σ w_i · (softplus(l_i) − y_i · l_i)`, which equals `−w·[y log p + (1−y) log(1−p)]`
/// with `p = sigmoid(l)` but never forms `log p` (no overflow or `log 0` at large |l|).
/// `d_logit` is overwritten with `∂L/∂l_i = w_i (sigmoid(l_i) − y_i) / n`. Targets may be soft
/// (in [0, 1]); weights per pair, e.g. per-class inverse frequencies normalised to mean 1.
pub fn weighted_bce(
    logit: &[f32],
    target: &[f32],
    weight: &[f32],
    d_logit: &mut [f32],
) -> Result<f64> {
    let n = logit.len();
    if n == 0 || target.len() != n || weight.len() != n || d_logit.len() != n {
        return Err(Error::InvalidArgument(format!(
            "BCE shapes disagree: {n} logits, {} targets, {} weights, {} gradients",
            target.len(),
            weight.len(),
            d_logit.len()
        )));
    }
    let inv_n = 1.0 / n as f64;
    let mut total = 0.0f64;
    for i in 0..n {
        let (l, y, w) = (logit[i] as f64, target[i] as f64, weight[i] as f64);
        total += w * (softplus(l) - y * l);
        d_logit[i] = (w * (sigmoid(l) - y) * inv_n) as f32;
    }
    Ok(total * inv_n)
}

/// The linear-normalisation loss, averaged over the pairs:
/// `L = Σ_p w_p ||a_p − (alpha_p q + (1 − alpha_p) c_p)||² / Σ_p w_p`, with `alpha` as [`score`]
/// returns it and `w_p` from `pair_weight` (all 1 when `None`; weight 0 marks a padding pair). `d_a` (`[P × d]`) is overwritten with `∂L/∂a`; `d_queries` (`[Q × d]`) and
/// `d_candidates` (`[P × d]`), when given, are overwritten with the direct gradients through the
/// target point (the dependence of `a` on q and c goes through [`scoring::backward`]).
///
/// alpha is held constant in the gradient, and that is exact, not an approximation: inside
/// (0, 1), `alpha q + (1 − alpha) c` is the orthogonal projection of `a` on the line through c
/// and q, so the residual is orthogonal to `q − c` and `∂L/∂alpha = −2<r, q − c> = 0`; where
/// alpha is clipped it is locally constant. Only the two kinks (alpha exactly 0 or 1) are
/// non-differentiable, as with any clip.
#[allow(clippy::too_many_arguments)]
pub fn normalisation_loss(
    queries: &[f32],
    candidates: &[f32],
    k: usize,
    a: &[f32],
    alpha: &[f32],
    pair_weight: Option<&[f32]>,
    d_a: &mut [f32],
    mut d_queries: Option<&mut [f32]>,
    mut d_candidates: Option<&mut [f32]>,
) -> Result<f64> {
    let d = if k == 0 || alpha.is_empty() {
        0
    } else {
        candidates.len() / (alpha.len())
    };
    let nq = alpha.len() / k.max(1);
    let p_n = alpha.len();
    let ok = d > 0
        && alpha.len() == nq * k
        && queries.len() == nq * d
        && candidates.len() == p_n * d
        && a.len() == p_n * d
        && d_a.len() == p_n * d
        && pair_weight.is_none_or(|w| w.len() == p_n)
        && d_queries.as_ref().is_none_or(|g| g.len() == nq * d)
        && d_candidates.as_ref().is_none_or(|g| g.len() == p_n * d);
    if !ok {
        return Err(Error::InvalidArgument(format!(
            "normalisation loss shapes disagree: k = {k}, {} alphas, {} query floats, \
             {} candidate floats, {} adapted floats",
            alpha.len(),
            queries.len(),
            candidates.len(),
            a.len()
        )));
    }
    if let Some(g) = d_queries.as_deref_mut() {
        g.fill(0.0);
    }
    let weight = |p: usize| pair_weight.map_or(1.0, |w| w[p] as f64);
    let weight_sum: f64 = (0..p_n).map(weight).sum();
    if !(weight_sum > 0.0 && weight_sum.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "normalisation loss: pair weights must be non-negative with a positive sum, sum is {weight_sum}"
        )));
    }
    let mut total = 0.0f64;
    for p in 0..p_n {
        let i = p / k;
        let scale = 2.0 * weight(p) / weight_sum;
        let al = alpha[p] as f64;
        let q = &queries[i * d..(i + 1) * d];
        let c = &candidates[p * d..(p + 1) * d];
        let ap = &a[p * d..(p + 1) * d];
        for l in 0..d {
            let r = ap[l] as f64 - (al * q[l] as f64 + (1.0 - al) * c[l] as f64);
            total += weight(p) * r * r;
            let g = scale * r;
            d_a[p * d + l] = g as f32;
            if let Some(dq) = d_queries.as_deref_mut() {
                dq[i * d + l] -= (al * g) as f32;
            }
            if let Some(dc) = d_candidates.as_deref_mut() {
                dc[p * d + l] = (-(1.0 - al) * g) as f32;
            }
        }
    }
    Ok(total / weight_sum)
}

/// `log(1 + e^x)` without overflow.
pub(crate) fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `log sigmoid(x)` without overflow.
pub fn log_sigmoid(x: f64) -> f64 {
    -(x.max(0.0) - x + (-x.abs()).exp().ln_1p())
}

/// Logistic function, stable on both tails.
pub(crate) fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_shapes_and_identity_start() {
        let p = AdapterParams::init(6, 4, 3).unwrap();
        p.check().unwrap();
        assert_eq!(p.len(), 4 * 18 + 4 + 6 * 4 + 6 + 2);
        assert!(p.w2.iter().chain(&p.b2).chain(&p.b1).all(|&v| v == 0.0));
        assert_eq!((p.beta, p.beta0), (10.0, 0.0));
        assert_eq!(p, AdapterParams::init(6, 4, 3).unwrap());
        assert_ne!(p.w1, AdapterParams::init(6, 4, 4).unwrap().w1);
        let z = p.zeros_like();
        z.check().unwrap();
        assert!(z.w1.iter().all(|&v| v == 0.0));
        assert!(AdapterParams::init(0, 4, 1).is_err());
        // std 1/√(3d) for a larger draw
        let big = AdapterParams::init(64, 64, 9).unwrap();
        let var = big.w1.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / big.w1.len() as f64;
        assert!((var * 192.0 - 1.0).abs() < 0.05, "{var}");
    }

    #[test]
    fn bce_matches_definition_and_gradient() {
        let logit = [-3.0f32, -0.5, 0.0, 0.7, 4.0];
        let target = [0.0f32, 1.0, 1.0, 0.0, 1.0];
        let weight = [1.0f32, 2.0, 0.5, 1.5, 1.0];
        let mut g = [0.0f32; 5];
        let loss = weighted_bce(&logit, &target, &weight, &mut g).unwrap();
        let f = |ls: &[f64]| -> f64 {
            ls.iter()
                .zip(&target)
                .zip(&weight)
                .map(|((&l, &y), &w)| {
                    let p = 1.0 / (1.0 + (-l).exp());
                    -(w as f64) * (y as f64 * p.ln() + (1.0 - y as f64) * (1.0 - p).ln())
                })
                .sum::<f64>()
                / ls.len() as f64
        };
        let l64: Vec<f64> = logit.iter().map(|&v| v as f64).collect();
        assert!((loss - f(&l64)).abs() < 1e-12);
        for i in 0..5 {
            let (mut a, mut b) = (l64.clone(), l64.clone());
            a[i] += 1e-6;
            b[i] -= 1e-6;
            let fd = (f(&a) - f(&b)) / 2e-6;
            assert!((g[i] as f64 - fd).abs() < 1e-7, "{i}: {} vs {fd}", g[i]);
        }
        // huge logits: finite loss, saturated gradients
        let mut g = [0.0f32; 2];
        let loss = weighted_bce(&[200.0, -200.0], &[0.0, 1.0], &[1.0, 1.0], &mut g).unwrap();
        assert!((loss - 200.0).abs() < 1e-9, "{loss}");
        assert_eq!(g, [0.5, -0.5]);
        assert!(weighted_bce(&[0.0], &[0.0, 1.0], &[1.0], &mut g[..1]).is_err());
    }

    /// The normalisation loss with alpha recomputed from (q, c, a) in f64, so finite differences
    /// differentiate through alpha.
    fn norm_loss_f64(q: &[f64], c: &[f64], a: &[f64], d: usize, k: usize) -> f64 {
        let p_n = c.len() / d;
        let mut total = 0.0;
        for p in 0..p_n {
            let qi = &q[(p / k) * d..(p / k + 1) * d];
            let (cp, ap) = (&c[p * d..(p + 1) * d], &a[p * d..(p + 1) * d]);
            let den: f64 = (0..d).map(|l| (qi[l] - cp[l]).powi(2)).sum();
            let num: f64 = (0..d).map(|l| (ap[l] - cp[l]) * (qi[l] - cp[l])).sum();
            let al = if den > 0.0 {
                (num / den).clamp(0.0, 1.0)
            } else {
                0.0
            };
            total += (0..d)
                .map(|l| (ap[l] - al * qi[l] - (1.0 - al) * cp[l]).powi(2))
                .sum::<f64>();
        }
        total / p_n as f64
    }

    #[test]
    fn normalisation_gradient_with_alpha_constant_is_exact() {
        let (d, k) = (4usize, 3usize);
        let mut rng = Rng::new(5);
        let mut r =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect() };
        let q = r(2 * d);
        let c = r(2 * k * d);
        let mut a = r(2 * k * d);
        // pair 0 past q (alpha clipped to 1), pair 1 behind c (clipped to 0), the rest inside
        for l in 0..d {
            a[l] = 2.0 * q[l] - c[l] + 0.1;
            a[d + l] = 2.0 * c[d + l] - q[l] + 0.1;
        }
        let (q64, c64, a64) = (
            q.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            c.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            a.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        );
        let alpha: Vec<f32> = (0..2 * k)
            .map(|p| {
                let qi = &q64[(p / k) * d..(p / k + 1) * d];
                let (cp, ap) = (&c64[p * d..(p + 1) * d], &a64[p * d..(p + 1) * d]);
                let den: f64 = (0..d).map(|l| (qi[l] - cp[l]).powi(2)).sum();
                let num: f64 = (0..d).map(|l| (ap[l] - cp[l]) * (qi[l] - cp[l])).sum();
                (num / den).clamp(0.0, 1.0) as f32
            })
            .collect();
        assert_eq!((alpha[0], alpha[1]), (1.0, 0.0));
        assert!(alpha[2..].iter().any(|&x| x > 0.0 && x < 1.0));
        let mut da = vec![0.0; a.len()];
        let mut dq = vec![0.0; q.len()];
        let mut dc = vec![0.0; c.len()];
        let loss = normalisation_loss(
            &q,
            &c,
            k,
            &a,
            &alpha,
            None,
            &mut da,
            Some(&mut dq),
            Some(&mut dc),
        )
        .unwrap();
        assert!((loss - norm_loss_f64(&q64, &c64, &a64, d, k)).abs() < 1e-6);
        let h = 1e-6;
        let check = |which: usize, grad: &[f32]| {
            for i in 0..grad.len() {
                let mut xs = [q64.clone(), c64.clone(), a64.clone()];
                xs[which][i] += h;
                let up = norm_loss_f64(&xs[0], &xs[1], &xs[2], d, k);
                xs[which][i] -= 2.0 * h;
                let down = norm_loss_f64(&xs[0], &xs[1], &xs[2], d, k);
                let fd = (up - down) / (2.0 * h);
                assert!(
                    (grad[i] as f64 - fd).abs() < 1e-5,
                    "input {which}[{i}]: {} vs {fd}",
                    grad[i]
                );
            }
        };
        check(0, &dq);
        check(1, &dc);
        check(2, &da);
        assert!(normalisation_loss(&q, &c, 0, &a, &alpha, None, &mut da, None, None).is_err());
        assert!(normalisation_loss(&q, &c, k, &a[1..], &alpha, None, &mut da, None, None).is_err());
    }
}
