// rrra_embed_layernorm_{f32,bf16}_h{128,256,512,768,1024}: BERT's embedding layer over a packed
// batch, x[t] = LayerNorm(word[ids[t]] + position[p(t)] + token_type[type_ids[t]]), where p(t)
// is the index of token t within its own sequence (offsets[s] <= t < offsets[s + 1]).
//
// Design: one warp per token (8 tokens per 256-thread block); the warp finds the token's
// sequence by binary search over `offsets` (<= 17 broadcast loads for 65535 sequences, all
// lanes in step), gathers the three rows with coalesced float4 loads into registers (lane l
// holds chunks l, l+32, ...: `h <= 128 * N4`, h % 4 == 0; the suffix names the largest hidden
// size a variant takes), and normalises them in place with the two-pass warp LayerNorm of
// bert_common.cuh (f32, eps from the model config). The `_bf16` variant also writes a bf16 copy
// of the result: the input of the first bf16 GEMM, while the f32 row stays the residual stream.
// Token ids were validated on the host (id < vocab, type < type_vocab, length <= positions).
//
// Roofline: per token one random row of the word table (h * 4 B from HBM) plus the position
// and type rows (hot in L2), and one h * 4 B (+ h * 2 B) write: BERT-base, 16384 tokens moves
// ~100 MB (125 MB bf16 path), >= 23 us at the 4.3 TB/s an H200 copies at. ~10 flops per element:
// memory bound. Measured on an H200: 35 us (f32) / 43 us (bf16 path) for 16384 tokens x 768.
#include "bert_common.cuh"

template <int N4, bool BF16>
__device__ __forceinline__ void embed_layernorm(
    const unsigned* __restrict__ ids, const unsigned* __restrict__ type_ids,
    const unsigned* __restrict__ offsets, int sequences, int tokens,
    const float* __restrict__ word, const float* __restrict__ pos,
    const float* __restrict__ type, const float* __restrict__ gamma,
    const float* __restrict__ beta, float eps, int h, float* __restrict__ out,
    bf16* __restrict__ out_bf) {
    const int lane = threadIdx.x % RRRA_WARP;
    const int tok = blockIdx.x * (blockDim.x / RRRA_WARP) + threadIdx.x / RRRA_WARP;
    if (tok >= tokens) return;
    // The token's sequence: the last s with offsets[s] <= tok (skips empty sequences, whose
    // offsets repeat). offsets[sequences] == tokens > tok, so s < sequences.
    int lo = 0, hi = sequences;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (offsets[mid] <= (unsigned)tok) lo = mid; else hi = mid - 1;
    }
    const int position = tok - (int)offsets[lo];
    const float* w = word + (size_t)ids[tok] * h;
    const float* p = pos + (size_t)position * h;
    const float* t = type + (size_t)type_ids[tok] * h;
    float4 v[N4];
#pragma unroll
    for (int j = 0; j < N4; ++j) {
        v[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (chunk_in_row(j, lane, h)) {
            const int c = 4 * (j * RRRA_WARP + lane);
            v[j] = add4(add4(load4(w + c), load4(p + c)), load4(t + c));  // CPU order: w + p + t
        }
    }
    warp_layernorm<N4>(v, h, lane, gamma, beta, eps);
    store_row<N4>(v, h, lane, out + (size_t)tok * h, BF16 ? out_bf + (size_t)tok * h : nullptr);
}

#define RRRA_EMBED_ARGS                                                                       \
    const unsigned *__restrict__ ids, const unsigned *__restrict__ type_ids,                  \
        const unsigned *__restrict__ offsets, int sequences, int tokens,                      \
        const float *__restrict__ word, const float *__restrict__ pos,                        \
        const float *__restrict__ type, const float *__restrict__ gamma,                      \
        const float *__restrict__ beta, float eps, int h, float *__restrict__ out,            \
        bf16 *__restrict__ out_bf
#define RRRA_EMBED_PASS \
    ids, type_ids, offsets, sequences, tokens, word, pos, type, gamma, beta, eps, h, out, out_bf

#define RRRA_EMBED(N4, H)                                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        rrra_embed_layernorm_f32_h##H(RRRA_EMBED_ARGS) {                                       \
        embed_layernorm<N4, false>(RRRA_EMBED_PASS);                                           \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                          \
        rrra_embed_layernorm_bf16_h##H(RRRA_EMBED_ARGS) {                                      \
        embed_layernorm<N4, true>(RRRA_EMBED_PASS);                                            \
    }

RRRA_EMBED(1, 128)
RRRA_EMBED(2, 256)
RRRA_EMBED(4, 512)
RRRA_EMBED(6, 768)
RRRA_EMBED(8, 1024)
