/* KV-cache quantization kernels (see the "KV quantization" section of rv_ops.h), written once
 * against rv_simd.h and compiled per ISA. Included only by ops_<isa>.c, after
 * attention_impl.h (the fused kernel reuses its online-softmax row update).
 *
 * Code layouts (the q8 / q4 cold format fills struct rv_qhead, kernels/rv_qview.h, with them):
 *  - a 4-bit row of n codes is ceil(n/2) bytes: byte j holds code j in its low nibble and code
 *    j + ceil(n/2) in its high nibble, so one vector of bytes unpacks into two vectors of
 *    consecutive codes; an 8-bit row is n bytes.
 *  - keys are channel-major inside a group (a row per channel holding the group's tokens),
 *    so query . key scores come out RV_VW tokens per vector with no horizontal sums;
 *  - values are token-major (a row per token holding its channels), quantized per token in
 *    channel groups. */
#ifndef RV_QUANT_IMPL_H
#define RV_QUANT_IMPL_H

#include <string.h>
#include <stdlib.h>
#include "rv_simd.h"
#include "kernels/rv_ops.h"
#include "kernels/basic_impl.h"
#include "kernels/attention_impl.h"
#include "kernels/rv_qview.h"
#include "rv_fp16.h"

/* element i of a head's binary16 parameters as a float (exact: they are finite, which the
 * codec checks of every group it stores or imports) */
RV_INLINE float qk_param(const uint16_t *p, size_t i)
{
#if defined(RV_ISA_AVX512) || defined(RV_ISA_AVX2)
    return _cvtsh_ss(p[i]);
#else
    return rv_f16_to_f32(p[i]);
#endif
}
#if defined(RV_ISA_AVX512)
/* the parameters of the lanes in m (others 0, not read) */
RV_INLINE __m512 qk_param16(__mmask16 m, const uint16_t *p)
{
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
#elif defined(RV_ISA_AVX2)
RV_INLINE __m128 qk_param4(const uint16_t *p)
{
    return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p));
}
#endif

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

/* code i of a row of n codes (4 or 8 bits) */
RV_INLINE float qk_code(const uint8_t *row, int i, int n, int bits)
{
    if (bits == 8)
        return (float)row[i];
    int half = (n + 1) / 2;
    return (float)(i < half ? row[i] & 15 : row[i - half] >> 4);
}

/* out[i] = code i of a row of n codes */
RV_INLINE void qk_unpack_row(const uint8_t *row, int n, int bits, float *out)
{
    int j = 0;
    if (bits == 8) {
        for (; j + RV_VW <= n; j += RV_VW)
            rv_vf_store(out + j, qk_u8(row + j));
        for (; j < n; j++)
            out[j] = (float)row[j];
        return;
    }
    const int half = (n + 1) / 2, hi_n = n - half;      /* hi_n <= half */
    for (; j + RV_VW <= hi_n; j += RV_VW) {
        rv_vf_store(out + j, qk_lo4(row + j));
        rv_vf_store(out + half + j, qk_hi4(row + j));
    }
    for (int i = j; i < half; i++)
        out[i] = (float)(row[i] & 15);
    for (int i = j; i < hi_n; i++)
        out[half + i] = (float)(row[i] >> 4);
}

/* Token-major rows with per-channel parameters: out[t][c] = scale[c] * code[t][c] + zero[c]. */
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

/* Values: token-major rows with per-token binary16 parameters for channel groups of `group`
 * (the last may be shorter): out[t][c] = scale[t][c / group] * code[t][c] + zero[t][c / group],
 * param_stride elements from token to token. */
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

/* ---- the fused kernel: attention straight out of a quantized group ---- */

#define QK_NR RV_QATTN_ROWS      /* query rows per register block */
#if defined(RV_ISA_AVX512)
#define QK_SW 2                  /* token vectors per score pass (4 x 2 x 2 accumulators fit) */
#else
#define QK_SW 1
#endif

/* Prefetching what the caller reads next, a few lines at a time while computing: into L2
 * (a group ahead is more than L1 holds), as the attention kernels do. */
typedef struct {
    const char *p, *end;
} qk_pf;

RV_INLINE void qk_pf_lines(qk_pf *pf, int lines)
{
    for (int i = 0; i < lines && pf->p < pf->end; i++, pf->p += 64)
        __builtin_prefetch(pf->p, 0, 2);
}

/* s[r][t], t < G, = bias[r] + sum_c qs[r][c] code_c(t) for rows [0, NR), from channel-major
 * key codes: the head_dim channels and then the outliers' high-nibble rows (qs has d + nk
 * weights per row). */
RV_INLINE void qk_scores(const int NR, const struct rv_qhead *h, const float *qs, const float *bias,
                         float *s, int s_stride, qk_pf *pf, int j0)
{
    const int G = h->G, d = h->head_dim + h->nk;
    int j = j0, lo_end, hi_start;
    if (h->bits == 4) {
        const int half = (G + 1) / 2, hi_n = G - half;
        /* QK_SW vectors of tokens per pass: the query broadcasts and the loop overhead of a
         * channel are shared by them (decode is compute-bound on these few-row blocks) */
        for (; j + QK_SW * RV_VW <= hi_n; j += QK_SW * RV_VW) {
            rv_vf lo[QK_NR][QK_SW], hi[QK_NR][QK_SW];
            for (int r = 0; r < NR; r++)
                for (int u = 0; u < QK_SW; u++)
                    lo[r][u] = hi[r][u] = rv_vf_set1(bias[r]);
            for (int c = 0; c < d; c++) {
                const uint8_t *b = h->kcodes + c * h->krow + j;
                rv_vf xl[QK_SW], xh[QK_SW];
                for (int u = 0; u < QK_SW; u++) {
                    xl[u] = qk_lo4(b + u * RV_VW);
                    xh[u] = qk_hi4(b + u * RV_VW);
                }
                qk_pf_lines(pf, 1);
                for (int r = 0; r < NR; r++) {
                    rv_vf w = rv_vf_set1(qs[r * d + c]);
                    for (int u = 0; u < QK_SW; u++) {
                        lo[r][u] = rv_vf_fmadd(w, xl[u], lo[r][u]);
                        hi[r][u] = rv_vf_fmadd(w, xh[u], hi[r][u]);
                    }
                }
            }
            for (int r = 0; r < NR; r++)
                for (int u = 0; u < QK_SW; u++) {
                    rv_vf_store(s + r * s_stride + j + u * RV_VW, lo[r][u]);
                    rv_vf_store(s + r * s_stride + half + j + u * RV_VW, hi[r][u]);
                }
        }
        for (; j + RV_VW <= hi_n; j += RV_VW) {
            rv_vf lo[QK_NR], hi[QK_NR];
            for (int r = 0; r < NR; r++)
                lo[r] = hi[r] = rv_vf_set1(bias[r]);
            for (int c = 0; c < d; c++) {
                const uint8_t *b = h->kcodes + c * h->krow + j;
                rv_vf xl = qk_lo4(b), xh = qk_hi4(b);
                qk_pf_lines(pf, 1);
                for (int r = 0; r < NR; r++) {
                    rv_vf w = rv_vf_set1(qs[r * d + c]);
                    lo[r] = rv_vf_fmadd(w, xl, lo[r]);
                    hi[r] = rv_vf_fmadd(w, xh, hi[r]);
                }
            }
            for (int r = 0; r < NR; r++) {
                rv_vf_store(s + r * s_stride + j, lo[r]);
                rv_vf_store(s + r * s_stride + half + j, hi[r]);
            }
        }
        lo_end = half;
        hi_start = half + j;
    } else {
        for (; j + RV_VW <= G; j += RV_VW) {
            rv_vf acc[QK_NR];
            for (int r = 0; r < NR; r++)
                acc[r] = rv_vf_set1(bias[r]);
            for (int c = 0; c < d; c++) {
                rv_vf x = qk_u8(h->kcodes + c * h->krow + j);
                qk_pf_lines(pf, 1);
                for (int r = 0; r < NR; r++)
                    acc[r] = rv_vf_fmadd(rv_vf_set1(qs[r * d + c]), x, acc[r]);
            }
            for (int r = 0; r < NR; r++)
                rv_vf_store(s + r * s_stride + j, acc[r]);
        }
        lo_end = G;
        hi_start = G;
    }
    /* tokens the vectors did not cover: [j, lo_end) and [hi_start, G) */
    for (int t = j; t < G; t++) {
        if (t == lo_end)
            t = hi_start;
        if (t >= G)
            break;
        for (int r = 0; r < NR; r++) {
            float acc = bias[r];
            for (int c = 0; c < d; c++)
                acc += qs[r * d + c] * qk_code(h->kcodes + c * h->krow, t, G, h->bits);
            s[r * s_stride + t] = acc;
        }
    }
}

/* 4-bit keys as integer dot products. The rows' weights q * scale as int8, one scale per block
 * of 16 channels (so a query's few large channels cost only their own block precision; the
 * outliers' high-nibble rows, which weigh 16x, are blocks of their own):
 *     w8 = rint(qs * (1 / sc)), sc = max|qs over the block| / 127     (float32, in this order)
 * and score = sum over blocks of sc * sum w8 code, + bias. Two channels' codes interleaved
 * byte by byte make vpmaddubsw add both channels' products per token (|sum| <= 2 * 15 * 127);
 * a block's eight pairs accumulate in int16 (<= 30480), then go to float times its scale.
 * Where the float path scores tokens (other ISAs, tails), qs gets sc * w8 back, so that every
 * ISA computes the same scores. (Not for a NaN or infinite product, which AVX-512's conversion
 * turns into -127 where the others give 0 or +-127: a NaN query, or a block whose values are
 * all below about 3.7e-37, whose inverse scale overflows; there the block's part of a score,
 * 16 channels of at most sc * 127 * 15 < 6e-36, stays below 1e-34 either way.) */
#define QK_I8_BLOCKS ((256 + RV_MAX_OUTLIERS + 15) / 16)
/* the integer path without VNNI (VPMADDUBSW) broadcasts the weights a pair at a time: the
 * query keeps them as 32-bit pairs too (qk_i8_query.pairs, qk_i8_rows) */
#if (defined(RV_ISA_AVX512) || defined(RV_ISA_AVX2)) && !defined(RV_HAVE_VNNI)
#define QK_I8_PAIRS 1
#else
#define QK_I8_PAIRS 0
#endif
typedef struct {
    int8_t w[QK_NR][16 * QK_I8_BLOCKS + 4];   /* [row][channel] (outlier rows after head_dim; a
                                                 * pair or quad past the end meets zero codes) */
    float sc[QK_NR][QK_I8_BLOCKS];              /* the blocks' scales */
#if QK_I8_PAIRS
    /* pair p of row r's weights twice over (w[r][2p], w[r][2p + 1], w[r][2p], w[r][2p + 1]):
     * a 32-bit broadcast from memory is a load alone, where a 16-bit one also takes the
     * shuffle port the codes' unpacking needs */
    int32_t pairs[QK_NR][(16 * QK_I8_BLOCKS + 4) / 2];
#endif
} qk_i8_query;

