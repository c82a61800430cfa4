// A small CUDA block emulator: one std::thread per CUDA thread, one block at a time, warps
// synchronised by barriers. Enough for kernels that use the thread/block indices, warp
// shuffles and __syncwarp / __syncthreads: it checks their arithmetic and indexing on a CPU,
// not the GPU's math library, scheduling or memory model.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#include <algorithm>
#include <atomic>
struct dim3e { unsigned x = 1, y = 1, z = 1; };
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct int4 { int x, y, z, w; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
static inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
thread_local dim3e threadIdx;
dim3e blockIdx, blockDim, gridDim;
std::unique_ptr<std::barrier<>> g_block_bar;
std::vector<std::unique_ptr<std::barrier<>>> g_warp_bar;
double g_shfl[1024];
static inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
static inline void __syncwarp() { g_warp_bar[threadIdx.x / 32]->arrive_and_wait(); }
[[noreturn]] static inline void __trap() { std::fprintf(stderr, "__trap() in a kernel\n"); std::abort(); }
template <class T> static inline T __shfl_xor_sync(unsigned, T v, int o) {
    int t = threadIdx.x, w = t / 32, l = t % 32;
    g_shfl[t] = (double)v;
    g_warp_bar[w]->arrive_and_wait();
    T r = (T)g_shfl[w * 32 + (l ^ o)];
    g_warp_bar[w]->arrive_and_wait();
    return r;
}
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
static inline double __dadd_rn(double a, double b) { volatile double r = a + b; return r; }
static inline double __dsub_rn(double a, double b) { volatile double r = a - b; return r; }
static inline double __dmul_rn(double a, double b) { volatile double r = a * b; return r; }
static inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
static inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
static inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
static inline float __fsqrt_rn(float a) { return std::sqrt(a); }
static inline double __longlong_as_double(long long x) { double d; std::memcpy(&d, &x, 8); return d; }
static inline float __int_as_float(int x) { float d; std::memcpy(&d, &x, 4); return d; }
using std::min; using std::max; using std::isfinite; using std::fmax; using std::fma;
static inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
// launch f over a (gx, gy, gz) grid of 1-D blocks, one block at a time
template <class F> void launch3(unsigned gx, unsigned gy, unsigned gz, unsigned block, F f) {
    gridDim.x = gx; gridDim.y = gy; gridDim.z = gz; blockDim.x = block;
    g_block_bar = std::make_unique<std::barrier<>>(block);
    g_warp_bar.clear();
    for (unsigned w = 0; w < (block + 31) / 32; ++w) g_warp_bar.push_back(std::make_unique<std::barrier<>>(32));
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                blockIdx.x = x; blockIdx.y = y; blockIdx.z = z;
                std::vector<std::thread> ts;
                for (unsigned t = 0; t < block; ++t) ts.emplace_back([t, &f] { threadIdx.x = t; f(); });
                for (auto& t : ts) t.join();
            }
}
template <class F> void launch(unsigned grid, unsigned block, F f) { launch3(grid, 1, 1, block, f); }
// CUDA's single-precision math, as the kernels name it
#define __restrict__
#define erff(x) std::erf((float)(x))
#define expf(x) std::exp((float)(x))
#define sqrtf(x) std::sqrt((float)(x))
#define fmaf(a, b, c) std::fma((float)(a), (float)(b), (float)(c))
#define fmaxf(a, b) std::fmax((float)(a), (float)(b))
#define fminf(a, b) std::fmin((float)(a), (float)(b))
#define erfcf(x) std::erfc((float)(x))
using std::sqrt; using std::exp; using std::fmin;
