/* Attention kernels (see rv_ops.h), written once against rv_simd.h, compiled per ISA.
 *
 * Two kernel families, because decode and prefill have opposite shapes:
 *  - streaming (attend_chunk_*, attend_spans_*, attend_heads_*): a few query rows (one GQA
 *    group at decode) against many keys; memory-bound. head_dim runs along the SIMD lanes; each
 *    K/V row is loaded once and used by every row of the group; RV_VW keys' partial dot products
 *    are reduced together by one transpose-add tree; P.V is register-blocked (rows x head_dim
 *    vectors). The next block is software-prefetched into L2, spread over the work of the
 *    current one; attend_heads_* walks token blocks across all heads so NHD data streams in
 *    memory order. (Measured on Zen 4, 2 cores: ~90 cycles per key and head for a group of 4
 *    at head_dim 128, i.e. ~70% of FMA peak; DRAM streaming ~75-90% of the read bandwidth.)
 *  - tiled (attend_rows_*): up to RV_ATTN_TILE_ROWS query rows (prefill); compute-bound. Query
 *    rows run along the lanes (Q packed transposed once), so the online softmax is vertical (no
 *    horizontal reductions) and both Q.K^T and P.V are outer-product micro-kernels fed by
 *    broadcasts of K / V elements from a packed fp32 tile (which also converts fp16 and avoids
 *    the 4 KiB aliasing of NHD rows); the next tile is prefetched while one computes. (~84% of
 *    single-core FMA peak with zmm; ~80% with the ymm table.)
 * The fp32 and fp16 variants are one always-inline body with a constant `f16` flag. The ATT_*
 * tuning macros below can be overridden with -D for measurements.
 */
#ifndef RV_ATTENTION_IMPL_H
#define RV_ATTENTION_IMPL_H

#include <float.h>
#include <math.h>
#include "rv_simd.h"
#include "kernels/rv_ops.h"
#include "kernels/basic_impl.h"

/* ---- per-ISA pieces the generic vocabulary does not have ----
 * ATT_KG     keys per Q.K register block (streaming); divides RV_VW
 * ATT_CB     head_dim vectors per P.V register block (streaming)
 * ATT_T_MR   tiled micro-tile: keys (Q.K^T) or head_dim columns (P.V)
 * ATT_T_NR   tiled micro-tile: row vectors
 * att_slot(j)         where key j's partial vector goes so att_reduce yields keys in order
 * att_reduce(p)       lane i = sum of the lanes of the vector in slot i (RV_VW vectors at p)
 * att_select_lt(a,b,x,y)  lane-wise a < b ? x : y */
#if defined(RV_ISA_AVX512)
#define ATT_KG 4
#define ATT_CB 4
#define ATT_T_MR 6
#define ATT_T_NR 4
RV_INLINE int att_slot(int j) { return ((j & 3) << 2) | (j >> 2); }
RV_INLINE rv_vf att_reduce(const float *p)
{
    __m512 y[8], z[4], w0, w1;
    for (int i = 0; i < 8; i++) {   /* 256-bit halves: lanes 0-7 from slot 2i, 8-15 from 2i+1 */
        __m512 a = _mm512_load_ps(p + 32 * i), b = _mm512_load_ps(p + 32 * i + 16);
        y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    }
    for (int i = 0; i < 4; i++)     /* 128-bit lane L holds slot 4i+L */
        z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0xDD));
    w0 = _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x44), _mm512_shuffle_ps(z[0], z[1], 0xEE));
    w1 = _mm512_add_ps(_mm512_shuffle_ps(z[2], z[3], 0x44), _mm512_shuffle_ps(z[2], z[3], 0xEE));
    /* lane 4L+p holds slot 4p+L */
    return _mm512_add_ps(_mm512_shuffle_ps(w0, w1, 0x88), _mm512_shuffle_ps(w0, w1, 0xDD));
}
RV_INLINE rv_vf att_select_lt(rv_vf a, rv_vf b, rv_vf x, rv_vf y)
{
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x);
}

#elif defined(RV_ISA_AVX2)
#define ATT_KG 2
#define ATT_CB 2
#define ATT_T_MR 6
#define ATT_T_NR 2
RV_INLINE int att_slot(int j) { return ((j & 3) << 1) | (j >> 2); }
RV_INLINE rv_vf att_reduce(const float *p)
{
    __m256 y[4], w0, w1;
    for (int i = 0; i < 4; i++) {   /* 128-bit lane 0 from slot 2i, lane 1 from 2i+1 */
        __m256 a = _mm256_load_ps(p + 16 * i), b = _mm256_load_ps(p + 16 * i + 8);
        y[i] = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    }
    w0 = _mm256_add_ps(_mm256_shuffle_ps(y[0], y[1], 0x44), _mm256_shuffle_ps(y[0], y[1], 0xEE));
    w1 = _mm256_add_ps(_mm256_shuffle_ps(y[2], y[3], 0x44), _mm256_shuffle_ps(y[2], y[3], 0xEE));
    /* lane 4L+p holds slot 2p+L */
    return _mm256_add_ps(_mm256_shuffle_ps(w0, w1, 0x88), _mm256_shuffle_ps(w0, w1, 0xDD));
}
RV_INLINE rv_vf att_select_lt(rv_vf a, rv_vf b, rv_vf x, rv_vf y)
{
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ));
}

#elif defined(RV_ISA_NEON)
#define ATT_KG 4
#define ATT_CB 4
#define ATT_T_MR 6
#define ATT_T_NR 4
RV_INLINE int att_slot(int j) { return j; }
RV_INLINE rv_vf att_reduce(const float *p)
{
    float32x4_t a = vpaddq_f32(vld1q_f32(p), vld1q_f32(p + 4));
    float32x4_t b = vpaddq_f32(vld1q_f32(p + 8), vld1q_f32(p + 12));
    return vpaddq_f32(a, b);
}
RV_INLINE rv_vf att_select_lt(rv_vf a, rv_vf b, rv_vf x, rv_vf y) { return vbslq_f32(vcltq_f32(a, b), x, y); }

