/* The q8 / q4 cold-group format of the two-tier cache (KIVI style, with dense-and-sparse
 * outlier channels).
 *
 * A group holds `G` consecutive tokens (one migration batch) of one (sequence, layer), every
 * KV head. Its blob starts with uint32 head_off[num_kv_heads] (byte offset of each head's
 * segment), then the segments. A head segment, every binary16 field 2-byte aligned:
 *
 *   kscale[d], kzero[d]      f16  keys: per channel over the G tokens
 *   vscale[G][ng], vzero[G][ng]  f16  values: per token, channel groups of group_size
 *                                     (ng = ceil(d / group_size))
 *   vcodes[G][vb]            u8   values token-major: vb = d or ceil(d/2) (4-bit rows: see
 *                                 kernels/quant_impl.h)
 *   nk, nv                   u8   outlier channels of keys / values (4-bit only)
 *   kidx[nk], vidx[nv]       u8   their channel numbers (ascending), then 1 pad byte if odd
 *   voscale[nv], vozero[nv]  f16  values' outliers: 8 bits per channel over the G tokens
 *   vhi[G][(nv + 1) / 2]     u8   their codes' high nibbles (outlier o: byte o / 2, low
 *                                 nibble first); the low nibbles sit in their slots in vcodes
 *   kcodes[d + nk][kb]       u8   keys channel-major: kb = G (8 bits) or ceil(G/2) (4 bits);
 *                                 rows d.. hold the high nibbles of the outlier channels
 * (The fused kernel may read 3 bytes past the last token's byte of vcodes and of vhi: counts
 * and idx follow vcodes, and when head_dim >= 16 at least 16 bytes of kcodes follow vhi.)
 *
 * Keys: each channel is quantized over the G tokens with its own scale/zero; an outlier key
 * channel (range > RV_COLDQ_OUTLIER_RATIO x the median channel range of the head and group)
 * gets 8-bit codes instead of 4-bit: low nibble in its own row, high nibble in an extra row,
 * so scoring treats the extra row as one more channel whose query weight is 16x (an outlier
 * costs 4 bits per token more, nothing is stored twice).
 * Values: each token is quantized in channel groups with the outlier channels left out of the
 * group's range (a x20 channel in a per-token group would flatten the other channels of the
 * group); an outlier value channel gets 8-bit codes per channel over the G tokens, low nibble
 * in its slot, high nibble in vhi (4 bits would not do: the attention output of such data is
 * dominated by these channels, and q4 cosine fell from 0.998 to 0.978). */
#ifndef RV_COLDQ_H
#define RV_COLDQ_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/rv_ops.h"

#define RV_COLDQ_OUTLIER_RATIO 3.0f
#define RV_COLDQ_MAX_OUTLIERS 8
#define RV_COLDQ_MAX_GROUP 4096      /* tokens of a group (migration batch) at most */

/* One KV head of a quantized group as the fused attention kernel (rv_ops.attend_qgroup,
 * kernels/quant_impl.h) reads it: codes in place, parameters converted to float. */
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
 * rv_coldq_vout_code(&cur, t). Decoders set it up once per channel and hold it in locals:
 * loads through uint8_t pointers may alias anything, so per-token lookups through the head
 * would be reloaded after every float store. */
typedef struct {
    const uint8_t *lo, *hi;     /* token 0's slot byte and high-nibble byte */
    ptrdiff_t lo_stride, hi_stride;
    int lo_shift, hi_shift;
} rv_coldq_vout;

static inline rv_coldq_vout rv_coldq_vout_at(const struct rv_qhead *h, int o)
{
    const int c = h->vidx[o], half = (h->head_dim + 1) / 2;
    return (rv_coldq_vout){.lo = h->vcodes + (c < half ? c : c - half), .hi = h->vhi + o / 2,
                           .lo_stride = h->vrow, .hi_stride = (h->nv + 1) / 2,
                           .lo_shift = c < half ? 0 : 4, .hi_shift = 4 * (o & 1)};
}

static inline int rv_coldq_vout_code(const rv_coldq_vout *v, int t)
{
    return ((v->lo[t * v->lo_stride] >> v->lo_shift) & 15) | ((v->hi[t * v->hi_stride] >> v->hi_shift) & 15) << 4;
}

/* query rows the fused kernel keeps in registers at once, and the scratch it needs */
#define RV_QATTN_ROWS 4
#define RV_QATTN_SCRATCH_FLOATS(G, d) \
    ((size_t)RV_QATTN_ROWS * ((size_t)(G) + 32 + (size_t)(d) + RV_COLDQ_MAX_OUTLIERS) + (size_t)(G) + 64)

