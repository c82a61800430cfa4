// rrra_topk_*: exact top-k by inner product (similarity search) for a batch of f32 queries
// against a corpus of f32, f16 or bf16 rows, fp32 arithmetic throughout.
//
// Pipeline (driven by src/device/topk.rs; one stream, no host round trip until the results):
//
//   for each chunk of corpus rows (geometrically growing: 16K or 4k rows, then 3x what was seen)
//     score:  every (query, row) score is computed once and turned into a 64-bit candidate
//             key = (order-preserving u32 of the score) << 32 | ~row. Keys are all distinct and
//             their descending order is exactly the CPU order (score desc, NaN last, index asc),
//             so "top k" means "k largest keys" with no tie rule left to apply. A candidate is
//             appended to its query's list only if its score key is >= min_key[q], the running
//             k-th best key + 1 (0 while fewer than k rows were seen): after the first chunk only
//             ~3k rows per query and chunk survive, so no Q x rows score matrix is ever written.
//     select: one block per query: radix select (8-bit digits, MSB first) over running list U new
//             candidates finds the k-th largest key exactly and writes the k winners to the other
//             list buffer, plus the new min_key. Digits are histogrammed in shared memory with
//             warp-aggregated atomics (__match_any_sync: scores cluster, so a warp's lanes often
//             hit the same bin); once the bucket holding the k-th key has <= SEL_CAP entries they
//             are compacted into shared memory and the remaining digits run there.
//   sort:   one block per query, bitonic sort of the k winners in shared memory (k <= 10 000
//           -> 16 384 keys, 128 KiB), written densely as [Q x k] keys; the host decodes them.
//
// Scoring kernels (all fuse the threshold filter and the append):
//   rrra_topk_score_{f32,f16,bf16}_q{1,4,8}  SIMT streaming kernel for up to 8 queries per pass:
//       a warp owns R rows (8, or 4 for 8 queries); each lane loads 16 bytes of each row per step
//       (streaming loads, evict-first), converts to f32 (exact for f16/bf16) and FMAs against the
//       queries held in shared memory (lane-permuted so the float4 reads are conflict-free); the
//       R*QP partial sums are then reduce-scattered across the warp in about R*QP shuffles
//       instead of 5*R*QP. Rows whose byte length is not a multiple of 16 take a scalar path.
//   rrra_topk_score_tc_{f16,bf16}  tensor cores (WMMA 16x16x16, fp32 accumulate) for > 8 queries
//       on 16-bit corpora. The corpus values are exact in f16/bf16; each f32 query is split into
//       three terms hi + mid + lo of the corpus type (rrra_topk_split_queries_*), which represent
//       it to 2^-24 relative (after scaling each query by a power of two so its largest value
//       is ~2^14, undone exactly on the scores), and every product of 16-bit values is exact in
//       fp32. So the scores keep fp32 accuracy (error ~ fp32 summation, not bf16 rounding) at 3x
//       the tensor work, which is still far below the memory time up to ~50 queries.
//       Block tile 256 rows x 32 queries (8 warps of 32 x 32), BK 32, 3-stage cp.async pipeline
//       with zero-filled tails; the score tile then goes through shared memory to the filter.
//   rrra_topk_score_f32_gemm  FP32 register-tiled GEMM for > 24 queries on f32 corpora (tile
//       128 rows x 64 queries x 16, 8x4 outputs per thread, register-staged double buffering);
//       tensor cores would round the f32 corpus (TF32), so this path stays on the FP32 pipes.
//   Why not cuBLAS: it would write the Q x rows fp32 score matrix and the filter would read it
//   back (8 bytes per score against 2-4 bytes of corpus per element at Q = 1; +17% traffic at
//   Q = 32, d = 384), and its bf16 GEMM would round the queries to bf16 (~1e-3 relative score
//   error, so GPU and CPU top-k would disagree on near ties far more often). The fused kernels
//   write only candidates, with CPU-grade scores, and need no library beyond the driver.
//
// Roofline (H200: ~4.3 TB/s copy bandwidth, 67 TFLOP/s FP32, ~650 TFLOP/s bf16 mma.sync).
// A corpus of n rows x d values of e bytes against Q queries reads n*d*e bytes and does 2*n*d*Q
// flops: 2Q/e flop per byte. The FP32 ridge is ~16 flop/B, so the SIMT kernel is memory bound up
// to Q ~ 8e (f32: 32, bf16: 16); it takes <= 8 queries per pass (f32: up to 3 passes). The tensor
// path does 6Q/e flop/B of mma work (3 terms), memory bound up to Q ~ 50; beyond, compute bound
// at ~1/3 of the tensor peak. The f32 GEMM is compute bound (Q=1000: 153.6 GFLOP per 200K x 384).
// Examples: 10M x 768 bf16 (15.4 GB) >= 3.6 ms; 1M x 384 f32 (1.5 GB) >= 0.36 ms. Candidates,
// selection and sort add O(Q*k*log(n/k)) work, under 1% of the bytes for k << n; the fixed cost
// is ~2 launches per chunk (~6 chunks for 10M rows) plus the first chunk's full candidate list.
// Selection runs one block per query, so with one query it uses one SM: cheap because the lists
// it reads are ~4k keys after the first chunk (L2-resident), but it is serial with the scoring.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "common.cuh"

#define RRRA_FULL 0xffffffffu

typedef unsigned long long u64;

// ---------------------------------------------------------------------------------------------
// Keys and candidate lists