#else /* scalar */
#define ATT_KG 1
#define ATT_CB 4
#define ATT_T_MR 4
#define ATT_T_NR 1
RV_INLINE int att_slot(int j) { (void)j; return 0; }
RV_INLINE rv_vf att_reduce(const float *p) { return p[0]; }
RV_INLINE rv_vf att_select_lt(rv_vf a, rv_vf b, rv_vf x, rv_vf y) { return a < b ? x : y; }
#endif

#define ATT_RB 4                /* query rows per streaming register block */
#define ATT_KB RV_ATTN_CHUNK    /* keys per streaming block */
#define ATT_TR RV_ATTN_TILE_ROWS
#define ATT_TK RV_ATTN_TILE_KEYS

#if (ATT_KB % 16) || (ATT_TR % 16) || (ATT_TK % 8)
#error "attention block sizes must be multiples of the widest vector"
#endif

RV_INLINE int att_min(int a, int b) { return a < b ? a : b; }
RV_INLINE int att_max(int a, int b) { return a > b ? a : b; }
RV_INLINE int att_round_up(int x, int m) { return (x + m - 1) / m * m; }

/* K/V element access for either storage type (f16 is a compile-time constant) */
RV_INLINE rv_vf att_load(const void *p, int i, const int f16)
{
    return f16 ? rv_vf_load_f16((const uint16_t *)p + i) : rv_vf_load((const float *)p + i);
}
RV_INLINE float att_load1(const void *p, int i, const int f16)
{
    return f16 ? rv_f16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Software prefetches go to L2 (locality 2): a block ahead is more than L1 holds, and T0
 * prefetches that far ahead measured 4x slower (the lines are evicted before use). */
#ifndef ATT_PF_LOCALITY
#define ATT_PF_LOCALITY 2
#endif
/* What to prefetch while one block of one head is folded in: key j of the block prefetches
 * planned row j, K rows while scoring, V rows while weighting, so the next block arrives just
 * in time. Rows are a pointer list (a span list's next chunk) or evenly spaced (the next token
 * block: for NHD storage whose heads fill the token stride, head h of the current block takes
 * the h-th contiguous share of the next block's memory, so the whole block streams in memory
 * order -- measured 4x faster than head by head, because heads share every page). */
typedef struct {
    const void *const *kl, *const *vl;   /* row pointers, or NULL: rows at kb + j * ks */
    const char *kb, *vb;
    ptrdiff_t ks, vs;                    /* bytes between planned rows */
    int n;                               /* planned rows */
    int row_bytes;
} att_pf;

/* planned row j (NULL when there is none) */
RV_INLINE const char *att_pf_at(const att_pf *pf, const void *const *list, const char *base,
                                ptrdiff_t stride, int j)
{
    if (!pf || j >= pf->n)
        return NULL;
    return list ? (const char *)list[j] : base + j * stride;
}
#define ATT_PF_K(pf, j) att_pf_at(pf, (pf) ? (pf)->kl : NULL, (pf) ? (pf)->kb : NULL, (pf) ? (pf)->ks : 0, j)
#define ATT_PF_V(pf, j) att_pf_at(pf, (pf) ? (pf)->vl : NULL, (pf) ? (pf)->vb : NULL, (pf) ? (pf)->vs : 0, j)

/* every line of planned row j (the tiled kernel: its micro-kernels leave the load ports idle
 * enough for whole rows; the streaming kernels spread theirs, one line per vector step) */
RV_INLINE void att_pf_row(const att_pf *pf, const void *const *list, const char *base,
                          ptrdiff_t stride, int j)
{
    const char *p = att_pf_at(pf, list, base, stride, j);
    if (!p)
        return;
    for (int o = 0; o < pf->row_bytes; o += 64)
        __builtin_prefetch(p + o, 0, ATT_PF_LOCALITY);
    __builtin_prefetch(p + pf->row_bytes - 1, 0, ATT_PF_LOCALITY);   /* rows may straddle */
}

/* ---- walking a span list ---- */
typedef struct {
    const rv_kv_span *spans;
    int nspans;
    int si;      /* current span */
    int off;     /* rows of it already taken */
} att_cursor;

/* Row pointers of the next min(max, remaining) keys; returns how many. */
RV_INLINE int att_gather(att_cursor *cur, int max, const int f16, const void **kp, const void **vp)
{
    const ptrdiff_t es = f16 ? 2 : 4;
    int n = 0;
    while (n < max && cur->si < cur->nspans) {
        const rv_kv_span *s = &cur->spans[cur->si];
        int take = att_min(max - n, s->n - cur->off);
        if (take > 0) {
            const char *k = (const char *)s->k + (ptrdiff_t)cur->off * s->k_stride * es;
            const char *v = (const char *)s->v + (ptrdiff_t)cur->off * s->v_stride * es;
            for (int t = 0; t < take; t++) {
                kp[n + t] = k + t * s->k_stride * es;
                vp[n + t] = v + t * s->v_stride * es;
            }
            n += take;
            cur->off += take;
        }
        if (cur->off >= s->n) {
            cur->si++;
            cur->off = 0;
        }
    }
    return n;
}

/* ---- register tiles: acc[i][t], i < NI scalars broadcast, t < NT vectors ----
 * The P.V of the streaming kernel and both products of the tiled kernel are such outer-product
 * updates. Always inlined with constant NI / NT, so the tile lives in registers. */
#define ATT_TI 8
#define ATT_TT 4
#if ATT_RB > ATT_TI || ATT_T_MR > ATT_TI || ATT_CB > ATT_TT || ATT_T_NR > ATT_TT
#error "register tile too small"
#endif

/* acc = src (row i at src + i*rs, vector t at + t*RV_VW), times row_scale[i] and/or
 * vec_scale[t] when given; src NULL: zeros */
RV_INLINE void att_tile_load(const int NI, const int NT, rv_vf acc[ATT_TI][ATT_TT], const float *src,
                             ptrdiff_t rs, const float *row_scale, const rv_vf *vec_scale)
{
#pragma GCC unroll 8
    for (int i = 0; i < NI; i++)
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            rv_vf x = src ? rv_vf_load(src + i * rs + t * RV_VW) : rv_vf_zero();
            if (row_scale)
                x = rv_vf_mul(x, rv_vf_set1(row_scale[i]));
            if (vec_scale)
                x = rv_vf_mul(x, vec_scale[t]);
            acc[i][t] = x;
        }
}

