// rrra_attention_backward_*: the backward of bidirectional multi-head attention over packed
// variable-length sequences (the f32 training path), FlashAttention-2 style: the len x len
// probabilities are recomputed from Q and K tile by tile and never reach global memory.
//
// Inputs are exactly those of the CPU reference (cpu::backward::attention_sequence_backward):
// the fused QKV projection [tokens x 3h] (Q | K | V columns, head `hd` at hd*dh .. hd*dh + dh)
// and dctx = dO [tokens x h]. `bias` ([3h]) is optional (null = none): the GPU forward keeps QKV
// *without* its bias (kernels/attention.cu adds it on load), the CPU keeps it with; pass the
// bias for the former and null for the latter. Output: dqkv [tokens x 3h] = (dQ | dK | dV), every
// element of every token of the batch overwritten (the gradient w.r.t. the biased and the
// unbiased projection is the same). Sequence s owns rows offsets[s] .. offsets[s + 1]; the
// packing is the padding mask: a block only ever reads its own sequence's rows, keys of a partial
// tile are masked to -inf, queries past the end are computed on zero rows and never stored.
//
// Maths per head (S = Q K^T * scale, P = softmax(S), dO given):
//   dV = P^T dO,  dP = dO V^T,  D_i = sum_j P_ij dP_ij (= rowsum(dO . O)),
//   dS = P . (dP - D),  dQ = dS K * scale,  dK = dS^T Q * scale.
// Optional dropout on the probabilities, the CPU's AttnDropout bit for bit: with P~ = P . keep,
// keep_ij = 0 where uniform(n) < p and 1/(1-p) elsewhere, n = (head * len + i) * len + j within
// the sequence, uniform(n) = (word n of Philox4x32-10 >> 8) * 2^-24, the sequence's stream given
// as 4 words (key0, key1, counter2, counter3) in `drop_ctr` (train::rng::Stream):
//   dV = P~^T dO,  dP = (dO V^T) . keep,  D_i = sum_j P_ij dP_ij,  dS = P . (dP - D).
// Each keep is recomputed where needed (one Philox block per score element and pass).
//
// The f32 SIMT pair is described here; the tensor-core pair (rrra_attention_backward_*_mma_d*,
// 128 threads, static shared memory) in its own section below. Two kernels, both grid (64-row
// tiles, heads, sequences), 256 threads (16 x 16), no atomics, so results are bitwise
// deterministic run to run (the tensor-core pair's too):
// * rrra_attention_backward_dq_*: one block per 64 queries. Pass 1 streams the key tiles and
//   keeps an online softmax (running max m, sum l) *and* a running c = sum_j e^(s_ij - m) dP_ij,
//   so D_i = c / l comes out without O: it needs only the CPU's inputs. It stores
//   LSE_i = m + log l and D_i in the scratch buffer `stats` ([2][heads][tokens]). Pass 2 streams
//   the key tiles again: P = exp(S - LSE), dS = P (dP - D), dQ += dS K in registers; dQ is
//   written once, in place, by the block that owns the rows.
// * rrra_attention_backward_dkdv_*: one block per 64 keys (launched after the first, same
//   stream). K and V stay in shared memory, dK and dV accumulate in registers while the block
//   streams the query tiles with their LSE and D: P and dS go to shared memory, then
//   dV += P^T dO and dK += dS^T Q.
// Thread (ty, tx) = (tid / 16, tid % 16) owns score rows ty + 16r and columns tx + 16c (r, c < 4)
// of each 64 x 64 tile, and rows ty + 16r, columns tx + 16c (c < dh/16) of its 64 x dh
// accumulators. Shared tiles are [64][dh + 1] (row pad 1: the 16 distinct rows a warp reads in
// the Q K^T loop fall into 16 distinct banks). Dynamic shared memory, floats:
//   dq:   4 * 64 * (dh + 1) + 64 * 65              (d32 49 KB, d64 81 KB, d128 145 KB)
//   dkdv: 4 * 64 * (dh + 1) + 2 * 64 * 65 + 128    (d32 66 KB, d64 98 KB, d128 162 KB)
// (mirrored in src/device/attention_backward.rs; the kernels trap if launched with less).
// Variants d32, d64, d128 (dh fixed at compile time) and _any (any dh <= 128, tiles sized for 128,
// columns past dh zero).
//
// Roofline (per layer, N = sum(len^2) over sequences, h = heads * dh): the FA-2 backward is
// 5 GEMMs of 2 N h flops (S, dP, dV, dK, dQ) = 10 N h; this one recomputes S and dP in each of
// its three passes: 2 (pass 1) + 3 (pass 2) + 4 (dkdv) = 9 GEMMs = 18 N h flops. BERT-base
// 128 x 128 tokens, h 768: N = 2.1M, 28.9 GFLOP as run (16.1 GFLOP as counted by FA-2); at the
// H200's ~67 TFLOP/s f32 FMA peak >= 0.43 ms. Memory, at least QKV and dO read and dQKV
// written: 16384 x (2304 + 768 + 2304) x 4 B = 352 MB, ~82 us at 4.3 TB/s (the tiles each pass
// re-reads, 128 KB of Q/K/V/dO per sequence and head at len 128, mostly hit L2), so the kernels
// are FMA (and shared-memory bandwidth) bound. SIMT with 4 x 4 register tiles: each inner step
// issues 8 shared loads for 16 FMAs, so expect 25-40% of FMA peak; the tensor-core pair below
// is the mixed-precision step's, and a fused dq+dkdv with a deterministic dQ reduction the next
// step. Dropout
// adds one Philox4x32-10 block (~60 integer ops) per score element and pass, against 2 dh FMAs.
// Registers (sm_90, CUDA 13.0, no spills): dq 99-128, dkdv 96-185 (d32's dkdv has launch bounds
// of 2 blocks per SM, see below).
//
// Validated on a CPU emulation of the CUDA blocks against the Rust CPU reference (head dims 16,
// 32, 40, 64, 128, lengths 0, 1, 63, 64, 65, 129, 130, dropout 0 to 0.5): max difference 1e-6
// of the largest gradient (the tensor-core pair: see its section).

