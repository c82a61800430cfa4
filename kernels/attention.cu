// rrra_attention_varlen_*: bidirectional multi-head attention over packed variable-length
// sequences, ctx_h = softmax(Q_h K_h^T / sqrt(dh)) V_h, fused (FlashAttention-style): scores
// live in registers and a running max and sum are kept per query row (online softmax), so the
// len x len matrix never reaches global memory.
//
// Layout: Q, K, V are read in place from the fused QKV projection, [tokens x 3h] (Q | K | V
// columns, head `hd` at columns hd*dh .. hd*dh + dh of each), *without* its bias, which is added
// here: K's and Q's as they are loaded, V's once at the end (softmax rows sum to 1, so
// sum_j p_j (v_j + b) = sum_j p_j v_j + b). Output ctx is [tokens x h]. Sequence s owns rows
// offsets[s] .. offsets[s + 1]; the batch is packed with no padding rows, and that packing *is*
// the attention mask: a block only ever reads keys of its own sequence, which is exactly what an
// additive -inf mask over padding computes. Keys of a partial last tile are masked to -inf.
//
// Grid: (query tiles, heads, sequences); a block whose tile starts past its sequence's end exits
// at once (batches bucketed by length waste little). Scores are computed in log2 units (Q is
// pre-scaled by log2(e)/sqrt(dh)) so the softmax uses exp2f: exp2(log2e (s - m)) = exp(s - m).
//
// Variants:
// * rrra_attention_varlen_f32_d{32,64,128} (f32 path), SIMT f32: 4 warps, 64 queries per
//   block, K/V tiles of 64 keys (32 for dh 128) in shared memory. Lane (rg, cg) = (lane/8,
//   lane%8) of warp w owns 4 query rows (w*16 + rg*4 ..) and, per tile, keys cg, cg+8, ...:
//   each step loads 4 Q float4s (broadcast) and 8 K float4s (conflict-free: row stride dh + 4)
//   for 128 FMAs. P goes through a per-warp transposed shared tile so the lane can accumulate
//   its 4 rows x dh/8 output columns from V (float4 loads of 8 distinct addresses per warp).
//   Dynamic shared memory: 46 KB (d32), 70 KB (d64), 75.5 KB (d128); the kernel traps if
//   launched with less than it needs.
// * rrra_attention_varlen_bf16_d{32,64,128} (bf16 path), tensor cores: mma.sync m16n8k16 bf16
//   with f32 accumulation (FlashAttention-2 structure). 4 warps x 16 query rows, key tiles of
//   64 (32 for dh 128). Q fragments stay in registers for the whole block; S = Q K^T
//   accumulates in f32 registers, is masked and exponentiated there, and is re-packed as bf16 A
//   fragments for O += P V without leaving registers. K and V tiles are raw 16-byte cp.async
//   copies, double-buffered (tile i + 1 streams in while tile i computes), stored row-major with
//   a 16-byte row skew so every ldmatrix (plain for K, .trans for V) is conflict-free. K's bias
//   is dropped: it adds q . b_k to every score of a row, which softmax cancels exactly.
//   20-36 KB static shared memory.
// * rrra_attention_train_mma_bf16_d{32,64,128} (the training forward of GemmMath::Bf16): the
//   bf16 kernel's tensor-core structure on the training step's bf16 QKV and ctx, with dropout
//   on the probabilities (the CPU's masks). Tiles go through registers (x + bias in f32,
//   rounded to bf16) into single-buffered shared memory, every bias added on load; 10-18 KB
//   static shared memory. rrra_attention_train_mma_d{32,64,128} is the same kernel on f32 QKV
//   and ctx, the bridge by which tests hold it to the f32 kernels. See attention_train_mma.
// * rrra_attention_varlen_{f32,bf16}_any: any head dim <= 128 (e.g. 8 or 16 in tiny models), one
//   warp per query, 32 keys per step with one key per lane. Simple and slow: a fallback only.
//
// Roofline (per layer; h = heads * dh): 4 * sum(len^2) * h flops; at least the QKV matrix read
// once and ctx written once, 4h values per token: 8h B in bf16 (16h B in f32). BERT-base,
// 128 x 128 tokens: 6.4 GFLOP and 100 MB (bf16): ~23 us of HBM at 4.3 TB/s vs ~8 us of
// tensor-core math at 790 TFLOP/s, so the bf16 kernel is memory/latency bound at len 128 and
// compute bound at 512 (32 x 512: 25.8 GFLOP, ~33 us at peak). The f32 SIMT kernel is FMA
// bound: 6.4 GFLOP at 67 TFLOP/s is >= 96 us. Measured on an H200 (dh 64, per layer): bf16
// 61 us at 128 x 128 (106 TFLOP/s, 1.7 TB/s) and 160 us at 32 x 512 (161 TFLOP/s); f32 275 us
// (23 TFLOP/s) and 814 us (32 TFLOP/s). Next steps for bf16: wgmma with TMA-fed tiles, and
// 128-query blocks.
//
// The training kernel reads 6h B of bf16 QKV and writes 2h B per token (the bf16 kernel's
// bytes: 100 MB, ~23 us of HBM at 128 x 128; twice that for the f32 twin) and adds one
// Philox4x32-10 block (~60 integer ops) per probability with dropout, against 4 dh tensor-core
// flops: at dh 64 the dropout mask, not the math, is its likely bound. It replaces the f32 SIMT
// kernels in the bf16 step: the tiled one without dropout (275 us above) and, with dropout,
// rrra_train_attention_dropout_f32, one warp per query that re-reads K and V from L2 for every
// query.
#include "bert_common.cuh"
#include "mma.cuh"
#include "philox.cuh"

