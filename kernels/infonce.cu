// rrra_infonce_*: the fused weighted InfoNCE loss, forward and backward, mirroring
// src/train/loss.rs (`info_nce`):
//   s_bj = <q_b, d_j> / tau,  logit_bj = s_bj + log w_bj (log w = 0 for the positive t(b)),
//   L_b = LSE_j(logit_bj) - s_b,t(b),   g_bj = (exp(logit_bj - LSE_b) - [j = t(b)]) / B,
//   dq_b = sum_j (g_bj / tau) d_j,   dd_j = sum_b (g_bj / tau) q_b.
//
// Three kernels, no B x D matrix anywhere (scores are recomputed, which costs 2d flops each):
//   rrra_infonce_rows  one block per query: scores 32 documents at a time (each warp one document,
//       f64 dot product), then thread 0 folds the tile into an online log-sum-exp in document
//       order and keeps the statistics (positive score, best negative, negative sum and count).
//       Writes the per-query LSE (f64) and statistics.
//   rrra_infonce_dq    one block per query: recomputes the tile's g_bj from the saved LSE, then
//       each thread accumulates its dq elements over documents in index order.
//   rrra_infonce_dd    one block per document: the same over queries in index order.
// Every output element is owned by one thread and summed in a fixed order: deterministic, no
// atomics, and in the same order as the CPU (which adds query b's row into dd before query b+1's).
//
// Arithmetic, chosen to reproduce the CPU closely: dot products of f32 inputs in f64 (products
// exact, the sum differs from the CPU's only by order, ~1e-16 relative), logits, LSE and g in
// f64 with the CPU's operation order (explicit _rn intrinsics: no FMA contraction), g / B / tau
// rounded to f32 like the CPU's `gs`, and the gradient sums in f32 with separate multiply and add
// (`o += gs * v`), skipping g == 0 exactly as the CPU does. The only differences left are the
// LSE's summation order (online rescaling) and CUDA's double exp/log (<= 1 ulp): ~1e-15 in g,
// visible in dq/dd only when a gs rounds differently, i.e. ~1 f32 ulp on a few terms.
//
// Roofline (B queries, D documents, dim d; H200 ~67 TFLOP/s FP64-tensor/34 FP64 vector, 4.3 TB/s):
// 3 passes of B*D dot products = 6*B*D*d f64 flops (64 x 512 x 768: 151 MFLOP, ~5 us at the FP64
// vector peak) plus 2*B*D*d f32 flops of gradient sums; inputs are read from L2 (1.8 MB). The
// minimum traffic is reading Q and D once and writing dq and dd: 8*(B + D)*d bytes (3.5 MB,
// ~1 us). So the op is latency/occupancy bound at training sizes (B blocks for two of the three
// kernels), tens of microseconds; not worth a tensor-core path beside the encoder's backward.

#define RRRA_NCE_TILE 32
#define RRRA_NCE_THREADS 256
#define RRRA_NCE_WARPS (RRRA_NCE_THREADS / 32)

// <a, b> over n elements in f64, by one warp (every lane gets the result).
__device__ __forceinline__ double rrra_warp_dot(const float* __restrict__ a,
                                                const float* __restrict__ b, int n) {
    const int lane = threadIdx.x % 32;
    double acc = 0.0;
    for (int k = lane; k < n; k += 32) acc = fma((double)a[k], (double)b[k], acc);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    return acc;
}

// logit_bj = raw * inv_tau + lw (the CPU's `raw[j] * inv_tau + lw`).
__device__ __forceinline__ double rrra_logit(double raw, double inv_tau, const float* lw,
                                             long long b, long long j, int D, int t) {
    const double w = (lw != nullptr && j != t) ? (double)lw[b * D + j] : 0.0;
    return __dadd_rn(__dmul_rn(raw, inv_tau), w);
}

// gs = (float)((g * inv_b) * inv_tau), g = exp(logit - lse) - [j = t]; *skip when g == 0.
__device__ __forceinline__ float rrra_grad_coef(double logit, double lse, bool is_target,
                                                double inv_b, double inv_tau, int* skip) {
    double g = exp(__dsub_rn(logit, lse));
    if (is_target) g = __dsub_rn(g, 1.0);
    *skip = (g == 0.0);
    return (float)__dmul_rn(__dmul_rn(g, inv_b), inv_tau);
}

