// The RRRA adapter's fused scoring op (forward, serving path): for Q queries × K candidates,
// features, MLP, residual, alpha, QA/CA and the logit in one pass per tile of pairs; the
// relation features z = [q − c ; q ⊙ c ; q + c] are never materialised.
//
// Algebra (src/adapter/scoring.rs, "Fused algebra"): W1·z + b1 = u_q + [W1c − W1a | W1b]·[c ; q ⊙ c]
// with u_q = (W1a + W1c)·q + b1. So:
//   rrra_adapter_query_bias   u_q for each query (one block per query: h·d multiply-adds);
//   rrra_adapter_pairs_<T>    one block per (query, tile of TP candidates): gathers the tile's
//                             candidate rows (f32/f16/bf16, from a corpus by row index or from a
//                             dense array), builds [c ; q ⊙ c] in shared memory, then
//                             pre = u_q + Wpair·f, g = GELU(pre) (exact erf), a = c + W2·g + b2,
//                             and the seven dot products of the geometry (block reduction in
//                             f64, fixed order), from which one thread per pair writes
//                             logit = beta·(cos(q,a) − cos(a,c)) + beta0 and, if asked,
//                             p = sigmoid(logit), QA, CA and alpha.
// Weights are stored transposed (input-major: Wpair^T [2d × h], W2^T [h × d]) so the threads of
// a warp, which own consecutive outputs, read consecutive words: every weight load is coalesced
// and each weight element is read once per tile and used TP times from a register.
//
// Roofline (d = h = 384, the MiniLM adapter): a pair costs 2·h·d + h·d = 442k multiply-adds,
// and a tile of TP = 8 pairs streams the 1.77 MB of f32 weights from L2 once: 8 FMA per 4-byte
// weight = 2 FLOP/byte of L2 traffic, so a tile is L2-bandwidth bound (~15–25 µs at the H200's
// per-SM share of L2 bandwidth) and the op for one query (K = 100, 13 tiles on 13 SMs) is a
// latency-bound few tens of µs. Batches (Q·K/8 tiles ≥ 132) fill the device; raising TP would
// raise the arithmetic intensity at the price of fewer, longer blocks for batch-1.
//
// Arithmetic: f32 products and sums for the two layers (as the CPU reference), the geometry's dot
// products as per-thread f32 partial sums of at most ceil(d / 256) terms reduced in f64, and the
// cosines, alpha and the logit in f64, as src/adapter/scoring.rs computes them.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "adapter_params.h"
#include "common.cuh"

#define THREADS 256
#define WARPS (THREADS / 32)
#define TP RRRA_ADAPTER_TILE_PAIRS
// The six sums of a pair's geometry: <a,a>, <c,c>, <q,a>, <a,c>, <a−c,q−c>, <q−c,q−c>. The
// query's <q,q>, the same for every pair, takes one more slot per warp (index TP·NSUM).
#define NSUM 6

static_assert(sizeof(RrraAdapterArgs) == RRRA_ADAPTER_ARGS_SIZE, "RrraAdapterArgs layout");
static_assert(alignof(RrraAdapterArgs) == 8, "RrraAdapterArgs alignment");

