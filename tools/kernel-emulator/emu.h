// A small CUDA block emulator: one std::thread per CUDA thread, one block at a time, warps
// synchronised by barriers. Enough for kernels that use the thread/block indices, warp
// collectives (shuffles, ballot, match_any, also over a sub-mask of the warp), atomics,
// static and dynamic shared memory, __syncwarp / __syncthreads and early returns: it checks
// their arithmetic and indexing on a CPU, not the GPU's math library, scheduling or memory
// model.
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
#include <condition_variable>
#include <map>
#include <mutex>
struct dim3e { unsigned x = 1, y = 1, z = 1; };
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct int4 { int x, y, z, w; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
static inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
static inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
static inline float2 make_float2(float a, float b) { return {a, b}; }
thread_local dim3e threadIdx;
dim3e blockIdx, blockDim, gridDim;
std::unique_ptr<std::barrier<>> g_block_bar;
std::vector<std::unique_ptr<std::barrier<>>> g_warp_bar;
uint64_t g_shfl[1024];
unsigned g_dyn_smem_bytes = 0;
alignas(128) unsigned char g_dyn_smem[232448];  // an H200 block's most shared memory
// Values pass through the warp as raw bytes (any type up to 8 bytes, u64 keys included).
template <class T> static inline uint64_t emu_bits(T v) {
    static_assert(sizeof(T) <= 8, "warp values up to 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T> static inline T emu_value(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}
// Lanes that exist in warp w of this block (the last warp may be partial).
static inline unsigned emu_present(int w) {
    const unsigned n = std::min(32u, blockDim.x - 32u * (unsigned)w);
    return n == 32 ? 0xffffffffu : (1u << n) - 1u;
}
// Collectives over a sub-mask of a warp: the lanes named in `mask` meet (lanes of several disjoint
// groups may meet at the same time), each leaves with every member's value. A whole warp uses the
// faster barrier path below.
struct EmuWarpMeet {
    std::mutex mu;
    std::condition_variable cv;
    struct Group { unsigned arrived = 0; unsigned long gen = 0; uint64_t vals[32], done[32]; };
    std::map<unsigned, Group> groups;
};
std::vector<std::unique_ptr<EmuWarpMeet>> g_warp_meet;
static inline void emu_exchange(unsigned mask, uint64_t v, uint64_t (&out)[32]) {
    const int t = threadIdx.x, w = t / 32, l = t % 32;
    mask &= emu_present(w);
    if (!(mask >> l & 1u)) { std::fprintf(stderr, "warp collective from a lane outside its mask\n"); std::abort(); }
    if (mask == emu_present(w)) {
        g_shfl[t] = v;
        g_warp_bar[w]->arrive_and_wait();
        for (int i = 0; i < 32; ++i) out[i] = g_shfl[w * 32 + i];
        g_warp_bar[w]->arrive_and_wait();
        return;
    }
    EmuWarpMeet& m = *g_warp_meet[w];
    std::unique_lock<std::mutex> lock(m.mu);
    auto& g = m.groups[mask];
    g.vals[l] = v;
    g.arrived |= 1u << l;
    if (g.arrived == mask) {
        std::memcpy(g.done, g.vals, sizeof g.vals);
        g.arrived = 0;
        ++g.gen;
        m.cv.notify_all();
    } else {
        const unsigned long gen = g.gen;
        m.cv.wait(lock, [&] { return g.gen != gen; });
    }
    std::memcpy(out, g.done, sizeof out);
}
static inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) { uint64_t o[32]; emu_exchange(mask, 0, o); }
[[noreturn]] static inline void __trap() { std::fprintf(stderr, "__trap() in a kernel\n"); std::abort(); }
template <class T> static inline T __shfl_sync(unsigned mask, T v, int src) {
    uint64_t o[32];
    emu_exchange(mask, emu_bits(v), o);
    return emu_value<T>(o[src & 31]);
}
template <class T> static inline T __shfl_xor_sync(unsigned mask, T v, int x) {
    uint64_t o[32];
    emu_exchange(mask, emu_bits(v), o);
    return emu_value<T>(o[(threadIdx.x % 32) ^ (x & 31)]);
}
template <class T> static inline T __shfl_down_sync(unsigned mask, T v, unsigned d) {
    uint64_t o[32];
    emu_exchange(mask, emu_bits(v), o);
    const unsigned l = threadIdx.x % 32;
    return emu_value<T>(o[l + d < 32 ? l + d : l]);
}
static inline unsigned __ballot_sync(unsigned mask, int pred) {
    uint64_t o[32];
    emu_exchange(mask, pred ? 1 : 0, o);
    unsigned r = 0;
    mask &= emu_present(threadIdx.x / 32);
    for (int i = 0; i < 32; ++i) if ((mask >> i & 1u) && o[i]) r |= 1u << i;
    return r;
}
template <class T> static inline unsigned __match_any_sync(unsigned mask, T v) {
    uint64_t o[32];
    const uint64_t b = emu_bits(v);
    emu_exchange(mask, b, o);
    unsigned r = 0;
    mask &= emu_present(threadIdx.x / 32);
    for (int i = 0; i < 32; ++i) if ((mask >> i & 1u) && o[i] == b) r |= 1u << i;
    return r;
}
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
static inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
template <class T> static inline T __ldcs(const T* p) { return *p; }
template <class T> static inline T __ldg(const T* p) { return *p; }
// Dynamic shared memory: one static buffer (one block runs at a time), sized by the launch.
#define RRRA_EMULATOR 1
#define RRRA_DYNAMIC_SMEM(align, type, name) type* name = reinterpret_cast<type*>(g_dyn_smem)
static inline unsigned dynamic_smem_bytes() { return g_dyn_smem_bytes; }
#define __align__(x) __attribute__((aligned(x)))  // also valid after `static` (__shared__)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
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
template <class T> static inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <class T> static inline T atomicMax(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v)) {}
    return old;
}
template <class T> static inline T atomicMin(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {}
    return old;
}
// launch f over a (gx, gy, gz) grid of 1-D blocks with `smem` bytes of dynamic shared memory,
// one block at a time. A thread that returns leaves the block's and its warp's barriers, as an
// exited GPU thread no longer holds up __syncthreads.
template <class F> void launch3(unsigned gx, unsigned gy, unsigned gz, unsigned block, F f, unsigned smem = 0) {
    if (smem > sizeof g_dyn_smem) { std::fprintf(stderr, "dynamic shared memory %u > %zu\n", smem, sizeof g_dyn_smem); std::abort(); }
    gridDim.x = gx; gridDim.y = gy; gridDim.z = gz; blockDim.x = block;
    g_dyn_smem_bytes = smem;
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                blockIdx.x = x; blockIdx.y = y; blockIdx.z = z;
                // fresh barriers per block: the previous block's exited threads dropped out of theirs
                g_block_bar = std::make_unique<std::barrier<>>(block);
                g_warp_bar.clear();
                g_warp_meet.clear();
                for (unsigned w = 0; w < (block + 31) / 32; ++w) {
                    g_warp_bar.push_back(std::make_unique<std::barrier<>>(std::min(32u, block - 32 * w)));
                    g_warp_meet.push_back(std::make_unique<EmuWarpMeet>());
                }
                std::memset(g_dyn_smem, 0xA5, smem);  // poisoned: a read before a write shows
                std::atomic<int> block_live((int)block);
                std::vector<std::atomic<int>> warp_live((block + 31) / 32);
                for (unsigned w = 0; w < warp_live.size(); ++w) warp_live[w] = (int)std::min(32u, block - 32 * w);
                std::vector<std::thread> ts;
                for (unsigned t = 0; t < block; ++t)
                    ts.emplace_back([t, &f, &block_live, &warp_live] {
                        threadIdx.x = t;
                        f();
                        // The last thread to leave does not drop: a barrier left with no
                        // participants divides by zero in libstdc++, and nobody waits on it.
                        if (warp_live[t / 32].fetch_sub(1) > 1) g_warp_bar[t / 32]->arrive_and_drop();
                        if (block_live.fetch_sub(1) > 1) g_block_bar->arrive_and_drop();
                    });
                for (auto& t : ts) t.join();
            }
}
template <class F> void launch(unsigned grid, unsigned block, F f, unsigned smem = 0) { launch3(grid, 1, 1, block, f, smem); }
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