#include "common.cuh"
#include "mma.cuh"
#include "philox.cuh"

#define RRRA_ATTB_NEG_INF (-__int_as_float(0x7f800000))

namespace attb {

constexpr int T = 64;         // rows per query tile and per key tile
constexpr int THREADS = 256;  // 16 x 16
constexpr int PLD = T + 1;    // row stride of the 64 x 64 P / dS tiles

template <int DMAX>
struct Layout {
    static constexpr int LD = DMAX + 1;  // row stride of the 64 x dh tiles
    static constexpr int NC = DMAX / 16;  // accumulator columns per thread
    static constexpr int DQ_FLOATS = 4 * T * LD + T * PLD;
    static constexpr int DKDV_FLOATS = 4 * T * LD + 2 * T * PLD + 2 * T;
};

// Dropout of one sequence: probability p, keep-scale 1/(1-p), the stream's key and counter words.
struct Dropout {
    float p, scale;
    unsigned w[4];
    bool on;
    __device__ Dropout(float p_, float scale_, const unsigned* __restrict__ ctr) {
        p = p_;
        scale = scale_;
        on = p_ > 0.0f;
        w[0] = w[1] = w[2] = w[3] = 0;
        if (on) {
            const unsigned* s = ctr + 4 * (size_t)blockIdx.z;
            w[0] = s[0];
            w[1] = s[1];
            w[2] = s[2];
            w[3] = s[3];
        }
    }
    // Keep-scale of number n of the stream (1 when dropout is off).
    __device__ __forceinline__ float keep(unsigned long long n) const {
        if (!on) return 1.0f;
        return rrra_uniform_at(n, w) < p ? 0.0f : scale;
    }
};

// Sum over the 16 lanes of a half-warp (the lanes with the same ty).
__device__ __forceinline__ float sum16(float v) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float max16(float v) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Rows r0 .. r0 + 63 of a [rows x ld] matrix, columns col0 .. col0 + dh (plus bias[col], when
// given) into a [64][DMAX + 1] shared tile; rows >= n and columns >= dh are zero.
template <int DMAX>
__device__ __forceinline__ void load_tile(float* dst, const float* __restrict__ src, size_t ld,
                                          int r0, int n, int dh, const float* __restrict__ bias) {
    constexpr int LD = Layout<DMAX>::LD;
    for (int idx = threadIdx.x; idx < T * DMAX; idx += THREADS) {
        const int r = idx / DMAX, c = idx % DMAX;
        float v = 0.0f;
        if (r0 + r < n && c < dh) {
            v = src[(size_t)(r0 + r) * ld + c];
            if (bias) v += bias[c];
        }
        dst[r * LD + c] = v;
    }
}

// s[r][c] = (A[ty + 16r] * scale) . B[tx + 16c] and dp[r][c] = dO[ty + 16r] . V[tx + 16c] over
// the first dh columns of four [64][DMAX + 1] tiles.
template <int DMAX, bool FIXED>
__device__ __forceinline__ void scores(const float* Qs, const float* Ks, const float* dOs,
                                       const float* Vs, int dh_arg, float scale, float (&s)[4][4],
                                       float (&dp)[4][4]) {
    constexpr int LD = Layout<DMAX>::LD;
    const int dh = FIXED ? DMAX : dh_arg;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) s[r][c] = dp[r][c] = 0.0f;
#pragma unroll 4
    for (int d = 0; d < dh; ++d) {
        float a[4], o[4], b[4], v[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            a[r] = Qs[(ty + 16 * r) * LD + d] * scale;  // q scaled first, as the CPU does
            o[r] = dOs[(ty + 16 * r) * LD + d];
        }
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            b[c] = Ks[(tx + 16 * c) * LD + d];
            v[c] = Vs[(tx + 16 * c) * LD + d];
        }
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                s[r][c] = fmaf(a[r], b[c], s[r][c]);
                dp[r][c] = fmaf(o[r], v[c], dp[r][c]);
            }
    }
}

// One head's rows in a sequence: Q, K, V in the fused projection (row stride 3h; T: f32, or
// bf16 for the tensor-core pair's bf16 twin), their biases (null without a bias), dO (f32, row
// stride h).
template <typename T>
struct HeadPtrs {
    const T *q, *k, *v;
    const float *qb, *kb, *vb, *dO;
    __device__ HeadPtrs(const T* __restrict__ qkv, const float* __restrict__ bias,
                        const float* __restrict__ dctx, int start, int h, int head, int dh) {
        q = qkv + (size_t)start * 3 * h + (size_t)head * dh;
        k = q + h;
        v = q + 2 * (size_t)h;
        qb = bias ? bias + (size_t)head * dh : nullptr;
        kb = bias ? qb + h : nullptr;
        vb = bias ? qb + 2 * (size_t)h : nullptr;
        dO = dctx + (size_t)start * h + (size_t)head * dh;
    }
};

