/* The attention scheduler: ruvpy's one driver for every attention call, whatever holds the
 * K/V. A KV *source* describes the storage by a `fold` callback that folds keys [t0, t1) of
 * one sequence into the online-softmax states of a range of KV heads, straight out of its
 * memory: contiguous (strided) NHD tensors (ruvpy.attention, defined here), a paged cache's
 * blocks, a two-tier cache's hot ring and quantized cold groups (csrc/kvcache). The scheduler
 * does everything else, once for all of them:
 *  - packs and scales the query rows of each KV head's GQA group (queries may be strided);
 *  - tiles long query runs (prefill) and skips causally hidden key ranges;
 *  - splits long contexts across threads (flash-decoding) and merges the splits;
 *  - picks its team size from the work (rv_threads.h), in ONE OpenMP region per call.
 * Decode-sized tiles (at most RV_STREAM_MAX_ROWS rows per KV head) fold every KV head of a
 * sequence in one task, so a source can stream its memory in address order (all heads of a
 * block together); prefill tiles fold one head per task.
 *
 * Memory: a call is planned first (rv_attn_plan_make: team size, task count, bytes of shared
 * and per-thread scratch); it then runs in caller-provided scratch (rv_scratch, e.g. a
 * Runtime's ScratchSpace) or, when none is given, in a per-calling-thread buffer that grows
 * to the largest call and is kept. Either way the steady state allocates nothing. */
#ifndef RV_ATTENTION_H
#define RV_ATTENTION_H

#include <stddef.h>
#include <stdint.h>

#include "rv_common.h"
#include "kernels/rv_ops.h"
#include "memory/rv_memory.h"

/* ---- the tuning constants (one set for every source) ---- */
/* at most this many query rows per KV head go to the streaming kernels (decode) */
#define RV_STREAM_MAX_ROWS 8
/* prefill: query rows per tile (reuse of each K/V chunk vs accumulators in L1/L2) */
#define RV_TILE_ROWS RV_ATTN_TILE_ROWS
/* no context split shorter than this many keys */
#define RV_MIN_SPLIT_KEYS 256
/* work items per thread to aim for (balance when other processes take a core) */
#define RV_ITEMS_PER_THREAD 4

/* One sequence's queries. Strides are in floats; a head's head_dim floats are contiguous. */
typedef struct rv_kv_query {
    int seq;               /* the source's sequence (a cache's slot; 0 for tensors) */
    int q_len;             /* query tokens; with causal masking they are the last q_len keys */
    int64_t kv_len;        /* keys of the sequence */
    const float *q;        /* token i, head h at q + i * q_tok + h * q_head */
    ptrdiff_t q_tok, q_head;
    float *out;            /* likewise, float32 */
    ptrdiff_t o_tok, o_head;
} rv_kv_query;

typedef struct rv_kv_source rv_kv_source;

/* Fold keys [t0, t1) of sequence `seq` into states[0 .. nh) of KV heads h0 .. h0 + nh - 1
 * (same rows and head_dim; one kernel scratch, states[0].scratch, serves them all). Row r
 * sees key t iff row_pos == NULL or t <= row_pos[r] (rows are ordered by query token, so
 * row_pos is non-decreasing). `extra` is the per-thread scratch the source asked for. */
typedef void (*rv_kv_fold_fn)(const rv_kv_source *src, int seq, int h0, int nh, int64_t t0, int64_t t1,
                              rv_attn_state *states, const int64_t *row_pos, int *vis, float *extra,
                              const rv_ops *ops);

struct rv_kv_source {
    const void *data;      /* the cache, or an rv_kv_tensors */
    int layer;
    int num_heads, num_kv_heads, head_dim;
    int kv_elem_bytes;     /* bytes a K/V value costs to read, for the team size: 4 (fp32), 2
                              (fp16, and compressed tiers: dequantizing costs about what the
                              bytes saved would have) */
    rv_kv_fold_fn fold;
    /* floats of per-thread scratch `fold` needs for states of `rows` rows (may be NULL) */
    size_t (*extra_floats)(const rv_kv_source *src, int rows);
    /* granularity context splits align to (tokens: a block, a cold group), >= 1 */
    int split_align;
};

/* Contiguous K/V: [kv_len, num_kv_heads, head_dim] float32 or binary16, strides in elements. */
typedef struct rv_kv_tensors {
    const void *k, *v;
    ptrdiff_t k_tok, k_head, v_tok, v_head;
    int f16;
} rv_kv_tensors;

/* The source of contiguous tensors t (which must outlive the source). */
void rv_kv_source_tensors(rv_kv_source *src, const rv_kv_tensors *t, int num_heads, int num_kv_heads,
                          int head_dim);

