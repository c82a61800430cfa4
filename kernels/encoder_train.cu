// The row-wise steps of the encoder's f32 training forward (src/device/encoder_train.rs), which
// keeps what the backward needs: the pre-LayerNorm sums (the LayerNorm backward recomputes mean
// and variance from them) and the pre-GELU activations. The inference kernels fuse these steps
// and keep nothing; the GEMMs (cuBLAS), attention (kernels/attention.cu) and pooling
// (kernels/pooling.cu) are shared with inference, the backward kernels live in backward.cu and
// attention_backward.cu.
//
//  rrra_train_embed_sum_f32   e = word[id] + pos[position] + type[type id] per token (the sum
//                             before the embedding LayerNorm), one block per sequence
//  rrra_train_layernorm_f32   y = LN(s) row by row (mean, then the centred variance, in f32: the
//                             CPU's two passes), one warp per row
//  rrra_train_bias_residual_f32  y = (y + b) + r in place: the sum entering a LayerNorm
//  rrra_train_bias_gelu_f32   pre = y + b (kept in place), out = GELU(pre) (exact erf)
//  rrra_train_gelu_f32        out = GELU(pre) (the FFN activation, recomputed in backward)
//  rrra_train_add_f32         dst += src (the residual branches of the backward)
//
// Roofline (BERT-base step, 73 728 tokens × 768, FFN 3 072; H200 ~4.3 TB/s): every kernel is a
// stream of a few bytes per element with a handful of flops: the LayerNorm reads and writes
// 8 B/element (0.45 GB, ~0.1 ms), bias + GELU 12 B/element over the FFN (2.7 GB, ~0.6 ms).

#include <stdint.h>

#define THREADS 256

__device__ __forceinline__ float gelu_erf(float x) {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_train_embed_sum_f32(const unsigned* __restrict__ ids, const unsigned* __restrict__ type_ids,
                             const unsigned* __restrict__ offsets, const float* __restrict__ word,
                             const float* __restrict__ pos, const float* __restrict__ types, int h,
                             float* __restrict__ out) {
    const int s = blockIdx.x;
    const long long start = offsets[s], len = (long long)offsets[s + 1] - start;
    for (long long x = threadIdx.x; x < len * h; x += blockDim.x) {
        const long long p = x / h, j = x % h, t = start + p;
        out[t * h + j] = word[(long long)ids[t] * h + j] + pos[p * h + j] +
                         types[(long long)type_ids[t] * h + j];
    }
}

// One warp per row.
extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_train_layernorm_f32(const float* __restrict__ s, const float* __restrict__ gamma,
                             const float* __restrict__ beta, float eps, int rows, int h,
                             float* __restrict__ y) {
    const long long r = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (r >= rows) return;
    const float* x = s + r * h;
    float sum = 0.0f;
    for (int j = lane; j < h; j += 32) sum += x[j];
    const float mean = warp_sum(sum) / (float)h;
    float sq = 0.0f;
    for (int j = lane; j < h; j += 32) {
        const float c = x[j] - mean;
        sq = fmaf(c, c, sq);
    }
    const float var = warp_sum(sq) / (float)h;
    const float inv = 1.0f / sqrtf(var + eps);
    float* out = y + r * h;
    for (int j = lane; j < h; j += 32) out[j] = (x[j] - mean) * inv * gamma[j] + beta[j];
}

extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_train_bias_residual_f32(float* __restrict__ y, const float* __restrict__ b,
                                 const float* __restrict__ r, long long rows, int cols) {
    const long long n = rows * cols;
    for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n;
         x += (long long)gridDim.x * blockDim.x)
        y[x] = (y[x] + b[x % cols]) + r[x];
}

extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_train_bias_gelu_f32(float* __restrict__ pre, const float* __restrict__ b, long long rows,
                             int cols, float* __restrict__ out) {
    const long long n = rows * cols;
    for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n;
         x += (long long)gridDim.x * blockDim.x) {
        const float v = pre[x] + b[x % cols];
        pre[x] = v;
        out[x] = gelu_erf(v);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_train_gelu_f32(const float* __restrict__ pre, long long n, float* __restrict__ out) {
    for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n;
         x += (long long)gridDim.x * blockDim.x)
        out[x] = gelu_erf(pre[x]);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_train_add_f32(float* __restrict__ dst, const float* __restrict__ src, long long n) {
    for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n;
         x += (long long)gridDim.x * blockDim.x)
        dst[x] += src[x];
}
