//! Hard-negative samplers over a mined candidate pool (method notes, section 3).
//!
//! For each training query the miner gives its top-K candidates (labelled positives dropped) in
//! rank order, with their **raw** similarity to the query (cosine or dot product as the retriever
//! scores them, *before* division by the contrastive temperature tau). A sampler turns that pool
//! into one **log weight** per candidate ([`log_weights`]); [`sample_without_replacement`] then
//! draws `n` distinct negatives with probabilities proportional to `exp(log_w)` by Gumbel-top-n.
//!
//! Everything stays in log space: weights are never exponentiated before sampling, so pools whose
//! weights would all underflow `exp` (large dot-product scores, a steep SimANS `a`) still sample
//! correctly. `f64::NEG_INFINITY` marks an excluded candidate. The RRRA sampler of section 5.3 uses
//! the same draw: give [`sample_without_replacement`] its log weights.
//!
//! ```
//! use rrra::train::rng::{Site, Stream};
//! use rrra::train::sampler::{log_weights, sample_without_replacement, SamplerKind};
//! let kind = SamplerKind::parse("simans:a=0.5,b=0")?;
//! let scores = [0.91f32, 0.88, 0.80, 0.42]; // raw cosine, rank order
//! let log_w = log_weights(&kind, &scores, 0.87, None)?;
//! let stream = Stream::new(7, 0, 0, 0, Site::Sampler);
//! let picked = sample_without_replacement(&log_w, 2, &stream);
//! assert_eq!(picked.len(), 2);
//! assert_ne!(picked[0], picked[1]);
//! # Ok::<(), rrra::Error>(())
//! ```

use std::cmp::Ordering;
use std::fmt;

use crate::error::{Error, Result};
use crate::train::rng::Stream;

/// The names [`SamplerKind::parse`] accepts.
pub const SAMPLER_NAMES: [&str; 4] = ["uniform", "simans", "trisampler", "rrra"];

/// Which sampler and its knobs. Serialised as `{"name": "simans", "a": 0.5, "b": 0.0}` so training
/// configs and checkpoint metadata record it; [`SamplerKind::parse`] reads the CLI form
/// `name[:key=value,...]` and `Display` writes it back.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum SamplerKind {
    /// Uniform over the ranks `[range_min, range_max)` of the pool (0-based, rank 0 = the
    /// retriever's best candidate). `range_max = None` means the pool size K; a `range_max` beyond
    /// the pool is clipped to it. Defaults `0..K`.
    Uniform {
        range_min: usize,
        range_max: Option<usize>,
    },
    /// SimANS (Zhou et al. 2022): `log w_i = -a (s_i - s_+ - b)^2`, peaked at `s_i = s_+ + b`.
    /// This is the paper's sign (`- b`); the official SimANS code writes `+ b`, which mirrors the
    /// peak to `s_+ - b`. `s_i` and `s_+` are raw similarities (before 1/tau), so `a` is on the
    /// scale of the retriever's scores. Defaults `a = 0.5`, `b = 0`.
    SimAns { a: f64, b: f64 },
    /// TriSampler (Yang et al. 2024): `log w_i = -(s_i - s_+)^2 / 4` (raw similarities) restricted
    /// to a quasi-triangular region around the query q and positive d+. The published description
    /// is incomplete; this implements the form documented in the method notes:
    /// candidate d_i is in the region when the angle at the query vertex between `d+ - q` and
    /// `d_i - q` is below `max_angle_deg` (default 60), and, when `require_closer_to_positive`
    /// (default true), `<d+, d_i> > <q, d_i>` (dot products of the given embeddings). A candidate
    /// for which the angle is undefined (`d_i = q`, or `d+ = q`) is outside. When no candidate is
    /// in the region the restriction is dropped and every candidate gets its un-restricted weight,
    /// since an empty region would give the query no hard negatives at all.
    TriSampler {
        max_angle_deg: f64,
        require_closer_to_positive: bool,
    },
    /// RRRA (method notes 5.3): `w_i = s_HN,i · (1 − s_FN,i)^gamma` with hardness
    /// `s_HN,i = exp((s_i − max_j s_j) / (tau · t_h))` (raw similarities, so `t_h = 1` is the
    /// scale of the InfoNCE logits `s/tau`) and `s_FN` the adapter's calibrated false-negative
    /// score ([`rrra_log_weights`]). Defaults `gamma = 2`, `t_h = 1`. `soft`: instead of drawing
    /// by `w`, draw uniformly and give each drawn negative the loss weight `w_i · K / n` (an
    /// unbiased estimate of using all K candidates with weights `w`; exactly that when n ≥ K).
    Rrra { gamma: f64, t_h: f64, soft: bool },
}

