//! Backward passes of the encoder ops, for fine-tuning on the CPU reference path: linear layers,
//! LayerNorm, exact GELU, L2 normalisation, inverted dropout, and attention with dropout on its
//! probabilities (training forward and backward).
//!
//! Nothing is stored between forward and backward beyond the op inputs: attention probabilities
//! are recomputed from `qkv`, LayerNorm statistics from its input, dropout masks from their
//! counter-based [`Stream`]. That keeps activation memory to the layer inputs.
//!
//! Like the rest of `cpu`, results are bitwise independent of the rayon thread count: parallel
//! tasks only ever write disjoint outputs, and sums over rows (weight gradients) are either one
//! GEMM call per output element or fixed-size row chunks added in a fixed order.

use rayon::prelude::*;

use super::attention::{qk_scores, weighted_sum, weighted_sum_any, KB, W};
use super::math::{erf, exp, softmax_row, sum_lanes};
use crate::train::rng::Stream;

/// Dropout on attention probabilities of one sequence: probability (head, i, j) is dropped when
/// `stream.uniform_at(((head * len + i) * len + j) as u64) < p`; kept ones are scaled by 1/(1-p).
/// The mask is a pure function of the stream, so backward rebuilds it instead of storing it.
#[derive(Debug, Clone, Copy)]
pub struct AttnDropout {
    pub p: f32,
    pub stream: Stream,
}

/// Rows per partial sum of a bias / LayerNorm parameter gradient. A constant, so the order in
/// which rows are added (and so every bit of the result) does not depend on the thread count.
const PART_ROWS: usize = 256;
/// Elements per parallel task of the element-wise ops; a multiple of 4 so every task starts on a
/// Philox block boundary.
const ELEM_CHUNK: usize = 1 << 14;

/// Keep-scales for `out.len()` consecutive numbers of `stream` starting at number `start`:
/// 0 where `uniform_at(i) < p` (dropped), `1/(1-p)` elsewhere. Bit-identical to calling
/// [`Stream::uniform_at`] per element, but draws each Philox block (4 numbers) once.
#[inline(always)]
fn keep_scales(stream: &Stream, start: u64, p: f32, out: &mut [f32]) {
    let scale = 1.0 / (1.0 - p);
    // the same expression as Stream::uniform_at
    let keep = |word: u32| {
        let u = (word >> 8) as f32 * (1.0 / 16_777_216.0);
        if u < p {
            0.0
        } else {
            scale
        }
    };
    // numbers before the first block boundary, one at a time
    let head = (((4 - start % 4) % 4) as usize).min(out.len());
    for (t, o) in out[..head].iter_mut().enumerate() {
        *o = keep(stream.u32_at(start + t as u64));
    }
    let first_block = (start + head as u64) / 4;
    let body = &mut out[head..];
    let done = body.len() / 4;
    let mut blocks = body.chunks_exact_mut(4);
    for (b, o) in (&mut blocks).enumerate() {
        let w = stream.block(first_block + b as u64);
        for l in 0..4 {
            o[l] = keep(w[l]);
        }
    }
    let rest = blocks.into_remainder();
    if !rest.is_empty() {
        let w = stream.block(first_block + done as u64);
        for (o, &w) in rest.iter_mut().zip(&w) {
            *o = keep(w);
        }
    }
}

/// Checks `0 <= p < 1` (p = 1 would scale by infinity) and says whether dropout does anything.
fn dropout_active(p: f32) -> bool {
    assert!(
        (0.0..1.0).contains(&p),
        "dropout probability {p} outside [0, 1)"
    );
    p > 0.0
}

/// `C[m × n] = alpha · A[m × k] · B[k × n] + beta · C` on strided views (row stride, column stride
/// per matrix, all non-negative), with the bounds of every view checked before the call.
#[allow(clippy::too_many_arguments)]
fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: &mut [f32],
    (rsc, csc): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    if k > 0 {
        assert!(
            (m - 1) * rsa + (k - 1) * csa < a.len(),
            "sgemm: A view out of bounds"
        );
        assert!(
            (k - 1) * rsb + (n - 1) * csb < b.len(),
            "sgemm: B view out of bounds"
        );
    }
    assert!(
        (m - 1) * rsc + (n - 1) * csc < c.len(),
        "sgemm: C view out of bounds"
    );
    // C's elements must not alias each other (one of its strides spans the other dimension).
    assert!(
        (csc >= 1 && rsc >= n * csc) || (rsc >= 1 && csc >= m * rsc),
        "sgemm: C view overlaps itself"
    );
    // SAFETY: every element the views address is inside its slice and C's are distinct (checked
    // above); C is a unique borrow, so it overlaps neither A nor B.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            rsc as isize,
            csc as isize,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

/// Copies K of head `hd` transposed into `kt` (`[dh × lp]`, columns ≥ len left at zero).
#[inline(always)]
fn load_kt(qkv: &[f32], len: usize, h: usize, hd: usize, dh: usize, lp: usize, kt: &mut [f32]) {
    for j in 0..len {
        let k = &qkv[j * 3 * h + h + hd * dh..j * 3 * h + h + (hd + 1) * dh];
        for d in 0..dh {
            kt[d * lp + j] = k[d];
        }
    }
}

