//! The calibrated false-negative score (method notes 4):
//! `s_FN = sigmoid(w_s · s(q,c) + w_p · logit(p) + w_0)`, the three weights fitted by logistic
//! regression on the training pairs after the adapter is trained (labelled positives 1, mined
//! candidates 0). `s` is the raw similarity (before 1/tau) and `logit(p)` the adapter's logit.
//! The adapter alone (`p`) is kept as a variant for the ablation, and so is the fixed
//! combination of the calibration prototype, `s/tau + log p` (only an intercept is fitted).

use super::log_sigmoid;
use crate::error::{Error, Result};

/// How the false-negative score is formed from the retriever score and the adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FnScorer {
    /// The fitted combination of retriever score and adapter logit (default).
    #[default]
    Combined,
    /// The adapter's probability p alone.
    AdapterOnly,
    /// `s/tau + log p + w_0`: the retriever's logit plus the adapter's log-probability with unit
    /// weights (the prototype's combination), only the intercept fitted.
    ScorePlusLogP,
}

impl std::str::FromStr for FnScorer {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "combined" => Ok(FnScorer::Combined),
            "adapter-only" => Ok(FnScorer::AdapterOnly),
            "score-plus-log-p" => Ok(FnScorer::ScorePlusLogP),
            _ => Err(Error::InvalidArgument(format!(
                "unknown false-negative scorer `{s}` (valid: combined, adapter-only, score-plus-log-p)"
            ))),
        }
    }
}

/// The fitted weights. For `ScorePlusLogP`, `w_score = 1/tau` and `w_logit = 1` are fixed and
/// `w_logit` multiplies `log p` instead of the logit.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FnCalibration {
    pub w_score: f64,
    pub w_logit: f64,
    pub bias: f64,
    pub scorer: FnScorer,
}

impl Default for FnCalibration {
    /// Before any fit: `s_FN = p`.
    fn default() -> Self {
        FnCalibration {
            w_score: 0.0,
            w_logit: 1.0,
            bias: 0.0,
            scorer: FnScorer::AdapterOnly,
        }
    }
}

/// L2 penalty on the standardised slopes: negligible next to thousands of pairs, but it keeps
/// the fit finite when the classes are separable.
const RIDGE: f64 = 1.0;

impl FnCalibration {
    /// Logistic regression of `label` on (`score`, `logit`) by Newton's method, on standardised
    /// features (then mapped back). `scorer = AdapterOnly` skips the fit; `ScorePlusLogP` fits
    /// only the intercept, with `tau` the retriever's temperature.
    // Index loops over the parallel arrays (score, logit, label) read closest to the maths.
    #[allow(clippy::needless_range_loop)]
    pub fn fit(
        score: &[f32],
        logit: &[f32],
        label: &[bool],
        scorer: FnScorer,
        tau: f32,
    ) -> Result<Self> {
        if scorer == FnScorer::AdapterOnly {
            return Ok(FnCalibration::default());
        }
        let n = score.len();
        if n == 0 || logit.len() != n || label.len() != n {
            return Err(Error::InvalidArgument(format!(
                "calibration needs as many scores, logits and labels: {n}, {}, {}",
                logit.len(),
                label.len()
            )));
        }
        if let Some(i) = (0..n).find(|&i| !(score[i].is_finite() && logit[i].is_finite())) {
            return Err(Error::InvalidArgument(format!(
                "calibration: pair {i} has a non-finite score ({}) or adapter logit ({})",
                score[i], logit[i]
            )));
        }
        let pos = label.iter().filter(|&&y| y).count();
        if pos == 0 || pos == n {
            return Err(Error::InvalidArgument(format!(
                "calibration needs both labelled positives and candidates, got {pos} of {n} positive"
            )));
        }
        if scorer == FnScorer::ScorePlusLogP {
            if !(tau > 0.0 && tau.is_finite()) {
                return Err(Error::InvalidArgument(format!(
                    "calibration: temperature must be positive, got {tau}"
                )));
            }
            let offset: Vec<f64> = (0..n)
                .map(|i| score[i] as f64 / tau as f64 + log_sigmoid(logit[i] as f64))
                .collect();
            return Ok(FnCalibration {
                w_score: 1.0 / tau as f64,
                w_logit: 1.0,
                bias: fit_intercept(&offset, label, pos),
                scorer,
            });
        }
        let stats = |x: &[f32]| {
            let m = x.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            let v = x.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n as f64;
            (m, v.sqrt().max(1e-12))
        };
        let ((ms, ss), (ml, sl)) = (stats(score), stats(logit));
        // w = (bias, slope on standardised score, slope on standardised logit)
        let mut w = [((pos as f64) / (n - pos) as f64).ln(), 0.0, 0.0];
        let feats = |i: usize| {
            [
                1.0,
                (score[i] as f64 - ms) / ss,
                (logit[i] as f64 - ml) / sl,
            ]
        };
        // Penalised negative log-likelihood, for the step-halving below.
        let objective = |w: &[f64; 3]| {
            let mut f = 0.5 * RIDGE * (w[1] * w[1] + w[2] * w[2]);
            for i in 0..n {
                let x = feats(i);
                let z = w[0] + w[1] * x[1] + w[2] * x[2];
                f += super::softplus(z) - label[i] as u8 as f64 * z;
            }
            f
        };
        let mut current = objective(&w);
        for _ in 0..100 {
            let mut g = [0.0f64; 3];
            let mut h = [[0.0f64; 3]; 3];
            for i in 0..n {
                let x = feats(i);
                let z = w[0] + w[1] * x[1] + w[2] * x[2];
                let p = super::sigmoid(z);
                let r = p - label[i] as u8 as f64;
                let c = p * (1.0 - p);
                for a in 0..3 {
                    g[a] += r * x[a];
                    for b in 0..3 {
                        h[a][b] += c * x[a] * x[b];
                    }
                }
            }
            for a in 1..3 {
                g[a] += RIDGE * w[a];
                h[a][a] += RIDGE;
            }
            // The intercept's curvature vanishes when every prediction saturates; a floor
            // keeps the system solvable without moving a well-posed fit.
            h[0][0] += 1e-9 * n as f64;
            let step = solve3(h, g).ok_or_else(|| {
                Error::InvalidArgument("calibration: singular Hessian (constant features?)".into())
            })?;
            // Newton with step halving: the objective never increases, so the fit cannot
            // run off to saturated predictions.
            let mut t = 1.0;
            let mut next = w;
            let mut value = f64::INFINITY;
            for _ in 0..40 {
                next = [w[0] - t * step[0], w[1] - t * step[1], w[2] - t * step[2]];
                value = objective(&next);
                if value <= current {
                    break;
                }
                t *= 0.5;
            }
            if value.is_nan() || value > current {
                break; // no descent left: converged to rounding
            }
            let moved = (0..3).map(|a| (next[a] - w[a]).abs()).fold(0.0, f64::max);
            w = next;
            current = value;
            if moved < 1e-10 {
                break;
            }
        }
        Ok(FnCalibration {
            w_score: w[1] / ss,
            w_logit: w[2] / sl,
            bias: w[0] - w[1] * ms / ss - w[2] * ml / sl,
            scorer,
        })
    }