typedef struct {
    int num_kv_heads, head_dim;
    int group_tokens;       /* G */
    int group_size;         /* value channel group */
    int bits;               /* 8 or 4 */
    int max_outliers;       /* per head, group and K / V (0 for 8 bits) */
} rv_coldq_cfg;

/* Pointers into one head's segment. */
typedef struct {
    const uint16_t *kscale, *kzero, *vscale, *vzero;
    const uint8_t *kcodes, *vcodes;
    int nk, nv;
    const uint8_t *kidx, *vidx;
    const uint16_t *voscale, *vozero;
    const uint8_t *vhi;
} rv_coldq_head;

/* bytes of a head segment with nk / nv outlier channels */
size_t rv_coldq_segment_bytes(const rv_coldq_cfg *cfg, int nk, int nv);
/* bytes of a blob whose heads have nk[h] / nv[h] outliers (NULL: none) */
size_t rv_coldq_blob_bytes(const rv_coldq_cfg *cfg, const int *nk, const int *nv);

/* Floats of scratch rv_coldq_select needs. */
size_t rv_coldq_scratch_floats(const rv_coldq_cfg *cfg);

/* Pass 1: choose the outlier channels of head h from its keys / values kf, vf [G][d]: writes
 * nk, nv and the ascending channel numbers kidx / vidx (max_outliers each). */
void rv_coldq_select(const rv_coldq_cfg *cfg, const float *kf, const float *vf, int *nk, uint8_t *kidx,
                     int *nv, uint8_t *vidx, float *scratch);
/* Pass 2: write the blob's header. */
void rv_coldq_write_header(const rv_coldq_cfg *cfg, unsigned char *blob, const int *nk, const int *nv);
/* Pass 2: quantize head h (kf, vf [G][d]) into its segment, outliers as chosen in pass 1. */
void rv_coldq_encode_head(const rv_coldq_cfg *cfg, unsigned char *blob, int head, const float *kf,
                          const float *vf, int nk, const uint8_t *kidx, int nv, const uint8_t *vidx);

void rv_coldq_head_view(const rv_coldq_cfg *cfg, const unsigned char *blob, int head, rv_coldq_head *h);

/* floats of parameters rv_coldq_qhead converts */
size_t rv_coldq_param_floats(const rv_coldq_cfg *cfg);
/* bytes of head `head`'s segment of a blob (what to prefetch of it) and where it starts */
size_t rv_coldq_head_bytes(const rv_coldq_cfg *cfg, const unsigned char *blob, int head,
                           const unsigned char **start);
/* where head `head`'s segment starts (reads only the blob's header) */
const unsigned char *rv_coldq_head_start(const unsigned char *blob, int head);
/* The head as the fused kernel reads it, its parameters converted into `params`. */
void rv_coldq_qhead(const rv_coldq_cfg *cfg, const rv_coldq_head *v, float *params, struct rv_qhead *q,
                    const rv_ops *ops);
/* All G tokens of the head as floats kf, vf [G][d] (params: rv_coldq_dequant_floats). */
size_t rv_coldq_dequant_floats(const rv_coldq_cfg *cfg);
void rv_coldq_dequant(const rv_coldq_cfg *cfg, const rv_coldq_head *v, float *kf, float *vf, float *params,
                      const rv_ops *ops);

/* ---- channel helpers shared with the TurboQuant format (rv_turbo.c) ---- */
/* The channels whose score exceeds factor x the median score (and 0), the `most` highest of
 * them, into idx ascending; returns how many. score [d] is overwritten; sorted: d floats. */
int rv_coldq_pick_channels(float *score, int d, float factor, int most, uint8_t *idx, float *sorted);
/* 1 if idx[0..n) are ascending channel numbers below d */
int rv_coldq_valid_channels(const uint8_t *idx, int n, int d);
/* x[t * stride], t < n, as 8-bit codes over their range: binary16 scale and zero, codes
 * computed against the rounded parameters (so decoding matches encoding), NaN -> 0 */
void rv_coldq_channel_q8(const float *x, int n, size_t stride, uint16_t *scale, uint16_t *zero, uint8_t *codes);

/* 0 if blob (of `bytes` bytes, from outside) is a well-formed group blob; -1 if not. */
int rv_coldq_validate(const rv_coldq_cfg *cfg, const unsigned char *blob, size_t bytes);

#endif
