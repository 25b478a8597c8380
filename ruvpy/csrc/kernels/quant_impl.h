/* KV-cache quantization kernels (see the "KV quantization" section of rv_ops.h), written once
 * against rv_simd.h and compiled per ISA. Included only by ops_<isa>.c.
 *
 * Code layout shared with csrc/kvcache/rv_twotier.c: a row of d codes is either d bytes
 * (8-bit) or ceil(d/2) bytes (4-bit), where byte j holds channel j in its low nibble and
 * channel j + ceil(d/2) in its high nibble -- so one vector of bytes unpacks to two vectors of
 * consecutive channels. */
#ifndef RV_QUANT_IMPL_H
#define RV_QUANT_IMPL_H

#include <string.h>
#include "rv_simd.h"
#include "kernels/rv_ops.h"

/* ---- RV_VW unsigned bytes as floats: whole bytes, low nibbles, high nibbles ---- */
#if defined(RV_ISA_AVX512)
RV_INLINE __m512i qk_bytes(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
RV_INLINE rv_vf qk_u8(const uint8_t *p) { return _mm512_cvtepi32_ps(qk_bytes(p)); }
RV_INLINE rv_vf qk_lo4(const uint8_t *p) { return _mm512_cvtepi32_ps(_mm512_and_si512(qk_bytes(p), _mm512_set1_epi32(15))); }
RV_INLINE rv_vf qk_hi4(const uint8_t *p) { return _mm512_cvtepi32_ps(_mm512_srli_epi32(qk_bytes(p), 4)); }
#elif defined(RV_ISA_AVX2)
RV_INLINE __m256i qk_bytes(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
RV_INLINE rv_vf qk_u8(const uint8_t *p) { return _mm256_cvtepi32_ps(qk_bytes(p)); }
RV_INLINE rv_vf qk_lo4(const uint8_t *p) { return _mm256_cvtepi32_ps(_mm256_and_si256(qk_bytes(p), _mm256_set1_epi32(15))); }
RV_INLINE rv_vf qk_hi4(const uint8_t *p) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(qk_bytes(p), 4)); }
#elif defined(RV_ISA_NEON)
RV_INLINE uint32x4_t qk_bytes(const uint8_t *p)
{
    uint32_t w;
    memcpy(&w, p, 4);                      /* exactly RV_VW bytes: never reads past a row */
    return vmovl_u16(vget_low_u16(vmovl_u8(vcreate_u8((uint64_t)w))));
}
RV_INLINE rv_vf qk_u8(const uint8_t *p) { return vcvtq_f32_u32(qk_bytes(p)); }
RV_INLINE rv_vf qk_lo4(const uint8_t *p) { return vcvtq_f32_u32(vandq_u32(qk_bytes(p), vdupq_n_u32(15))); }
RV_INLINE rv_vf qk_hi4(const uint8_t *p) { return vcvtq_f32_u32(vshrq_n_u32(qk_bytes(p), 4)); }
#else
RV_INLINE rv_vf qk_u8(const uint8_t *p) { return (float)p[0]; }
RV_INLINE rv_vf qk_lo4(const uint8_t *p) { return (float)(p[0] & 15); }
RV_INLINE rv_vf qk_hi4(const uint8_t *p) { return (float)(p[0] >> 4); }
#endif

/* out[c] = code of channel c, c < d, for one row (8 or 4 bits) */
RV_INLINE void qk_unpack_row(const uint8_t *row, int d, int bits, float *out)
{
    int j = 0;
    if (bits == 8) {
        for (; j + RV_VW <= d; j += RV_VW)
            rv_vf_store(out + j, qk_u8(row + j));
        for (; j < d; j++)
            out[j] = (float)row[j];
        return;
    }
    const int half = (d + 1) / 2, hi_n = d - half;      /* hi_n <= half */
    for (; j + RV_VW <= hi_n; j += RV_VW) {
        rv_vf_store(out + j, qk_lo4(row + j));
        rv_vf_store(out + half + j, qk_hi4(row + j));
    }
    for (int i = j; i < half; i++)
        out[i] = (float)(row[i] & 15);
    for (int i = j; i < hi_n; i++)
        out[half + i] = (float)(row[i] >> 4);
}

/* Keys: per-channel parameters. out[t][c] = scale[c] * code[t][c] + zero[c]. */
static void dequant_rows_channel(const uint8_t *codes, ptrdiff_t row_bytes, int n, int d, int bits,
                                 const float *scale, const float *zero, float *out)
{
    for (int t = 0; t < n; t++) {
        float *o = out + (size_t)t * d;
        qk_unpack_row(codes + t * row_bytes, d, bits, o);
        int c = 0;
        for (; c + RV_VW <= d; c += RV_VW)
            rv_vf_store(o + c, rv_vf_fmadd(rv_vf_load(o + c), rv_vf_load(scale + c), rv_vf_load(zero + c)));
        for (; c < d; c++)
            o[c] = o[c] * scale[c] + zero[c];
    }
}

/* Values: per-token parameters for channel groups of `group` (the last may be shorter):
 * out[t][c] = scale[t][c / group] * code[t][c] + zero[t][c / group], parameters binary16,
 * param_stride elements between tokens. */
static void dequant_rows_group(const uint8_t *codes, ptrdiff_t row_bytes, int n, int d, int bits,
                               int group, const uint16_t *scale, const uint16_t *zero,
                               ptrdiff_t param_stride, float *out)
{
    for (int t = 0; t < n; t++) {
        float *o = out + (size_t)t * d;
        qk_unpack_row(codes + t * row_bytes, d, bits, o);
        const uint16_t *s = scale + t * param_stride, *z = zero + t * param_stride;
        for (int g0 = 0, gi = 0; g0 < d; g0 += group, gi++) {
            int g1 = g0 + group < d ? g0 + group : d;
            float sf = rv_f16_to_f32(s[gi]), zf = rv_f16_to_f32(z[gi]);
            rv_vf vs = rv_vf_set1(sf), vz = rv_vf_set1(zf);
            int c = g0;
            for (; c + RV_VW <= g1; c += RV_VW)
                rv_vf_store(o + c, rv_vf_fmadd(rv_vf_load(o + c), vs, vz));
            for (; c < g1; c++)
                o[c] = o[c] * sf + zf;
        }
    }
}

static void fill_quant_ops(rv_ops *ops)
{
    ops->dequant_rows_channel = dequant_rows_channel;
    ops->dequant_rows_group = dequant_rows_group;
}

#endif
