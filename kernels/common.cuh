// Shared device helpers: warp and block reductions, and the exact (erf) GELU.
#pragma once

#define RRRA_WARP 32

// Dynamic shared memory and its size, through these two names so that the CPU block emulator
// (tools/kernel-emulator/emu.h, which defines RRRA_EMULATOR) can supply its own.
#ifndef RRRA_EMULATOR
#define RRRA_DYNAMIC_SMEM(align, type, name) extern __shared__ __align__(align) type name[]

__device__ __forceinline__ unsigned dynamic_smem_bytes() {
    unsigned dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    return dyn;
}
#endif

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = RRRA_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = RRRA_WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sums in f64, for reductions a result is compared against the CPU's f64 sums in.
__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int o = RRRA_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// GELU as BERT and cpu::math::gelu compute it: 0.5 x (1 + erf(x / sqrt 2)) (erff: <= 2 ulp).
__device__ __forceinline__ float gelu_erf(float x) {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}

// Sum over a block whose size is a multiple of 32 (at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[RRRA_WARP];
    const int lane = threadIdx.x % RRRA_WARP;
    const int warp = threadIdx.x / RRRA_WARP;
    v = warp_sum(v);
    __syncthreads();  // partial may still be read by a previous call
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    const int warps = blockDim.x / RRRA_WARP;
    v = (lane < warps) ? partial[lane] : 0.0f;
    return warp_sum(v);
}
