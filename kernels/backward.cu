// Backward kernels of the row-wise encoder ops (the device twins of src/cpu/backward.rs and of
// the pooling / embedding steps of src/train/encoder_grad.rs), f32 activations and gradients,
// f32 arithmetic. Every reduction over rows is deterministic and atomic-free: fixed partial sums,
// then a final reduction in a fixed order, so a result never depends on scheduling.
//
//  rrra_layernorm_backward_f32_h{128,256,512,768,1024}
//      ds = (g - mean(g) - x^ * mean(g x^)) / sigma with g = dy * gamma, x^ = (s - mu) / sigma,
//      mu and sigma recomputed from the pre-norm input s (nothing kept from the forward), as
//      cpu::backward::layernorm_backward does. One warp per row, the row in registers (lane l
//      holds elements l, l + 32, ...: any h <= the suffix; every access is a coalesced 128-byte
//      warp transaction). dgamma = sum dy x^ and dbeta = sum dy over rows: each warp keeps its
//      rows' sums in registers, the block's 8 warps add theirs into shared memory in warp order,
//      and the block writes one partial row; rrra_bias_backward_final_f32 (groups = 8) then sums
//      the partials in a fixed tree order into dgamma / dbeta (+= when `accumulate`).
//  rrra_gelu_backward_{f32,bf16}
//      dy <- dy * (Phi(x) + x phi(x)) in place for the exact erf GELU (Phi from erfcf, phi from
//      expf: a few ulp; the CPU's 1 + erf(x / sqrt 2) form differs by <= ~3e-7 absolute, mostly
//      the CPU erf's own error near x = 5.5). float4 (f32) / 8-byte (bf16) accesses when aligned,
//      a grid-stride loop. The bf16 variant reads bf16 pre-activations and gradients and
//      rounds the product once; the math is f32.
//  rrra_bias_backward_partial_{f32,bf16} + rrra_bias_backward_final_f32
//      db += column sums of dy [rows x cols] (f32 sums; bf16 dy is widened exactly): thread per
//      column, partial sums over fixed chunks of
//      `rows_per_part` rows in row order (coalesced: a warp reads 32 consecutive columns of a
//      row), then (groups = 1) db += partial_0, += partial_1, ... in chunk order. With
//      rows_per_part = 256 that is exactly the order of cpu::backward's add_column_sums, so the
//      bias gradient is bitwise equal to the CPU's.
//  rrra_pool_{mean,cls,max}_backward_f32
//      dx [tokens x h] (overwritten) from d_pooled [sequences x h] over the packed varlen layout:
//      mean writes dy / len to every row of the sequence, CLS dy to its first row and zeros
//      elsewhere, max dy to the first row holding each column's maximum (encoder_grad's rule).
//      One block per sequence, thread per column, rows in order: bitwise equal to the CPU.
//  rrra_l2_normalize_backward_f32
//      dx = (dy - y (y . dy)) / |x| (dx = dy / 1e-12 below the clamp), one warp per row; dx may
//      alias dy (each lane rewrites only what it read, after the row's reduction).
//  rrra_embedding_backward_items_f32 + rrra_embedding_backward_final_f32
//      The word / position / token-type gradients as a deterministic, atomic-free scatter. The
//      host sorts the token indices of each table by row key, stably (ties in token order), and
//      cuts each key's run of tokens into items of at most 64 tokens. A warp per item sums its
//      tokens' gradient rows in token order: an item that is its key's whole run adds them
//      straight onto the table row (acc = table; acc += g_t, token by token: the CPU's exact
//      order, so bitwise); the items of a longer run write partial sums, which the final kernel
//      adds onto the table row in item order (deterministic, not bitwise). No two warps ever
//      write the same table row.
//
// Roofline (H200, 4.3 TB/s copy bandwidth; BERT-base: 16384 tokens x 768, FFN 3072; all of
// these are memory bound, a few flops per byte at most):
//  * LayerNorm backward reads s and dy, writes ds: 12 B/element, 151 MB, >= 35 us; the
//    partials (512 x 768 x 2 floats) add 2%.
//  * GELU backward reads pre and dy, writes dy: 12 B/element in f32 (604 MB for 16384 x 3072,
//    >= 140 us), 6 B in bf16 (>= 70 us); ~30 flops per element (erff, expf).
//  * bias gradient reads dy once: 4 B/element (201 MB for the FFN's 3072 columns, >= 47 us;
//    2 B/element and >= 23 us from bf16).
//  * pooling backward writes dx once (50 MB, >= 12 us); max also reads the hidden states.
//  * embedding backward reads every token's gradient row three times (once per table) and
//    reads/writes each touched table row: >= 151 MB, >= 35 us; the longest chain a warp adds
//    serially is 64 rows.
#include "bert_common.cuh"