// Order-preserving map of a score to u32 (larger key = better): NaN -> 0 (below everything),
// -0.0 -> +0.0, negatives bit-inverted, positives with the sign bit set. Same as the CPU's pack().
__device__ __forceinline__ unsigned score_key(float s) {
    if (s != s) return 0u;
    if (s == 0.0f) return 0x80000000u;
    const unsigned b = __float_as_uint(s);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ u64 candidate(unsigned key, unsigned row) {
    return ((u64)key << 32) | (u64)(~row);
}

__device__ __forceinline__ unsigned lanemask_lt(int lane) { return (1u << lane) - 1u; }

// Appends the candidates of the lanes with `pass` to their query's list. Lanes may hold different
// queries: each group of lanes with the same query reserves its slots with one atomic. Every lane
// of the warp must call this. A list never overflows: it holds at most k + the chunk's rows, which
// is its capacity (`stride`); the bound check only keeps a broken invariant from writing out of it.
__device__ __forceinline__ void append_candidate(bool pass, int q, u64 c, u64* cand, unsigned* count,
                                                 long long stride, int lane) {
    const unsigned act = __ballot_sync(RRRA_FULL, pass);
    if (!pass) return;
    const unsigned peers = __match_any_sync(act, q);
    const int leader = __ffs(peers) - 1;
    unsigned base = 0;
    if (lane == leader) base = atomicAdd(count + q, (unsigned)__popc(peers));
    base = __shfl_sync(peers, base, leader);
    const unsigned pos = base + __popc(peers & lanemask_lt(lane));
    if ((long long)pos < stride) cand[(long long)q * stride + pos] = c;
}

// Same for a warp whose lanes all hold the same query (tile epilogues): one atomic per warp.
__device__ __forceinline__ void append_same_query(bool pass, int q, u64 c, u64* cand,
                                                  unsigned* count, long long stride, int lane) {
    const unsigned m = __ballot_sync(RRRA_FULL, pass);
    if (m == 0) return;
    const int leader = __ffs(m) - 1;
    unsigned base = 0;
    if (lane == leader) base = atomicAdd(count + q, (unsigned)__popc(m));
    base = __shfl_sync(RRRA_FULL, base, leader);
    const unsigned pos = base + __popc(m & lanemask_lt(lane));
    if (pass && (long long)pos < stride) cand[(long long)q * stride + pos] = c;
}

// Column sweep over a tile of scores stored query-major (ct[query * LDC + row]): each warp takes
// whole query columns, so the filter threshold is one load and the append one atomic per 32 rows.
// `qexp` (tensor path) holds per-query power-of-two exponents to undo, or is null.
template <int BM, int BN, int LDC, int NWARPS>
__device__ __forceinline__ void tile_epilogue(const float* ct, long long r_base, long long n_rows,
                                              unsigned row0, int q_base, int nq, const int* qexp,
                                              const unsigned* min_key, u64* cand, unsigned* count,
                                              long long stride) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int c = warp; c < BN; c += NWARPS) {
        const int q = q_base + c;
        if (q >= nq) break;  // columns ascend: the rest are padding
        const unsigned mk = min_key[q];
        const float undo = qexp ? __int_as_float((127 - qexp[q]) << 23) : 1.0f;
        for (int r = lane; r < BM; r += 32) {
            const long long row = r_base + r;
            const unsigned key = score_key(ct[c * LDC + r] * undo);
            const bool pass = row < n_rows && key >= mk;
            append_same_query(pass, q, candidate(key, row0 + (unsigned)row), cand, count, stride,
                              lane);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Element access. KIND: 0 = f32, 1 = f16, 2 = bf16 (16-bit kinds are handled as raw bits).

template <int KIND>
__device__ __forceinline__ float load_scalar(const void* base, long long i) {
    if (KIND == 0) return __ldcs(static_cast<const float*>(base) + i);
    const unsigned short b = __ldcs(static_cast<const unsigned short*>(base) + i);
    if (KIND == 1) return __half2float(__ushort_as_half(b));
    return __uint_as_float((unsigned)b << 16);
}

__device__ __forceinline__ float half_bits_to_float(unsigned b) {
    return __half2float(__ushort_as_half((unsigned short)b));
}

// Elements 4h .. 4h+3 of a 16-byte vector as f32 (exact).
template <int KIND>
__device__ __forceinline__ void unpack4(const uint4& v, int h, float (&c)[4]) {
    if (KIND == 0) {
        c[0] = __uint_as_float(v.x);
        c[1] = __uint_as_float(v.y);
        c[2] = __uint_as_float(v.z);
        c[3] = __uint_as_float(v.w);
        return;
    }
    const unsigned w0 = h ? v.z : v.x, w1 = h ? v.w : v.y;  // little endian: low half first
    if (KIND == 1) {
        c[0] = half_bits_to_float(w0 & 0xffffu);
        c[1] = half_bits_to_float(w0 >> 16);
        c[2] = half_bits_to_float(w1 & 0xffffu);
        c[3] = half_bits_to_float(w1 >> 16);
    } else {
        c[0] = __uint_as_float(w0 << 16);
        c[1] = __uint_as_float(w0 & 0xffff0000u);
        c[2] = __uint_as_float(w1 << 16);
        c[3] = __uint_as_float(w1 & 0xffff0000u);
    }
}

// Sums V values per lane over the 32 lanes of a warp and leaves value i's total in the lanes
// lane >> (5 - log2 V) == i (one owner per group: lane % (32 / V) == 0). Each split step hands
// half of the values to the partner lane, so the whole reduction costs V - 1 + (5 - log2 V)
// shuffles instead of 5 V. Every value sees the same addition tree, so equal rows get equal bits.
template <int V>
__device__ __forceinline__ float reduce_scatter(float (&a)[V], int lane) {
#pragma unroll
    for (int half = V / 2, m = 16; half >= 1; half >>= 1, m >>= 1) {
        const bool upper = (lane & m) != 0;
#pragma unroll
        for (int i = 0; i < half; ++i) {
            const float send = upper ? a[i] : a[i + half];
            const float keep = upper ? a[i + half] : a[i];
            a[i] = keep + __shfl_xor_sync(RRRA_FULL, send, m);
        }
    }
    float v = a[0];
#pragma unroll
    for (int m = 16 / V; m >= 1; m >>= 1) v += __shfl_xor_sync(RRRA_FULL, v, m);
    return v;
}

// ---------------------------------------------------------------------------------------------
// SIMT streaming scorer (<= 8 queries per pass)

constexpr int SIMT_THREADS = 256;

template <int KIND, int QP>
__device__ __forceinline__ void score_simt(const void* __restrict__ corpus, long long n_rows, int dim,
                                           unsigned row0, const float* __restrict__ queries, int q0,
                                           int nq, const unsigned* __restrict__ min_key,
                                           u64* __restrict__ cand, unsigned* __restrict__ count,
                                           long long stride) {
    constexpr int R = (QP == 8) ? 4 : 8;  // rows per warp iteration: R * QP partial sums
    constexpr int V = R * QP;             // 8 or 32
    constexpr int LOGV = (V == 8) ? 3 : 5;
    constexpr int VEC = (KIND == 0) ? 4 : 8;  // elements per 16-byte load
    constexpr int ESZ = (KIND == 0) ? 4 : 2;
    static_assert(V == 8 || V == 32, "reduce_scatter layout");

    RRRA_DYNAMIC_SMEM(16, float4, simt_smem);
    float* qs = reinterpret_cast<float*>(simt_smem);  // [QP][dpad]
    __shared__ unsigned s_min[QP];

    const bool vec = ((dim * ESZ) % 16 == 0) && ((reinterpret_cast<size_t>(corpus) & 15) == 0);
    const int step = vec ? 32 * VEC : 32;
    const int nsteps = (dim + step - 1) / step;
    const int dpad = nsteps * step;

    // Queries into shared memory. For 8-element vectors lane l covers dims 8l..8l+7 of each
    // 256-dim step; storing them as two 128-float halves (4l..4l+3 and 128+4l..) makes each
    // float4 read of a warp hit 32 consecutive banks.
    for (int i = threadIdx.x; i < QP * dpad; i += blockDim.x) {
        const int q = i / dpad, p = i - q * dpad;
        int d = p;
        if (vec && VEC == 8) {
            const int w = p & 255;
            d = (p - w) + ((w & 127) >> 2) * 8 + (w >> 7) * 4 + (w & 3);
        }
        float v = 0.0f;
        if (q0 + q < nq && d < dim) v = queries[(long long)(q0 + q) * dim + d];
        qs[i] = v;
    }
    if (threadIdx.x < QP)
        s_min[threadIdx.x] = (q0 + (int)threadIdx.x < nq) ? min_key[q0 + threadIdx.x] : 0xffffffffu;
    __syncthreads();

    const int lane = threadIdx.x & 31;
    const long long warps_total = (long long)gridDim.x * (blockDim.x >> 5);
    const long long groups = (n_rows + R - 1) / R;
    const char* base = static_cast<const char*>(corpus);

    for (long long g = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); g < groups;
         g += warps_total) {
        const long long r0 = g * R;
        float acc[V];
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] = 0.0f;

        if (vec) {
            for (int s = 0; s < nsteps; ++s) {
                const int d0 = s * step + lane * VEC;
                uint4 v[R];
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    v[r] = make_uint4(0u, 0u, 0u, 0u);
                    if (d0 < dim && r0 + r < n_rows)
                        v[r] = __ldcs(reinterpret_cast<const uint4*>(
                            base + ((r0 + r) * dim + d0) * (long long)ESZ));
                }
#pragma unroll
                for (int h = 0; h < VEC / 4; ++h) {
                    float c[R][4];
#pragma unroll
                    for (int r = 0; r < R; ++r) unpack4<KIND>(v[r], h, c[r]);
#pragma unroll
                    for (int q = 0; q < QP; ++q) {
                        const float4 qv = *reinterpret_cast<const float4*>(
                            qs + q * dpad + s * step + h * 128 + lane * 4);
#pragma unroll
                        for (int r = 0; r < R; ++r) {
                            float t = acc[r * QP + q];
                            t = fmaf(c[r][0], qv.x, t);
                            t = fmaf(c[r][1], qv.y, t);
                            t = fmaf(c[r][2], qv.z, t);
                            t = fmaf(c[r][3], qv.w, t);
                            acc[r * QP + q] = t;
                        }
                    }
                }
            }
        } else {
            for (int s = 0; s < nsteps; ++s) {
                const int d = s * 32 + lane;
                float c[R];
#pragma unroll
                for (int r = 0; r < R; ++r)
                    c[r] = (d < dim && r0 + r < n_rows) ? load_scalar<KIND>(corpus, (r0 + r) * dim + d)
                                                        : 0.0f;
#pragma unroll
                for (int q = 0; q < QP; ++q) {
                    const float qv = qs[q * dpad + d];
#pragma unroll
                    for (int r = 0; r < R; ++r) acc[r * QP + q] = fmaf(c[r], qv, acc[r * QP + q]);
                }
            }
        }

        const float score = reduce_scatter<V>(acc, lane);
        const int idx = lane >> (5 - LOGV);
        const int r = idx / QP, q = idx % QP;
        const bool owner = (lane & ((1 << (5 - LOGV)) - 1)) == 0;
        const long long row = r0 + r;
        const unsigned key = score_key(score);
        const bool pass = owner && row < n_rows && q0 + q < nq && key >= s_min[q];
        append_candidate(pass, q0 + q, candidate(key, row0 + (unsigned)row), cand, count, stride,
                         lane);
    }
}

