/* The kernel table: every ISA-specific function ruvpy has, one table per ISA.
 * ops_<isa>.c fills its table from the kernel templates (*_impl.h) compiled with that ISA's
 * flags; rv_dispatch.c picks one table at import (cpuid + XCR0, or RUVPY_ISA). Drivers in other
 * extensions receive a `const rv_ops *` and call through it, so they stay ISA-independent.
 *
 * To add a kernel family: declare its function pointers in a section here, write its template
 * header, and call its fill function from each ops_<isa>.c. */
#ifndef RV_OPS_H
#define RV_OPS_H

#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#include "kernels/rv_wmat.h"

typedef enum {
    RV_ISA_ID_SCALAR = 0,
    RV_ISA_ID_AVX2 = 1,
    RV_ISA_ID_AVX512 = 2,
    RV_ISA_ID_NEON = 3,
    RV_ISA_ID_AVX512VNNI = 4,   /* the avx512 table + VPDPBUSD for the quantized matmuls */
    RV_ISA_COUNT = 5
} rv_isa_id;

/* ---- attention building block ----
 * Online-softmax state of `rows` query rows that share one KV head (a GQA group times some
 * query tokens). Every attention path (contiguous, paged, quantized tiers) is a driver that
 * walks its K/V in chunks of at most RV_ATTN_CHUNK tokens and folds each chunk in with
 * attend_chunk_*; split contexts are combined with attn_merge, then attn_finalize divides.
 * Start state: m = -INFINITY, l = 0, acc = 0. */
#define RV_ATTN_CHUNK 64
/* keys per block of attend_heads_* (a caller that splits a key range into several calls
 * splits it at multiples of this from the range's start, so the blocks stay the same) */
#define RV_ATTN_HEAD_BLOCK 32
/* floats of scratch one state needs: scores/weights of every row for a chunk plus partial dot
 * products (head_dim does not matter now; it stays an argument so callers need not change) */
#define RV_ATTN_SCRATCH_FLOATS(rows, head_dim) ((size_t)(rows) * (RV_ATTN_CHUNK + 16) + 2048 + 64)

typedef struct rv_attn_state {
    int rows;
    int head_dim;
    const float *q;        /* rows x head_dim, already multiplied by the softmax scale */
    ptrdiff_t q_stride;    /* floats between query rows */
    float *m;              /* [rows] running max score */
    float *l;              /* [rows] running sum of exp(score - m) */
    float *acc;            /* [rows x head_dim] running sum of exp(score - m) * v */
    float *scratch;        /* RV_ATTN_SCRATCH_FLOATS(rows, head_dim) floats, 64-byte aligned */
} rv_attn_state;

/* A run of n K/V rows: row j of the keys at k + j*k_stride elements, of the values at
 * v + j*v_stride (elements are float or binary16, as the function taking it says). A list of
 * spans is one logical key sequence (a paged cache's blocks in order, or one contiguous range);
 * "key index" below counts over the whole list. Spans with n <= 0 are skipped. */
typedef struct rv_kv_span {
    const void *k;
    const void *v;
    ptrdiff_t k_stride;
    ptrdiff_t v_stride;
    int n;
} rv_kv_span;

/* Tiled attention of up to RV_ATTN_TILE_ROWS query rows (prefill), see attend_rows_*. */
#define RV_ATTN_TILE_ROWS 64
#define RV_ATTN_TILE_KEYS 64
/* floats of scratch attend_rows_* needs (64-byte aligned) */
#define RV_ATTN_TILE_SCRATCH_FLOATS(head_dim) \
    (((size_t)(head_dim) + 8) * (2 * RV_ATTN_TILE_ROWS + 2 * (RV_ATTN_TILE_KEYS + 8)) + \
     (size_t)(RV_ATTN_TILE_KEYS + 8) * RV_ATTN_TILE_ROWS + 8 * RV_ATTN_TILE_ROWS + 64)