__device__ __forceinline__ float load_elem(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load_elem(const __half* p, long long i) { return __half2float(p[i]); }
__device__ __forceinline__ float load_elem(const __nv_bfloat16* p, long long i) {
    return __bfloat162float(p[i]);
}

// u[i, :] = W1sum · q_i + b1, one block per query.
extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_adapter_query_bias(const RrraAdapterArgs args) {
    RRRA_DYNAMIC_SMEM(4, float, q_s);
    const int d = args.d, h = args.h;
    const float* q = args.queries + (long long)blockIdx.x * d;
    for (int l = threadIdx.x; l < d; l += THREADS) q_s[l] = q[l];
    __syncthreads();
    for (int j = threadIdx.x; j < h; j += THREADS) {
        float acc = 0.0f;
        for (int l = 0; l < d; ++l) acc = fmaf(args.w_sum_t[(long long)l * h + j], q_s[l], acc);
        args.u[(long long)blockIdx.x * h + j] = acc + args.b1[j];
    }
}

// Shared memory (floats): q [d] | f [TP × 2d] (c then q ⊙ c per pair) | g [TP × h]; then the
// f64 reduction scratch [WARPS × (TP·NSUM + 1)].
template <typename T>
__device__ void adapter_pairs(const RrraAdapterArgs& args) {
    RRRA_DYNAMIC_SMEM(16, unsigned char, smem);
    const int d = args.d, h = args.h, k = args.k;
    const int qi = blockIdx.y;
    const int first = blockIdx.x * TP;
    const int np = min(TP, k - first);
    float* q_s = reinterpret_cast<float*>(smem);
    float* f_s = q_s + d;
    float* g_s = f_s + TP * 2 * d;
    double* red = reinterpret_cast<double*>(smem + (size_t)args.smem_floats * sizeof(float));
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

    const float* q = args.queries + (long long)qi * d;
    for (int l = tid; l < d; l += THREADS) q_s[l] = q[l];
    __syncthreads();
    const T* cands = reinterpret_cast<const T*>(args.candidates);
    for (int p = 0; p < TP; ++p) {
        const long long pair = (long long)qi * k + first + p;
        // Pairs past the end of the list get zero rows: computed and discarded.
        const long long row = p < np ? (args.rows ? (long long)args.rows[pair] : pair) : -1;
        for (int l = tid; l < d; l += THREADS) {
            const float c = row >= 0 ? load_elem(cands, row * d + l) : 0.0f;
            f_s[p * 2 * d + l] = c;
            f_s[p * 2 * d + d + l] = q_s[l] * c;
        }
    }
    __syncthreads();

    // First layer and GELU: thread j owns outputs j, j + 256, ...
    for (int j = tid; j < h; j += THREADS) {
        float acc[TP];
        const float u = args.u[(long long)qi * h + j];
#pragma unroll
        for (int p = 0; p < TP; ++p) acc[p] = u;
        for (int l = 0; l < 2 * d; ++l) {
            const float w = args.w_pair_t[(long long)l * h + j];
#pragma unroll
            for (int p = 0; p < TP; ++p) acc[p] = fmaf(f_s[p * 2 * d + l], w, acc[p]);
        }
#pragma unroll
        for (int p = 0; p < TP; ++p) g_s[p * h + j] = gelu_erf(acc[p]);
    }
    __syncthreads();

    // Second layer, residual, and this thread's share of the geometry's sums.
    float part[TP][NSUM];
    float qq = 0.0f;
#pragma unroll
    for (int p = 0; p < TP; ++p)
#pragma unroll
        for (int s = 0; s < NSUM; ++s) part[p][s] = 0.0f;
    for (int i = tid; i < d; i += THREADS) {
        float acc[TP];
#pragma unroll
        for (int p = 0; p < TP; ++p) acc[p] = 0.0f;
        for (int j = 0; j < h; ++j) {
            const float w = args.w2_t[(long long)j * d + i];
#pragma unroll
            for (int p = 0; p < TP; ++p) acc[p] = fmaf(g_s[p * h + j], w, acc[p]);
        }
        const float qv = q_s[i];
        qq = fmaf(qv, qv, qq);
#pragma unroll
        for (int p = 0; p < TP; ++p) {
            const float c = f_s[p * 2 * d + i];
            // residual last, as on the CPU: W2 = 0, b2 = 0 gives a = c exactly
            const float a = (acc[p] + args.b2[i]) + c;
            const float am = a - c, qm = qv - c;
            part[p][0] = fmaf(a, a, part[p][0]);
            part[p][1] = fmaf(c, c, part[p][1]);
            part[p][2] = fmaf(qv, a, part[p][2]);
            part[p][3] = fmaf(a, c, part[p][3]);
            part[p][4] = fmaf(am, qm, part[p][4]);
            part[p][5] = fmaf(qm, qm, part[p][5]);
        }
    }
    // Block reduction in f64: warps first, then warp sums in warp order (deterministic).
    constexpr int NV = TP * NSUM + 1;
#pragma unroll
    for (int p = 0; p < TP; ++p)
#pragma unroll
        for (int s = 0; s < NSUM; ++s) {
            const double v = warp_sum_f64((double)part[p][s]);
            if (lane == 0) red[warp * NV + p * NSUM + s] = v;
        }
    {
        const double v = warp_sum_f64((double)qq);
        if (lane == 0) red[warp * NV + TP * NSUM] = v;
    }
    __syncthreads();
    if (tid < np) {
        const int p = tid;
        double sum[NSUM], qq_all = 0.0;
        for (int s = 0; s < NSUM; ++s) {
            double v = 0.0;
            for (int w = 0; w < WARPS; ++w) v += red[w * NV + p * NSUM + s];
            sum[s] = v;
        }
        for (int w = 0; w < WARPS; ++w) qq_all += red[w * NV + TP * NSUM];
        const double eps = 1e-12;
        const double nq = fmax(sqrt(qq_all), eps), na = fmax(sqrt(sum[0]), eps),
                     nc = fmax(sqrt(sum[1]), eps);
        const double qa = sum[2] / (nq * na), ca = sum[3] / (na * nc);
        // q = c leaves the segment undefined: alpha 0 (as the CPU reference)
        const double alpha = sum[5] > 0.0 ? fmin(fmax(sum[4] / sum[5], 0.0), 1.0) : 0.0;
        const double logit = (double)args.beta * (qa - ca) + (double)args.beta0;
        const long long pair = (long long)qi * k + first + p;
        args.logits[pair] = (float)logit;
        if (args.stats) {
            float* st = args.stats + pair * 4;
            st[0] = (float)(1.0 / (1.0 + exp(-logit)));
            st[1] = (float)qa;
            st[2] = (float)ca;
            st[3] = (float)alpha;
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_adapter_pairs_f32(const RrraAdapterArgs args) {
    adapter_pairs<float>(args);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_adapter_pairs_f16(const RrraAdapterArgs args) {
    adapter_pairs<__half>(args);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_adapter_pairs_bf16(const RrraAdapterArgs args) {
    adapter_pairs<__nv_bfloat16>(args);
}
