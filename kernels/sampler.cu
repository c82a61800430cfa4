// rrra_sampler_*: weighted negative sampling without replacement on the device (Gumbel-top-n),
// draw for draw the CPU's `sample_without_replacement` (src/train/sampler.rs).
//
// Per query q (one block each) and candidate i of its pool of P:
//   key_i = log_w[q, i] + G_i,   G_i = -ln(-ln u_i),   u_i = open_uniform_f64_at(i) of the query's
//   Philox4x32-10 stream (src/train/rng.rs, reproduced bit for bit below),
// for the eligible candidates (finite log weight: -inf, +inf and NaN are never drawn, as on the
// CPU). The draw is the n largest keys in descending key order, ties broken by the smaller index.
//
// rrra_sampler_gumbel_top_n: phase 1 writes every key to a global scratch row (ineligible ones as
// -inf; an eligible key is never -inf: finite + finite, or +inf when u rounds to 1, as on the
// CPU) and counts the eligible candidates. Phase 2 ranks every eligible candidate exactly:
//   rank_i = #{ eligible j : key_j > key_i or (key_j == key_i and j < i) },
// reading the row in shared-memory tiles; candidate i is written to out[q, rank_i] if rank_i < n.
// Ranks are a permutation of 0..m-1 (m eligible), so every output slot below min(n, m) is written
// exactly once and the rest are filled with -1. No sort, no atomics on data, no tie left to a
// race: the result is a pure function of the keys, like the CPU's comparator.
//
// Arithmetic: the RNG is integer (exact); the uniform is the CPU's expression (a conversion, an
// add and a multiply, each rounded to nearest; (a + b) * c cannot be contracted into an FMA); ln is CUDA's double `log` (<= 1 ulp, glibc's is
// correctly rounded in practice), so a Gumbel value can differ from the CPU's in the last bit and
// a draw can differ only when two keys agree to ~1e-16 relative: never seen in practice, and the
// tests compare the keys too (`out_keys`, to 1e-14).
//
// Roofline: O(P^2) comparisons per query (P = 200: 40k per block, microseconds) and 8 bytes read
// per candidate; at realistic sizes (64 queries x 200) the launch dominates. The P^2 term grows
// with the pool (P = 2500: 6M comparisons on one SM per query); for pools of many thousands a
// per-query sort would be the better design, but mined pools are hundreds.
//
// rrra_sampler_simans_log_weights / rrra_sampler_rrra_log_weights: log weights on the device.
// SimANS / TriSampler:
// -a (s - s+ - b)^2 in f64 with the CPU's operation order (gaussian_log_weight), for a [Q x P]
// block of raw scores and one positive score per query. RRRA: (s - max s) / (tau t_h) +
// gamma ln(1 - s_FN) per query row (below). Eligibility masks (uniform rank ranges, TriSampler
// regions) are cheap host-side -inf writes and are not done here.

#define RRRA_SAMPLER_TILE 1024

typedef unsigned int u32;
typedef unsigned long long u64;

#include "philox.cuh"

// Stream::gumbel_at(i) for the stream whose key is (k0, k1) and counter high words (c2, c3).
// (bits + 0.5) * 2^-53 as the CPU writes it: the conversion and both operations round to
// nearest, and an (a + b) * c cannot be contracted into an FMA.
__host__ __device__ __forceinline__ double rrra_gumbel_at(u64 i, u32 k0, u32 k1, u32 c2,
                                                          u32 c3) {
    const u64 blk = i / 2;
    const uint4 b = rrra_philox4x32_10(make_uint4((u32)blk, (u32)(blk >> 32), c2, c3), k0, k1);
    const u32 a = (i % 2 == 0) ? b.x : b.z;
    const u32 c = (i % 2 == 0) ? b.y : b.w;
    const u64 bits = ((u64)a << 21) ^ ((u64)c >> 11);  // 53 bits
    const double u = ((double)bits + 0.5) * (1.0 / 9007199254740992.0);
    return -log(-log(u));
}