/* acc[i][t] += b[i * bs] * x[t] */
RV_INLINE void att_tile_fma(const int NI, const int NT, rv_vf acc[ATT_TI][ATT_TT], const float *b,
                            ptrdiff_t bs, const rv_vf *x)
{
#pragma GCC unroll 8
    for (int i = 0; i < NI; i++) {
        rv_vf bi = rv_vf_set1(b[i * bs]);
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++)
            acc[i][t] = rv_vf_fmadd(bi, x[t], acc[i][t]);
    }
}

RV_INLINE void att_tile_store(const int NI, const int NT, rv_vf acc[ATT_TI][ATT_TT], float *dst,
                              ptrdiff_t rs)
{
#pragma GCC unroll 8
    for (int i = 0; i < NI; i++)
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++)
            rv_vf_store(dst + i * rs + t * RV_VW, acc[i][t]);
}

/* ======================= streaming kernel (few rows, many keys) ======================= */

/* Scores of NRB rows (q, q_stride) against keys kp[0..n) into s (row stride ATT_KB).
 * kp must hold round_up(n, RV_VW) readable pointers (the driver pads with a valid one);
 * part: ATT_RB * RV_VW * RV_VW floats, 64-byte aligned. */
RV_INLINE void att_stream_qk(const int NRB, const float *q, ptrdiff_t q_stride, int d,
                             const void *const *kp, const att_pf *pf, int n, float *s, float *part,
                             const int f16)
{
    const int dv = d - d % RV_VW;
    if (dv > 0) {
        for (int j0 = 0; j0 < n; j0 += RV_VW) {
            for (int jj = 0; jj < RV_VW && j0 + jj < n; jj += ATT_KG) {
                const void *k[ATT_KG];
                const char *pk[ATT_KG];
                rv_vf a[ATT_RB][ATT_KG];
#pragma GCC unroll 4
                for (int t = 0; t < ATT_KG; t++) {
                    k[t] = kp[j0 + jj + t];
                    pk[t] = ATT_PF_K(pf, j0 + jj + t);
                }
#pragma GCC unroll 4
                for (int i = 0; i < NRB; i++)
#pragma GCC unroll 4
                    for (int t = 0; t < ATT_KG; t++)
                        a[i][t] = rv_vf_zero();
                for (int c = 0; c < dv; c += RV_VW) {
                    rv_vf kv[ATT_KG];
                    const int o = c * (f16 ? 2 : 4);
                    /* a line of each planned row per step: prefetches trickle out between
                     * the FMAs (whole-row bursts overflowed the miss buffers) */
                    const int pf_now = RV_VW * (f16 ? 2 : 4) >= 64 || !(o & 63);
#pragma GCC unroll 4
                    for (int t = 0; t < ATT_KG; t++) {
                        kv[t] = att_load(k[t], c, f16);
                        if (pk[t] && pf_now)
                            __builtin_prefetch(pk[t] + o, 0, ATT_PF_LOCALITY);
                    }
#pragma GCC unroll 4
                    for (int i = 0; i < NRB; i++) {
                        rv_vf qv = rv_vf_load(q + i * q_stride + c);
#pragma GCC unroll 4
                        for (int t = 0; t < ATT_KG; t++)
                            a[i][t] = rv_vf_fmadd(qv, kv[t], a[i][t]);
                    }
                }
#pragma GCC unroll 4
                for (int t = 0; t < ATT_KG; t++)   /* the row's last line (tail, straddling) */
                    if (pk[t])
                        __builtin_prefetch(pk[t] + d * (f16 ? 2 : 4) - 1, 0, ATT_PF_LOCALITY);
#pragma GCC unroll 4
                for (int i = 0; i < NRB; i++)
#pragma GCC unroll 4
                    for (int t = 0; t < ATT_KG; t++)
                        rv_vf_store(part + (i * RV_VW + att_slot(jj + t)) * RV_VW, a[i][t]);
            }
#pragma GCC unroll 4
            for (int i = 0; i < NRB; i++)
                rv_vf_store(s + i * ATT_KB + j0, att_reduce(part + i * RV_VW * RV_VW));
        }
    } else {
        for (int i = 0; i < NRB; i++)
            for (int j = 0; j < n; j++)
                s[i * ATT_KB + j] = 0.0f;
    }
    if (dv < d) /* head_dim tail */
        for (int i = 0; i < NRB; i++)
            for (int j = 0; j < n; j++) {
                float t = 0.0f;
                for (int c = dv; c < d; c++)
                    t += q[i * q_stride + c] * att_load1(kp[j], c, f16);
                s[i * ATT_KB + j] += t;
            }
}

