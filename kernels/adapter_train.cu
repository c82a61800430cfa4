// Training of the RRRA adapter on the GPU: the forward pass that keeps what the backward needs,
// and the backward pass of the fused scoring op (the device twins of score / backward in
// src/adapter/scoring.rs), for Q queries × K candidates = P pairs.
//
// The matrix products go through cuBLAS (f32, src/device/adapter_train.rs issues them) and the
// GELU gradient through backward.cu's rrra_gelu_backward_f32; these kernels are the row-wise
// and element-wise steps between them:
//
//  rrra_adapter_train_recut        W1 [h × 3d] → W1sum = W1a + W1c [h × d] and
//                                  Wpair = [W1c − W1a | W1b] [h × 2d] (after every update)
//  rrra_adapter_train_features     F = [c ; q ⊙ c] per pair [P × 2d]
//  rrra_adapter_train_hidden       pre += u_q + b1 (the query's bias row), g = GELU(pre) (exact erf)
//  rrra_adapter_train_geometry     a = (W2·g + b2) + c, the pair's norms and cosines (warp per
//                                  pair, f64 sums in a fixed order), the logit and alpha (for
//                                  the normalisation loss)
//  rrra_adapter_train_pair_grad    ∂a = s·(∂QA/∂a − ∂CA/∂a) (+ ∂a from a loss on a), and the
//                                  direct parts of ∂q, ∂c, and the terms of ∂beta, ∂beta0
//  rrra_adapter_train_group_sums   out[g] = Σ of `per` consecutive rows, f64, in row order:
//                                  per-query sums (∂u) and the bias / beta gradients
//  rrra_adapter_train_w1_grad      ∂W1 = [UQ − CF_c | CF_qc | UQ + CF_c] from the two GEMMs
//  rrra_adapter_train_input_grads  ∂c = direct + ∂F_c + q ⊙ ∂F_qc per pair, and
//                                  ∂q = Σ_k (direct + c ⊙ ∂F_qc) + (W1a + W1c)ᵀ ∂u per query
//
// Every reduction is atomic-free and runs in a fixed order, so a step replays bit for bit.
//
// Roofline (MiniLM adapter d = h = 384; stage 2 batch of 64 queries × 200 candidates, P = 12 800):
// the step is ~6 GEMMs of P × 384 × 384..768 (≈ 11 GFLOP forward + backward, ~0.2 ms at the
// H200's ~60 TFLOP/s f32), and these kernels each stream a few P × d tensors (≤ 20 MB each,
// ~5 µs at 4 TB/s): the products dominate. The warp-per-pair kernels do ~10 flops per 12 bytes.

#include <stdint.h>

#include "common.cuh"

#define THREADS 256

// The geometry slots of one pair (doubles): |q|, |a|, |c| (clamped), QA, CA, and 1/|x|² for q,
// a, c (0 at the clamp).
#define GEO 8
#define NORM_EPS 1e-12

extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_adapter_train_recut(const float* __restrict__ w1, int d, int h, float* __restrict__ w_sum,
                             float* __restrict__ w_pair) {
    const long long n = (long long)h * d;
    for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n;
         x += (long long)gridDim.x * blockDim.x) {
        const long long j = x / d, l = x % d;
        const float wa = w1[j * 3 * d + l], wb = w1[j * 3 * d + d + l], wc = w1[j * 3 * d + 2 * d + l];
        w_sum[j * d + l] = wa + wc;
        w_pair[j * 2 * d + l] = wc - wa;
        w_pair[j * 2 * d + d + l] = wb;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_adapter_train_features(const float* __restrict__ q, const float* __restrict__ c, int k,
                                long long pairs, int d, float* __restrict__ f) {
    const long long n = pairs * d;
    for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n;
         x += (long long)gridDim.x * blockDim.x) {
        const long long p = x / d, l = x % d, i = p / k;
        const float cv = c[x];
        f[p * 2 * d + l] = cv;
        f[p * 2 * d + d + l] = q[i * d + l] * cv;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_adapter_train_hidden(float* __restrict__ pre, const float* __restrict__ u,
                              const float* __restrict__ b1, int k, long long pairs, int h,
                              float* __restrict__ g) {
    const long long n = pairs * h;
    for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n;
         x += (long long)gridDim.x * blockDim.x) {
        const long long p = x / h, j = x % h;
        const float v = pre[x] + (u[(p / k) * h + j] + b1[j]);
        pre[x] = v;
        g[x] = gelu_erf(v);
    }
}

// One warp per pair. a_io holds W2·g on entry and a on exit.
extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_adapter_train_geometry(const float* __restrict__ q, const float* __restrict__ c,
                                float* __restrict__ a_io, const float* __restrict__ b2, int k,
                                long long pairs, int d, float beta, float beta0,
                                float* __restrict__ logit, float* __restrict__ alpha,
                                double* __restrict__ geo) {
    const long long p = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (p >= pairs) return;
    const float* qp = q + (p / k) * d;
    const float* cp = c + p * d;
    float* ap = a_io + p * d;
    double qq = 0, aa = 0, cc = 0, qa = 0, ac = 0, num = 0, den = 0;
    for (int l = lane; l < d; l += 32) {
        // residual last, as on the CPU: W2 = 0, b2 = 0 gives a = c exactly
        const float av = (ap[l] + b2[l]) + cp[l];
        ap[l] = av;
        const double qv = qp[l], cv = cp[l], a = av;
        qq += qv * qv;
        aa += a * a;
        cc += cv * cv;
        qa += qv * a;
        ac += a * cv;
        num += (a - cv) * (qv - cv);
        den += (qv - cv) * (qv - cv);
    }
    qq = warp_sum_f64(qq);
    aa = warp_sum_f64(aa);
    cc = warp_sum_f64(cc);
    qa = warp_sum_f64(qa);
    ac = warp_sum_f64(ac);
    num = warp_sum_f64(num);
    den = warp_sum_f64(den);
    if (lane != 0) return;
    const double nq = fmax(sqrt(qq), NORM_EPS), na = fmax(sqrt(aa), NORM_EPS),
                 nc = fmax(sqrt(cc), NORM_EPS);
    const double cos_qa = qa / (nq * na), cos_ca = ac / (na * nc);
    double* g = geo + p * GEO;
    g[0] = nq;
    g[1] = na;
    g[2] = nc;
    g[3] = cos_qa;
    g[4] = cos_ca;
    g[5] = sqrt(qq) > NORM_EPS ? 1.0 / qq : 0.0;
    g[6] = sqrt(aa) > NORM_EPS ? 1.0 / aa : 0.0;
    g[7] = sqrt(cc) > NORM_EPS ? 1.0 / cc : 0.0;
    logit[p] = (float)((double)beta * (cos_qa - cos_ca) + (double)beta0);
    // q = c leaves the segment undefined: alpha 0 (as the CPU reference)
    alpha[p] = den > 0.0 ? (float)fmin(fmax(num / den, 0.0), 1.0) : 0.0f;
}

// One warp per pair. d_a_extra, dq_direct and dc may be null.
extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_adapter_train_pair_grad(const float* __restrict__ q, const float* __restrict__ c,
                                 const float* __restrict__ a, const double* __restrict__ geo,
                                 const float* __restrict__ d_logit,
                                 const float* __restrict__ d_a_extra, int k, long long pairs, int d,
                                 float beta, float* __restrict__ da, float* __restrict__ dq_direct,
                                 float* __restrict__ dc, float* __restrict__ dscalar) {
    const long long p = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (p >= pairs) return;
    const double* g = geo + p * GEO;
    const double nq = g[0], na = g[1], nc = g[2], cqa = g[3], cca = g[4], inv_qq = g[5],
                 inv_aa = g[6], inv_cc = g[7];
    const double gl = d_logit[p];
    const double s = gl * (double)beta;
    const double inv_qa = 1.0 / (nq * na), inv_ac = 1.0 / (na * nc);
    const float* qp = q + (p / k) * d;
    const long long o = p * d;
    for (int l = lane; l < d; l += 32) {
        const double qv = qp[l], cv = c[o + l], av = a[o + l];
        // ∂QA/∂a − ∂CA/∂a, scaled by ∂L/∂logit · beta
        double v = s * (qv * inv_qa - cqa * av * inv_aa - cv * inv_ac + cca * av * inv_aa);
        if (d_a_extra) v += d_a_extra[o + l];
        da[o + l] = (float)v;
        if (dq_direct) dq_direct[o + l] = (float)(s * (av * inv_qa - cqa * qv * inv_qq));
        // −∂CA/∂c, then the residual path a = c + …
        if (dc) dc[o + l] = (float)(-s * (av * inv_ac - cca * cv * inv_cc) + v);
    }
    if (lane == 0) {
        dscalar[p * 2] = (float)(gl * (cqa - cca));
        dscalar[p * 2 + 1] = (float)gl;
    }
}

// out[g·cols + j] = Σ_{r < per} x[(g·per + r)·cols + j]: one thread per (group, column), the
// rows in order, in f64 (a warp reads 32 consecutive columns of a row: coalesced).
extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_adapter_train_group_sums(const float* __restrict__ x, int groups, int per, int cols,
                                  float* __restrict__ out) {
    const long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (t >= (long long)groups * cols) return;
    const long long g = t / cols, j = t % cols;
    double acc = 0.0;
    const float* base = x + g * per * (long long)cols + j;
    for (int r = 0; r < per; ++r) acc += (double)base[(long long)r * cols];
    out[t] = (float)acc;
}

// gw1 [h × 3d] = [UQ − CF_c | CF_qc | UQ + CF_c], UQ [h × d], CF [h × 2d].
extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_adapter_train_w1_grad(const float* __restrict__ uq, const float* __restrict__ cf, int d,
                               int h, float* __restrict__ gw1) {
    const long long n = (long long)h * d;
    for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n;
         x += (long long)gridDim.x * blockDim.x) {
        const long long j = x / d, l = x % d;
        const float u = uq[x], cc = cf[j * 2 * d + l], cqc = cf[j * 2 * d + d + l];
        float* row = gw1 + j * 3 * d;
        row[l] = u - cc;
        row[d + l] = cqc;
        row[2 * d + l] = u + cc;
    }
}

// dc [P × d] (in: the direct part) += dF_c + q ⊙ dF_qc, per element; then, one thread per
// (query, coordinate), dq = Σ_k (dq_direct + c ⊙ dF_qc) + e (e = (W1a + W1c)ᵀ ∂u, [Q × d]), the
// pairs in order, f64.
extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_adapter_train_input_grads(const float* __restrict__ q, const float* __restrict__ c,
                                   const float* __restrict__ df, const float* __restrict__ dq_direct,
                                   const float* __restrict__ e, int nq, int k, int d,
                                   float* __restrict__ dc, float* __restrict__ dq) {
    const long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (t >= (long long)nq * d) return;
    const long long i = t / d, l = t % d;
    const float qv = q[t];
    double acc = e[t];
    for (int kk = 0; kk < k; ++kk) {
        const long long p = i * k + kk;
        const float dfc = df[p * 2 * d + l], dfqc = df[p * 2 * d + d + l];
        const float cv = c[p * d + l];
        dc[p * d + l] += dfc + qv * dfqc;
        acc += (double)dq_direct[p * d + l] + (double)cv * (double)dfqc;
    }
    dq[t] = (float)acc;
}
