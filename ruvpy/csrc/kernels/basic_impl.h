/* Basic vector kernels, written once against rv_simd.h and compiled per ISA.
 * Included only by ops_<isa>.c; every function is static to its translation unit. */
#ifndef RV_BASIC_IMPL_H
#define RV_BASIC_IMPL_H

#include <math.h>
#include "rv_simd.h"
#include "kernels/rv_ops.h"

static float dot_f32(const float *a, const float *b, size_t n)
{
    rv_vf s0 = rv_vf_zero(), s1 = rv_vf_zero(), s2 = rv_vf_zero(), s3 = rv_vf_zero();
    size_t i = 0;
    for (; i + 4 * RV_VW <= n; i += 4 * RV_VW) {
        s0 = rv_vf_fmadd(rv_vf_load(a + i), rv_vf_load(b + i), s0);
        s1 = rv_vf_fmadd(rv_vf_load(a + i + RV_VW), rv_vf_load(b + i + RV_VW), s1);
        s2 = rv_vf_fmadd(rv_vf_load(a + i + 2 * RV_VW), rv_vf_load(b + i + 2 * RV_VW), s2);
        s3 = rv_vf_fmadd(rv_vf_load(a + i + 3 * RV_VW), rv_vf_load(b + i + 3 * RV_VW), s3);
    }
    for (; i + RV_VW <= n; i += RV_VW)
        s0 = rv_vf_fmadd(rv_vf_load(a + i), rv_vf_load(b + i), s0);
    float s = rv_vf_hsum(rv_vf_add(rv_vf_add(s0, s1), rv_vf_add(s2, s3)));
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static void axpy_f32(size_t n, float alpha, const float *x, float *y)
{
    rv_vf va = rv_vf_set1(alpha);
    size_t i = 0;
    for (; i + RV_VW <= n; i += RV_VW)
        rv_vf_store(y + i, rv_vf_fmadd(va, rv_vf_load(x + i), rv_vf_load(y + i)));
    for (; i < n; i++)
        y[i] += alpha * x[i];
}

static void scale_f32(size_t n, float alpha, float *x)
{
    rv_vf va = rv_vf_set1(alpha);
    size_t i = 0;
    for (; i + RV_VW <= n; i += RV_VW)
        rv_vf_store(x + i, rv_vf_mul(va, rv_vf_load(x + i)));
    for (; i < n; i++)
        x[i] *= alpha;
}

static float max_f32(const float *x, size_t n)
{
    float m = -INFINITY;
    size_t i = 0;
    if (n >= RV_VW) {
        rv_vf vm = rv_vf_load(x);
        for (i = RV_VW; i + RV_VW <= n; i += RV_VW)
            vm = rv_vf_max(vm, rv_vf_load(x + i));
        m = rv_vf_hmax(vm);
    }
    for (; i < n; i++)
        m = x[i] > m ? x[i] : m;
    return m;
}

static float sum_exp_f32(const float *x, float shift, float *out, size_t n)
{
    rv_vf vs = rv_vf_set1(shift), acc = rv_vf_zero();
    size_t i = 0;
    for (; i + RV_VW <= n; i += RV_VW) {
        rv_vf e = rv_vf_exp(rv_vf_sub(rv_vf_load(x + i), vs));
        if (out)
            rv_vf_store(out + i, e);
        acc = rv_vf_add(acc, e);
    }
    float s = rv_vf_hsum(acc);
    for (; i < n; i++) {
        float e = expf(x[i] - shift);
        if (out)
            out[i] = e;
        s += e;
    }
    return s;
}

/* The hardware converters quiet signalling NaNs; numpy keeps them. So the vector loop only
 * notes whether any lane was inf or NaN (v - v is 0 for finite v, NaN otherwise: one
 * sub + add per vector, no per-vector reduction) and, if one was, the whole call is redone with
 * the bit-exact portable conversion. Both directions then match numpy exactly. */
static void f32_to_f16(const float *src, uint16_t *dst, size_t n)
{
    size_t i = 0;
#if RV_VW > 1
    rv_vf special = rv_vf_zero();
    for (; i + RV_VW <= n; i += RV_VW) {
        rv_vf v = rv_vf_load(src + i);
        rv_vf_store_f16(dst + i, v);
        special = rv_vf_add(special, rv_vf_sub(v, v));
    }
    if (RV_UNLIKELY(rv_vf_hsum(special) != 0.0f))
        i = 0;
#endif
    for (; i < n; i++)
        dst[i] = rv_f32_to_f16(src[i]);
}

static void f16_to_f32(const uint16_t *src, float *dst, size_t n)
{
    size_t i = 0;
#if RV_VW > 1
    /* v - v is 0, or NaN for inf and NaN (then the exact scalar path redoes it all); four
     * sums, so that the check is not one chain of dependent adds (it was the conversion's
     * bound, 3% of q4 decode) */
    rv_vf special[4] = {rv_vf_zero(), rv_vf_zero(), rv_vf_zero(), rv_vf_zero()};
    for (; i + 4 * RV_VW <= n; i += 4 * RV_VW)
        for (int u = 0; u < 4; u++) {
            const rv_vf v = rv_vf_load_f16(src + i + u * RV_VW);
            rv_vf_store(dst + i + u * RV_VW, v);
            special[u] = rv_vf_add(special[u], rv_vf_sub(v, v));
        }
    for (; i + RV_VW <= n; i += RV_VW) {
        const rv_vf v = rv_vf_load_f16(src + i);
        rv_vf_store(dst + i, v);
        special[0] = rv_vf_add(special[0], rv_vf_sub(v, v));
    }
    const rv_vf all = rv_vf_add(rv_vf_add(special[0], special[1]), rv_vf_add(special[2], special[3]));
    if (RV_UNLIKELY(rv_vf_hsum(all) != 0.0f))
        i = 0;
#endif
    for (; i < n; i++)
        dst[i] = rv_f16_to_f32(src[i]);
}

static void fill_basic_ops(rv_ops *ops)
{
    ops->dot_f32 = dot_f32;
    ops->axpy_f32 = axpy_f32;
    ops->scale_f32 = scale_f32;
    ops->max_f32 = max_f32;
    ops->sum_exp_f32 = sum_exp_f32;
    ops->f32_to_f16 = f32_to_f16;
    ops->f16_to_f32 = f16_to_f32;
}

#endif
