// Shared device helpers of the BERT encoder kernels: 4-wide loads and stores of f32 or bf16
// activations (math is always f32) and the warp-per-row LayerNorm (the reductions are common.cuh's).
#pragma once

#include <cuda_bf16.h>
#include "common.cuh"

typedef __nv_bfloat16 bf16;

#define RRRA_NEG_INF (-__int_as_float(0x7f800000))

// ---- four consecutive elements as a float4 (f32: 16-byte access; bf16: 8-byte access) ----

__device__ __forceinline__ float4 load4(const float* p) {
    return *reinterpret_cast<const float4*>(p);
}
__device__ __forceinline__ float4 load4(const bf16* p) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
    return make_float4(a.x, a.y, b.x, b.y);
}
__device__ __forceinline__ void store4(float* p, float4 v) {
    *reinterpret_cast<float4*>(p) = v;
}
__device__ __forceinline__ void store4(bf16* p, float4 v) {
    const __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y);  // .x (lower address) = v.x
    const __nv_bfloat162 b = __floats2bfloat162_rn(v.z, v.w);
    uint2 raw;
    raw.x = *reinterpret_cast<const unsigned*>(&a);
    raw.y = *reinterpret_cast<const unsigned*>(&b);
    *reinterpret_cast<uint2*>(p) = raw;
}

__device__ __forceinline__ float load1(const float* p) { return *p; }
__device__ __forceinline__ float load1(const bf16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store1(float* p, float v) { *p = v; }
__device__ __forceinline__ void store1(bf16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ float4 add4(float4 a, float4 b) {
    return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}
__device__ __forceinline__ float4 scale4(float4 a, float s) {
    return make_float4(a.x * s, a.y * s, a.z * s, a.w * s);
}

// ---- LayerNorm of one row held by one warp ----
//
// The row (h elements, h % 4 == 0, h <= 128 * N4) lives in registers: lane `l` holds the float4
// chunks l, l + 32, l + 64, ... (chunk c = elements 4c..4c+3), so every load and store of the
// warp is one contiguous, coalesced 512-byte span. Chunks past the row end are not touched.

__device__ __forceinline__ bool chunk_in_row(int j, int lane, int h) {
    return 4 * (j * RRRA_WARP + lane) < h;
}

// v <- (v - mean) / sqrt(var + eps) * gamma + beta, two-pass mean and variance in f32 (the same
// formula as cpu::math::add_layernorm, summed in another order).
template <int N4>
__device__ __forceinline__ void warp_layernorm(float4 (&v)[N4], int h, int lane,
                                               const float* __restrict__ gamma,
                                               const float* __restrict__ beta, float eps) {
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < N4; ++j)
        if (chunk_in_row(j, lane, h)) s += (v[j].x + v[j].y) + (v[j].z + v[j].w);
    const float mean = warp_sum(s) / (float)h;
    float q = 0.0f;
#pragma unroll
    for (int j = 0; j < N4; ++j) {
        if (chunk_in_row(j, lane, h)) {
            const float a = v[j].x - mean, b = v[j].y - mean, c = v[j].z - mean, d = v[j].w - mean;
            q += (a * a + b * b) + (c * c + d * d);
        }
    }
    const float var = warp_sum(q) / (float)h;
    const float inv = 1.0f / sqrtf(var + eps);
#pragma unroll
    for (int j = 0; j < N4; ++j) {
        if (chunk_in_row(j, lane, h)) {
            const int c = 4 * (j * RRRA_WARP + lane);
            const float4 g = load4(gamma + c), b = load4(beta + c);
            v[j].x = (v[j].x - mean) * inv * g.x + b.x;
            v[j].y = (v[j].y - mean) * inv * g.y + b.y;
            v[j].z = (v[j].z - mean) * inv * g.z + b.z;
            v[j].w = (v[j].w - mean) * inv * g.w + b.w;
        }
    }
}

// Writes the normalised row as f32 and, when `out_bf` is given, as a bf16 copy (the GEMM input
// of the bf16 path; the f32 row stays the residual stream).
template <int N4>
__device__ __forceinline__ void store_row(const float4 (&v)[N4], int h, int lane, float* out,
                                          bf16* out_bf) {
#pragma unroll
    for (int j = 0; j < N4; ++j) {
        if (chunk_in_row(j, lane, h)) {
            const int c = 4 * (j * RRRA_WARP + lane);
            store4(out + c, v[j]);
            if (out_bf != nullptr) store4(out_bf + c, v[j]);
        }
    }
}