// Per-sequence geometry of a block.
struct Seq {
    int start, len;
    __device__ Seq(const unsigned* __restrict__ offsets) {
        start = (int)offsets[blockIdx.z];
        len = (int)offsets[blockIdx.z + 1] - start;
    }
};

template <int DMAX, bool FIXED>
__device__ __forceinline__ void backward_dq(const float* __restrict__ qkv,
                                            const float* __restrict__ bias,
                                            const float* __restrict__ dctx,
                                            const unsigned* __restrict__ offsets, int tokens,
                                            int h, int dh_arg, float scale, float drop_p,
                                            float drop_scale,
                                            const unsigned* __restrict__ drop_ctr,
                                            float* __restrict__ stats,
                                            float* __restrict__ dqkv) {
    using L = Layout<DMAX>;
    constexpr int LD = L::LD, NC = L::NC;
    const int dh = FIXED ? DMAX : dh_arg;
    RRRA_DYNAMIC_SMEM(16, float4, rrra_attb_smem);
    if (dynamic_smem_bytes() < L::DQ_FLOATS * sizeof(float)) __trap();
    float* Qs = reinterpret_cast<float*>(rrra_attb_smem);
    float* dOs = Qs + T * LD;
    float* Ks = dOs + T * LD;
    float* Vs = Ks + T * LD;
    float* Ss = Vs + T * LD;

    const Seq sq(offsets);
    const int len = sq.len;
    const int q0 = blockIdx.x * T;
    if (q0 >= len) return;  // uniform per block, before any barrier
    const int head = blockIdx.y;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const Dropout drop(drop_p, drop_scale, drop_ctr);
    // number of probability (row, 0) of this head in the sequence's stream
    const unsigned long long nbase = (unsigned long long)head * len * len;
    const size_t ld = 3 * (size_t)h;
    const HeadPtrs<float> hp(qkv, bias, dctx, sq.start, h, head, dh);
    const float *q = hp.q, *k = hp.k, *v = hp.v, *dO = hp.dO;
    const float *qb = hp.qb, *kb = hp.kb, *vb = hp.vb;

    load_tile<DMAX>(Qs, q, ld, q0, len, dh, qb);
    load_tile<DMAX>(dOs, dO, h, q0, len, dh, nullptr);

    // Pass 1: LSE and D = sum_j P dP, online. m is uniform over a row's 16 lanes; l and c are
    // per-lane partial sums (all relative to the same m), reduced at the end.
    float m[4], l[4], cs[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        m[r] = RRRA_ATTB_NEG_INF;
        l[r] = cs[r] = 0.0f;
    }
    float s[4][4], dp[4][4];
    for (int k0 = 0; k0 < len; k0 += T) {
        __syncthreads();  // the previous K / V tiles are consumed (Q and dO are written)
        load_tile<DMAX>(Ks, k, ld, k0, len, dh, kb);
        load_tile<DMAX>(Vs, v, ld, k0, len, dh, vb);
        __syncthreads();
        scores<DMAX, FIXED>(Qs, Ks, dOs, Vs, dh, scale, s, dp);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            float mx = RRRA_ATTB_NEG_INF;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                if (k0 + tx + 16 * c >= len) s[r][c] = RRRA_ATTB_NEG_INF;
                mx = fmaxf(mx, s[r][c]);
            }
            // finite: key k0 (lane tx 0, c 0) is in range
            const float mn = fmaxf(m[r], max16(mx));
            const float alpha = expf(m[r] - mn);  // 0 on the first tile (m = -inf)
            l[r] *= alpha;
            cs[r] *= alpha;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const float e = expf(s[r][c] - mn);  // 0 for masked keys
                l[r] += e;
                const int i = q0 + ty + 16 * r, j = k0 + tx + 16 * c;
                const float kp = drop.keep(nbase + (unsigned long long)i * len + j);
                cs[r] = fmaf(e, dp[r][c] * kp, cs[r]);
            }
            m[r] = mn;
        }
    }
    float lse[4], delta[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const float lt = sum16(l[r]), ct = sum16(cs[r]);
        lse[r] = m[r] + logf(lt);
        delta[r] = ct / lt;
        const int i = q0 + ty + 16 * r;
        if (tx == 0 && i < len) {
            const size_t at = (size_t)head * tokens + sq.start + i;
            stats[at] = lse[r];
            stats[(size_t)tokens * (h / dh) + at] = delta[r];
        }
    }

    // Pass 2: dQ = dS K, dS = P (dP - D), P = exp(S - LSE).
    float acc[4][NC];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < NC; ++c) acc[r][c] = 0.0f;
    for (int k0 = 0; k0 < len; k0 += T) {
        __syncthreads();  // K / V / dS of the previous tile are consumed
        load_tile<DMAX>(Ks, k, ld, k0, len, dh, kb);
        load_tile<DMAX>(Vs, v, ld, k0, len, dh, vb);
        __syncthreads();
        scores<DMAX, FIXED>(Qs, Ks, dOs, Vs, dh, scale, s, dp);
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int i = q0 + ty + 16 * r, j = k0 + tx + 16 * c;
                const bool valid = j < len;
                const float p = valid ? expf(s[r][c] - lse[r]) : 0.0f;
                const float kp = valid ? drop.keep(nbase + (unsigned long long)i * len + j) : 0.0f;
                Ss[(ty + 16 * r) * PLD + tx + 16 * c] = p * (dp[r][c] * kp - delta[r]);
            }
        __syncthreads();
        const int kn = min(T, len - k0);
        for (int j = 0; j < kn; ++j) {
            float a[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) a[r] = Ss[(ty + 16 * r) * PLD + j];
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                const float b = Ks[j * LD + tx + 16 * c];
#pragma unroll
                for (int r = 0; r < 4; ++r) acc[r][c] = fmaf(a[r], b, acc[r][c]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int i = q0 + ty + 16 * r;
        if (i >= len) continue;
        float* out = dqkv + (size_t)(sq.start + i) * ld + (size_t)head * dh;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            const int d = tx + 16 * c;
            if (d < dh) out[d] = acc[r][c] * scale;
        }
    }
}