#define RRRA_SIMT(NAME, KIND, QP)                                                                \
    extern "C" __global__ void __launch_bounds__(SIMT_THREADS)                                   \
        NAME(const void* __restrict__ corpus, long long n_rows, int dim, unsigned row0,          \
             const float* __restrict__ queries, int q0, int nq, const unsigned* __restrict__ mk, \
             u64* __restrict__ cand, unsigned* __restrict__ count, long long stride) {           \
        score_simt<KIND, QP>(corpus, n_rows, dim, row0, queries, q0, nq, mk, cand, count,        \
                             stride);                                                            \
    }

RRRA_SIMT(rrra_topk_score_f32_q1, 0, 1)
RRRA_SIMT(rrra_topk_score_f32_q4, 0, 4)
RRRA_SIMT(rrra_topk_score_f32_q8, 0, 8)
RRRA_SIMT(rrra_topk_score_f16_q1, 1, 1)
RRRA_SIMT(rrra_topk_score_f16_q4, 1, 4)
RRRA_SIMT(rrra_topk_score_f16_q8, 1, 8)
RRRA_SIMT(rrra_topk_score_bf16_q1, 2, 1)
RRRA_SIMT(rrra_topk_score_bf16_q4, 2, 4)
RRRA_SIMT(rrra_topk_score_bf16_q8, 2, 8)

