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
#include "rv_simd.h"
#include "kernels/rv_ops.h"
#include "kernels/basic_impl.h"
#include "kernels/attention_impl.h"
#include "kernels/rv_qview.h"

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

/* ---- outlier value channels: RV_VW tokens' 8-bit codes (t0..) scattered over the token rows,
 * as floats scale * code + zero. The x86 gathers read a 32-bit word at each code byte: up to 3
 * bytes past the last token's, which the q4 group layout guarantees when head_dim >= 16 (its
 * format's contract; qk_vout_gathers says when to use them). ---- */
#if defined(RV_ISA_AVX512) || defined(RV_ISA_AVX2)
#if defined(RV_ISA_AVX512)
typedef __m512i qk_vi;
#define qk_vi_set1 _mm512_set1_epi32
#define qk_vi_add _mm512_add_epi32
#define qk_vi_mullo _mm512_mullo_epi32
#define qk_vi_and _mm512_and_si512
#define qk_vi_or _mm512_or_si512
#define qk_vi_srl _mm512_srl_epi32
#define qk_vi_slli _mm512_slli_epi32
#define qk_vi_cvt _mm512_cvtepi32_ps
#define qk_vi_lanes() _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
#define qk_vi_gather(base, idx) _mm512_i32gather_epi32((idx), (const void *)(base), 1)
#else
typedef __m256i qk_vi;
#define qk_vi_set1 _mm256_set1_epi32
#define qk_vi_add _mm256_add_epi32
#define qk_vi_mullo _mm256_mullo_epi32
#define qk_vi_and _mm256_and_si256
#define qk_vi_or _mm256_or_si256
#define qk_vi_srl _mm256_srl_epi32
#define qk_vi_slli _mm256_slli_epi32
#define qk_vi_cvt _mm256_cvtepi32_ps
#define qk_vi_lanes() _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)
#define qk_vi_gather(base, idx) _mm256_i32gather_epi32((const int *)(base), (idx), 1)
#endif
#define QK_VOUT_GATHERS 1
RV_INLINE void qk_vout_block(const rv_qhead_vout *v, int t0, rv_vf scale, rv_vf zero, float *xo)
{
    const qk_vi t = qk_vi_add(qk_vi_set1(t0), qk_vi_lanes()), nib = qk_vi_set1(15);
    qk_vi lo = qk_vi_gather(v->lo, qk_vi_mullo(t, qk_vi_set1((int)v->lo_stride)));
    qk_vi hi = qk_vi_gather(v->hi, qk_vi_mullo(t, qk_vi_set1((int)v->hi_stride)));
    lo = qk_vi_and(qk_vi_srl(lo, _mm_cvtsi32_si128(v->lo_shift)), nib);
    hi = qk_vi_and(qk_vi_srl(hi, _mm_cvtsi32_si128(v->hi_shift)), nib);
    rv_vf_store(xo, rv_vf_fmadd(qk_vi_cvt(qk_vi_or(lo, qk_vi_slli(hi, 4))), scale, zero));
}
#else
#define QK_VOUT_GATHERS 0
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
                         float *s, int s_stride, qk_pf *pf)
{
    const int G = h->G, d = h->head_dim + h->nk;
    int j = 0, lo_end, hi_start;
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

/* acc rows [0, NR) (stride d) += sum_t w[r][t] v_t for tokens a..a+n-1, values dequantized in
 * registers (token-major codes, per-token channel-group parameters as floats). */
RV_INLINE void qk_values(const int NR, const struct rv_qhead *h, int a, int n, const float *w,
                         int w_stride, float *acc)
{
    const int d = h->head_dim, gs = h->group_size, ng = (d + gs - 1) / gs;
    const float *vs = h->vscale, *vz = h->vzero;
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
                    const float *ps = vs + (size_t)tok * ng, *pz = vz + (size_t)tok * ng;
                    rv_vf xl[QK_SW], xh[QK_SW];
                    for (int u = 0; u < QK_SW; u++) {
                        xl[u] = rv_vf_fmadd(qk_lo4(b + u * RV_VW), rv_vf_set1(ps[gl[u]]), rv_vf_set1(pz[gl[u]]));
                        xh[u] = rv_vf_fmadd(qk_hi4(b + u * RV_VW), rv_vf_set1(ps[gh[u]]), rv_vf_set1(pz[gh[u]]));
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
                    const float *ps = vs + (size_t)tok * ng, *pz = vz + (size_t)tok * ng;
                    rv_vf xl = rv_vf_fmadd(qk_lo4(b), rv_vf_set1(ps[gl]), rv_vf_set1(pz[gl]));
                    rv_vf xh = rv_vf_fmadd(qk_hi4(b), rv_vf_set1(ps[gh]), rv_vf_set1(pz[gh]));
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
                    float x = qk_code(h->vcodes + tok * h->vrow, c, d, 4) * vs[(size_t)tok * ng + gi] +
                              vz[(size_t)tok * ng + gi];
                    sum += w[r * w_stride + t] * x;
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
                rv_vf x = rv_vf_fmadd(qk_u8(h->vcodes + tok * h->vrow + j), rv_vf_set1(vs[(size_t)tok * ng + g]),
                                      rv_vf_set1(vz[(size_t)tok * ng + g]));
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
                sum += w[r * w_stride + t] * ((float)h->vcodes[tok * h->vrow + c] * vs[(size_t)tok * ng + gi] +
                                              vz[(size_t)tok * ng + gi]);
            }
            acc[r * d + c] += sum;
        }
    }
}