template <int DMAX, bool FIXED>
__device__ __forceinline__ void backward_dkdv(const float* __restrict__ qkv,
                                              const float* __restrict__ bias,
                                              const float* __restrict__ dctx,
                                              const unsigned* __restrict__ offsets, int tokens,
                                              int h, int dh_arg, float scale, float drop_p,
                                              float drop_scale,
                                              const unsigned* __restrict__ drop_ctr,
                                              const float* __restrict__ stats,
                                              float* __restrict__ dqkv) {
    using L = Layout<DMAX>;
    constexpr int LD = L::LD, NC = L::NC;
    const int dh = FIXED ? DMAX : dh_arg;
    RRRA_DYNAMIC_SMEM(16, float4, rrra_attb_smem);
    if (dynamic_smem_bytes() < L::DKDV_FLOATS * sizeof(float)) __trap();
    float* Ks = reinterpret_cast<float*>(rrra_attb_smem);
    float* Vs = Ks + T * LD;
    float* Qs = Vs + T * LD;
    float* dOs = Qs + T * LD;
    float* Ps = dOs + T * LD;   // P[i][j], i query, j key
    float* dSs = Ps + T * PLD;  // dS[i][j]
    float* lse_s = dSs + T * PLD;
    float* delta_s = lse_s + T;

    const Seq sq(offsets);
    const int len = sq.len;
    const int k0 = blockIdx.x * T;
    if (k0 >= len) return;  // uniform per block, before any barrier
    const int head = blockIdx.y;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const Dropout drop(drop_p, drop_scale, drop_ctr);
    // number of probability (row, 0) of this head in the sequence's stream
    const unsigned long long nbase = (unsigned long long)head * len * len;
    const size_t ld = 3 * (size_t)h;
    const HeadPtrs<float> hp(qkv, bias, dctx, sq.start, h, head, dh);
    const float *q = hp.q, *k = hp.k, *v = hp.v, *dO = hp.dO;
    const float *qb = hp.qb, *kb = hp.kb, *vb = hp.vb;
    const float* lse_g = stats + (size_t)head * tokens + sq.start;
    const float* delta_g = lse_g + (size_t)tokens * (h / dh);

    load_tile<DMAX>(Ks, k, ld, k0, len, dh, kb);
    load_tile<DMAX>(Vs, v, ld, k0, len, dh, vb);

    float dk[4][NC], dv[4][NC];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < NC; ++c) dk[r][c] = dv[r][c] = 0.0f;
    float s[4][4], dp[4][4];
    for (int q0 = 0; q0 < len; q0 += T) {
        __syncthreads();  // the previous Q / dO / P / dS tiles are consumed
        load_tile<DMAX>(Qs, q, ld, q0, len, dh, qb);
        load_tile<DMAX>(dOs, dO, h, q0, len, dh, nullptr);
        if (threadIdx.x < T) {
            const int i = q0 + threadIdx.x;
            lse_s[threadIdx.x] = i < len ? lse_g[i] : 0.0f;
            delta_s[threadIdx.x] = i < len ? delta_g[i] : 0.0f;
        }
        __syncthreads();
        // rows: queries ty + 16r; columns: keys tx + 16c
        scores<DMAX, FIXED>(Qs, Ks, dOs, Vs, dh, scale, s, dp);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int ir = ty + 16 * r;
            const bool qvalid = q0 + ir < len;
            const float lr = lse_s[ir], dr = delta_s[ir];
            const unsigned long long row = nbase + (unsigned long long)(q0 + ir) * len + k0;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int jc = tx + 16 * c;
                const bool valid = qvalid && k0 + jc < len;
                const float p = valid ? expf(s[r][c] - lr) : 0.0f;
                const float kp = valid ? drop.keep(row + jc) : 0.0f;
                Ps[ir * PLD + jc] = p * kp;  // P~ = P . keep, for dV
                dSs[ir * PLD + jc] = p * (dp[r][c] * kp - dr);
            }
        }
        __syncthreads();
        // rows: keys ty + 16r; columns: d = tx + 16c
        const int qn = min(T, len - q0);
        for (int i = 0; i < qn; ++i) {
            float pa[4], sa[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                pa[r] = Ps[i * PLD + ty + 16 * r];
                sa[r] = dSs[i * PLD + ty + 16 * r];
            }
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                const float o = dOs[i * LD + tx + 16 * c];
                const float qq = Qs[i * LD + tx + 16 * c];
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    dv[r][c] = fmaf(pa[r], o, dv[r][c]);
                    dk[r][c] = fmaf(sa[r], qq, dk[r][c]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int j = k0 + ty + 16 * r;
        if (j >= len) continue;
        float* out = dqkv + (size_t)(sq.start + j) * ld + (size_t)head * dh;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            const int d = tx + 16 * c;
            if (d < dh) {
                out[h + d] = dk[r][c] * scale;
                out[2 * (size_t)h + d] = dv[r][c];
            }
        }
    }
}

}  // namespace attb

