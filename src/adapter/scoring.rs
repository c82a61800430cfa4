//! The adapter's fused scoring op, forward and backward, on the CPU (the reference the CUDA
//! kernel is checked against).
//!
//! For each query `q` and each of its K candidates `c` it computes (see [`super`])
//! `a = c + W2·GELU(W1·z + b1) + b2` with `z = [q − c ; q ⊙ c ; q + c]`, then
//! `alpha = clip(<a − c, q − c>/||q − c||², 0, 1)`, `QA = cos(q, a)`, `CA = cos(a, c)`,
//! `logit = beta·(QA − CA) + beta0` and `p = sigmoid(logit)`.
//!
//! # Fused algebra
//! With `W1 = [W1a | W1b | W1c]` split into its three `h × d` column blocks,
//! ```text
//! W1·z = W1a(q − c) + W1b(q ⊙ c) + W1c(q + c)
//!      = (W1a + W1c)·q  +  (W1c − W1a)·c  +  (W1b·diag(q))·c
//!      = u_q + M_q·c,     u_q = (W1a + W1c)·q + b1,   M_q = (W1c − W1a) + W1b·diag(q)
//! ```
//! `u_q` (h) is formed once per query, and `M_q·c = (W1c − W1a)·c + W1b·(q ⊙ c)` is one product
//! of the pair's features `[c ; q ⊙ c]` (2d) with the fixed `[W1c − W1a | W1b]` (h × 2d,
//! `FusedWeights`, built once per parameter set): a pair costs about 2·h·d multiply-adds for
//! the first layer and h·d for `W2·g`, against 3d·h + h·d for building `z` and applying `W1`
//! naively, and `z` (3d per pair) is never materialised. The Hadamard term costs h·d per pair
//! either way because it mixes q and c; the two linear terms do not, which is why they fold into
//! per-query and per-candidate work (a kernel scoring one candidate pool against many queries
//! would compute `(W1c − W1a)·c` once per candidate). The K pairs of a query are batched as
//! GEMMs (`cpu::gemm::linear`). The serving path ([`super::serving::query_logits`], one query,
//! k ≈ 100) forms `M_q` itself instead (h·d once per query) and applies it to the candidates:
//! h·d per pair for the first layer, 2·h·d in all.
//!
//! # Backward
//! The forward keeps a cache of the pre-activations `W1·z + b1` (`[P × h]`) and the adapted
//! points `a` (`[P × d]`), P = Q·K; the cosines and norms are recomputed (O(d) per pair) rather
//! than stored. Per pair, with `s = ∂L/∂logit · beta`:
//! `∂L/∂a = s·(∂QA/∂a − ∂CA/∂a) + ∂L/∂a|extra`, `∂L/∂pre = (W2ᵀ ∂L/∂a) ⊙ GELU'(pre)`. The
//! parameter gradients then follow from the same algebra: with `δ = ∂L/∂pre` and
//! `δu_q = Σ_k δ_k`,
//! `∂W1a = Σ_q δu_q qᵀ − Σ_p δ cᵀ`, `∂W1c = Σ_q δu_q qᵀ + Σ_p δ cᵀ`, `∂W1b = Σ_p δ (q ⊙ c)ᵀ`,
//! `∂W2 = Σ_p ∂a · GELU(pre)ᵀ`; and for the inputs
//! `∂c = ∂a + M_qᵀ δ + (cosine terms)`, `∂q = (W1a + W1c)ᵀ δu_q + Σ_k c ⊙ (W1bᵀ δ_k) + (cosine terms)`.
//! alpha is an output only (it enters the normalisation loss, whose gradient arrives as the
//! extra `∂L/∂a`), so nothing flows back through it here.
//!
//! # Precision and determinism
//! Matrix products in f32; cosines, norms, alpha, the logit and every parameter-gradient sum in
//! f64. Work is split over queries with rayon, and each parameter-gradient element is one
//! serial f64 sum over the pairs in pair order (parallel only over parameter rows), so every
//! result is bitwise the same for any number of threads.

use rayon::prelude::*;

use super::{sigmoid, AdapterParams};
use crate::cpu::gemm::linear;
use crate::cpu::math::{erf, exp, gelu, gelu_inplace};
use crate::error::{Error, Result};

/// Norms below this are clamped (as `cpu::math::l2_normalize` does): a zero vector has cosine 0.
const NORM_EPS: f64 = 1e-12;

/// What [`backward`] needs from the forward pass.
#[derive(Debug, Clone)]
pub struct AdapterCache {
    nq: usize,
    k: usize,
    d: usize,
    h: usize,
    pre: Vec<f32>,
    a: Vec<f32>,
}

impl AdapterCache {
    /// The adapted points `a`, `[Q × K × d]` (input of [`super::normalisation_loss`]).
    pub fn a(&self) -> &[f32] {
        &self.a
    }

    /// The MLP pre-activations `W1·z + b1`, `[Q × K × h]`.
    pub fn pre(&self) -> &[f32] {
        &self.pre
    }
}

/// Per-pair results of [`score`], each `[Q × K]` (pair k of query i at `i*K + k`).
#[derive(Debug, Clone)]
pub struct AdapterOutput {
    /// `sigmoid(logit)`: the estimate that the candidate is relevant to the query.
    pub p: Vec<f32>,
    /// `beta·(QA − CA) + beta0`.
    pub logit: Vec<f32>,
    /// `cos(q, a)`.
    pub qa: Vec<f32>,
    /// `cos(a, c)`.
    pub ca: Vec<f32>,
    /// Position of `a` along the segment from c (0) to q (1), clipped.
    pub alpha: Vec<f32>,
    /// Kept for [`backward`].
    pub cache: AdapterCache,
}

/// Dot products and norms of one pair, in f64.
struct Geometry {
    nq: f64,
    na: f64,
    nc: f64,
    qa: f64,
    ca: f64,
    /// `1/|x|²` where the norm is above the clamp, else 0 (the clamped norm is a constant).
    inv_qq: f64,
    inv_aa: f64,
    inv_cc: f64,
    alpha: f64,
}

fn geometry(q: &[f32], c: &[f32], a: &[f32]) -> Geometry {
    let [qq, aa, cc, qa, ac, num, den] = geometry_sums(q, c, a);
    let norm = |x2: f64| x2.sqrt().max(NORM_EPS);
    let inv = |x2: f64| {
        if x2.sqrt() > NORM_EPS {
            1.0 / x2
        } else {
            0.0
        }
    };
    let (nq, na, nc) = (norm(qq), norm(aa), norm(cc));
    // q = c leaves the segment undefined: alpha 0 by definition (a at the candidate's end).
    let alpha = if den > 0.0 {
        (num / den).clamp(0.0, 1.0)
    } else {
        0.0
    };
    Geometry {
        nq,
        na,
        nc,
        qa: qa / (nq * na),
        ca: ac / (na * nc),
        inv_qq: inv(qq),
        inv_aa: inv(aa),
        inv_cc: inv(cc),
        alpha,
    }
}

