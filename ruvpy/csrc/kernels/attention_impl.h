/* Attention building blocks (see rv_ops.h), written once against rv_simd.h, compiled per ISA.
 * This is the straightforward version: row by row over a chunk. */
#ifndef RV_ATTENTION_IMPL_H
#define RV_ATTENTION_IMPL_H

#include <math.h>
#include "rv_simd.h"
#include "kernels/rv_ops.h"
#include "kernels/basic_impl.h"

/* Fold precomputed scores s[0..vis) of one row into (m, l, acc) with values at v (fp32). */
RV_INLINE void fold_row_f32(int head_dim, float *s, int vis, const float *v, ptrdiff_t v_stride,
                            float *m, float *l, float *acc)
{
    float mx = max_f32(s, (size_t)vis);
    float m_new = mx > *m ? mx : *m;
    float corr = expf(*m - m_new);           /* exp(-inf) = 0 on the first chunk */
    float sum = sum_exp_f32(s, m_new, s, (size_t)vis);
    *l = *l * corr + sum;
    *m = m_new;
    if (corr != 1.0f)
        scale_f32((size_t)head_dim, corr, acc);
    for (int j = 0; j < vis; j++)
        axpy_f32((size_t)head_dim, s[j], v + j * v_stride, acc);
}

static void attend_chunk_f32(rv_attn_state *st, const float *k, ptrdiff_t k_stride,
                             const float *v, ptrdiff_t v_stride, int n, const int *visible)
{
    const int d = st->head_dim;
    float *s = st->scratch;
    for (int r = 0; r < st->rows; r++) {
        int vis = visible ? (visible[r] < n ? visible[r] : n) : n;
        if (vis <= 0)
            continue;
        const float *q = st->q + r * st->q_stride;
        for (int j = 0; j < vis; j++)
            s[j] = dot_f32(q, k + j * k_stride, (size_t)d);
        fold_row_f32(d, s, vis, v, v_stride, &st->m[r], &st->l[r], st->acc + (size_t)r * d);
    }
}

static void attend_chunk_f16(rv_attn_state *st, const uint16_t *k, ptrdiff_t k_stride,
                             const uint16_t *v, ptrdiff_t v_stride, int n, const int *visible)
{
    const int d = st->head_dim;
    float *kf = st->scratch + (size_t)st->rows * RV_ATTN_CHUNK;
    float *vf = kf + (size_t)RV_ATTN_CHUNK * d;
    for (int j = 0; j < n; j++) {
        f16_to_f32(k + j * k_stride, kf + (size_t)j * d, (size_t)d);
        f16_to_f32(v + j * v_stride, vf + (size_t)j * d, (size_t)d);
    }
    attend_chunk_f32(st, kf, d, vf, d, n, visible);
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

static void fill_attention_ops(rv_ops *ops)
{
    ops->attend_chunk_f32 = attend_chunk_f32;
    ops->attend_chunk_f16 = attend_chunk_f16;
    ops->attn_merge = attn_merge;
    ops->attn_finalize = attn_finalize;
}

#endif