constexpr int BWD_WARPS = 8;                        // warps per block of the row kernels
constexpr int BWD_THREADS = BWD_WARPS * RRRA_WARP;  // 256
constexpr int BWD_MAX_H = 1024;                     // largest LayerNorm width (shared scratch)

// ---------------------------------------------------------------------------------------------
// LayerNorm

template <int K>  // elements per lane: h <= 32 K
__device__ __forceinline__ void layernorm_backward(const float* __restrict__ s,
                                                   const float* __restrict__ gamma,
                                                   const float* __restrict__ dy, float eps,
                                                   int rows, int h, int rows_per_block,
                                                   float* __restrict__ ds,
                                                   float* __restrict__ part_g,
                                                   float* __restrict__ part_b) {
    __shared__ float sum_g[BWD_MAX_H], sum_b[BWD_MAX_H];
    const int lane = threadIdx.x % RRRA_WARP, warp = threadIdx.x / RRRA_WARP;
    const int r0 = blockIdx.x * rows_per_block;
    const int r1 = min(rows, r0 + rows_per_block);
    const float hf = (float)h;
    float dg[K], db[K];
#pragma unroll
    for (int j = 0; j < K; ++j) dg[j] = db[j] = 0.0f;
    for (int r = r0 + warp; r < r1; r += BWD_WARPS) {
        const float* x = s + (size_t)r * h;
        const float* g = dy + (size_t)r * h;
        float xv[K], gv[K];
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < K; ++j) {
            const int c = lane + RRRA_WARP * j;
            xv[j] = c < h ? x[c] : 0.0f;
            gv[j] = c < h ? g[c] : 0.0f;
            sum += xv[j];
        }
        const float mean = warp_sum(sum) / hf;
        float q = 0.0f;
#pragma unroll
        for (int j = 0; j < K; ++j) {
            const int c = lane + RRRA_WARP * j;
            const float d = xv[j] - mean;
            if (c < h) q += d * d;
        }
        const float var = warp_sum(q) / hf;
        const float inv = 1.0f / sqrtf(var + eps);
        float a = 0.0f, b = 0.0f;
#pragma unroll
        for (int j = 0; j < K; ++j) {
            const int c = lane + RRRA_WARP * j;
            if (c < h) {
                const float xh = (xv[j] - mean) * inv;
                xv[j] = xh;
                dg[j] += gv[j] * xh;
                db[j] += gv[j];
                const float gy = gv[j] * gamma[c];
                a += gy;
                b += gy * xh;
            }
        }
        const float ma = warp_sum(a) / hf, mb = warp_sum(b) / hf;
        float* o = ds + (size_t)r * h;
#pragma unroll
        for (int j = 0; j < K; ++j) {
            const int c = lane + RRRA_WARP * j;
            if (c < h) o[c] = inv * (gv[j] * gamma[c] - ma - xv[j] * mb);
        }
    }
    // The block's parameter gradients: the warps add theirs in warp order (deterministic).
    for (int w = 0; w < BWD_WARPS; ++w) {
        if (warp == w) {
#pragma unroll
            for (int j = 0; j < K; ++j) {
                const int c = lane + RRRA_WARP * j;
                if (c < h) {
                    sum_g[c] = w == 0 ? dg[j] : sum_g[c] + dg[j];
                    sum_b[c] = w == 0 ? db[j] : sum_b[c] + db[j];
                }
            }
        }
        __syncthreads();
    }
    for (int c = threadIdx.x; c < h; c += blockDim.x) {
        part_g[(size_t)blockIdx.x * h + c] = sum_g[c];
        part_b[(size_t)blockIdx.x * h + c] = sum_b[c];
    }
}

#define RRRA_LN_BWD(K, H)                                                                      \
    extern "C" __global__ void __launch_bounds__(BWD_THREADS) rrra_layernorm_backward_f32_h##H( \
        const float* __restrict__ s, const float* __restrict__ gamma,                         \
        const float* __restrict__ dy, float eps, int rows, int h, int rows_per_block,         \
        float* __restrict__ ds, float* __restrict__ part_g, float* __restrict__ part_b) {     \
        if (h <= RRRA_WARP * K && (int)blockDim.x == BWD_THREADS)                             \
            layernorm_backward<K>(s, gamma, dy, eps, rows, h, rows_per_block, ds, part_g,     \
                                  part_b);                                                    \
    }

