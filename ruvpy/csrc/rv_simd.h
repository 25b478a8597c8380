/* A small float32 SIMD vocabulary, one definition per ISA.
 * Exactly one of RV_ISA_SCALAR, RV_ISA_AVX2, RV_ISA_AVX512, RV_ISA_NEON is defined by the
 * translation unit that includes this (kernels/ops_<isa>.c); kernel templates written with
 * rv_vf_* then compile to that ISA. RV_VW is the number of float lanes.
 *
 *   rv_vf_zero() rv_vf_set1(x) rv_vf_load(p) rv_vf_store(p,v)       unaligned memory ops
 *   rv_vf_add/sub/mul/max/min(a,b)  rv_vf_fmadd(a,b,c) = a*b+c
 *   rv_vf_hsum(v) rv_vf_hmax(v)                                       horizontal reductions
 *   rv_vf_load_f16(const uint16_t*) rv_vf_store_f16(uint16_t*, v)    fp16 <-> f32 (RNE)
 *   rv_vf_exp(v)                                                      exp, rel. err ~2 ulp;
 *                        0 below -87.3 (and for -inf), +inf above ln(FLT_MAX), NaN stays NaN
 */
#ifndef RV_SIMD_H
#define RV_SIMD_H

#include <math.h>
#include <stdint.h>
#include "rv_common.h"
#include "rv_fp16.h"