/* acc rows [NRB] (stride d) = acc * corr + sum_j p[i][j] v_j over head_dim vectors [c0, c0+NCB) */
RV_INLINE void att_stream_pv_block(const int NRB, const int NCB, float *acc, int d, int c0,
                                   const float *p, const float *corr, const void *const *vp,
                                   int n, const att_pf *pf, const int f16)
{
    rv_vf a[ATT_TI][ATT_TT];
    att_tile_load(NRB, NCB, a, acc + c0, d, corr, NULL);
    const int es = f16 ? 2 : 4;
    const int last = c0 + NCB * RV_VW >= d - d % RV_VW;   /* this pass ends the row */
    for (int j = 0; j < n; j++) {
        rv_vf vv[ATT_TT];
        const char *pv = ATT_PF_V(pf, j);   /* the planned row's lines of this pass */
#pragma GCC unroll 4
        for (int b = 0; b < NCB; b++) {
            const int o = (c0 + b * RV_VW) * es;
            vv[b] = att_load(vp[j], c0 + b * RV_VW, f16);
            if (pv && (RV_VW * es >= 64 || !(o & 63)))
                __builtin_prefetch(pv + o, 0, ATT_PF_LOCALITY);
        }
        if (pv && last)
            __builtin_prefetch(pv + d * es - 1, 0, ATT_PF_LOCALITY);
        att_tile_fma(NRB, NCB, a, p + j, ATT_KB, vv);
    }
    att_tile_store(NRB, NCB, a, acc + c0, d);
}

RV_INLINE void att_stream_pv(const int NRB, float *acc, int d, const float *p, const float *corr,
                             const void *const *vp, int n, const att_pf *pf, const int f16)
{
    const int dv = d - d % RV_VW;
    int c0 = 0;
    for (; c0 + ATT_CB * RV_VW <= dv; c0 += ATT_CB * RV_VW)
        att_stream_pv_block(NRB, ATT_CB, acc, d, c0, p, corr, vp, n, pf, f16);
    for (; c0 < dv; c0 += RV_VW)
        att_stream_pv_block(NRB, 1, acc, d, c0, p, corr, vp, n, pf, f16);
    if (dv < d) /* head_dim tail */
        for (int i = 0; i < NRB; i++)
            for (int c = dv; c < d; c++) {
                float t = acc[i * d + c] * corr[i];
                for (int j = 0; j < n; j++)
                    t += p[i * ATT_KB + j] * att_load1(vp[j], c, f16);
                acc[i * d + c] = t;
            }
}

/* Online-softmax update of one row for its scores s[0..vis) of a block of n keys; leaves the
 * weights in s[0..n) (0 for keys it does not see) and returns the rescale of its old state. */
RV_INLINE float att_stream_softmax_row(float *s, int vis, int n, float *m, float *l)
{
    if (vis <= 0) {
        for (int j = 0; j < n; j++)
            s[j] = 0.0f;
        return 1.0f;
    }
    int nv = att_round_up(vis, RV_VW);  /* s has room: ATT_KB is a multiple of RV_VW */
    for (int j = vis; j < nv; j++)
        s[j] = -INFINITY;
    rv_vf mx = rv_vf_load(s);
    for (int j = RV_VW; j < nv; j += RV_VW)
        mx = rv_vf_max(mx, rv_vf_load(s + j));
    float m_blk = rv_vf_hmax(mx);
    float m_new = m_blk > *m ? m_blk : *m;
    /* 0 when the row had no key yet (m = -inf); 1 when the maximum stays (most blocks of a
     * long decode: no expf call) */
    float corr = m_new == *m && isfinite(m_new) ? 1.0f : expf(*m - m_new);
    rv_vf vm = rv_vf_set1(m_new), sum = rv_vf_zero();
    for (int j = 0; j < nv; j += RV_VW) {
        rv_vf e = rv_vf_exp(rv_vf_sub(rv_vf_load(s + j), vm));
        rv_vf_store(s + j, e);
        sum = rv_vf_add(sum, e);
    }
    for (int j = nv; j < n; j++)
        s[j] = 0.0f;
    *l = *l * corr + rv_vf_hsum(sum);
    *m = m_new;
    return corr;
}

/* Fold keys [0, n) of the block (pointers kp/vp, padded to a multiple of RV_VW) into rows
 * [r0, r0+NRB). vis[i] = keys of the block row r0+i sees. */
RV_INLINE void att_stream_rows(const int NRB, rv_attn_state *st, int r0, const void *const *kp,
                               const void *const *vp, const att_pf *pf, int n, const int *vis, float *s,
                               float *part, float *corr, const int f16)
{
    const int d = st->head_dim;
    int n_eff = 0;
    for (int i = 0; i < NRB; i++)
        n_eff = att_max(n_eff, vis[i]);
    if (n_eff == 0)
        return;
    (void)n;
    att_stream_qk(NRB, st->q + r0 * st->q_stride, st->q_stride, d, kp, pf, n_eff, s, part, f16);
    for (int i = 0; i < NRB; i++)
        corr[i] = att_stream_softmax_row(s + i * ATT_KB, vis[i], n_eff, &st->m[r0 + i], &st->l[r0 + i]);
    att_stream_pv(NRB, st->acc + (size_t)r0 * d, d, s, corr, vp, n_eff, pf, f16);
}