/// Probabilities of query `i` of head `hd` into `scores[..len]` (`scores` is `lp` long):
/// the arithmetic of `cpu::attention::attention_sequence` step for step (q scaled first, each
/// score summed over d in order, the same softmax), so the probabilities are bit-identical to
/// inference and identical between the training forward and the backward.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn probs_row(
    qkv: &[f32],
    i: usize,
    len: usize,
    h: usize,
    hd: usize,
    dh: usize,
    scale: f32,
    kt: &[f32],
    lp: usize,
    q: &mut [f32],
    scores: &mut [f32],
) {
    for (qd, x) in q
        .iter_mut()
        .zip(&qkv[i * 3 * h + hd * dh..i * 3 * h + (hd + 1) * dh])
    {
        *qd = x * scale;
    }
    qk_scores(q, kt, lp, scores);
    softmax_row(&mut scores[..len]);
}

/// Shape preconditions shared by the attention entry points.
fn check_attention(qkv: &[f32], len: usize, h: usize, heads: usize, other: usize, what: &str) {
    assert!(
        heads > 0 && h.is_multiple_of(heads),
        "attention: h {h} not divisible by {heads} heads"
    );
    assert_eq!(qkv.len(), len * 3 * h, "attention: qkv shape");
    assert_eq!(other, len * h, "attention: {what} shape");
}

dispatch_avx2! {
    /// Training forward of attention for one sequence (same maths as
    /// `cpu::attention::attention_sequence`, plus optional dropout on the probabilities).
    /// `qkv` `[len × 3h]` (Q | K | V), `out` `[len × h]` overwritten, `heads` heads of width
    /// `h / heads`. Without dropout (or with p = 0) the output is bit-identical to inference.
    /// Serial: callers run sequences in parallel, as `model::bert` does.
    pub fn attention_sequence_train(
        qkv: &[f32],
        len: usize,
        h: usize,
        heads: usize,
        dropout: Option<&AttnDropout>,
        out: &mut [f32]
    ) {
        check_attention(qkv, len, h, heads, out.len(), "out");
        let dropout = dropout.filter(|d| dropout_active(d.p));
        let dh = h / heads;
        let scale = 1.0 / (dh as f32).sqrt();
        let lp = len.div_ceil(KB) * KB;
        let mut kt = vec![0.0f32; dh * lp];
        let mut v = vec![0.0f32; len * dh];
        let mut scores = vec![0.0f32; lp];
        let mut keep = vec![0.0f32; if dropout.is_some() { len } else { 0 }];
        let mut q = vec![0.0f32; dh];
        for hd in 0..heads {
            load_kt(qkv, len, h, hd, dh, lp, &mut kt);
            for j in 0..len {
                let at = j * 3 * h + 2 * h + hd * dh;
                v[j * dh..(j + 1) * dh].copy_from_slice(&qkv[at..at + dh]);
            }
            for i in 0..len {
                probs_row(qkv, i, len, h, hd, dh, scale, &kt, lp, &mut q, &mut scores);
                let p = &mut scores[..len];
                if let Some(d) = dropout {
                    keep_scales(&d.stream, ((hd * len + i) * len) as u64, d.p, &mut keep);
                    for (pj, kj) in p.iter_mut().zip(&keep) {
                        *pj *= kj;
                    }
                }
                let o = &mut out[i * h + hd * dh..i * h + (hd + 1) * dh];
                match dh {
                    32 => weighted_sum::<4>(p, &v, o),
                    64 => weighted_sum::<8>(p, &v, o),
                    128 => weighted_sum::<16>(p, &v, o),
                    _ => weighted_sum_any(p, &v, o),
                }
            }
        }
    }
}

dispatch_avx2! {
    /// All probabilities of head `hd` into `p` (`[len × len]`); with dropout also the keep-scales
    /// into `keep` and the dropped/scaled probabilities P̃ into `pt` (else `pt` = P).
    #[allow(clippy::too_many_arguments)]
    fn head_probs(
        qkv: &[f32],
        len: usize,
        h: usize,
        hd: usize,
        dh: usize,
        dropout: Option<&AttnDropout>,
        kt: &mut [f32],
        q: &mut [f32],
        scores: &mut [f32],
        p: &mut [f32],
        keep: &mut [f32],
        pt: &mut [f32]
    ) {
        let scale = 1.0 / (dh as f32).sqrt();
        let lp = scores.len();
        load_kt(qkv, len, h, hd, dh, lp, kt);
        for i in 0..len {
            probs_row(qkv, i, len, h, hd, dh, scale, kt, lp, q, scores);
            p[i * len..(i + 1) * len].copy_from_slice(&scores[..len]);
        }
        match dropout {
            Some(d) => {
                keep_scales(&d.stream, (hd * len * len) as u64, d.p, keep);
                for ((t, pv), kv) in pt.iter_mut().zip(&*p).zip(&*keep) {
                    *t = pv * kv;
                }
            }
            None => pt.copy_from_slice(p),
        }
    }
}