RRRA_LN_BWD(4, 128)
RRRA_LN_BWD(8, 256)
RRRA_LN_BWD(16, 512)
RRRA_LN_BWD(24, 768)
RRRA_LN_BWD(32, 1024)

// ---------------------------------------------------------------------------------------------
// Column sums: bias gradients, and the final reduction of the LayerNorm parameter partials

// partials[part][c] = sum of dy[r][c] over rows part * rows_per_part ... (+ rows_per_part), in
// row order from 0. grid (ceil(cols / blockDim.x), parts). The bf16 variant widens each element
// exactly and sums in f32 (the gradient of a bf16 activation, e.g. the FFN's).
template <typename T>
__device__ __forceinline__ void bias_backward_partial(const T* __restrict__ dy, int rows, int cols,
                                                      int rows_per_part,
                                                      float* __restrict__ partials) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int part = blockIdx.y;
    if (c >= cols) return;
    const int r0 = part * rows_per_part;
    const int r1 = min(rows, r0 + rows_per_part);
    const T* p = dy + (size_t)r0 * cols + c;
    float acc = 0.0f;
#pragma unroll 8
    for (int r = r0; r < r1; ++r, p += cols) acc += load1(p);
    partials[(size_t)part * cols + c] = acc;
}

extern "C" __global__ void __launch_bounds__(128)
    rrra_bias_backward_partial_f32(const float* __restrict__ dy, int rows, int cols,
                                   int rows_per_part, float* __restrict__ partials) {
    bias_backward_partial(dy, rows, cols, rows_per_part, partials);
}

extern "C" __global__ void __launch_bounds__(128)
    rrra_bias_backward_partial_bf16(const bf16* __restrict__ dy, int rows, int cols,
                                    int rows_per_part, float* __restrict__ partials) {
    bias_backward_partial(dy, rows, cols, rows_per_part, partials);
}

// out[c] (+)= the sum of partials[0..parts][c]. groups == 1: acc = (accumulate ? out[c] : 0),
// then acc += partials[0][c], partials[1][c], ... in order (the CPU's order). groups in 2..8: the
// parts are cut into `groups` contiguous ranges, each summed in order by one warp, the range
// sums added in range order, then added to out (a fixed tree: deterministic). Block: 32 columns
// x 8 warps, grid ceil(cols / 32).
extern "C" __global__ void __launch_bounds__(BWD_THREADS)
    rrra_bias_backward_final_f32(const float* __restrict__ partials, int parts, int cols,
                                 int groups, int accumulate, float* __restrict__ out) {
    __shared__ float range_sum[BWD_WARPS][RRRA_WARP];
    const int lane = threadIdx.x % RRRA_WARP, warp = threadIdx.x / RRRA_WARP;
    const int c = blockIdx.x * RRRA_WARP + lane;
    groups = max(1, min(groups, BWD_WARPS));
    const int per = (parts + groups - 1) / groups;
    if (warp < groups && c < cols) {
        const int p0 = warp * per, p1 = min(parts, p0 + per);
        float acc = (groups == 1 && accumulate) ? out[c] : 0.0f;
        const float* p = partials + (size_t)p0 * cols + c;
#pragma unroll 8
        for (int k = p0; k < p1; ++k, p += cols) acc += *p;
        range_sum[warp][lane] = acc;
    }
    __syncthreads();
    if (warp == 0 && c < cols) {
        float total = range_sum[0][lane];
        if (groups > 1) {
            for (int w = 1; w < groups; ++w) total += range_sum[w][lane];
            if (accumulate) total = out[c] + total;
        }
        out[c] = total;
    }
}

// ---------------------------------------------------------------------------------------------
// GELU

__device__ __forceinline__ float gelu_grad(float x) {
    // Phi(x) as erfc: no cancellation in 1 + erf(x / sqrt 2) for x << 0, where Phi and x phi
    // nearly cancel each other too (the CPU's 1 + erf form is up to ~3e-7 off in gelu').
    const float cdf = 0.5f * erfcf(x * -0.70710678118654752f);
    const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
    return cdf + x * pdf;
}