/* Fold a block of n <= ATT_KB keys into st, prefetching what pf (may be NULL) plans. */
RV_INLINE void att_stream_block(rv_attn_state *st, const void **kp, const void **vp, int n,
                                const att_pf *pf, const int *visible, int base, const int f16)
{
    float *s = st->scratch;                                    /* ATT_RB x ATT_KB scores */
    float *part = s + ATT_RB * ATT_KB;                         /* ATT_RB x VW x VW, aligned */
    float *corr = part + ATT_RB * RV_VW * RV_VW;
    int vis[ATT_RB];
    for (int t = n; t < att_round_up(n, RV_VW); t++) {         /* readable padding */
        kp[t] = kp[n - 1];
        vp[t] = vp[n - 1];
    }
    for (int r0 = 0; r0 < st->rows; r0 += ATT_RB, pf = NULL) { /* prefetch in the first pass */
        int nrb = att_min(ATT_RB, st->rows - r0);
        for (int i = 0; i < nrb; i++)
            vis[i] = visible ? att_max(0, att_min(n, visible[r0 + i] - base)) : n;
        switch (nrb) {
        case 4: att_stream_rows(4, st, r0, kp, vp, pf, n, vis, s, part, corr, f16); break;
        case 3: att_stream_rows(3, st, r0, kp, vp, pf, n, vis, s, part, corr, f16); break;
        case 2: att_stream_rows(2, st, r0, kp, vp, pf, n, vis, s, part, corr, f16); break;
        default: att_stream_rows(1, st, r0, kp, vp, pf, n, vis, s, part, corr, f16); break;
        }
    }
}

RV_INLINE int att_visible_limit(const int *visible, int rows, int n)
{
    if (!visible)
        return n;
    int limit = 0;
    for (int r = 0; r < rows; r++)
        limit = att_max(limit, visible[r]);
    return att_min(limit, n);
}

RV_INLINE void att_stream_spans(rv_attn_state *st, const rv_kv_span *spans, int nspans,
                                const int *visible, const int f16)
{
    const void *kp[2][ATT_KB + 16], *vp[2][ATT_KB + 16];
    att_cursor cur = {spans, nspans, 0, 0};
    /* keys past every row's visible prefix are never read */
    const int limit = att_visible_limit(visible, st->rows, 0x7fffffff);
    int base = 0, b = 0;
    int n = att_gather(&cur, att_min(ATT_KB, limit), f16, kp[b], vp[b]);
    while (n > 0) {
        int n_next = att_gather(&cur, att_min(ATT_KB, limit - base - n), f16, kp[b ^ 1], vp[b ^ 1]);
        att_pf pf = {kp[b ^ 1], vp[b ^ 1], NULL, NULL, 0, 0, n_next, st->head_dim * (f16 ? 2 : 4)};
        att_stream_block(st, kp[b], vp[b], n, &pf, visible, base, f16);
        base += n;
        n = n_next;
        b ^= 1;
    }
}

/* Several KV heads of token-major storage at once (see attend_heads_* in rv_ops.h): blocks of
 * ATT_HB keys counted across the spans, every head per block, the next block prefetched in
 * memory order. */
#define ATT_HB RV_ATTN_HEAD_BLOCK
_Static_assert(ATT_HB <= ATT_KB, "a head block is one streaming block");
/* whether every span's tokens are rows of nh heads filling the token stride exactly (NHD
 * without gaps: a block of tokens is then one range of memory per span) */
RV_INLINE int att_heads_dense(const rv_kv_span *spans, int nspans, int nh, ptrdiff_t k_head,
                              ptrdiff_t v_head, int d)
{
    if (k_head != d || v_head != d)
        return 0;
    for (int i = 0; i < nspans; i++)
        if (spans[i].n > 0 && (spans[i].k_stride != nh * k_head || spans[i].v_stride != nh * v_head))
            return 0;
    return 1;
}

RV_INLINE void att_stream_heads(rv_attn_state *states, int nh, const rv_kv_span *spans, int nspans,
                                ptrdiff_t k_head, ptrdiff_t v_head, const int *visible, const int f16)
{
    const ptrdiff_t es = f16 ? 2 : 4;
    const int d = states[0].head_dim, row_bytes = (int)(d * es);
    const void *k0[2][ATT_HB], *v0[2][ATT_HB];     /* head 0's rows: this block, the next */
    const void *kp[ATT_KB + 16], *vp[ATT_KB + 16];   /* head h's rows of this block (+ padding) */
    const void *pk[ATT_HB], *pv[ATT_HB];             /* what head h prefetches of the next */
    if (nh <= 0)
        return;
    int total = 0;
    for (int i = 0; i < nspans; i++)
        total += spans[i].n > 0 ? spans[i].n : 0;
    const int n = att_visible_limit(visible, states[0].rows, total);
    /* dense: head h prefetches the h-th share of the next block's token rows, so the whole
     * block streams in memory order; otherwise its own rows of it */
    const int dense = att_heads_dense(spans, nspans, nh, k_head, v_head, d);
    att_cursor cur = {spans, nspans, 0, 0};
    int cb = 0, base = 0;
    int nb = att_gather(&cur, att_min(ATT_HB, n), f16, k0[0], v0[0]);
    while (nb > 0) {
        const int nn = att_gather(&cur, att_min(ATT_HB, n - base - nb), f16, k0[cb ^ 1], v0[cb ^ 1]);
        /* the next block in one range of token rows (one span, the usual case): its rows
         * evenly spaced, no list to build */
        const char *nk0 = nn ? (const char *)k0[cb ^ 1][0] : NULL, *nv0 = nn ? (const char *)v0[cb ^ 1][0] : NULL;
        const ptrdiff_t ktb = nn > 1 ? (const char *)k0[cb ^ 1][1] - nk0 : 0;
        const ptrdiff_t vtb = nn > 1 ? (const char *)v0[cb ^ 1][1] - nv0 : 0;
        const int one_range = nn > 0 && (const char *)k0[cb ^ 1][nn - 1] == nk0 + (nn - 1) * ktb &&
                              (const char *)v0[cb ^ 1][nn - 1] == nv0 + (nn - 1) * vtb;
        for (int h = 0; h < nh; h++) {
            att_pf pf = {pk, pv, NULL, NULL, 0, 0, nn, row_bytes};
            if (one_range) {
                /* dense: the h-th share of the block's memory; else head h's own rows */
                pf = dense ? (att_pf){NULL, NULL, nk0 + (ptrdiff_t)h * nn * row_bytes,
                                      nv0 + (ptrdiff_t)h * nn * row_bytes, row_bytes, row_bytes, nn, row_bytes}
                           : (att_pf){NULL, NULL, nk0 + h * k_head * es, nv0 + h * v_head * es, ktb, vtb,
                                      nn, row_bytes};
            } else if (dense) {                /* rows h * nn .. of the next block's nh * nn */
                int tok = h * nn / nh, sub = h * nn % nh;
                for (int j = 0; j < nn; j++) {
                    pk[j] = (const char *)k0[cb ^ 1][tok] + (ptrdiff_t)sub * row_bytes;
                    pv[j] = (const char *)v0[cb ^ 1][tok] + (ptrdiff_t)sub * row_bytes;
                    if (++sub == nh) {
                        sub = 0;
                        tok++;
                    }
                }
            } else {
                for (int j = 0; j < nn; j++) {
                    pk[j] = (const char *)k0[cb ^ 1][j] + h * k_head * es;
                    pv[j] = (const char *)v0[cb ^ 1][j] + h * v_head * es;
                }
            }
            for (int j = 0; j < nb; j++) {
                kp[j] = (const char *)k0[cb][j] + h * k_head * es;
                vp[j] = (const char *)v0[cb][j] + h * v_head * es;
            }
            att_stream_block(&states[h], kp, vp, nb, &pf, visible, base, f16);
        }
        base += nb;
        nb = nn;
        cb ^= 1;
    }
}