/* A planned call: sizes only (the task list is rebuilt in scratch by rv_attn_run). */
typedef struct rv_attn_plan {
    int nthreads;          /* the team the call runs on (1: the calling thread alone) */
    int64_t ntasks;
    size_t shared_bytes;   /* scratch every thread reads: tasks, split partial states */
    size_t thread_bytes;   /* scratch of each thread */
    /* internal */
    int group, tile_tokens, per_tile, min_per_tile, align, rows_max, nh_max;
    size_t qpack_max, states_max, st_structs, extra, npartial;
} rv_attn_plan;

/* Plan queries[0 .. nq) over src (only their q_len and kv_len are read) on at most nthreads
 * threads. RV_OK, or RV_EINVAL (shapes: causal q_len > kv_len, kv_len < 1, bad heads). */
int rv_attn_plan_make(rv_attn_plan *plan, const rv_kv_source *src, const rv_kv_query *queries, int nq,
                      int causal, int nthreads);

/* out of every query = softmax(scale q k^T + causal mask) v over the source's keys, as
 * planned (the queries' q_len / kv_len must be those planned). scratch: at least the plan's
 * bytes (RV_EINVAL if it is smaller), or NULL for the calling thread's cached buffer
 * (RV_ENOMEM if that cannot grow). RV_ETHREAD (nothing computed): the plan's OpenMP workers
 * could not be started (rv_threads.h). */
int rv_attn_run(const rv_attn_plan *plan, const rv_kv_source *src, const rv_kv_query *queries, int nq,
                float scale, int causal, const rv_ops *ops, const rv_scratch *scratch);

/* Grow the calling thread's cached buffer to what rv_attn_run(plan, ..., scratch NULL) takes,
 * so a caller can fail (RV_ENOMEM) before it changes anything: a run on this thread then
 * needs no allocation. RV_OK or RV_ENOMEM. */
int rv_attn_reserve(const rv_attn_plan *plan);

/* rv_attn_plan_make + rv_attn_run. */
int rv_kv_attend(const rv_kv_source *src, const rv_kv_query *queries, int nq, float scale, int causal,
                 const rv_ops *ops, int nthreads, const rv_scratch *scratch);

/* ---- helpers for sources ---- */

/* Visible counts of a chunk of n keys starting at absolute key a, for rows at row_pos: NULL
 * when every row sees the whole chunk (the kernels' fast path). */
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

/* Fold K/V spans (fp16 or fp32 rows, see rv_kv_span) into st with the kernel table:
 * attend_spans_* for a few rows (decode), attend_rows_* tiles merged into st for many
 * (prefill). visible[r] counts keys over the whole span list (NULL: all). scratch:
 * rv_kv_span_scratch_floats(rows, head_dim) floats, 64-byte aligned. */
size_t rv_kv_span_scratch_floats(int rows, int head_dim);
void rv_kv_fold_spans(rv_attn_state *st, const rv_kv_span *spans, int nspans, const int *visible,
                      int f16, float *scratch, const rv_ops *ops);

/* ---- the functional API (ruvpy.attention) over contiguous tensors ---- */

typedef struct rv_attn_args {
    const float *q;         /* [q_len, num_heads, head_dim], strides in elements */
    ptrdiff_t q_tok, q_head;
    const void *k;          /* [kv_len, num_kv_heads, head_dim], float or binary16 */
    ptrdiff_t k_tok, k_head;
    const void *v;
    ptrdiff_t v_tok, v_head;
    float *out;             /* [q_len, num_heads, head_dim] */
    ptrdiff_t o_tok, o_head;
    int q_len, kv_len, num_heads, num_kv_heads, head_dim;
    int kv_f16;             /* K and V are binary16 */
    int causal;             /* query i sits at kv_len - q_len + i and sees keys 0..that */
    float scale;
} rv_attn_args;

/* RV_OK, RV_EINVAL (inconsistent arguments), RV_ENOMEM (scratch) or RV_ETHREAD (workers, as
 * rv_attn_run). scratch as rv_attn_run. */
int rv_attention(const rv_ops *ops, int nthreads, const rv_attn_args *a, const rv_scratch *scratch);

/* Threads rv_attention uses for a (its shape fields only) when given nthreads. */
int rv_attention_threads(int nthreads, const rv_attn_args *a);

/* The calling thread's cached scratch: free it / its bytes now. */
void rv_attention_release_scratch(void);
size_t rv_attention_scratch_bytes(void);

/* Reads `bytes` of buf with nthreads threads (each a contiguous share) into a checksum *sum;
 * time it to measure the machine's read bandwidth. RV_OK, or RV_ETHREAD (workers). */
int rv_stream_read(const void *buf, size_t bytes, int nthreads, uint64_t *sum);

#endif
