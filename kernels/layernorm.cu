// rrra_add_layernorm_{f32,bf16}_h{128,256,512,768,1024}: the post-LN residual of BERT,
// x <- LayerNorm(x + bias + residual), in place over a [rows x h] f32 matrix. `x` is the output
// of the preceding GEMM (attention output or FFN output projection) without its bias: adding the
// bias here saves the GEMM an epilogue and a pass over the matrix.
//
// Design: one warp per row (8 rows per 256-thread block), the row in registers as float4 chunks
// (lane l holds chunks l, l+32, ...; `h <= 128 * N4`, h % 4 == 0), every load and store a
// coalesced float4, two-pass mean and variance in f32 with warp shuffles (no shared memory, no
// block barrier), eps from the model config. The `_bf16` variant also writes a bf16 copy of the
// result for the next GEMM; the f32 row remains the residual stream, so the bf16 path rounds
// only GEMM inputs, never the residual.
//
// Roofline: reads x and residual, writes x: 12 B per element (14 B with the bf16 copy), ~10
// flops. BERT-base, 16384 tokens x 768: 151 MB (176 MB), >= 35 us (41 us) at 4.3 TB/s.
// Measured on an H200: 47 us (3.2 TB/s) and 53 us (3.3 TB/s).
#include "bert_common.cuh"

template <int N4, bool BF16>
__device__ __forceinline__ void add_layernorm(float* __restrict__ x, const float* __restrict__ bias,
                                              const float* __restrict__ residual,
                                              const float* __restrict__ gamma,
                                              const float* __restrict__ beta, float eps, int rows,
                                              int h, bf16* __restrict__ out_bf) {
    const int lane = threadIdx.x % RRRA_WARP;
    const int row = blockIdx.x * (blockDim.x / RRRA_WARP) + threadIdx.x / RRRA_WARP;
    if (row >= rows) return;
    float* xr = x + (size_t)row * h;
    const float* rr = residual + (size_t)row * h;
    float4 v[N4];
#pragma unroll
    for (int j = 0; j < N4; ++j) {
        v[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (chunk_in_row(j, lane, h)) {
            const int c = 4 * (j * RRRA_WARP + lane);
            v[j] = add4(add4(load4(xr + c), load4(bias + c)), load4(rr + c));
        }
    }
    warp_layernorm<N4>(v, h, lane, gamma, beta, eps);
    store_row<N4>(v, h, lane, xr, BF16 ? out_bf + (size_t)row * h : nullptr);
}

#define RRRA_ADD_LN_ARGS                                                                      \
    float *__restrict__ x, const float *__restrict__ bias, const float *__restrict__ residual, \
        const float *__restrict__ gamma, const float *__restrict__ beta, float eps, int rows,  \
        int h, bf16 *__restrict__ out_bf
#define RRRA_ADD_LN_PASS x, bias, residual, gamma, beta, eps, rows, h, out_bf

#define RRRA_ADD_LN(N4, H)                                                                     \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        rrra_add_layernorm_f32_h##H(RRRA_ADD_LN_ARGS) {                                        \
        add_layernorm<N4, false>(RRRA_ADD_LN_PASS);                                            \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        rrra_add_layernorm_bf16_h##H(RRRA_ADD_LN_ARGS) {                                       \
        add_layernorm<N4, true>(RRRA_ADD_LN_PASS);                                             \
    }

RRRA_ADD_LN(1, 128)
RRRA_ADD_LN(2, 256)
RRRA_ADD_LN(4, 512)
RRRA_ADD_LN(6, 768)
RRRA_ADD_LN(8, 1024)