/* out[i] = the lane sum (take_max 0) or maximum (1) of v[i], i < 4: the four vectors' lanes
 * folded together at once, a quarter of the shuffles of one reduction each (a constant
 * take_max: inlined, one operation) */
RV_INLINE void qk_fold4(const rv_vf *v, const int take_max, float *out)
{
#define QK_FOLD(x, y, w) (take_max ? _mm##w##_max_ps(x, y) : _mm##w##_add_ps(x, y))
#if defined(RV_ISA_AVX512)
    /* per 128-bit lane: [v0 0|2, v1 0|2, v0 1|3, v1 1|3], then [v0, v1, v2, v3] folded */
    const __m512 ab = QK_FOLD(_mm512_unpacklo_ps(v[0], v[1]), _mm512_unpackhi_ps(v[0], v[1]), 512);
    const __m512 ce = QK_FOLD(_mm512_unpacklo_ps(v[2], v[3]), _mm512_unpackhi_ps(v[2], v[3]), 512);
    const __m512 x = QK_FOLD(_mm512_shuffle_ps(ab, ce, 0x44), _mm512_shuffle_ps(ab, ce, 0xEE), 512);
    const __m256 h = QK_FOLD(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)), 256);
    _mm_storeu_ps(out, QK_FOLD(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1), ));
#elif defined(RV_ISA_AVX2)
    const __m256 ab = QK_FOLD(_mm256_unpacklo_ps(v[0], v[1]), _mm256_unpackhi_ps(v[0], v[1]), 256);
    const __m256 ce = QK_FOLD(_mm256_unpacklo_ps(v[2], v[3]), _mm256_unpackhi_ps(v[2], v[3]), 256);
    const __m256 x = QK_FOLD(_mm256_shuffle_ps(ab, ce, 0x44), _mm256_shuffle_ps(ab, ce, 0xEE), 256);
    _mm_storeu_ps(out, QK_FOLD(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1), ));
#else
    for (int i = 0; i < 4; i++)
        out[i] = take_max ? rv_vf_hmax(v[i]) : rv_vf_hsum(v[i]);
#endif
#undef QK_FOLD
}

/* out[r] = the lane sum of v[r] for r < NR (AVX-512: folded together, qk_fold4) */
RV_INLINE void qk_row_sums(const int NR, const rv_vf *v, float *out)
{
#if defined(RV_ISA_AVX512)
    _Static_assert(QK_NR <= 4, "qk_row_sums folds at most four rows");
    const rv_vf four[4] = {v[0], NR > 1 ? v[1] : rv_vf_zero(), NR > 2 ? v[2] : rv_vf_zero(), NR > 3 ? v[3] : rv_vf_zero()};
    float sums[4];
    qk_fold4(four, 0, sums);
    for (int r = 0; r < NR; r++)
        out[r] = sums[r];
#else
    for (int r = 0; r < NR; r++)
        out[r] = rv_vf_hsum(v[r]);
#endif
}

#if defined(RV_ISA_AVX2)
/* channels [c0 + 8 i, c0 + 8 i + 8) of a block [c0, c1) of one row (c1 - c0 <= 16), lanes past
 * c1 0 (masked: nothing past c1 is read) */
RV_INLINE __m256 qk_i8_block_load8(const float *q, int c0, int c1, int i)
{
    return c1 - c0 == 16 ? _mm256_loadu_ps(q + c0 + 8 * i)
                         : _mm256_maskload_ps(q + c0 + 8 * i, rv256_lanes_in(8 * i, 0, c1 - c0));
}
#endif

/* A block's channels [c0, c1) of one row (c1 - c0 <= 16) into x[16], zeros past c1 (so that the
 * later passes load whole vectors), and |x| as a vector whose lane maximum is the block's (NaN
 * 0: the comparisons of the C code skip NaN) */
RV_INLINE rv_vf qk_i8_block_copy(const float *q, int c0, int c1, float *x)
{
#if defined(RV_ISA_AVX512)
    const __m512 v = c1 - c0 == 16 ? _mm512_loadu_ps(q + c0)
                                   : _mm512_maskz_loadu_ps((__mmask16)((1u << (c1 - c0)) - 1u), q + c0);
    _mm512_store_ps(x, v);
    return _mm512_max_ps(_mm512_abs_ps(v), _mm512_setzero_ps());     /* (max: the second for NaN) */
#elif defined(RV_ISA_AVX2)
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 x0 = qk_i8_block_load8(q, c0, c1, 0), x1 = qk_i8_block_load8(q, c0, c1, 1);
    _mm256_store_ps(x, x0);
    _mm256_store_ps(x + 8, x1);
    /* max(|x|, m) keeps m where |x| is NaN */
    return _mm256_max_ps(_mm256_andnot_ps(sign, x1), _mm256_max_ps(_mm256_andnot_ps(sign, x0), _mm256_setzero_ps()));
#else
    float mx = 0.0f;
    for (int i = 0; i < 16; i++) {
        x[i] = i < c1 - c0 ? q[c0 + i] : 0.0f;
        mx = fabsf(x[i]) > mx ? fabsf(x[i]) : mx;
    }
    return rv_vf_set1(mx);
#endif
}

/* blocks' scales and their inverses from their maxima, QK_I8_SCALES at a time (one division
 * each for all of them; the order of operations is the contract above):
 *     sc = max / 127 (0 unless finite and > 0), inv = 1 / sc (0 for sc 0) */
#if defined(RV_ISA_AVX512)
#define QK_I8_SCALES 16
RV_INLINE void qk_i8_scales(const float *mx, float *sc, float *inv)
{
    const __m512 a = _mm512_loadu_ps(mx);
    const __mmask16 ok = _mm512_cmp_ps_mask(a, _mm512_set1_ps(INFINITY), _CMP_LT_OQ) &
                         _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GT_OQ);
    const __m512 s = _mm512_maskz_div_ps(ok, a, _mm512_set1_ps(127.0f));
    _mm512_storeu_ps(sc, s);
    _mm512_storeu_ps(inv, _mm512_maskz_div_ps(_mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_GT_OQ),
                                              _mm512_set1_ps(1.0f), s));
}
#elif defined(RV_ISA_AVX2)
#define QK_I8_SCALES 8
RV_INLINE void qk_i8_scales(const float *mx, float *sc, float *inv)
{
    const __m256 a = _mm256_loadu_ps(mx);
    const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(a, _mm256_set1_ps(INFINITY), _CMP_LT_OQ),
                                    _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_GT_OQ));
    const __m256 s = _mm256_and_ps(ok, _mm256_div_ps(a, _mm256_set1_ps(127.0f)));
    _mm256_storeu_ps(sc, s);
    /* (where s is 0 the quotient is inf, masked away) */
    _mm256_storeu_ps(inv, _mm256_and_ps(_mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_GT_OQ),
                                        _mm256_div_ps(_mm256_set1_ps(1.0f), s)));
}
#else
#define QK_I8_SCALES 1
RV_INLINE void qk_i8_scales(const float *mx, float *sc, float *inv)
{
    *sc = isfinite(*mx) && *mx > 0.0f ? *mx / 127.0f : 0.0f;
    *inv = *sc > 0.0f ? 1.0f / *sc : 0.0f;
}
#endif

/* w8[0 .. 16) = rint(x * inv) clamped to +-127 (NaN: 0, but see the contract above for
 * AVX-512) for a block copied by qk_i8_block_copy (zeros past its end), and (back) q[c0 .. c1)
 * set to sc * w8 */