static void attend_heads_f32(rv_attn_state *states, int num_heads, const rv_kv_span *spans, int nspans,
                             ptrdiff_t k_head, ptrdiff_t v_head, const int *visible)
{
    att_stream_heads(states, num_heads, spans, nspans, k_head, v_head, visible, 0);
}

static void attend_heads_f16(rv_attn_state *states, int num_heads, const rv_kv_span *spans, int nspans,
                             ptrdiff_t k_head, ptrdiff_t v_head, const int *visible)
{
    att_stream_heads(states, num_heads, spans, nspans, k_head, v_head, visible, 1);
}

static void attend_spans_f32(rv_attn_state *st, const rv_kv_span *spans, int nspans, const int *visible)
{
    att_stream_spans(st, spans, nspans, visible, 0);
}

static void attend_spans_f16(rv_attn_state *st, const rv_kv_span *spans, int nspans, const int *visible)
{
    att_stream_spans(st, spans, nspans, visible, 1);
}

static void attend_chunk_f32(rv_attn_state *st, const float *k, ptrdiff_t k_stride,
                             const float *v, ptrdiff_t v_stride, int n, const int *visible)
{
    rv_kv_span span = {k, v, k_stride, v_stride, n};
    att_stream_spans(st, &span, 1, visible, 0);
}

static void attend_chunk_f16(rv_attn_state *st, const uint16_t *k, ptrdiff_t k_stride,
                             const uint16_t *v, ptrdiff_t v_stride, int n, const int *visible)
{
    rv_kv_span span = {k, v, k_stride, v_stride, n};
    att_stream_spans(st, &span, 1, visible, 1);
}

static void attn_merge(int rows, int head_dim, float *m, float *l, float *acc,
                       const float *m_other, const float *l_other, const float *acc_other)
{
    for (int r = 0; r < rows; r++) {
        if (l_other[r] == 0.0f)
            continue;
        float m_new = m[r] > m_other[r] ? m[r] : m_other[r];
        float ca = expf(m[r] - m_new), cb = expf(m_other[r] - m_new);
        float *a = acc + (size_t)r * head_dim;
        scale_f32((size_t)head_dim, ca, a);
        axpy_f32((size_t)head_dim, cb, acc_other + (size_t)r * head_dim, a);
        l[r] = l[r] * ca + l_other[r] * cb;
        m[r] = m_new;
    }
}

static void attn_finalize(int rows, int head_dim, const float *l, const float *acc,
                          float *out, ptrdiff_t out_stride)
{
    for (int r = 0; r < rows; r++) {
        float *o = out + r * out_stride;
        const float *a = acc + (size_t)r * head_dim;
        float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        for (int c = 0; c < head_dim; c++)
            o[c] = a[c] * inv;
    }
}

/* ======================= tiled kernel (many rows: prefill) =======================
 * Layout in scratch (RP = rows rounded up to RV_VW, dp = head_dim rounded up to ATT_T_MR):
 *   Qt [d][ATT_TR]   scaled queries, transposed (padding rows 0)
 *   Ot [dp][ATT_TR]  unnormalised output, transposed
 *   St [ATT_TK+8][ATT_TR]  scores, then weights, of one key tile (key-major)
 *   m, l, corr, visf [ATT_TR]
 *   Kc, Vc [ATT_TK+8][dp]  the key tile's K and V rows as contiguous fp32 (zero padded) */