// queries [B x d], docs [D x d], targets [B], lw [B x D] or null.
// lse_out [B]; stats [B x 5]: loss_b, correct_b (0/1), raw positive score, negative score sum,
// negative count.
extern "C" __global__ void __launch_bounds__(RRRA_NCE_THREADS)
    rrra_infonce_rows(const float* __restrict__ queries, const float* __restrict__ docs,
                      const int* __restrict__ targets, const float* __restrict__ lw, int D, int d,
                      double inv_tau, double* __restrict__ lse_out, double* __restrict__ stats) {
    __shared__ double raw_s[RRRA_NCE_TILE];
    const long long b = blockIdx.x;
    const int t = targets[b];
    const float* q = queries + b * d;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const double NEG_INF = __longlong_as_double(0xfff0000000000000ll);
    // thread 0's running state
    double m = NEG_INF, s = 0.0, raw_t = 0.0, best_neg = NEG_INF, neg_sum = 0.0, neg_count = 0.0;
    for (int base = 0; base < D; base += RRRA_NCE_TILE) {
        const int len = min(RRRA_NCE_TILE, D - base);
        for (int jt = warp; jt < len; jt += RRRA_NCE_WARPS) {
            const double r = rrra_warp_dot(q, docs + (long long)(base + jt) * d, d);
            if (lane == 0) raw_s[jt] = r;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int jt = 0; jt < len; ++jt) {
                const int j = base + jt;
                const double raw = raw_s[jt];
                const double x = rrra_logit(raw, inv_tau, lw, b, j, D, t);
                // online log-sum-exp; NaN propagates into s like the CPU's sum
                if (x > m) {
                    s = __dadd_rn(__dmul_rn(s, exp(__dsub_rn(m, x))), 1.0);
                    m = x;
                } else if (!(x == NEG_INF)) {
                    s = __dadd_rn(s, exp(__dsub_rn(x, m)));
                }
                if (j == t) {
                    raw_t = raw;
                } else if (x > NEG_INF) {
                    best_neg = fmax(best_neg, raw);
                    neg_sum = __dadd_rn(neg_sum, raw);
                    neg_count += 1.0;
                }
            }
        }
        __syncthreads();  // raw_s is rewritten by the next tile
    }
    if (threadIdx.x == 0) {
        const double lse = __dadd_rn(m, log(s));
        lse_out[b] = lse;
        double* st = stats + b * 5;
        st[0] = __dsub_rn(lse, __dmul_rn(raw_t, inv_tau));
        st[1] = (raw_t > best_neg) ? 1.0 : 0.0;
        st[2] = raw_t;
        st[3] = neg_sum;
        st[4] = neg_count;
    }
}

// dq [B x d]: one block per query, documents in index order.
extern "C" __global__ void __launch_bounds__(RRRA_NCE_THREADS)
    rrra_infonce_dq(const float* __restrict__ queries, const float* __restrict__ docs,
                    const int* __restrict__ targets, const float* __restrict__ lw, int D, int d,
                    double inv_tau, double inv_b, const double* __restrict__ lse_in,
                    float* __restrict__ dq) {
    __shared__ float gs_s[RRRA_NCE_TILE];
    __shared__ int skip_s[RRRA_NCE_TILE];
    const long long b = blockIdx.x;
    const int t = targets[b];
    const double lse = lse_in[b];
    const float* q = queries + b * d;
    float* out = dq + b * d;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int k = threadIdx.x; k < d; k += blockDim.x) out[k] = 0.0f;
    for (int base = 0; base < D; base += RRRA_NCE_TILE) {
        const int len = min(RRRA_NCE_TILE, D - base);
        for (int jt = warp; jt < len; jt += RRRA_NCE_WARPS) {
            const int j = base + jt;
            const double r = rrra_warp_dot(q, docs + (long long)j * d, d);
            if (lane == 0) {
                int skip;
                gs_s[jt] = rrra_grad_coef(rrra_logit(r, inv_tau, lw, b, j, D, t), lse, j == t,
                                          inv_b, inv_tau, &skip);
                skip_s[jt] = skip;
            }
        }
        __syncthreads();
        for (int k = threadIdx.x; k < d; k += blockDim.x) {
            float o = out[k];  // only this thread reads or writes out[k]
            for (int jt = 0; jt < len; ++jt) {
                if (skip_s[jt]) continue;
                o = __fadd_rn(o, __fmul_rn(gs_s[jt], docs[(long long)(base + jt) * d + k]));
            }
            out[k] = o;
        }
        __syncthreads();  // gs_s is rewritten by the next tile
    }
}

// dd [D x d]: one block per document, queries in index order.
extern "C" __global__ void __launch_bounds__(RRRA_NCE_THREADS)
    rrra_infonce_dd(const float* __restrict__ queries, const float* __restrict__ docs,
                    const int* __restrict__ targets, const float* __restrict__ lw, int B, int D,
                    int d, double inv_tau, double inv_b, const double* __restrict__ lse_in,
                    float* __restrict__ dd) {
    __shared__ float gs_s[RRRA_NCE_TILE];
    __shared__ int skip_s[RRRA_NCE_TILE];
    const long long j = blockIdx.x;
    const float* doc = docs + j * d;
    float* out = dd + j * d;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int k = threadIdx.x; k < d; k += blockDim.x) out[k] = 0.0f;
    for (int base = 0; base < B; base += RRRA_NCE_TILE) {
        const int len = min(RRRA_NCE_TILE, B - base);
        for (int bt = warp; bt < len; bt += RRRA_NCE_WARPS) {
            const long long b = base + bt;
            const double r = rrra_warp_dot(queries + b * d, doc, d);
            if (lane == 0) {
                const int t = targets[b];
                int skip;
                gs_s[bt] = rrra_grad_coef(rrra_logit(r, inv_tau, lw, b, j, D, t), lse_in[b],
                                          j == t, inv_b, inv_tau, &skip);
                skip_s[bt] = skip;
            }
        }
        __syncthreads();
        for (int k = threadIdx.x; k < d; k += blockDim.x) {
            float o = out[k];
            for (int bt = 0; bt < len; ++bt) {
                if (skip_s[bt]) continue;
                o = __fadd_rn(o, __fmul_rn(gs_s[bt], queries[(long long)(base + bt) * d + k]));
            }
            out[k] = o;
        }
        __syncthreads();
    }
}