template <typename T>
__device__ __forceinline__ void gelu_backward(const T* __restrict__ pre, T* __restrict__ dy,
                                              long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned align = sizeof(T) * 4;
    const bool vec = ((reinterpret_cast<size_t>(pre) | reinterpret_cast<size_t>(dy)) % align) == 0;
    long long done = 0;
    if (vec) {
        const long long n4 = n / 4;
        for (long long i = first; i < n4; i += stride) {
            const float4 x = load4(pre + 4 * i);
            const float4 g = load4(dy + 4 * i);
            store4(dy + 4 * i, make_float4(g.x * gelu_grad(x.x), g.y * gelu_grad(x.y),
                                           g.z * gelu_grad(x.z), g.w * gelu_grad(x.w)));
        }
        done = n4 * 4;
    }
    for (long long i = done + first; i < n; i += stride)
        store1(dy + i, load1(dy + i) * gelu_grad(load1(pre + i)));
}

extern "C" __global__ void __launch_bounds__(BWD_THREADS)
    rrra_gelu_backward_f32(const float* __restrict__ pre, float* __restrict__ dy, long long n) {
    gelu_backward(pre, dy, n);
}

extern "C" __global__ void __launch_bounds__(BWD_THREADS)
    rrra_gelu_backward_bf16(const bf16* __restrict__ pre, bf16* __restrict__ dy, long long n) {
    gelu_backward(pre, dy, n);
}

// ---------------------------------------------------------------------------------------------
// Pooling and L2 normalisation

enum PoolBackwardMode { POOL_BWD_MEAN, POOL_BWD_CLS, POOL_BWD_MAX };

template <PoolBackwardMode MODE>
__device__ __forceinline__ void pool_backward(const float* __restrict__ d_pooled,
                                              const float* __restrict__ hidden,
                                              const unsigned* __restrict__ offsets, int h,
                                              float* __restrict__ dx) {
    const int s = blockIdx.x;
    const int start = (int)offsets[s];
    const int len = (int)offsets[s + 1] - start;
    const float inv = 1.0f / (float)max(len, 1);
    float* out = dx + (size_t)start * h;
    for (int c = threadIdx.x; c < h; c += blockDim.x) {
        const float g = d_pooled[(size_t)s * h + c];
        int best = 0;
        if (MODE == POOL_BWD_MAX) {
            const float* col = hidden + (size_t)start * h + c;
            float m = len > 0 ? col[0] : 0.0f;
            for (int r = 1; r < len; ++r) {
                const float v = col[(size_t)r * h];
                if (v > m) {
                    m = v;
                    best = r;
                }
            }
        }
        for (int r = 0; r < len; ++r) {
            float v;
            if (MODE == POOL_BWD_MEAN) v = g * inv;
            else v = r == best ? g : 0.0f;
            out[(size_t)r * h + c] = v;
        }
    }
}

#define RRRA_POOL_BWD(NAME, MODE)                                                              \
    extern "C" __global__ void __launch_bounds__(BWD_THREADS) rrra_pool_##NAME##_backward_f32( \
        const float* __restrict__ d_pooled, const float* __restrict__ hidden,                 \
        const unsigned* __restrict__ offsets, int sequences, int h, float* __restrict__ dx) {  \
        if ((int)blockIdx.x < sequences) pool_backward<MODE>(d_pooled, hidden, offsets, h, dx); \
    }

RRRA_POOL_BWD(mean, POOL_BWD_MEAN)
RRRA_POOL_BWD(cls, POOL_BWD_CLS)
RRRA_POOL_BWD(max, POOL_BWD_MAX)

// dx may alias dy: no __restrict__ on them.
extern "C" __global__ void __launch_bounds__(BWD_THREADS)
    rrra_l2_normalize_backward_f32(const float* __restrict__ x, const float* dy, int rows, int dim,
                                   float* dx) {
    const int lane = threadIdx.x % RRRA_WARP;
    const int row = blockIdx.x * (blockDim.x / RRRA_WARP) + threadIdx.x / RRRA_WARP;
    if (row >= rows) return;
    const float* xr = x + (size_t)row * dim;
    const float* gr = dy + (size_t)row * dim;
    float* o = dx + (size_t)row * dim;
    float ss = 0.0f;
    for (int i = lane; i < dim; i += RRRA_WARP) ss += xr[i] * xr[i];
    const float norm = sqrtf(warp_sum(ss));
    const float inv = 1.0f / fmaxf(norm, 1e-12f);
    if (norm <= 1e-12f) {  // uniform across the warp
        for (int i = lane; i < dim; i += RRRA_WARP) o[i] = gr[i] * inv;
        return;
    }
    float ydy = 0.0f;
    for (int i = lane; i < dim; i += RRRA_WARP) ydy += xr[i] * inv * gr[i];
    ydy = warp_sum(ydy);
    for (int i = lane; i < dim; i += RRRA_WARP) {
        const float g = gr[i];  // read before the (possibly aliasing) write
        o[i] = inv * (g - xr[i] * inv * ydy);
    }
}