    /// The log-odds of `s_FN` for raw similarity `score` and adapter logit `logit`.
    pub fn log_odds(&self, score: f32, logit: f32) -> f64 {
        match self.scorer {
            FnScorer::Combined => {
                self.w_score * score as f64 + self.w_logit * logit as f64 + self.bias
            }
            FnScorer::AdapterOnly => logit as f64,
            FnScorer::ScorePlusLogP => {
                self.w_score * score as f64 + self.w_logit * log_sigmoid(logit as f64) + self.bias
            }
        }
    }

    /// `s_FN` in (0, 1).
    pub fn s_fn(&self, score: f32, logit: f32) -> f64 {
        super::sigmoid(self.log_odds(score, logit))
    }
}

/// The intercept `b` of `P(label) = sigmoid(offset + b)` by one-dimensional Newton steps
/// (the log-likelihood is concave in `b`; the steps are clipped so a poor start cannot
/// overshoot). `pos` is the number of positive labels, 0 < pos < n.
fn fit_intercept(offset: &[f64], label: &[bool], pos: usize) -> f64 {
    let mean = offset.iter().sum::<f64>() / offset.len() as f64;
    let n = offset.len() as f64;
    let mut b = (pos as f64 / (n - pos as f64)).ln() - mean;
    for _ in 0..100 {
        let (mut g, mut h) = (0.0, 0.0);
        for (&o, &y) in offset.iter().zip(label) {
            let p = super::sigmoid(o + b);
            g += p - y as u8 as f64;
            h += p * (1.0 - p);
        }
        let step = (g / h.max(1e-300)).clamp(-5.0, 5.0);
        b -= step;
        if step.abs() < 1e-12 {
            break;
        }
    }
    b
}

