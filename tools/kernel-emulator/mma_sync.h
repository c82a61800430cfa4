// Host stand-ins for the inline-PTX warp-matrix helpers of kernels/attention.cu (hidden there
// under RRRA_EMULATOR): mma.sync.m16n8k16 bf16 → f32, ldmatrix .x4 / .x4.trans and cp.async,
// with the PTX ISA's fragment layouts. Lanes meet through emu.h's warp exchange, so a fragment
// a lane did not supply reaches the others only the way the hardware moves it.
// Include after emu.h and before the kernel file.
#pragma once
#include <cuda_bf16.h>
#include "emu.h"

static inline float emu_bf16_lo(unsigned u) { return __uint_as_float(u << 16); }
static inline float emu_bf16_hi(unsigned u) { return __uint_as_float(u & 0xffff0000u); }

// d += A·B, A 16x16 row-major, B 16x8, f32 accumulate. g = lane / 4, t = lane % 4:
// a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..];
// b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]; d0,d1 = D[g][2t..2t+1], d2,d3 = D[g+8][2t..].
// bf16 products are exact in f32; the 16 are summed in k order, then added to c (the hardware's
// order is unspecified: it differs from this by f32 rounding only). The six fragment registers
// of every lane meet in one warp rendezvous (emu.h's warp barrier, as its shuffles use): a third
// of the cost of three 64-bit shuffles, which dominates the emulated bf16 kernels.
static unsigned emu_mma_frag[1024][6];
static inline void mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    const int tid = threadIdx.x, w = tid / 32;
    if (emu_present(w) != 0xffffffffu) { std::fprintf(stderr, "mma.sync needs a whole warp\n"); std::abort(); }
    unsigned* mine = emu_mma_frag[tid];
    mine[0] = a[0]; mine[1] = a[1]; mine[2] = a[2]; mine[3] = a[3]; mine[4] = b0; mine[5] = b1;
    g_warp_bar[w]->arrive_and_wait();  // every lane's fragments are written
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const unsigned* r = emu_mma_frag[w * 32 + l];
        const int gl = l >> 2, tl = l & 3;
        for (int f = 0; f < 4; ++f) {
            const int row = gl + ((f & 1) ? 8 : 0), col = 2 * tl + ((f & 2) ? 8 : 0);
            A[row][col] = emu_bf16_lo(r[f]);
            A[row][col + 1] = emu_bf16_hi(r[f]);
        }
        const unsigned c0 = r[4], c1 = r[5];
        B[2 * tl][gl] = emu_bf16_lo(c0);
        B[2 * tl + 1][gl] = emu_bf16_hi(c0);
        B[2 * tl + 8][gl] = emu_bf16_lo(c1);
        B[2 * tl + 9][gl] = emu_bf16_hi(c1);
    }
    const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    for (int e = 0; e < 4; ++e) {
        const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
        float s = 0.0f;
        for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
        d[e] += s;
    }
    g_warp_bar[w]->arrive_and_wait();  // read by all before any lane writes its next fragments
}

// Four 8x8 b16 matrices: lane i gives the address of row i % 8 of matrix i / 8. Plain: register
// j of lane l = matrix j, row l / 4, elements 2(l % 4), 2(l % 4) + 1 (the lower in the low half).
// .trans: the same of the transposed matrix, i.e. (M_j[2(l%4)][l/4], M_j[2(l%4)+1][l/4]).
static inline void emu_ldmatrix_x4(unsigned (&r)[4], const __nv_bfloat16* p, bool trans) {
    uint64_t addr[32];
    emu_exchange(0xffffffffu, (uint64_t)(uintptr_t)p, addr);
    const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    auto row = [&](int i) { return reinterpret_cast<const unsigned short*>((uintptr_t)addr[i]); };
    for (int j = 0; j < 4; ++j) {
        unsigned lo, hi;
        if (trans) {
            lo = row(j * 8 + 2 * t)[g];
            hi = row(j * 8 + 2 * t + 1)[g];
        } else {
            lo = row(j * 8 + g)[2 * t];
            hi = row(j * 8 + g)[2 * t + 1];
        }
        r[j] = lo | hi << 16;
    }
}
static inline void ldmatrix_x4(unsigned (&r)[4], const __nv_bfloat16* p) { emu_ldmatrix_x4(r, p, false); }
static inline void ldmatrix_x4_trans(unsigned (&r)[4], const __nv_bfloat16* p) { emu_ldmatrix_x4(r, p, true); }

// cp.async as a synchronous copy: the data is there at once, so a missing wait cannot show here.
static inline void cp_async_16(__nv_bfloat16* dst, const __nv_bfloat16* src, bool valid) {
    if (valid) std::memcpy(dst, src, 16);
    else std::memset(dst, 0, 16);
}
static inline void cp_async_commit() {}
template <int N> static inline void cp_async_wait() {}