/* St[j0+i][v0..v0+NR) = sum_c Kc[j0+i][c] * Qt[c][v0..]  for i < MR */
RV_INLINE void att_tile_qk(const int MR, const int NR, int d, const float *Qt, const float *Kc,
                           int dp, float *St, int j0, int v0)
{
    rv_vf acc[ATT_TI][ATT_TT];
    att_tile_load(MR, NR, acc, NULL, 0, NULL, NULL);
    const float *qp = Qt + v0 * RV_VW;
    const float *kp = Kc + (size_t)j0 * dp;
    for (int c = 0; c < d; c++) {
        rv_vf qv[ATT_TT];
#pragma GCC unroll 4
        for (int t = 0; t < NR; t++)
            qv[t] = rv_vf_load(qp + (size_t)c * ATT_TR + t * RV_VW);
        att_tile_fma(MR, NR, acc, kp + c, dp, qv);
    }
    att_tile_store(MR, NR, acc, St + (size_t)j0 * ATT_TR + v0 * RV_VW, ATT_TR);
}

/* Ot[c0+i][v0..v0+NR) = Ot * corr + sum_j Vc[j][c0+i] * St[j][v0..]  for i < MC */
RV_INLINE void att_tile_pv(const int MC, const int NR, int n, const float *St, const float *Vc,
                           int dp, float *Ot, const float *corr, int c0, int v0)
{
    rv_vf acc[ATT_TI][ATT_TT], cv[ATT_TT];
    float *op = Ot + (size_t)c0 * ATT_TR + v0 * RV_VW;
#pragma GCC unroll 4
    for (int t = 0; t < NR; t++)
        cv[t] = rv_vf_load(corr + v0 * RV_VW + t * RV_VW);
    att_tile_load(MC, NR, acc, op, ATT_TR, NULL, cv);
    for (int j = 0; j < n; j++) {
        rv_vf pv[ATT_TT];
#pragma GCC unroll 4
        for (int t = 0; t < NR; t++)
            pv[t] = rv_vf_load(St + (size_t)j * ATT_TR + v0 * RV_VW + t * RV_VW);
        att_tile_fma(MC, NR, acc, Vc + (size_t)j * dp + c0, 1, pv);
    }
    att_tile_store(MC, NR, acc, op, ATT_TR);
}

/* The NR-wide column of row vectors [v0, v0+nr) for every micro-tile of the key tile */
RV_INLINE void att_tile_products(int nv, int d, int dp, int n, const float *Qt, const float *Kc,
                                 const float *Vc, float *St, float *Ot, const float *corr, int phase,
                                 const att_pf *pf)
{
    for (int v0 = 0; v0 < nv; v0 += ATT_T_NR, pf = NULL) {
        int nr = att_min(ATT_T_NR, nv - v0);
        (void)nr;  /* unused where ATT_T_NR == 1 */
        if (phase == 0) {
            for (int j0 = 0; j0 < n; j0 += ATT_T_MR) { /* Kc is zero-padded past n */
                /* the next tile's rows, into L2 while this one computes: packing them
                 * straight from L3 / memory (4 KiB-strided NHD rows) stalled ~25% of the time */
                for (int j = j0; pf && j < j0 + ATT_T_MR; j++) {
                    att_pf_row(pf, pf->kl, NULL, 0, j);
                    att_pf_row(pf, pf->vl, NULL, 0, j);
                }
#if ATT_T_NR >= 4
                if (nr == 4) { att_tile_qk(ATT_T_MR, 4, d, Qt, Kc, dp, St, j0, v0); continue; }
                if (nr == 3) { att_tile_qk(ATT_T_MR, 3, d, Qt, Kc, dp, St, j0, v0); continue; }
#endif
#if ATT_T_NR >= 2
                if (nr == 2) { att_tile_qk(ATT_T_MR, 2, d, Qt, Kc, dp, St, j0, v0); continue; }
#endif
                att_tile_qk(ATT_T_MR, 1, d, Qt, Kc, dp, St, j0, v0);
            }
        } else {
            for (int c0 = 0; c0 < dp; c0 += ATT_T_MR) { /* Vc and Ot are padded to dp */
#if ATT_T_NR >= 4
                if (nr == 4) { att_tile_pv(ATT_T_MR, 4, n, St, Vc, dp, Ot, corr, c0, v0); continue; }
                if (nr == 3) { att_tile_pv(ATT_T_MR, 3, n, St, Vc, dp, Ot, corr, c0, v0); continue; }
#endif
#if ATT_T_NR >= 2
                if (nr == 2) { att_tile_pv(ATT_T_MR, 2, n, St, Vc, dp, Ot, corr, c0, v0); continue; }
#endif
                att_tile_pv(ATT_T_MR, 1, n, St, Vc, dp, Ot, corr, c0, v0);
            }
        }
    }
}

/* Copy a row of d elements to fp32, zero-padding to dp */
RV_INLINE void att_pack_row(float *dst, const void *src, int d, int dp, const int f16)
{
    int c = 0;
    for (; c + RV_VW <= d; c += RV_VW)
        rv_vf_store(dst + c, att_load(src, c, f16));
    for (; c < d; c++)
        dst[c] = att_load1(src, c, f16);
    for (; c < dp; c++)
        dst[c] = 0.0f;
}