// ------------------------------------------------------------------------------------------
// Tensor cores (the mixed-precision step): mma.sync m16n8k16 bf16, f32 accumulation
// ------------------------------------------------------------------------------------------
//
// The same two kernels and the same maths as above, on the tensor cores: 4 warps of 16 rows
// each own a 64-row tile (queries in dq, keys in dkdv) and stream the other side N rows at a
// time (dq 64, 32 at dh 128; dkdv 32, 64 at dh 32: the sizes that do not spill), loaded from
// f32 or bf16 (+ bias, in f32) and rounded to bf16 into shared memory [N][dh + 8] (16-byte
// row skew: conflict-free ldmatrix). The warp's own rows stay in registers as A fragments for
// the whole block (dkdv's V rows in shared memory, read by ldmatrix: in registers they
// spilled). Scores are in log2 units (the row's Q, or K, pre-scaled by scale * log2(e), so
// exp2 gives the softmax) and `stats` holds LSE in log2 units, which only these two kernels
// read. P and dS are re-packed from the f32 accumulators as bf16 A fragments without leaving
// registers:
// * dq: S = Q K^T and dP = dO V^T (B from K and V rows, ldmatrix), pass 1 the online LSE and
//   D, pass 2 dS = P (dP keep - D) and dQ += dS K (B from K rows, ldmatrix.trans).
// * dkdv: S^T = K Q^T and dP^T = V dO^T per query tile, then dV += P~^T dO and dK += dS^T Q
//   (B from dO and Q rows, ldmatrix.trans).
// Rounding: Q, K, V, dO, P~ and dS to bf16 (2^-9 relative each), f32 accumulation: a few 1e-3
// of the largest gradient (7.4e-3 at worst on the emulator's cases; the bound is bf16's 1e-2).
// The dropout keep of each probability is the CPU's mask, recomputed (one Philox block) in
// each of the three passes, in a rolled loop per tile (dropped_bits).
// Two instantiations per head dim: QKV and dQKV in f32 (rrra_attention_backward_*_mma_d*) or in
// bf16 (*_mma_bf16_d*, the bf16-activation step's); the loads widen bf16 exactly and the stores
// round once, so the bf16 twin's gradients are the f32 one's rounded to bf16 on the same
// values (the emulator checks this bit for bit).
// Registers (sm_90, CUDA 13.0, no spills): dq 138-252, dkdv 158-255, both twins.
// Roofline: the 9 len^2 x dh products of the SIMT kernels at tensor-core rate (BERT-base
// 128 x 128: 28.9 GFLOP, ~37 us at 790 TFLOP/s); in practice bound by the f32 tile loads and,
// with dropout, the Philox blocks (~60 integer ops per probability and pass).

namespace attbm {

constexpr int ROWS = 64;     // rows a block owns: 4 warps x 16
constexpr int THREADS = 128;

template <int DH>
struct Tile {
    static constexpr int N = DH == 128 ? 32 : 64;       // rows dq streams per step
    static constexpr int N_DKDV = DH == 32 ? 64 : 32;   // and dkdv (fewer: no spills at d64)
    static constexpr int KS = DH + 8;                   // shared row stride (bf16)
};

// rows_times_tile with the warp's 16 rows read from shared memory (`As`, row-major with the
// tiles' stride, at the warp's first row) as A fragments by ldmatrix: registers traded for
// shared-memory reads where a kernel would otherwise spill.
template <int DH, int N>
__device__ __forceinline__ void smem_rows_times_tile(float (&acc)[N / 8][4], const bf16* As,
                                                     const bf16* Bs) {
    constexpr int KS = Tile<DH>::KS;
    const int lane = threadIdx.x % RRRA_WARP, lrow = lane & 7, lmat = lane >> 3;
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < DH / 16; ks += 2) {
        // A fragments: matrices (rows 0-7 | 8-15) x (dims +0 | +8), as a[0..3] expects
        unsigned a0[4], a1[4];
        ldmatrix_x4(a0, As + ((lmat & 1) * 8 + lrow) * KS + ks * 16 + (lmat >> 1) * 8);
        ldmatrix_x4(a1, As + ((lmat & 1) * 8 + lrow) * KS + (ks + 1) * 16 + (lmat >> 1) * 8);
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt) {
            unsigned b[4];
            ldmatrix_x4(b, Bs + (nt * 8 + lrow) * KS + ks * 16 + lmat * 8);
            mma_bf16_16816(acc[nt], a0, b[0], b[1]);
            mma_bf16_16816(acc[nt], a1, b[2], b[3]);
        }
    }
}

constexpr float LOG2E = 1.4426950408889634f;

// The dropout masks of a warp's accumulator tile ([16][N]: element (nt, e) is bit 4 nt + e),
// bit set = dropped. `row_col` maps an element to (query i, key j) of the sequence. A rolled
// loop: one Philox block in flight at a time, not N / 2 of them in registers (unrolled, they
// made the kernels spill).
template <int N, class RowCol>
__device__ __forceinline__ unsigned dropped_bits(const attb::Dropout& drop,
                                                 unsigned long long nbase, int len,
                                                 RowCol row_col) {
    unsigned bits = 0;
    if (!drop.on) return 0;
#pragma unroll 1
    for (int x = 0; x < N / 2; ++x) {
        int i, j;
        row_col(x >> 2, x & 3, i, j);
        if (i < len && j < len &&
            rrra_uniform_at(nbase + (unsigned long long)i * len + j, drop.w) < drop.p)
            bits |= 1u << x;
    }
    return bits;
}