#if defined(RV_ISA_AVX512)
#include <immintrin.h>
#define RV_VW 16
typedef __m512 rv_vf;
RV_INLINE rv_vf rv_vf_zero(void) { return _mm512_setzero_ps(); }
RV_INLINE rv_vf rv_vf_set1(float x) { return _mm512_set1_ps(x); }
RV_INLINE rv_vf rv_vf_load(const float *p) { return _mm512_loadu_ps(p); }
RV_INLINE void rv_vf_store(float *p, rv_vf v) { _mm512_storeu_ps(p, v); }
RV_INLINE rv_vf rv_vf_add(rv_vf a, rv_vf b) { return _mm512_add_ps(a, b); }
RV_INLINE rv_vf rv_vf_sub(rv_vf a, rv_vf b) { return _mm512_sub_ps(a, b); }
RV_INLINE rv_vf rv_vf_mul(rv_vf a, rv_vf b) { return _mm512_mul_ps(a, b); }
RV_INLINE rv_vf rv_vf_max(rv_vf a, rv_vf b) { return _mm512_max_ps(a, b); }
RV_INLINE rv_vf rv_vf_min(rv_vf a, rv_vf b) { return _mm512_min_ps(a, b); }
RV_INLINE rv_vf rv_vf_fmadd(rv_vf a, rv_vf b, rv_vf c) { return _mm512_fmadd_ps(a, b, c); }
RV_INLINE float rv_vf_hsum(rv_vf v) { return _mm512_reduce_add_ps(v); }
RV_INLINE float rv_vf_hmax(rv_vf v) { return _mm512_reduce_max_ps(v); }
RV_INLINE rv_vf rv_vf_load_f16(const uint16_t *p)
{
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
RV_INLINE void rv_vf_store_f16(uint16_t *p, rv_vf v)
{
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
/* 2^n for integer-valued float n (|n| <= 127) built in the exponent field */
RV_INLINE rv_vf rv_vf_pow2i(rv_vf n)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
RV_INLINE rv_vf rv_vf_round(rv_vf v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* r where x is not below lo (NaN lanes kept), else 0 */
RV_INLINE rv_vf rv_vf_zero_below(rv_vf r, rv_vf x, float lo)
{
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(lo), _CMP_NLT_UQ), r);
}

#elif defined(RV_ISA_AVX2)
#include <immintrin.h>
#define RV_VW 8
typedef __m256 rv_vf;
RV_INLINE rv_vf rv_vf_zero(void) { return _mm256_setzero_ps(); }
RV_INLINE rv_vf rv_vf_set1(float x) { return _mm256_set1_ps(x); }
RV_INLINE rv_vf rv_vf_load(const float *p) { return _mm256_loadu_ps(p); }
RV_INLINE void rv_vf_store(float *p, rv_vf v) { _mm256_storeu_ps(p, v); }
RV_INLINE rv_vf rv_vf_add(rv_vf a, rv_vf b) { return _mm256_add_ps(a, b); }
RV_INLINE rv_vf rv_vf_sub(rv_vf a, rv_vf b) { return _mm256_sub_ps(a, b); }
RV_INLINE rv_vf rv_vf_mul(rv_vf a, rv_vf b) { return _mm256_mul_ps(a, b); }
RV_INLINE rv_vf rv_vf_max(rv_vf a, rv_vf b) { return _mm256_max_ps(a, b); }
RV_INLINE rv_vf rv_vf_min(rv_vf a, rv_vf b) { return _mm256_min_ps(a, b); }
RV_INLINE rv_vf rv_vf_fmadd(rv_vf a, rv_vf b, rv_vf c) { return _mm256_fmadd_ps(a, b, c); }
RV_INLINE float rv_vf_hsum(rv_vf v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
RV_INLINE float rv_vf_hmax(rv_vf v)
{
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
RV_INLINE rv_vf rv_vf_load_f16(const uint16_t *p)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
RV_INLINE void rv_vf_store_f16(uint16_t *p, rv_vf v)
{
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
RV_INLINE rv_vf rv_vf_pow2i(rv_vf n)
{
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
RV_INLINE rv_vf rv_vf_round(rv_vf v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
RV_INLINE rv_vf rv_vf_zero_below(rv_vf r, rv_vf x, float lo)
{
    return _mm256_and_ps(r, _mm256_cmp_ps(x, _mm256_set1_ps(lo), _CMP_NLT_UQ));
}

#elif defined(RV_ISA_NEON)
#include <arm_neon.h>
#define RV_VW 4
typedef float32x4_t rv_vf;
RV_INLINE rv_vf rv_vf_zero(void) { return vdupq_n_f32(0.0f); }
RV_INLINE rv_vf rv_vf_set1(float x) { return vdupq_n_f32(x); }
RV_INLINE rv_vf rv_vf_load(const float *p) { return vld1q_f32(p); }
RV_INLINE void rv_vf_store(float *p, rv_vf v) { vst1q_f32(p, v); }
RV_INLINE rv_vf rv_vf_add(rv_vf a, rv_vf b) { return vaddq_f32(a, b); }
RV_INLINE rv_vf rv_vf_sub(rv_vf a, rv_vf b) { return vsubq_f32(a, b); }
RV_INLINE rv_vf rv_vf_mul(rv_vf a, rv_vf b) { return vmulq_f32(a, b); }
RV_INLINE rv_vf rv_vf_max(rv_vf a, rv_vf b) { return vmaxq_f32(a, b); }
RV_INLINE rv_vf rv_vf_min(rv_vf a, rv_vf b) { return vminq_f32(a, b); }
RV_INLINE rv_vf rv_vf_fmadd(rv_vf a, rv_vf b, rv_vf c) { return vfmaq_f32(c, a, b); }
RV_INLINE float rv_vf_hsum(rv_vf v) { return vaddvq_f32(v); }
RV_INLINE float rv_vf_hmax(rv_vf v) { return vmaxvq_f32(v); }
RV_INLINE rv_vf rv_vf_load_f16(const uint16_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
RV_INLINE void rv_vf_store_f16(uint16_t *p, rv_vf v) { vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32(v))); }
RV_INLINE rv_vf rv_vf_pow2i(rv_vf n)
{
    return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)), 23));
}
RV_INLINE rv_vf rv_vf_round(rv_vf v) { return vrndnq_f32(v); }
RV_INLINE rv_vf rv_vf_zero_below(rv_vf r, rv_vf x, float lo)
{
    return vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(r), vcltq_f32(x, vdupq_n_f32(lo))));
}

