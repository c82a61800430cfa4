// rrra_l2_normalize_f32: scale each row of a [rows x dim] f32 matrix to unit L2 norm, in place.
//
// Design: one warp per row (embedding rows are 384-1024 floats: a warp covers them with 12-32
// float loads per lane, fully coalesced), float4 loads when dim % 4 == 0, one warp-shuffle
// reduction, no shared memory, no block barrier. Mirrors cpu::math::l2_normalize, including
// the 1e-12 floor on the norm (a zero row stays zero, as torch.nn.functional.normalize does).
//
// Roofline: reads and writes each element once: 8 bytes per element, 2 flops. Purely memory
// bound; on an H200 (4.8 TB/s HBM3e) a 1M x 384 matrix (1.5 GB moved) takes >= 0.32 ms.
#include "common.cuh"

extern "C" __global__ void rrra_l2_normalize_f32(float* __restrict__ x, int rows, int dim) {
    const int warps_per_block = blockDim.x / RRRA_WARP;
    const int row = blockIdx.x * warps_per_block + threadIdx.x / RRRA_WARP;
    const int lane = threadIdx.x % RRRA_WARP;
    if (row >= rows) return;
    float* r = x + (size_t)row * dim;
    float ss = 0.0f;
    if ((dim & 3) == 0) {
        float4* r4 = reinterpret_cast<float4*>(r);
        for (int i = lane; i < dim / 4; i += RRRA_WARP) {
            float4 v = r4[i];
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
        const float inv = 1.0f / fmaxf(sqrtf(warp_sum(ss)), 1e-12f);
        for (int i = lane; i < dim / 4; i += RRRA_WARP) {
            float4 v = r4[i];
            v.x *= inv; v.y *= inv; v.z *= inv; v.w *= inv;
            r4[i] = v;
        }
    } else {
        for (int i = lane; i < dim; i += RRRA_WARP) ss += r[i] * r[i];
        const float inv = 1.0f / fmaxf(sqrtf(warp_sum(ss)), 1e-12f);
        for (int i = lane; i < dim; i += RRRA_WARP) r[i] *= inv;
    }
}