/// One pair's sums `[|q|², |a|², |c|², <q,a>, <a,c>, <a − c, q − c>, |q − c|²]` in f64, each
/// over four interleaved partial sums combined in a fixed order, the elements past a multiple
/// of four added last. With AVX2 the four lanes are one register per sum; the scalar loop does
/// the same operations in the same order, so every machine gives the same bits.
fn geometry_sums(q: &[f32], c: &[f32], a: &[f32]) -> [f64; 7] {
    let n = q.len().min(c.len()).min(a.len());
    let body = n / 4 * 4;
    #[cfg(target_arch = "x86_64")]
    let lanes = if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present; the slices hold at least `body` elements.
        unsafe { geometry_lanes_avx2(&q[..body], &c[..body], &a[..body]) }
    } else {
        geometry_lanes(&q[..body], &c[..body], &a[..body])
    };
    #[cfg(not(target_arch = "x86_64"))]
    let lanes = geometry_lanes(&q[..body], &c[..body], &a[..body]);
    let mut sums = lanes.map(|s| (s[0] + s[1]) + (s[2] + s[3]));
    for i in body..n {
        let (qv, cv, av) = (q[i] as f64, c[i] as f64, a[i] as f64);
        for (s, t) in sums.iter_mut().zip(pair_terms(qv, cv, av)) {
            *s += t;
        }
    }
    sums
}

/// The seven terms of one element of [`geometry_sums`].
#[inline(always)]
fn pair_terms(qv: f64, cv: f64, av: f64) -> [f64; 7] {
    let (dq, da) = (qv - cv, av - cv);
    [
        qv * qv,
        av * av,
        cv * cv,
        qv * av,
        av * cv,
        da * dq,
        dq * dq,
    ]
}

/// [`geometry_sums`]' four-lane partial sums over slices of a multiple of four elements.
fn geometry_lanes(q: &[f32], c: &[f32], a: &[f32]) -> [[f64; 4]; 7] {
    let mut acc = [[0.0f64; 4]; 7];
    for ((q4, c4), a4) in q
        .chunks_exact(4)
        .zip(c.chunks_exact(4))
        .zip(a.chunks_exact(4))
    {
        for l in 0..4 {
            let terms = pair_terms(q4[l] as f64, c4[l] as f64, a4[l] as f64);
            for (s, t) in acc.iter_mut().zip(terms) {
                s[l] += t;
            }
        }
    }
    acc
}

/// [`geometry_lanes`] with one AVX2 register per sum (multiply, then add: no FMA, as the
/// scalar loop).
///
/// # Safety
/// AVX2 present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn geometry_lanes_avx2(q: &[f32], c: &[f32], a: &[f32]) -> [[f64; 4]; 7] {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_pd(); 7];
    for ((q4, c4), a4) in q
        .chunks_exact(4)
        .zip(c.chunks_exact(4))
        .zip(a.chunks_exact(4))
    {
        let qv = _mm256_cvtps_pd(_mm_loadu_ps(q4.as_ptr()));
        let cv = _mm256_cvtps_pd(_mm_loadu_ps(c4.as_ptr()));
        let av = _mm256_cvtps_pd(_mm_loadu_ps(a4.as_ptr()));
        let (dq, da) = (_mm256_sub_pd(qv, cv), _mm256_sub_pd(av, cv));
        let products = [
            _mm256_mul_pd(qv, qv),
            _mm256_mul_pd(av, av),
            _mm256_mul_pd(cv, cv),
            _mm256_mul_pd(qv, av),
            _mm256_mul_pd(av, cv),
            _mm256_mul_pd(da, dq),
            _mm256_mul_pd(dq, dq),
        ];
        for (s, p) in acc.iter_mut().zip(products) {
            *s = _mm256_add_pd(*s, p);
        }
    }
    acc.map(|v| {
        let mut out = [0.0f64; 4];
        _mm256_storeu_pd(out.as_mut_ptr(), v);
        out
    })
}

/// `W1a + W1c` and `W1c − W1a`, each `[h × d]`.
pub(super) fn sum_diff(params: &AdapterParams) -> (Vec<f32>, Vec<f32>) {
    let (d, h) = (params.d, params.h);
    let mut w_sum = vec![0.0f32; h * d];
    let mut w_diff = vec![0.0f32; h * d];
    for j in 0..h {
        let row = &params.w1[j * 3 * d..(j + 1) * 3 * d];
        for l in 0..d {
            w_sum[j * d + l] = row[l] + row[2 * d + l];
            w_diff[j * d + l] = row[2 * d + l] - row[l];
        }
    }
    (w_sum, w_diff)
}

/// The first layer re-cut for the fused product (module docs): `W1a + W1c` (`[h × d]`, applied
/// to the query) and `[W1c − W1a | W1b]` (`[h × 2d]`, applied to a pair's `[c ; q ⊙ c]`),
/// rebuilt per call (training moves the weights; the serving path has its own,
/// [`super::serving::ServingWeights`]).
#[derive(Debug, Clone)]
struct FusedWeights {
    w_sum: Vec<f32>,
    w_pair: Vec<f32>,
}

impl FusedWeights {
    fn of(params: &AdapterParams) -> FusedWeights {
        let (d, h) = (params.d, params.h);
        let (w_sum, w_diff) = sum_diff(params);
        let mut w_pair = vec![0.0f32; h * 2 * d];
        for j in 0..h {
            w_pair[j * 2 * d..j * 2 * d + d].copy_from_slice(&w_diff[j * d..(j + 1) * d]);
            w_pair[j * 2 * d + d..(j + 1) * 2 * d]
                .copy_from_slice(&params.w1[j * 3 * d + d..j * 3 * d + 2 * d]);
        }
        FusedWeights { w_sum, w_pair }
    }
}