impl SamplerKind {
    /// Parses `name` or `name:key=value,key=value` (name case-insensitive); omitted knobs take
    /// their defaults. Examples: `simans`, `simans:a=1,b=0.1`, `uniform:range_min=5,range_max=100`,
    /// `trisampler:max_angle_deg=45,require_closer_to_positive=false`. The result is validated.
    pub fn parse(spec: &str) -> Result<Self> {
        let spec = spec.trim();
        let (name, knobs) = match spec.split_once(':') {
            Some((n, k)) => (n.trim(), k.trim()),
            None => (spec, ""),
        };
        let mut kind = match name.to_ascii_lowercase().as_str() {
            "uniform" => SamplerKind::Uniform {
                range_min: 0,
                range_max: None,
            },
            "simans" => SamplerKind::SimAns { a: 0.5, b: 0.0 },
            "trisampler" => SamplerKind::TriSampler {
                max_angle_deg: 60.0,
                require_closer_to_positive: true,
            },
            "rrra" => SamplerKind::Rrra {
                gamma: 2.0,
                t_h: 1.0,
                soft: false,
            },
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown sampler `{name}` (valid: {})",
                    SAMPLER_NAMES.join(", ")
                )))
            }
        };
        for item in knobs.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = item.split_once('=').ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "sampler `{spec}`: expected key=value, found `{item}`"
                ))
            })?;
            kind.set_knob(key.trim(), value.trim())?;
        }
        kind.validate()?;
        Ok(kind)
    }

    fn set_knob(&mut self, key: &str, value: &str) -> Result<()> {
        fn num<T: std::str::FromStr>(key: &str, value: &str) -> Result<T> {
            value.parse().map_err(|_| {
                Error::InvalidArgument(format!("sampler knob {key}: cannot parse `{value}`"))
            })
        }
        let valid: &str = match (&mut *self, key) {
            (SamplerKind::Uniform { range_min, .. }, "range_min") => {
                *range_min = num(key, value)?;
                return Ok(());
            }
            (SamplerKind::Uniform { range_max, .. }, "range_max") => {
                *range_max = match value {
                    "none" | "K" => None,
                    v => Some(num(key, v)?),
                };
                return Ok(());
            }
            (SamplerKind::SimAns { a, .. }, "a") => {
                *a = num(key, value)?;
                return Ok(());
            }
            (SamplerKind::SimAns { b, .. }, "b") => {
                *b = num(key, value)?;
                return Ok(());
            }
            (SamplerKind::TriSampler { max_angle_deg, .. }, "max_angle_deg") => {
                *max_angle_deg = num(key, value)?;
                return Ok(());
            }
            (
                SamplerKind::TriSampler {
                    require_closer_to_positive,
                    ..
                },
                "require_closer_to_positive",
            ) => {
                *require_closer_to_positive = num(key, value)?;
                return Ok(());
            }
            (SamplerKind::Rrra { gamma, .. }, "gamma") => {
                *gamma = num(key, value)?;
                return Ok(());
            }
            (SamplerKind::Rrra { t_h, .. }, "t_h") => {
                *t_h = num(key, value)?;
                return Ok(());
            }
            (SamplerKind::Rrra { soft, .. }, "soft") => {
                *soft = num(key, value)?;
                return Ok(());
            }
            (SamplerKind::Rrra { .. }, _) => "gamma, t_h, soft",
            (SamplerKind::Uniform { .. }, _) => "range_min, range_max",
            (SamplerKind::SimAns { .. }, _) => "a, b",
            (SamplerKind::TriSampler { .. }, _) => "max_angle_deg, require_closer_to_positive",
        };
        Err(Error::InvalidArgument(format!(
            "sampler {} has no knob `{key}` (valid: {valid})",
            self.name()
        )))
    }

    /// The CLI / config name: `uniform`, `simans` or `trisampler`.
    pub fn name(&self) -> &'static str {
        match self {
            SamplerKind::Uniform { .. } => "uniform",
            SamplerKind::SimAns { .. } => "simans",
            SamplerKind::TriSampler { .. } => "trisampler",
            SamplerKind::Rrra { .. } => "rrra",
        }
    }

    /// Checks the knobs: `range_min < range_max`; `a` finite and > 0, `b` finite;
    /// `0 < max_angle_deg <= 180`.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| {
            Err(Error::InvalidArgument(format!(
                "sampler {}: {msg}",
                self.name()
            )))
        };
        match *self {
            SamplerKind::Uniform {
                range_min,
                range_max: Some(max),
            } if range_min >= max => bad(format!(
                "range_min ({range_min}) must be below range_max ({max})"
            )),
            SamplerKind::Uniform { .. } => Ok(()),
            SamplerKind::SimAns { a, .. } if !(a.is_finite() && a > 0.0) => {
                bad(format!("a must be finite and > 0, found {a}"))
            }
            SamplerKind::SimAns { b, .. } if !b.is_finite() => {
                bad(format!("b must be finite, found {b}"))
            }
            SamplerKind::SimAns { .. } => Ok(()),
            SamplerKind::TriSampler { max_angle_deg, .. }
                if !(max_angle_deg > 0.0 && max_angle_deg <= 180.0) =>
            {
                bad(format!(
                    "max_angle_deg must be in (0, 180], found {max_angle_deg}"
                ))
            }
            SamplerKind::TriSampler { .. } => Ok(()),
            SamplerKind::Rrra { gamma, .. } if !(gamma >= 0.0 && gamma.is_finite()) => {
                bad(format!("gamma must be finite and >= 0, found {gamma}"))
            }
            SamplerKind::Rrra { t_h, .. } if !(t_h > 0.0 && t_h.is_finite()) => {
                bad(format!("t_h must be finite and > 0, found {t_h}"))
            }
            SamplerKind::Rrra { .. } => Ok(()),
        }
    }
}