RV_INLINE void qk_rows(const int NR, rv_attn_state *st, int r0, const struct rv_qhead *h, int a, int n,
                       const int *visible, float *scratch, qk_pf *pf)
{
    const int d = h->head_dim, G = h->G, dk = d + h->nk;
    const int s_stride = (G + 2 * RV_VW - 1) / RV_VW * RV_VW;   /* room for the softmax padding */
    float *s = scratch, *qs = s + (size_t)QK_NR * s_stride;      /* qs [NR][dk] */
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
    for (int r = 0; r < NR; r++) {
        const float *q = st->q + (r0 + r) * st->q_stride;
        float *qr = qs + r * dk;
        int c = 0;
        for (; c + RV_VW <= d; c += RV_VW)
            rv_vf_store(qr + c, rv_vf_mul(rv_vf_load(q + c), rv_vf_load(h->kscale + c)));
        for (; c < d; c++)
            qr[c] = q[c] * h->kscale[c];
        bias[r] = dot_f32(q, h->kzero, (size_t)d);
        for (int o = 0; o < h->nk; o++)
            qr[d + o] = 16.0f * qr[h->kidx[o]];
    }
    qk_scores(NR, h, qs, bias, s, s_stride, pf);
    qk_pf_lines(pf, 1 << 30);     /* the rest of it */
    /* the online softmax over tokens [a, a + n): weights left in s[r][a ..] */
    for (int r = 0; r < NR; r++) {
        corr[r] = att_stream_softmax_row(s + r * s_stride + a, vis[r], n_eff, &st->m[r0 + r], &st->l[r0 + r]);
        if (corr[r] != 1.0f)
            scale_f32((size_t)d, corr[r], st->acc + (size_t)(r0 + r) * d);
    }
    float *acc = st->acc + (size_t)r0 * d;
    /* outlier value channels: qk_values decodes their slots (the low nibbles) with the token's
     * group parameters like any channel; put back what the rows held before it and add their
     * own 8-bit values, decoded once per token into `xo` for every row */
    float held[QK_NR][RV_MAX_OUTLIERS];
    for (int o = 0; o < h->nv; o++)
        for (int r = 0; r < NR; r++)
            held[r][o] = acc[r * d + h->vidx[o]];
    qk_values(NR, h, a, n_eff, s + a, s_stride, acc);
    float *xo = qs + (size_t)QK_NR * (d + RV_MAX_OUTLIERS);     /* [n_eff] */
    for (int o = 0; o < h->nv; o++) {
        const rv_qhead_vout cur = rv_qhead_vout_at(h, o);
        const float scale = h->voscale[o], zero = h->vozero[o];
        int t = 0;
#if QK_VOUT_GATHERS
        if (d >= 16)
            for (; t + RV_VW <= n_eff; t += RV_VW)
                qk_vout_block(&cur, a + t, rv_vf_set1(scale), rv_vf_set1(zero), xo + t);
#endif
        for (; t < n_eff; t++)
            xo[t] = scale * (float)rv_qhead_vout_code(&cur, a + t) + zero;
        for (int r = 0; r < NR; r++)
            acc[r * d + h->vidx[o]] = held[r][o] + dot_f32(s + r * s_stride + a, xo, (size_t)n_eff);
    }
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

/* ---- TurboQuant: codes as bit-planes over a group's tokens (struct rv_thead, kernels/rv_qview.h) ----
 * tq_centroids: the codebook entries of RV_VW tokens t0.. (t0 a multiple of RV_VW) for one
 * rotated coordinate whose `bits` planes sit pb bytes apart; tq_signbits: 1.0 where a plane's
 * bit is set, 0.0 elsewhere. */
#if defined(RV_ISA_AVX512)
RV_INLINE rv_vf tq_centroids(const uint8_t *planes, int bits, size_t pb, int t0, const float *book)
{
    __m512i idx = _mm512_setzero_si512();
    for (int p = 0; p < bits; p++) {
        uint16_t m;
        memcpy(&m, planes + p * pb + (t0 >> 3), 2);
        idx = _mm512_mask_or_epi32(idx, (__mmask16)m, idx, _mm512_set1_epi32(1 << p));
    }
    if (bits <= 4)
        return _mm512_permutexvar_ps(idx, _mm512_loadu_ps(book));
    return _mm512_permutex2var_ps(_mm512_loadu_ps(book), idx, _mm512_loadu_ps(book + 16));
}
RV_INLINE rv_vf tq_signbits(const uint8_t *plane, int t0)
{
    uint16_t m;
    memcpy(&m, plane + (t0 >> 3), 2);
    return _mm512_maskz_mov_ps((__mmask16)m, _mm512_set1_ps(1.0f));
}
#elif defined(RV_ISA_AVX2)
RV_INLINE __m256i tq_lane_bits(const uint8_t *plane, int t0)      /* 0 / 1 per token */
{
    const __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i b = _mm256_and_si256(_mm256_set1_epi32(plane[t0 >> 3]), lanes);
    return _mm256_srli_epi32(_mm256_cmpeq_epi32(b, lanes), 31);
}
RV_INLINE rv_vf tq_centroids(const uint8_t *planes, int bits, size_t pb, int t0, const float *book)
{
    __m256i idx = _mm256_setzero_si256();
    for (int p = 0; p < bits; p++)
        idx = _mm256_or_si256(idx, _mm256_slli_epi32(tq_lane_bits(planes + p * pb, t0), p));
    return _mm256_i32gather_ps(book, idx, 4);
}
RV_INLINE rv_vf tq_signbits(const uint8_t *plane, int t0) { return _mm256_cvtepi32_ps(tq_lane_bits(plane, t0)); }
#elif defined(RV_ISA_NEON)
RV_INLINE uint32x4_t tq_lane_bits(const uint8_t *plane, int t0)
{
    static const uint32_t lane_bit[4] = {1, 2, 4, 8};
    uint32_t nibble = (uint32_t)(plane[t0 >> 3] >> (t0 & 7)) & 15u;
    return vshrq_n_u32(vtstq_u32(vdupq_n_u32(nibble), vld1q_u32(lane_bit)), 31);
}
RV_INLINE rv_vf tq_centroids(const uint8_t *planes, int bits, size_t pb, int t0, const float *book)
{
    uint32x4_t idx = vdupq_n_u32(0);
    for (int p = 0; p < bits; p++)
        idx = vorrq_u32(idx, vshlq_u32(tq_lane_bits(planes + p * pb, t0), vdupq_n_s32(p)));
    float c[4] = {book[vgetq_lane_u32(idx, 0)], book[vgetq_lane_u32(idx, 1)], book[vgetq_lane_u32(idx, 2)],
                  book[vgetq_lane_u32(idx, 3)]};
    return vld1q_f32(c);
}
RV_INLINE rv_vf tq_signbits(const uint8_t *plane, int t0) { return vcvtq_f32_u32(tq_lane_bits(plane, t0)); }
#else
RV_INLINE rv_vf tq_centroids(const uint8_t *planes, int bits, size_t pb, int t0, const float *book)
{
    int code = 0;
    for (int p = 0; p < bits; p++)
        code |= ((planes[p * pb + (t0 >> 3)] >> (t0 & 7)) & 1) << p;
    return book[code];
}
RV_INLINE rv_vf tq_signbits(const uint8_t *plane, int t0) { return (float)((plane[t0 >> 3] >> (t0 & 7)) & 1); }
#endif

/* planes of rotated coordinate i (hi bits for the first D/2 coordinates, lo for the rest) */
RV_INLINE const uint8_t *tq_coord(const uint8_t *planes, int i, int D, int hi, int lo, size_t pb)
{
    const int half = D / 2;
    return planes + (i < half ? (size_t)i * hi : (size_t)half * hi + (size_t)(i - half) * lo) * pb;
}

/* s[r][t] += the outlier key channels' part of the scores, against the plain query (after R q
 * in the state's rows): sum_c q_c (scale_c code_c + zero_c) = sum_c (q_c scale_c) code_c +
 * sum_c q_c zero_c. A pass of its own: the main score loop has no registers to spare. */
RV_INLINE void tq_outlier_scores(const int NR, const rv_attn_state *st, int r0, const struct rv_thead *h,
                                 float *s, int s_stride, int tb0, int tb1)
{
    float qo[RV_TATTN_ROWS][RV_MAX_OUTLIERS], qz[RV_TATTN_ROWS];
    for (int r = 0; r < NR; r++) {
        const float *qp = st->q + (r0 + r) * st->q_stride + h->D;
        qz[r] = 0.0f;
        for (int o = 0; o < h->nk; o++) {
            qo[r][o] = qp[h->kidx[o]] * h->kscale[o];
            qz[r] += qp[h->kidx[o]] * h->kzero[o];
        }
    }
    for (int t0 = tb0; t0 < tb1; t0 += RV_VW) {
        rv_vf acc[RV_TATTN_ROWS];
        for (int r = 0; r < NR; r++)
            acc[r] = rv_vf_add(rv_vf_load(s + r * s_stride + t0), rv_vf_set1(qz[r]));
        for (int o = 0; o < h->nk; o++) {
            rv_vf c = qk_u8(h->kcodes + (size_t)o * h->Gp + t0);
            for (int r = 0; r < NR; r++)
                acc[r] = rv_vf_fmadd(rv_vf_set1(qo[r][o]), c, acc[r]);
        }
        for (int r = 0; r < NR; r++)
            rv_vf_store(s + r * s_stride + t0, acc[r]);
    }
}

/* The outlier value channels into the plain part of the accumulators (w: the rows' weights
 * per token): sum_t w_t (scale code_t + zero) = scale sum_t w_t code_t + zero sum_t w_t. */
RV_INLINE void tq_outlier_values(const int NR, rv_attn_state *st, int r0, const struct rv_thead *h,
                                 const float *w, int tb0, int tb1)
{
    const int Gp = h->Gp;
    float wsum[RV_TATTN_ROWS];
    for (int r = 0; r < NR; r++) {
        rv_vf sum = rv_vf_zero();
        for (int t0 = tb0; t0 < tb1; t0 += RV_VW)
            sum = rv_vf_add(sum, rv_vf_load(w + (size_t)r * Gp + t0));
        wsum[r] = rv_vf_hsum(sum);
    }
    for (int o = 0; o < h->nv; o++) {
        rv_vf acc[RV_TATTN_ROWS];
        for (int r = 0; r < NR; r++)
            acc[r] = rv_vf_zero();
        for (int t0 = tb0; t0 < tb1; t0 += RV_VW) {
            rv_vf c = qk_u8(h->vcodes + (size_t)o * Gp + t0);
            for (int r = 0; r < NR; r++)
                acc[r] = rv_vf_fmadd(rv_vf_load(w + (size_t)r * Gp + t0), c, acc[r]);
        }
        for (int r = 0; r < NR; r++) {
            float *plain = st->acc + (size_t)(r0 + r) * st->head_dim + h->D;
            plain[h->vidx[o]] += h->vscale[o] * rv_vf_hsum(acc[r]) + h->vzero[o] * wsum[r];
        }
    }
}

RV_INLINE void tq_rows(const int NR, rv_attn_state *st, int r0, const struct rv_thead *h, int a, int n,
                       const int *visible, float *scratch, qk_pf *pf)
{
    const int D = h->D, half = D / 2, Gp = h->Gp, W = st->head_dim;   /* W = D + d */
    const size_t pb = h->plane_bytes;
    const int s_stride = Gp + 2 * RV_VW;
    float *s = scratch, *wn = s + (size_t)RV_TATTN_ROWS * s_stride, *w = wn + (size_t)RV_TATTN_ROWS * Gp;
    int vis[RV_TATTN_ROWS], n_eff = 0;
    for (int r = 0; r < NR; r++) {
        vis[r] = visible ? (visible[r0 + r] < n ? visible[r0 + r] : n) : n;
        n_eff = vis[r] > n_eff ? vis[r] : n_eff;
    }
    if (n_eff <= 0)
        return;
    const int tb0 = a / RV_VW * RV_VW, tb1 = (a + n_eff + RV_VW - 1) / RV_VW * RV_VW;
    const float *qrot = st->q + r0 * st->q_stride, *qjl = h->qjl_q + (size_t)r0 * D;
    /* scores: |k| ((R q) . y_hat + |r| sqrt(pi/2)/D (S R q) . sign), RV_VW tokens per vector */
    for (int t0 = tb0; t0 < tb1; t0 += RV_VW) {
        rv_vf mse[RV_TATTN_ROWS], qs[RV_TATTN_ROWS];
        for (int r = 0; r < NR; r++)
            mse[r] = qs[r] = rv_vf_zero();
        for (int i = 0; i < D; i++) {
            const int hi = i < half;
            rv_vf c = tq_centroids(tq_coord(h->kplanes, i, D, h->kbits_hi, h->kbits_lo, pb),
                                   hi ? h->kbits_hi : h->kbits_lo, pb, t0, hi ? h->kbook_hi : h->kbook_lo);
            for (int r = 0; r < NR; r++)
                mse[r] = rv_vf_fmadd(rv_vf_set1(qrot[r * st->q_stride + i]), c, mse[r]);
        }
        qk_pf_lines(pf, 2);
        for (int j = 0; j < D; j++) {
            rv_vf b = tq_signbits(h->qjl + (size_t)j * pb, t0);
            for (int r = 0; r < NR; r++)
                qs[r] = rv_vf_fmadd(rv_vf_set1(qjl[(size_t)r * D + j]), b, qs[r]);
        }
        rv_vf kn = rv_vf_load(h->knorm + t0), kg = rv_vf_mul(rv_vf_load(h->kgamma + t0), rv_vf_set1(h->qjl_scale));
        for (int r = 0; r < NR; r++) {
            /* sum over projections of sq_j * (+1 / -1) = 2 * (sum where the bit is set) - sum */
            rv_vf sgn = rv_vf_sub(rv_vf_add(qs[r], qs[r]), rv_vf_set1(h->qjl_sum[r0 + r]));
            rv_vf_store(s + r * s_stride + t0, rv_vf_mul(kn, rv_vf_fmadd(kg, sgn, mse[r])));
        }
    }
    if (h->nk)
        tq_outlier_scores(NR, st, r0, h, s, s_stride, tb0, tb1);
    qk_pf_lines(pf, 1 << 30);
    /* the online softmax over tokens [a, a + n); the weights of the tokens' lanes (w, for the
     * outlier values) and times |v| (wn) */
    for (int r = 0; r < NR; r++) {
        float *sr = s + r * s_stride;
        float corr = att_stream_softmax_row(sr + a, vis[r], n_eff, &st->m[r0 + r], &st->l[r0 + r]);
        if (corr != 1.0f)
            scale_f32((size_t)W, corr, st->acc + (size_t)(r0 + r) * W);
        for (int t = tb0; t < tb1; t++) {
            const float wt = t >= a && t < a + n_eff ? sr[t] : 0.0f;
            w[(size_t)r * Gp + t] = wt;
            wn[(size_t)r * Gp + t] = wt * h->vnorm[t];
        }
    }
    if (h->nv)
        tq_outlier_values(NR, st, r0, h, w, tb0, tb1);
    /* values in the rotated domain: coordinate by coordinate, the tokens along the lanes */
    for (int i = 0; i < D; i++) {
        const int hi = i < half;
        const uint8_t *planes = tq_coord(h->vplanes, i, D, h->vbits_hi, h->vbits_lo, pb);
        rv_vf acc[RV_TATTN_ROWS];
        for (int r = 0; r < NR; r++)
            acc[r] = rv_vf_zero();
        for (int t0 = tb0; t0 < tb1; t0 += RV_VW) {
            rv_vf c = tq_centroids(planes, hi ? h->vbits_hi : h->vbits_lo, pb, t0, hi ? h->vbook_hi : h->vbook_lo);
            for (int r = 0; r < NR; r++)
                acc[r] = rv_vf_fmadd(rv_vf_load(wn + (size_t)r * Gp + t0), c, acc[r]);
        }
        for (int r = 0; r < NR; r++)
            st->acc[(size_t)(r0 + r) * W + i] += rv_vf_hsum(acc[r]);
    }
}

/* Fold tokens [a, a + n) of one KV head of a TurboQuant group into st, whose rows (head_dim
 * D + d) are [R q | q] and whose accumulators are [rotated domain | plain channels]. */
static void attend_tgroup(rv_attn_state *st, const struct rv_thead *h, int a, int n, const int *visible,
                          float *scratch)
{
    qk_pf pf = {(const char *)h->prefetch, (const char *)h->prefetch + (h->prefetch ? h->prefetch_bytes : 0)};
    int r0 = 0;
    for (; r0 + RV_TATTN_ROWS <= st->rows; r0 += RV_TATTN_ROWS)
        tq_rows(RV_TATTN_ROWS, st, r0, h, a, n, visible, scratch, &pf);
    switch (st->rows - r0) {
    case 3: tq_rows(3, st, r0, h, a, n, visible, scratch, &pf); break;
    case 2: tq_rows(2, st, r0, h, a, n, visible, scratch, &pf); break;
    case 1: tq_rows(1, st, r0, h, a, n, visible, scratch, &pf); break;
    default: break;
    }
}

static void fill_quant_ops(rv_ops *ops)
{
    ops->dequant_rows_channel = dequant_rows_channel;
    ops->dequant_rows_group = dequant_rows_group;
    ops->attend_qgroup = attend_qgroup;
    ops->attend_tgroup = attend_tgroup;
}

#endif