RV_INLINE void qk_i8_block_quantize(const float *x, float sc, float inv, int8_t *w8, float *q, int c0, int c1,
                                    const int back)
{
#if defined(RV_ISA_AVX512)
    __m512i k = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(x), _mm512_set1_ps(inv)));
    k = _mm512_max_epi32(_mm512_min_epi32(k, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
    /* all 16 bytes (zeros past c1): the scores' 32-bit loads of them are forwarded from a
     * plain store, never from a masked one */
    _mm_storeu_si128((__m128i *)w8, _mm512_cvtepi32_epi8(k));
    if (back)
        _mm512_mask_storeu_ps(q + c0, (__mmask16)((1u << (c1 - c0)) - 1u),
                              _mm512_mul_ps(_mm512_set1_ps(sc), _mm512_cvtepi32_ps(k)));
#elif defined(RV_ISA_AVX2)
    const __m256 sign = _mm256_set1_ps(-0.0f), vi = _mm256_set1_ps(inv), lim = _mm256_set1_ps(127.0f);
    __m256 k[2];
    for (int i = 0; i < 2; i++) {
        const __m256 y = rv_vf_round(_mm256_mul_ps(_mm256_load_ps(x + 8 * i), vi));
        /* clamp to +-127 and NaN to 0 (min / max return their second operand for NaN) */
        k[i] = _mm256_and_ps(_mm256_max_ps(_mm256_min_ps(y, lim), _mm256_sub_ps(sign, lim)), _mm256_cmp_ps(y, y, _CMP_ORD_Q));
        if (!back)
            continue;
        const __m256 qb = _mm256_mul_ps(_mm256_set1_ps(sc), k[i]);
        if (c1 - c0 == 16)
            _mm256_storeu_ps(q + c0 + 8 * i, qb);
        else
            _mm256_maskstore_ps(q + c0 + 8 * i, rv256_lanes_in(8 * i, 0, c1 - c0), qb);
    }
    const __m256i k16 = _mm256_packs_epi32(_mm256_cvtps_epi32(k[0]), _mm256_cvtps_epi32(k[1]));
    const __m128i k8 = _mm_packs_epi16(_mm256_castsi256_si128(k16), _mm256_extracti128_si256(k16, 1));
    /* packs works per 128-bit lane: channels 0-3 8-11 4-7 12-15 -> reorder */
    _mm_storeu_si128((__m128i *)w8, _mm_shuffle_epi32(k8, _MM_SHUFFLE(3, 1, 2, 0)));
#else
    for (int i = 0; i < 16; i++) {
        const float k = rintf(x[i] * inv);
        w8[i] = (int8_t)(k >= 127.0f ? 127 : (k <= -127.0f ? -127 : (k == k ? (int)k : 0)));   /* NaN: 0 */
        if (back && i < c1 - c0)
            q[c0 + i] = sc * (float)w8[i];
    }
#endif
}

/* The rows' int8 weights: blocks of 16 channels over head_dim, then the outliers' rows as
 * blocks of their own, in three passes over all the rows' blocks: each block copied whole
 * with its |x| maxima, four blocks' folded at once; every scale and inverse, QK_I8_SCALES at a
 * time; then the weights from the copies (four blocks at a time, each group's masked loads,
 * fold and divisions waiting on the last, then masked loads again to quantize, it took 1.6x
 * the time on AVX2 and 1.05x on AVX-512). Not inlined: once per group, and inlined into
 * qk_rows' four instances it made decode 2% slower (alternated builds). */
static RV_NOINLINE void qk_i8_weights(const int NR, float *qs, int d, int nk, qk_i8_query *w, const int back)
{
    enum { MAXB = QK_NR * QK_I8_BLOCKS, PAD = MAXB + 16 };   /* (16: past the last fold and scales) */
    const int dk = d + nk, nb = (d + 15) / 16 + (nk + 15) / 16, n = NR * nb;
    int start[QK_I8_BLOCKS + 1];                  /* block b: channels [start[b], start[b + 1]) */
    for (int b = 0, c0 = 0; b <= nb; b++) {
        start[b] = c0;
        const int end = c0 < d ? d : dk;
        c0 = c0 + 16 < end ? c0 + 16 : end;
    }
    _Alignas(64) float x[MAXB][16];
    float mx[PAD], sc[PAD], inv[PAD];
    for (int i0 = 0, r = 0, b = 0; i0 < n; i0 += 4) {    /* blocks i0 .. i0 + 3 of the rows' */
        rv_vf v[4];
        for (int u = 0; u < 4; u++) {
            if (i0 + u >= n) {
                v[u] = rv_vf_zero();              /* (past the last block: folded, unused) */
                continue;
            }
            v[u] = qk_i8_block_copy(qs + r * dk, start[b], start[b + 1], x[i0 + u]);
            if (++b == nb) {
                b = 0;
                r++;
            }
        }
        qk_fold4(v, 1, mx + i0);
    }
    for (int i = (n + 3) / 4 * 4; i < n + QK_I8_SCALES; i++)
        mx[i] = 0.0f;                             /* (the last scales' lanes past n: unused) */
    for (int i = 0; i < n; i += QK_I8_SCALES)
        qk_i8_scales(mx + i, sc + i, inv + i);
    for (int r = 0, i = 0; r < NR; r++)
        for (int b = 0; b < nb; b++, i++) {
            qk_i8_block_quantize(x[i], sc[i], inv[i], w->w[r] + start[b], qs + r * dk, start[b], start[b + 1], back);
            w->sc[r][b] = sc[i];
        }
    if (dk & 1)
        for (int r = 0; r < NR; r++)
            w->w[r][dk] = 0;                          /* the odd row's partner weighs nothing */
#if QK_I8_PAIRS
    /* the pairs in qk_i8_rows' order: from channel 0, then (head_dim odd) from head_dim */
    if (!(d & 1)) {
        for (int r = 0; r < NR; r++)
            for (int c = 0; c < dk; c += 16) {        /* eight pairs (past dk: unused) */
                const __m128i w16 = _mm_loadu_si128((const __m128i *)&w->w[r][c]);
                _mm_storeu_si128((__m128i *)&w->pairs[r][c / 2], _mm_unpacklo_epi16(w16, w16));
                _mm_storeu_si128((__m128i *)&w->pairs[r][c / 2 + 4], _mm_unpackhi_epi16(w16, w16));
            }
    } else {
        const int head_pairs = (d + 1) / 2;           /* the last one (d - 1, d) */
        for (int r = 0; r < NR; r++)
            for (int k = 0; k < head_pairs + (nk + 1) / 2; k++) {
                const int c = k < head_pairs ? 2 * k : d + 2 * (k - head_pairs);
                uint16_t pair;
                memcpy(&pair, &w->w[r][c], 2);
                w->pairs[r][k] = (int32_t)((uint32_t)pair * 0x10001u);
            }
    }
#endif
}

#if defined(RV_ISA_AVX512) || defined(RV_ISA_AVX2)
#if defined(RV_ISA_AVX512)
#define QK_I8_BLOCK 32                             /* low-nibble tokens per block (and as many high) */
typedef __m512i qk_iv;
RV_INLINE qk_iv qk_i8_codes(const uint8_t *row)    /* [lo nibbles | hi nibbles] of 32 bytes */
{
    /* the bytes in both halves, the high half shifted: a load and two operations */
    const __m512i x = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)row));
    return _mm512_and_si512(_mm512_mask_srli_epi16(x, (__mmask32)0xFFFF0000u, x, 4), _mm512_set1_epi8(15));
}
#define qk_iv_zero _mm512_setzero_si512
#define qk_iv_add16 _mm512_add_epi16
#define qk_iv_maddubs _mm512_maddubs_epi16
#define qk_iv_unpacklo8 _mm512_unpacklo_epi8
#define qk_iv_unpackhi8 _mm512_unpackhi_epi8
#define qk_iv_set1_32(x) _mm512_set1_epi32(x)
RV_INLINE rv_vf qk_iv_lo_ps(qk_iv x) { return _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(x))); }
RV_INLINE rv_vf qk_iv_hi_ps(qk_iv x) { return _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(x, 1))); }
#if defined(RV_HAVE_VNNI)
/* with VNNI (qk_i8_rows below): S[k] 128-bit lane L holds tokens 4k .. 4k + 3 of lane L's 16
 * (lanes: low-nibble tokens j.., j + 16.., high-nibble tokens half + j.., half + j + 16..), so
 * a 4 x 4 transpose of 128-bit lanes puts them back */
RV_INLINE void qk_i8_store(const rv_vf *S, float bias, int add, float *s_lo, float *s_hi)
{
    const __m512i in[4] = {_mm512_castps_si512(S[0]), _mm512_castps_si512(S[1]), _mm512_castps_si512(S[2]),
                           _mm512_castps_si512(S[3])};
    __m512i T[4];
    rv512_transpose_lanes4(in, T);
    float *dst[4] = {s_lo, s_lo + 16, s_hi, s_hi + 16};
    for (int k = 0; k < 4; k++)
        rv_vf_store(dst[k], rv_vf_add(_mm512_castsi512_ps(T[k]), add ? rv_vf_load(dst[k]) : rv_vf_set1(bias)));
}
#else
/* the four token subsets' sums back in token order, plus bias (or added to s): S0 = A-bytes
 * [0..7, 16..23], S1 = [32..39, 48..55], S2 = [8..15, 24..31], S3 = [40..47, 56..63] (A-byte
 * b < 32: token j + b, else half + j + b - 32) */
RV_INLINE void qk_i8_store(const rv_vf *S, float bias, int add, float *s_lo, float *s_hi)
{
    const __m512i ia = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i ib = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const rv_vf T[4] = {_mm512_permutex2var_ps(S[0], ia, S[2]), _mm512_permutex2var_ps(S[0], ib, S[2]),
                        _mm512_permutex2var_ps(S[1], ia, S[3]), _mm512_permutex2var_ps(S[1], ib, S[3])};
    float *dst[4] = {s_lo, s_lo + 16, s_hi, s_hi + 16};
    for (int k = 0; k < 4; k++)
        rv_vf_store(dst[k], rv_vf_add(T[k], add ? rv_vf_load(dst[k]) : rv_vf_set1(bias)));
}
#endif
#else
#define QK_I8_BLOCK 16
typedef __m256i qk_iv;
RV_INLINE qk_iv qk_i8_codes(const uint8_t *row)
{
    /* the 16 bytes in both halves (a load alone), the high half shifted: no shuffle, whose
     * port the unpacking of the pairs already keeps busy */
    const __m256i x = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)row));
    return _mm256_and_si256(_mm256_srlv_epi64(x, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(15));
}
#define qk_iv_zero _mm256_setzero_si256
#define qk_iv_add16 _mm256_add_epi16
#define qk_iv_maddubs _mm256_maddubs_epi16
#define qk_iv_unpacklo8 _mm256_unpacklo_epi8
#define qk_iv_unpackhi8 _mm256_unpackhi_epi8
#define qk_iv_set1_32(x) _mm256_set1_epi32(x)
RV_INLINE rv_vf qk_iv_lo_ps(qk_iv x) { return _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(x))); }
RV_INLINE rv_vf qk_iv_hi_ps(qk_iv x) { return _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(x, 1))); }
/* S0 = A-bytes 0..7, S1 = 16..23, S2 = 8..15, S3 = 24..31: already token order per 8 */
RV_INLINE void qk_i8_store(const rv_vf *S, float bias, int add, float *s_lo, float *s_hi)
{
    float *dst[4] = {s_lo, s_hi, s_lo + 8, s_hi + 8};
    for (int k = 0; k < 4; k++)
        rv_vf_store(dst[k], rv_vf_add(S[k], add ? rv_vf_load(dst[k]) : rv_vf_set1(bias)));
}
#endif

/* rows [c0, c1) of the channel-major 4-bit key codes (weights w[r][c], blocks of 16 from c0 with
 * scales sc[r][blk0 ..]) for the block of low-nibble tokens j.. and high-nibble tokens
 * half + j.., into S[r][4] (floats, the four token subsets) */
RV_INLINE void qk_i8_rows(const int NR, const struct rv_qhead *h, const qk_i8_query *w, int c0, int c1, int blk0,
                          int j, rv_vf S[QK_NR][4], qk_pf *pf)
{
#if defined(RV_HAVE_VNNI)
    /* VPDPBUSD: four channels' codes of a token interleaved in an int32 lane meet the row's
     * four weights in one instruction, summed in int32. A channel's 32 code bytes are loaded
     * into both halves and masked: the low half keeps the low nibbles, the high half the high
     * nibbles in place (16 x their value, at most 16 * 240 * 127 per block: exact in int32
     * and float), so the high half's scale is sc / 16 (exact: the same products as sc) */
    const __m512i nib = _mm512_inserti64x4(_mm512_set1_epi8(15), _mm256_set1_epi8((char)0xF0), 1);
    for (int r = 0; r < NR; r++)
        for (int k = 0; k < 4; k++)
            S[r][k] = rv_vf_zero();
    for (int p0 = c0, blk = blk0; p0 < c1; p0 += 16, blk++) {
        __m512i ia[QK_NR][4];
        for (int r = 0; r < NR; r++)
            for (int k = 0; k < 4; k++)
                ia[r][k] = _mm512_setzero_si512();
        const int p1 = p0 + 16 < c1 ? p0 + 16 : c1;
        for (int c = p0; c < p1; c += 4) {
            __m512i T[4], X[4];
            for (int i = 0; i < 4; i++)        /* (a channel past the block: zero codes) */
                T[i] = c + i < p1 ? _mm512_and_si512(_mm512_broadcast_i64x4(_mm256_loadu_si256(
                                                         (const __m256i *)(h->kcodes + (c + i) * h->krow + j))), nib)
                                  : _mm512_setzero_si512();
            rv_interleave4_epi8(T, X);
            qk_pf_lines(pf, 2);                /* spread: a burst of prefetches stalls on fill buffers */
            for (int r = 0; r < NR; r++) {
                int32_t quad;                  /* w[r][c .. c + 3]: one 32-bit load and broadcast */
                memcpy(&quad, &w->w[r][c], 4);
                const __m512i W = _mm512_set1_epi32(quad);
                for (int k = 0; k < 4; k++)
                    ia[r][k] = _mm512_dpbusd_epi32(ia[r][k], X[k], W);
            }
            qk_pf_lines(pf, 2);
        }
        for (int r = 0; r < NR; r++) {
            const float sc = w->sc[r][blk], sc16 = sc * 0.0625f;
            __m512 sv = _mm512_set1_ps(sc);
            if (sc16 * 16.0f == sc)            /* (not when sc / 16 is subnormal: then the sums / 16) */
                sv = _mm512_mask_mov_ps(sv, 0xFF00, _mm512_set1_ps(sc16));
            else
                for (int k = 0; k < 4; k++)
                    ia[r][k] = _mm512_mask_srai_epi32(ia[r][k], 0xFF00, ia[r][k], 4);
            for (int k = 0; k < 4; k++)
                S[r][k] = rv_vf_fmadd(sv, _mm512_cvtepi32_ps(ia[r][k]), S[r][k]);
        }
    }
#else
    for (int r = 0; r < NR; r++)
        for (int k = 0; k < 4; k++)
            S[r][k] = rv_vf_zero();
    for (int p0 = c0, blk = blk0; p0 < c1; p0 += 16, blk++) {
        qk_iv a0[QK_NR], a1[QK_NR];
        for (int r = 0; r < NR; r++)
            a0[r] = a1[r] = qk_iv_zero();
        const int p1 = p0 + 16 < c1 ? p0 + 16 : c1;
        for (int c = p0; c < p1; c += 2) {
            const qk_iv A = qk_i8_codes(h->kcodes + c * h->krow + j);
            const qk_iv B = c + 1 < c1 ? qk_i8_codes(h->kcodes + (c + 1) * h->krow + j) : qk_iv_zero();
            const qk_iv X0 = qk_iv_unpacklo8(A, B), X1 = qk_iv_unpackhi8(A, B);
            qk_pf_lines(pf, 2);            /* spread: a burst of prefetches stalls on fill buffers */
            for (int r = 0; r < NR; r++) {
                const qk_iv W = qk_iv_set1_32(w->pairs[r][c0 / 2 + (c0 & 1) + (c - c0) / 2]);
                a0[r] = qk_iv_add16(a0[r], qk_iv_maddubs(X0, W));
                a1[r] = qk_iv_add16(a1[r], qk_iv_maddubs(X1, W));
            }
        }
        for (int r = 0; r < NR; r++) {
            const rv_vf sc = rv_vf_set1(w->sc[r][blk]);
            S[r][0] = rv_vf_fmadd(sc, qk_iv_lo_ps(a0[r]), S[r][0]);
            S[r][1] = rv_vf_fmadd(sc, qk_iv_hi_ps(a0[r]), S[r][1]);
            S[r][2] = rv_vf_fmadd(sc, qk_iv_lo_ps(a1[r]), S[r][2]);
            S[r][3] = rv_vf_fmadd(sc, qk_iv_hi_ps(a1[r]), S[r][3]);
        }
    }
#endif
}