// log_w: [Q x P] f64; streams: [Q x 4] u32 (key0, key1, ctr2, ctr3) per query;
// keys: [Q x P] f64 scratch; out: [Q x n] i32 (-1 past the eligible count); counts: [Q] i32
// (min(n, eligible)); out_keys: [Q x n] f64 or null (keys of the drawn candidates, 0 for padding).
extern "C" __global__ void __launch_bounds__(256)
    rrra_sampler_gumbel_top_n(const double* __restrict__ log_w, const u32* __restrict__ streams,
                              int P, int n, double* keys, int* __restrict__ out,
                              int* __restrict__ counts, double* __restrict__ out_keys) {
    __shared__ double tile[RRRA_SAMPLER_TILE];
    __shared__ int eligible;
    const long long q = blockIdx.x;
    const u32 k0 = streams[q * 4 + 0], k1 = streams[q * 4 + 1];
    const u32 c2 = streams[q * 4 + 2], c3 = streams[q * 4 + 3];
    const double* lw = log_w + q * (long long)P;
    double* krow = keys + q * (long long)P;
    const double NEG_INF = __longlong_as_double(0xfff0000000000000ll);

    if (threadIdx.x == 0) eligible = 0;
    __syncthreads();
    int mine = 0;
    for (int i = threadIdx.x; i < P; i += blockDim.x) {
        const double l = lw[i];
        double key = NEG_INF;
        if (isfinite(l)) {
            key = __dadd_rn(l, rrra_gumbel_at((u64)i, k0, k1, c2, c3));
            ++mine;
        }
        krow[i] = key;
    }
    if (mine > 0) atomicAdd(&eligible, mine);  // an integer count: order-independent
    __syncthreads();  // makes the key row (global, written by this block) visible to the block
    const int m = eligible;
    const int take = m < n ? m : n;
    if (threadIdx.x == 0) counts[q] = take;
    for (int r = take + threadIdx.x; r < n; r += blockDim.x) {
        out[q * n + r] = -1;
        if (out_keys) out_keys[q * n + r] = 0.0;
    }

    // Ranks: every thread takes the same number of rounds so the barriers are uniform.
    const int rounds = (P + blockDim.x - 1) / blockDim.x;
    for (int round = 0; round < rounds; ++round) {
        const int i = round * blockDim.x + threadIdx.x;
        const double ki = (i < P) ? krow[i] : NEG_INF;
        const bool mine_ok = (i < P) && ki != NEG_INF;
        int rank = 0;
        for (int base = 0; base < P; base += RRRA_SAMPLER_TILE) {
            const int len = min(RRRA_SAMPLER_TILE, P - base);
            __syncthreads();  // the previous tile is no longer read
            for (int t = threadIdx.x; t < len; t += blockDim.x) tile[t] = krow[base + t];
            __syncthreads();
            if (mine_ok) {
                for (int t = 0; t < len; ++t) {
                    const double kj = tile[t];
                    const int j = base + t;
                    // kj == -inf (ineligible) never passes either test: ki > -inf.
                    rank += (kj > ki) || (kj == ki && j < i);
                }
            }
        }
        if (mine_ok && rank < n) {
            out[q * n + rank] = i;
            if (out_keys) out_keys[q * n + rank] = ki;
        }
    }
}

// The SimANS (and TriSampler, a = 1/4, b = 0) log weight, -a (s - s+ - b)^2, for scores [Q x P]
// (f32) and positives [Q] (f32), in the CPU's order: d = (s - s+) - b; (-a * d) * d.
extern "C" __global__ void __launch_bounds__(256)
    rrra_sampler_simans_log_weights(const float* __restrict__ scores,
                                    const float* __restrict__ pos, long long Q, int P, double a,
                                    double b, double* __restrict__ log_w) {
    const long long total = Q * (long long)P;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const long long q = e / P;
        const double d = __dsub_rn(__dsub_rn((double)scores[e], (double)pos[q]), b);
        log_w[e] = __dmul_rn(__dmul_rn(-a, d), d);
    }
}

// The RRRA log weight (src/train/sampler.rs, rrra_log_weights) for scores and false-negative
// scores [Q x P] (f32), one block per query:
//   (s - max_row(s)) * scale + gamma * ln(1 - s_FN),  scale = 1 / (tau * t_h) (from the host),
// the gamma term 0 when gamma == 0, in the CPU's operation order. The row maximum is exact (a
// max of f32 values, any order). ln(1 - x) is CUDA's log1p (<= 1 ulp from the CPU's ln_1p).
extern "C" __global__ void __launch_bounds__(256)
    rrra_sampler_rrra_log_weights(const float* __restrict__ scores,
                                  const float* __restrict__ s_fn, int P, double scale,
                                  double gamma, double* __restrict__ log_w) {
    __shared__ float part[32];
    const long long base = blockIdx.x * (long long)P;
    float mx = __int_as_float(0xff800000);  // -inf
    for (int i = threadIdx.x; i < P; i += blockDim.x) mx = fmaxf(mx, scores[base + i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = mx;
    __syncthreads();
    mx = part[0];
    for (int w = 1; w < (int)(blockDim.x / 32); ++w) mx = fmaxf(mx, part[w]);
    const double max = (double)mx;
    for (int i = threadIdx.x; i < P; i += blockDim.x) {
        const double fn_term =
            (gamma == 0.0) ? 0.0 : __dmul_rn(gamma, log1p(-(double)s_fn[base + i]));
        log_w[base + i] =
            __dadd_rn(__dmul_rn(__dsub_rn((double)scores[base + i], max), scale), fn_term);
    }
}