#elif defined(RV_ISA_SCALAR)
#define RV_VW 1
typedef float rv_vf;
RV_INLINE rv_vf rv_vf_zero(void) { return 0.0f; }
RV_INLINE rv_vf rv_vf_set1(float x) { return x; }
RV_INLINE rv_vf rv_vf_load(const float *p) { return *p; }
RV_INLINE void rv_vf_store(float *p, rv_vf v) { *p = v; }
RV_INLINE rv_vf rv_vf_add(rv_vf a, rv_vf b) { return a + b; }
RV_INLINE rv_vf rv_vf_sub(rv_vf a, rv_vf b) { return a - b; }
RV_INLINE rv_vf rv_vf_mul(rv_vf a, rv_vf b) { return a * b; }
RV_INLINE rv_vf rv_vf_max(rv_vf a, rv_vf b) { return a > b ? a : b; }
RV_INLINE rv_vf rv_vf_min(rv_vf a, rv_vf b) { return a < b ? a : b; }
RV_INLINE rv_vf rv_vf_fmadd(rv_vf a, rv_vf b, rv_vf c) { return a * b + c; }
RV_INLINE float rv_vf_hsum(rv_vf v) { return v; }
RV_INLINE float rv_vf_hmax(rv_vf v) { return v; }
RV_INLINE rv_vf rv_vf_load_f16(const uint16_t *p) { return rv_f16_to_f32(*p); }
RV_INLINE void rv_vf_store_f16(uint16_t *p, rv_vf v) { *p = rv_f32_to_f16(v); }
RV_INLINE rv_vf rv_vf_exp(rv_vf x) { return expf(x); }
#define RV_HAVE_NATIVE_EXP 1

#else
#error "define one of RV_ISA_SCALAR, RV_ISA_AVX2, RV_ISA_AVX512, RV_ISA_NEON before rv_simd.h"
#endif

/* Byte lanes for the integer dot kernels (VPMADDUBSW / VPDPBUSD take four u8 x s8 or u8 x u8
 * pairs per int32 lane). rv_interleave4_epi8: from four tokens' bytes T[0..3], X[k] holds in
 * each int32 lane one channel's four tokens; per 128-bit lane L, X[k] covers that lane's
 * channels 4k .. 4k + 3. */
#if defined(RV_ISA_AVX512)
/* a 4 x 4 transpose of 128-bit lanes: lane L of out[k] = lane k of in[L] (the sums of a 4-way
 * interleave come out as lane L of in[k] = elements 4k .. 4k + 3 of slice L) */
RV_INLINE void rv512_transpose_lanes4(const __m512i in[4], __m512i out[4])
{
    const __m512i a = _mm512_shuffle_i32x4(in[0], in[1], 0x44), b = _mm512_shuffle_i32x4(in[0], in[1], 0xEE);
    const __m512i c = _mm512_shuffle_i32x4(in[2], in[3], 0x44), e = _mm512_shuffle_i32x4(in[2], in[3], 0xEE);
    out[0] = _mm512_shuffle_i32x4(a, c, 0x88);
    out[1] = _mm512_shuffle_i32x4(a, c, 0xDD);
    out[2] = _mm512_shuffle_i32x4(b, e, 0x88);
    out[3] = _mm512_shuffle_i32x4(b, e, 0xDD);
}

