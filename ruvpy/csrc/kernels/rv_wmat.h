/* Weight matrices in GGUF (ggml) block formats, used in place, and the Q8 activations the
 * quantized matmul kernels (qmatmul_impl.h) multiply them with.
 *
 * A matrix is `rows` rows of `cols` values, row-major as GGUF stores it (ne0 = cols is the
 * contiguous axis): row r is row_bytes bytes at data + r * row_bytes, a run of blocks. Type ids
 * are ggml's, so a GGUF tensor's type passes straight through.
 *
 * Every quantized format here reads as  w = sw * (u - zp) + mw  per sub-block of 16 or 32
 * values, with unsigned codes u. A dot product with activations x = d * q (q int8 in blocks of
 * 32, one float scale d per block) is therefore, per sub-block j of block b:
 *     sum w x = d_b * ( sw_j * sum(u q) + (mw_j - zp sw_j) * sum(q) )
 * so the kernels take integer dot products of codes (u8 x s8: VPDPBUSD, PMADDUBSW, SMULL) and
 * need the activations' per-block scale and per-sub-block code sums, which quantize_act makes
 * once per product (ggml does the same with its Q8_0 / Q8_1 / Q8_K partner formats). */
#ifndef RV_WMAT_H
#define RV_WMAT_H

#include <stddef.h>
#include <stdint.h>

enum rv_wtype {
    RV_WT_F32 = 0,
    RV_WT_F16 = 1,
    RV_WT_Q4_0 = 2,    /* 32 values: f16 d, 16 bytes of nibbles; w = d (u - 8) */
    RV_WT_Q4_1 = 3,    /* 32 values: f16 d, f16 m, 16 bytes of nibbles; w = d u + m */
    RV_WT_Q8_0 = 8,    /* 32 values: f16 d, 32 int8; w = d q */
    RV_WT_Q4_K = 12,   /* 256 values: f16 d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes nibbles */
    RV_WT_Q5_K = 13,   /* Q4_K + 32 bytes of fifth bits */
    RV_WT_Q6_K = 14,   /* 256 values: 128 bytes low nibbles, 64 bytes 2-bit highs, 16 int8 scales, f16 d */
    RV_WT_BF16 = 30,
    RV_WT_MAX_ID = 31
};

/* Values per block of a type the kernels run, 0 for any other type id. */
static inline int rv_wtype_block_values(int type)
{
    switch (type) {
    case RV_WT_F32: case RV_WT_F16: case RV_WT_BF16: return 1;
    case RV_WT_Q4_0: case RV_WT_Q4_1: case RV_WT_Q8_0: return 32;
    case RV_WT_Q4_K: case RV_WT_Q5_K: case RV_WT_Q6_K: return 256;
    default: return 0;
    }
}

/* Bytes per block of a type the kernels run, 0 for any other type id. */
static inline int rv_wtype_block_bytes(int type)
{
    switch (type) {
    case RV_WT_F32: return 4;
    case RV_WT_F16: case RV_WT_BF16: return 2;
    case RV_WT_Q4_0: return 18;
    case RV_WT_Q4_1: return 20;
    case RV_WT_Q8_0: return 34;
    case RV_WT_Q4_K: return 144;
    case RV_WT_Q5_K: return 176;
    case RV_WT_Q6_K: return 210;
    default: return 0;
    }
}

static inline int rv_wtype_is_float(int type)
{
    return type == RV_WT_F32 || type == RV_WT_F16 || type == RV_WT_BF16;
}

typedef struct rv_wmat {
    const uint8_t *data;
    int type;             /* enum rv_wtype */
    int rows, cols;       /* cols: a multiple of the type's block values */
    size_t row_bytes;     /* cols / block values * block bytes */
} rv_wmat;

/* The product's other operand: n columns (tokens) of k values (k a multiple of 32), as floats
 * (float weight types use these) and in Q8: x ~= d * q per block of 32 with |q| <= 127.
 * Arrays are per column, column c's at [c * per-column length]. */
typedef struct rv_qact {
    int n, k;
    const float *x;       /* column c at x + c * x_stride */
    ptrdiff_t x_stride;
    int8_t *q;            /* [n][k] codes */
    float *d;             /* [n][k/32] block scales */
    float *s32;           /* [n][k/32] d * (sum of the block's 32 codes) */
    float *s16;           /* [n][k/16] d * (sum of each half block's 16 codes) */
    int8_t *q4;           /* [n][k] the codes in "nibble order" for the Q4_0 / Q4_1 kernels: per
                             group of 4 blocks (128 codes), the first halves of the 4 blocks,
                             then their second halves (so a vector of the 4 blocks' low nibbles
                             meets its codes in one load); a last partial group as in q */
    float *ds;            /* [n][k/32][2] (d, s32) interleaved: one load pairs a block's scale
                             and sum with a weight block's (scale, minimum) */
} rv_qact;

/* Bytes of the arrays of an rv_qact of n columns of k values (64-byte aligned pieces). */
#define RV_QACT_ALIGN(b) (((size_t)(b) + 63) & ~(size_t)63)
#define RV_QACT_BYTES(n, k) \
    (2 * RV_QACT_ALIGN((size_t)(n) * (size_t)(k)) + 2 * RV_QACT_ALIGN((size_t)(n) * ((size_t)(k) / 32) * 4) + \
     2 * RV_QACT_ALIGN((size_t)(n) * ((size_t)(k) / 32) * 8))

/* Points a's arrays into buf (64-byte aligned, RV_QACT_BYTES(n, k) bytes); x is set apart. */
static inline void rv_qact_bind(rv_qact *a, void *buf, int n, int k)
{
    char *p = (char *)buf;
    const size_t nb = (size_t)n * ((size_t)k / 32);
    a->n = n;
    a->k = k;
    a->q = (int8_t *)p;
    p += RV_QACT_ALIGN((size_t)n * (size_t)k);
    a->d = (float *)p;
    p += RV_QACT_ALIGN(nb * 4);
    a->s32 = (float *)p;
    p += RV_QACT_ALIGN(nb * 4);
    a->s16 = (float *)p;
    p += RV_QACT_ALIGN(nb * 8);
    a->q4 = (int8_t *)p;
    p += RV_QACT_ALIGN((size_t)n * (size_t)k);
    a->ds = (float *)p;
}

/* Scratch bytes one wmatmul call needs for k values per row (its per-thread work memory:
 * a packed panel of RV_WMM_PANEL rows, their unpacked codes and sub-block parameters, or a
 * row of floats). 64-byte aligned. */
#define RV_WMM_PANEL 16
#define RV_WMATMUL_SCRATCH_BYTES(k) \
    (2 * (size_t)RV_WMM_PANEL * (size_t)(k) + 4 * (size_t)RV_WMM_PANEL * ((size_t)(k) / 16) * 4 + \
     8 * (size_t)(k) + 4096)

#endif