// Head-specific base pointers of one sequence in the fused QKV matrix.
template <typename T>
struct HeadView {
    const T* q;
    const T* k;
    const T* v;
    const float* qb;
    const float* kb;
    const float* vb;
    size_t ld;  // 3h
    __device__ HeadView(const T* qkv, const float* bias, size_t start, int h, int head, int dh) {
        ld = 3 * (size_t)h;
        q = qkv + start * ld + (size_t)head * dh;
        k = q + h;
        v = q + 2 * (size_t)h;
        qb = bias + (size_t)head * dh;
        kb = qb + h;
        vb = qb + 2 * (size_t)h;
    }
};

// ------------------------------------------------------------------------------------------
// SIMT tiled kernel (f32)
// ------------------------------------------------------------------------------------------

template <int DH>
struct SimtTile {
    static constexpr int WARPS = 4;
    static constexpr int BQ = 16 * WARPS;           // queries per block
    static constexpr int BK = DH == 128 ? 32 : 64;  // keys per shared tile
    static constexpr int KPL = BK / 8;              // keys per lane
    static constexpr int D4 = DH / 32;              // output float4 chunks per lane
    static constexpr int QS = DH + 4;               // Q and K row stride (floats)
    static constexpr int PS = 20;                   // P^T row stride: 16 rows + 4 pad
    // Mirrored in src/device/encoder.rs (simt_attention_smem_bytes).
    static constexpr int SMEM_FLOATS = BQ * QS + BK * QS + BK * DH + WARPS * BK * PS;
};

