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
//                             CPU's two passes), one warp per row; _f32_bf16 also writes a bf16
//                             copy of y (the next product's input in the bf16-activation step)
//  rrra_train_bias_residual_f32  y = (y + b) + r in place: the sum entering a LayerNorm
//  rrra_train_bias_dropout_residual_f32  y = dropout(y + b) + r, one block per sequence
//  rrra_train_dropout_f32     dst = dropout(src) per sequence (in place when dst = src): the
//                             embedding dropout, and the masks applied to gradients in backward
//  rrra_train_attention_dropout_f32  attention with dropout on the probabilities, one warp per
//                             (query, head, sequence): scores, softmax, the CPU's mask, P̃·V
//                             (the f32 activations' path; bf16 ones run attention.cu's
//                             rrra_attention_train_mma_bf16_d* instead)
//  rrra_train_bias_gelu_{f32,bf16}  pre = y + b (kept in place), out = GELU(pre) (exact erf)
//  rrra_train_gelu_{f32,bf16}  out = GELU(pre) (the FFN activation, recomputed in backward)
//  rrra_train_to_bf16         dst = bf16(src): working weights, gradients entering bf16 products
//  rrra_train_add_f32         dst += src (the residual branches of the backward)
//
// Dropout: sequence s's element e (row-major within its [len × width] block) is dropped when
// the uniform of word e of its stream (Philox4x32-10 keyed as train::rng::Stream, the four key
// and counter words per sequence given by the host) is below p, else scaled by 1/(1 − p):
// cpu::backward::dropout_inplace exactly. Attention probability (head, i, j) uses word
// (head·len + i)·len + j of the sequence's attention stream, as attention_sequence_train does.
// The attention kernel materialises a row of scores per warp in registers (len ≤ 512) and is
// the f32 training path's when attention dropout is on; without it the inference kernel runs.
//
// The bf16 variants (GemmMath::Bf16, whose kept activations are bf16) do their math in f32 and
// round once on each store.
//
// Roofline (BERT-base step, 73 728 tokens × 768, FFN 3 072; H200 ~4.3 TB/s): every kernel is a
// stream of a few bytes per element with a handful of flops: the LayerNorm reads and writes
// 8 B/element (0.45 GB, ~0.1 ms; 10 B with the bf16 copy), bias + GELU 12 B/element over the
// FFN in f32 (2.7 GB, ~0.6 ms), 6 B in bf16 (1.4 GB, ~0.3 ms).

#include <stdint.h>

#include "bert_common.cuh"
#include "philox.cuh"

#define THREADS 256
#define ATT_WARPS 8
#define ATT_MAX_LEN 512
#define ATT_MAX_DH 128

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