// ---------------------------------------------------------------------------------------------
// Tensor-core scorer for 16-bit corpora

// 256 rows per tile: each k-step re-reads the block's query terms (6 KiB) from L2, which at 128
// rows would add ~0.75 B of L2 traffic per corpus byte; 256 rows halve that.
constexpr int TC_BM = 256, TC_BN = 32, TC_BK = 32, TC_STAGES = 3, TC_THREADS = 256;
constexpr int TC_LD = TC_BK + 8;  // +16 bytes per row: fragment loads hit distinct banks
constexpr int TC_A_STAGE = TC_BM * TC_LD;      // elements
constexpr int TC_B_STAGE = 3 * TC_BN * TC_LD;  // three query terms
constexpr int TC_STAGE = TC_A_STAGE + TC_B_STAGE;
constexpr int TC_LDC = TC_BM + 4;
constexpr int TC_SMEM_BYTES = TC_STAGES * TC_STAGE * 2;  // 84 480: two blocks per SM
static_assert(TC_BN * TC_LDC * 4 <= TC_SMEM_BYTES, "epilogue tile aliases the pipeline buffers");

// cp.async cannot run on a host: the CPU emulator supplies synchronous versions of these three.
#ifndef RRRA_EMULATOR
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, unsigned src_bytes) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    const size_t g = __cvta_generic_to_global(gmem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(g), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

// qsplit: [3][q_pad][d_pad] raw 16-bit terms (d_pad multiple of TC_BK, q_pad of TC_BN, zero
// padded); qexp: [q_pad] power-of-two exponent each query was scaled by.
template <typename T>
__device__ __forceinline__ void score_tc(const unsigned short* __restrict__ corpus, long long n_rows,
                                         int dim, unsigned row0, const unsigned short* __restrict__ qsplit,
                                         const int* __restrict__ qexp, int nq, int q_pad, int d_pad,
                                         const unsigned* __restrict__ min_key, u64* __restrict__ cand,
                                         unsigned* __restrict__ count, long long stride, int q_tiles) {
    using namespace nvcuda;
    RRRA_DYNAMIC_SMEM(128, unsigned char, tc_smem);
    unsigned short* sm = reinterpret_cast<unsigned short*>(tc_smem);
    const int tid = threadIdx.x, warp = tid >> 5;
    const int qt = blockIdx.x % q_tiles;
    const long long r_base = (long long)(blockIdx.x / q_tiles) * TC_BM;
    const int q_base = qt * TC_BN;
    const bool aligned = (dim % 8 == 0) && ((reinterpret_cast<size_t>(corpus) & 15) == 0);
    const int nk = d_pad / TC_BK;

    auto load_stage = [&](int slot, int kt) {
        unsigned short* A = sm + slot * TC_STAGE;
        unsigned short* B = A + TC_A_STAGE;
        const int k0 = kt * TC_BK;
        for (int c = tid; c < TC_BM * (TC_BK / 8); c += TC_THREADS) {
            const int r = c / (TC_BK / 8), kc = (c % (TC_BK / 8)) * 8;
            const long long row = r_base + r;
            unsigned short* dst = A + r * TC_LD + kc;
            if (aligned) {
                const bool ok = row < n_rows && k0 + kc < dim;  // dim % 8 == 0: all 8 or none
                cp_async16(dst, ok ? corpus + row * dim + k0 + kc : corpus, ok ? 16u : 0u);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const int k = k0 + kc + e;
                    dst[e] = (row < n_rows && k < dim) ? corpus[row * dim + k] : (unsigned short)0;
                }
            }
        }
        for (int c = tid; c < 3 * TC_BN * (TC_BK / 8); c += TC_THREADS) {
            const int t = c / (TC_BN * (TC_BK / 8));
            const int rem = c % (TC_BN * (TC_BK / 8));
            const int q = rem / (TC_BK / 8), kc = (rem % (TC_BK / 8)) * 8;
            const unsigned short* src = qsplit + ((long long)t * q_pad + q_base + q) * d_pad + k0 + kc;
            cp_async16(B + (t * TC_BN + q) * TC_LD + kc, src, 16u);
        }
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    const int wr = warp * 32;  // this warp's 32 rows of the tile, against all 32 queries

#pragma unroll
    for (int s = 0; s < TC_STAGES - 1; ++s) {
        if (s < nk) load_stage(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < nk; ++kt) {
        cp_async_wait<TC_STAGES - 2>();  // stage kt has landed (for this thread) ...
        __syncthreads();                 // ... and for all; slot (kt - 1) % STAGES is free again
        const int nxt = kt + TC_STAGES - 1;
        if (nxt < nk) load_stage(nxt % TC_STAGES, nxt);
        cp_async_commit();  // possibly empty: keeps the group count uniform

        const T* A = reinterpret_cast<const T*>(sm + (kt % TC_STAGES) * TC_STAGE);
        const T* B = A + TC_A_STAGE;
#pragma unroll
        for (int kk = 0; kk < TC_BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], A + (wr + 16 * i) * TC_LD + kk, TC_LD);
#pragma unroll
            for (int t = 0; t < 3; ++t)
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
                    wmma::load_matrix_sync(b, B + (t * TC_BN + 16 * j) * TC_LD + kk, TC_LD);
#pragma unroll
                    for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[i][j], a[i], b, acc[i][j]);
                }
        }
    }
    cp_async_wait<0>();
    __syncthreads();  // every warp is done with the pipeline buffers: reuse them for the scores

    float* ct = reinterpret_cast<float*>(tc_smem);  // [TC_BN][TC_LDC], query-major
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(ct + (16 * j) * TC_LDC + wr + 16 * i, acc[i][j], TC_LDC,
                                    wmma::mem_col_major);
    __syncthreads();
    tile_epilogue<TC_BM, TC_BN, TC_LDC, TC_THREADS / 32>(ct, r_base, n_rows, row0, q_base, nq, qexp,
                                                         min_key, cand, count, stride);
}