/* scores of every token the blocks cover; returns the first token (low-nibble side) they do
 * not cover (the float path does the rest: [j, half) and [half + j, G)) */
RV_INLINE int qk_scores_i8(const int NR, const struct rv_qhead *h, const float *bias, float *s, int s_stride,
                           qk_pf *pf, const qk_i8_query *w)
{
    const int G = h->G, d = h->head_dim, dk = d + h->nk, half = (G + 1) / 2, hi_n = G - half;
    int j = 0;
    for (; j + QK_I8_BLOCK <= hi_n; j += QK_I8_BLOCK) {
        rv_vf S[QK_NR][4];
        /* head_dim whole blocks: the outliers' rows are one more block of the same pass */
        const int first_end = d % 16 ? d : dk;
        qk_i8_rows(NR, h, w, 0, first_end, 0, j, S, pf);
        for (int r = 0; r < NR; r++)
            qk_i8_store(S[r], bias[r], 0, s + r * s_stride + j, s + r * s_stride + half + j);
        if (first_end < dk) {
            qk_i8_rows(NR, h, w, d, dk, (d + 15) / 16, j, S, pf);
            for (int r = 0; r < NR; r++)
                qk_i8_store(S[r], 0.0f, 1, s + r * s_stride + j, s + r * s_stride + half + j);
        }
    }
    return j;
}
#endif

/* acc rows [0, NR) (stride d) += sum_t w[r][t] v_t for tokens a..a+n-1, values dequantized in
 * registers (token-major codes, per-token channel-group parameters converted from binary16 as
 * they are loaded) */
RV_INLINE void qk_values(const int NR, const struct rv_qhead *h, int a, int n, const float *w, int w_stride,
                         float *acc)
{
    const int d = h->head_dim, gs = h->group_size, ng = (d + gs - 1) / gs;
    const uint16_t *vs = h->vscale, *vz = h->vzero;
    if (h->bits == 4) {
        const int half = (d + 1) / 2, hi_n = d - half;
        int covered_lo = 0, covered_hi_from = half;   /* the vector loop did [0, covered_lo) and
                                                         [half, covered_hi_from) */
        if (gs % RV_VW == 0 && half % RV_VW == 0) {
            int j = 0;
            /* QK_SW vectors of channels per pass: a token's addressing, parameters and weight
             * broadcasts are shared by them */
            for (; j + QK_SW * RV_VW <= hi_n; j += QK_SW * RV_VW) {
                int gl[QK_SW], gh[QK_SW];
                rv_vf al[QK_NR][QK_SW], ah[QK_NR][QK_SW];
                for (int u = 0; u < QK_SW; u++) {
                    gl[u] = (j + u * RV_VW) / gs;
                    gh[u] = (half + j + u * RV_VW) / gs;
                }
                for (int r = 0; r < NR; r++)
                    for (int u = 0; u < QK_SW; u++) {
                        al[r][u] = rv_vf_load(acc + r * d + j + u * RV_VW);
                        ah[r][u] = rv_vf_load(acc + r * d + half + j + u * RV_VW);
                    }
                for (int t = 0; t < n; t++) {
                    const int tok = a + t;
                    const uint8_t *b = h->vcodes + tok * h->vrow + j;
                    const uint16_t *ps = vs + (size_t)tok * ng, *pz = vz + (size_t)tok * ng;
                    rv_vf xl[QK_SW], xh[QK_SW];
                    for (int u = 0; u < QK_SW; u++) {
                        const rv_vf sl = rv_vf_set1(qk_param(ps, gl[u])), zl = rv_vf_set1(qk_param(pz, gl[u]));
                        const rv_vf sh = rv_vf_set1(qk_param(ps, gh[u])), zh = rv_vf_set1(qk_param(pz, gh[u]));
                        xl[u] = rv_vf_fmadd(qk_lo4(b + u * RV_VW), sl, zl);
                        xh[u] = rv_vf_fmadd(qk_hi4(b + u * RV_VW), sh, zh);
                    }
                    for (int r = 0; r < NR; r++) {
                        rv_vf p = rv_vf_set1(w[r * w_stride + t]);
                        for (int u = 0; u < QK_SW; u++) {
                            al[r][u] = rv_vf_fmadd(p, xl[u], al[r][u]);
                            ah[r][u] = rv_vf_fmadd(p, xh[u], ah[r][u]);
                        }
                    }
                }
                for (int r = 0; r < NR; r++)
                    for (int u = 0; u < QK_SW; u++) {
                        rv_vf_store(acc + r * d + j + u * RV_VW, al[r][u]);
                        rv_vf_store(acc + r * d + half + j + u * RV_VW, ah[r][u]);
                    }
            }
            for (; j + RV_VW <= hi_n; j += RV_VW) {
                const int gl = j / gs, gh = (half + j) / gs;
                rv_vf al[QK_NR], ah[QK_NR];
                for (int r = 0; r < NR; r++) {
                    al[r] = rv_vf_load(acc + r * d + j);
                    ah[r] = rv_vf_load(acc + r * d + half + j);
                }
                for (int t = 0; t < n; t++) {
                    const int tok = a + t;
                    const uint8_t *b = h->vcodes + tok * h->vrow + j;
                    const uint16_t *ps = vs + (size_t)tok * ng, *pz = vz + (size_t)tok * ng;
                    const rv_vf sl = rv_vf_set1(qk_param(ps, gl)), zl = rv_vf_set1(qk_param(pz, gl));
                    const rv_vf sh = rv_vf_set1(qk_param(ps, gh)), zh = rv_vf_set1(qk_param(pz, gh));
                    rv_vf xl = rv_vf_fmadd(qk_lo4(b), sl, zl);
                    rv_vf xh = rv_vf_fmadd(qk_hi4(b), sh, zh);
                    for (int r = 0; r < NR; r++) {
                        rv_vf p = rv_vf_set1(w[r * w_stride + t]);
                        al[r] = rv_vf_fmadd(p, xl, al[r]);
                        ah[r] = rv_vf_fmadd(p, xh, ah[r]);
                    }
                }
                for (int r = 0; r < NR; r++) {
                    rv_vf_store(acc + r * d + j, al[r]);
                    rv_vf_store(acc + r * d + half + j, ah[r]);
                }
            }
            covered_lo = j;
            covered_hi_from = half + j;
        }
        /* channels [covered_lo, half) and [covered_hi_from, d): one at a time */
        for (int c = 0; c < d; c++) {
            if ((c < half && c < covered_lo) || (c >= half && c < covered_hi_from))
                continue;
            const int gi = c / gs;
            for (int r = 0; r < NR; r++) {
                float sum = 0.0f;
                for (int t = 0; t < n; t++) {
                    const int tok = a + t;
                    sum += w[r * w_stride + t] * ((float)qk_code(h->vcodes + tok * h->vrow, c, d, 4) * qk_param(vs, (size_t)tok * ng + gi) +
                                                  qk_param(vz, (size_t)tok * ng + gi));
                }
                acc[r * d + c] += sum;
            }
        }
        return;
    }
    int j = 0;
    if (gs % RV_VW == 0) {
        for (; j + RV_VW <= d; j += RV_VW) {
            const int g = j / gs;
            rv_vf av[QK_NR];
            for (int r = 0; r < NR; r++)
                av[r] = rv_vf_load(acc + r * d + j);
            for (int t = 0; t < n; t++) {
                const int tok = a + t;
                rv_vf x = rv_vf_fmadd(qk_u8(h->vcodes + tok * h->vrow + j), rv_vf_set1(qk_param(vs, (size_t)tok * ng + g)),
                                      rv_vf_set1(qk_param(vz, (size_t)tok * ng + g)));
                for (int r = 0; r < NR; r++)
                    av[r] = rv_vf_fmadd(rv_vf_set1(w[r * w_stride + t]), x, av[r]);
            }
            for (int r = 0; r < NR; r++)
                rv_vf_store(acc + r * d + j, av[r]);
        }
    }
    for (int c = j; c < d; c++) {
        const int gi = c / gs;
        for (int r = 0; r < NR; r++) {
            float sum = 0.0f;
            for (int t = 0; t < n; t++) {
                const int tok = a + t;
                sum += w[r * w_stride + t] * ((float)h->vcodes[tok * h->vrow + c] * qk_param(vs, (size_t)tok * ng + gi) +
                                              qk_param(vz, (size_t)tok * ng + gi));
            }
            acc[r * d + c] += sum;
        }
    }
}