template <int DH, typename T>
__device__ __forceinline__ void backward_dq(const T* __restrict__ qkv,
                                            const float* __restrict__ bias,
                                            const float* __restrict__ dctx,
                                            const unsigned* __restrict__ offsets, int tokens,
                                            int h, float scale, float drop_p, float drop_scale,
                                            const unsigned* __restrict__ drop_ctr,
                                            float* __restrict__ stats, T* __restrict__ dqkv) {
    constexpr int N = Tile<DH>::N, KS = Tile<DH>::KS;
    __shared__ __align__(16) bf16 Ks[N * KS];
    __shared__ __align__(16) bf16 Vs[N * KS];
    const attb::Seq sq(offsets);
    const int len = sq.len;
    const int q0 = blockIdx.x * ROWS;
    if (q0 >= len) return;  // uniform per block, before any barrier
    const int head = blockIdx.y;
    const int warp = threadIdx.x / RRRA_WARP, lane = threadIdx.x % RRRA_WARP;
    const int g = lane >> 2, t = lane & 3;
    const attb::Dropout drop(drop_p, drop_scale, drop_ctr);
    const unsigned long long nbase = (unsigned long long)head * len * len;
    const size_t ld = 3 * (size_t)h;
    const attb::HeadPtrs<T> hp(qkv, bias, dctx, sq.start, h, head, DH);
    const T *q = hp.q, *k = hp.k, *v = hp.v;
    const float* dO = hp.dO;
    const float *qb = hp.qb, *kb = hp.kb, *vb = hp.vb;
    const int ra = q0 + warp * 16 + g, rb = ra + 8;
    const float keep_scale = drop.on ? drop.scale : 1.0f;
    // element (nt, e) of the warp's tile at key tile k0: query row ra / rb, key column
    auto rows_are_queries = [&](int k0) {
        return [=](int nt, int e, int& i, int& j) {
            i = (e >> 1) ? rb : ra;
            j = k0 + nt * 8 + 2 * t + (e & 1);
        };
    };

    unsigned qf[DH / 16][4], of[DH / 16][4];
    load_a_frags<DH>(qf, q, ld, ra, rb, len, qb, scale * LOG2E);
    load_a_frags<DH>(of, dO, h, ra, rb, len, nullptr, 1.0f);
    float s[N / 8][4], dp[N / 8][4];

    // Pass 1: LSE (log2 units) and D = sum_j P dP keep, online; l and c are lane-partial
    // sums relative to the row's running max, reduced over the row's 4 lanes at the end.
    float m[2] = {RRRA_ATTB_NEG_INF, RRRA_ATTB_NEG_INF}, l[2] = {0.0f, 0.0f},
          c[2] = {0.0f, 0.0f};
    for (int k0 = 0; k0 < len; k0 += N) {
        __syncthreads();  // the previous tiles are consumed
        load_bf16_tile<DH, N>(Ks, k, ld, k0, len, kb);
        load_bf16_tile<DH, N>(Vs, v, ld, k0, len, vb);
        __syncthreads();
        rows_times_tile<DH, N>(s, qf, Ks);
        rows_times_tile<DH, N>(dp, of, Vs);
        float mx[2] = {RRRA_ATTB_NEG_INF, RRRA_ATTB_NEG_INF};
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                if (k0 + nt * 8 + 2 * t + (e & 1) >= len) s[nt][e] = RRRA_ATTB_NEG_INF;
                mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
            }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float mn = fmaxf(m[r], mx[r]);  // finite: key k0 is in range
            const float alpha = exp2f(m[r] - mn);  // 0 on the first tile
            l[r] *= alpha;
            c[r] *= alpha;
            m[r] = mn;
        }
        const unsigned dropped = dropped_bits<N>(drop, nbase, len, rows_are_queries(k0));
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1, i = r ? rb : ra, j = k0 + nt * 8 + 2 * t + (e & 1);
                const float x = exp2f(s[nt][e] - m[r]);  // 0 for masked keys
                l[r] += x;
                const float kp = (dropped >> (4 * nt + e)) & 1 ? 0.0f : keep_scale;
                if (i < len && j < len) c[r] = fmaf(x, dp[nt][e] * kp, c[r]);
            }
    }
    float lse[2], delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        c[r] += __shfl_xor_sync(0xffffffffu, c[r], 1);
        c[r] += __shfl_xor_sync(0xffffffffu, c[r], 2);
        lse[r] = m[r] + log2f(l[r]);
        delta[r] = c[r] / l[r];
        const int i = r ? rb : ra;
        if (t == 0 && i < len) {
            const size_t at = (size_t)head * tokens + sq.start + i;
            stats[at] = lse[r];
            stats[(size_t)tokens * (h / DH) + at] = delta[r];
        }
    }

    // Pass 2: dS = P (dP keep - D), P = exp2(S - LSE); dQ += dS K.
    float acc[DH / 8][4];
