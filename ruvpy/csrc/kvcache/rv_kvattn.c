/* The KV-cache attention driver (see rv_kvattn.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvcache/rv_kvattn.h"
#include "kvcache/rv_kvmem.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* Query rows per state in prefill: enough to reuse each K/V chunk across many rows, few
 * enough that the accumulators (rows x head_dim floats) stay in L1/L2. */
#define KV_TILE_ROWS 64
/* The shortest context piece worth a thread of its own. */
#define KV_MIN_SPLIT 512
/* Below this many multiply-adds a call runs on the calling thread: a parallel region costs
 * more than it saves. */
#define KV_PARALLEL_WORK ((int64_t)1 << 17)

typedef struct {
    int qi, head;
    int i0, i1;          /* query tokens [i0, i1) of query qi */
    int64_t t0, t1;      /* keys */
    int nsplit;          /* pieces of this (query, head, tile) unit; the task is piece 0 .. */
    size_t partial;      /* nsplit > 1: float offset of this piece's (m, l, acc) */
} kv_task;

static size_t pad16(size_t n) { return (n + 15) & ~(size_t)15; }

/* m (rows), l (rows), acc (rows x d) laid out in one float run */
static size_t state_floats(int rows, int d) { return pad16((size_t)rows) * 2 + pad16((size_t)rows * d); }

static void state_init(rv_attn_state *st, float *base, int rows, int d)
{
    st->m = base;
    st->l = base + pad16((size_t)rows);
    st->acc = base + 2 * pad16((size_t)rows);
    for (int r = 0; r < rows; r++) {
        st->m[r] = -INFINITY;
        st->l[r] = 0.0f;
    }
    memset(st->acc, 0, sizeof(float) * (size_t)rows * d);
}

/* at most this many rows go to the streaming kernel (attend_spans_*), more to the tiles */
#define KV_STREAM_MAX_ROWS 8

size_t rv_kv_span_scratch_floats(int rows, int head_dim)
{
    if (rows <= KV_STREAM_MAX_ROWS)
        return 0;
    int block = rows < RV_ATTN_TILE_ROWS ? rows : RV_ATTN_TILE_ROWS;
    return pad16(RV_ATTN_TILE_SCRATCH_FLOATS(head_dim)) + pad16((size_t)block * head_dim) +
           2 * pad16((size_t)block) + pad16(2 * (size_t)block * sizeof(void *) / sizeof(float) + 1);
}

void rv_kv_fold_spans(rv_attn_state *st, const rv_kv_span *spans, int nspans, const int *visible,
                      int f16, float *scratch, const rv_ops *ops)
{
    const int d = st->head_dim;
    if (st->rows <= KV_STREAM_MAX_ROWS) {
        (f16 ? ops->attend_spans_f16 : ops->attend_spans_f32)(st, spans, nspans, visible);
        return;
    }
    /* tiles of up to RV_ATTN_TILE_ROWS rows: complete attention over the spans (normalised,
     * with its m and l), merged into the state as acc = out * l */
    const int block = st->rows < RV_ATTN_TILE_ROWS ? st->rows : RV_ATTN_TILE_ROWS;
    float *tile = scratch, *out = tile + pad16(RV_ATTN_TILE_SCRATCH_FLOATS(d));
    float *m = out + pad16((size_t)block * d), *l = m + pad16((size_t)block);
    const float **qrow = (const float **)(l + pad16((size_t)block));
    float **orow = (float **)(qrow + block);
    for (int r0 = 0; r0 < st->rows; r0 += block) {
        const int rows = st->rows - r0 < block ? st->rows - r0 : block;
        for (int r = 0; r < rows; r++) {
            qrow[r] = st->q + (r0 + r) * st->q_stride;
            orow[r] = out + (size_t)r * d;
        }
        rv_attn_rows job = {rows, d, 1.0f /* st->q is scaled already */, qrow, orow,
                            visible ? visible + r0 : NULL, spans, nspans, m, l};
        (f16 ? ops->attend_rows_f16 : ops->attend_rows_f32)(&job, tile);
        for (int r = 0; r < rows; r++)
            ops->scale_f32((size_t)d, l[r], out + (size_t)r * d);
        ops->attn_merge(rows, d, st->m + r0, st->l + r0, st->acc + (size_t)r0 * d, m, l, out);
    }
}