impl fmt::Display for SamplerKind {
    /// The form [`SamplerKind::parse`] reads back, every knob written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SamplerKind::Uniform {
                range_min,
                range_max,
            } => {
                write!(f, "uniform:range_min={range_min}")?;
                match range_max {
                    Some(m) => write!(f, ",range_max={m}"),
                    None => write!(f, ",range_max=none"),
                }
            }
            SamplerKind::SimAns { a, b } => write!(f, "simans:a={a},b={b}"),
            SamplerKind::TriSampler {
                max_angle_deg,
                require_closer_to_positive,
            } => write!(
                f,
                "trisampler:max_angle_deg={max_angle_deg},require_closer_to_positive={require_closer_to_positive}"
            ),
            SamplerKind::Rrra { gamma, t_h, soft } => {
                write!(f, "rrra:gamma={gamma},t_h={t_h},soft={soft}")
            }
        }
    }
}

impl std::str::FromStr for SamplerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        SamplerKind::parse(s)
    }
}

/// Geometry TriSampler needs: the embeddings of the query, of the positive and of each candidate
/// (`dim` floats each; `candidates` row-major in pool rank order).
#[derive(Debug, Clone, Copy)]
pub struct PoolGeometry<'a> {
    pub query: &'a [f32],
    pub positive: &'a [f32],
    pub candidates: &'a [f32],
    pub dim: usize,
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

impl PoolGeometry<'_> {
    fn check(&self, pool: usize) -> Result<()> {
        let d = self.dim;
        if d == 0
            || self.query.len() != d
            || self.positive.len() != d
            || self.candidates.len() != pool * d
        {
            return Err(Error::InvalidArgument(format!(
                "pool geometry: dim {d}, query {} floats, positive {} floats, candidates {} floats \
                 for a pool of {pool}",
                self.query.len(),
                self.positive.len(),
                self.candidates.len()
            )));
        }
        Ok(())
    }

    /// Whether each candidate lies in TriSampler's quasi-triangular region (see
    /// [`SamplerKind::TriSampler`]); computed in f64.
    pub fn tri_region(
        &self,
        max_angle_deg: f64,
        require_closer_to_positive: bool,
    ) -> Result<Vec<bool>> {
        if self.dim == 0 || !self.candidates.len().is_multiple_of(self.dim) {
            return Err(Error::InvalidArgument(format!(
                "pool geometry: {} candidate floats is not a multiple of dim {}",
                self.candidates.len(),
                self.dim
            )));
        }
        self.check(self.candidates.len() / self.dim)?;
        let (q, p) = (self.query, self.positive);
        // u = d+ - q, the triangle's edge from the query vertex
        let u: Vec<f64> = p
            .iter()
            .zip(q)
            .map(|(&a, &b)| a as f64 - b as f64)
            .collect();
        let u_norm = u.iter().map(|x| x * x).sum::<f64>().sqrt();
        Ok(self
            .candidates
            .chunks_exact(self.dim)
            .map(|c| {
                let (mut uv, mut vv) = (0.0f64, 0.0f64);
                for ((&ci, &qi), &ui) in c.iter().zip(q).zip(&u) {
                    let v = ci as f64 - qi as f64;
                    uv += ui * v;
                    vv += v * v;
                }
                let denom = u_norm * vv.sqrt();
                if denom == 0.0 {
                    return false; // angle undefined: a degenerate triangle is not in the region
                }
                let angle = (uv / denom).clamp(-1.0, 1.0).acos().to_degrees();
                angle < max_angle_deg && (!require_closer_to_positive || dot(p, c) > dot(q, c))
            })
            .collect())
    }
}

/// `-a (s - pos - b)^2` in f64: squaring f32 scores in f64 cannot overflow.
fn gaussian_log_weight(s: f32, pos: f32, a: f64, b: f64) -> f64 {
    let d = s as f64 - pos as f64 - b;
    -a * d * d
}

/// Log weight of each candidate of one query's pool: `scores[i]` is the raw similarity (before
/// 1/tau) of candidate i in pool rank order, `pos_score` that of the positive used in this example.
/// Excluded candidates get `f64::NEG_INFINITY`; the rest are finite. TriSampler needs `geometry`
/// (covering the same candidates); the other samplers ignore it. Non-finite scores, bad knobs or
/// a missing/mis-sized geometry are `InvalidArgument`.
pub fn log_weights(
    kind: &SamplerKind,
    scores: &[f32],
    pos_score: f32,
    geometry: Option<&PoolGeometry>,
) -> Result<Vec<f64>> {
    kind.validate()?;
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "sampler {}: score of candidate {i} is {}",
            kind.name(),
            scores[i]
        )));
    }
    if !matches!(kind, SamplerKind::Uniform { .. }) && !pos_score.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "sampler {}: positive score is {pos_score}",
            kind.name()
        )));
    }
    let k = scores.len();
    Ok(match *kind {
        SamplerKind::Uniform {
            range_min,
            range_max,
        } => {
            let end = range_max.unwrap_or(k).min(k);
            (0..k)
                .map(|i| {
                    if i >= range_min && i < end {
                        0.0
                    } else {
                        f64::NEG_INFINITY
                    }
                })
                .collect()
        }
        SamplerKind::SimAns { a, b } => scores
            .iter()
            .map(|&s| gaussian_log_weight(s, pos_score, a, b))
            .collect(),
        SamplerKind::TriSampler {
            max_angle_deg,
            require_closer_to_positive,
        } => {
            let g = geometry.ok_or_else(|| {
                Error::InvalidArgument(
                    "sampler trisampler needs the pool geometry (query, positive and candidate embeddings)"
                        .into(),
                )
            })?;
            g.check(k)?;
            let region = g.tri_region(max_angle_deg, require_closer_to_positive)?;
            let any_in = region.iter().any(|&r| r);
            scores
                .iter()
                .zip(&region)
                .map(|(&s, &inside)| {
                    if inside || !any_in {
                        gaussian_log_weight(s, pos_score, 0.25, 0.0)
                    } else {
                        f64::NEG_INFINITY
                    }
                })
                .collect()
        }
        SamplerKind::Rrra { .. } => {
            return Err(Error::InvalidArgument(
                "sampler rrra needs the adapter's false-negative scores: use rrra_log_weights"
                    .into(),
            ))
        }
    })
}

