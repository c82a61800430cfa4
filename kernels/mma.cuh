// Warp-level tensor-core helpers shared by the bf16 kernels (kernels/attention.cu,
// kernels/attention_backward.cu): bf16 pair packing, mma.sync m16n8k16 bf16 -> f32, ldmatrix
// .x4 / .x4.trans and cp.async, as inline PTX. The CPU block emulator supplies its own
// mma / ldmatrix / cp.async (tools/kernel-emulator/mma_sync.h, included before this header).
#pragma once

#include "bert_common.cuh"

__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // lo -> low 16 bits
    return *reinterpret_cast<const unsigned*>(&v);
}

__device__ __forceinline__ float2 unpack_bf16x2(unsigned u) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u));
}

// Inline PTX; the CPU emulator supplies its own (tools/kernel-emulator/mma_sync.h).
#ifndef RRRA_EMULATOR
// d += a * b for a 16x16 (row-major) bf16 A, 16x8 (column-major) bf16 B, 16x8 f32 D. Fragments
// (g = lane / 4, t = lane % 4): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..],
// a[3] = A[g+8][2t+8..]; b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]; d[0..1] = D[g][2t..2t+1],
// d[2..3] = D[g+8][2t..2t+1]. The lower-indexed element of a pair is in the low 16 bits.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                               unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 b16 matrices from shared memory; lane l gives the address of row l % 8 of matrix
// l / 8 (16 contiguous bytes). Plain: register i of lane (g, t) = M_i[g][2t..2t+1], the B
// fragment of a row-major [n][k] tile. .trans: register i = (M_i[2t][g], M_i[2t+1][g]), the B
// fragment of a row-major [k][n] tile.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const bf16* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const bf16* p) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

// 16-byte asynchronous global -> shared copy; `valid == false` writes 16 zero bytes and reads
// nothing.
__device__ __forceinline__ void cp_async_16(bf16* dst, const bf16* src, bool valid) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

// ---- f32 or bf16 rows into bf16 operands (the training attention kernels) ----
// T is the stored element type: f32 (the f32 activations' step) or bf16 (GemmMath::Bf16's step,
// whose QKV is stored in bf16). Math is f32 in both: (x + bias) * mul rounded once to bf16.

// Rows r0 .. r0 + R of a [* x ld] matrix of T, columns 0 .. DH, (x + bias[c] when given) * mul
// rounded to bf16 into dst [R][DH + 8]; rows >= n are zero.
template <int DH, int R, typename T>
__device__ __forceinline__ void load_bf16_tile(bf16* dst, const T* __restrict__ src, size_t ld,
                                               int r0, int n, const float* __restrict__ bias,
                                               float mul = 1.0f) {
    constexpr int KS = DH + 8;
    for (int i = threadIdx.x; i < R * DH / 4; i += blockDim.x) {
        const int r = i / (DH / 4), c = 4 * (i % (DH / 4));
        uint2 u = make_uint2(0u, 0u);
        if (r0 + r < n) {
            float4 x = load4(src + (size_t)(r0 + r) * ld + c);
            if (bias) x = add4(x, load4(bias + c));
            u = make_uint2(pack_bf16x2(x.x * mul, x.y * mul),
                           pack_bf16x2(x.z * mul, x.w * mul));
        }
        *reinterpret_cast<uint2*>(dst + r * KS + c) = u;
    }
}

// The A fragments of rows ra (fragment row g) and rb = ra + 8 of a [* x ld] matrix of T over
// columns 0 .. DH, (x + bias) * mul rounded once; rows >= n are zero.
template <int DH, typename T>
__device__ __forceinline__ void load_a_frags(unsigned (&fr)[DH / 16][4], const T* __restrict__ src,
                                             size_t ld, int ra, int rb, int n,
                                             const float* __restrict__ bias, float mul) {
    const int t = (threadIdx.x % RRRA_WARP) & 3;
#pragma unroll
    for (int ks = 0; ks < DH / 16; ++ks) {
#pragma unroll
        for (int f = 0; f < 4; ++f) {
            const int r = (f & 1) ? rb : ra;
            const int c = ks * 16 + 2 * t + ((f & 2) ? 8 : 0);
            unsigned u = 0;
            if (r < n) {
                const T* x = src + (size_t)r * ld + c;
                const float b0 = bias ? bias[c] : 0.0f, b1 = bias ? bias[c + 1] : 0.0f;
                u = pack_bf16x2((load1(x) + b0) * mul, (load1(x + 1) + b1) * mul);
            }
            fr[ks][f] = u;
        }
    }
}

// Two adjacent outputs (column c, c + 1 of a row) of an f32 or bf16 matrix.
__device__ __forceinline__ void store2(float* p, float a, float b) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
__device__ __forceinline__ void store2(bf16* p, float a, float b) {
    *reinterpret_cast<unsigned*>(p) = pack_bf16x2(a, b);
}

// ---- warp products over shared tiles (attention forward and backward) ----

// acc[nt] = A . B^T for the warp's 16 rows (A fragments `a`) and the N rows of a shared tile
// `Bs` [N][DH + 8] (bf16, 16-byte row skew) as the columns, over the DH dims: S = Q K^T.
template <int DH, int N>
__device__ __forceinline__ void rows_times_tile(float (&acc)[N / 8][4],
                                                const unsigned (&a)[DH / 16][4], const bf16* Bs) {
    constexpr int KS = DH + 8;
    const int lane = threadIdx.x % RRRA_WARP, lrow = lane & 7, lmat = lane >> 3;
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < DH / 16; ks += 2) {
            unsigned b[4];
            ldmatrix_x4(b, Bs + (nt * 8 + lrow) * KS + ks * 16 + lmat * 8);
            mma_bf16_16816(acc[nt], a[ks], b[0], b[1]);
            mma_bf16_16816(acc[nt], a[ks + 1], b[2], b[3]);
        }
    }
}

// out[dt] += X . Bs for the warp's 16 rows of X ([16][N] in f32 accumulator layout, rounded to
// bf16 A fragments here) and a shared tile Bs [N][DH + 8] as [k][n]: O += P V.
template <int DH, int N>
__device__ __forceinline__ void acc_times_tile(float (&out)[DH / 8][4], const float (&x)[N / 8][4],
                                               const bf16* Bs) {
    constexpr int KS = DH + 8;
    const int lane = threadIdx.x % RRRA_WARP, lrow = lane & 7, lmat = lane >> 3;
#pragma unroll
    for (int kk = 0; kk < N / 16; ++kk) {
        const unsigned a[4] = {pack_bf16x2(x[2 * kk][0], x[2 * kk][1]),
                               pack_bf16x2(x[2 * kk][2], x[2 * kk][3]),
                               pack_bf16x2(x[2 * kk + 1][0], x[2 * kk + 1][1]),
                               pack_bf16x2(x[2 * kk + 1][2], x[2 * kk + 1][3])};
#pragma unroll
        for (int dt = 0; dt < DH / 8; dt += 2) {
            unsigned b[4];
            ldmatrix_x4_trans(
                b, Bs + (kk * 16 + (lmat & 1) * 8 + lrow) * KS + (dt + (lmat >> 1)) * 8);
            mma_bf16_16816(out[dt], a, b[0], b[1]);
            mma_bf16_16816(out[dt + 1], a, b[2], b[3]);
        }
    }
}