typedef struct rv_attn_rows {
    int rows;                 /* 1..RV_ATTN_TILE_ROWS query rows */
    int head_dim;
    float scale;              /* softmax scale, applied here (q is NOT pre-scaled) */
    const float *const *q;    /* [rows] query row pointers */
    float *const *out;        /* [rows] output row pointers (may equal q's rows) */
    const int *visible;       /* [rows] leading keys row r sees (causal); NULL: all keys */
    const rv_kv_span *spans;  /* the keys and values, in order */
    int nspans;
    float *m_out;             /* optional [rows]: final running max (scaled scores), or NULL */
    float *l_out;             /* optional [rows]: final sum of exp(score - max), or NULL */
} rv_attn_rows;

struct rv_qhead;   /* a quantized KV group's head (kernels/rv_qview.h) */
struct rv_thead;   /* a TurboQuant KV group's head (kernels/rv_qview.h) */

/* The start state of an online softmax: m = -inf, l = 0, acc = 0 (every driver begins here). */
static inline void rv_attn_state_clear(float *m, float *l, float *acc, int rows, int head_dim)
{
    for (int r = 0; r < rows; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(acc, 0, sizeof(float) * (size_t)rows * (size_t)head_dim);
}

typedef struct rv_ops {
    const char *isa;   /* "scalar", "avx2", "avx512", "neon", "avx512vnni" */
    int lanes;         /* float32 lanes of one vector */

    /* ---- basic vector kernels (basic_impl.h) ---- */
    float (*dot_f32)(const float *a, const float *b, size_t n);
    void (*axpy_f32)(size_t n, float alpha, const float *x, float *y);     /* y += alpha x */
    void (*scale_f32)(size_t n, float alpha, float *x);                   /* x *= alpha */
    float (*max_f32)(const float *x, size_t n);                           /* -inf if n == 0 */
    /* out[i] = exp(x[i] - shift) (out may be NULL or alias x); returns the sum */
    float (*sum_exp_f32)(const float *x, float shift, float *out, size_t n);
    void (*f32_to_f16)(const float *src, uint16_t *dst, size_t n);
    void (*f16_to_f32)(const uint16_t *src, float *dst, size_t n);

    /* ---- attention (attention_impl.h) ----
     * Fold n <= RV_ATTN_CHUNK keys/values into the state. Key j is at k + j*k_stride, value j
     * at v + j*v_stride (strides in elements). Row r sees the first visible[r] keys of the
     * chunk (visible == NULL: all n; 0: none, the row is untouched). */
    void (*attend_chunk_f32)(rv_attn_state *st, const float *k, ptrdiff_t k_stride,
                             const float *v, ptrdiff_t v_stride, int n, const int *visible);
    void (*attend_chunk_f16)(rv_attn_state *st, const uint16_t *k, ptrdiff_t k_stride,
                             const uint16_t *v, ptrdiff_t v_stride, int n, const int *visible);
    /* (m, l, acc) of `into` <- combination of itself and `other` (same rows and head_dim) */
    void (*attn_merge)(int rows, int head_dim, float *m, float *l, float *acc,
                       const float *m_other, const float *l_other, const float *acc_other);
    /* out row r (stride out_stride floats) = acc_r / l_r; rows that saw no key get zeros */
    void (*attn_finalize)(int rows, int head_dim, const float *l, const float *acc,
                          float *out, ptrdiff_t out_stride);

    /* ---- attention, appended (attention_impl.h) ----
     * attend_spans_*: like attend_chunk_* but over any number of keys given as spans (paged
     * blocks or one long range): folds them all into st in RV_ATTN_CHUNK pieces, streaming each
     * K/V row once for all st->rows rows (use it for decode: rows = the GQA group, or a few
     * query tokens x group with per-row `visible` for causal). visible[r] counts keys over the
     * whole span list (NULL: all). Scratch: RV_ATTN_SCRATCH_FLOATS(rows, head_dim). Fastest
     * for rows <= 8; state semantics exactly as attend_chunk_* (merge/finalize apply). */
    void (*attend_spans_f32)(rv_attn_state *st, const rv_kv_span *spans, int nspans,
                             const int *visible);
    void (*attend_spans_f16)(rv_attn_state *st, const rv_kv_span *spans, int nspans,
                             const int *visible);
    /* attend_rows_*: complete attention of job->rows (<= RV_ATTN_TILE_ROWS) query rows over
     * the spans (flash attention 2: query rows x RV_ATTN_TILE_KEYS key tiles, online softmax,
     * key tiles past every row's `visible` skipped, partial tiles masked exactly); writes the
     * normalised output rows (rows that see no key get zeros) and, if asked, (m, l) so that
     * partial results over disjoint key ranges can be merged: acc = out * l.
     * For prefill put many rows in one call (e.g. 16 tokens x a GQA group of 4); it is slower
     * than attend_spans_* for one or two rows. Scratch: RV_ATTN_TILE_SCRATCH_FLOATS(head_dim). */
    void (*attend_rows_f32)(const rv_attn_rows *job, float *scratch);
    void (*attend_rows_f16)(const rv_attn_rows *job, float *scratch);

    /* ---- KV quantization (quant_impl.h; the two-tier cache's cold store) ----
     * Rows of d codes, row_bytes apart: 8-bit (a byte per code) or 4-bit (byte j holds channel
     * j low and channel j + ceil(d/2) high). Outputs are n x d floats.
     * dequant_rows_channel: keys, per-channel float parameters: scale[c] * code + zero[c].
     * dequant_rows_group: values, per-token binary16 parameters for channel groups of `group`
     * (param_stride elements from token to token): scale[t][c/group] * code + zero[t][c/group]. */
    void (*dequant_rows_channel)(const uint8_t *codes, ptrdiff_t row_bytes, int n, int d, int bits,
                                 const float *scale, const float *zero, float *out);
    void (*dequant_rows_group)(const uint8_t *codes, ptrdiff_t row_bytes, int n, int d, int bits,
                               int group, const uint16_t *scale, const uint16_t *zero,
                               ptrdiff_t param_stride, float *out);

    /* ---- attention, appended (attention_impl.h) ----
     * attend_heads_*: attend_spans_* for num_heads KV heads of token-major storage at once:
     * the spans list head 0's rows (one logical key sequence, as for attend_spans_*), and
     * head h's row of a key is k_head (v_head) elements after head 0's. Keys are walked in
     * blocks of RV_ATTN_HEAD_BLOCK counted from the list's first key, across span boundaries,
     * every head per block, and the next block is prefetched in memory order: NHD data (heads
     * interleaved in every page) streams at close to full bandwidth this way, ~4x faster than
     * one head at a time. The blocks do not depend on where the spans break, so the same keys
     * give the same result bit for bit however they are laid out (a paged cache's blocks in
     * any order, a ring's wrap anywhere). visible[r] as for attend_spans_* (the same for every
     * state; all states have the same rows and head_dim and may share one scratch). Use it for
     * decode over token-major K/V. */
    void (*attend_heads_f32)(rv_attn_state *states, int num_heads, const rv_kv_span *spans,
                             int nspans, ptrdiff_t k_head, ptrdiff_t v_head, const int *visible);
    void (*attend_heads_f16)(rv_attn_state *states, int num_heads, const rv_kv_span *spans,
                             int nspans, ptrdiff_t k_head, ptrdiff_t v_head, const int *visible);

    /* ---- KV quantization, appended (quant_impl.h) ----
     * attend_qgroup: fold tokens [a, a + n) of one KV head of a quantized cold group (q8/q4,
     * see struct rv_qhead) into st, reading the codes in place: scores from the channel-major
     * key codes (the queries scaled per channel once), values dequantized in registers. Row r
     * sees tokens [a, a + visible[r]) (NULL: all). State semantics as attend_chunk_*.
     * Scratch: RV_QATTN_SCRATCH_FLOATS(G, head_dim) floats (rv_qview.h). */
    void (*attend_qgroup)(rv_attn_state *st, const struct rv_qhead *h, int a, int n,
                          const int *visible, float *scratch);
    /* attend_tgroup: the same for a TurboQuant group (struct rv_thead): st has head_dim D (the
     * padded dimension) and its accumulators stay in the rotated domain (the caller rotates
     * them back); the queries come with the head (int8 rotated, and plain for the key mean);
     * scores are integer dot products of the int8 query with the codes' table bytes, values
     * codebook entries times the token's scale. Scratch: RV_TATTN_SCRATCH_FLOATS(Gp, D). */
    void (*attend_tgroup)(rv_attn_state *st, const struct rv_thead *h, int a, int n,
                          const int *visible, float *scratch);

    /* ---- GGUF block matmul and the dense parts of a layer (qmatmul_impl.h; formats in
     * rv_wmat.h) ----
     * quantize_act: columns [c0, c1) of a->x into a's Q8 arrays (q, d, s32, s16, ds). */
    void (*quantize_act)(rv_qact *a, int c0, int c1);
    /* y[c * ldy + r - r0] = W[r] . x_c (accumulate: +=) for rows r in [r0, r1)
     * and every column c < a->n; float weight types use a->x, quantized ones a's Q8 form (call
     * quantize_act first). Up to a few columns it streams each row once for all columns
     * (matrix-vector, decode); for more it packs RV_WMM_PANEL rows at a time into `scratch`
     * and runs a register-blocked integer GEMM over the columns (prefill). scratch:
     * RV_WMATMUL_SCRATCH_BYTES(w->cols) bytes, 64-byte aligned. */
    void (*wmatmul)(const rv_wmat *w, int r0, int r1, const rv_qact *a, float *y, ptrdiff_t ldy,
                    int accumulate, void *scratch);
    /* row `row` of W dequantized into out[w->cols] (an embedding lookup) */
    void (*wrow_f32)(const rv_wmat *w, int row, float *out);
    /* out = x / sqrt(mean(x^2) + eps) * gain (gain NULL: 1); out may be x */
    void (*rmsnorm_f32)(const float *x, const float *gain, float eps, float *out, int n);
    /* rotates the adjacent pairs (x[2i], x[2i+1]) of `vectors` vectors of dim floats (stride
     * dim) by the angles whose cos/sin are cos[i], sin[i] (i < dim/2): llama.cpp's "normal" RoPE */
    void (*rope_pairs_f32)(float *x, int vectors, int dim, const float *cos, const float *sin);
    /* out = gate * sigmoid(gate) * up (SwiGLU); out may alias gate or up */
    void (*swiglu_f32)(const float *gate, const float *up, float *out, int n);
} rv_ops;

/* rv_dispatch.c */
int rv_isa_supported(int isa);                 /* built into this binary and usable on this CPU */
int rv_isa_built(int isa);                     /* compiled into this binary at all */
const char *rv_isa_name(int isa);
int rv_isa_from_name(const char *name);        /* -1 if unknown */
int rv_best_isa(void);
const rv_ops *rv_ops_for(int isa);             /* NULL unless rv_isa_supported(isa) */
int rv_set_active_isa(int isa);                /* 0, or -1 if not supported */
const rv_ops *rv_active_ops(void);

/* Thread count every parallel driver uses (0 or less = all OpenMP threads). */
void rv_set_num_threads(int n);
int rv_get_num_threads(void);

/* each ISA translation unit */
void rv_fill_ops_scalar(rv_ops *ops);
void rv_fill_ops_avx2(rv_ops *ops);
void rv_fill_ops_avx512(rv_ops *ops);
void rv_fill_ops_neon(rv_ops *ops);
void rv_fill_ops_avx512vnni(rv_ops *ops);

#endif
