/* The cold formats of the two-tier cache behind one table (like ggml's type_traits): the
 * cache holds a `const rv_codec *` and the state its create() made, and never branches on the
 * format. Entries: "q8" and "q4" (rv_coldq.c: KIVI-style integer codes with dense-and-sparse
 * outlier channels) and "turbo" (rv_turbo.c: TurboQuant). A new format is one more entry in
 * rv_codecs[] (rv_codec.c); ruvpy._kvcache.COLD_FORMATS lists the names from this table.
 *
 * The contract a format keeps (the cache relies on nothing else):
 *  - A *group* is G = cfg.group_tokens consecutive tokens of every KV head of one (sequence,
 *    layer), encoded from the hot tier's binary16 rows into one immutable *blob*.
 *  - Sizes, by arithmetic from the configuration alone (sizes(), no tables built): a blob's
 *    bytes depend on the data (outlier channels) but always lie in [blob_min, blob_max]; the
 *    cache and the Runtime's sizing plan memory and budgets from these numbers.
 *  - Encoding: encoded_bytes() then encode(), on the same input k, v ([kvh][G][d] binary16,
 *    contiguous) and the same scratch (sizes().encode_floats floats): the first measures
 *    the blob and may leave its choices (outlier channels) in the scratch for the second,
 *    which writes every byte of the blob, pad bytes included (exports are deterministic and
 *    leak no memory).
 *  - A blob is position independent (export / import copy it, allocations move) and
 *    validate() checks every byte a reader relies on: blobs from files are hostile. 0 if well
 *    formed, -1 if not; a validated blob never makes any other function read out of bounds.
 *  - decode_head(): head `head`'s G tokens as float32 k, v [G][d] (inspection: get_kv);
 *    scratch: sizes().decode_floats.
 *  - Attention reads the codes in place, through the kernel table. For a task folding tokens
 *    of KV heads h0 .. h0 + nh - 1 into states[0 .. nh) (rv_attn_state: rows x head_dim, the
 *    query rows already scaled): attend_begin() once, attend_group() per (group, head j), in
 *    token order, folding the group's tokens [a, a + n) into states[j] (row r sees tokens
 *    [a, a + visible[r]); visible NULL: all); attend_end() once. A format that attends in
 *    another domain (TurboQuant's rotation) prepares its own query rows and states in
 *    attend_begin and merges them into `states` in attend_end; the others do nothing there.
 *    attend_group may prefetch next_blob's segment of next_head (what the caller reads next;
 *    NULL: nothing). Scratch: attend_scratch_floats(rows, nh) floats per thread, 64-byte
 *    aligned, the same buffer for the three calls.
 *  - Every function is thread-safe on a shared state (the state is read-only after create).
 */
#ifndef RV_CODEC_H
#define RV_CODEC_H

#include <stddef.h>
#include <stdint.h>

#include "rv_common.h"
#include "rv_limits.h"
#include "kernels/rv_ops.h"

typedef struct rv_codec_cfg {
    int num_kv_heads, head_dim;
    int group_tokens;       /* G */
    int group_size;         /* value channel group of the integer formats */
    double bits;            /* TurboQuant: bits per value (RV_TURBO_BITS_LIST) */
    /* TurboQuant: the code widths themselves, bits per rotated coordinate of keys and of
     * values (2 to RV_TURBO_MAX_BITS in steps of 16 / D, D the padded head_dim), which then
     * replace the widths `bits` would give; 0 and 0: from `bits` */
    double key_bits, value_bits;
} rv_codec_cfg;

typedef struct rv_codec_sizes {
    size_t state_bytes;     /* what create() allocates (the cache counts it as metadata) */
    size_t blob_min, blob_max;
    size_t encode_floats;   /* scratch of encoded_bytes() / encode() */
    size_t decode_floats;   /* scratch of decode_head() */
} rv_codec_sizes;

typedef struct rv_codec {
    const char *name;
    /* The sizes for cfg: RV_OK, or RV_EINVAL for a configuration the format refuses. */
    int (*sizes)(const rv_codec_cfg *cfg, rv_codec_sizes *out);
    /* The format's tables for one cache shape (sizes().state_bytes of them): RV_OK, RV_EINVAL
     * (as sizes()), RV_ENOMEM. */
    int (*create)(const rv_codec_cfg *cfg, void **state);
    void (*destroy)(void *state);
    size_t (*encoded_bytes)(const void *state, const uint16_t *k, const uint16_t *v, float *scratch,
                            const rv_ops *ops);
    void (*encode)(const void *state, const uint16_t *k, const uint16_t *v, unsigned char *blob,
                   float *scratch, const rv_ops *ops);
    int (*validate)(const void *state, const unsigned char *blob, size_t bytes);
    void (*decode_head)(const void *state, const unsigned char *blob, int head, float *k, float *v,
                        float *scratch, const rv_ops *ops);
    size_t (*attend_scratch_floats)(const void *state, int rows, int nh);
    void (*attend_begin)(const void *state, rv_attn_state *states, int nh, float *scratch, const rv_ops *ops);
    void (*attend_group)(const void *state, const unsigned char *blob, int head, int j, int nh, int a, int n,
                         const int *visible, rv_attn_state *states, const unsigned char *next_blob,
                         int next_head, float *scratch, const rv_ops *ops);
    void (*attend_end)(const void *state, rv_attn_state *states, int nh, float *scratch, const rv_ops *ops);
} rv_codec;

/* ---- a helper for formats: the encoding scratch of the built-in ones ----
 * One head's K and V as float32 [G][d] (rows = G * d floats each), `work` floats of the
 * format's own, then the outlier channels chosen for every head -- counts as ints, channel
 * numbers as bytes -- which encoded_bytes() leaves there for encode(). */
typedef struct {
    float *kf, *vf, *work;
    int *nk, *nv;
    uint8_t *kidx, *vidx;       /* head h's at h * RV_MAX_OUTLIERS */
} rv_codec_encoding;

RV_INLINE size_t rv_codec_encoding_floats(size_t rows, size_t work, int kvh)
{
    return 2 * rv_pad16(rows) + rv_pad16(work) + rv_pad16(2 * (size_t)kvh) +
           rv_pad16((2 * (size_t)kvh * RV_MAX_OUTLIERS + 3) / 4);
}

/* the parts of scratch; with k, v (binary16 [kvh][rows]) given, head h's as floats in kf, vf */
RV_INLINE rv_codec_encoding rv_codec_encoding_at(float *scratch, size_t rows, size_t work, int kvh,
                                                 const uint16_t *k, const uint16_t *v, int h,
                                                 const rv_ops *ops)
{
    rv_codec_encoding e;
    e.kf = scratch;
    e.vf = e.kf + rv_pad16(rows);
    e.work = e.vf + rv_pad16(rows);
    e.nk = (int *)(e.work + rv_pad16(work));
    e.nv = e.nk + kvh;
    e.kidx = (uint8_t *)((float *)e.nk + rv_pad16(2 * (size_t)kvh));
    e.vidx = e.kidx + (size_t)kvh * RV_MAX_OUTLIERS;
    if (k) {
        ops->f16_to_f32(k + (size_t)h * rows, e.kf, rows);
        ops->f16_to_f32(v + (size_t)h * rows, e.vf, rows);
    }
    return e;
}

#define RV_CODEC_COUNT 3
/* "q8", "q4", "turbo", in that order */
extern const rv_codec *const rv_codecs[RV_CODEC_COUNT];

/* the entries (rv_coldq.c, rv_turbo.c) */
extern const rv_codec rv_codec_q8, rv_codec_q4, rv_codec_turbo;

#endif