#pragma unroll
    for (int dt = 0; dt < DH / 8; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[dt][e] = 0.0f;
    for (int k0 = 0; k0 < len; k0 += N) {
        __syncthreads();
        load_bf16_tile<DH, N>(Ks, k, ld, k0, len, kb);
        load_bf16_tile<DH, N>(Vs, v, ld, k0, len, vb);
        __syncthreads();
        rows_times_tile<DH, N>(s, qf, Ks);
        rows_times_tile<DH, N>(dp, of, Vs);
        const unsigned dropped = dropped_bits<N>(drop, nbase, len, rows_are_queries(k0));
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1, i = r ? rb : ra, j = k0 + nt * 8 + 2 * t + (e & 1);
                float ds = 0.0f;
                if (i < len && j < len) {
                    const float p = exp2f(s[nt][e] - lse[r]);
                    const float kp = (dropped >> (4 * nt + e)) & 1 ? 0.0f : keep_scale;
                    ds = p * (dp[nt][e] * kp - delta[r]);
                }
                s[nt][e] = ds;
            }
        acc_times_tile<DH, N>(acc, s, Ks);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = r ? rb : ra;
        if (i >= len) continue;
        T* out = dqkv + (size_t)(sq.start + i) * ld + (size_t)head * DH;
#pragma unroll
        for (int dt = 0; dt < DH / 8; ++dt) {
            const int col = dt * 8 + 2 * t;
            store2(out + col, acc[dt][2 * r] * scale, acc[dt][2 * r + 1] * scale);
        }
    }
}

template <int DH, typename T>
__device__ __forceinline__ void backward_dkdv(const T* __restrict__ qkv,
                                              const float* __restrict__ bias,
                                              const float* __restrict__ dctx,
                                              const unsigned* __restrict__ offsets, int tokens,
                                              int h, float scale, float drop_p,
                                              float drop_scale,
                                              const unsigned* __restrict__ drop_ctr,
                                              const float* __restrict__ stats,
                                              T* __restrict__ dqkv) {
    constexpr int N = Tile<DH>::N_DKDV, KS = Tile<DH>::KS;
    __shared__ __align__(16) bf16 Qs[N * KS];
    __shared__ __align__(16) bf16 dOs[N * KS];
    // the block's 64 V rows: their A fragments come from here (in registers, next to K's,
    // dK's and dV's, dh 128 would spill)
    __shared__ __align__(16) bf16 Vown[ROWS * KS];
    __shared__ float lse_s[N], delta_s[N];
    const attb::Seq sq(offsets);
    const int len = sq.len;
    const int k0 = blockIdx.x * ROWS;
    if (k0 >= len) return;  // uniform per block, before any barrier
    const int head = blockIdx.y;
    const int warp = threadIdx.x / RRRA_WARP, lane = threadIdx.x % RRRA_WARP;
    const int g = lane >> 2, t = lane & 3;
    const attb::Dropout drop(drop_p, drop_scale, drop_ctr);
    const unsigned long long nbase = (unsigned long long)head * len * len;
    const size_t ld = 3 * (size_t)h;
    const attb::HeadPtrs<T> hp(qkv, bias, dctx, sq.start, h, head, DH);
    const T *q = hp.q, *k = hp.k, *v = hp.v;
    const float* dO = hp.dO;
    const float *qb = hp.qb, *kb = hp.kb, *vb = hp.vb;
    const float* lse_g = stats + (size_t)head * tokens + sq.start;
    const float* delta_g = lse_g + (size_t)tokens * (h / DH);
    const int ja = k0 + warp * 16 + g, jb = ja + 8;  // the warp's keys
    const float keep_scale = drop.on ? drop.scale : 1.0f;

    // Q is pre-scaled, not K: S^T then rounds exactly as dq's S does (bf16(q c) bf16(k)), so P
    // matches the LSE dq stored; dK = dS^T (Q c) / log2(e) = dS^T Q scale
    unsigned kf[DH / 16][4];
    load_a_frags<DH>(kf, k, ld, ja, jb, len, kb, 1.0f);
    load_bf16_tile<DH, ROWS>(Vown, v, ld, k0, len, vb);  // visible after the loop's first barrier
    const bf16* Vw = Vown + warp * 16 * KS;
    float dk[DH / 8][4], dv[DH / 8][4];
#pragma unroll
    for (int dt = 0; dt < DH / 8; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.0f;
    float st[N / 8][4], dpt[N / 8][4];
    for (int q0 = 0; q0 < len; q0 += N) {
        __syncthreads();  // the previous tiles are consumed
        load_bf16_tile<DH, N>(Qs, q, ld, q0, len, qb, scale * LOG2E);
        load_bf16_tile<DH, N>(dOs, dO, h, q0, len, nullptr);
        for (int i = threadIdx.x; i < N; i += THREADS) {
            lse_s[i] = q0 + i < len ? lse_g[q0 + i] : 0.0f;
            delta_s[i] = q0 + i < len ? delta_g[q0 + i] : 0.0f;
        }
        __syncthreads();
        rows_times_tile<DH, N>(st, kf, Qs);         // S^T: keys x queries, log2 units
        smem_rows_times_tile<DH, N>(dpt, Vw, dOs);  // dP^T
        // element (nt, e) of the warp's tile: key row ja / jb, query column
        const auto keys_by_queries = [=](int nt, int e, int& i, int& j) {
            i = q0 + nt * 8 + 2 * t + (e & 1);
            j = (e >> 1) ? jb : ja;
        };
        const unsigned dropped = dropped_bits<N>(drop, nbase, len, keys_by_queries);
#pragma unroll
        for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = nt * 8 + 2 * t + (e & 1), i = q0 + col;
                const int j = (e >> 1) ? jb : ja;
                float pk = 0.0f, ds = 0.0f;
                if (i < len && j < len) {
                    const float p = exp2f(st[nt][e] - lse_s[col]);
                    const float kp = (dropped >> (4 * nt + e)) & 1 ? 0.0f : keep_scale;
                    pk = p * kp;  // P~ = P . keep, for dV
                    ds = p * (dpt[nt][e] * kp - delta_s[col]);
                }
                st[nt][e] = pk;
                dpt[nt][e] = ds;
            }
        acc_times_tile<DH, N>(dv, st, dOs);
        acc_times_tile<DH, N>(dk, dpt, Qs);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = r ? jb : ja;
        if (j >= len) continue;
        T* out = dqkv + (size_t)(sq.start + j) * ld + (size_t)head * DH;
#pragma unroll
        for (int dt = 0; dt < DH / 8; ++dt) {
            const int col = dt * 8 + 2 * t;
            store2(out + h + col, dk[dt][2 * r] * (1.0f / LOG2E),
                   dk[dt][2 * r + 1] * (1.0f / LOG2E));
            store2(out + 2 * (size_t)h + col, dv[dt][2 * r], dv[dt][2 * r + 1]);
        }
    }
}

}  // namespace attbm