#define RRRA_TC(NAME, T)                                                                          \
    extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)                                   \
        NAME(const unsigned short* __restrict__ corpus, long long n_rows, int dim, unsigned row0, \
             const unsigned short* __restrict__ qsplit, const int* __restrict__ qexp, int nq,     \
             int q_pad, int d_pad, const unsigned* __restrict__ mk, u64* __restrict__ cand,      \
             unsigned* __restrict__ count, long long stride, int q_tiles) {                      \
        score_tc<T>(corpus, n_rows, dim, row0, qsplit, qexp, nq, q_pad, d_pad, mk, cand, count,   \
                    stride, q_tiles);                                                             \
    }

RRRA_TC(rrra_topk_score_tc_f16, __half)
RRRA_TC(rrra_topk_score_tc_bf16, __nv_bfloat16)

// Splits each f32 query into hi + mid + lo of the corpus's 16-bit type, each term the rounding of
// what the previous ones left (x - rn(x) is exact in f32), so hi + mid + lo = x to 2^-24 relative.
// The query is first scaled by 2^s (s from its largest value, stored in qexp) so its terms stay
// normal in f16's narrow exponent range, and so that no value rounds past the type's largest
// (bf16 rounds f32 values above ~3.39e38 to infinity); the scorer multiplies the score by 2^-s
// (exact). One block per padded query; padding queries and dims are zero.
template <bool F16>
__device__ __forceinline__ void split_queries(const float* __restrict__ q, int nq, int dim, int q_pad,
                                              int d_pad, unsigned short* __restrict__ out,
                                              int* __restrict__ qexp) {
    const int qi = blockIdx.x;
    __shared__ unsigned s_max;
    int s = 0;
    if (threadIdx.x == 0) s_max = 0;
    __syncthreads();
    unsigned mq = 0;  // |x| bit patterns order like the values
    if (qi < nq)
        for (int d = threadIdx.x; d < dim; d += blockDim.x)
            mq = max(mq, __float_as_uint(fabsf(q[(long long)qi * dim + d])));
    for (int o = 16; o > 0; o >>= 1) mq = max(mq, __shfl_xor_sync(RRRA_FULL, mq, o));
    if ((threadIdx.x & 31) == 0) atomicMax(&s_max, mq);
    __syncthreads();
    const unsigned mx = s_max;
    if (mx != 0) {
        const int e = (int)((mx >> 23) & 0xffu) - 127;  // largest value in [2^e, 2^(e+1))
        s = min(max(14 - e, -126), 126);                 // -> [2^14, 2^15): below f16's max
    }
    const float scale = __int_as_float((127 + s) << 23);
    for (int d = threadIdx.x; d < d_pad; d += blockDim.x) {
        const float x = (qi < nq && d < dim) ? q[(long long)qi * dim + d] * scale : 0.0f;
        unsigned short h, m, l;
        if (F16) {
            const __half a = __float2half_rn(x);
            const float r1 = x - __half2float(a);
            const __half b = __float2half_rn(r1);
            const float r2 = r1 - __half2float(b);
            h = __half_as_ushort(a);
            m = __half_as_ushort(b);
            l = __half_as_ushort(__float2half_rn(r2));
        } else {
            const __nv_bfloat16 a = __float2bfloat16_rn(x);
            const float r1 = x - __bfloat162float(a);
            const __nv_bfloat16 b = __float2bfloat16_rn(r1);
            const float r2 = r1 - __bfloat162float(b);
            h = __bfloat16_as_ushort(a);
            m = __bfloat16_as_ushort(b);
            l = __bfloat16_as_ushort(__float2bfloat16_rn(r2));
        }
        const long long plane = (long long)q_pad * d_pad;
        const long long at = (long long)qi * d_pad + d;
        out[at] = h;
        out[plane + at] = m;
        out[2 * plane + at] = l;
    }
    if (threadIdx.x == 0) qexp[qi] = s;
}