RV_INLINE void att_rows_impl(const rv_attn_rows *job, float *scratch, const int f16)
{
    const int R = job->rows, d = job->head_dim;
    const int RP = att_round_up(R, RV_VW), nv = RP / RV_VW;
    const int dp = att_round_up(d, ATT_T_MR);
    float *Qt = scratch;
    float *Ot = Qt + (size_t)(d + 8) * ATT_TR;
    float *St = Ot + (size_t)(d + 8) * ATT_TR;
    float *m = St + (size_t)(ATT_TK + 8) * ATT_TR;
    float *l = m + ATT_TR, *corr = l + ATT_TR, *visf = corr + ATT_TR;
    float *Kc = visf + ATT_TR;
    float *Vc = Kc + (size_t)(ATT_TK + 8) * dp;
    const void *kp[2][ATT_TK], *vp[2][ATT_TK];

    int maxvis = 0, minvis = 0x7fffffff;
    for (int r = 0; r < R; r++) {
        int vr = job->visible ? att_max(job->visible[r], 0) : 0x7fffffff;
        maxvis = att_max(maxvis, vr);
        minvis = att_min(minvis, vr);
        visf[r] = vr > (1 << 24) ? 16777216.0f : (float)vr;   /* exact below 2^24 keys */
    }
    for (int r = R; r < RP; r++)
        visf[r] = 0.0f;
    /* the first key tile is fetched while the queries are packed */
    att_cursor cur = {job->spans, job->nspans, 0, 0};
    int tb = 0, j0 = 0, n = att_gather(&cur, att_min(ATT_TK, maxvis), f16, kp[0], vp[0]);
    const att_pf first = {kp[0], vp[0], NULL, NULL, 0, 0, n, d * (f16 ? 2 : 4)};
    for (int j = 0; j < n; j++) {
        att_pf_row(&first, first.kl, NULL, 0, j);
        att_pf_row(&first, first.vl, NULL, 0, j);
    }
    for (int c = 0; c < d; c++) {
        float *qt = Qt + (size_t)c * ATT_TR;
        for (int r = 0; r < R; r++)
            qt[r] = job->q[r][c] * job->scale;
        for (int r = R; r < RP; r++)
            qt[r] = 0.0f;
    }
    for (int i = 0; i < dp * ATT_TR; i += RV_VW)
        rv_vf_store(Ot + i, rv_vf_zero());
    for (int r = 0; r < RP; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }

    const rv_vf neg_inf = rv_vf_set1(-INFINITY), floor_m = rv_vf_set1(-FLT_MAX);
    while (n > 0) {
        for (int j = 0; j < n; j++) {
            att_pack_row(Kc + (size_t)j * dp, kp[tb][j], d, dp, f16);
            att_pack_row(Vc + (size_t)j * dp, vp[tb][j], d, dp, f16);
        }
        for (int j = n; j < att_round_up(n, ATT_T_MR); j++) {
            for (int c = 0; c < dp; c++)
                Kc[(size_t)j * dp + c] = 0.0f;
        }
        /* gather the next tile now (into the other buffer) so its rows can be prefetched */
        int n_next = att_gather(&cur, att_min(ATT_TK, maxvis - j0 - n), f16, kp[tb ^ 1], vp[tb ^ 1]);
        att_pf plan = {kp[tb ^ 1], vp[tb ^ 1], NULL, NULL, 0, 0, n_next, d * (f16 ? 2 : 4)};
        att_tile_products(nv, d, dp, n, Qt, Kc, Vc, St, Ot, corr, 0, &plan);

        const int masked = j0 + n > minvis;
        for (int v = 0; v < nv; v++) {
            float *sv = St + v * RV_VW;
            rv_vf vis_v = rv_vf_load(visf + v * RV_VW);
            rv_vf mt = neg_inf;
            for (int j = 0; j < n; j++) {
                rv_vf x = rv_vf_load(sv + (size_t)j * ATT_TR);
                if (masked) {
                    x = att_select_lt(rv_vf_set1((float)(j0 + j)), vis_v, x, neg_inf);
                    rv_vf_store(sv + (size_t)j * ATT_TR, x);
                }
                mt = rv_vf_max(mt, x);
            }
            rv_vf m_old = rv_vf_load(m + v * RV_VW);
            rv_vf m_new = rv_vf_max(m_old, mt);
            /* a row with no key yet keeps m = -inf; shifting by -FLT_MAX then gives exp = 0 */
            rv_vf shift = rv_vf_max(m_new, floor_m);
            rv_vf cr = rv_vf_exp(rv_vf_sub(m_old, shift));
            rv_vf sum = rv_vf_zero();
            for (int j = 0; j < n; j++) {
                rv_vf e = rv_vf_exp(rv_vf_sub(rv_vf_load(sv + (size_t)j * ATT_TR), shift));
                rv_vf_store(sv + (size_t)j * ATT_TR, e);
                sum = rv_vf_add(sum, e);
            }
            rv_vf_store(l + v * RV_VW, rv_vf_add(rv_vf_mul(rv_vf_load(l + v * RV_VW), cr), sum));
            rv_vf_store(m + v * RV_VW, m_new);
            rv_vf_store(corr + v * RV_VW, cr);
        }
        att_tile_products(nv, d, dp, n, Qt, Kc, Vc, St, Ot, corr, 1, NULL);
        j0 += n;
        n = n_next;
        tb ^= 1;
    }

    for (int r = 0; r < R; r++) {
        float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        float *o = job->out[r];
        for (int c = 0; c < d; c++)
            o[c] = Ot[(size_t)c * ATT_TR + r] * inv;
        if (job->m_out)
            job->m_out[r] = m[r];
        if (job->l_out)
            job->l_out[r] = l[r];
    }
}

static void attend_rows_f32(const rv_attn_rows *job, float *scratch) { att_rows_impl(job, scratch, 0); }
static void attend_rows_f16(const rv_attn_rows *job, float *scratch) { att_rows_impl(job, scratch, 1); }

static void fill_attention_ops(rv_ops *ops)
{
    ops->attend_chunk_f32 = attend_chunk_f32;
    ops->attend_chunk_f16 = attend_chunk_f16;
    ops->attn_merge = attn_merge;
    ops->attn_finalize = attn_finalize;
    ops->attend_spans_f32 = attend_spans_f32;
    ops->attend_spans_f16 = attend_spans_f16;
    ops->attend_rows_f32 = attend_rows_f32;
    ops->attend_rows_f16 = attend_rows_f16;
    ops->attend_heads_f32 = attend_heads_f32;
    ops->attend_heads_f16 = attend_heads_f16;
}

#endif
