/* Bit-exact IEEE binary16 <-> binary32 conversion in portable C.
 * Semantics match numpy's astype(np.float16) / astype(np.float32): round to nearest even,
 * overflow to inf, subnormals kept, NaN payload truncated (and kept a NaN), signalling NaNs
 * stay signalling. The SIMD paths use F16C / NEON and fall back to these for NaNs. */
#ifndef RV_FP16_H
#define RV_FP16_H

#include <stdint.h>
#include <string.h>

static inline float rv_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {            /* subnormal half: normalise into a float exponent */
            uint32_t e = 0;
            while (!(man & 0x400u)) {
                man <<= 1;
                e++;
            }
            bits = sign | ((113u - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t rv_f32_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) {
        if (ax == 0x7f800000u)
            return sign | 0x7c00u;
        uint16_t nan = (uint16_t)(0x7c00u | ((ax & 0x7fffffu) >> 13));
        return sign | (nan == 0x7c00u ? 0x7c01u : nan);
    }
    if (ax >= 0x477ff000u)          /* >= 65520 rounds to inf */
        return sign | 0x7c00u;
    if (ax >= 0x38800000u) {        /* normal half: round the 13 dropped bits to nearest even */
        uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u);
        return sign | (uint16_t)((r - 0x38000000u) >> 13);
    }
    if (ax <= 0x33000000u)          /* <= 2^-25: rounds to (even) zero */
        return sign;
    /* subnormal half: code = value / 2^-24 = mantissa >> (126 - exponent), rounded to even */
    uint32_t e = ax >> 23;
    uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - e;
    uint32_t code = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (code & 1u)))
        code++;
    return sign | (uint16_t)code;
}

/* value i's magnitude as bits: float32, or float16 bits when src_is_f16 */
static inline uint32_t rv_magnitude_bits(const void *src, int64_t i, int src_is_f16)
{
    if (src_is_f16) {
        uint16_t h;
        memcpy(&h, (const uint16_t *)src + i, 2);
        return h & 0x7fffu;
    }
    uint32_t bits;
    memcpy(&bits, (const float *)src + i, 4);
    return bits & 0x7fffffffu;
}

/* The index of the first of n values (float32, or float16 bits when src_is_f16) that a KV
 * cache cannot keep, -1 if none: a NaN or an infinity, or (to_f16) a float32 whose float16 is
 * infinite, |x| >= 65520 (65504 is float16's largest; below 65520 rounds to it). Chunks of
 * 256 values are screened with branch-free compares (they vectorise), and only a chunk that
 * holds one is searched. */
static inline int64_t rv_first_unstorable(const void *src, int64_t n, int src_is_f16, int to_f16)
{
    /* magnitudes' bits at or above this are out: 65520.0f's, or infinity's (NaNs are above) */
    const uint32_t limit = src_is_f16 ? 0x7c00u : (to_f16 ? 0x477ff000u : 0x7f800000u);
    for (int64_t i0 = 0; i0 < n; i0 += 256) {
        const int64_t i1 = n - i0 < 256 ? n : i0 + 256;
        uint32_t out = 0;
        for (int64_t i = i0; i < i1; i++)
            out |= rv_magnitude_bits(src, i, src_is_f16) >= limit;
        if (out)
            for (int64_t i = i0; i < i1; i++)
                if (rv_magnitude_bits(src, i, src_is_f16) >= limit)
                    return i;
    }
    return -1;
}

#endif