extern "C" __global__ void rrra_topk_split_queries_f16(const float* __restrict__ q, int nq, int dim,
                                                       int q_pad, int d_pad,
                                                       unsigned short* __restrict__ out,
                                                       int* __restrict__ qexp) {
    split_queries<true>(q, nq, dim, q_pad, d_pad, out, qexp);
}

extern "C" __global__ void rrra_topk_split_queries_bf16(const float* __restrict__ q, int nq, int dim,
                                                        int q_pad, int d_pad,
                                                        unsigned short* __restrict__ out,
                                                        int* __restrict__ qexp) {
    split_queries<false>(q, nq, dim, q_pad, d_pad, out, qexp);
}

// ---------------------------------------------------------------------------------------------
// FP32 tiled scorer for many queries on f32 corpora

constexpr int G_BM = 128, G_BN = 64, G_BK = 16, G_THREADS = 256, G_LDC = G_BM + 4;
constexpr int G_PIPE = 2 * G_BK * G_BM + 2 * G_BK * G_BN;  // floats
constexpr int G_SMEM = (G_PIPE > G_BN * G_LDC) ? G_PIPE : G_BN * G_LDC;

// qT: queries transposed to [d_pad][q_pad] (d_pad multiple of G_BK, q_pad of G_BN, zero padded).
extern "C" __global__ void __launch_bounds__(G_THREADS)
    rrra_topk_score_f32_gemm(const float* __restrict__ corpus, long long n_rows, int dim, unsigned row0,
                             const float* __restrict__ qT, int nq, int q_pad, int d_pad,
                             const unsigned* __restrict__ min_key, u64* __restrict__ cand,
                             unsigned* __restrict__ count, long long stride, int q_tiles) {
    __shared__ __align__(16) float smem[G_SMEM];
    float* As = smem;                      // [2][G_BK][G_BM]: k-major so rows read as float4
    float* Bs = smem + 2 * G_BK * G_BM;    // [2][G_BK][G_BN]
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int qt = blockIdx.x % q_tiles;
    const long long r_base = (long long)(blockIdx.x / q_tiles) * G_BM;
    const int q_base = qt * G_BN;
    const bool vec = (dim % 4 == 0) && ((reinterpret_cast<size_t>(corpus) & 15) == 0);
    const int nk = d_pad / G_BK;

    float4 ra[2], rb;
    auto fetch = [&](int kt) {
        const int k0 = kt * G_BK;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int f = tid + i * G_THREADS;
            const int r = f >> 2, kq = (f & 3) * 4;
            const long long row = r_base + r;
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (row < n_rows && k0 + kq < dim) {
                const float* p = corpus + row * dim + k0 + kq;
                if (vec) {
                    v = __ldcs(reinterpret_cast<const float4*>(p));
                } else {
                    v.x = __ldcs(p);
                    if (k0 + kq + 1 < dim) v.y = __ldcs(p + 1);
                    if (k0 + kq + 2 < dim) v.z = __ldcs(p + 2);
                    if (k0 + kq + 3 < dim) v.w = __ldcs(p + 3);
                }
            }
            ra[i] = v;
        }
        rb = *reinterpret_cast<const float4*>(qT + (long long)(k0 + (tid >> 4)) * q_pad + q_base +
                                              (tid & 15) * 4);
    };
    auto stash = [&](int buf) {
        float* a = As + buf * G_BK * G_BM;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int f = tid + i * G_THREADS;
            const int r = f >> 2, kq = (f & 3) * 4;
            a[(kq + 0) * G_BM + r] = ra[i].x;
            a[(kq + 1) * G_BM + r] = ra[i].y;
            a[(kq + 2) * G_BM + r] = ra[i].z;
            a[(kq + 3) * G_BM + r] = ra[i].w;
        }
        *reinterpret_cast<float4*>(Bs + buf * G_BK * G_BN + (tid >> 4) * G_BN + (tid & 15) * 4) = rb;
    };

    float acc[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    fetch(0);
    stash(0);
    __syncthreads();
    for (int kt = 0; kt < nk; ++kt) {
        const int cur = kt & 1;
        if (kt + 1 < nk) fetch(kt + 1);  // global loads in flight during the FMAs below
        const float* a = As + cur * G_BK * G_BM;
        const float* b = Bs + cur * G_BK * G_BN;
#pragma unroll
        for (int kk = 0; kk < G_BK; ++kk) {
            const float4 a0 = *reinterpret_cast<const float4*>(a + kk * G_BM + ty * 4);
            const float4 a1 = *reinterpret_cast<const float4*>(a + kk * G_BM + 64 + ty * 4);
            const float4 bv = *reinterpret_cast<const float4*>(b + kk * G_BN + tx * 4);
            const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float bw[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bw[j], acc[i][j]);
        }
        if (kt + 1 < nk) stash(cur ^ 1);  // that buffer was last read before the previous barrier
        __syncthreads();
    }

    float* ct = smem;  // [G_BN][G_LDC], query-major; the loop's final barrier freed the buffers
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int r = (i < 4) ? ty * 4 + i : 64 + ty * 4 + (i - 4);
#pragma unroll
        for (int j = 0; j < 4; ++j) ct[(tx * 4 + j) * G_LDC + r] = acc[i][j];
    }
    __syncthreads();
    tile_epilogue<G_BM, G_BN, G_LDC, G_THREADS / 32>(ct, r_base, n_rows, row0, q_base, nq, nullptr,
                                                     min_key, cand, count, stride);
}

