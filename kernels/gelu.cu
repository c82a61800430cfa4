// rrra_bias_gelu_{f32,bf16}: y <- GELU(y + b) over a [rows x cols] matrix in place, with the
// exact erf GELU, 0.5 x (1 + erf(x / sqrt 2)), as BERT's `gelu` and cpu::math::gelu compute it
// (erff: <= 2 ulp). cuBLASLt's GELU_BIAS epilogue uses the tanh approximation, which is another
// function (|difference| up to 4.7e-4), so the bias and GELU are applied here after a plain GEMM.
//
// Design: one block per row (grid.x = rows, so no index division), threads stride over the
// row in 4-element chunks: float4 (f32) or 8-byte (4 x bf16) accesses when cols % 4 == 0,
// scalar otherwise. Math in f32 in both variants; the bf16 variant reads and writes the bf16
// FFN activation (the next GEMM's input) with one rounding on the store.
//
// Roofline: 8 B per element in f32, 4 B in bf16, ~25 flops (erff's polynomial). BERT-base FFN,
// 16384 tokens x 3072: 403 MB (f32) or 201 MB (bf16): >= 94 us / 47 us at 4.3 TB/s, while the
// flops (1.3 GFLOP) take ~20 us of the f32 pipes: memory bound. Measured on an H200: 101 us
// (f32, 4.0 TB/s) and 75 us (bf16, 2.7 TB/s: erff's instructions start to show).
#include "bert_common.cuh"

template <typename T>
__device__ __forceinline__ void bias_gelu(T* __restrict__ y, const float* __restrict__ b,
                                          int cols) {
    T* row = y + (size_t)blockIdx.x * cols;
    if ((cols & 3) == 0) {
        for (int c = 4 * threadIdx.x; c < cols; c += 4 * blockDim.x) {
            const float4 v = add4(load4(row + c), load4(b + c));
            store4(row + c, make_float4(gelu_erf(v.x), gelu_erf(v.y), gelu_erf(v.z), gelu_erf(v.w)));
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x)
            store1(row + c, gelu_erf(load1(row + c) + b[c]));
    }
}

extern "C" __global__ void __launch_bounds__(256)
    rrra_bias_gelu_f32(float* __restrict__ y, const float* __restrict__ b, int rows, int cols) {
    if ((int)blockIdx.x < rows) bias_gelu(y, b, cols);
}

extern "C" __global__ void __launch_bounds__(256)
    rrra_bias_gelu_bf16(bf16* __restrict__ y, const float* __restrict__ b, int rows, int cols) {
    if ((int)blockIdx.x < rows) bias_gelu(y, b, cols);
}
