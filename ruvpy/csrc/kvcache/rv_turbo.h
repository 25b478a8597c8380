/* The TurboQuant cold-group format of the two-tier cache (Zandieh et al., arXiv 2504.19874).
 *
 * Every key / value vector x of one head (head_dim d, zero-padded to D = the next power of
 * two) is stored as its norm and the codes of its direction rotated by a fixed randomized
 * Hadamard transform R = H diag(signs) / sqrt(D): the coordinates of R x / |x| are close to
 * N(0, 1/D) whatever x was (outlier channels are spread over all of them), so one Lloyd-Max
 * scalar codebook for that Gaussian serves every coordinate. Rates b = 2.5 / 3.5 / 4.5 bits
 * per value: values use ceil(b) bits for the first D/2 rotated coordinates and floor(b) for
 * the rest (MSE quantizer); keys use one bit less for the codes and spend it on QJL: the
 * signs of S r for the residual r = y - y_hat (S a fixed D x D Gaussian matrix) and |r|, which
 * make the inner products unbiased:
 *     q . k  ~=  |k| ( (R q) . y_hat  +  |r| sqrt(pi/2) / D  (S R q) . sign(S r) ).
 * Attention scores with the rotated query (and S R q) straight from the codes; values are
 * accumulated in the rotated domain and rotated back once per call (R is orthogonal).
 *
 * Outlier channels (dense-and-sparse, as the q4 format): per head and group, the channels of
 * K and of V whose root mean square over the G tokens exceeds RV_TURBO_OUTLIER_RATIO x the
 * median channel's (the heaviest, at most max(1, head_dim / 16) and RV_TURBO_MAX_OUTLIERS) are
 * taken out before the norm and the rotation and kept as 8-bit codes per channel over the
 * group with a binary16 scale and zero. Left in, a x20 channel would dominate |x| and the
 * rotation would spread it over every coordinate: the error of every score would be of the
 * order of the whole key norm, in a softmax made peaked by those very channels. By energy
 * rather than range (q4's rule): a channel far from zero on every token is as heavy as a wide
 * one, and cheap at 8 bits over its range. A vector is the sum of
 * its TurboQuant part (zero in the outlier channels up to its quantization error) and its
 * outliers, and so is every inner product.
 *
 * Group layout (G tokens of one sequence and layer; Gp = G rounded up to 16; a "plane" is
 * one bit of a code for the Gp tokens, Gp / 8 bytes, token t at bit t % 8 of byte t / 8):
 *   uint32 head_off[num_kv_heads], then per head:
 *   knorm[Gp], kgamma[Gp], vnorm[Gp]   f16  |k|, |r| (of the unit direction), |v|
 *   kplanes: rotated coordinate i's code bits, bit 0 first (kbits(i) planes each)
 *   qjl: D planes, projection j's sign bit (1: >= 0)
 *   vplanes: as kplanes with vbits(i)
 *   (the part above has the same size in every group; then)
 *   nk, nv                        u8   outlier channels of keys / values
 *   kidx[nk], vidx[nv]            u8   their channel numbers, ascending; 1 pad byte if odd
 *   kscale[nk], kzero[nk], vscale[nv], vzero[nv]   f16   x = scale * code + zero
 *   kcodes[nk][Gp], vcodes[nv][Gp]                  u8    channel-major codes over the tokens
 * Padding tokens (G .. Gp) are zero. */
#ifndef RV_TURBO_H
#define RV_TURBO_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/rv_ops.h"

#define RV_TURBO_MAX_BITS 5
#define RV_TURBO_MAX_OUTLIERS 8      /* per head, group and K / V (as the q4 format) */
#define RV_TURBO_OUTLIER_RATIO 3.0f  /* a channel's RMS over the median channel's */

/* One KV head of a TurboQuant group as the fused kernel (rv_ops.attend_tgroup) reads it.
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

typedef struct rv_turbo rv_turbo;

/* bits 2.5 / 3.5 / 4.5 (anything else: NULL) */
rv_turbo *rv_turbo_create(int num_kv_heads, int head_dim, int group_tokens, double bits);
void rv_turbo_destroy(rv_turbo *t);
size_t rv_turbo_bytes(const rv_turbo *t);          /* its own tables (metadata) */
int rv_turbo_padded_dim(const rv_turbo *t);       /* D */
int rv_turbo_state_dim(const rv_turbo *t);        /* D + d: the fused kernel's state rows */
size_t rv_turbo_blob_bytes(const rv_turbo *t);     /* a group without outliers */
/* where head h's segment starts, and its bytes (blobs from outside: validate first) */
const unsigned char *rv_turbo_segment(const rv_turbo *t, const unsigned char *blob, int head);
size_t rv_turbo_head_bytes(const rv_turbo *t, const unsigned char *blob, int head);

/* Encode G tokens of every head: k, v [kvh][G][d] floats, into blob of
 * rv_turbo_encoded_bytes(the same k, v) bytes. scratch: rv_turbo_scratch_floats floats. */
size_t rv_turbo_scratch_floats(const rv_turbo *t);
size_t rv_turbo_encoded_bytes(const rv_turbo *t, const float *k, const float *v, float *scratch);
void rv_turbo_encode(const rv_turbo *t, const float *k, const float *v, unsigned char *blob,
                     float *scratch, const rv_ops *ops);

/* All G tokens of head h back as floats [G][d]: values R^T (|v| y_hat), keys
 * R^T (|k| (y_hat + sqrt(pi/2)/D |r| S^T sign)) -- the vector whose inner products are the
 * estimates attention uses. scratch: rv_turbo_scratch_floats. */
void rv_turbo_decode(const rv_turbo *t, const unsigned char *blob, int head, float *k, float *v,
                     float *scratch, const rv_ops *ops);

/* Attention support. Floats of per-thread scratch for `rows` query rows and `nh` heads: */
size_t rv_turbo_attend_floats(const rv_turbo *t, int rows, int nh);
/* the (scaled) query rows q [rows][d] (stride q_stride) as the kernel's state wants them:
 * q_rot [rows][D + d] = [R q | q], qjl_q = S R q [rows][D], qjl_sum [rows] */
void rv_turbo_prepare_queries(const rv_turbo *t, const float *q, ptrdiff_t q_stride, int rows,
                              float *q_rot, float *qjl_q, float *qjl_sum, const rv_ops *ops);
/* the view of head h of a group for the kernel (norms and outlier parameters converted into
 * `norms`, rv_turbo_head_floats floats) */
size_t rv_turbo_head_floats(const rv_turbo *t);
void rv_turbo_head(const rv_turbo *t, const unsigned char *blob, int head, const float *qjl_q,
                   const float *qjl_sum, float *norms, struct rv_thead *h, const rv_ops *ops);
/* acc [rows][D + d] (rotated domain | plain channels) -> out [rows][d] (stride out_stride) */
void rv_turbo_unrotate(const rv_turbo *t, float *acc, int rows, float *out, ptrdiff_t out_stride);

/* 0 if blob (of `bytes` bytes, from outside) is a well-formed group blob; -1 if not. */
int rv_turbo_validate(const rv_turbo *t, const unsigned char *blob, size_t bytes);

#endif
