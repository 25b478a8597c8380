/* What the fused quantized-attention kernels (rv_ops.attend_qgroup / attend_tgroup,
 * kernels/quant_impl.h) read: one KV head of a cold group, its codes in place and its
 * parameters as floats. The cold formats themselves (how a group's blob is laid out, how it is
 * encoded) belong to the two-tier cache's codec table; each fills its view. Kernels know
 * nothing else of caches. */
#ifndef RV_QVIEW_H
#define RV_QVIEW_H

#include <stddef.h>
#include <stdint.h>

#include "rv_limits.h"

/* ---- a q8 / q4 group head (KIVI style with dense-and-sparse outlier channels) ---- */
struct rv_qhead {
    int G, head_dim, bits, group_size;
    const uint8_t *kcodes;        /* channel-major: row c's G codes at kcodes + c * krow for the
                                     head_dim channels, then nk rows of outlier high nibbles */
    ptrdiff_t krow;
    const float *kscale, *kzero;  /* [head_dim] (outlier channels: their 8-bit parameters) */
    int nk;                       /* outliers (4 bits only) */
    const uint8_t *kidx;          /* [nk] outlier key channels, ascending */
    const uint8_t *vcodes;        /* token-major: token t's head_dim codes at vcodes + t * vrow */
    ptrdiff_t vrow;
    const float *vscale, *vzero;  /* [G][ceil(head_dim / group_size)] */
    int nv;
    const uint8_t *vidx;          /* [nv] outlier value channels, ascending */
    const float *voscale, *vozero;/* [nv] their per-channel 8-bit parameters */
    const uint8_t *vhi;           /* [G][(nv + 1) / 2] their codes' high nibbles (low: in vcodes) */
    /* what the caller reads next (the next group's segment of this head): the kernel
     * prefetches it into L2 while it computes, NULL for nothing */
    const unsigned char *prefetch;
    size_t prefetch_bytes;
};

/* Where outlier value channel o's 8-bit codes sit (4-bit heads only): token t's code is
 * rv_qhead_vout_code(&cur, t). Decoders set it up once per channel and hold it in locals:
 * loads through uint8_t pointers may alias anything, so per-token lookups through the head
 * would be reloaded after every float store. */
typedef struct {
    const uint8_t *lo, *hi;     /* token 0's slot byte and high-nibble byte */
    ptrdiff_t lo_stride, hi_stride;
    int lo_shift, hi_shift;
} rv_qhead_vout;

static inline rv_qhead_vout rv_qhead_vout_at(const struct rv_qhead *h, int o)
{
    const int c = h->vidx[o], half = (h->head_dim + 1) / 2;
    return (rv_qhead_vout){.lo = h->vcodes + (c < half ? c : c - half), .hi = h->vhi + o / 2,
                           .lo_stride = h->vrow, .hi_stride = (h->nv + 1) / 2,
                           .lo_shift = c < half ? 0 : 4, .hi_shift = 4 * (o & 1)};
}

static inline int rv_qhead_vout_code(const rv_qhead_vout *v, int t)
{
    return ((v->lo[t * v->lo_stride] >> v->lo_shift) & 15) | ((v->hi[t * v->hi_stride] >> v->hi_shift) & 15) << 4;
}

/* query rows the fused kernel keeps in registers at once, and the scratch it needs */
#define RV_QATTN_ROWS 4
#define RV_QATTN_SCRATCH_FLOATS(G, d) \
    ((size_t)RV_QATTN_ROWS * ((size_t)(G) + 32 + (size_t)(d) + RV_MAX_OUTLIERS) + (size_t)(G) + 64)

/* ---- a TurboQuant group head ----
 * The attention state it folds into has head_dim D + d: query rows [R q | q] (the plain query
 * scores the outlier key channels) and accumulators [rotated domain | plain channels] (the
 * outlier value channels land in the plain part, rescaled with the rest). */
struct rv_thead {
    int G, Gp, D;
    int kbits_hi, kbits_lo, vbits_hi, vbits_lo;   /* coordinates < D/2: *_hi bits; the rest *_lo */
    size_t plane_bytes;                           /* Gp / 8 */
    const uint8_t *kplanes, *qjl, *vplanes;
    const float *knorm, *kgamma, *vnorm;          /* [Gp] as floats */
    /* codebooks (centroids of the scaled Gaussian), 2^bits entries each, padded to 32 */
    const float *kbook_hi, *kbook_lo, *vbook_hi, *vbook_lo;
    /* query side, per state row r: S R q at qjl_q + r * D, and its sum at qjl_sum[r] */
    const float *qjl_q, *qjl_sum;
    float qjl_scale;                              /* sqrt(pi/2) / D */
    const unsigned char *prefetch;                /* what the caller reads next, or NULL */
    size_t prefetch_bytes;
    /* outliers: nk key / nv value channels (ascending numbers < d), codes [n][Gp] */
    int d, nk, nv;
    const uint8_t *kidx, *vidx, *kcodes, *vcodes;
    const float *kscale, *kzero, *vscale, *vzero; /* [nk] / [nv] as floats */
};

/* query rows the fused kernel keeps in registers at once, and the scratch it needs */
#define RV_TATTN_ROWS 4
#define RV_TATTN_SCRATCH_FLOATS(Gp, D) \
    ((size_t)RV_TATTN_ROWS * ((size_t)(Gp) + 32 + 16 * (size_t)(D)) + 16 * (size_t)(Gp) + 64)

#endif