extern "C" __global__ void rrra_topk_transpose_queries(const float* __restrict__ q, int nq, int dim,
                                                       int q_pad, int d_pad, float* __restrict__ qT) {
    const long long total = (long long)d_pad * q_pad;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int d = (int)(i / q_pad), qi = (int)(i % q_pad);
        qT[i] = (qi < nq && d < dim) ? q[(long long)qi * dim + d] : 0.0f;
    }
}

// ---------------------------------------------------------------------------------------------
// Selection: running list U new candidates -> the k largest keys

constexpr int SEL_THREADS = 1024;
constexpr int SEL_CAP = 12288;  // keys compacted into shared memory (96 KiB, dynamic)

// Appends the keys of the lanes with `take` at *counter (shared or global). Whole warp calls.
__device__ __forceinline__ void warp_append(bool take, u64 e, u64* dst, unsigned* counter, int lane) {
    const unsigned m = __ballot_sync(RRRA_FULL, take);
    if (m == 0) return;
    const int leader = __ffs(m) - 1;
    unsigned base = 0;
    if (lane == leader) base = atomicAdd(counter, (unsigned)__popc(m));
    base = __shfl_sync(RRRA_FULL, base, leader);
    if (take) dst[base + __popc(m & lanemask_lt(lane))] = e;
}

// One block per query. Reads count_in[q] keys of list q of `in`, writes the min(k, n) largest to
// list q of `out` (unordered), count_out[q], and min_key[q]: the smallest score key a later row
// needs to enter (later rows have larger indices, so a tie with the k-th key loses), or 0 while
// fewer than k rows have been seen.
extern "C" __global__ void __launch_bounds__(SEL_THREADS)
    rrra_topk_select(const u64* __restrict__ in_all, const unsigned* __restrict__ count_in,
                     u64* __restrict__ out_all, unsigned* __restrict__ count_out,
                     unsigned* __restrict__ min_key, long long stride, int k) {
    RRRA_DYNAMIC_SMEM(8, u64, sbuf);  // SEL_CAP keys
    __shared__ unsigned hist[256];
    __shared__ unsigned s_bucket, s_above, s_cnt, s_out, s_buf, s_min;
    const int q = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u64* in = in_all + (long long)q * stride;
    u64* out = out_all + (long long)q * stride;
    const unsigned n = count_in[q];

    if (n <= (unsigned)k) {  // everything stays
        if (tid == 0) s_min = 0xffffffffu;
        __syncthreads();
        unsigned lo = 0xffffffffu;
        for (unsigned i = tid; i < n; i += blockDim.x) {
            const u64 e = in[i];
            out[i] = e;
            lo = min(lo, (unsigned)(e >> 32));
        }
        for (int o = 16; o > 0; o >>= 1) lo = min(lo, __shfl_xor_sync(RRRA_FULL, lo, o));
        if (lane == 0) atomicMin(&s_min, lo);
        __syncthreads();
        if (tid == 0) {
            count_out[q] = n;
            min_key[q] = (n == (unsigned)k) ? s_min + 1u : 0u;  // keys <= 0xff800000: no overflow
        }
        return;
    }

    if (tid == 0) {
        s_out = 0;
        s_buf = 0;
    }
    u64 prefix = 0;         // the k-th key's bits above `shift`
    int shift = 64;
    unsigned need = k;      // how many of the keys matching `prefix` still belong to the top k
    bool in_smem = false;
    unsigned nbuf = 0;
    u64 thr = 0;            // exactly k keys are >= thr
    while (true) {
        shift -= 8;
        for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        const unsigned len = in_smem ? nbuf : n;
        for (unsigned b0 = 0; b0 < len; b0 += blockDim.x) {
            const unsigned i = b0 + tid;
            bool has = false;
            unsigned digit = 0;
            if (i < len) {
                const u64 e = in_smem ? sbuf[i] : in[i];
                has = (shift == 56) || ((e >> (shift + 8)) == prefix);
                digit = (unsigned)(e >> shift) & 255u;
            }
            const unsigned act = __ballot_sync(RRRA_FULL, has);
            if (has) {
                const unsigned peers = __match_any_sync(act, digit);
                if (lane == __ffs(peers) - 1) atomicAdd(&hist[digit], (unsigned)__popc(peers));
            }
        }
        __syncthreads();
        if (warp == 0) {
            // Bucket b with (keys above b) < need <= (keys above b) + hist[b], scanning from 255 down.
            unsigned c[8], tot = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                c[j] = hist[lane * 8 + j];
                tot += c[j];
            }
            unsigned incl = tot;  // sum over lanes >= this one
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const unsigned v = __shfl_down_sync(RRRA_FULL, incl, o);
                if (lane + o < 32) incl += v;
            }
            const unsigned above = incl - tot;
            if (above < need && need <= incl) {
                unsigned cum = above;
                for (int j = 7; j >= 0; --j) {
                    if (cum + c[j] >= need) {
                        s_bucket = lane * 8 + j;
                        s_above = cum;
                        s_cnt = c[j];
                        break;
                    }
                    cum += c[j];
                }
            }
        }
        __syncthreads();
        need -= s_above;
        prefix = (prefix << 8) | s_bucket;
        const unsigned cnt = s_cnt;
        if (cnt == need || shift == 0) {  // keys are distinct: at the latest the last digit ends it
            thr = prefix << shift;
            break;
        }
        if (!in_smem && cnt <= SEL_CAP) {
            // Keys above the prefix are in the top k for good; keys on it move to shared memory.
            for (unsigned b0 = 0; b0 < n; b0 += blockDim.x) {
                const unsigned i = b0 + tid;
                u64 e = 0;
                bool take = false, keep = false;
                if (i < n) {
                    e = in[i];
                    const u64 hi = e >> shift;
                    take = hi > prefix;
                    keep = hi == prefix;
                }
                warp_append(take, e, out, &s_out, lane);
                warp_append(keep, e, sbuf, &s_buf, lane);
            }
            __syncthreads();
            nbuf = s_buf;
            in_smem = true;
        }
    }

    const unsigned len = in_smem ? nbuf : n;
    for (unsigned b0 = 0; b0 < len; b0 += blockDim.x) {
        const unsigned i = b0 + tid;
        u64 e = 0;
        bool take = false;
        if (i < len) {
            e = in_smem ? sbuf[i] : in[i];
            take = e >= thr;
        }
        warp_append(take, e, out, &s_out, lane);
    }
    __syncthreads();
    if (tid == 0) {
        count_out[q] = min(s_out, (unsigned)k);
        min_key[q] = (unsigned)(thr >> 32) + 1u;  // thr <= the k-th key <= 0xff800000ffffffff
    }
}