/// One query's pairs: pre-activations, adapted points and per-pair statistics
/// `[p, logit, QA, CA, alpha]` into the given slices (`k × h`, `k × d`, `k`). `feats` is
/// scratch of `k × 2d`.
#[allow(clippy::too_many_arguments)]
fn forward_query(
    params: &AdapterParams,
    fused: &FusedWeights,
    q: &[f32],
    c_i: &[f32],
    u_i: &[f32],
    ctx: Option<&[f32]>,
    feats: &mut [f32],
    pre_i: &mut [f32],
    a_i: &mut [f32],
    st_i: &mut [[f32; 5]],
) {
    let (d, h) = (params.d, params.h);
    let k = st_i.len();
    for (f, c) in feats.chunks_exact_mut(2 * d).zip(c_i.chunks_exact(d)) {
        let (fc, fqc) = f.split_at_mut(d);
        fc.copy_from_slice(c);
        for ((o, &qv), &cv) in fqc.iter_mut().zip(q).zip(c) {
            *o = qv * cv;
        }
    }
    // feats holds k × max(2d, h): the features are its first k × 2d
    linear(&feats[..k * 2 * d], k, 2 * d, &fused.w_pair, u_i, h, pre_i);
    if let Some(ctx) = ctx {
        let y = positive_features(c_i, ctx, d);
        let mut extra = vec![0.0f32; k * h];
        linear(&y, k, 2 * d, &params.w1_pos, &vec![0.0; h], h, &mut extra);
        for (p, e) in pre_i.iter_mut().zip(&extra) {
            *p += e;
        }
    }
    // feats is free again now: it holds GELU(pre).
    second_layer(params, q, c_i, pre_i, &mut feats[..k * h], a_i, st_i);
}

/// From one query's pre-activations (`pre_i`, `k × h`) on: `g = GELU(pre)` into `g`,
/// `a = c + W2·g + b2` into `a_i`, and the per-pair statistics `[p, logit, QA, CA, alpha]`.
#[allow(clippy::too_many_arguments)]
fn second_layer(
    params: &AdapterParams,
    q: &[f32],
    c_i: &[f32],
    pre_i: &[f32],
    g: &mut [f32],
    a_i: &mut [f32],
    st_i: &mut [[f32; 5]],
) {
    let (d, h) = (params.d, params.h);
    let k = st_i.len();
    g.copy_from_slice(pre_i);
    // the vectorised form of `gelu`: the same values
    gelu_inplace(g);
    linear(g, k, h, &params.w2, &params.b2, d, a_i);
    // residual last, so W2 = 0, b2 = 0 gives a = c exactly
    for (av, &cv) in a_i.iter_mut().zip(c_i) {
        *av += cv;
    }
    for ((st, c), a) in st_i
        .iter_mut()
        .zip(c_i.chunks_exact(d))
        .zip(a_i.chunks_exact(d))
    {
        *st = pair_stats(params, q, c, a);
    }
}

/// One pair's `[p, logit, QA, CA, alpha]` from its query, candidate and adapted point.
pub(super) fn pair_stats(params: &AdapterParams, q: &[f32], c: &[f32], a: &[f32]) -> [f32; 5] {
    let g = geometry(q, c, a);
    let logit = params.beta as f64 * (g.qa - g.ca) + params.beta0 as f64;
    [
        sigmoid(logit) as f32,
        logit as f32,
        g.qa as f32,
        g.ca as f32,
        g.alpha as f32,
    ]
}

/// Checks the parameters and input shapes; returns the number of queries.
pub(super) fn check_inputs(
    params: &AdapterParams,
    queries: &[f32],
    candidates: &[f32],
    k: usize,
) -> Result<usize> {
    params.check()?;
    let d = params.d;
    let nq = queries.len() / d;
    if k == 0 || nq == 0 || queries.len() != nq * d || candidates.len() != nq * k * d {
        return Err(Error::InvalidArgument(format!(
            "adapter inputs disagree: d = {d}, k = {k}, {} query floats, {} candidate floats \
             (need a non-empty Q × d and Q × k × d)",
            queries.len(),
            candidates.len()
        )));
    }
    Ok(nq)
}

/// Forward pass over `Q` queries (`queries`: `[Q × d]`) and `k` candidates per query
/// (`candidates`: `[Q × k × d]`, candidate j of query i at `(i*k + j)*d`).
pub fn score(
    params: &AdapterParams,
    queries: &[f32],
    candidates: &[f32],
    k: usize,
) -> Result<AdapterOutput> {
    score_with_context(params, queries, candidates, None, k)
}

/// Checks that positive-aware contexts are given exactly when the parameters read them.
pub(super) fn check_contexts(
    params: &AdapterParams,
    contexts: Option<&[f32]>,
    pairs: usize,
) -> Result<()> {
    match (params.positive_aware(), contexts) {
        (false, None) => Ok(()),
        (true, Some(x)) if x.len() == pairs * params.d => Ok(()),
        (true, Some(x)) => Err(Error::InvalidArgument(format!(
            "positive-aware contexts: {} floats for {pairs} pairs of dimension {}",
            x.len(),
            params.d
        ))),
        (true, None) => Err(Error::InvalidArgument(
            "a positive-aware adapter needs the mean positive embedding of each pair's query"
                .into(),
        )),
        (false, Some(_)) => Err(Error::InvalidArgument(
            "contexts given to an adapter without the positive-aware block".into(),
        )),
    }
}

/// [`score`] for a positive-aware adapter: `contexts` (`[Q × k × d]`) holds each pair's d̄+.
/// The extra input `[c − d̄+ ; c ⊙ d̄+]` varies per pair, so it is built per query (`k × 2d`)
/// and applied as one more product: about 2·h·d more multiply-adds per pair. It is an
/// ablation option for training queries, not the serving path.
pub fn score_with_context(
    params: &AdapterParams,
    queries: &[f32],
    candidates: &[f32],
    contexts: Option<&[f32]>,
    k: usize,
) -> Result<AdapterOutput> {
    let nq = check_inputs(params, queries, candidates, k)?;
    check_contexts(params, contexts, nq * k)?;
    let (d, h) = (params.d, params.h);
    let fused = FusedWeights::of(params);
    let mut u = vec![0.0f32; nq * h];
    linear(queries, nq, d, &fused.w_sum, &params.b1, h, &mut u);

    let p_n = nq * k;
    let mut pre = vec![0.0f32; p_n * h];
    let mut a = vec![0.0f32; p_n * d];
    let mut stats = vec![[0.0f32; 5]; p_n];
    pre.par_chunks_mut(k * h)
        .zip(a.par_chunks_mut(k * d))
        .zip(stats.par_chunks_mut(k))
        .enumerate()
        .for_each(|(i, ((pre_i, a_i), st_i))| {
            let mut feats = vec![0.0f32; k * (2 * d).max(h)];
            forward_query(
                params,
                &fused,
                &queries[i * d..(i + 1) * d],
                &candidates[i * k * d..(i + 1) * k * d],
                &u[i * h..(i + 1) * h],
                contexts.map(|c| &c[i * k * d..(i + 1) * k * d]),
                &mut feats,
                pre_i,
                a_i,
                st_i,
            );
        });
    let col = |j: usize| stats.iter().map(|s| s[j]).collect::<Vec<f32>>();
    Ok(AdapterOutput {
        p: col(0),
        logit: col(1),
        qa: col(2),
        ca: col(3),
        alpha: col(4),
        cache: AdapterCache {
            nq,
            k,
            d,
            h,
            pre,
            a,
        },
    })
}

