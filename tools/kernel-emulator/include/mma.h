// A host stand-in for the pieces of CUDA's WMMA API (nvcuda::wmma) the emulated kernels use:
// 16x16x16 fragments of f16/bf16 inputs and an f32 accumulator. Every lane of a warp holds the
// whole tile (the hardware spreads it over the lanes in an unspecified layout, which correct code
// never depends on). mma_sync sums exact products in f32, k ascending: the tensor cores' order is
// unspecified too, so a kernel may rely on exact products but not on a summation order.
// Loads and stores are warp collectives: every lane of the warp must call them (a __syncwarp
// checks it); a store is done by lane 0 alone, all lanes holding the same tile, so another lane
// reading the tile back needs a barrier first, as on the GPU.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

static inline float emu_wmma_float(__half h) { return __half2float(h); }
static inline float emu_wmma_float(__nv_bfloat16 b) { return __bfloat162float(b); }
static inline float emu_wmma_float(float f) { return f; }
// The API's requirements: a 256-bit aligned pointer, a stride of a multiple of 16 bytes.
static inline void emu_wmma_check(const void* p, unsigned ldm, size_t esize) {
    if ((reinterpret_cast<uintptr_t>(p) & 31) || (ldm * esize) % 16) {
        std::fprintf(stderr, "wmma: pointer %p or ldm %u breaks the alignment rules\n", p, ldm);
        std::abort();
    }
}

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "only 16x16x16 tiles are emulated");
    T x[16 * 16];  // element (i, j) at x[i * 16 + j]: rows x cols of this use's tile
    static constexpr int num_elements = 16 * 16;
};

template <class Use, int M, int N, int K, class T, class L>
static inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, T v) {
    for (auto& e : f.x) e = v;
}

// matrix_a is M x K (a(m, k)), matrix_b K x N (b(k, n)); row_major stores element (i, j) at
// p[i * ldm + j], col_major at p[j * ldm + i].
template <class Use, class T, class L>
static inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
    static_assert(std::is_same_v<L, row_major> || std::is_same_v<L, col_major>, "a or b fragment");
    emu_wmma_check(p, ldm, sizeof(T));
    __syncwarp();
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j)
            f.x[i * 16 + j] = std::is_same_v<L, row_major> ? p[i * ldm + j] : p[j * ldm + i];
}

template <class T>
static inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* p, unsigned ldm,
                                    layout_t layout) {
    emu_wmma_check(p, ldm, sizeof(T));
    __syncwarp();
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 16; ++j)
            f.x[i * 16 + j] = layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i];
}

template <class T>
static inline void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm,
                                     layout_t layout) {
    emu_wmma_check(p, ldm, sizeof(T));
    __syncwarp();
    if (threadIdx.x % 32 == 0)
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 16; ++j)
                (layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.x[i * 16 + j];
}

// d = a b + c, each product exact in f32 (16-bit inputs), summed in f32 onto c.
template <class T, class LA, class LB>
static inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                            const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                            const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                            const fragment<accumulator, 16, 16, 16, float>& c) {
    float out[16 * 16];
    for (int m = 0; m < 16; ++m)
        for (int n = 0; n < 16; ++n) {
            float s = c.x[m * 16 + n];
            for (int k = 0; k < 16; ++k) s += emu_wmma_float(a.x[m * 16 + k]) * emu_wmma_float(b.x[k * 16 + n]);
            out[m * 16 + n] = s;
        }
    for (int i = 0; i < 16 * 16; ++i) d.x[i] = out[i];
}
}  // namespace wmma
}  // namespace nvcuda