// One block per query: bitonic sort (descending) of list q's min(count, k) keys, padded with 0
// (below every real key) to P = next power of two >= k, written to out[q * k ..].
extern "C" __global__ void __launch_bounds__(1024)
    rrra_topk_sort(const u64* __restrict__ lists, const unsigned* __restrict__ count, long long stride,
                   int k, u64* __restrict__ out) {
    RRRA_DYNAMIC_SMEM(8, u64, skeys);
    const int q = blockIdx.x, tid = threadIdx.x;
    const unsigned n = min(count[q], (unsigned)k);
    int P = 1;
    while (P < k) P <<= 1;
    const u64* in = lists + (long long)q * stride;
    for (int i = tid; i < P; i += blockDim.x) skeys[i] = ((unsigned)i < n) ? in[i] : 0ull;
    for (int size = 2; size <= P; size <<= 1) {
        for (int j = size >> 1; j > 0; j >>= 1) {
            __syncthreads();
            for (int t = tid; t < P / 2; t += blockDim.x) {
                const int i = 2 * t - (t & (j - 1));  // lower index of the pair, bit j clear
                const int l = i + j;
                const bool desc = (i & size) == 0;
                const u64 a = skeys[i], b = skeys[l];
                if ((a < b) == desc) {
                    skeys[i] = b;
                    skeys[l] = a;
                }
            }
        }
    }
    __syncthreads();
    for (int i = tid; i < k; i += blockDim.x) out[(long long)q * k + i] = skeys[i];
}

// ---------------------------------------------------------------------------------------------
// Synthetic unit vectors for benchmarks (a hash per element, Box-Muller, one warp per row)

__device__ __forceinline__ u64 splitmix64(u64 z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float synth_normal(u64 seed, long long row, int j) {
    const u64 h = splitmix64(seed ^ splitmix64((u64)row * 0xD1B54A32D192ED03ull + (u64)j));
    const float u1 = ((float)(h >> 40) + 0.5f) * (1.0f / 16777216.0f);  // (0, 1)
    const float u2 = ((float)(h & 0xffffffull) + 0.5f) * (1.0f / 16777216.0f);
    return sqrtf(-2.0f * __logf(u1)) * __cosf(6.28318531f * u2);
}

template <int KIND>
__device__ __forceinline__ void synth(void* out, long long rows, int dim, u64 seed) {
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    for (long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); row < rows;
         row += warps) {
        float ss = 0.0f;
        for (int j = lane; j < dim; j += 32) {
            const float z = synth_normal(seed, row, j);
            ss += z * z;
        }
        const float inv = rsqrtf(fmaxf(warp_sum(ss), 1e-30f));
        for (int j = lane; j < dim; j += 32) {
            const float x = synth_normal(seed, row, j) * inv;
            const long long at = row * dim + j;
            if (KIND == 0) static_cast<float*>(out)[at] = x;
            if (KIND == 1) static_cast<unsigned short*>(out)[at] = __half_as_ushort(__float2half_rn(x));
            if (KIND == 2)
                static_cast<unsigned short*>(out)[at] = __bfloat16_as_ushort(__float2bfloat16_rn(x));
        }
    }
}

extern "C" __global__ void rrra_topk_synth_f32(void* out, long long rows, int dim, u64 seed) {
    synth<0>(out, rows, dim, seed);
}
extern "C" __global__ void rrra_topk_synth_f16(void* out, long long rows, int dim, u64 seed) {
    synth<1>(out, rows, dim, seed);
}
extern "C" __global__ void rrra_topk_synth_bf16(void* out, long long rows, int dim, u64 seed) {
    synth<2>(out, rows, dim, seed);
}