/// `[c − x ; c ⊙ x]` per pair, `[k × 2d]`, for candidates `c` and contexts `x` (`[k × d]`).
fn positive_features(c: &[f32], x: &[f32], d: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; c.len() * 2];
    for (p, (cp, xp)) in c.chunks_exact(d).zip(x.chunks_exact(d)).enumerate() {
        for l in 0..d {
            y[p * 2 * d + l] = cp[l] - xp[l];
            y[p * 2 * d + d + l] = cp[l] * xp[l];
        }
    }
    y
}

/// GELU'(x) = Φ(x) + x·φ(x), with Φ from the same `erf` the forward uses.
#[inline]
fn gelu_grad(x: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
    cdf + x * INV_SQRT_2PI * exp(-0.5 * x * x)
}

/// `[rows × cols]` → `[cols × rows]`.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

/// Backward of [`score`], from `d_logit` (`∂L/∂logit`, `[Q × K]`) and optionally `d_a_extra`
/// (`∂L/∂a` from a loss on the adapted points, `[Q × K × d]`). Gradients are **added** to
/// `grads` (a [`AdapterParams::zeros_like`] accumulator), to `d_queries` (`[Q × d]`) and to
/// `d_candidates` (`[Q × K × d]`) when given, so several losses and batches accumulate.
/// `queries`, `candidates`, `k` and `cache` must be those of the forward call.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    params: &AdapterParams,
    queries: &[f32],
    candidates: &[f32],
    k: usize,
    cache: &AdapterCache,
    d_logit: &[f32],
    d_a_extra: Option<&[f32]>,
    grads: &mut AdapterParams,
    d_queries: Option<&mut [f32]>,
    d_candidates: Option<&mut [f32]>,
) -> Result<()> {
    backward_with_context(
        params,
        queries,
        candidates,
        None,
        k,
        cache,
        d_logit,
        d_a_extra,
        grads,
        d_queries,
        d_candidates,
    )
}