// ------------------------------------------------------------------------------------------
// Entry points. One signature for all: (qkv, bias or null, dctx, offsets, tokens, h, dh, scale,
// drop_p, drop_scale, drop_ctr, stats, dqkv), grid (ceil(max_len / 64), heads, sequences), 256 threads, dynamic shared memory
// as in the header. `tokens` = offsets[sequences]; `stats` holds 2 * heads * tokens floats,
// written by _dq and read by _dkdv (launch _dq first). `dh` is only read by _any. drop_p 0: no
// dropout (drop_ctr may be null); else drop_ctr holds 4 words per sequence (see Dropout).
// ------------------------------------------------------------------------------------------

#define RRRA_ATTB_ARGS_OF(T, STATS_CONST)                                                       \
    const T *__restrict__ qkv, const float *__restrict__ bias, const float *__restrict__ dctx,  \
        const unsigned *__restrict__ offsets, int tokens, int h, int dh, float scale,           \
        float drop_p, float drop_scale, const unsigned *__restrict__ drop_ctr,                  \
        STATS_CONST float *__restrict__ stats, T *__restrict__ dqkv
#define RRRA_ATTB_ARGS(STATS_CONST) RRRA_ATTB_ARGS_OF(float, STATS_CONST)

// The dkdv kernel's launch bounds: plain, or at least 2 blocks per SM (d32: ptxas otherwise
// squeezes it to 80 registers and spills 4 bytes in the dropout path; with 2 it takes 123, none).
#define RRRA_ATTB_BOUNDS_1 __launch_bounds__(256)
#define RRRA_ATTB_BOUNDS_2 __launch_bounds__(256, 2)

#define RRRA_ATTB_KERNELS(SUFFIX, DMAX, FIXED, DKDV_MIN_BLOCKS)                                 \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        rrra_attention_backward_dq_##SUFFIX(RRRA_ATTB_ARGS()) {                                 \
        attb::backward_dq<DMAX, FIXED>(qkv, bias, dctx, offsets, tokens, h, dh, scale, drop_p,   \
                                       drop_scale, drop_ctr, stats, dqkv);                      \
    }                                                                                           \
    extern "C" __global__ void RRRA_ATTB_BOUNDS_##DKDV_MIN_BLOCKS                               \
        rrra_attention_backward_dkdv_##SUFFIX(RRRA_ATTB_ARGS(const)) {                          \
        attb::backward_dkdv<DMAX, FIXED>(qkv, bias, dctx, offsets, tokens, h, dh, scale, drop_p, \
                                         drop_scale, drop_ctr, stats, dqkv);                    \
    }

RRRA_ATTB_KERNELS(f32_d32, 32, true, 2)
RRRA_ATTB_KERNELS(f32_d64, 64, true, 1)
RRRA_ATTB_KERNELS(f32_d128, 128, true, 1)
RRRA_ATTB_KERNELS(f32_any, 128, false, 1)

// The tensor-core pair (attbm): the same signature (`dh` unused), 128 threads, static shared
// memory only, the same grid; `stats` holds LSE in log2 units, for these two kernels only.
// _bf16: QKV and dQKV in bf16 (the mixed-precision step's), dctx and stats f32; the f32 twin is
// the tests' bridge to the f32 pair.
#define RRRA_ATTB_MMA_PAIR(DH, SUFFIX, T)                                                       \
    extern "C" __global__ void __launch_bounds__(128)                                           \
        rrra_attention_backward_dq_mma##SUFFIX##_d##DH(RRRA_ATTB_ARGS_OF(T, )) {                \
        attbm::backward_dq<DH>(qkv, bias, dctx, offsets, tokens, h, scale, drop_p, drop_scale,   \
                               drop_ctr, stats, dqkv);                                          \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(128)                                           \
        rrra_attention_backward_dkdv_mma##SUFFIX##_d##DH(RRRA_ATTB_ARGS_OF(T, const)) {         \
        attbm::backward_dkdv<DH>(qkv, bias, dctx, offsets, tokens, h, scale, drop_p,             \
                                 drop_scale, drop_ctr, stats, dqkv);                            \
    }
#define RRRA_ATTB_MMA_KERNELS(DH)                                                               \
    RRRA_ATTB_MMA_PAIR(DH, , float)                                                             \
    RRRA_ATTB_MMA_PAIR(DH, _bf16, bf16)

RRRA_ATTB_MMA_KERNELS(32)
RRRA_ATTB_MMA_KERNELS(64)
RRRA_ATTB_MMA_KERNELS(128)