/* Outlier value channels, after the rows' decoding put whatever it did into their slots
 * (which hold code 0: the format keeps these channels apart): their values are
 * voscale * code + vozero with 8-bit codes in a contiguous row of the G tokens, so
 *     acc[r][vidx[o]] = held[r][o] + sum_t w[r][t] (voscale code_t + vozero)
 * over tokens [a, a + n) (w[r][t - a]), `held` being what the row had before this group. */
/* outlier value channels taken QK_OG at a time: a row's weights are loaded once for them,
 * and (AVX-512) their sums folded together */
#if defined(RV_ISA_AVX512)
#define QK_OG 4
#else
#define QK_OG 1
#endif
RV_INLINE void qk_outlier_values(const int NR, const struct rv_qhead *h, int a, int n, const float *w, int w_stride,
                                 float held[QK_NR][RV_MAX_OUTLIERS], float *acc)
{
    const int d = h->head_dim;
    for (int o0 = 0; o0 < h->nv; o0 += QK_OG) {
        const int no = h->nv - o0 < QK_OG ? h->nv - o0 : QK_OG;
        const uint8_t *row[QK_OG];
        rv_vf scale[QK_OG], zero[QK_OG], sum[QK_NR][QK_OG];
        for (int i = 0; i < QK_OG; i++) {
            const int o = o0 + (i < no ? i : 0);         /* (past nv: a copy, not stored) */
            row[i] = h->vocodes + (size_t)o * h->G + a;
            scale[i] = rv_vf_set1(h->voscale[o]);
            zero[i] = rv_vf_set1(h->vozero[o]);
            for (int r = 0; r < NR; r++)
                sum[r][i] = rv_vf_zero();
        }
        int t = 0;
        for (; t + RV_VW <= n; t += RV_VW) {
            rv_vf x[QK_OG];
            for (int i = 0; i < QK_OG; i++)
                x[i] = rv_vf_fmadd(qk_u8(row[i] + t), scale[i], zero[i]);
            for (int r = 0; r < NR; r++) {
                const rv_vf wv = rv_vf_load(w + r * w_stride + t);
                for (int i = 0; i < QK_OG; i++)
                    sum[r][i] = rv_vf_fmadd(wv, x[i], sum[r][i]);
            }
        }
        for (int r = 0; r < NR; r++) {
            float total[QK_OG];
            qk_row_sums(QK_OG, sum[r], total);
            for (int i = 0; i < no; i++) {
                const int o = o0 + i;
                const float so = h->voscale[o], zo = h->vozero[o];
                float tail = 0.0f;
                for (int u = t; u < n; u++)
                    tail += w[r * w_stride + u] * (so * (float)row[i][u] + zo);
                acc[r * d + h->vidx[o]] = held[r][o] + (total[i] + tail);
            }
        }
    }
}

/* ---- 4-bit values as integer sums (the avx512vnni table: VPDPBUSD; the avx2 table: see its own
 * version below). A value is
 * scale[t][g] code + zero[t][g], so
 *     sum_t w[r][t] v_tc = sum_t (w[r][t] scale[t][g]) code_tc + sum_t w[r][t] zero[t][g]:
 * per block of QK_VB tokens (from a multiple of QK_VB in the group) and row, the products
 * w scale of every (token, channel group) go to u8 weights round(w scale 255 / S) with
 * S = max w * max scale over the block (>= every product), and four tokens' codes of a channel,
 * interleaved byte by byte in an int32 lane, meet their four weights in one instruction. The
 * zero term is a float dot per (row, group). A 128-bit lane of codes holds 16 channels of one
 * group (group_size and ceil(d / 2) multiples of 16), so one weight vector per four tokens
 * carries each lane's group. Every weight is off by at most S / 510 (half a step): the tests'
 * references bound that (q4_kernel_reference_bound in tests/_helpers.py). Outlier value
 * channels' lanes are replaced afterwards (qk_outlier_values); other shapes take the float
 * path (qk_values). ---- */
/* tokens per weight block (a multiple of 16): its step is set by its largest weight, so a block
 * sharing a strongly attended token rounds its other tokens' weights coarsely. On SmolLM2's
 * own K/V, blocks of 64 took the least layer's attention cosine from 0.989 (the float path) to
 * 0.978, blocks of 32 to 0.988, blocks of 16 kept 0.989; 16 costs a flush per 16 tokens
 * (tools/eval_kv_quality.py, tools/bench_kvcache.py). */
#define QK_VB 16
#define QK_VNG 8                      /* channel groups a head may have for the integer path */
#define QK_VFOLD 4                    /* blocks whose steps the integer path sets at once (qk_fold4) */
#if defined(RV_ISA_AVX512)
#define QK_VCH 4                      /* chunks of 64 channels a row has at most (d <= 256) */

/* acc + u (u8) . s (s8) per int32 lane (without VNNI, VPMADDUBSW + VPMADDWD: 2 * 255 * 15 fits
 * int16; the avx512 table does not take this path: QK_VALUES_INT) */
RV_INLINE __m512i qk_dp(__m512i acc, __m512i u, __m512i s)
{
#if defined(RV_HAVE_VNNI)
    return _mm512_dpbusd_epi32(acc, u, s);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}

/* How a row's codes split into chunks of 64 channels (one vector per token): with ceil(d/2) a
 * multiple of 64, 64 bytes of low or of high nibbles; with a multiple of 32, 32 bytes' low
 * nibbles then their high nibbles. */
typedef struct {
    int nch, ng;
    int off[QK_VCH], kind[QK_VCH];        /* byte offset; 0 low nibbles, 1 high, 2 both of 32 */
    int chan0[QK_VCH][4];                 /* first channel of each 128-bit lane */
    int sel[QK_VCH][4];                   /* the four groups whose weights a chunk's vector holds */
    __m512i idx[QK_VCH][4];               /* per quad of tokens: int32 lane <- weight int32 */
    /* transposing [16 tokens][ng] parameters: group g's lanes from flat pieces k, k + 1 */
    __m512i tidx[QK_VNG / 2][QK_VNG];
    __mmask16 tmask[QK_VNG / 2][QK_VNG];
} qk_vplan;

/* 0 when the integer path does not apply (the float path then runs) */
static int qk_vplan_init(qk_vplan *p, const struct rv_qhead *h, int a, int n)
{
    const int d = h->head_dim, gs = h->group_size, half = (d + 1) / 2;
    if (gs % 16 || d % 32)
        return 0;
    const int ng = (d + gs - 1) / gs;
    if (ng > QK_VNG)
        return 0;
    /* u8 weights need scales >= 0 (finite): what the codec writes; anything else stays float */
    const uint16_t *vs = h->vscale + (size_t)a * ng;
    __mmask16 bad = 0;
    const int np = n * ng;
    for (int i = 0; i < np; i += 16) {
        const __mmask16 m = (__mmask16)(np - i >= 16 ? 0xFFFF : (1u << (np - i)) - 1u);
        const __m512 x = qk_param16(m, vs + i);
        bad |= _mm512_mask_cmp_ps_mask(m, x, _mm512_set1_ps(0.0f), _CMP_LT_OQ) |
               _mm512_mask_cmp_ps_mask(m, x, _mm512_set1_ps(65504.0f), _CMP_NLE_UQ);
    }
    if (bad)
        return 0;
    p->ng = ng;
    p->nch = 0;
    {
        const __m512i tng = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(ng));
        for (int k = 0; k < ng; k += 2)
            for (int g = 0; g < ng; g++) {
                const __m512i f = _mm512_add_epi32(tng, _mm512_set1_epi32(g - 16 * k));
                p->tidx[k / 2][g] = f;
                p->tmask[k / 2][g] = _mm512_cmplt_epu32_mask(f, _mm512_set1_epi32(k + 1 < ng ? 32 : 16));
            }
    }
    if (half % 64 == 0) {
        for (int side = 0; side < 2; side++)
            for (int o = 0; o < half; o += 64, p->nch++) {
                p->off[p->nch] = o;
                p->kind[p->nch] = side;
                for (int L = 0; L < 4; L++)
                    p->chan0[p->nch][L] = side * half + o + 16 * L;
            }
    } else {
        if (half % 32)
            return 0;
        for (int o = 0; o < half; o += 32, p->nch++) {
            p->off[p->nch] = o;
            p->kind[p->nch] = 2;
            for (int L = 0; L < 4; L++)
                p->chan0[p->nch][L] = (L < 2 ? 0 : half) + o + 16 * (L & 1);
        }
    }
    for (int ch = 0; ch < p->nch; ch++) {
        const int gl = p->chan0[ch][0] / gs, gh = p->chan0[ch][2] / gs;
        int slot[4];
        for (int j = 0; j < 4; j++)
            p->sel[ch][j] = ng <= 4 ? j : (p->kind[ch] == 2 ? (j < 2 ? gl : gh) + (j & 1) : gl + j);
        for (int L = 0; L < 4; L++) {
            const int g = p->chan0[ch][L] / gs;
            slot[L] = -1;
            for (int j = 3; j >= 0; j--)
                if (p->sel[ch][j] == g)
                    slot[L] = j;
            if (slot[L] < 0)
                return 0;
        }
        const __m512i sv = _mm512_setr_epi32(slot[0], slot[0], slot[0], slot[0], slot[1], slot[1], slot[1], slot[1],
                                             slot[2], slot[2], slot[2], slot[2], slot[3], slot[3], slot[3], slot[3]);
        for (int qd = 0; qd < 4; qd++)
            p->idx[ch][qd] = _mm512_add_epi32(sv, _mm512_set1_epi32(4 * qd));
    }
    return 1;
}

/* token t's chunk ch as 64 code bytes (lane L: channels chan0[L] ..) */
RV_INLINE __m512i qk_vchunk(const qk_vplan *p, const uint8_t *row, int ch)
{
    const __m512i m15 = _mm512_set1_epi8(15);
    if (p->kind[ch] == 2)
        return qk_i8_codes(row + p->off[ch]);
    const __m512i x = _mm512_loadu_si512(row + p->off[ch]);
    return _mm512_and_si512(p->kind[ch] ? _mm512_srli_epi16(x, 4) : x, m15);
}

/* acc rows [0, NR) (stride d) += sum_t w[r][t] v_t for tokens a..a+n-1 (w[r][t - a]), as
 * qk_values, in blocks of QK_VB tokens from a multiple of QK_VB (one weight scale per block
 * and row); scratch: RV_QATTN_ROWS * 2d + 8d floats (vsT and vzT, QK_VFOLD blocks': 8d at most) */