/// RRRA's log weights `log s_HN + gamma · log(1 − s_FN)` for one pool (raw similarities `scores`
/// and false-negative scores `s_fn` in pool order; see [`SamplerKind::Rrra`]). A candidate with
/// `s_FN = 1` gets `-inf` when gamma > 0 (never drawn).
pub fn rrra_log_weights(
    scores: &[f32],
    s_fn: &[f32],
    tau: f32,
    gamma: f64,
    t_h: f64,
) -> Result<Vec<f64>> {
    if scores.len() != s_fn.len() {
        return Err(Error::InvalidArgument(format!(
            "sampler rrra: {} scores but {} false-negative scores",
            scores.len(),
            s_fn.len()
        )));
    }
    if let Some(i) =
        (0..scores.len()).find(|&i| !scores[i].is_finite() || !(0.0..=1.0).contains(&s_fn[i]))
    {
        return Err(Error::InvalidArgument(format!(
            "sampler rrra: candidate {i} has score {} and false-negative score {}",
            scores[i], s_fn[i]
        )));
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let scale = 1.0 / (tau as f64 * t_h);
    Ok(scores
        .iter()
        .zip(s_fn)
        .map(|(&s, &f)| {
            let fn_term = if gamma == 0.0 {
                0.0
            } else {
                gamma * (-(f as f64)).ln_1p()
            };
            (s as f64 - max) * scale + fn_term
        })
        .collect())
}

/// Gumbel-top-n: the indices of `n` candidates drawn without replacement, each draw choosing among
/// the remaining candidates with probability ∝ `exp(log_w)` (successive sampling, Plackett–Luce).
/// Candidate i's key is `log_w[i] + G_i` with `G_i = stream.gumbel_at(i)`, so a draw is a pure
/// function of the weights and the stream. Only finite log weights are eligible (`-inf`, `+inf`
/// and NaN never are); fewer than `n` indices come back when fewer are eligible. The order is the
/// draw order: key descending, ties by index, so the first `m` of a draw of `n` are the draw of `m`.
pub fn sample_without_replacement(log_w: &[f64], n: usize, stream: &Stream) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let mut keys: Vec<(f64, usize)> = log_w
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| (l + stream.gumbel_at(i as u64), i))
        .collect();
    // keys are never NaN (finite + finite); the fallback only guards the comparator's totality
    let by_key = |x: &(f64, usize), y: &(f64, usize)| {
        y.0.partial_cmp(&x.0)
            .unwrap_or(Ordering::Equal)
            .then(x.1.cmp(&y.1))
    };
    if n < keys.len() {
        keys.select_nth_unstable_by(n - 1, by_key);
        keys.truncate(n);
    }
    keys.sort_unstable_by(by_key);
    keys.into_iter().map(|(_, i)| i).collect()
}