template <int DH>
__device__ __forceinline__ void attention_simt(const float* __restrict__ qkv,
                                               const float* __restrict__ bias,
                                               const unsigned* __restrict__ offsets, int h,
                                               float scale_log2e, float* __restrict__ ctx) {
    using C = SimtTile<DH>;
    RRRA_DYNAMIC_SMEM(16, float4, rrra_attn_smem);
    // a host/kernel mismatch, loudly
    if (dynamic_smem_bytes() < C::SMEM_FLOATS * sizeof(float)) __trap();
    float* Qs = reinterpret_cast<float*>(rrra_attn_smem);
    float* Ks = Qs + C::BQ * C::QS;
    float* Vs = Ks + C::BK * C::QS;
    float* Ps = Vs + C::BK * DH;

    const int start = (int)offsets[blockIdx.z];
    const int len = (int)offsets[blockIdx.z + 1] - start;
    const int q0 = blockIdx.x * C::BQ;
    if (q0 >= len) return;  // uniform per block, before any barrier
    const int tid = threadIdx.x, warp = tid / RRRA_WARP, lane = tid % RRRA_WARP;
    const int rg = lane >> 3, cg = lane & 7;
    const HeadView<float> hv(qkv, bias, start, h, blockIdx.y, DH);
    const size_t ld = hv.ld;

    // Q tile, biased and pre-scaled; rows past the end are zero (their outputs are not written).
    for (int i = tid; i < C::BQ * DH / 4; i += blockDim.x) {
        const int r = i / (DH / 4), c = 4 * (i % (DH / 4));
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (q0 + r < len)
            v = scale4(add4(load4(hv.q + (size_t)(q0 + r) * ld + c), load4(hv.qb + c)), scale_log2e);
        store4(Qs + r * C::QS + c, v);
    }

    float4 o[4][C::D4];
    float m[4], l[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        m[r] = RRRA_NEG_INF;
        l[r] = 0.0f;
#pragma unroll
        for (int i = 0; i < C::D4; ++i) o[r][i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    float* Pw = Ps + warp * C::BK * C::PS;
    const int row0 = warp * 16 + rg * 4;  // the lane's first query row within the tile

    for (int k0 = 0; k0 < len; k0 += C::BK) {
        __syncthreads();  // the previous tile's K and V are consumed (and Q is written)
        for (int i = tid; i < C::BK * DH / 4; i += blockDim.x) {
            const int r = i / (DH / 4), c = 4 * (i % (DH / 4));
            float4 kv = make_float4(0.0f, 0.0f, 0.0f, 0.0f), vv = kv;
            if (k0 + r < len) {
                kv = add4(load4(hv.k + (size_t)(k0 + r) * ld + c), load4(hv.kb + c));
                vv = load4(hv.v + (size_t)(k0 + r) * ld + c);
            }
            store4(Ks + r * C::QS + c, kv);
            store4(Vs + r * DH + c, vv);
        }
        __syncthreads();

        float sc[4][C::KPL];
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int j = 0; j < C::KPL; ++j) sc[r][j] = 0.0f;
#pragma unroll 4
        for (int d = 0; d < DH; d += 4) {
            float4 q[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) q[r] = load4(Qs + (row0 + r) * C::QS + d);
#pragma unroll
            for (int j = 0; j < C::KPL; ++j) {
                const float4 k = load4(Ks + (cg + 8 * j) * C::QS + d);
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    sc[r][j] = fmaf(q[r].x, k.x, sc[r][j]);
                    sc[r][j] = fmaf(q[r].y, k.y, sc[r][j]);
                    sc[r][j] = fmaf(q[r].z, k.z, sc[r][j]);
                    sc[r][j] = fmaf(q[r].w, k.w, sc[r][j]);
                }
            }
        }

        // Online softmax. Key 0 of the tile is always valid, so every row max is finite and
        // the first tile's rescale factor is exp2(-inf) = 0.
        const int kmax = min(C::BK, len - k0);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            float mx = RRRA_NEG_INF;
#pragma unroll
            for (int j = 0; j < C::KPL; ++j) {
                if (cg + 8 * j >= kmax) sc[r][j] = RRRA_NEG_INF;
                mx = fmaxf(mx, sc[r][j]);
            }
            // the 8 lanes of a row group differ in the low 3 lane bits
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
            const float mn = fmaxf(m[r], mx);
            const float alpha = exp2f(m[r] - mn);
            m[r] = mn;
            l[r] *= alpha;  // lane-partial sum over its own keys; reduced once at the end
#pragma unroll
            for (int i = 0; i < C::D4; ++i) o[r][i] = scale4(o[r][i], alpha);
#pragma unroll
            for (int j = 0; j < C::KPL; ++j) {
                sc[r][j] = exp2f(sc[r][j] - mn);
                l[r] += sc[r][j];
            }
        }
        // P^T of the warp's 16 rows: Pw[key][row]
#pragma unroll
        for (int j = 0; j < C::KPL; ++j)
            store4(Pw + (cg + 8 * j) * C::PS + rg * 4,
                   make_float4(sc[0][j], sc[1][j], sc[2][j], sc[3][j]));
        __syncwarp();
#pragma unroll 4
        for (int k = 0; k < kmax; ++k) {
            const float4 p = load4(Pw + k * C::PS + rg * 4);
#pragma unroll
            for (int i = 0; i < C::D4; ++i) {
                const float4 v = load4(Vs + k * DH + cg * 4 + 32 * i);
                o[0][i] = add4(o[0][i], scale4(v, p.x));
                o[1][i] = add4(o[1][i], scale4(v, p.y));
                o[2][i] = add4(o[2][i], scale4(v, p.z));
                o[3][i] = add4(o[3][i], scale4(v, p.w));
            }
        }
        __syncwarp();  // Pw is rewritten by the next tile
    }