RV_INLINE void qk_values_int(const int NR, const int ng, const int nch, const qk_vplan *p,
                             const struct rv_qhead *h, int a, int n, const float *w, int w_stride, float *acc,
                             float *scratch)
{
    const int d = h->head_dim, G = h->G;
    const int one_z = ng <= 4;           /* every chunk's four groups are groups 0..3 */
    float *facc = scratch;                          /* [NR][nch][4][16], lanes permuted */
    float *zacc = facc + (size_t)NR * nch * 64;     /* [NR][ng][16] */
    float *vsT = zacc + (size_t)NR * ng * 16;       /* [QK_VFOLD][QK_VB / 16][ng][16] */
    float *vzT = vsT + (size_t)QK_VFOLD * (QK_VB / 16) * ng * 16;
    const size_t tstride = (size_t)(QK_VB / 16) * ng * 16;    /* a block's in vsT, vzT */
    memset(facc, 0, sizeof(float) * ((size_t)NR * nch * 64 + (size_t)NR * ng * 16));
    /* QK_VFOLD blocks at a time: first their parameters and the maxima that set their steps,
     * the maxima of all of them folded together and their quotients in one division each (one
     * reduction and division per block and row were 3% of q4 decode); then block by block */
    for (int c0 = a / QK_VB * QK_VB; c0 < a + n; c0 += QK_VFOLD * QK_VB) {
        const int nb = (a + n - c0 + QK_VB - 1) / QK_VB < QK_VFOLD ? (a + n - c0 + QK_VB - 1) / QK_VB : QK_VFOLD;
        __mmask16 in[QK_VFOLD][QK_VB / 16] = {{0}};      /* (set for a block's [sb0, sb1) below) */
        int sb0[QK_VFOLD], sb1[QK_VFOLD];
        __m512 vmax[QK_VFOLD], wmax[QK_NR][QK_VFOLD];
        for (int u = 0; u < QK_VFOLD; u++) {
            vmax[u] = _mm512_setzero_ps();
            for (int r = 0; r < NR; r++)
                wmax[r][u] = _mm512_setzero_ps();
            if (u >= nb)
                continue;
            const int b0 = c0 + u * QK_VB;
            sb0[u] = a > b0 ? (a - b0) / 16 : 0;
            sb1[u] = a + n - b0 >= QK_VB ? QK_VB / 16 : (a + n - b0 + 15) / 16;
            /* the sub-blocks' parameters group-major: vsT[u][sb][g][i] = vscale[b0 + 16 sb + i][g]
             * (0 outside [a, a + n)) */
            for (int sb = sb0[u]; sb < sb1[u]; sb++) {
                const int s0 = b0 + 16 * sb;
                const int lo = a > s0 ? a - s0 : 0, hi = a + n - s0 < 16 ? a + n - s0 : 16;
                in[u][sb] = (__mmask16)(((1u << hi) - 1u) & ~((1u << lo) - 1u));
                for (int r = 0; r < NR; r++)
                    wmax[r][u] = _mm512_max_ps(wmax[r][u], _mm512_maskz_loadu_ps(in[u][sb], w + r * w_stride + (s0 - a)));
                const uint16_t *ps = h->vscale + (size_t)s0 * ng, *pz = h->vzero + (size_t)s0 * ng;
                float *ts = vsT + u * tstride + (size_t)sb * ng * 16, *tz = vzT + u * tstride + (size_t)sb * ng * 16;
                if (ng == 1) {
                    const __m512 x = qk_param16(in[u][sb], ps);
                    vmax[u] = _mm512_max_ps(vmax[u], x);
                    _mm512_storeu_ps(ts, x);
                    _mm512_storeu_ps(tz, qk_param16(in[u][sb], pz));
                    continue;
                }
                const int f_lo = lo * ng, f_hi = hi * ng;     /* flat elements to read */
                __m512 xs[QK_VNG], xz[QK_VNG];
                for (int k = 0; k < ng; k++) {
                    if (lo == 0 && hi == 16) {
                        xs[k] = rv_vf_load_f16(ps + 16 * k);
                        xz[k] = rv_vf_load_f16(pz + 16 * k);
                        continue;
                    }
                    const int e0 = f_lo - 16 * k, e1 = f_hi - 16 * k;
                    const unsigned m1 = e1 >= 16 ? 0xFFFFu : (e1 <= 0 ? 0u : (1u << e1) - 1u);
                    const unsigned m0 = e0 <= 0 ? 0u : (e0 >= 16 ? 0xFFFFu : (1u << e0) - 1u);
                    const __mmask16 m = (__mmask16)(m1 & ~m0);
                    xs[k] = qk_param16(m, ps + 16 * k);
                    xz[k] = qk_param16(m, pz + 16 * k);
                }
                for (int k = 0; k < ng; k++)
                    vmax[u] = _mm512_max_ps(vmax[u], xs[k]);
                for (int g = 0; g < ng; g++) {
                    __m512 os = _mm512_setzero_ps(), oz = _mm512_setzero_ps();
                    for (int k = 0; k < ng; k += 2) {
                        const __mmask16 m = p->tmask[k / 2][g];
                        os = _mm512_mask_mov_ps(os, m, _mm512_permutex2var_ps(xs[k], p->tidx[k / 2][g], xs[k + 1 < ng ? k + 1 : k]));
                        oz = _mm512_mask_mov_ps(oz, m, _mm512_permutex2var_ps(xz[k], p->tidx[k / 2][g], xz[k + 1 < ng ? k + 1 : k]));
                    }
                    _mm512_storeu_ps(ts + 16 * g, os);
                    _mm512_storeu_ps(tz + 16 * g, oz);
                }
            }
        }
        /* per block: the largest scale vsm and the scales' prescale 255 / vsm; per block and
         * row: the largest weight M, 1 / M, and the step S / 255 with S = M vsm (>= every
         * w * scale), each as the scalar expression would give it */
        float vinv[QK_VFOLD], winv[QK_NR][QK_VFOLD], sc[QK_NR][QK_VFOLD];
        __m128 vsm;
        {
            float mx[QK_VFOLD];
            qk_fold4(vmax, 1, mx);
            vsm = _mm_loadu_ps(mx);
            _mm_storeu_ps(vinv, _mm_and_ps(_mm_cmpgt_ps(vsm, _mm_setzero_ps()), _mm_div_ps(_mm_set1_ps(255.0f), vsm)));
        }
        for (int r = 0; r < NR; r++) {
            float mx[QK_VFOLD];
            qk_fold4(wmax[r], 1, mx);
            const __m128 M = _mm_loadu_ps(mx);
            _mm_storeu_ps(winv[r], _mm_and_ps(_mm_cmpgt_ps(M, _mm_setzero_ps()), _mm_div_ps(_mm_set1_ps(1.0f), M)));
            _mm_storeu_ps(sc[r], _mm_div_ps(_mm_mul_ps(M, vsm), _mm_set1_ps(255.0f)));
        }
        for (int u = 0; u < nb; u++) {
            const int b0 = c0 + u * QK_VB;
            float *vsTu = vsT + u * tstride, *vzTu = vzT + u * tstride;
            /* the scales prescaled once for every row, then per row the u8 weights per sub-block
             * (four groups per chunk, quads of tokens) */
            for (int i = sb0[u] * ng * 16; i < sb1[u] * ng * 16; i += 16)
                _mm512_storeu_ps(vsTu + i, _mm512_mul_ps(_mm512_loadu_ps(vsTu + i), _mm512_set1_ps(vinv[u])));
            __m512i Z[QK_NR][QK_VB / 16][QK_VCH];
            for (int r = 0; r < NR; r++) {
                const float *wr = w + r * w_stride + (b0 - a);
                const __m512 wi = _mm512_set1_ps(winv[r][u]);
                float *za = zacc + (size_t)r * ng * 16;
                __m512 zr[QK_VNG];
                for (int g = 0; g < ng; g++)
                    zr[g] = _mm512_loadu_ps(za + 16 * g);
                for (int sb = sb0[u]; sb < sb1[u]; sb++) {
                    const __m512 wv = _mm512_maskz_loadu_ps(in[u][sb], wr + 16 * sb), wn = _mm512_mul_ps(wv, wi);
                    const float *ts = vsTu + (size_t)sb * ng * 16, *tz = vzTu + (size_t)sb * ng * 16;
                    __m512i qv[QK_VNG + 4];
                    for (int g = 0; g < ng; g++) {
                        qv[g] = _mm512_cvtps_epi32(_mm512_mul_ps(wn, _mm512_loadu_ps(ts + 16 * g)));
                        zr[g] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(tz + 16 * g), zr[g]);
                    }
                    for (int g = ng; g < ng + 4; g++)
                        qv[g] = _mm512_setzero_si512();
                    if (one_z)
                        Z[r][sb][0] = _mm512_packus_epi16(_mm512_packs_epi32(qv[0], qv[1]), _mm512_packs_epi32(qv[2], qv[3]));
                    else
                        for (int ch = 0; ch < nch; ch++) {
                            const int *sl = p->sel[ch];
                            Z[r][sb][ch] = _mm512_packus_epi16(_mm512_packs_epi32(qv[sl[0]], qv[sl[1]]),
                                                               _mm512_packs_epi32(qv[sl[2]], qv[sl[3]]));
                        }
                }
                for (int g = 0; g < ng; g++)
                    _mm512_storeu_ps(za + 16 * g, zr[g]);
            }
            /* the sums: per chunk, four tokens at a time, one flush per block */
            for (int ch = 0; ch < nch; ch++) {
                const __m512i ix[4] = {p->idx[ch][0], p->idx[ch][1], p->idx[ch][2], p->idx[ch][3]};
                __m512i ia[QK_NR][4];
                for (int r = 0; r < NR; r++)
                    for (int m = 0; m < 4; m++)
                        ia[r][m] = _mm512_setzero_si512();
                for (int sb = sb0[u]; sb < sb1[u]; sb++)
                    for (int qd = 0; qd < 4; qd++) {
                        const int t = b0 + 16 * sb + 4 * qd;
                        if (t + 4 <= a || t >= a + n)
                            continue;                      /* four tokens no row weighs */
                        __m512i T[4];
                        if (t + 4 <= G)
                            for (int i = 0; i < 4; i++)
                                T[i] = qk_vchunk(p, h->vcodes + (size_t)(t + i) * h->vrow, ch);
                        else                               /* past the group's end: nothing to read */
                            for (int i = 0; i < 4; i++)
                                T[i] = t + i < G ? qk_vchunk(p, h->vcodes + (size_t)(t + i) * h->vrow, ch) : _mm512_setzero_si512();
                        __m512i X[4];
                        rv_interleave4_epi8(T, X);
                        for (int r = 0; r < NR; r++) {
                            const __m512i W = _mm512_permutexvar_epi32(ix[qd], Z[r][sb][one_z ? 0 : ch]);
                            for (int m = 0; m < 4; m++)
                                ia[r][m] = qk_dp(ia[r][m], W, X[m]);
                        }
                    }
                for (int r = 0; r < NR; r++)
                    for (int m = 0; m < 4; m++) {
                        float *fa = facc + (((size_t)r * nch + ch) * 4 + m) * 16;
                        _mm512_storeu_ps(fa, _mm512_fmadd_ps(_mm512_set1_ps(sc[r][u]), _mm512_cvtepi32_ps(ia[r][m]), _mm512_loadu_ps(fa)));
                    }
            }
        }
    }
    /* back to channel order (lane L of the four X[m] sums: channels chan0[L] .. + 15), plus the
     * zero terms */
    for (int r = 0; r < NR; r++) {
        float *ar = acc + r * d;
        for (int ch = 0; ch < nch; ch++) {
            const float *fa = facc + ((size_t)r * nch + ch) * 64;
            const __m512i in[4] = {_mm512_loadu_si512(fa), _mm512_loadu_si512(fa + 16), _mm512_loadu_si512(fa + 32),
                                   _mm512_loadu_si512(fa + 48)};
            __m512i nl[4];
            rv512_transpose_lanes4(in, nl);
            for (int L = 0; L < 4; L++) {
                float *dst = ar + p->chan0[ch][L];
                _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), _mm512_castsi512_ps(nl[L])));
            }
        }
        for (int g = 0; g < ng; g++) {
            const __m512 z = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_loadu_ps(zacc + ((size_t)r * ng + g) * 16)));
            const int c1 = (g + 1) * h->group_size < d ? (g + 1) * h->group_size : d;
            for (int c0 = g * h->group_size; c0 < c1; c0 += 16)
                _mm512_storeu_ps(ar + c0, _mm512_add_ps(_mm512_loadu_ps(ar + c0), z));
        }
    }
}
#endif