/// Solves the 3×3 system `h x = g` (Gaussian elimination with partial pivoting).
#[allow(clippy::needless_range_loop)] // Gaussian elimination by row and column index
fn solve3(mut h: [[f64; 3]; 3], mut g: [f64; 3]) -> Option<[f64; 3]> {
    for col in 0..3 {
        let piv = (col..3).max_by(|&a, &b| h[a][col].abs().total_cmp(&h[b][col].abs()))?;
        if h[piv][col].abs() < 1e-300 {
            return None;
        }
        h.swap(col, piv);
        g.swap(col, piv);
        for row in col + 1..3 {
            let f = h[row][col] / h[col][col];
            for c in col..3 {
                h[row][c] -= f * h[col][c];
            }
            g[row] -= f * g[col];
        }
    }
    let mut x = [0.0f64; 3];
    for row in (0..3).rev() {
        let s: f64 = (row + 1..3).map(|c| h[row][c] * x[c]).sum();
        x[row] = (g[row] - s) / h[row][row];
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::synthetic::Rng;

    #[test]
    fn recovers_known_logistic_weights() {
        // labels drawn from a known model; the fit should land near it
        let mut rng = Rng::new(5);
        let (ws, wl, b) = (8.0, 0.7, -3.0);
        let n = 40_000;
        let (mut s, mut l, mut y) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..n {
            let sv = rng.next_f64() as f32;
            let lv = (rng.next_f64() * 6.0 - 3.0) as f32;
            let p = crate::adapter::sigmoid(ws * sv as f64 + wl * lv as f64 + b);
            s.push(sv);
            l.push(lv);
            y.push(rng.next_f64() < p);
        }
        let c = FnCalibration::fit(&s, &l, &y, FnScorer::Combined, 1.0).unwrap();
        assert!((c.w_score - ws).abs() < 0.5, "{c:?}");
        assert!((c.w_logit - wl).abs() < 0.1, "{c:?}");
        assert!((c.bias - b).abs() < 0.3, "{c:?}");
        let p = c.s_fn(0.5, 0.0);
        assert!(p > 0.0 && p < 1.0);
    }

    #[test]
    fn separable_data_stays_finite_and_bad_input_errors() {
        let s = [0.1f32, 0.2, 0.8, 0.9];
        let l = [0.0f32, 0.1, 0.0, 0.1];
        let c = FnCalibration::fit(&s, &l, &[false, false, true, true], FnScorer::Combined, 1.0)
            .unwrap();
        assert!(c.w_score.is_finite() && c.w_score > 0.0, "{c:?}");
        assert!(FnCalibration::fit(&s, &l, &[false; 4], FnScorer::Combined, 1.0).is_err());
        assert!(FnCalibration::fit(&s, &l[..3], &[true; 4], FnScorer::Combined, 1.0).is_err());
        let only = FnCalibration::fit(&s, &l, &[false; 4], FnScorer::AdapterOnly, 1.0).unwrap();
        assert!((only.s_fn(0.9, 0.0) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn score_plus_log_p_fits_the_intercept_only() {
        // labels from sigmoid(s/tau + log p − 2): the fitted intercept should be near −2
        let mut rng = Rng::new(9);
        let tau = 0.05f32;
        let (mut s, mut l, mut y) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..40_000 {
            let sv = (rng.next_f64() * 0.3) as f32;
            let lv = (rng.next_f64() * 8.0 - 4.0) as f32;
            let z = sv as f64 / tau as f64 + log_sigmoid(lv as f64) - 2.0 - 0.15 / tau as f64;
            s.push(sv);
            l.push(lv);
            y.push(rng.next_f64() < crate::adapter::sigmoid(z));
        }
        let c = FnCalibration::fit(&s, &l, &y, FnScorer::ScorePlusLogP, tau).unwrap();
        assert_eq!((c.w_score, c.w_logit), (1.0 / tau as f64, 1.0));
        assert!((c.bias - (-2.0 - 0.15 / tau as f64)).abs() < 0.1, "{c:?}");
        // monotone in both the score and p
        assert!(c.log_odds(0.2, 0.0) > c.log_odds(0.1, 0.0));
        assert!(c.log_odds(0.1, 1.0) > c.log_odds(0.1, 0.0));
        assert!(FnCalibration::fit(&s, &l, &y, FnScorer::ScorePlusLogP, 0.0).is_err());
        assert!((log_sigmoid(-800.0) + 800.0).abs() < 1e-9 && log_sigmoid(800.0) == 0.0);
    }

    #[test]
    fn lopsided_separable_data_converges() {
        // 0.5 % positives far above every candidate, with heavy-tailed logits: plain Newton
        // overshoots here; with step halving the fit stays finite and ranks correctly.
        let mut rng = Rng::new(17);
        let (mut s, mut l, mut y) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..20_000 {
            let pos = i % 200 == 0;
            let u = rng.next_f64();
            s.push(if pos {
                0.9 + 0.05 * u as f32
            } else {
                0.3 * u as f32
            });
            l.push(if pos {
                30.0
            } else {
                (-40.0 * u.powi(8)) as f32
            });
            y.push(pos);
        }
        for scorer in [FnScorer::Combined, FnScorer::ScorePlusLogP] {
            let c = FnCalibration::fit(&s, &l, &y, scorer, 0.05).unwrap();
            assert!(c.w_score.is_finite() && c.w_logit.is_finite() && c.bias.is_finite());
            assert!(c.log_odds(0.95, 30.0) > c.log_odds(0.2, -1.0), "{c:?}");
        }
        let mut bad = l.clone();
        bad[3] = f32::NAN;
        assert!(FnCalibration::fit(&s, &bad, &y, FnScorer::Combined, 0.05).is_err());
    }
}