dispatch_avx2! {
    /// Softmax (and dropout) backward of one head, in place on `dp` (`[len × len]`, holding dP̃):
    /// dP = dP̃ ⊙ keep, then dS = P ⊙ (dP − rowsum(dP ⊙ P)).
    fn softmax_backward(p: &[f32], keep: Option<&[f32]>, len: usize, dp: &mut [f32]) {
        for i in 0..len {
            let pr = &p[i * len..(i + 1) * len];
            let dr = &mut dp[i * len..(i + 1) * len];
            if let Some(keep) = keep {
                for (d, kv) in dr.iter_mut().zip(&keep[i * len..(i + 1) * len]) {
                    *d *= kv;
                }
            }
            // Σ_j dP_ij P_ij in eight lanes (a fixed order that vectorises)
            let mut acc = [0.0f32; W];
            let (dc, pc) = (dr.chunks_exact(W), pr.chunks_exact(W));
            let tail: f32 = dc.remainder().iter().zip(pc.remainder()).map(|(a, b)| a * b).sum();
            for (a, b) in dc.zip(pc) {
                for l in 0..W {
                    acc[l] += a[l] * b[l];
                }
            }
            let dot = acc.iter().sum::<f32>() + tail;
            for (d, pv) in dr.iter_mut().zip(pr) {
                *d = pv * (*d - dot);
            }
        }
    }
}

