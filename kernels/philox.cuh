// Philox4x32-10 (Salmon et al. 2011), exactly src/train/rng.rs::philox4x32_10: the counter-based
// generator of the samplers and of dropout. Host and device, so a port can be checked against
// the Rust values on a machine without a GPU.
#pragma once

// The high word of a 32 x 32-bit product: one IMAD.HI on the device (nvcc emits a widening
// multiply for the portable form).
__host__ __device__ __forceinline__ unsigned rrra_mulhi(unsigned a, unsigned b) {
#ifdef __CUDA_ARCH__
    return __umulhi(a, b);
#else
    return (unsigned)(((unsigned long long)a * (unsigned long long)b) >> 32);
#endif
}

__host__ __device__ __forceinline__ uint4 rrra_philox4x32_10(uint4 c, unsigned k0, unsigned k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const unsigned hi0 = rrra_mulhi(0xD2511F53u, c.x);
        const unsigned lo0 = 0xD2511F53u * c.x;
        const unsigned hi1 = rrra_mulhi(0xCD9E8D57u, c.z);
        const unsigned lo1 = 0xCD9E8D57u * c.z;
        c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
    }
    return c;
}

// Word n of the stream whose key is (w[0], w[1]) and counter high words (w[2], w[3]) as a
// uniform in [0, 1) with 24 random bits: Stream::uniform_at.
__host__ __device__ __forceinline__ float rrra_uniform_at(unsigned long long n, const unsigned* w) {
    const unsigned long long blk = n / 4;
    const uint4 b = rrra_philox4x32_10(
        make_uint4((unsigned)blk, (unsigned)(blk >> 32), w[2], w[3]), w[0], w[1]);
    const unsigned x = (n % 4 == 0) ? b.x : (n % 4 == 1) ? b.y : (n % 4 == 2) ? b.z : b.w;
    return (float)(x >> 8) * (1.0f / 16777216.0f);
}
