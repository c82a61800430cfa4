// Shared device helpers: warp and block reductions.
#pragma once

#define RRRA_WARP 32

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = RRRA_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
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