/// Backward of [`attention_sequence_train`] for one sequence: recomputes the probabilities (and
/// dropout mask) from `qkv` (nothing is stored between forward and backward); `dctx` `[len × h]`
/// is the gradient of the output, `dqkv` `[len × 3h]` is overwritten with (dQ | dK | dV).
/// Per head, with S = Q·Kᵀ·scale, P = softmax(S), P̃ = P ⊙ keep:
/// dV = P̃ᵀ·dO, dP̃ = dO·Vᵀ, dS = P ⊙ (dP − rowsum(dP ⊙ P)) with dP = dP̃ ⊙ keep,
/// dQ = dS·K·scale, dK = dSᵀ·Q·scale; the four products are strided GEMMs straight on
/// `qkv`/`dctx`/`dqkv`. Scratch: three `len × len` matrices, allocated once per call.
/// Serial, like the forward: callers run sequences in parallel.
pub fn attention_sequence_backward(
    qkv: &[f32],
    len: usize,
    h: usize,
    heads: usize,
    dropout: Option<&AttnDropout>,
    dctx: &[f32],
    dqkv: &mut [f32],
) {
    check_attention(qkv, len, h, heads, dctx.len(), "dctx");
    assert_eq!(dqkv.len(), len * 3 * h, "attention: dqkv shape");
    if len == 0 {
        return;
    }
    let dropout = dropout.filter(|d| dropout_active(d.p));
    let dh = h / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    let lp = len.div_ceil(KB) * KB;
    let mut kt = vec![0.0f32; dh * lp];
    let mut q = vec![0.0f32; dh];
    let mut scores = vec![0.0f32; lp];
    let mut p = vec![0.0f32; len * len];
    let mut keep = vec![0.0f32; if dropout.is_some() { len * len } else { 0 }];
    // P̃ first (for dV), then dP̃ and dS in place
    let mut c = vec![0.0f32; len * len];
    let row3 = 3 * h;
    for hd in 0..heads {
        let (qo, ko, vo) = (hd * dh, h + hd * dh, 2 * h + hd * dh);
        head_probs(
            qkv,
            len,
            h,
            hd,
            dh,
            dropout,
            &mut kt,
            &mut q,
            &mut scores,
            &mut p,
            &mut keep,
            &mut c,
        );
        let d_o = &dctx[qo..];
        // dV = P̃ᵀ · dO
        sgemm(
            len,
            len,
            dh,
            1.0,
            &c,
            (1, len),
            d_o,
            (h, 1),
            0.0,
            &mut dqkv[vo..],
            (row3, 1),
        );
        // dP̃ = dO · Vᵀ
        sgemm(
            len,
            dh,
            len,
            1.0,
            d_o,
            (h, 1),
            &qkv[vo..],
            (1, row3),
            0.0,
            &mut c,
            (len, 1),
        );
        softmax_backward(&p, dropout.map(|_| &keep[..]), len, &mut c);
        // dQ = dS · K · scale, dK = dSᵀ · Q · scale
        sgemm(
            len,
            len,
            dh,
            scale,
            &c,
            (len, 1),
            &qkv[ko..],
            (row3, 1),
            0.0,
            &mut dqkv[qo..],
            (row3, 1),
        );
        sgemm(
            len,
            len,
            dh,
            scale,
            &c,
            (1, len),
            &qkv[qo..],
            (row3, 1),
            0.0,
            &mut dqkv[ko..],
            (row3, 1),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Linear, LayerNorm, element-wise ops
// ---------------------------------------------------------------------------------------------

/// Rows (or output features) per parallel task: one task per thread, at least 16. Any split
/// gives the same bits, since each output element's reduction stays inside one GEMM call.
fn task_rows(rows: usize) -> usize {
    rows.div_ceil(rayon::current_num_threads().max(1)).max(16)
}

/// Adds the column sums of `m` (`[rows × cols]`) into `acc`: partial sums over fixed chunks of
/// [`PART_ROWS`] rows in parallel, then the partials in chunk order (thread-count independent).
fn add_column_sums(m: &[f32], cols: usize, acc: &mut [f32]) {
    let partials: Vec<Vec<f32>> = m
        .par_chunks(PART_ROWS * cols)
        .map(|chunk| {
            let mut s = vec![0.0f32; cols];
            for row in chunk.chunks_exact(cols) {
                for (a, v) in s.iter_mut().zip(row) {
                    *a += v;
                }
            }
            s
        })
        .collect();
    for s in &partials {
        for (a, v) in acc.iter_mut().zip(s) {
            *a += v;
        }
    }
}

/// Backward of `y = x·wᵀ + b` (`cpu::gemm::linear`; x `[rows × inp]`, w `[out × inp]`,
/// dy `[rows × out]`): `dx = dy·w` overwritten when given (skip it for the first layer's input);
/// `dw` `[out × inp]` += dyᵀ·x; `db` `[out]` += column sums of dy. Accumulating into dw/db lets
/// a caller sum gradients over micro-batches. dx is split over rows, dw over output features,
/// each a strided GEMM with no transposed copies.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    x: &[f32],
    rows: usize,
    inp: usize,
    w: &[f32],
    out: usize,
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: &mut [f32],
) {
    assert_eq!(x.len(), rows * inp, "linear_backward: x shape");
    assert_eq!(w.len(), out * inp, "linear_backward: w shape");
    assert_eq!(dy.len(), rows * out, "linear_backward: dy shape");
    assert_eq!(dw.len(), out * inp, "linear_backward: dw shape");
    assert_eq!(db.len(), out, "linear_backward: db shape");
    if let Some(dx) = &dx {
        assert_eq!(dx.len(), rows * inp, "linear_backward: dx shape");
    }
    if out == 0 {
        // an empty sum: dx = 0, and there is nothing to accumulate
        if let Some(dx) = dx {
            dx.fill(0.0);
        }
        return;
    }
    if rows == 0 || inp == 0 {
        return;
    }
    if let Some(dx) = dx {
        // dx[rows × inp] = dy[rows × out] · w[out × inp]
        let chunk = task_rows(rows);
        dx.par_chunks_mut(chunk * inp)
            .zip(dy.par_chunks(chunk * out))
            .for_each(|(dxc, dyc)| {
                let m = dyc.len() / out;
                sgemm(
                    m,
                    out,
                    inp,
                    1.0,
                    dyc,
                    (out, 1),
                    w,
                    (inp, 1),
                    0.0,
                    dxc,
                    (inp, 1),
                );
            });
    }
    // dw[o0.., :] += dy[:, o0..]ᵀ · x: A is read transposed through its strides
    let chunk = task_rows(out);
    dw.par_chunks_mut(chunk * inp)
        .enumerate()
        .for_each(|(t, dwc)| {
            let m = dwc.len() / inp;
            sgemm(
                m,
                rows,
                inp,
                1.0,
                &dy[t * chunk..],
                (1, out),
                x,
                (inp, 1),
                1.0,
                dwc,
                (inp, 1),
            );
        });
    add_column_sums(dy, out, db);
}

dispatch_avx2! {
    /// LayerNorm backward over the rows of one chunk, adding the parameter gradients of those
    /// rows, in row order, into `dg`/`dbeta`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward_rows(
        s: &[f32],
        n: usize,
        gamma: &[f32],
        eps: f32,
        dy: &[f32],
        ds: &mut [f32],
        dg: &mut [f32],
        dbeta: &mut [f32]
    ) {
        let nf = n as f32;
        for ((x, dyr), d) in s.chunks_exact(n).zip(dy.chunks_exact(n)).zip(ds.chunks_exact_mut(n)) {
            // mean and variance exactly as math::add_layernorm_row computes them
            let mean = sum_lanes(x) / nf;
            let mut sq = [0.0f32; W];
            let chunks = x.chunks_exact(W);
            let tail: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
            for c in chunks {
                for l in 0..W {
                    sq[l] += (c[l] - mean) * (c[l] - mean);
                }
            }
            let var = (sq.iter().sum::<f32>() + tail) / nf;
            let inv = 1.0 / (var + eps).sqrt();
            // d holds x̂ for now
            for (xh, v) in d.iter_mut().zip(x) {
                *xh = (v - mean) * inv;
            }
            // Σ dy·γ and Σ dy·γ·x̂ in eight lanes; parameter gradients on the way
            let (mut a, mut b) = ([0.0f32; W], [0.0f32; W]);
            let (mut ta, mut tb) = (0.0f32, 0.0f32);
            let full = n / W * W;
            for k0 in (0..full).step_by(W) {
                for l in 0..W {
                    let k = k0 + l;
                    let gy = dyr[k] * gamma[k];
                    a[l] += gy;
                    b[l] += gy * d[k];
                }
            }
            for k in full..n {
                let gy = dyr[k] * gamma[k];
                ta += gy;
                tb += gy * d[k];
            }
            for k in 0..n {
                dg[k] += dyr[k] * d[k];
                dbeta[k] += dyr[k];
            }
            let ma = (a.iter().sum::<f32>() + ta) / nf;
            let mb = (b.iter().sum::<f32>() + tb) / nf;
            for k in 0..n {
                d[k] = inv * (dyr[k] * gamma[k] - ma - d[k] * mb);
            }
        }
    }
}

/// Backward of `y = LayerNorm(s)·gamma + beta` over rows of width `n` (`s` is the pre-norm input,
/// e.g. x + residual, as `math::add_layernorm` forms it; mean and variance are recomputed from
/// `s` exactly as it does): `ds` overwritten (with a residual, it is the gradient of both
/// summands), `dgamma`/`dbeta` `[n]` accumulated (+=). With x̂ = (s − μ)/σ and g = dy·γ:
/// ds = (g − mean(g) − x̂·mean(g·x̂))/σ. Parallel over fixed chunks of rows; the parameter
/// gradients of the chunks are added in chunk order (thread-count independent).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    s: &[f32],
    n: usize,
    gamma: &[f32],
    eps: f32,
    dy: &[f32],
    ds: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    assert!(n > 0, "layernorm_backward: zero width");
    assert_eq!(s.len() % n, 0, "layernorm_backward: s is not whole rows");
    assert_eq!(gamma.len(), n, "layernorm_backward: gamma shape");
    assert_eq!(dy.len(), s.len(), "layernorm_backward: dy shape");
    assert_eq!(ds.len(), s.len(), "layernorm_backward: ds shape");
    assert_eq!(dgamma.len(), n, "layernorm_backward: dgamma shape");
    assert_eq!(dbeta.len(), n, "layernorm_backward: dbeta shape");
    let partials: Vec<(Vec<f32>, Vec<f32>)> = ds
        .par_chunks_mut(PART_ROWS * n)
        .zip(s.par_chunks(PART_ROWS * n))
        .zip(dy.par_chunks(PART_ROWS * n))
        .map(|((dsc, sc), dyc)| {
            let (mut dg, mut db) = (vec![0.0f32; n], vec![0.0f32; n]);
            layernorm_backward_rows(sc, n, gamma, eps, dyc, dsc, &mut dg, &mut db);
            (dg, db)
        })
        .collect();
    for (dg, db) in &partials {
        for (a, v) in dgamma.iter_mut().zip(dg) {
            *a += v;
        }
        for (a, v) in dbeta.iter_mut().zip(db) {
            *a += v;
        }
    }
}

