/* The TurboQuant cold-group format of the two-tier cache (after Zandieh et al., arXiv
 * 2504.19874: random rotation + Lloyd-Max scalar codes), with what measurements on SmolLM2's own
 * K/V showed a small head_dim needs (tools/kv_quant_lab.py, README "TurboQuant"):
 *
 *  - MSE codes only. The paper's 1-bit QJL residual makes key inner products unbiased but adds
 *    variance that the softmax amplifies (perplexity +29% against +1.9% for MSE-only codes at
 *    the same bits);
 *  - keys lose their group mean first: real keys sit far from zero along a few channels on every
 *    token, and after a rotation that offset costs every coordinate's bits. Each group stores
 *    its per-channel key mean mu (4-bit codes, binary16 range) and, per token, whether mu was
 *    taken out: a token whose key is nearer zero than mu (an attention sink) keeps its key, else
 *    mu + a residual quantized far more finely than the whole key would be. Scores add
 *    flag_t (q . mu) per token;
 *  - keys get more bits than values (3.75 / 3 at 3.5 bits per value, head_dim 64): their
 *    errors pass through the softmax;
 *  - per token a least-squares scale (not the norm) for the chosen codes, stored as an 8-bit code
 *    of its logarithm over the group's range;
 *  - every byte counted: turbo_bits is the budget per stored value, metadata included.
 *
 * A vector x (head_dim d, zero-padded to D = max(16, the next power of two)) is stored as a
 * scale a and codes c[D] with R x ~= a c, R = H diag(signs) / sqrt(D) a randomized Hadamard
 * rotation: the coordinates of R x / |x| are close to N(0, 1/D) whatever x is, so one scalar
 * codebook per width serves every coordinate. Codebooks are int8 (Lloyd-Max for N(0, 1) times
 * RV_TURBO_BOOK_SCALE, rounded): the encoder picks among exactly the values the kernels use,
 * and the kernels take integer dot products with an int8 copy of the rotated query.
 *
 * Code widths: rotated coordinates [0, n4) have 4 bits, [n4, n3) 3 bits, [n3, D) 2 bits (n3, n4
 * multiples of 16, so every block of 16 coordinates has one width and one lookup table). A
 * token's codes are D/4 bytes of "crumbs" (the low 2 bits; byte i holds coordinate
 * i + k D/4 at bits 2k, k = 0..3), then n3/8 bytes of bit 2 (coordinate i at bit i % 8 of byte
 * i / 8), then n4/8 bytes of bit 3. Unpacking is a broadcast, a shift per lane and a mask per
 * 64 coordinates, and a mask-to-bytes per plane.
 *
 * Group layout (G tokens of one sequence and layer; Gp = G rounded up to 16; fixed size):
 * kvh head segments of rv_turbo_head_bytes bytes back to back, each:
 *   f16  kmu_lo, kmu_step, kn_lo, kn_step, vn_lo, vn_step
 *   u8   kmu[ceil(d / 2)]     key mean codes: mu_c = kmu_lo + kmu_step * code (channel c in
 *                             byte c / 2, low nibble for even c)
 *   u8   kflag[Gp / 8]        bit t: token t's key had mu taken out
 *   u8   knorm[Gp], vnorm[Gp] scale codes: 0 is a zero vector, else
 *                             a = exp(lo + (code - 1) * step)
 *   u8   kcodes[Gp][kbytes], vcodes[Gp][vbytes]   token-major codes as above
 *   (padding to an even size). Padding tokens (G .. Gp) are zero vectors. */
#ifndef RV_TURBO_H
#define RV_TURBO_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/rv_ops.h"

/* int8 codebooks: round(RV_TURBO_BOOK_SCALE * Lloyd-Max centroids of N(0, 1)), ascending; |c| <= 63
 * so that (c + 64) is a u8 below 128 and (c + 64) * q8 pair sums fit int16 (vpmaddubsw) */
#define RV_TURBO_BOOK_SCALE 23
#if defined(__GNUC__) || defined(__clang__)
#define RV_TURBO_TABLE static const __attribute__((unused))
#else
#define RV_TURBO_TABLE static const
#endif
RV_TURBO_TABLE int8_t rv_turbo_book2[4] = {-35, -10, 10, 35};
RV_TURBO_TABLE int8_t rv_turbo_book3[8] = {-49, -31, -17, -6, 6, 17, 31, 49};
RV_TURBO_TABLE int8_t rv_turbo_book4[16] = {-63, -48, -37, -29, -22, -15, -9, -3, 3, 9, 15, 22, 29, 37, 48, 63};