#if defined(RV_ISA_AVX2)
/* ---- 4-bit values as integer sums on AVX2 (VPMADDUBSW + VPMADDWD): the same weights as the
 * avx512vnni path above (per block of QK_VB tokens and row, u8 round(w scale 255 / S) with
 * S = max w * max scale of the block; zero terms as float dots), 256 bits at a time. A load
 * of 32 code bytes gives 32 channels' low nibbles and the 32 channels `half` further on's high
 * nibbles; four tokens' codes of a channel interleaved in an int32 lane meet their four
 * weights in one VPMADDUBSW (pairs: 2 * 255 * 15 fits int16) and one VPMADDWD. A 128-bit lane
 * holds 16 channels of one group (group_size a multiple of 16). The block's interleaved codes
 * go to scratch once and every row reads them there (AVX2 has 16 registers). ---- */
/* 0 when the integer path does not apply to these tokens (the float path then runs): the
 * shapes above, and u8 weights need scales >= 0 (finite), what the codec writes */
static int qk_values_int_applies(const struct rv_qhead *h, int a, int n)
{
    const int d = h->head_dim, gs = h->group_size, ng = (d + gs - 1) / gs;
    if (h->bits != 4 || d % 64 || gs % 16 || ng > QK_VNG)
        return 0;
    const uint16_t *vs = h->vscale + (size_t)a * ng;
    const int np = n * ng;
    int i = 0;
    __m256 ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    for (; i + 8 <= np; i += 8) {
        const __m256 x = rv_vf_load_f16(vs + i);         /* (NaN fails both) */
        ok = _mm256_and_ps(ok, _mm256_and_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ),
                                             _mm256_cmp_ps(x, _mm256_set1_ps(65504.0f), _CMP_LE_OQ)));
    }
    for (; i < np; i++)
        if (!(qk_param(vs, i) >= 0.0f && qk_param(vs, i) <= 65504.0f))
            return 0;
    return _mm256_movemask_ps(ok) == 0xFF;
}

/* One parameter array of a whole block, token-major [16][ng] (ng 1, 2 or 4), to group-major
 * [ng][16] by in-register transposes (the scalar moves of the general case were 64-128 loads
 * and stores per block); returns its lanes' maxima (a lane maximum is the array's). */
RV_INLINE __m128 qk_params16(int ng, const uint16_t *src, float *dst)
{
    __m128 m = _mm_setzero_ps();
    if (ng == 1) {
        for (int e = 0; e < 16; e += 4) {
            const __m128 x = qk_param4(src + e);
            _mm_storeu_ps(dst + e, x);
            m = _mm_max_ps(m, x);
        }
    } else if (ng == 2) {
        for (int e = 0; e < 16; e += 8) {
            /* a: tokens e .. e + 3, b: e + 4 .. e + 7 (two groups each); the even / odd
             * floats per 128-bit lane are tokens (e, e+1, e+4, e+5 | e+2, e+3, e+6, e+7) */
            const __m256 a = rv_vf_load_f16(src + 2 * e), b = rv_vf_load_f16(src + 2 * e + 8);
            const __m256 g0 = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
            const __m256 g1 = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
            _mm256_storeu_ps(dst + e, g0);
            _mm256_storeu_ps(dst + 16 + e, g1);
            const __m256 g = _mm256_max_ps(g0, g1);
            m = _mm_max_ps(m, _mm_max_ps(_mm256_castps256_ps128(g), _mm256_extractf128_ps(g, 1)));
        }
    } else {
        for (int e = 0; e < 16; e += 4) {          /* tokens e .. e + 3, four groups each */
            __m128 r0 = qk_param4(src + 4 * e), r1 = qk_param4(src + 4 * e + 4);
            __m128 r2 = qk_param4(src + 4 * e + 8), r3 = qk_param4(src + 4 * e + 12);
            _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
            _mm_storeu_ps(dst + e, r0);
            _mm_storeu_ps(dst + 16 + e, r1);
            _mm_storeu_ps(dst + 32 + e, r2);
            _mm_storeu_ps(dst + 48 + e, r3);
            m = _mm_max_ps(m, _mm_max_ps(_mm_max_ps(r0, r1), _mm_max_ps(r2, r3)));
        }
    }
    return m;
}

/* A whole block's per-token value scales and zeros to group-major ts / tz [ng][16]; returns
 * the largest scale (scales are >= 0). */
RV_INLINE float qk_vparams16(int ng, const uint16_t *ps, const uint16_t *pz, float *ts, float *tz)
{
    __m128 mx = qk_params16(ng, ps, ts);
    qk_params16(ng, pz, tz);
    mx = _mm_max_ps(mx, _mm_movehl_ps(mx, mx));
    return _mm_cvtss_f32(_mm_max_ss(mx, _mm_movehdup_ps(mx)));
}

/* acc rows [0, NR) (stride d) += sum_t w[r][t] v_t for tokens a..a+n-1 (w[r][t - a]);
 * scratch: NR d + 4 d + NR 8 ng + 4 QK_VNG 16 floats (within RV_QATTN_ROWS * 2d + 8d) */
RV_INLINE void qk_values_int(const int NR, const struct rv_qhead *h, int a, int n, const float *w, int w_stride,
                             float *acc, float *scratch)
{
    const int d = h->head_dim, G = h->G, gs = h->group_size, ng = (d + gs - 1) / gs, half = d / 2;
    const int nch = d / 32;                        /* chunks of 32 channels: lo nibbles, then hi */
    float *facc = scratch;                         /* [NR][nch][4][8], channels permuted */
    __m256i *xb = (__m256i *)(facc + (size_t)NR * d);   /* [nch][4 quads][4], only float-aligned */
    float *zacc = facc + (size_t)NR * d + 4 * (size_t)d;         /* [NR][ng][8] */
    float *ts = zacc + (size_t)NR * ng * 8;                       /* [ng][16] scales, then zeros */
    float *tz = ts + (size_t)QK_VNG * 16;
    uint8_t w8[QK_NR][QK_VNG][QK_VB];
    int lane_group[RV_MAX_HEAD_DIM / 32][2];       /* each chunk's two 16-channel lanes' groups */
    for (int ch = 0; ch < nch; ch++)
        for (int L = 0; L < 2; L++)
            lane_group[ch][L] = (32 * ch + 16 * L) / gs;
    memset(facc, 0, sizeof(float) * (size_t)NR * d);
    memset(zacc, 0, sizeof(float) * (size_t)NR * ng * 8);
    const __m256i m15 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    for (int b0 = a / QK_VB * QK_VB; b0 < a + n; b0 += QK_VB) {
        const int lo = a > b0 ? a - b0 : 0, hi = a + n - b0 < QK_VB ? a + n - b0 : QK_VB;
        /* the block's tokens in [lo, hi), its parameters group-major (0 outside), and its
         * largest scale */
        const __m256i in[2] = {rv256_lanes_in(0, lo, hi), rv256_lanes_in(8, lo, hi)};
        const uint16_t *ps = h->vscale + (size_t)b0 * ng, *pz = h->vzero + (size_t)b0 * ng;
        /* by plain loads: AVX2 gathers (masked, or clamped and zeroed) gave wrong scales under
         * qemu's Haswell (tests/test_neon.py), though right on this Zen 3 */
        float vsm = 0.0f;
        if (lo == 0 && hi == QK_VB && (ng == 1 || ng == 2 || ng == 4)) {
            vsm = qk_vparams16(ng, ps, pz, ts, tz);
        } else {
            for (int g = 0; g < ng; g++) {
                for (int e = 0; e < QK_VB; e += 8) {
                    _mm256_storeu_ps(ts + g * 16 + e, _mm256_setzero_ps());
                    _mm256_storeu_ps(tz + g * 16 + e, _mm256_setzero_ps());
                }
                for (int t = lo; t < hi; t++) {
                    const float x = qk_param(ps, (size_t)t * ng + g);
                    ts[g * 16 + t] = x;
                    tz[g * 16 + t] = qk_param(pz, (size_t)t * ng + g);
                    vsm = x > vsm ? x : vsm;
                }
            }
        }
        const __m256 vinv = _mm256_set1_ps(vsm > 0.0f ? 255.0f / vsm : 0.0f);
        for (int i = 0; i < ng * 16; i += 8)
            _mm256_storeu_ps(ts + i, _mm256_mul_ps(_mm256_loadu_ps(ts + i), vinv));
        /* per row: the step S / 255, the u8 weights, the zero terms */
        float sc[QK_NR];
        for (int r = 0; r < NR; r++) {
            const float *wr = w + r * w_stride + (b0 - a);      /* (masked: read in [lo, hi) only) */
            const __m256 w0 = _mm256_maskload_ps(wr, in[0]), w1 = _mm256_maskload_ps(wr + 8, in[1]);
            const float M = rv_vf_hmax(_mm256_max_ps(w0, w1));     /* weights are >= 0 */
            const __m256 winv = _mm256_set1_ps(M > 0.0f ? 1.0f / M : 0.0f);
            const __m256 n0 = _mm256_mul_ps(w0, winv), n1 = _mm256_mul_ps(w1, winv);
            sc[r] = M * vsm / 255.0f;
            for (int g = 0; g < ng; g++) {
                const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(n0, _mm256_loadu_ps(ts + g * 16)));
                const __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(n1, _mm256_loadu_ps(ts + g * 16 + 8)));
                _mm_storeu_si128((__m128i *)w8[r][g], rv256_pack_u8x16(q0, q1));
                float *z = zacc + ((size_t)r * ng + g) * 8;
                _mm256_storeu_ps(z, _mm256_fmadd_ps(w0, _mm256_loadu_ps(tz + g * 16),
                                                    _mm256_fmadd_ps(w1, _mm256_loadu_ps(tz + g * 16 + 8), _mm256_loadu_ps(z))));
            }
        }
        /* the block's codes, four tokens interleaved per int32 lane (lane L of X[k]: channels
         * c0 + 16 L + 4 k ..  + 3) */
        for (int o = 0; o < half; o += 32)
            for (int qd = 0; qd < 4; qd++) {
                const int t = b0 + 4 * qd;
                __m256i T[2][4];
                for (int i = 0; i < 4; i++) {
                    const __m256i x = t + i < G ? _mm256_loadu_si256((const __m256i *)(h->vcodes + (size_t)(t + i) * h->vrow + o))
                                                : _mm256_setzero_si256();    /* past the group: nothing to read */
                    T[0][i] = _mm256_and_si256(x, m15);
                    T[1][i] = _mm256_and_si256(_mm256_srli_epi16(x, 4), m15);
                }
                for (int side = 0; side < 2; side++) {
                    __m256i X[4], *dst = xb + ((size_t)(side * half + o) / 32 * 4 + qd) * 4;
                    rv_interleave4_epi8(T[side], X);
                    for (int k = 0; k < 4; k++)
                        _mm256_storeu_si256(dst + k, X[k]);
                }
            }
        /* the sums, row by row: per chunk four int16 accumulators over the block (a pair is
         * at most 2 * 255 * 15, four quads' 30600 < 32768), to int32 once, one flush */
        for (int r = 0; r < NR; r++)
            for (int ch = 0; ch < nch; ch++) {
                const int g0 = lane_group[ch][0], g1 = lane_group[ch][1];
                __m256i i16[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                                  _mm256_setzero_si256()};
                for (int qd = 0; qd < 4; qd++) {
                    if (4 * qd + 4 <= lo || 4 * qd >= hi)
                        continue;                          /* four tokens no row weighs */
                    int32_t u0, u1;
                    memcpy(&u0, &w8[r][g0][4 * qd], 4);
                    memcpy(&u1, &w8[r][g1][4 * qd], 4);
                    const __m256i W = g0 == g1 ? _mm256_set1_epi32(u0)
                                               : _mm256_setr_m128i(_mm_set1_epi32(u0), _mm_set1_epi32(u1));
                    const __m256i *X = xb + ((size_t)ch * 4 + qd) * 4;
                    for (int k = 0; k < 4; k++)
                        i16[k] = _mm256_add_epi16(i16[k], _mm256_maddubs_epi16(W, _mm256_loadu_si256(X + k)));
                }
                float *fa = facc + ((size_t)r * nch + ch) * 32;
                const __m256 s = _mm256_set1_ps(sc[r]);
                for (int k = 0; k < 4; k++)
                    _mm256_storeu_ps(fa + 8 * k, _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(_mm256_madd_epi16(i16[k], ones)),
                                                                 _mm256_loadu_ps(fa + 8 * k)));
            }
    }
    /* back to channel order, plus the zero terms */
    for (int r = 0; r < NR; r++) {
        float *ar = acc + (size_t)r * d;
        for (int ch = 0; ch < nch; ch++) {
            const float *fa = facc + ((size_t)r * nch + ch) * 32;
            for (int k = 0; k < 4; k++)
                for (int L = 0; L < 2; L++) {
                    float *dst = ar + 32 * ch + 16 * L + 4 * k;
                    _mm_storeu_ps(dst, _mm_add_ps(_mm_loadu_ps(dst), _mm_loadu_ps(fa + 8 * k + 4 * L)));
                }
        }
        for (int g = 0; g < ng; g++) {
            const __m256 z = _mm256_set1_ps(rv_vf_hsum(_mm256_loadu_ps(zacc + ((size_t)r * ng + g) * 8)));
            const int c1 = (g + 1) * gs < d ? (g + 1) * gs : d;
            for (int c0 = g * gs; c0 < c1; c0 += 8)
                _mm256_storeu_ps(ar + c0, _mm256_add_ps(_mm256_loadu_ps(ar + c0), z));
        }
    }
}
#endif