dispatch_avx2! {
    /// Serial part of [`gelu_backward`].
    fn gelu_backward_serial(pre: &[f32], dy: &mut [f32]) {
        const INV_SQRT_2PI: f32 = 0.398_942_3; // 1/√(2π)
        for (g, &x) in dy.iter_mut().zip(pre) {
            let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * exp(-0.5 * x * x);
            *g *= cdf + x * pdf;
        }
    }
}

/// `dy ← dy · gelu'(pre)` for the exact (erf) GELU of `math::gelu`: gelu'(x) = Φ(x) + x·φ(x),
/// with Φ from the same `math::erf` the forward uses. `pre` is the GELU input (the GEMM output
/// with bias). Element-wise, parallel over fixed chunks.
pub fn gelu_backward(pre: &[f32], dy: &mut [f32]) {
    assert_eq!(pre.len(), dy.len(), "gelu_backward: shapes differ");
    dy.par_chunks_mut(ELEM_CHUNK)
        .zip(pre.par_chunks(ELEM_CHUNK))
        .for_each(|(g, x)| gelu_backward_serial(x, g));
}

/// Backward of one row of `math::l2_normalize`: `x` is the input before normalisation, `dy` the
/// gradient of y = x / max(|x|, 1e-12); `dx` overwritten. With n = |x| > 1e-12:
/// dx = (dy − y·(y·dy))/n; below the clamp n is a constant and dx = dy/1e-12.
pub fn l2_normalize_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    assert_eq!(x.len(), dy.len(), "l2_normalize_backward: dy shape");
    assert_eq!(x.len(), dx.len(), "l2_normalize_backward: dx shape");
    // the norm exactly as the forward computes it
    let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
    let inv = 1.0 / norm.max(1e-12);
    if norm <= 1e-12 {
        for (d, g) in dx.iter_mut().zip(dy) {
            *d = g * inv;
        }
        return;
    }
    let ydy: f32 = x.iter().zip(dy).map(|(v, g)| v * inv * g).sum();
    for ((d, v), g) in dx.iter_mut().zip(x).zip(dy) {
        *d = inv * (g - v * inv * ydy);
    }
}

dispatch_avx2! {
    /// Serial part of [`dropout_inplace`]: `x` holds numbers `start..` of the stream.
    fn dropout_serial(x: &mut [f32], p: f32, stream: &Stream, start: u64) {
        let mut keep = [0.0f32; 256];
        for (c, xs) in x.chunks_mut(keep.len()).enumerate() {
            let kc = &mut keep[..xs.len()];
            keep_scales(stream, start + (c * 256) as u64, p, kc);
            for (v, k) in xs.iter_mut().zip(kc.iter()) {
                *v = if *k == 0.0 { 0.0 } else { *v * k };
            }
        }
    }
}