/* One KV head of a TurboQuant group as the fused kernel (rv_ops.attend_tgroup) reads it. The
 * attention state it folds into has head_dim D: accumulators in the rotated domain. */
struct rv_thead {
    int G, Gp, D, d;
    int k_n3, k_n4, v_n3, v_n4;                  /* code widths, see above */
    int kbytes, vbytes;                          /* codes per token */
    const uint8_t *kcodes, *vcodes;              /* [Gp][kbytes], [Gp][vbytes] */
    /* per 16 coordinates a 16-entry table: keys (c + 64) as u8, values c as int8 */
    const uint8_t *ktab, *vtab;                  /* [D] each */
    const uint8_t *knorm, *vnorm;                /* [Gp] scale codes */
    float kn_lo, kn_step, vn_lo, vn_step;        /* their decoding */
    const uint8_t *kflag;                        /* [Gp / 8] */
    const float *kmu;                            /* [d] the key mean, decoded */
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

/* query rows the fused kernel handles at once, and the scratch it needs */
#define RV_TATTN_ROWS 4
#define RV_TATTN_SCRATCH_FLOATS(Gp, D) \
    ((size_t)RV_TATTN_ROWS * ((size_t)(Gp) + 32) + 5 * (size_t)(Gp) + 4 * (size_t)(D) + 256)

typedef struct rv_turbo rv_turbo;

/* bits 2.5 / 3.5 / 4.5 per value, metadata included (anything else: NULL) */
rv_turbo *rv_turbo_create(int num_kv_heads, int head_dim, int group_tokens, double bits);
void rv_turbo_destroy(rv_turbo *t);
size_t rv_turbo_bytes(const rv_turbo *t);          /* its own tables (metadata) */
int rv_turbo_padded_dim(const rv_turbo *t);        /* D */
size_t rv_turbo_blob_bytes(const rv_turbo *t);     /* a group */
size_t rv_turbo_head_bytes(const rv_turbo *t);     /* one head's segment */
const unsigned char *rv_turbo_segment(const rv_turbo *t, const unsigned char *blob, int head);
/* widths: keys' and values' n3 / n4 (tests and stats) */
void rv_turbo_widths(const rv_turbo *t, int *k_n3, int *k_n4, int *v_n3, int *v_n4);

/* Encode G tokens of every head: k, v [kvh][G][d] floats, into blob (rv_turbo_blob_bytes).
 * scratch: rv_turbo_scratch_floats floats. */
size_t rv_turbo_scratch_floats(const rv_turbo *t);
void rv_turbo_encode(const rv_turbo *t, const float *k, const float *v, unsigned char *blob, float *scratch);

/* All G tokens of head h back as floats [G][d] (what attention computes with).
 * scratch: rv_turbo_scratch_floats. */
void rv_turbo_decode(const rv_turbo *t, const unsigned char *blob, int head, float *k, float *v, float *scratch);

/* Attention support. Per thread, per head: rv_turbo_query_floats(rows) floats of prepared query
 * (rotated floats, int8 copy, scales and sums), then the state (m, l, acc [rows][D]). */
size_t rv_turbo_query_floats(const rv_turbo *t, int rows);
/* the (scaled) query rows q [rows][d] (stride q_stride) rotated into `prep` */
void rv_turbo_prepare_queries(const rv_turbo *t, const float *q, ptrdiff_t q_stride, int rows, float *prep);
/* the view of head h of a group for the kernel, given prepared queries (the key mean decoded
 * into `mu`, d floats) */
void rv_turbo_head(const rv_turbo *t, const unsigned char *blob, int head, const float *prep, int rows,
                   const float *q, ptrdiff_t q_stride, float *mu, struct rv_thead *h);
/* acc [rows][D] (rotated domain) -> out [rows][d] (stride out_stride) */
void rv_turbo_unrotate(const rv_turbo *t, float *acc, int rows, float *out, ptrdiff_t out_stride);

/* 0 if blob (of `bytes` bytes, from outside) is a well-formed group blob; -1 if not. */
int rv_turbo_validate(const rv_turbo *t, const unsigned char *blob, size_t bytes);

#endif