#pragma unroll
    for (int r = 0; r < 4; ++r) {
        float lt = l[r];
        lt += __shfl_xor_sync(0xffffffffu, lt, 1);
        lt += __shfl_xor_sync(0xffffffffu, lt, 2);
        lt += __shfl_xor_sync(0xffffffffu, lt, 4);
        const int q = q0 + row0 + r;
        if (q < len) {
            const float inv = 1.0f / lt;
            float* out = ctx + (size_t)(start + q) * h + (size_t)blockIdx.y * DH;
#pragma unroll
            for (int i = 0; i < C::D4; ++i) {
                const int c = cg * 4 + 32 * i;
                store4(out + c, add4(scale4(o[r][i], inv), load4(hv.vb + c)));
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Tensor-core kernel (bf16): mma.sync.m16n8k16, f32 accumulation
// ------------------------------------------------------------------------------------------

template <int DH>
struct MmaTile {
    static constexpr int WARPS = 4;
    static constexpr int BQ = 16 * WARPS;           // queries per block
    static constexpr int BK = DH == 128 ? 32 : 64;  // keys per tile (keeps 2 stages < 48 KB)
    static constexpr int KS = DH + 8;               // K / V tile row stride (bf16): 16 B skew
    static constexpr int TILE = BK * KS;            // bf16 elements of one K or V tile
};


// One key tile of the online softmax, for the warp's rows g (m0, l0) and g + 8 (m1, l1): keys
// at kmax and past it masked to -inf in the S tile, the running row maxima raised to the tile's
// (over the 4 lanes that share a row), and the sums and the output accumulator rescaled by
// exp2(old max - new max). Key 0 of a tile is in range, so the maxima are finite.
template <int DH, int BK>
__device__ __forceinline__ void online_softmax_rescale(float (&sacc)[BK / 8][4], int kmax,
                                                       float& m0, float& m1, float& l0,
                                                       float& l1, float (&oacc)[DH / 8][4]) {
    const int t = (threadIdx.x % RRRA_WARP) & 3;
    float mx0 = RRRA_NEG_INF, mx1 = RRRA_NEG_INF;
#pragma unroll
    for (int nt = 0; nt < BK / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            if (nt * 8 + 2 * t + e >= kmax) {
                sacc[nt][e] = RRRA_NEG_INF;
                sacc[nt][2 + e] = RRRA_NEG_INF;
            }
            mx0 = fmaxf(mx0, sacc[nt][e]);
            mx1 = fmaxf(mx1, sacc[nt][2 + e]);
        }
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    const float a0 = exp2f(m0 - mn0), a1 = exp2f(m1 - mn1);
    m0 = mn0;
    m1 = mn1;
    l0 *= a0;
    l1 *= a1;
#pragma unroll
    for (int dt = 0; dt < DH / 8; ++dt) {
        oacc[dt][0] *= a0;
        oacc[dt][1] *= a0;
        oacc[dt][2] *= a1;
        oacc[dt][3] *= a1;
    }
}

template <int DH>
__device__ __forceinline__ void attention_mma(const bf16* __restrict__ qkv,
                                              const float* __restrict__ bias,
                                              const unsigned* __restrict__ offsets, int h,
                                              float scale_log2e, bf16* __restrict__ ctx) {
    using C = MmaTile<DH>;
    // Two stages of K and V tiles, both row-major [key][dim]: the tile for step i + 1 streams
    // in (cp.async) while step i computes.
    __shared__ __align__(16) bf16 Ks[2][C::TILE];
    __shared__ __align__(16) bf16 Vs[2][C::TILE];

    const int start = (int)offsets[blockIdx.z];
    const int len = (int)offsets[blockIdx.z + 1] - start;
    const int q0 = blockIdx.x * C::BQ;
    if (q0 >= len) return;  // uniform per block, before any barrier
    const int tid = threadIdx.x, warp = tid / RRRA_WARP, lane = tid % RRRA_WARP;
    const int g = lane >> 2, t = lane & 3;
    const HeadView<bf16> hv(qkv, bias, start, h, blockIdx.y, DH);
    const size_t ld = hv.ld;

    // K's bias is not added: it shifts every score of a query row by the same q . b_k, which
    // softmax cancels exactly, so K tiles are raw copies.
    auto load_tile = [&](int stage, int k0) {
        for (int i = tid; i < C::BK * DH / 8; i += blockDim.x) {
            const int r = i / (DH / 8), c = 8 * (i % (DH / 8));
            const bool valid = k0 + r < len;
            const size_t row = valid ? (size_t)(k0 + r) : 0;  // in bounds even when unused
            cp_async_16(&Ks[stage][r * C::KS + c], hv.k + row * ld + c, valid);
            cp_async_16(&Vs[stage][r * C::KS + c], hv.v + row * ld + c, valid);
        }
    };
    load_tile(0, 0);
    cp_async_commit();

    // Q as A fragments for the whole block: rows r0 (fragment row g) and r1 (row g + 8),
    // biased and pre-scaled in f32, rounded once.
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
    unsigned qf[DH / 16][4];
#pragma unroll
    for (int ks = 0; ks < DH / 16; ++ks) {
#pragma unroll
        for (int f = 0; f < 4; ++f) {
            const int r = (f & 1) ? r1 : r0;
            const int c = ks * 16 + 2 * t + ((f & 2) ? 8 : 0);
            unsigned u = 0;
            if (r < len) {
                const float2 x =
                    unpack_bf16x2(*reinterpret_cast<const unsigned*>(hv.q + (size_t)r * ld + c));
                u = pack_bf16x2((x.x + hv.qb[c]) * scale_log2e, (x.y + hv.qb[c + 1]) * scale_log2e);
            }
            qf[ks][f] = u;
        }
    }

    float oacc[DH / 8][4];
#pragma unroll
    for (int dt = 0; dt < DH / 8; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) oacc[dt][e] = 0.0f;
    float m0 = RRRA_NEG_INF, m1 = RRRA_NEG_INF, l0 = 0.0f, l1 = 0.0f;

    for (int k0 = 0, stage = 0; k0 < len; k0 += C::BK, stage ^= 1) {
        // Prefetch the next tile into the other stage (consumed by the previous step: see the
        // barrier at the end of the loop), then wait for this step's tile.
        if (k0 + C::BK < len) load_tile(stage ^ 1, k0 + C::BK);
        cp_async_commit();  // possibly empty: keeps the group count uniform
        cp_async_wait<1>();
        __syncthreads();
        const bf16* Kt = Ks[stage];
        const bf16* Vt = Vs[stage];

        // S = Q K^T for the warp's 16 rows x BK keys, in log2 units. One ldmatrix.x4 gives the
        // B fragments of 8 keys for two 16-dim steps.
        float sacc[C::BK / 8][4];
        rows_times_tile<DH, C::BK>(sacc, qf, Kt);

        const int kmax = len - k0;
        online_softmax_rescale<DH, C::BK>(sacc, kmax, m0, m1, l0, l1, oacc);
#pragma unroll
        for (int nt = 0; nt < C::BK / 8; ++nt) {
            sacc[nt][0] = exp2f(sacc[nt][0] - m0);
            sacc[nt][1] = exp2f(sacc[nt][1] - m0);
            sacc[nt][2] = exp2f(sacc[nt][2] - m1);
            sacc[nt][3] = exp2f(sacc[nt][3] - m1);
            l0 += sacc[nt][0] + sacc[nt][1];
            l1 += sacc[nt][2] + sacc[nt][3];
        }

        // O += P V: the S accumulator pairs of n-tiles 2kk and 2kk+1 are exactly the A
        // fragment of the 16-key step kk; one ldmatrix.x4.trans gives the B fragments of two
        // 8-dim tiles (matrices: keys +0 / +8 of dims dt, then of dims dt + 1).
        acc_times_tile<DH, C::BK>(oacc, sacc, Vt);
        __syncthreads();  // this stage is consumed before the next step refills it
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
    bf16* out0 = ctx + (size_t)(start + r0) * h + (size_t)blockIdx.y * DH;
    bf16* out1 = out0 + 8 * (size_t)h;
#pragma unroll
    for (int dt = 0; dt < DH / 8; ++dt) {
        const int c = dt * 8 + 2 * t;
        const float b0 = hv.vb[c], b1 = hv.vb[c + 1];
        if (r0 < len)
            *reinterpret_cast<unsigned*>(out0 + c) =
                pack_bf16x2(oacc[dt][0] * inv0 + b0, oacc[dt][1] * inv0 + b1);
        if (r1 < len)
            *reinterpret_cast<unsigned*>(out1 + c) =
                pack_bf16x2(oacc[dt][2] * inv1 + b0, oacc[dt][3] * inv1 + b1);
    }
}

// ------------------------------------------------------------------------------------------
// Training forward on tensor cores: f32 or bf16 in and out, bf16 mma.sync, optional dropout
// ------------------------------------------------------------------------------------------

// attention_mma's structure for the training forward in mixed precision (GemmMath::Bf16): QKV
// and ctx are T, bf16 in the mixed-precision step (its activations are stored in bf16) and f32
// in the twin that tests hold against the f32 kernels on the same inputs. Tiles are loaded
// through registers (x + bias in f32, rounded to bf16 once) instead of cp.async,
// single-buffered (other blocks on the SM hide the latency). Every bias is added on load, V's
// too: with dropout a row of kept probabilities no longer sums to 1, so V's bias cannot move to
// the end as in attention_mma. Dropout (p > 0) is the CPU's AttnDropout mask for mask:
// probability (head, i, j) of a sequence uses word (head * len + i) * len + j of its stream
// (4 words per sequence in `words`); the softmax sum l takes the probabilities before dropout,
// O takes them after, each kept one scaled by keep_scale = 1 / (1 - p).
template <int DH, typename T>
__device__ __forceinline__ void attention_train_mma(const T* __restrict__ qkv,
                                                    const float* __restrict__ bias,
                                                    const unsigned* __restrict__ offsets,
                                                    const unsigned* __restrict__ words, int h,
                                                    float scale_log2e, float p, float keep_scale,
                                                    T* __restrict__ ctx) {
    using C = MmaTile<DH>;
    __shared__ __align__(16) bf16 Ks[C::TILE];
    __shared__ __align__(16) bf16 Vs[C::TILE];

    const int start = (int)offsets[blockIdx.z];
    const int len = (int)offsets[blockIdx.z + 1] - start;
    const int q0 = blockIdx.x * C::BQ;
    if (q0 >= len) return;  // uniform per block, before any barrier
    const int tid = threadIdx.x, warp = tid / RRRA_WARP, lane = tid % RRRA_WARP;
    const int g = lane >> 2, t = lane & 3;
    const HeadView<T> hv(qkv, bias, start, h, blockIdx.y, DH);
    const size_t ld = hv.ld;
    const unsigned* w = words + 4 * blockIdx.z;
    const bool dropout = p > 0.0f;

    // K and V rows k0 .. k0 + BK as bf16 (x + b), zero rows past the end: load_bf16_tile's
    // work for both tiles in one loop (two calls of it spill at dh 128).
    auto load_tile = [&](int k0) {
        for (int i = tid; i < C::BK * DH / 4; i += blockDim.x) {
            const int r = i / (DH / 4), c = 4 * (i % (DH / 4));
            uint2 kv = make_uint2(0u, 0u), vv = make_uint2(0u, 0u);
            if (k0 + r < len) {
                const size_t at = (size_t)(k0 + r) * ld + c;
                const float4 k = load4(hv.k + at), kb = load4(hv.kb + c);
                const float4 v = load4(hv.v + at), vb = load4(hv.vb + c);
                kv = make_uint2(pack_bf16x2(k.x + kb.x, k.y + kb.y),
                                pack_bf16x2(k.z + kb.z, k.w + kb.w));
                vv = make_uint2(pack_bf16x2(v.x + vb.x, v.y + vb.y),
                                pack_bf16x2(v.z + vb.z, v.w + vb.w));
            }
            *reinterpret_cast<uint2*>(&Ks[r * C::KS + c]) = kv;
            *reinterpret_cast<uint2*>(&Vs[r * C::KS + c]) = vv;
        }
    };

    // Q as A fragments, biased and pre-scaled in f32, rounded once (as attention_mma).
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
    unsigned qf[DH / 16][4];
    load_a_frags<DH>(qf, hv.q, ld, r0, r1, len, hv.qb, scale_log2e);

    float oacc[DH / 8][4];
#pragma unroll
    for (int dt = 0; dt < DH / 8; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) oacc[dt][e] = 0.0f;
    float m0 = RRRA_NEG_INF, m1 = RRRA_NEG_INF, l0 = 0.0f, l1 = 0.0f;
    // word index of probability (row, 0) of this head: (head * len + row) * len
    const unsigned long long base0 = ((unsigned long long)blockIdx.y * len + r0) * len;
    const unsigned long long base1 = base0 + 8ull * len;

    for (int k0 = 0; k0 < len; k0 += C::BK) {
        __syncthreads();  // the previous tile is consumed
        load_tile(k0);
        __syncthreads();

        float sacc[C::BK / 8][4];
        rows_times_tile<DH, C::BK>(sacc, qf, Ks);

        const int kmax = len - k0;
        online_softmax_rescale<DH, C::BK>(sacc, kmax, m0, m1, l0, l1, oacc);
#pragma unroll
        for (int nt = 0; nt < C::BK / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const bool hi = e >= 2;
                sacc[nt][e] = exp2f(sacc[nt][e] - (hi ? m1 : m0));
                if (hi) l1 += sacc[nt][e];
                else l0 += sacc[nt][e];
                const int j = k0 + nt * 8 + 2 * t + (e & 1);
                // rows past the end are never stored, keys past it are already 0
                if (dropout && j < len && (hi ? r1 : r0) < len)
                    sacc[nt][e] = rrra_uniform_at((hi ? base1 : base0) + j, w) < p
                                      ? 0.0f
                                      : sacc[nt][e] * keep_scale;
            }
        }

        // O += P~ V, as attention_mma
        acc_times_tile<DH, C::BK>(oacc, sacc, Vs);
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
    T* out0 = ctx + (size_t)(start + r0) * h + (size_t)blockIdx.y * DH;
    T* out1 = out0 + 8 * (size_t)h;
#pragma unroll
    for (int dt = 0; dt < DH / 8; ++dt) {
        const int c = dt * 8 + 2 * t;
        if (r0 < len) store2(out0 + c, oacc[dt][0] * inv0, oacc[dt][1] * inv0);
        if (r1 < len) store2(out1 + c, oacc[dt][2] * inv1, oacc[dt][3] * inv1);
    }
}

// ------------------------------------------------------------------------------------------
// Fallback for any head dim <= 128: one warp per query
// ------------------------------------------------------------------------------------------

constexpr int ROWWISE_WARPS = 4;
constexpr int ROWWISE_MAX_DH = 128;

template <typename T>
__device__ __forceinline__ void attention_rowwise(const T* __restrict__ qkv,
                                                  const float* __restrict__ bias,
                                                  const unsigned* __restrict__ offsets, int h,
                                                  int dh, float scale_log2e, T* __restrict__ ctx) {
    constexpr int DPL = ROWWISE_MAX_DH / RRRA_WARP;
    __shared__ float qs[ROWWISE_WARPS][ROWWISE_MAX_DH];
    const int start = (int)offsets[blockIdx.z];
    const int len = (int)offsets[blockIdx.z + 1] - start;
    const int warp = threadIdx.x / RRRA_WARP, lane = threadIdx.x % RRRA_WARP;
    const int q = blockIdx.x * ROWWISE_WARPS + warp;
    if (dh > ROWWISE_MAX_DH) __trap();  // a host/kernel mismatch, loudly
    if (q >= len) return;               // per warp: only warp-level syncs below
    const HeadView<T> hv(qkv, bias, start, h, blockIdx.y, dh);
    const size_t ld = hv.ld;
    for (int d = lane; d < dh; d += RRRA_WARP)
        qs[warp][d] = (load1(hv.q + (size_t)q * ld + d) + hv.qb[d]) * scale_log2e;
    __syncwarp();

    float o[DPL];
#pragma unroll
    for (int i = 0; i < DPL; ++i) o[i] = 0.0f;
    float m = RRRA_NEG_INF, l = 0.0f;  // uniform across the warp
    for (int k0 = 0; k0 < len; k0 += RRRA_WARP) {
        const int key = k0 + lane;
        float s = RRRA_NEG_INF;
        if (key < len) {
            const T* kr = hv.k + (size_t)key * ld;
            float acc = 0.0f;
            for (int d = 0; d < dh; ++d) acc = fmaf(qs[warp][d], load1(kr + d) + hv.kb[d], acc);
            s = acc;
        }
        const float mn = fmaxf(m, warp_max(s));  // key k0 is valid: finite
        const float alpha = exp2f(m - mn);
        const float p = exp2f(s - mn);
        l = l * alpha + warp_sum(p);
        m = mn;
#pragma unroll
        for (int i = 0; i < DPL; ++i) o[i] *= alpha;
        const int n = min(RRRA_WARP, len - k0);
        for (int j = 0; j < n; ++j) {
            const float pj = __shfl_sync(0xffffffffu, p, j);
            const T* vr = hv.v + (size_t)(k0 + j) * ld;
#pragma unroll
            for (int i = 0; i < DPL; ++i) {
                const int d = lane + RRRA_WARP * i;
                if (d < dh) o[i] = fmaf(pj, load1(vr + d), o[i]);
            }
        }
    }
    const float inv = 1.0f / l;
    T* out = ctx + (size_t)(start + q) * h + (size_t)blockIdx.y * dh;
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
        const int d = lane + RRRA_WARP * i;
        if (d < dh) store1(out + d, o[i] * inv + hv.vb[d]);
    }
}

// ------------------------------------------------------------------------------------------
// Entry points. One signature for all: (qkv, qkv_bias, offsets, h, dh, scale_log2e, ctx),
// grid (query tiles, heads, sequences), 128 threads. Tiles are 64 queries (d32/d64/d128) or 4
// queries (_any); `dh` is only read by _any.
// ------------------------------------------------------------------------------------------

#define RRRA_ATTN_ARGS(T)                                                                       \
    const T *__restrict__ qkv, const float *__restrict__ bias,                                  \
        const unsigned *__restrict__ offsets, int h, int dh, float scale_log2e,                 \
        T *__restrict__ ctx

#define RRRA_ATTN_TILED(DH)                                                                     \
    extern "C" __global__ void __launch_bounds__(128)                                           \
        rrra_attention_varlen_f32_d##DH(RRRA_ATTN_ARGS(float)) {                                \
        attention_simt<DH>(qkv, bias, offsets, h, scale_log2e, ctx);                            \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(128)                                           \
        rrra_attention_varlen_bf16_d##DH(RRRA_ATTN_ARGS(bf16)) {                                \
        attention_mma<DH>(qkv, bias, offsets, h, scale_log2e, ctx);                             \
    }

RRRA_ATTN_TILED(32)
RRRA_ATTN_TILED(64)
RRRA_ATTN_TILED(128)

// The training forward (attention_train_mma): grid and block as the tiled kernels; `words` holds
// 4 Philox words per sequence and is only read when p > 0. _bf16: bf16 QKV and ctx (the
// mixed-precision step's); the f32 twin is the tests' bridge to the f32 kernels.
#define RRRA_ATTN_TRAIN_ARGS(T)                                                                 \
    const T *__restrict__ qkv, const float *__restrict__ bias,                                  \
        const unsigned *__restrict__ offsets, const unsigned *__restrict__ words, int h,        \
        float scale_log2e, float p, float keep_scale, T *__restrict__ ctx
#define RRRA_ATTN_TRAIN(DH)                                                                     \
    extern "C" __global__ void __launch_bounds__(128)                                           \
        rrra_attention_train_mma_d##DH(RRRA_ATTN_TRAIN_ARGS(float)) {                           \
        attention_train_mma<DH>(qkv, bias, offsets, words, h, scale_log2e, p, keep_scale, ctx); \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(128)                                           \
        rrra_attention_train_mma_bf16_d##DH(RRRA_ATTN_TRAIN_ARGS(bf16)) {                       \
        attention_train_mma<DH>(qkv, bias, offsets, words, h, scale_log2e, p, keep_scale, ctx); \
    }

RRRA_ATTN_TRAIN(32)
RRRA_ATTN_TRAIN(64)
RRRA_ATTN_TRAIN(128)

extern "C" __global__ void __launch_bounds__(128)
    rrra_attention_varlen_f32_any(RRRA_ATTN_ARGS(float)) {
    attention_rowwise<float>(qkv, bias, offsets, h, dh, scale_log2e, ctx);
}

extern "C" __global__ void __launch_bounds__(128)
    rrra_attention_varlen_bf16_any(RRRA_ATTN_ARGS(bf16)) {
    attention_rowwise<bf16>(qkv, bias, offsets, h, dh, scale_log2e, ctx);
}