static int64_t tile_key_end(const rv_kv_query *q, int i1, int causal)
{
    return causal ? q->kv_len - q->q_len + i1 : q->kv_len;
}

int rv_kv_attend(const rv_kv_source *src, const rv_kv_query *queries, int nq, float scale,
                 int causal, const rv_ops *ops, int nthreads)
{
    const int H = src->num_heads, KVH = src->num_kv_heads, d = src->head_dim;
    if (nq <= 0)
        return RV_OK;
    if (KVH <= 0 || H % KVH != 0 || d <= 0)
        return RV_EINVAL;
    const int g = H / KVH;
    const int tq = g >= KV_TILE_ROWS ? 1 : KV_TILE_ROWS / g;
    int status = RV_OK;
    kv_task *tasks = NULL;
    float *partials = NULL, *thread_scratch = NULL;

    /* units = (query, kv head, tile); how many, and how much work in all */
    int64_t units = 0, work = 0;
    for (int qi = 0; qi < nq; qi++) {
        const rv_kv_query *q = &queries[qi];
        if (q->q_len <= 0 || q->kv_len <= 0 || (causal && q->q_len > q->kv_len))
            return RV_EINVAL;
        units += (int64_t)KVH * ((q->q_len + tq - 1) / tq);
        work += (int64_t)q->q_len * g * KVH * q->kv_len * d;
    }
    if (nthreads < 1 || work < KV_PARALLEL_WORK)
        nthreads = 1;
    /* split long contexts until every thread has a few tasks to balance */
    int64_t want_tasks = nthreads > 1 ? 4 * (int64_t)nthreads : 1;
    int split_for = (int)((want_tasks + units - 1) / units);
    int align = src->split_align > 0 ? src->split_align : 1;
    if (align < RV_ATTN_CHUNK)
        align *= (RV_ATTN_CHUNK + align - 1) / align;

    int64_t ntasks = 0;
    size_t npartial = 0;
    int rows_cap = 1;
    for (int pass = 0; pass < 2; pass++) {
        int64_t k = 0;
        size_t off = 0;
        for (int qi = 0; qi < nq; qi++) {
            const rv_kv_query *q = &queries[qi];
            for (int i0 = 0; i0 < q->q_len; i0 += tq) {
                int i1 = i0 + tq < q->q_len ? i0 + tq : q->q_len;
                int rows = (i1 - i0) * g;
                if (rows > rows_cap)
                    rows_cap = rows;
                int64_t kend = tile_key_end(q, i1, causal);
                int nsplit = 1;
                int64_t piece = kend;
                if (split_for > 1 && kend >= 2 * KV_MIN_SPLIT) {
                    int64_t most = kend / KV_MIN_SPLIT;
                    nsplit = split_for < most ? split_for : (int)most;
                    piece = (kend + nsplit - 1) / nsplit;
                    piece = (piece + align - 1) / align * align;
                    nsplit = (int)((kend + piece - 1) / piece);
                }
                for (int h = 0; h < KVH; h++) {
                    for (int s = 0; s < nsplit; s++, k++) {
                        if (pass == 1) {
                            kv_task *t = &tasks[k];
                            t->qi = qi;
                            t->head = h;
                            t->i0 = i0;
                            t->i1 = i1;
                            t->t0 = (int64_t)s * piece;
                            t->t1 = t->t0 + piece < kend ? t->t0 + piece : kend;
                            t->nsplit = s == 0 ? nsplit : 0;
                            t->partial = off;
                        }
                        if (nsplit > 1)
                            off += state_floats(rows, d);
                    }
                }
            }
        }
        if (pass == 0) {
            ntasks = k;
            npartial = off;
            tasks = (kv_task *)malloc(sizeof(kv_task) * (size_t)ntasks);
            if (!tasks)
                return RV_ENOMEM;
        }
    }

    /* per thread: packed scaled queries, one state, row positions, visible counts, the
     * kernel's scratch and the source's */
    const int rows = rows_cap;
    size_t extra = src->extra_floats ? pad16(src->extra_floats(src, rows)) : 0;
    size_t per_thread = pad16((size_t)rows * d) + state_floats(rows, d) + pad16((size_t)rows * 2) /* int64 pos */
                        + pad16((size_t)rows) /* int vis */ + pad16(RV_ATTN_SCRATCH_FLOATS(rows, d)) + extra;
    thread_scratch = (float *)rv_kv_alloc(sizeof(float) * per_thread * (size_t)nthreads);
    if (npartial)
        partials = (float *)rv_kv_alloc(sizeof(float) * npartial);
    if (!thread_scratch || (npartial && !partials)) {
        status = RV_ENOMEM;
        goto done;
    }

#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1)
    for (int64_t ti = 0; ti < ntasks; ti++) {
        const kv_task *t = &tasks[ti];
        const rv_kv_query *q = &queries[t->qi];
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float *base = thread_scratch + per_thread * (size_t)tid;
        float *qpack = base;
        float *own_state = qpack + pad16((size_t)rows * d);
        int64_t *row_pos = (int64_t *)(own_state + state_floats(rows, d));
        int *vis = (int *)((float *)row_pos + pad16((size_t)rows * 2));
        float *kscratch = (float *)vis + pad16((size_t)rows);
        float *xscratch = kscratch + pad16(RV_ATTN_SCRATCH_FLOATS(rows, d));
        const int trows = (t->i1 - t->i0) * g;
        /* is this task one piece of a split unit? (the unit's first piece carries nsplit) */
        int split = t->nsplit != 1;

        for (int i = t->i0; i < t->i1; i++) {
            const float *qrow = q->q + ((size_t)i * H + (size_t)t->head * g) * d;
            float *dst = qpack + (size_t)(i - t->i0) * g * d;
            for (size_t c = 0; c < (size_t)g * d; c++)
                dst[c] = qrow[c] * scale;
            for (int j = 0; j < g; j++)
                row_pos[(i - t->i0) * g + j] = q->kv_len - q->q_len + i;
        }
        rv_attn_state st;
        st.rows = trows;
        st.head_dim = d;
        st.q = qpack;
        st.q_stride = d;
        st.scratch = kscratch;
        state_init(&st, split ? partials + t->partial : own_state, trows, d);
        src->fold(src, q->seq, t->head, t->t0, t->t1, &st, causal ? row_pos : NULL, vis, xscratch, ops);
        if (!split) {
            for (int i = t->i0; i < t->i1; i++) {
                int r = (i - t->i0) * g;
                ops->attn_finalize(g, d, st.l + r, st.acc + (size_t)r * d,
                                   q->out + ((size_t)i * H + (size_t)t->head * g) * d, d);
            }
        }
    }

    if (npartial) {
        /* merge the pieces of every split unit into its first piece, then finalize */
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (nthreads > 1)
        for (int64_t ti = 0; ti < ntasks; ti++) {
            const kv_task *t = &tasks[ti];
            if (t->nsplit <= 1)
                continue;
            const rv_kv_query *q = &queries[t->qi];
            const int trows = (t->i1 - t->i0) * g;
            const size_t sf = state_floats(trows, d);
            float *m = partials + t->partial, *l = m + pad16((size_t)trows), *acc = m + 2 * pad16((size_t)trows);
            for (int s = 1; s < t->nsplit; s++) {
                const float *o = partials + t->partial + s * sf;
                ops->attn_merge(trows, d, m, l, acc, o, o + pad16((size_t)trows), o + 2 * pad16((size_t)trows));
            }
            for (int i = t->i0; i < t->i1; i++) {
                int r = (i - t->i0) * g;
                ops->attn_finalize(g, d, l + r, acc + (size_t)r * d,
                                   q->out + ((size_t)i * H + (size_t)t->head * g) * d, d);
            }
        }
    }

done:
    free(tasks);
    rv_kv_free(thread_scratch);
    rv_kv_free(partials);
    return status;
}
