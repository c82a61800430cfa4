// rrra_pool_{mean,cls,max}_f32: one vector per packed sequence from the last hidden states,
// [tokens x h] f32 -> [sequences x h] f32, optionally scaled to unit L2 norm (norm floored at
// 1e-12, as cpu::math::l2_normalize and torch's normalize do). Matches model::pooling: mean over
// the sequence's rows, its first row (CLS), or the element-wise max. An empty sequence pools to
// the zero vector.
//
// Design: one 256-thread block per sequence (h <= 1024, h % 4 == 0). For mean and max, warp w
// of the 8 reduces rows w, w + 8, ... into registers (lane l owns float4 chunks l, l + 32, ...: each row
// is one coalesced 16-byte-per-lane sweep), the 8 warp partials meet in shared memory and are
// combined in a fixed order (deterministic); CLS copies row 0. One block reduction of the
// squares gives the norm; each thread then rescales the values it wrote itself (no barrier).
//
// Roofline: reads the hidden states once (4 B per element), writes sequences x h floats: the
// mean over 16384 x 768 tokens moves 50 MB, >= 12 us at 4.3 TB/s. With few long sequences
// (32 x 512) only 32 SMs work. Measured on an H200 (mean + L2): 22 us for 128 x 128 tokens
// (2.3 TB/s), 52 us for 32 x 512 (1 TB/s). CLS reads one row per sequence.
#include "bert_common.cuh"

enum PoolMode { POOL_MEAN, POOL_CLS, POOL_MAX };

constexpr int POOL_WARPS = 8;
constexpr int POOL_MAX_CHUNKS = 8;  // float4 chunks per lane: h <= 8 * 32 * 4 = 1024

template <PoolMode MODE>
__device__ __forceinline__ void pool(const float* __restrict__ hidden,
                                     const unsigned* __restrict__ offsets, int h, int normalize,
                                     float* __restrict__ out) {
    __shared__ float4 part[POOL_WARPS][POOL_MAX_CHUNKS * RRRA_WARP];
    // float4 chunks: a width past them or not a multiple of 4 is a host/kernel mismatch, loudly
    if (h > 4 * RRRA_WARP * POOL_MAX_CHUNKS || h % 4 != 0) __trap();
    const int s = blockIdx.x;
    const int start = (int)offsets[s];
    const int len = (int)offsets[s + 1] - start;
    const int h4 = h / 4;
    const int warp = threadIdx.x / RRRA_WARP, lane = threadIdx.x % RRRA_WARP;
    const int warps = min((int)blockDim.x / RRRA_WARP, POOL_WARPS);
    const float* rows = hidden + (size_t)start * h;
    const float init = MODE == POOL_MAX ? RRRA_NEG_INF : 0.0f;

    if (MODE != POOL_CLS) {
        float4 acc[POOL_MAX_CHUNKS];
#pragma unroll
        for (int j = 0; j < POOL_MAX_CHUNKS; ++j) acc[j] = make_float4(init, init, init, init);
#pragma unroll 2
        for (int r = warp; r < len; r += warps) {
            const float* row = rows + (size_t)r * h;
#pragma unroll
            for (int j = 0; j < POOL_MAX_CHUNKS; ++j) {
                const int c4 = lane + RRRA_WARP * j;
                if (c4 < h4) {
                    const float4 v = load4(row + 4 * c4);
                    if (MODE == POOL_MEAN) {
                        acc[j] = add4(acc[j], v);
                    } else {
                        acc[j] = make_float4(fmaxf(acc[j].x, v.x), fmaxf(acc[j].y, v.y),
                                             fmaxf(acc[j].z, v.z), fmaxf(acc[j].w, v.w));
                    }
                }
            }
        }
#pragma unroll
        for (int j = 0; j < POOL_MAX_CHUNKS; ++j) {
            const int c4 = lane + RRRA_WARP * j;
            if (c4 < h4 && warp < warps) part[warp][c4] = acc[j];
        }
        __syncthreads();
    }

    float* o = out + (size_t)s * h;
    float ss = 0.0f;
    for (int c4 = threadIdx.x; c4 < h4; c4 += blockDim.x) {
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (len > 0) {
            if (MODE == POOL_CLS) {
                v = load4(rows + 4 * c4);
            } else {
                v = part[0][c4];
                for (int w = 1; w < warps; ++w) {
                    const float4 p = part[w][c4];
                    if (MODE == POOL_MEAN) {
                        v = add4(v, p);
                    } else {
                        v = make_float4(fmaxf(v.x, p.x), fmaxf(v.y, p.y), fmaxf(v.z, p.z),
                                        fmaxf(v.w, p.w));
                    }
                }
                if (MODE == POOL_MEAN) v = scale4(v, 1.0f / (float)len);
            }
        }
        store4(o + 4 * c4, v);
        ss += (v.x * v.x + v.y * v.y) + (v.z * v.z + v.w * v.w);
    }
    if (normalize) {  // uniform across the block: every thread reaches block_sum
        const float inv = 1.0f / fmaxf(sqrtf(block_sum(ss)), 1e-12f);
        for (int c4 = threadIdx.x; c4 < h4; c4 += blockDim.x)
            store4(o + 4 * c4, scale4(load4(o + 4 * c4), inv));
    }
}

#define RRRA_POOL(NAME, MODE)                                                                  \
    extern "C" __global__ void __launch_bounds__(POOL_WARPS * RRRA_WARP) rrra_pool_##NAME##_f32( \
        const float* __restrict__ hidden, const unsigned* __restrict__ offsets, int sequences,  \
        int h, int normalize, float* __restrict__ out) {                                       \
        if ((int)blockIdx.x < sequences && h <= POOL_MAX_CHUNKS * RRRA_WARP * 4)               \
            pool<MODE>(hidden, offsets, h, normalize, out);                                    \
    }

RRRA_POOL(mean, POOL_MEAN)
RRRA_POOL(cls, POOL_CLS)
RRRA_POOL(max, POOL_MAX)
