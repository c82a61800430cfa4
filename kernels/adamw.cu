// rrra_adamw_*: the fused AdamW step with global gradient-norm clipping, mirroring
// src/train/optim.rs (`clip_grad_norm`, then `AdamW::update`), on flat fp32 buffers that hold all
// parameter tensors back to back: master weights, gradients, first and second moments, and an
// optional bf16 working copy of the updated weights.
//
// The gradients may first be multiplied by grad_scale (the trainer's 1 / micro-batches), one f32
// rounding like the CPU's in-place scaling; a scale of 1 changes nothing.
//
// Work is split into chunks: at most 16384 elements (the CPU's CHUNK), never crossing a tensor,
// so each chunk has one decay flag and the norm's partition is exactly the CPU's. A chunk table
// (start, length | decay << 32) is built once on the host.
//
//   rrra_adamw_norm_partial  one block per chunk: sum of (g*grad_scale)^2 in f64 (fixed strided split and a
//                            fixed tree: deterministic), one partial per chunk.
//   rrra_adamw_norm_final    one block: the partials in a fixed order -> norm = sqrt(sum); the
//                            clip factor max_norm / (norm + 1e-6) when it is < 1 and max_norm > 0
//                            (torch / the CPU); a non-finite norm marks the step as skipped.
//   rrra_adamw_update        one block per chunk: g = (g*grad_scale)*clip (f32, as the CPU
//                            scales the gradients); if decay: p *= 1 - lr*wd; m = b1*m + (1-b1)*g;
//                            v = v*b2 + (1-b2)*(g*g); p += -step_size * (m / (sqrt(v)/sqrt(bc2) + eps));
//                            bf16 copy = round-to-nearest-even(p). Every operation is a separate
//                            IEEE f32 operation in the CPU's order (_rn intrinsics: no FMA), so the
//                            update equals the CPU's bit for bit when the clip factor is the same;
//                            the factor depends on the norm, whose f64 sum differs from the CPU's
//                            only in order (~1e-16 relative), so it can differ in its last f32 bit.
// No atomics anywhere; the norm never goes through the host.
//
// Roofline: memory bound. Per element: read g twice (norm, update), read p, m, v, write p, m, v
// and 2 bytes of bf16: 34 bytes (32 without the copy). 110M parameters: 3.7 GB, ~0.9 ms at
// ~4.3 TB/s; ~15 flops per element is far below the ridge.

#include <cuda_bf16.h>

typedef unsigned long long u64;

#define RRRA_ADAMW_THREADS 256

// Sum over the block (blockDim.x a power of two, <= 1024) in f64, fixed tree: every call with
// the same inputs gives the same bits. Thread 0 gets the result.
__device__ __forceinline__ double rrra_block_sum_f64(double v) {
    __shared__ double part[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    const int warps = blockDim.x / 32;
    v = (threadIdx.x < warps) ? part[threadIdx.x] : 0.0;
    if (warp == 0) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

// chunks: [C x 2] u64: start element, (length | decay << 32).
extern "C" __global__ void __launch_bounds__(RRRA_ADAMW_THREADS)
    rrra_adamw_norm_partial(const float* __restrict__ grads, const u64* __restrict__ chunks,
                            float grad_scale, double* __restrict__ partial) {
    const u64 start = chunks[2 * blockIdx.x];
    const unsigned len = (unsigned)(chunks[2 * blockIdx.x + 1] & 0xffffffffull);
    const float* g = grads + start;
    double acc = 0.0;
    for (unsigned i = threadIdx.x; i < len; i += blockDim.x) {
        const double x = (double)__fmul_rn(g[i], grad_scale);
        acc = fma(x, x, acc);  // x*x is exact in f64
    }
    acc = rrra_block_sum_f64(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// One block. control (f32 x 2, written): [0] the clip factor to apply (1 when not clipping),
// [1] 1 when the step is skipped (non-finite norm), else 0. norm_out (f64, written): the norm.
extern "C" __global__ void __launch_bounds__(1024)
    rrra_adamw_norm_final(const double* __restrict__ partial, int n_chunks, float max_norm,
                          double* __restrict__ norm_out, float* __restrict__ control) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < n_chunks; i += blockDim.x) acc += partial[i];
    acc = rrra_block_sum_f64(acc);
    if (threadIdx.x == 0) {
        const double norm = sqrt(acc);
        float clip = 1.0f, skip = 0.0f;
        // the CPU's test: is f32(norm), rounded to nearest, finite (a norm a little past
        // FLT_MAX rounds down to it, and that step is taken)
        if (!isfinite((float)norm)) {
            skip = 1.0f;
        } else {
            const double scale = (double)max_norm / __dadd_rn(norm, 1e-6);
            if (scale < 1.0 && max_norm > 0.0f) clip = (float)scale;
        }
        *norm_out = norm;
        control[0] = clip;
        control[1] = skip;
    }
}

// hyper: [0] decay_factor (1 - lr*wd), [1] beta1, [2] beta2, [3] 1 - beta1, [4] 1 - beta2,
// [5] sqrt(bias correction 2), [6] eps, [7] step_size (lr / bias correction 1); computed on the
// host exactly as the CPU does. bf16_out may be null.
extern "C" __global__ void __launch_bounds__(RRRA_ADAMW_THREADS)
    rrra_adamw_update(float* __restrict__ params, const float* __restrict__ grads,
                      float* __restrict__ m_buf, float* __restrict__ v_buf,
                      __nv_bfloat16* __restrict__ bf16_out, const u64* __restrict__ chunks,
                      const float* __restrict__ control, float grad_scale, float decay_factor, float beta1,
                      float beta2, float one_minus_b1, float one_minus_b2, float bias2_sqrt,
                      float eps, float step_size) {
    if (control[1] != 0.0f) return;  // non-finite gradient norm: nothing changes
    const float clip = control[0];
    const bool clipping = clip != 1.0f;
    const u64 start = chunks[2 * blockIdx.x];
    const u64 meta = chunks[2 * blockIdx.x + 1];
    const unsigned len = (unsigned)(meta & 0xffffffffull);
    const bool decay = (meta >> 32) != 0;
    for (unsigned i = threadIdx.x; i < len; i += blockDim.x) {
        const u64 e = start + i;
        float g = __fmul_rn(grads[e], grad_scale);
        if (clipping) g = __fmul_rn(g, clip);
        float p = params[e];
        if (decay) p = __fmul_rn(p, decay_factor);
        const float m = __fadd_rn(__fmul_rn(beta1, m_buf[e]), __fmul_rn(one_minus_b1, g));
        const float v = __fadd_rn(__fmul_rn(v_buf[e], beta2), __fmul_rn(one_minus_b2, __fmul_rn(g, g)));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bias2_sqrt), eps);
        p = __fadd_rn(p, __fmul_rn(-step_size, __fdiv_rn(m, denom)));
        m_buf[e] = m;
        v_buf[e] = v;
        params[e] = p;
        if (bf16_out) bf16_out[e] = __float2bfloat16_rn(p);
    }
}
