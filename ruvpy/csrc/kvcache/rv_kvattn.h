/* Attention over a KV cache, in place: the ISA-independent driver shared by the paged and the
 * two-tier caches. A cache describes its storage by a `fold` callback that folds keys
 * [t0, t1) of one sequence into the online-softmax states of a range of KV heads, straight
 * out of its blocks / tiers. The driver does everything else: it packs and scales the query
 * rows of each KV head's GQA group, tiles long query runs (prefill), skips causally hidden
 * key ranges, splits long contexts across threads (flash-decoding) and merges the splits, in
 * one OpenMP region over (sequence, query tile, head group, split).
 *
 * Decode-sized tiles (at most RV_KV_STREAM_ROWS rows per KV head) fold every KV head of the
 * sequence in one task, so a cache can stream its memory in address order (all heads of a
 * block together); prefill tiles fold one head per task. */
#ifndef RV_KVATTN_H
#define RV_KVATTN_H

#include <stddef.h>
#include <stdint.h>

#include "rv_common.h"
#include "kernels/rv_ops.h"

/* at most this many rows per state go to the streaming kernels, more to the tiled ones */
#define RV_KV_STREAM_ROWS 8

/* One sequence's queries in a batched attention call. */
typedef struct rv_kv_query {
    int seq;            /* the cache's slot of the sequence */
    int q_len;          /* query tokens; with causal masking they are the last q_len tokens */
    int64_t kv_len;     /* tokens of the sequence in this layer */
    const float *q;     /* [q_len, num_heads, head_dim] float32 */
    float *out;         /* [q_len, num_heads, head_dim] float32 */
} rv_kv_query;

typedef struct rv_kv_source rv_kv_source;

/* Fold keys [t0, t1) of sequence `seq` into states[0 .. nh) of KV heads h0 .. h0 + nh - 1
 * (same rows and head_dim; one scratch, states[0].scratch, serves them all). Row r sees key t
 * iff row_pos == NULL or t <= row_pos[r] (rows are ordered by query token, so row_pos is
 * non-decreasing). `extra` is the per-thread scratch the source asked for. */
typedef void (*rv_kv_fold_fn)(const rv_kv_source *src, int seq, int h0, int nh, int64_t t0, int64_t t1,
                              rv_attn_state *states, const int64_t *row_pos, int *vis, float *extra,
                              const rv_ops *ops);

struct rv_kv_source {
    const void *cache;
    int layer;
    int num_heads, num_kv_heads, head_dim;
    rv_kv_fold_fn fold;
    /* floats of per-thread scratch `fold` needs for states of `rows` rows (may be NULL) */
    size_t (*extra_floats)(const rv_kv_source *src, int rows);
    /* granularity the context splits align to (tokens; e.g. a cold group), >= 1 */
    int split_align;
};

/* Visible counts of a chunk of n keys starting at absolute token a, for rows at row_pos:
 * NULL when every row sees the whole chunk (the fast path of the kernels). */
RV_INLINE const int *rv_kv_visible(const int64_t *row_pos, int rows, int64_t a, int64_t n, int *vis)
{
    if (row_pos == NULL || a + n - 1 <= row_pos[0])
        return NULL;
    for (int r = 0; r < rows; r++) {
        int64_t c = row_pos[r] + 1 - a;
        vis[r] = c <= 0 ? 0 : (c >= n ? (int)n : (int)c);
    }
    return vis;
}

/* Fold K/V spans (fp16 or fp32 rows, see rv_kv_span) into st with the kernel table's
 * attention: attend_spans_* for a few rows (decode), attend_rows_* tiles merged into st for
 * many (prefill). visible[r] counts keys over the whole span list (NULL: all). scratch:
 * rv_kv_span_scratch_floats(rows, head_dim) floats, 64-byte aligned. */
size_t rv_kv_span_scratch_floats(int rows, int head_dim);
void rv_kv_fold_spans(rv_attn_state *st, const rv_kv_span *spans, int nspans, const int *visible,
                      int f16, float *scratch, const rv_ops *ops);

/* out of every query = softmax(scale q k^T + causal mask) v over the source's keys.
 * RV_OK, RV_ENOMEM (scratch) or RV_EINVAL (shapes). Threads: nthreads (>= 1). */
int rv_kv_attend(const rv_kv_source *src, const rv_kv_query *queries, int nq, float scale,
                 int causal, const rv_ops *ops, int nthreads);

#endif