/* the values of qk_rows: integer sums where they apply (QK_VALUES_INT), else floats */
#if (defined(RV_ISA_AVX512) && defined(RV_HAVE_VNNI)) || defined(RV_ISA_AVX2)
#define QK_VALUES_INT 1
#else
#define QK_VALUES_INT 0
#endif
RV_INLINE void qk_values_sum(const int NR, const struct rv_qhead *h, int a, int n, const float *w, int w_stride,
                             float *acc, float *scratch)
{
#if defined(RV_ISA_AVX512)
    qk_vplan p;
    if (QK_VALUES_INT && h->bits == 4 && qk_vplan_init(&p, h, a, n)) {
        /* the common shapes with their loops unrolled */
        switch (p.ng * 8 + p.nch) {
        case 4 * 8 + 2: qk_values_int(NR, 4, 2, &p, h, a, n, w, w_stride, acc, scratch); break;   /* d 128, groups 32 */
        case 2 * 8 + 1: qk_values_int(NR, 2, 1, &p, h, a, n, w, w_stride, acc, scratch); break;   /* d 64, groups 32 */
        case 2 * 8 + 2: qk_values_int(NR, 2, 2, &p, h, a, n, w, w_stride, acc, scratch); break;   /* d 128, groups 64 */
        default: qk_values_int(NR, p.ng, p.nch, &p, h, a, n, w, w_stride, acc, scratch); break;
        }
        return;
    }
#elif defined(RV_ISA_AVX2)
    if (qk_values_int_applies(h, a, n)) {
        qk_values_int(NR, h, a, n, w, w_stride, acc, scratch);
        return;
    }
#endif
    (void)scratch;
    qk_values(NR, h, a, n, w, w_stride, acc);
}

RV_INLINE void qk_rows(const int NR, rv_attn_state *st, int r0, const struct rv_qhead *h, int a, int n,
                       const int *visible, float *scratch, qk_pf *pf)
{
    const int d = h->head_dim, G = h->G, dk = d + h->nk;
    const int s_stride = (G + 2 * RV_VW - 1) / RV_VW * RV_VW;   /* room for the softmax padding */
    float *s = scratch, *qs = s + (size_t)QK_NR * s_stride;      /* qs [NR][dk] */
    float *vscr = qs + (size_t)QK_NR * (d + RV_MAX_OUTLIERS);   /* qk_values_int's */
    float bias[QK_NR], corr[QK_NR];
    int vis[QK_NR], n_eff = 0;
    for (int r = 0; r < NR; r++) {
        vis[r] = visible ? (visible[r0 + r] < n ? visible[r0 + r] : n) : n;
        n_eff = vis[r] > n_eff ? vis[r] : n_eff;
    }
    if (n_eff <= 0)
        return;
    /* q . (scale * code + zero) = (q * scale) . code + q . zero: scale the queries once per
     * group (vectorised: per token it is d / G of the work); an outlier channel's high nibble
     * row weighs 16 times its low nibble row */
    rv_vf bsum[QK_NR];                /* q . zero in the same pass, the rows' sums folded at once */
    float btail[QK_NR];
    for (int r = 0; r < NR; r++)
        bsum[r] = rv_vf_zero();
    /* channels outermost: each vector of the binary16 scales and zeros converted once for all
     * the rows (each row's sums still go in channel order) */
    int c = 0;
    for (; c + RV_VW <= d; c += RV_VW) {
        const rv_vf ks = rv_vf_load_f16(h->kscale + c), kz = rv_vf_load_f16(h->kzero + c);
        for (int r = 0; r < NR; r++) {
            const rv_vf qv = rv_vf_load(st->q + (r0 + r) * st->q_stride + c);
            rv_vf_store(qs + r * dk + c, rv_vf_mul(qv, ks));
            bsum[r] = rv_vf_fmadd(qv, kz, bsum[r]);
        }
    }
    for (int r = 0; r < NR; r++) {
        const float *q = st->q + (r0 + r) * st->q_stride;
        float *qr = qs + r * dk;
        btail[r] = 0.0f;
        for (int ct = c; ct < d; ct++) {
            qr[ct] = q[ct] * qk_param(h->kscale, ct);
            btail[r] += q[ct] * qk_param(h->kzero, ct);
        }
        for (int o = 0; o < h->nk; o++)
            qr[d + o] = 16.0f * qr[h->kidx[o]];
    }
    qk_row_sums(NR, bsum, bias);
    for (int r = 0; r < NR; r++)
        bias[r] += btail[r];
    int j0 = 0;
    qk_i8_query w8;
    if (h->bits == 4) {
        /* qs back as the weights' floats only for tokens the float path scores (every token
         * on the scalar table; on SIMD ones, an odd group's or blocks' remainder) */
#if defined(RV_ISA_AVX512) || defined(RV_ISA_AVX2)
        const int float_tail = G % 2 || (G / 2) % QK_I8_BLOCK;
#else
        const int float_tail = 1;
#endif
        qk_i8_weights(NR, qs, d, h->nk, &w8, float_tail);
#if defined(RV_ISA_AVX512) || defined(RV_ISA_AVX2)
        j0 = qk_scores_i8(NR, h, bias, s, s_stride, pf, &w8);
#endif
    }
    qk_scores(NR, h, qs, bias, s, s_stride, pf, j0);
    qk_pf_lines(pf, 1 << 30);     /* the rest of it */
    /* the online softmax over tokens [a, a + n): weights left in s[r][a ..] */
    for (int r = 0; r < NR; r++) {
        corr[r] = att_stream_softmax_row(s + r * s_stride + a, vis[r], n_eff, &st->m[r0 + r], &st->l[r0 + r]);
        if (corr[r] != 1.0f)
            scale_f32((size_t)d, corr[r], st->acc + (size_t)(r0 + r) * d);
    }
    float *acc = st->acc + (size_t)r0 * d;
    /* outlier value channels: what the rows had before, their slots replaced after */
    float held[QK_NR][RV_MAX_OUTLIERS];
    for (int o = 0; o < h->nv; o++)
        for (int r = 0; r < NR; r++)
            held[r][o] = acc[r * d + h->vidx[o]];
    qk_values_sum(NR, h, a, n_eff, s + a, s_stride, acc, vscr);
    qk_outlier_values(NR, h, a, n_eff, s + a, s_stride, held, acc);
}

/* Fold tokens [a, a + n) of one KV head's quantized group into st. Row r sees tokens
 * [a, a + visible[r]) (visible NULL: all n). */
static void attend_qgroup(rv_attn_state *st, const struct rv_qhead *h, int a, int n, const int *visible,
                          float *scratch)
{
    qk_pf pf = {(const char *)h->prefetch, (const char *)h->prefetch + (h->prefetch ? h->prefetch_bytes : 0)};
    int r0 = 0;
    for (; r0 + QK_NR <= st->rows; r0 += QK_NR)
        qk_rows(QK_NR, st, r0, h, a, n, visible, scratch, &pf);
    switch (st->rows - r0) {
    case 3: qk_rows(3, st, r0, h, a, n, visible, scratch, &pf); break;
    case 2: qk_rows(2, st, r0, h, a, n, visible, scratch, &pf); break;
    case 1: qk_rows(1, st, r0, h, a, n, visible, scratch, &pf); break;
    default: break;
    }
}

#include "kernels/turbo_impl.h"

static void fill_quant_ops(rv_ops *ops)
{
    ops->dequant_rows_channel = dequant_rows_channel;
    ops->dequant_rows_group = dequant_rows_group;
    ops->attend_qgroup = attend_qgroup;
    fill_turbo_ops(ops);
}

#endif