// ---------------------------------------------------------------------------------------------
// Embeddings

constexpr int EMB_COLS = 8;  // columns per lane per pass: a pass covers 256 columns

// One warp per item {table, key, first, end}: the gradient rows of tokens order[first..end) (in
// that order) summed, onto tables[table][key] when slot[item] < 0 (the item is its key's whole
// run), else into partials[slot] (from zero).
extern "C" __global__ void __launch_bounds__(BWD_THREADS)
    rrra_embedding_backward_items_f32(const float* __restrict__ grad,
                                      const unsigned* __restrict__ order,
                                      const int4* __restrict__ items,
                                      const int* __restrict__ slots, int n_items, int h,
                                      float* __restrict__ word, float* __restrict__ pos,
                                      float* __restrict__ type, float* __restrict__ partials) {
    const int lane = threadIdx.x % RRRA_WARP;
    const int item = blockIdx.x * BWD_WARPS + threadIdx.x / RRRA_WARP;
    if (item >= n_items) return;
    const int4 it = items[item];
    const int slot = slots[item];
    float* table = it.x == 0 ? word : it.x == 1 ? pos : type;
    float* dst = slot < 0 ? table + (size_t)it.y * h : partials + (size_t)slot * h;
    for (int c0 = 0; c0 < h; c0 += EMB_COLS * RRRA_WARP) {
        float acc[EMB_COLS];
#pragma unroll
        for (int u = 0; u < EMB_COLS; ++u) {
            const int c = c0 + lane + RRRA_WARP * u;
            acc[u] = (slot < 0 && c < h) ? dst[c] : 0.0f;
        }
        int i = it.z;
        for (; i + 1 < it.w; i += 2) {  // two rows' loads in flight, added in token order
            const float* row0 = grad + (size_t)order[i] * h;
            const float* row1 = grad + (size_t)order[i + 1] * h;
#pragma unroll
            for (int u = 0; u < EMB_COLS; ++u) {
                const int c = c0 + lane + RRRA_WARP * u;
                if (c < h) {
                    const float a = row0[c], b = row1[c];
                    acc[u] += a;
                    acc[u] += b;
                }
            }
        }
        if (i < it.w) {
            const float* row = grad + (size_t)order[i] * h;
#pragma unroll
            for (int u = 0; u < EMB_COLS; ++u) {
                const int c = c0 + lane + RRRA_WARP * u;
                if (c < h) acc[u] += row[c];
            }
        }
#pragma unroll
        for (int u = 0; u < EMB_COLS; ++u) {
            const int c = c0 + lane + RRRA_WARP * u;
            if (c < h) dst[c] = acc[u];
        }
    }
}

// One warp per split run {table, key, first slot, slots}: tables[table][key] += partials[first],
// += partials[first + 1], ... in order.
extern "C" __global__ void __launch_bounds__(BWD_THREADS)
    rrra_embedding_backward_final_f32(const int4* __restrict__ segments, int n_segments, int h,
                                      const float* __restrict__ partials,
                                      float* __restrict__ word, float* __restrict__ pos,
                                      float* __restrict__ type) {
    const int lane = threadIdx.x % RRRA_WARP;
    const int seg = blockIdx.x * BWD_WARPS + threadIdx.x / RRRA_WARP;
    if (seg >= n_segments) return;
    const int4 sg = segments[seg];
    float* table = sg.x == 0 ? word : sg.x == 1 ? pos : type;
    float* dst = table + (size_t)sg.y * h;
    for (int c = lane; c < h; c += RRRA_WARP) {
        float acc = dst[c];
        for (int k = 0; k < sg.w; ++k) acc += partials[(size_t)(sg.z + k) * h + c];
        dst[c] = acc;
    }
}