/// [`backward`] of [`score_with_context`]. Input gradients are not available with contexts
/// (the positive-aware option is for the frozen-encoder stage).
#[allow(clippy::too_many_arguments)]
pub fn backward_with_context(
    params: &AdapterParams,
    queries: &[f32],
    candidates: &[f32],
    contexts: Option<&[f32]>,
    k: usize,
    cache: &AdapterCache,
    d_logit: &[f32],
    d_a_extra: Option<&[f32]>,
    grads: &mut AdapterParams,
    d_queries: Option<&mut [f32]>,
    d_candidates: Option<&mut [f32]>,
) -> Result<()> {
    let nq = check_inputs(params, queries, candidates, k)?;
    check_contexts(params, contexts, nq * k)?;
    if contexts.is_some() && (d_queries.is_some() || d_candidates.is_some()) {
        return Err(Error::InvalidArgument(
            "input gradients of a positive-aware adapter are not implemented".into(),
        ));
    }
    let (d, h) = (params.d, params.h);
    let p_n = nq * k;
    grads.check()?;
    let ok = (cache.nq, cache.k, cache.d, cache.h) == (nq, k, d, h)
        && cache.pre.len() == p_n * h
        && cache.a.len() == p_n * d
        && d_logit.len() == p_n
        && d_a_extra.is_none_or(|g| g.len() == p_n * d)
        && (grads.d, grads.h) == (d, h)
        && grads.w1_pos.len() == params.w1_pos.len()
        && d_queries.as_ref().is_none_or(|g| g.len() == nq * d)
        && d_candidates.as_ref().is_none_or(|g| g.len() == p_n * d);
    if !ok {
        return Err(Error::InvalidArgument(format!(
            "adapter backward shapes disagree with the forward ({nq} queries × {k} candidates, \
             d = {d}, h = {h}): {} d_logit, cache of {} × {} × {}",
            d_logit.len(),
            cache.nq,
            cache.k,
            cache.d
        )));
    }
    let want_inputs = d_queries.is_some() || d_candidates.is_some();
    let beta = params.beta as f64;
    let (w_sum, w_diff) = sum_diff(params);
    // Transposed weights so the per-query products are `linear` calls ([out × in] layout).
    let w2_t = transpose(&params.w2, d, h); // [h × d]
    let (wdiff_t, w1b_t) = if want_inputs {
        let w1b: Vec<f32> = (0..h)
            .flat_map(|j| params.w1[j * 3 * d + d..j * 3 * d + 2 * d].iter().copied())
            .collect();
        (transpose(&w_diff, h, d), transpose(&w1b, h, d)) // each [d × h]
    } else {
        (Vec::new(), Vec::new())
    };
    let (zero_h, zero_d) = (vec![0.0f32; h], vec![0.0f32; d]);

    // Phase 1, parallel over queries: ∂a, δ = ∂pre per pair, δu per query, input gradients.
    let mut da = vec![0.0f32; p_n * d];
    let mut dpre = vec![0.0f32; p_n * h];
    let mut du = vec![0.0f64; nq * h];
    let mut dbeta_terms = vec![0.0f64; p_n];
    // Input-gradient buffers are small next to `da` and `dpre`; always allocated (and left
    // zero when not asked for) so every query task has the same shape.
    let mut dq_buf = vec![0.0f32; nq * d];
    let mut dc_buf = vec![0.0f32; p_n * d];
    da.par_chunks_mut(k * d)
        .zip(dpre.par_chunks_mut(k * h))
        .zip(du.par_chunks_mut(h))
        .zip(dbeta_terms.par_chunks_mut(k))
        .zip(dq_buf.par_chunks_mut(d))
        .zip(dc_buf.par_chunks_mut(k * d))
        .enumerate()
        .for_each(|(i, (((((da_i, dpre_i), du_i), dbeta_i), dq_i), dc_i))| {
            let q = &queries[i * d..(i + 1) * d];
            let c_i = &candidates[i * k * d..(i + 1) * k * d];
            let a_i = &cache.a[i * k * d..(i + 1) * k * d];
            let mut dq_direct = vec![0.0f64; if want_inputs { d } else { 0 }];
            for kk in 0..k {
                let p = i * k + kk;
                let (c, a) = (&c_i[kk * d..(kk + 1) * d], &a_i[kk * d..(kk + 1) * d]);
                let g = geometry(q, c, a);
                let gl = d_logit[p] as f64;
                dbeta_i[kk] = gl * (g.qa - g.ca);
                let s = gl * beta;
                let (inv_qa, inv_ac) = (1.0 / (g.nq * g.na), 1.0 / (g.na * g.nc));
                let extra = d_a_extra.map(|e| &e[p * d..(p + 1) * d]);
                let da_p = &mut da_i[kk * d..(kk + 1) * d];
                for l in 0..d {
                    let (qv, cv, av) = (q[l] as f64, c[l] as f64, a[l] as f64);
                    // ∂QA/∂a − ∂CA/∂a
                    let mut v = s
                        * (qv * inv_qa - g.qa * av * g.inv_aa - cv * inv_ac + g.ca * av * g.inv_aa);
                    if let Some(e) = extra {
                        v += e[l] as f64;
                    }
                    da_p[l] = v as f32;
                    if want_inputs {
                        dq_direct[l] += s * (av * inv_qa - g.qa * qv * g.inv_qq);
                        // −∂CA/∂c, then the residual path a = c + …
                        dc_i[kk * d + l] = (-s * (av * inv_ac - g.ca * cv * g.inv_cc) + v) as f32;
                    }
                }
            }
            // δ = (∂a · W2) ⊙ GELU'(pre)
            linear(da_i, k, d, &w2_t, &zero_h, h, dpre_i);
            let pre_i = &cache.pre[i * k * h..(i + 1) * k * h];
            for (g, &x) in dpre_i.iter_mut().zip(pre_i) {
                *g *= gelu_grad(x);
            }
            for row in dpre_i.chunks_exact(h) {
                for (acc, &v) in du_i.iter_mut().zip(row) {
                    *acc += v as f64;
                }
            }
            if !want_inputs {
                return;
            }
            // ∂c += M_qᵀ δ = (W1c − W1a)ᵀ δ + q ⊙ (W1bᵀ δ);  ∂q += Σ_k c ⊙ (W1bᵀ δ)
            let mut e = vec![0.0f32; k * d];
            let mut t = vec![0.0f32; k * d];
            linear(dpre_i, k, h, &wdiff_t, &zero_d, d, &mut e);
            linear(dpre_i, k, h, &w1b_t, &zero_d, d, &mut t);
            for kk in 0..k {
                for l in 0..d {
                    let x = kk * d + l;
                    dc_i[x] += e[x] + q[l] * t[x];
                    dq_direct[l] += c_i[x] as f64 * t[x] as f64;
                }
            }
            // ∂q += (W1a + W1c)ᵀ δu
            for (j, &u) in du_i.iter().enumerate() {
                let row = &w_sum[j * d..(j + 1) * d];
                for l in 0..d {
                    dq_direct[l] += u * row[l] as f64;
                }
            }
            for (o, v) in dq_i.iter_mut().zip(&dq_direct) {
                *o = *v as f32;
            }
        });
    if let Some(dq) = d_queries {
        for (o, v) in dq.iter_mut().zip(&dq_buf) {
            *o += v;
        }
    }
    if let Some(dc) = d_candidates {
        for (o, v) in dc.iter_mut().zip(&dc_buf) {
            *o += v;
        }
    }

    // Phase 2: parameter gradients, each element one f64 sum in pair order; parallel over rows.
    let AdapterParams {
        w1: gw1,
        b1: gb1,
        w2: gw2,
        b2: gb2,
        beta: gbeta,
        beta0: gbeta0,
        w1_pos: gw1_pos,
        ..
    } = grads;
    gw1.par_chunks_mut(3 * d)
        .zip(gb1.par_iter_mut())
        .enumerate()
        .for_each(|(j, (row, b))| {
            let mut s_uq = vec![0.0f64; d]; // Σ_q δu_q[j] q
            let mut s_c = vec![0.0f64; d]; // Σ_p δ_p[j] c_p
            let mut s_qc = vec![0.0f64; d]; // Σ_p δ_p[j] (q ⊙ c_p)
            let mut s_b = 0.0f64;
            for i in 0..nq {
                let q = &queries[i * d..(i + 1) * d];
                let u = du[i * h + j];
                s_b += u;
                for l in 0..d {
                    s_uq[l] += u * q[l] as f64;
                }
                for kk in 0..k {
                    let p = i * k + kk;
                    let g = dpre[p * h + j] as f64;
                    let c = &candidates[p * d..(p + 1) * d];
                    for l in 0..d {
                        let cv = c[l] as f64;
                        s_c[l] += g * cv;
                        s_qc[l] += g * cv * q[l] as f64;
                    }
                }
            }
            for l in 0..d {
                row[l] = (row[l] as f64 + s_uq[l] - s_c[l]) as f32;
                row[d + l] = (row[d + l] as f64 + s_qc[l]) as f32;
                row[2 * d + l] = (row[2 * d + l] as f64 + s_uq[l] + s_c[l]) as f32;
            }
            *b = (*b as f64 + s_b) as f32;
        });
    if let Some(ctx) = contexts {
        // ∂W1pos = Σ_p δ_p [c_p − x_p ; c_p ⊙ x_p]ᵀ
        gw1_pos
            .par_chunks_mut(2 * d)
            .enumerate()
            .for_each(|(j, row)| {
                let (mut s_diff, mut s_prod) = (vec![0.0f64; d], vec![0.0f64; d]);
                for p in 0..p_n {
                    let g = dpre[p * h + j] as f64;
                    let (c, x) = (&candidates[p * d..(p + 1) * d], &ctx[p * d..(p + 1) * d]);
                    for l in 0..d {
                        s_diff[l] += g * (c[l] - x[l]) as f64;
                        s_prod[l] += g * (c[l] * x[l]) as f64;
                    }
                }
                for l in 0..d {
                    row[l] = (row[l] as f64 + s_diff[l]) as f32;
                    row[d + l] = (row[d + l] as f64 + s_prod[l]) as f32;
                }
            });
    }
    let act: Vec<f32> = cache.pre.par_iter().map(|&x| gelu(x)).collect();
    gw2.par_chunks_mut(h)
        .zip(gb2.par_iter_mut())
        .enumerate()
        .for_each(|(r, (row, b))| {
            let mut acc = vec![0.0f64; h];
            let mut s_b = 0.0f64;
            for p in 0..p_n {
                let g = da[p * d + r] as f64;
                s_b += g;
                for (o, &x) in acc.iter_mut().zip(&act[p * h..(p + 1) * h]) {
                    *o += g * x as f64;
                }
            }
            for (o, v) in row.iter_mut().zip(&acc) {
                *o = (*o as f64 + v) as f32;
            }
            *b = (*b as f64 + s_b) as f32;
        });
    *gbeta = (*gbeta as f64 + dbeta_terms.iter().sum::<f64>()) as f32;
    *gbeta0 = (*gbeta0 as f64 + d_logit.iter().map(|&v| v as f64).sum::<f64>()) as f32;
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::index::synthetic::Rng;

    pub(in crate::adapter) fn random(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * scale)
            .collect()
    }

    /// Initial parameters with every tensor made non-zero (W2 = 0 would hide half the graph).
    pub(in crate::adapter) fn trained_like(d: usize, h: usize, seed: u64) -> AdapterParams {
        let mut p = AdapterParams::init(d, h, seed).unwrap();
        let mut rng = Rng::new(seed ^ 0xabc);
        p.b1 = random(&mut rng, h, 0.3);
        p.w2 = random(&mut rng, d * h, 0.4);
        p.b2 = random(&mut rng, d, 0.2);
        p.beta = 3.0;
        p.beta0 = 0.2;
        p
    }

    /// Parameters as one f64 vector: w1, b1, w2, b2, beta, beta0, w1_pos (when present).
    pub(in crate::adapter) fn flat(p: &AdapterParams) -> Vec<f64> {
        p.w1.iter()
            .chain(&p.b1)
            .chain(&p.w2)
            .chain(&p.b2)
            .chain([&p.beta, &p.beta0])
            .chain(&p.w1_pos)
            .map(|&v| v as f64)
            .collect()
    }

    pub(in crate::adapter) struct Naive {
        pub(in crate::adapter) logit: Vec<f64>,
        p: Vec<f64>,
        qa: Vec<f64>,
        ca: Vec<f64>,
        alpha: Vec<f64>,
        a: Vec<f64>,
    }

    fn cos(x: &[f64], y: &[f64]) -> f64 {
        let n = |v: &[f64]| v.iter().map(|t| t * t).sum::<f64>().sqrt().max(1e-12);
        x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>() / (n(x) * n(y))
    }

    /// The adapter straight from its definition, in f64: z built explicitly, W1 applied to it.
    pub(in crate::adapter) fn naive(
        w: &[f64],
        d: usize,
        h: usize,
        q: &[f64],
        c: &[f64],
        k: usize,
    ) -> Naive {
        naive_ctx(w, d, h, q, c, None, k)
    }

    /// [`naive`] with positive-aware contexts (`x`, one per pair): z gains `[c − x ; c ⊙ x]`
    /// and W1 the `w1_pos` block that follows beta0 in `w`.
    fn naive_ctx(
        w: &[f64],
        d: usize,
        h: usize,
        q: &[f64],
        c: &[f64],
        x: Option<&[f64]>,
        k: usize,
    ) -> Naive {
        let (w1, rest) = w.split_at(h * 3 * d);
        let (b1, rest) = rest.split_at(h);
        let (w2, rest) = rest.split_at(d * h);
        let (b2, rest) = rest.split_at(d);
        let (beta, beta0) = (rest[0], rest[1]);
        let w1p = &rest[2..];
        let p_n = c.len() / d;
        let mut out = Naive {
            logit: vec![],
            p: vec![],
            qa: vec![],
            ca: vec![],
            alpha: vec![],
            a: vec![],
        };
        for p in 0..p_n {
            let qi = &q[(p / k) * d..(p / k + 1) * d];
            let cp = &c[p * d..(p + 1) * d];
            let z: Vec<f64> = (0..d)
                .map(|l| qi[l] - cp[l])
                .chain((0..d).map(|l| qi[l] * cp[l]))
                .chain((0..d).map(|l| qi[l] + cp[l]))
                .collect();
            let y: Vec<f64> = match x {
                Some(x) => {
                    let xp = &x[p * d..(p + 1) * d];
                    (0..d)
                        .map(|l| cp[l] - xp[l])
                        .chain((0..d).map(|l| cp[l] * xp[l]))
                        .collect()
                }
                None => Vec::new(),
            };
            let g: Vec<f64> = (0..h)
                .map(|j| {
                    let x = b1[j]
                        + (0..3 * d).map(|t| w1[j * 3 * d + t] * z[t]).sum::<f64>()
                        + (0..y.len()).map(|t| w1p[j * 2 * d + t] * y[t]).sum::<f64>();
                    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
                })
                .collect();
            let a: Vec<f64> = (0..d)
                .map(|r| cp[r] + b2[r] + (0..h).map(|j| w2[r * h + j] * g[j]).sum::<f64>())
                .collect();
            let den: f64 = (0..d).map(|l| (qi[l] - cp[l]).powi(2)).sum();
            let num: f64 = (0..d).map(|l| (a[l] - cp[l]) * (qi[l] - cp[l])).sum();
            let alpha = if den > 0.0 {
                (num / den).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let (qa, ca) = (cos(qi, &a), cos(&a, cp));
            let logit = beta * (qa - ca) + beta0;
            out.logit.push(logit);
            out.p.push(1.0 / (1.0 + (-logit).exp()));
            out.qa.push(qa);
            out.ca.push(ca);
            out.alpha.push(alpha);
            out.a.extend(a);
        }
        out
    }

    pub(in crate::adapter) fn to64(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    pub(in crate::adapter) fn max_err(x: &[f32], y: &[f64]) -> f64 {
        assert_eq!(x.len(), y.len());
        x.iter()
            .zip(y)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn fused_forward_matches_naive() {
        let (d, h, nq, k) = (7, 6, 3, 5);
        let params = trained_like(d, h, 1);
        let mut rng = Rng::new(2);
        let q = random(&mut rng, nq * d, 1.0);
        let c = random(&mut rng, nq * k * d, 1.0);
        let out = score(&params, &q, &c, k).unwrap();
        let want = naive(&flat(&params), d, h, &to64(&q), &to64(&c), k);
        assert!(max_err(&out.p, &want.p) <= 1e-5);
        assert!(max_err(&out.qa, &want.qa) <= 1e-5);
        assert!(max_err(&out.ca, &want.ca) <= 1e-5);
        assert!(max_err(&out.alpha, &want.alpha) <= 1e-5);
        assert!(max_err(&out.logit, &want.logit) <= 1e-4);
        assert!(max_err(out.cache.a(), &want.a) <= 1e-5);
        // the test exercises the MLP: a moved away from c, alpha not stuck at a bound
        assert!(out.ca.iter().all(|&v| v < 0.999));
        assert!(out.alpha.iter().any(|&v| v > 0.0 && v < 1.0));
    }

    #[test]
    fn a_hidden_layer_wider_than_the_features_scores_like_naive() {
        // h > 2d: the features are the first k × 2d floats of a larger scratch buffer
        let (d, h, k) = (6, 20, 5);
        let params = trained_like(d, h, 8);
        let w = flat(&params);
        let mut rng = Rng::new(9);
        let q = random(&mut rng, d, 0.3);
        let c = random(&mut rng, k * d, 0.3);
        let out = score(&params, &q, &c, k).unwrap();
        let want = naive(&w, d, h, &to64(&q), &to64(&c), k);
        assert!(max_err(&out.logit, &want.logit) <= 1e-4);
    }

    #[test]
    fn initial_adapter_is_the_identity() {
        let (d, h, nq, k) = (8, 8, 2, 4);
        let params = AdapterParams::init(d, h, 7).unwrap();
        let mut rng = Rng::new(3);
        let q = random(&mut rng, nq * d, 1.0);
        let c = random(&mut rng, nq * k * d, 1.0);
        let out = score(&params, &q, &c, k).unwrap();
        assert_eq!(out.cache.a(), &c[..]);
        for p in 0..nq * k {
            let (qi, cp) = (&q[(p / k) * d..(p / k + 1) * d], &c[p * d..(p + 1) * d]);
            let cqc = cos(&to64(qi), &to64(cp));
            assert!((out.ca[p] - 1.0).abs() < 1e-6);
            assert_eq!(out.alpha[p], 0.0);
            let want = 1.0 / (1.0 + (-10.0 * (cqc - 1.0)).exp());
            assert!(
                (out.p[p] as f64 - want).abs() < 1e-6,
                "{} vs {want}",
                out.p[p]
            );
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (d, h, nq, k) = (5, 4, 3, 3);
        let params = trained_like(d, h, 11);
        let mut rng = Rng::new(12);
        let q = random(&mut rng, nq * d, 1.0);
        let c = random(&mut rng, nq * k * d, 1.0);
        let d_logit = random(&mut rng, nq * k, 1.0);
        let d_a = random(&mut rng, nq * k * d, 1.0);
        let out = score(&params, &q, &c, k).unwrap();
        // accumulation: start from non-zero gradients and check the increment
        let mut grads = params.zeros_like();
        grads.w1[0] = 1.0;
        grads.beta = -2.0;
        let mut dq = vec![0.5f32; q.len()];
        let mut dc = vec![0.0f32; c.len()];
        backward(
            &params,
            &q,
            &c,
            k,
            &out.cache,
            &d_logit,
            Some(&d_a),
            &mut grads,
            Some(&mut dq),
            Some(&mut dc),
        )
        .unwrap();
        grads.w1[0] -= 1.0;
        grads.beta += 2.0;
        dq.iter_mut().for_each(|v| *v -= 0.5);

        // L = Σ d_logit·logit + Σ <d_a, a>: its gradient is what backward returns.
        let (w, q64, c64) = (flat(&params), to64(&q), to64(&c));
        let loss = |w: &[f64], q: &[f64], c: &[f64]| {
            let n = naive(w, d, h, q, c, k);
            n.logit
                .iter()
                .zip(&d_logit)
                .map(|(l, g)| l * *g as f64)
                .sum::<f64>()
                + n.a
                    .iter()
                    .zip(&d_a)
                    .map(|(a, g)| a * *g as f64)
                    .sum::<f64>()
        };
        let step = 1e-5;
        let fd = |which: usize, i: usize| {
            let mut xs = [w.clone(), q64.clone(), c64.clone()];
            xs[which][i] += step;
            let up = loss(&xs[0], &xs[1], &xs[2]);
            xs[which][i] -= 2.0 * step;
            let down = loss(&xs[0], &xs[1], &xs[2]);
            (up - down) / (2.0 * step)
        };
        let analytic = [flat(&grads), to64(&dq), to64(&dc)];
        let mut worst = 0.0f64;
        for (which, g) in analytic.iter().enumerate() {
            for (i, &gv) in g.iter().enumerate() {
                let want = fd(which, i);
                let err = (gv - want).abs() / (1.0 + want.abs());
                worst = worst.max(err);
                // f32 forward and gradients against an f64 oracle: ~1e-6 relative
                assert!(err < 2e-5, "tensor {which}[{i}]: {gv} vs {want}");
            }
        }
        assert!(worst > 0.0);
    }

    #[test]
    fn candidate_equal_to_query_is_finite() {
        let (d, h, k) = (6, 5, 3);
        let mut rng = Rng::new(4);
        let q = random(&mut rng, d, 1.0);
        let mut c = random(&mut rng, k * d, 1.0);
        c[d..2 * d].copy_from_slice(&q);
        c[2 * d..].fill(0.0); // a zero candidate: the norm clamp keeps CA finite
        for params in [AdapterParams::init(d, h, 5).unwrap(), trained_like(d, h, 5)] {
            let out = score(&params, &q, &c, k).unwrap();
            assert_eq!(out.alpha[1], 0.0);
            for v in [&out.p, &out.logit, &out.qa, &out.ca, &out.alpha] {
                assert!(v.iter().all(|x| x.is_finite()), "{v:?}");
            }
            let mut grads = params.zeros_like();
            let (mut dq, mut dc) = (vec![0.0; d], vec![0.0; k * d]);
            backward(
                &params,
                &q,
                &c,
                k,
                &out.cache,
                &[1.0; 3],
                None,
                &mut grads,
                Some(&mut dq),
                Some(&mut dc),
            )
            .unwrap();
            assert!(flat(&grads).iter().all(|x| x.is_finite()));
            assert!(dq.iter().chain(&dc).all(|x| x.is_finite()));
        }
    }

    #[test]
    fn results_do_not_depend_on_thread_count() {
        let (d, h, nq, k) = (16, 12, 5, 40);
        let params = trained_like(d, h, 21);
        let mut rng = Rng::new(22);
        let q = random(&mut rng, nq * d, 1.0);
        let c = random(&mut rng, nq * k * d, 1.0);
        let d_logit = random(&mut rng, nq * k, 1.0);
        let d_a = random(&mut rng, nq * k * d, 0.1);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let out = score(&params, &q, &c, k).unwrap();
                let mut grads = params.zeros_like();
                let (mut dq, mut dc) = (vec![0.0; q.len()], vec![0.0; c.len()]);
                backward(
                    &params,
                    &q,
                    &c,
                    k,
                    &out.cache,
                    &d_logit,
                    Some(&d_a),
                    &mut grads,
                    Some(&mut dq),
                    Some(&mut dc),
                )
                .unwrap();
                let mut all: Vec<f32> = [out.p, out.logit, out.qa, out.ca, out.alpha].concat();
                all.extend(out.cache.a());
                all.extend(flat(&grads).iter().map(|&v| v as f32));
                all.extend(dq);
                all.extend(dc);
                all.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
            })
        };
        assert_eq!(run(1), run(3));
    }

    /// The AVX2 lanes are the scalar lanes, bit for bit.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_geometry_sums_are_the_scalar_ones() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let d = 384;
        let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
        let c: Vec<f32> = (0..d).map(|i| (i as f32 * 0.13).cos()).collect();
        let a: Vec<f32> = (0..d).map(|i| (i as f32 * 0.71).sin() * 1e3).collect();
        // SAFETY: AVX2 is present.
        let fast = unsafe { geometry_lanes_avx2(&q, &c, &a) };
        assert_eq!(fast, geometry_lanes(&q, &c, &a));
    }

    #[test]
    fn bad_shapes_are_errors() {
        let (d, h, k) = (4, 3, 2);
        let params = trained_like(d, h, 1);
        let q = vec![0.5f32; 2 * d];
        let c = vec![0.25f32; 2 * k * d];
        let bad = |r: Result<AdapterOutput>| matches!(r, Err(Error::InvalidArgument(_)));
        assert!(bad(score(&params, &q, &c, 0)));
        assert!(bad(score(&params, &q, &c, 3)));
        assert!(bad(score(&params, &q[1..], &c, k)));
        assert!(bad(score(&params, &[], &[], k)));
        let mut broken = params.clone();
        broken.w2.pop();
        assert!(bad(score(&broken, &q, &c, k)));

        let out = score(&params, &q, &c, k).unwrap();
        let mut grads = params.zeros_like();
        let d_logit = vec![1.0f32; 2 * k];
        let is_bad = |r: Result<()>| matches!(r, Err(Error::InvalidArgument(_)));
        let run = |d_logit: &[f32], extra: Option<&[f32]>, g: &mut AdapterParams| {
            backward(
                &params, &q, &c, k, &out.cache, d_logit, extra, g, None, None,
            )
        };
        assert!(is_bad(run(&d_logit[1..], None, &mut grads)));
        assert!(is_bad(run(&d_logit, Some(&[0.0; 3]), &mut grads)));
        assert!(is_bad(run(&d_logit, None, &mut broken.zeros_like())));
        run(&d_logit, None, &mut grads).unwrap();
        let mut dq = vec![0.0f32; 3];
        assert!(is_bad(backward(
            &params,
            &q,
            &c,
            k,
            &out.cache,
            &d_logit,
            None,
            &mut grads,
            Some(&mut dq),
            None
        )));
        // a cache from another batch shape
        let other = score(&params, &q[..d], &c[..k * d], k).unwrap();
        assert!(is_bad(backward(
            &params,
            &q,
            &c,
            k,
            &other.cache,
            &d_logit,
            None,
            &mut grads,
            None,
            None
        )));
    }

    #[test]
    fn positive_aware_matches_naive_and_finite_differences() {
        let (d, h, nq, k) = (5, 4, 2, 3);
        let mut params = trained_like(d, h, 21);
        let with = AdapterParams::init_with(d, h, true, 21).unwrap();
        assert!(with.positive_aware() && !params.positive_aware());
        assert_eq!(with.w1, params.w1); // the block is drawn after W1
        params.w1_pos = with.w1_pos;
        let mut rng = Rng::new(22);
        let q = random(&mut rng, nq * d, 1.0);
        let c = random(&mut rng, nq * k * d, 1.0);
        let x = random(&mut rng, nq * k * d, 1.0);
        let d_logit = random(&mut rng, nq * k, 1.0);
        let d_a = random(&mut rng, nq * k * d, 1.0);
        let out = score_with_context(&params, &q, &c, Some(&x), k).unwrap();
        let (q64, c64, x64) = (to64(&q), to64(&c), to64(&x));
        let want = naive_ctx(&flat(&params), d, h, &q64, &c64, Some(&x64), k);
        assert!(max_err(&out.logit, &want.logit) <= 1e-4);
        assert!(max_err(out.cache.a(), &want.a) <= 1e-5);
        // the block matters: without it the logits differ
        let mut plain = params.clone();
        plain.w1_pos.clear();
        let base = score(&plain, &q, &c, k).unwrap();
        assert!(max_err(&base.logit, &want.logit) > 1e-3);
        // contexts and the block go together
        assert!(score(&params, &q, &c, k).is_err());
        assert!(score_with_context(&plain, &q, &c, Some(&x), k).is_err());
        assert!(score_with_context(&params, &q, &c, Some(&x[1..]), k).is_err());

        let mut grads = params.zeros_like();
        backward_with_context(
            &params,
            &q,
            &c,
            Some(&x),
            k,
            &out.cache,
            &d_logit,
            Some(&d_a),
            &mut grads,
            None,
            None,
        )
        .unwrap();
        let mut dq = vec![0.0f32; q.len()];
        assert!(backward_with_context(
            &params,
            &q,
            &c,
            Some(&x),
            k,
            &out.cache,
            &d_logit,
            None,
            &mut grads.clone(),
            Some(&mut dq),
            None,
        )
        .is_err());
        let w = flat(&params);
        let loss = |w: &[f64]| {
            let n = naive_ctx(w, d, h, &q64, &c64, Some(&x64), k);
            n.logit
                .iter()
                .zip(&d_logit)
                .map(|(l, g)| l * *g as f64)
                .sum::<f64>()
                + n.a
                    .iter()
                    .zip(&d_a)
                    .map(|(a, g)| a * *g as f64)
                    .sum::<f64>()
        };
        let step = 1e-5;
        for (i, gv) in flat(&grads).into_iter().enumerate() {
            let mut up = w.clone();
            up[i] += step;
            let mut down = w.clone();
            down[i] -= step;
            let want = (loss(&up) - loss(&down)) / (2.0 * step);
            // f32 forward and gradients against an f64 oracle: ~1e-6 relative
            let err = (gv - want).abs() / (1.0 + want.abs());
            assert!(err < 2e-5, "parameter {i}: {gv} vs {want}");
        }
    }
}