/// Inverted dropout in place: element i is zeroed when `stream.uniform_at(i) < p`, else scaled by
/// 1/(1-p). The same call on the gradient is the backward (the mask is a pure function of the
/// stream). p = 0 returns at once and leaves `x` untouched; p must be in [0, 1).
pub fn dropout_inplace(x: &mut [f32], p: f32, stream: &Stream) {
    if !dropout_active(p) {
        return;
    }
    x.par_chunks_mut(ELEM_CHUNK)
        .enumerate()
        .for_each(|(c, xs)| dropout_serial(xs, p, stream, (c * ELEM_CHUNK) as u64));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::attention::attention_sequence;
    use crate::index::synthetic::Rng;
    use crate::train::rng::Site;

    fn uniform(rng: &mut Rng, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n)
            .map(|_| (lo + (hi - lo) * rng.next_f64()) as f32)
            .collect()
    }

    fn to64(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    /// Central-difference gradient of the f64 objective `f` at `x0`, element by element.
    /// Step 1e-6 in f64: truncation error ~1e-12·|f'''| and rounding ~1e-16·|f|/1e-6 ~ 1e-10,
    /// both far below the f32 error of the analytic gradients being checked.
    fn fd_grad(x0: &[f32], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
        const STEP: f64 = 1e-6;
        let mut x = to64(x0);
        (0..x.len())
            .map(|i| {
                let v = x[i];
                x[i] = v + STEP;
                let up = f(&x);
                x[i] = v - STEP;
                let down = f(&x);
                x[i] = v;
                (up - down) / (2.0 * STEP)
            })
            .collect()
    }

    /// |got − want| ≤ tol · (1 + max|want|) element-wise: the analytic gradient is computed in
    /// f32, so its error scales with the gradient's magnitude, not each element's.
    fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = 1.0 + want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= tol * scale,
                "{what}[{i}]: analytic {g} vs finite difference {w} (tol {tol} × {scale})"
            );
        }
    }

    fn dot(r: &[f32], y: &[f64]) -> f64 {
        r.iter().zip(y).map(|(&a, b)| a as f64 * b).sum()
    }

    // ----- f64 reference forwards -----

    fn attention_ref(
        qkv: &[f64],
        len: usize,
        h: usize,
        heads: usize,
        dropout: Option<&AttnDropout>,
    ) -> Vec<f64> {
        let dh = h / heads;
        let mut out = vec![0.0; len * h];
        for hd in 0..heads {
            let at = |r: usize, part: usize, d: usize| qkv[r * 3 * h + part * h + hd * dh + d];
            for i in 0..len {
                let s: Vec<f64> = (0..len)
                    .map(|j| {
                        (0..dh).map(|d| at(i, 0, d) * at(j, 1, d)).sum::<f64>() / (dh as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for (j, sj) in s.iter().enumerate() {
                    let mut pj = (sj - m).exp() / z;
                    if let Some(dr) = dropout {
                        let u = dr.stream.uniform_at(((hd * len + i) * len + j) as u64);
                        pj = if u < dr.p {
                            0.0
                        } else {
                            pj / (1.0 - dr.p as f64)
                        };
                    }
                    for d in 0..dh {
                        out[i * h + hd * dh + d] += pj * at(j, 2, d);
                    }
                }
            }
        }
        out
    }

    fn linear_ref(
        x: &[f64],
        rows: usize,
        inp: usize,
        w: &[f64],
        b: &[f64],
        out: usize,
    ) -> Vec<f64> {
        let mut y = vec![0.0; rows * out];
        for r in 0..rows {
            for o in 0..out {
                y[r * out + o] = b[o]
                    + (0..inp)
                        .map(|i| x[r * inp + i] * w[o * inp + i])
                        .sum::<f64>();
            }
        }
        y
    }

    fn layernorm_ref(s: &[f64], n: usize, g: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
        let mut y = vec![0.0; s.len()];
        for (row, yr) in s.chunks(n).zip(y.chunks_mut(n)) {
            let mean = row.iter().sum::<f64>() / n as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
            let inv = 1.0 / (var + eps).sqrt();
            for k in 0..n {
                yr[k] = (row[k] - mean) * inv * g[k] + b[k];
            }
        }
        y
    }

    fn gelu_ref(x: f64) -> f64 {
        0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
    }

    fn l2_ref(x: &[f64]) -> Vec<f64> {
        let n = x.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        x.iter().map(|v| v / n).collect()
    }

    // ----- finite-difference checks -----

    #[test]
    fn attention_backward_matches_finite_differences() {
        let mut rng = Rng::new(11);
        for (case, &(len, p)) in [(5, 0.0f32), (7, 0.3), (9, 0.3), (8, 0.0)]
            .iter()
            .enumerate()
        {
            let (h, heads) = (16, 2);
            let qkv = uniform(&mut rng, len * 3 * h, -1.5, 1.5);
            let r = uniform(&mut rng, len * h, -1.0, 1.0);
            let drop = AttnDropout {
                p,
                stream: Stream::new(5, case as u64, 3, 1, Site::AttentionDropout),
            };
            let dropout = (p > 0.0).then_some(&drop);
            if let Some(d) = dropout {
                // the mask actually drops something, else the dropout path is not exercised
                let n = (heads * len * len) as u64;
                assert!((0..n).any(|i| d.stream.uniform_at(i) < p));
            }
            // the reference forward is the same function as the f32 forward
            let mut out = vec![0.0f32; len * h];
            attention_sequence_train(&qkv, len, h, heads, dropout, &mut out);
            // f32 softmax and sums of ≤ 9 terms of magnitude ≲ 3: a few ulps.
            assert_close(
                "forward",
                &out,
                &attention_ref(&to64(&qkv), len, h, heads, dropout),
                1e-6,
            );

            let mut dqkv = vec![f32::NAN; len * 3 * h];
            attention_sequence_backward(&qkv, len, h, heads, dropout, &r, &mut dqkv);
            let fd = fd_grad(&qkv, |x| dot(&r, &attention_ref(x, len, h, heads, dropout)));
            // f32 backward: GEMMs of ≤ 9 terms and a softmax backward, a few ulps (~1e-7,
            // measured ≤ 7e-8) of the largest gradient; 1e-6 leaves 10× margin while any
            // missing or wrong term (e.g. the mask on dP) is off by orders of magnitude more.
            assert_close("dqkv", &dqkv, &fd, 1e-6);
        }
    }

    #[test]
    fn linear_backward_matches_finite_differences() {
        let mut rng = Rng::new(12);
        let (rows, inp, out) = (5, 13, 9);
        let x = uniform(&mut rng, rows * inp, -1.0, 1.0);
        let w = uniform(&mut rng, out * inp, -1.0, 1.0);
        let b = uniform(&mut rng, out, -1.0, 1.0);
        let r = uniform(&mut rng, rows * out, -1.0, 1.0);
        let mut dx = vec![f32::NAN; rows * inp];
        // accumulation: start dw/db from known values and subtract them after
        let mut dw = vec![0.5f32; out * inp];
        let mut db = vec![-0.25f32; out];
        linear_backward(&x, rows, inp, &w, out, &r, Some(&mut dx), &mut dw, &mut db);
        dw.iter_mut().for_each(|v| *v -= 0.5);
        db.iter_mut().for_each(|v| *v += 0.25);
        let (x64, w64, b64) = (to64(&x), to64(&w), to64(&b));
        // sums of ≤ 13 products of magnitude ≤ 1 in f32, and the ±0.5 start values added and
        // removed again (one ulp of 0.5 ≈ 6e-8): measured ≤ 9e-8.
        let tol = 1e-6;
        let fdx = fd_grad(&x, |x| dot(&r, &linear_ref(x, rows, inp, &w64, &b64, out)));
        assert_close("dx", &dx, &fdx, tol);
        let fdw = fd_grad(&w, |w| dot(&r, &linear_ref(&x64, rows, inp, w, &b64, out)));
        assert_close("dw", &dw, &fdw, tol);
        let fdb = fd_grad(&b, |b| dot(&r, &linear_ref(&x64, rows, inp, &w64, b, out)));
        assert_close("db", &db, &fdb, tol);

        // dx = None leaves the weight gradients unchanged
        let (mut dw2, mut db2) = (vec![0.5f32; out * inp], vec![-0.25f32; out]);
        linear_backward(&x, rows, inp, &w, out, &r, None, &mut dw2, &mut db2);
        dw2.iter_mut().for_each(|v| *v -= 0.5);
        db2.iter_mut().for_each(|v| *v += 0.25);
        assert_eq!(dw, dw2);
        assert_eq!(db, db2);
    }

    #[test]
    fn layernorm_backward_matches_finite_differences() {
        let mut rng = Rng::new(13);
        for n in [8, 19, 24] {
            let rows = 4;
            let eps = 1e-5f32;
            // rows with different offsets and spreads
            let mut s = uniform(&mut rng, rows * n, -1.0, 1.0);
            for (k, row) in s.chunks_mut(n).enumerate() {
                row.iter_mut()
                    .for_each(|v| *v = *v * (0.5 + k as f32) + k as f32);
            }
            let g = uniform(&mut rng, n, 0.5, 1.5);
            let b = uniform(&mut rng, n, -0.5, 0.5);
            let r = uniform(&mut rng, rows * n, -1.0, 1.0);
            let mut ds = vec![f32::NAN; rows * n];
            let (mut dg, mut dbeta) = (vec![0.0f32; n], vec![0.0f32; n]);
            layernorm_backward(&s, n, &g, eps, &r, &mut ds, &mut dg, &mut dbeta);
            let (s64, g64, b64) = (to64(&s), to64(&g), to64(&b));
            let e = eps as f64;
            // normalised values are O(1); f32 means, variances and sums of ≤ 24 terms give a
            // few ulps of error on gradients of size O(1)·(1/σ) (measured ≤ 1e-7).
            let tol = 1e-6;
            let fds = fd_grad(&s, |s| dot(&r, &layernorm_ref(s, n, &g64, &b64, e)));
            assert_close("ds", &ds, &fds, tol);
            let fdg = fd_grad(&g, |g| dot(&r, &layernorm_ref(&s64, n, g, &b64, e)));
            assert_close("dgamma", &dg, &fdg, tol);
            let fdb = fd_grad(&b, |b| dot(&r, &layernorm_ref(&s64, n, &g64, b, e)));
            assert_close("dbeta", &dbeta, &fdb, tol);
        }
    }

    #[test]
    fn gelu_backward_matches_finite_differences() {
        let mut rng = Rng::new(14);
        // beyond ±5.66 the forward's erf saturates; the exact derivative is still what we want
        let x = uniform(&mut rng, 64, -6.0, 6.0);
        let r = uniform(&mut rng, 64, -1.0, 1.0);
        let mut g = r.clone();
        gelu_backward(&x, &mut g);
        let fd = fd_grad(&x, |x| {
            r.iter().zip(x).map(|(&a, &v)| a as f64 * gelu_ref(v)).sum()
        });
        // f32 erf (≤ 5e-7 abs, so Φ ≤ 2.5e-7) and exp (2e-7 rel) in Φ + x·φ, against a
        // bound of 1e-6·(1 + max|grad|) ≥ 2e-6 (measured ≤ 5e-8).
        assert_close("dgelu", &g, &fd, 1e-6);
    }

    #[test]
    fn l2_normalize_backward_matches_finite_differences() {
        let mut rng = Rng::new(15);
        for n in [8, 17, 24] {
            let x = uniform(&mut rng, n, -2.0, 2.0);
            let r = uniform(&mut rng, n, -1.0, 1.0);
            let mut dx = vec![f32::NAN; n];
            l2_normalize_backward(&x, &r, &mut dx);
            let fd = fd_grad(&x, |x| dot(&r, &l2_ref(x)));
            // f32 norm and a dot of ≤ 24 terms: a few ulps (measured ≤ 4e-8).
            assert_close("dl2", &dx, &fd, 1e-6);
        }
        // a zero vector: the clamped norm is a constant, so the map is x/1e-12
        let mut dx = vec![0.0f32; 3];
        l2_normalize_backward(&[0.0; 3], &[1.0, -2.0, 0.5], &mut dx);
        assert_eq!(dx, [1e12, -2e12, 0.5e12]);
    }

    #[test]
    fn dropout_backward_matches_finite_differences() {
        let mut rng = Rng::new(16);
        let stream = Stream::new(9, 2, 0, 0, Site::FfnOutputDropout);
        let p = 0.3f32;
        let x = uniform(&mut rng, 50, -1.0, 1.0);
        let r = uniform(&mut rng, 50, -1.0, 1.0);
        let mut g = r.clone();
        dropout_inplace(&mut g, p, &stream);
        let f = |x: &[f64]| -> f64 {
            let mut y = 0.0;
            for (i, v) in x.iter().enumerate() {
                if stream.uniform_at(i as u64) >= p {
                    y += r[i] as f64 * v / (1.0 - p as f64);
                }
            }
            y
        };
        // linear map: only the f32 vs f64 scale 1/(1-p) differs (~1e-7 relative)
        assert_close("ddropout", &g, &fd_grad(&x, f), 1e-6);
    }

    // ----- other properties -----

    #[test]
    fn train_forward_without_dropout_matches_inference() {
        let mut rng = Rng::new(17);
        for (len, h, heads) in [(33, 64, 2), (70, 128, 2), (33, 128, 4), (70, 64, 1)] {
            let qkv = uniform(&mut rng, len * 3 * h, -2.0, 2.0);
            let mut want = vec![0.0f32; len * h];
            attention_sequence(&qkv, len, h, heads, &mut want);
            let drop0 = AttnDropout {
                p: 0.0,
                stream: Stream::new(1, 0, 0, 0, Site::AttentionDropout),
            };
            for dropout in [None, Some(&drop0)] {
                let mut got = vec![f32::NAN; len * h];
                attention_sequence_train(&qkv, len, h, heads, dropout, &mut got);
                for (a, b) in got.iter().zip(&want) {
                    // same arithmetic in the same order: equal in practice; 1e-6 is the contract
                    assert!((a - b).abs() <= 1e-6, "{a} vs {b} (len {len}, h {h})");
                }
            }
        }
    }

    #[test]
    fn dropout_statistics() {
        let stream = Stream::new(3, 7, 1, 2, Site::EmbeddingDropout);
        let n = 100_000;
        let x: Vec<f32> = (0..n).map(|i| 1.0 + (i % 97) as f32 / 10.0).collect();
        for p in [0.1f32, 0.3, 0.5] {
            let mut y = x.clone();
            dropout_inplace(&mut y, p, &stream);
            let scale = 1.0 / (1.0 - p);
            let mut dropped = 0usize;
            for (i, (&a, &b)) in y.iter().zip(&x).enumerate() {
                // the mask is exactly the documented one, and kept values are scaled
                if stream.uniform_at(i as u64) < p {
                    assert_eq!(a, 0.0);
                    dropped += 1;
                } else {
                    assert_eq!(a, b * scale);
                }
            }
            let frac = dropped as f64 / n as f64;
            let se = (p as f64 * (1.0 - p as f64) / n as f64).sqrt();
            assert!((frac - p as f64).abs() < 5.0 * se, "p {p}: dropped {frac}");
        }
        let mut y = x.clone();
        dropout_inplace(&mut y, 0.0, &stream);
        assert_eq!(y, x);
    }

    #[test]
    fn results_do_not_depend_on_thread_count() {
        let mut rng = Rng::new(18);
        let (rows, inp, out) = (300, 40, 48);
        let x = uniform(&mut rng, rows * inp, -1.0, 1.0);
        let w = uniform(&mut rng, out * inp, -1.0, 1.0);
        let dy = uniform(&mut rng, rows * out, -1.0, 1.0);
        let s = uniform(&mut rng, (rows + 250) * inp, -2.0, 2.0); // > 2 LayerNorm chunks
        let dys = uniform(&mut rng, s.len(), -1.0, 1.0);
        let gamma = uniform(&mut rng, inp, 0.5, 1.5);
        let stream = Stream::new(1, 2, 3, 4, Site::FfnOutputDropout);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            pool.install(|| {
                let mut dx = vec![0.0f32; rows * inp];
                let (mut dw, mut db) = (vec![0.1f32; out * inp], vec![0.1f32; out]);
                linear_backward(&x, rows, inp, &w, out, &dy, Some(&mut dx), &mut dw, &mut db);
                let mut ds = vec![0.0f32; s.len()];
                let (mut dg, mut dbeta) = (vec![0.0f32; inp], vec![0.0f32; inp]);
                layernorm_backward(&s, inp, &gamma, 1e-12, &dys, &mut ds, &mut dg, &mut dbeta);
                let mut gl = dys.clone();
                gelu_backward(&s, &mut gl);
                dropout_inplace(&mut gl, 0.2, &stream);
                [dx, dw, db, ds, dg, dbeta, gl]
            })
        };
        let (one, three) = (run(1), run(3));
        for (a, b) in one.iter().zip(&three) {
            let (a, b): (Vec<u32>, Vec<u32>) = (
                a.iter().map(|v| v.to_bits()).collect(),
                b.iter().map(|v| v.to_bits()).collect(),
            );
            assert_eq!(a, b);
        }
    }
}
