// A host stand-in for the pieces of CUDA's f16 header the emulated kernels use: the __half
// type, round-to-nearest-even f32 → f16 (subnormals, overflow to infinity, NaN kept a NaN),
// exact widening, and the bit casts.
#pragma once
#include <cstring>
struct __half { unsigned short x; };
static inline float __half2float(__half h) {
    const unsigned s = (unsigned)(h.x & 0x8000u) << 16, e = (h.x >> 10) & 0x1fu, m = h.x & 0x3ffu;
    unsigned u;
    if (e == 0x1f) {
        u = s | 0x7f800000u | (m << 13);
    } else if (e != 0) {
        u = s | ((e + 112) << 23) | (m << 13);
    } else if (m == 0) {
        u = s;
    } else {  // subnormal: m · 2^-24, exact in f32
        float f = (float)m * 5.9604644775390625e-8f;
        std::memcpy(&u, &f, 4);
        u |= s;
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline __half __float2half_rn(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    const unsigned short sign = (unsigned short)((u >> 16) & 0x8000u);
    const unsigned a = u & 0x7fffffffu;
    __half r;
    if (a > 0x7f800000u) { r.x = sign | 0x7e00u; return r; }  // NaN
    if (a >= 0x477ff000u) { r.x = sign | 0x7c00u; return r; }  // rounds past 65504: infinity
    if (a < 0x38800000u) {  // below f16's smallest normal: a multiple of 2^-24, rounded to even
        float v;
        std::memcpy(&v, &a, 4);
        const float q = v * 16777216.0f;  // exact (power of two)
        float t = __builtin_nearbyintf(q);  // the default rounding mode: to nearest, ties to even
        r.x = sign | (unsigned short)t;
        return r;
    }
    const unsigned e = (a >> 23) - 112, m = a & 0x7fffffu;
    unsigned h = (e << 10) | (m >> 13);
    const unsigned rest = m & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // carries into the exponent as it should
    r.x = sign | (unsigned short)h;
    return r;
}
static inline unsigned short __half_as_ushort(__half h) { return h.x; }
static inline __half __ushort_as_half(unsigned short b) { __half h; h.x = b; return h; }
