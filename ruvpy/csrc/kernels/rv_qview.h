/* What the fused quantized-attention kernels (rv_ops.attend_qgroup / attend_tgroup,
 * kernels/quant_impl.h) read: one KV head of a cold group, its codes and its binary16
 * parameters in place (the kernels convert them as they load them: a conversion pass into
 * floats per group and head was 4% of q4 decode). The cold formats themselves (how a group's blob is laid out, how it is
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
    const uint16_t *kscale, *kzero; /* binary16 [head_dim] (outlier channels: their 8-bit parameters) */
    int nk;                       /* outliers (4 bits only) */
    const uint8_t *kidx;          /* [nk] outlier key channels, ascending */
    const uint8_t *vcodes;        /* token-major: token t's head_dim codes at vcodes + t * vrow */
    ptrdiff_t vrow;
    const uint16_t *vscale, *vzero; /* binary16 [G][ceil(head_dim / group_size)] */
    int nv;
    const uint8_t *vidx;          /* [nv] outlier value channels, ascending */
    const float *voscale, *vozero;/* [nv] their per-channel 8-bit parameters */
    const uint8_t *vocodes;       /* their 8-bit codes channel-major: outlier o's G codes at
                                     vocodes + o * G (what their slots in vcodes hold does not count) */
    /* what the caller reads next (the next group's segment of this head): the kernel
     * prefetches it into L2 while it computes, NULL for nothing */
    const unsigned char *prefetch;
    size_t prefetch_bytes;
};

/* query rows the fused kernel keeps in registers at once, and the scratch it needs */
#define RV_QATTN_ROWS 4
#define RV_QATTN_SCRATCH_FLOATS(G, d) \
    ((size_t)RV_QATTN_ROWS * ((size_t)(G) + 32 + 3 * (size_t)(d) + RV_MAX_OUTLIERS) + 8 * (size_t)(d) + 64)

/* ---- a TurboQuant group head ----
 * The attention state it folds into has head_dim D (the padded head_dim): accumulators in the
 * rotated domain, rotated back once per head by the format. A token's key / value is a scale
 * times int8 codebook entries of its rotated coordinates, the codes packed as "crumbs" and bit
 * planes (the layout is the format's); the kernel needs no more than this. */
struct rv_thead {
    int G, Gp, D, d;
    int k_n3, k_n4, v_n3, v_n4;                  /* coordinates [0, n4): 4 bits, [n4, n3): 3, else 2 */
    int kbytes, vbytes;                          /* codes per token */
    const uint8_t *kcodes, *vcodes;              /* [Gp][kbytes], [Gp][vbytes] */
    /* per 16 coordinates a 16-entry table: keys (c + 64) as u8, values c as int8 */
    const uint8_t *ktab, *vtab;                  /* [D] each */
    const uint8_t *knorm, *vnorm;                /* [Gp] scale codes: 0 a zero vector, else */
    float kn_lo, kn_step, vn_lo, vn_step;        /* exp(lo + (code - 1) * step) */
    const uint8_t *kflag;                        /* [Gp / 8] bit t: token t's key adds kmu */
    const float *kmu;                            /* [d] the group's key mean, decoded */
    /* query side, per state row r: the plain (scaled) query at qplain + r * qplain_stride for
     * q . mu; the rotated one as int8 q8 + r * D with rotated ~= qscale[r] * q8, qsum[r] = sum q8 */
    const float *qplain;
    ptrdiff_t qplain_stride;
    const int8_t *q8;
    const float *qscale;
    const int32_t *qsum;
    const unsigned char *prefetch;               /* what the caller reads next, or NULL */
    size_t prefetch_bytes;
};

/* The code of rotated coordinate i of a token's packed codes (tok: kbytes / vbytes bytes):
 * its low 2 bits in the "crumbs" (byte i % (D/4), bits 2 (i / (D/4))), bit 2 in a plane of
 * n3 bits after them, bit 3 in a plane of n4 bits after that. The format writes this layout;
 * the kernels' scalar paths and the format's decoder read it here. */
static inline int rv_thead_code(const uint8_t *tok, int D, int n3, int n4, int i)
{
    const int q = D / 4;
    int code = (tok[i % q] >> (2 * (i / q))) & 3;
    if (i < n3)
        code |= ((tok[q + i / 8] >> (i % 8)) & 1) << 2;
    if (i < n4)
        code |= ((tok[q + n3 / 8 + i / 8] >> (i % 8)) & 1) << 3;
    return code;
}

/* query rows the fused kernel handles at once, and the scratch it needs */
#define RV_TATTN_ROWS 4
#define RV_TATTN_SCRATCH_FLOATS(Gp, D) \
    ((size_t)RV_TATTN_ROWS * ((size_t)(Gp) + 32) + 5 * (size_t)(Gp) + 4 * (size_t)(D) + 256)

#endif