// One warp per row; y_bf (null or [rows x h]) receives a bf16 copy of y.
__device__ __forceinline__ void train_layernorm(const float* __restrict__ s,
                                                const float* __restrict__ gamma,
                                                const float* __restrict__ beta, float eps,
                                                int rows, int h, float* __restrict__ y,
                                                bf16* __restrict__ y_bf) {
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
    for (int j = lane; j < h; j += 32) {
        const float v = (x[j] - mean) * inv * gamma[j] + beta[j];
        out[j] = v;
        if (y_bf != nullptr) store1(y_bf + r * h + j, v);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_train_layernorm_f32(const float* __restrict__ s, const float* __restrict__ gamma,
                             const float* __restrict__ beta, float eps, int rows, int h,
                             float* __restrict__ y) {
    train_layernorm(s, gamma, beta, eps, rows, h, y, nullptr);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_train_layernorm_f32_bf16(const float* __restrict__ s, const float* __restrict__ gamma,
                                  const float* __restrict__ beta, float eps, int rows, int h,
                                  float* __restrict__ y, bf16* __restrict__ y_bf) {
    train_layernorm(s, gamma, beta, eps, rows, h, y, y_bf);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_train_bias_residual_f32(float* __restrict__ y, const float* __restrict__ b,
                                 const float* __restrict__ r, long long rows, int cols) {
    const long long n = rows * cols;
    for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n;
         x += (long long)gridDim.x * blockDim.x)
        y[x] = (y[x] + b[x % cols]) + r[x];
}

// pre = y + b, stored (rounded to T) in place; out = GELU of the stored pre, so the backward,
// which recomputes GELU and its derivative from the stored pre, sees the forward's values.
template <typename T>
__device__ __forceinline__ void train_bias_gelu(T* __restrict__ pre, const float* __restrict__ b,
                                                long long rows, int cols, T* __restrict__ out) {
    const long long n = rows * cols;
    for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n;
         x += (long long)gridDim.x * blockDim.x) {
        store1(pre + x, load1(pre + x) + b[x % cols]);
        store1(out + x, gelu_erf(load1(pre + x)));
    }
}

template <typename T>
__device__ __forceinline__ void train_gelu(const T* __restrict__ pre, long long n,
                                           T* __restrict__ out) {
    for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n;
         x += (long long)gridDim.x * blockDim.x)
        store1(out + x, gelu_erf(load1(pre + x)));
}

extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_train_bias_gelu_f32(float* __restrict__ pre, const float* __restrict__ b, long long rows,
                             int cols, float* __restrict__ out) {
    train_bias_gelu(pre, b, rows, cols, out);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_train_bias_gelu_bf16(bf16* __restrict__ pre, const float* __restrict__ b, long long rows,
                              int cols, bf16* __restrict__ out) {
    train_bias_gelu(pre, b, rows, cols, out);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_train_gelu_f32(const float* __restrict__ pre, long long n, float* __restrict__ out) {
    train_gelu(pre, n, out);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_train_gelu_bf16(const bf16* __restrict__ pre, long long n, bf16* __restrict__ out) {
    train_gelu(pre, n, out);
}

// dst = bf16(src): the bf16 working weights from the f32 masters, and the f32 gradients that
// enter a bf16 product.
extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_train_to_bf16(const float* __restrict__ src, long long n, bf16* __restrict__ dst) {
    for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n;
         x += (long long)gridDim.x * blockDim.x)
        store1(dst + x, src[x]);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_train_add_f32(float* __restrict__ dst, const float* __restrict__ src, long long n) {
    for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n;
         x += (long long)gridDim.x * blockDim.x)
        dst[x] += src[x];
}

extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_train_bias_dropout_residual_f32(float* __restrict__ y, const float* __restrict__ b,
                                         const float* __restrict__ r,
                                         const unsigned* __restrict__ offsets,
                                         const unsigned* __restrict__ words, int width, float p,
                                         float scale) {
    const int s = blockIdx.x;
    const long long start = offsets[s], n = ((long long)offsets[s + 1] - start) * width;
    const unsigned* w = words + 4 * s;
    for (long long e = threadIdx.x; e < n; e += blockDim.x) {
        const long long x = start * width + e;
        float v = y[x] + b[e % width];
        v = rrra_uniform_at(e, w) < p ? 0.0f : v * scale;
        y[x] = v + r[x];
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_train_dropout_f32(float* dst, const float* src, const unsigned* __restrict__ offsets,
                           const unsigned* __restrict__ words, int width, float p, float scale) {
    const int s = blockIdx.x;
    const long long start = offsets[s], n = ((long long)offsets[s + 1] - start) * width;
    const unsigned* w = words + 4 * s;
    for (long long e = threadIdx.x; e < n; e += blockDim.x) {
        const long long x = start * width + e;
        dst[x] = rrra_uniform_at(e, w) < p ? 0.0f : src[x] * scale;
    }
}

// grid (ceil(max_len / 8), heads, sequences), 256 threads: warp w of block x takes query row
// 8x + w, its scores and probabilities in shared memory. qkv [tokens × 3h] without its bias
// (added here), ctx [tokens × h].
extern "C" __global__ void __launch_bounds__(THREADS)
    rrra_train_attention_dropout_f32(const float* __restrict__ qkv, const float* __restrict__ bias,
                                     const unsigned* __restrict__ offsets,
                                     const unsigned* __restrict__ words, int h, int dh, float scale,
                                     float p, float keep_scale, float* __restrict__ ctx) {
    __shared__ float qs[ATT_WARPS][ATT_MAX_DH];
    __shared__ float ps[ATT_WARPS][ATT_MAX_LEN];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int s = blockIdx.z, hd = blockIdx.y;
    const long long start = offsets[s];
    const int len = (int)((long long)offsets[s + 1] - start);
    // the host keeps sequences and heads within the shared arrays; a mismatch fails loudly
    if (len > ATT_MAX_LEN || dh > ATT_MAX_DH) __trap();
    const int i = blockIdx.x * ATT_WARPS + warp;
    if (i >= len) return;  // the whole warp
    float* pw = ps[warp];
    const float* row = qkv + (start + i) * 3 * h;
    for (int d = lane; d < dh; d += 32) qs[warp][d] = (row[hd * dh + d] + bias[hd * dh + d]) * scale;
    __syncwarp();
    const float* kb = bias + h + hd * dh;
    float mx = -INFINITY;
    for (int j = lane; j < len; j += 32) {
        const float* kr = qkv + (start + j) * 3 * h + h + hd * dh;
        float acc = 0.0f;
        for (int d = 0; d < dh; ++d) acc = fmaf(qs[warp][d], kr[d] + kb[d], acc);
        pw[j] = acc;
        mx = fmaxf(mx, acc);
    }
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int j = lane; j < len; j += 32) {
        const float e = expf(pw[j] - mx);
        pw[j] = e;
        sum += e;
    }
    const float inv = 1.0f / warp_sum(sum);
    const unsigned* w = words + 4 * s;
    const unsigned long long base = ((unsigned long long)hd * len + i) * len;
    for (int j = lane; j < len; j += 32) {
        const float pr = pw[j] * inv;
        pw[j] = (p > 0.0f && rrra_uniform_at(base + j, w) < p) ? 0.0f : (p > 0.0f ? pr * keep_scale : pr);
    }
    __syncwarp();
    // ctx row: lanes over the head's columns, the keys in order
    const float* vb = bias + 2 * h + hd * dh;
    for (int d = lane; d < dh; d += 32) {
        float acc = 0.0f;
        for (int j = 0; j < len; ++j)
            acc = fmaf(pw[j], qkv[(start + j) * 3 * h + 2 * h + hd * dh + d] + vb[d], acc);
        ctx[(start + i) * h + hd * dh + d] = acc;
    }
}