RV_INLINE void rv_interleave4_epi8(const __m512i T[4], __m512i X[4])
{
    const __m512i ablo = _mm512_unpacklo_epi8(T[0], T[1]), abhi = _mm512_unpackhi_epi8(T[0], T[1]);
    const __m512i celo = _mm512_unpacklo_epi8(T[2], T[3]), cehi = _mm512_unpackhi_epi8(T[2], T[3]);
    X[0] = _mm512_unpacklo_epi16(ablo, celo);
    X[1] = _mm512_unpackhi_epi16(ablo, celo);
    X[2] = _mm512_unpacklo_epi16(abhi, cehi);
    X[3] = _mm512_unpackhi_epi16(abhi, cehi);
}
#elif defined(RV_ISA_AVX2)
RV_INLINE void rv_interleave4_epi8(const __m256i T[4], __m256i X[4])
{
    const __m256i ablo = _mm256_unpacklo_epi8(T[0], T[1]), abhi = _mm256_unpackhi_epi8(T[0], T[1]);
    const __m256i celo = _mm256_unpacklo_epi8(T[2], T[3]), cehi = _mm256_unpackhi_epi8(T[2], T[3]);
    X[0] = _mm256_unpacklo_epi16(ablo, celo);
    X[1] = _mm256_unpackhi_epi16(ablo, celo);
    X[2] = _mm256_unpacklo_epi16(abhi, cehi);
    X[3] = _mm256_unpackhi_epi16(abhi, cehi);
}

/* the lanes i of 8 int32 whose index first + i lies in [lo, hi), as an all-ones mask (for
 * _mm256_maskload_ps / maskstore: a block's part that may be read or written) */
RV_INLINE __m256i rv256_lanes_in(int first, int lo, int hi)
{
    const __m256i t = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(first));
    return _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(lo), t), _mm256_cmpgt_epi32(_mm256_set1_epi32(hi), t));
}

/* 16 int32 in [0, 255] (q0 then q1) to 16 bytes in the same order; the packs work per
 * 128-bit lane (dwords t0-3 t8-11 | t4-7 t12-15), so one permute puts them back */
RV_INLINE __m128i rv256_pack_u8x16(__m256i q0, __m256i q1)
{
    const __m256i p = _mm256_packus_epi16(_mm256_packs_epi32(q0, q1), _mm256_setzero_si256());
    return _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}
#endif

#ifndef RV_HAVE_NATIVE_EXP
/* exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n ln2 (two-part ln2), exp(r) by a
 * degree-6 polynomial on |r| <= ln2/2. Inputs below -87.3 (including -inf) give exactly 0;
 * above ln(FLT_MAX) = 88.72 (including +inf) +inf; NaN gives NaN. */
RV_INLINE rv_vf rv_vf_exp(rv_vf x)
{
    /* Clamp to [-87.34, 88.75] so that -126 <= n <= 128. The bound goes first in max/min:
     * x86 returns the second operand when one is NaN, so NaN passes through. */
    rv_vf xc = rv_vf_min(rv_vf_set1(88.75f), rv_vf_max(rv_vf_set1(-87.3365478515625f), x));
    rv_vf n = rv_vf_round(rv_vf_mul(xc, rv_vf_set1(1.44269504088896341f)));
    rv_vf r = rv_vf_fmadd(n, rv_vf_set1(-0.693359375f), xc);
    r = rv_vf_fmadd(n, rv_vf_set1(2.12194440e-4f), r);
    rv_vf p = rv_vf_set1(1.9875691500e-4f);
    p = rv_vf_fmadd(p, r, rv_vf_set1(1.3981999507e-3f));
    p = rv_vf_fmadd(p, r, rv_vf_set1(8.3334519073e-3f));
    p = rv_vf_fmadd(p, r, rv_vf_set1(4.1665795894e-2f));
    p = rv_vf_fmadd(p, r, rv_vf_set1(1.6666665459e-1f));
    p = rv_vf_fmadd(p, r, rv_vf_set1(5.0000001201e-1f));
    rv_vf r2 = rv_vf_mul(r, r);
    p = rv_vf_fmadd(p, r2, rv_vf_add(r, rv_vf_set1(1.0f)));
    /* 2^128 has no float exponent: use 2^127 * 2 (exact; overflows to inf only when exp does) */
    rv_vf n127 = rv_vf_min(n, rv_vf_set1(127.0f));
    rv_vf y = rv_vf_mul(rv_vf_mul(p, rv_vf_pow2i(n127)), rv_vf_add(rv_vf_sub(n, n127), rv_vf_set1(1.0f)));
    return rv_vf_zero_below(y, x, -87.3365478515625f);
}
#endif

#endif