/// The exact probability that each candidate is the first draw: the softmax of `log_w`, computed
/// with the largest finite log weight subtracted first so nothing underflows to 0/0. Non-finite
/// entries get 0 (as in [`sample_without_replacement`]); with no finite entry, all are 0.
pub fn first_draw_probabilities(log_w: &[f64]) -> Vec<f64> {
    let max = log_w
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return vec![0.0; log_w.len()];
    }
    let e: Vec<f64> = log_w
        .iter()
        .map(|&l| if l.is_finite() { (l - max).exp() } else { 0.0 })
        .collect();
    let sum: f64 = e.iter().sum(); // >= 1: the maximum contributes exp(0)
    e.into_iter().map(|x| x / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::rng::Site;

    const DRAWS: u64 = 200_000;

    /// Counts how often each candidate is the first draw over `DRAWS` independent streams, and
    /// checks every frequency against `first_draw_probabilities` within 5 standard errors
    /// `sqrt(p (1 - p) / N)`: a false alarm per candidate has probability ~6e-7, and a
    /// zero-probability candidate must never be drawn.
    fn check_first_draw_frequencies(log_w: &[f64], seed: u64) {
        let p = first_draw_probabilities(log_w);
        let mut counts = vec![0u64; log_w.len()];
        for draw in 0..DRAWS {
            let s = Stream::new(seed, draw, 0, 0, Site::Sampler);
            let picked = sample_without_replacement(log_w, 1, &s);
            assert_eq!(picked.len(), 1);
            counts[picked[0]] += 1;
        }
        for (i, (&c, &pi)) in counts.iter().zip(&p).enumerate() {
            let freq = c as f64 / DRAWS as f64;
            let se = (pi * (1.0 - pi) / DRAWS as f64).sqrt();
            assert!(
                (freq - pi).abs() <= 5.0 * se,
                "candidate {i}: frequency {freq} vs probability {pi} (se {se}); log_w {log_w:?}"
            );
        }
    }

    /// Weights of the first-draw checks must not be near-uniform, or the check says little.
    fn assert_varied(p: &[f64]) {
        let positive: Vec<f64> = p.iter().copied().filter(|&x| x > 0.0).collect();
        let (lo, hi) = positive
            .iter()
            .fold((1.0f64, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        assert!(hi > 3.0 * lo, "probabilities too even: {p:?}");
    }

    fn uniform(range_min: usize, range_max: Option<usize>) -> SamplerKind {
        SamplerKind::Uniform {
            range_min,
            range_max,
        }
    }

    fn tri(max_angle_deg: f64, require_closer_to_positive: bool) -> SamplerKind {
        SamplerKind::TriSampler {
            max_angle_deg,
            require_closer_to_positive,
        }
    }

    // 2-d TriSampler pool: q = (0, -1), d+ = (0, 2); candidates placed inside and outside the region.
    const Q: [f32; 2] = [0.0, -1.0];
    const P: [f32; 2] = [0.0, 2.0];
    const CANDS: [[f32; 2]; 10] = [
        [0.1, 2.0],
        [0.5, 1.0],
        [-0.8, 0.5],
        [1.5, 3.5],
        [3.0, 0.5],   // angle ~63° at q: outside by angle only
        [0.05, -0.6], // small angle but <d+,c> < <q,c>: outside by the second condition only
        [-2.0, 1.0],
        [0.0, -3.0], // opposite direction
        [0.3, 5.0],
        [-0.2, -0.3], // small angle, closer to q
    ];

    fn flat(cands: &[[f32; 2]]) -> Vec<f32> {
        cands.iter().flatten().copied().collect()
    }

    fn dot2(a: [f32; 2], b: [f32; 2]) -> f32 {
        a[0] * b[0] + a[1] * b[1]
    }

    /// Region membership computed independently of the implementation: the angle at q by atan2
    /// of the two edge directions, and the dot-product condition.
    fn expected_region(cands: &[[f32; 2]], max_angle_deg: f64, closer: bool) -> Vec<bool> {
        let dir = |c: [f32; 2]| ((c[1] - Q[1]) as f64).atan2((c[0] - Q[0]) as f64);
        cands
            .iter()
            .map(|&c| {
                let mut diff = (dir(c) - dir(P)).abs().to_degrees();
                if diff > 180.0 {
                    diff = 360.0 - diff;
                }
                diff < max_angle_deg && (!closer || dot2(P, c) > dot2(Q, c))
            })
            .collect()
    }

    #[test]
    fn uniform_first_draw_frequencies() {
        let scores: Vec<f32> = (0..10).map(|i| 0.9 - 0.05 * i as f32).collect();
        let log_w = log_weights(&uniform(2, Some(7)), &scores, 0.95, None).unwrap();
        let p = first_draw_probabilities(&log_w);
        for (i, &pi) in p.iter().enumerate() {
            let expect = if (2..7).contains(&i) { 1.0 / 5.0 } else { 0.0 };
            assert!((pi - expect).abs() < 1e-15, "{i}: {pi}");
        }
        check_first_draw_frequencies(&log_w, 11);
    }

    #[test]
    fn simans_first_draw_frequencies() {
        // dot-product scale scores, so (s - s+ - b)^2 spans 0..~25 and probabilities vary widely
        let scores = [
            84.0f32, 82.5, 81.0, 80.4, 79.0, 78.2, 77.5, 76.0, 73.0, 70.0,
        ];
        let kind = SamplerKind::SimAns { a: 0.5, b: 0.5 };
        let log_w = log_weights(&kind, &scores, 80.0, None).unwrap();
        let p = first_draw_probabilities(&log_w);
        assert_varied(&p);
        check_first_draw_frequencies(&log_w, 12);
    }

    #[test]
    fn trisampler_first_draw_frequencies() {
        let cands = flat(&CANDS);
        let g = PoolGeometry {
            query: &Q,
            positive: &P,
            candidates: &cands,
            dim: 2,
        };
        let scores: Vec<f32> = CANDS.iter().map(|&c| dot2(Q, c)).collect();
        let log_w = log_weights(&tri(60.0, true), &scores, dot2(Q, P), Some(&g)).unwrap();
        let region = expected_region(&CANDS, 60.0, true);
        // the pool must exercise both inclusion and exclusion
        assert!(region.iter().filter(|&&r| r).count() >= 4 && region.iter().any(|&r| !r));
        for (i, (&l, &inside)) in log_w.iter().zip(&region).enumerate() {
            assert_eq!(l.is_finite(), inside, "candidate {i}");
        }
        assert_varied(&first_draw_probabilities(&log_w));
        check_first_draw_frequencies(&log_w, 13);
    }

    #[test]
    fn two_without_replacement_match_successive_sampling() {
        let log_w = [0.3f64, -0.4, 1.1, -1.5];
        let p = first_draw_probabilities(&log_w);
        let k = log_w.len();
        // exact ordered-pair probabilities P(i then j) = p_i p_j / (1 - p_i), and inclusion
        let mut pair = vec![vec![0.0f64; k]; k];
        let mut incl = vec![0.0f64; k];
        for i in 0..k {
            for j in 0..k {
                if i != j {
                    pair[i][j] = p[i] * p[j] / (1.0 - p[i]);
                    incl[i] += pair[i][j];
                    incl[j] += pair[i][j];
                }
            }
        }
        let total: f64 = pair.iter().flatten().sum();
        assert!((total - 1.0).abs() < 1e-12, "{total}");
        let mut pair_counts = vec![vec![0u64; k]; k];
        let mut incl_counts = vec![0u64; k];
        for draw in 0..DRAWS {
            let s = Stream::new(21, draw, 3, 0, Site::Sampler);
            let picked = sample_without_replacement(&log_w, 2, &s);
            assert_eq!(picked.len(), 2);
            assert_ne!(picked[0], picked[1], "index returned twice");
            pair_counts[picked[0]][picked[1]] += 1;
            incl_counts[picked[0]] += 1;
            incl_counts[picked[1]] += 1;
        }
        let n = DRAWS as f64;
        // 5 standard errors of a binomial proportion, as in the first-draw checks
        let close = |c: u64, q: f64| (c as f64 / n - q).abs() <= 5.0 * (q * (1.0 - q) / n).sqrt();
        for i in 0..k {
            assert!(
                close(incl_counts[i], incl[i]),
                "inclusion {i}: {} vs {}",
                incl_counts[i],
                incl[i]
            );
            for j in 0..k {
                assert!(
                    close(pair_counts[i][j], pair[i][j]),
                    "pair ({i},{j}): {} vs {}",
                    pair_counts[i][j],
                    pair[i][j]
                );
            }
        }
    }

    #[test]
    fn draws_are_deterministic_prefix_consistent_and_distinct() {
        let log_w: Vec<f64> = (0..30).map(|i| -(i as f64) * 0.1).collect();
        let mut differs = false;
        for draw in 0..500 {
            let s = Stream::new(5, draw, 0, 0, Site::Sampler);
            let a = sample_without_replacement(&log_w, 8, &s);
            assert_eq!(a, sample_without_replacement(&log_w, 8, &s));
            // draw order: the first m of a draw of n are the draw of m
            assert_eq!(a[..3], sample_without_replacement(&log_w, 3, &s)[..]);
            let mut sorted = a.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 8);
            let other = Stream::new(5, draw, 1, 0, Site::Sampler);
            differs |= a != sample_without_replacement(&log_w, 8, &other);
        }
        assert!(differs);
        // all eligible candidates, in key order, when n exceeds the pool
        let s = Stream::new(5, 0, 0, 0, Site::Sampler);
        let all = sample_without_replacement(&log_w, 100, &s);
        assert_eq!(all.len(), 30);
        let keys: Vec<f64> = all
            .iter()
            .map(|&i| log_w[i] + s.gumbel_at(i as u64))
            .collect();
        assert!(keys.windows(2).all(|w| w[0] >= w[1]));
        assert!(sample_without_replacement(&log_w, 0, &s).is_empty());
    }

    #[test]
    fn only_finite_log_weights_are_eligible() {
        let log_w = [0.0, f64::NAN, f64::NEG_INFINITY, f64::INFINITY, -1.0];
        for draw in 0..200 {
            let s = Stream::new(9, draw, 0, 0, Site::Sampler);
            let mut picked = sample_without_replacement(&log_w, 5, &s);
            picked.sort_unstable();
            assert_eq!(picked, [0, 4]);
        }
        let p = first_draw_probabilities(&log_w);
        let e = (-1.0f64).exp();
        let expect = [1.0 / (1.0 + e), 0.0, 0.0, 0.0, e / (1.0 + e)];
        for (a, b) in p.iter().zip(expect) {
            assert!((a - b).abs() < 1e-15, "{p:?}");
        }
        let none = [f64::NEG_INFINITY; 3];
        assert_eq!(first_draw_probabilities(&none), [0.0; 3]);
        assert!(
            sample_without_replacement(&none, 2, &Stream::new(9, 0, 0, 0, Site::Sampler))
                .is_empty()
        );
    }

    #[test]
    fn log_space_survives_extreme_scores() {
        // log weights near -1e4: naive exp gives 0/0. Expected from the linear weights 1, 1/2, 1/4.
        // Tolerance 1e-11: l - max is rounded at ulp(1e4) ~ 2e-12, a relative error of exp that size.
        let w = [1.0f64, 0.5, 0.25];
        let log_w: Vec<f64> = w
            .iter()
            .map(|x| x.ln() - 1e4)
            .chain([f64::NEG_INFINITY])
            .collect();
        assert_eq!(log_w.iter().map(|l| l.exp()).sum::<f64>(), 0.0);
        let p = first_draw_probabilities(&log_w);
        let sum_w: f64 = w.iter().sum();
        for (i, &wi) in w.iter().enumerate() {
            assert!((p[i] - wi / sum_w).abs() < 1e-11, "{p:?}");
        }
        assert_eq!(p[3], 0.0);

        // a constant shift of every log weight leaves every draw unchanged
        let base: Vec<f64> = w.iter().map(|x| x.ln()).collect();
        for draw in 0..1000 {
            let s = Stream::new(3, draw, 0, 0, Site::Sampler);
            assert_eq!(
                sample_without_replacement(&base, 2, &s),
                sample_without_replacement(&log_w[..3], 2, &s)
            );
        }

        // SimANS on raw scores ~1e3, on cosine / tau with tau = 0.01, and with the positive far from
        // every candidate (all log weights ~ -4e5): probabilities finite and summing to 1, and equal
        // to the softmax written as 1 / sum_j exp(l_j - l_i), a different evaluation order.
        let tau = 0.01f32;
        let cases: [(Vec<f32>, f32); 3] = [
            (vec![1000.0, 1003.0, 990.0, 1020.0], 1001.0),
            (
                [0.9f32, 0.2, -0.5, 0.85].iter().map(|c| c / tau).collect(),
                0.95 / tau,
            ),
            (
                [0.9f32, 0.2, -0.5, 0.85].iter().map(|c| c / tau).collect(),
                1000.0,
            ),
        ];
        let kind = SamplerKind::SimAns { a: 0.5, b: 0.0 };
        for (scores, pos) in &cases {
            let lw = log_weights(&kind, scores, *pos, None).unwrap();
            for (&l, &s) in lw.iter().zip(scores) {
                let d = s as f64 - *pos as f64;
                assert_eq!(l, -0.5 * d * d);
            }
            let p = first_draw_probabilities(&lw);
            assert!(p.iter().all(|x| x.is_finite() && *x >= 0.0), "{p:?}");
            assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            for (i, &pi) in p.iter().enumerate() {
                let alt = 1.0 / lw.iter().map(|&lj| (lj - lw[i]).exp()).sum::<f64>();
                assert!((pi - alt).abs() < 1e-12, "{i}: {pi} vs {alt}");
            }
            let s = Stream::new(1, 0, 0, 0, Site::Sampler);
            assert_eq!(sample_without_replacement(&lw, 4, &s).len(), 4);
        }
        // the far-positive case is one where every exp underflows
        let lw = log_weights(&kind, &cases[2].0, cases[2].1, None).unwrap();
        assert_eq!(lw.iter().map(|l| l.exp()).sum::<f64>(), 0.0);
    }

    #[test]
    fn uniform_rank_range() {
        let scores = [0.5f32; 8];
        let in_range = |kind: SamplerKind, k: usize| -> Vec<usize> {
            let lw = log_weights(&kind, &scores[..k], 0.0, None).unwrap();
            assert!(lw.iter().all(|&l| l == 0.0 || l == f64::NEG_INFINITY));
            (0..k).filter(|&i| lw[i].is_finite()).collect()
        };
        assert_eq!(in_range(uniform(2, Some(5)), 8), [2, 3, 4]);
        assert_eq!(in_range(uniform(0, None), 8), (0..8).collect::<Vec<_>>());
        assert_eq!(in_range(uniform(3, None), 8), [3, 4, 5, 6, 7]);
        // range_max beyond the pool is clipped; a pool shorter than range_min has no candidate
        assert_eq!(in_range(uniform(1, Some(100)), 4), [1, 2, 3]);
        assert!(in_range(uniform(6, Some(10)), 5).is_empty());
        for draw in 0..2000 {
            let lw = log_weights(&uniform(2, Some(5)), &scores, 0.0, None).unwrap();
            let s = Stream::new(4, draw, 0, 0, Site::Sampler);
            assert!(sample_without_replacement(&lw, 2, &s)
                .iter()
                .all(|i| (2..5).contains(i)));
        }
    }

    #[test]
    fn simans_peaks_at_positive_plus_b() {
        let (pos, b, a) = (0.5f32, 0.25f64, 2.0f64);
        let peak = pos as f64 + b;
        // exactly representable scores on a grid around the peak, the peak among them
        let scores: Vec<f32> = (0..9)
            .map(|i| (peak - 0.5 + 0.125 * i as f64) as f32)
            .collect();
        let lw = log_weights(&SamplerKind::SimAns { a, b }, &scores, pos, None).unwrap();
        let argmax = (0..lw.len())
            .max_by(|&i, &j| lw[i].total_cmp(&lw[j]))
            .unwrap();
        assert_eq!(scores[argmax] as f64, peak);
        assert_eq!(lw[argmax], 0.0);
        // symmetric about the peak, decreasing away from it
        for d in 1..=4 {
            assert_eq!(lw[argmax - d], lw[argmax + d]);
            assert!(lw[argmax + d] < lw[argmax + d - 1]);
        }
        // the paper's sign: s+ + b is favoured over s+ - b (the official code's `+b` would reverse it)
        let lw2 = log_weights(
            &SamplerKind::SimAns { a, b },
            &[pos + 0.25, pos - 0.25],
            pos,
            None,
        )
        .unwrap();
        assert!(lw2[0] > lw2[1]);
        for (&l, &s) in lw.iter().zip(&scores) {
            assert_eq!(l, -a * (s as f64 - pos as f64 - b).powi(2));
        }
    }

    #[test]
    fn trisampler_region_and_fallback() {
        let cands = flat(&CANDS);
        let g = PoolGeometry {
            query: &Q,
            positive: &P,
            candidates: &cands,
            dim: 2,
        };
        let scores: Vec<f32> = CANDS.iter().map(|&c| dot2(Q, c)).collect();
        let pos = dot2(Q, P);
        for (angle, closer) in [
            (60.0, true),
            (60.0, false),
            (90.0, true),
            (180.0, false),
            (10.0, true),
        ] {
            let expect = expected_region(&CANDS, angle, closer);
            assert_eq!(
                g.tri_region(angle, closer).unwrap(),
                expect,
                "{angle} {closer}"
            );
            let lw = log_weights(&tri(angle, closer), &scores, pos, Some(&g)).unwrap();
            for (i, &l) in lw.iter().enumerate() {
                let unrestricted = -(scores[i] as f64 - pos as f64).powi(2) / 4.0;
                assert_eq!(
                    l,
                    if expect[i] {
                        unrestricted
                    } else {
                        f64::NEG_INFINITY
                    }
                );
            }
        }
        // candidate 4 is excluded by the angle alone, candidate 5 by the dot-product condition alone
        assert!(!expected_region(&CANDS, 60.0, true)[4] && expected_region(&CANDS, 90.0, true)[4]);
        assert!(!expected_region(&CANDS, 60.0, true)[5] && expected_region(&CANDS, 60.0, false)[5]);

        // fallback: a pool with no candidate in the region gets the un-restricted weights
        let outside = [CANDS[4], CANDS[5], CANDS[7], CANDS[9]];
        assert!(expected_region(&outside, 60.0, true).iter().all(|&r| !r));
        let out_flat = flat(&outside);
        let g_out = PoolGeometry {
            candidates: &out_flat,
            ..g
        };
        let out_scores: Vec<f32> = outside.iter().map(|&c| dot2(Q, c)).collect();
        let lw = log_weights(&tri(60.0, true), &out_scores, pos, Some(&g_out)).unwrap();
        for (&l, &s) in lw.iter().zip(&out_scores) {
            assert_eq!(l, -(s as f64 - pos as f64).powi(2) / 4.0);
        }

        // a candidate equal to the query has no angle: outside
        let degenerate = flat(&[Q, CANDS[0]]);
        let g_deg = PoolGeometry {
            candidates: &degenerate,
            ..g
        };
        assert_eq!(g_deg.tri_region(180.0, false).unwrap(), [false, true]);

        // geometry is required and must match the pool
        assert!(matches!(
            log_weights(&tri(60.0, true), &scores, pos, None),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            log_weights(&tri(60.0, true), &scores[..9], pos, Some(&g)),
            Err(Error::InvalidArgument(_))
        ));
        let short_q = [0.0f32];
        let g_bad = PoolGeometry {
            query: &short_q,
            ..g
        };
        assert!(matches!(
            log_weights(&tri(60.0, true), &scores, pos, Some(&g_bad)),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn parse_validate_and_serde() {
        assert_eq!(SamplerKind::parse("uniform").unwrap(), uniform(0, None));
        assert_eq!(
            SamplerKind::parse(" SimANS ").unwrap(),
            SamplerKind::SimAns { a: 0.5, b: 0.0 }
        );
        assert_eq!(SamplerKind::parse("trisampler").unwrap(), tri(60.0, true));
        assert_eq!(
            SamplerKind::parse("simans:a=1.5, b=-0.1").unwrap(),
            SamplerKind::SimAns { a: 1.5, b: -0.1 }
        );
        assert_eq!(
            SamplerKind::parse("uniform:range_min=5,range_max=100").unwrap(),
            uniform(5, Some(100))
        );
        assert_eq!(
            SamplerKind::parse("trisampler:max_angle_deg=45,require_closer_to_positive=false")
                .unwrap(),
            tri(45.0, false)
        );

        let err = |s: &str| match SamplerKind::parse(s) {
            Err(Error::InvalidArgument(msg)) => msg,
            other => panic!("{s}: expected InvalidArgument, got {other:?}"),
        };
        let msg = err("ance");
        assert!(SAMPLER_NAMES.iter().all(|n| msg.contains(n)), "{msg}");
        assert!(err("simans:c=1").contains("a, b"));
        for bad in [
            "simans:a=0",
            "simans:a=-1",
            "simans:a=inf",
            "simans:a=NaN",
            "simans:b=inf",
            "simans:a",
            "simans:a=x",
            "uniform:range_min=5,range_max=5",
            "uniform:range_max=0",
            "uniform:range_min=-1",
            "trisampler:max_angle_deg=0",
            "trisampler:max_angle_deg=180.5",
            "trisampler:max_angle_deg=NaN",
            "trisampler:require_closer_to_positive=yes",
        ] {
            err(bad);
        }
        assert!(tri(180.0, true).validate().is_ok());
        // log_weights validates too
        assert!(log_weights(&SamplerKind::SimAns { a: 0.0, b: 0.0 }, &[0.1], 0.2, None).is_err());
        assert!(log_weights(
            &SamplerKind::SimAns { a: 1.0, b: 0.0 },
            &[f32::NAN],
            0.2,
            None
        )
        .is_err());
        assert!(log_weights(
            &SamplerKind::SimAns { a: 1.0, b: 0.0 },
            &[0.1],
            f32::INFINITY,
            None
        )
        .is_err());

        // Display is read back by parse; serde keeps the knobs under the sampler's name
        for kind in [
            uniform(0, None),
            uniform(3, Some(50)),
            SamplerKind::SimAns { a: 0.3, b: -0.05 },
            tri(47.5, false),
        ] {
            assert_eq!(SamplerKind::parse(&kind.to_string()).unwrap(), kind);
            assert_eq!(kind.to_string().parse::<SamplerKind>().unwrap(), kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert!(
                json.contains(&format!("\"name\":\"{}\"", kind.name())),
                "{json}"
            );
            assert_eq!(serde_json::from_str::<SamplerKind>(&json).unwrap(), kind);
        }
    }
}
