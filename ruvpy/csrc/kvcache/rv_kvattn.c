/* The KV-cache attention driver (see rv_kvattn.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvcache/rv_kvattn.h"
#include "kvcache/rv_kvmem.h"
#include "rv_threads.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* Query rows per state in prefill: enough to reuse each K/V chunk across many rows, few
 * enough that the accumulators (rows x head_dim floats) stay in L1/L2. */
#define KV_TILE_ROWS 64
/* The shortest context piece worth a thread of its own. */
#define KV_MIN_SPLIT 512

typedef struct {
    int qi;
    int h0, nh;          /* KV heads h0 .. h0 + nh - 1 */
    int i0, i1;          /* query tokens [i0, i1) of query qi */
    int64_t t0, t1;      /* keys */
    int nsplit;          /* pieces of this (query, tile, heads) unit, on its first piece; the
                            other pieces have 0 */
    size_t partial;      /* split: float offset of this piece's nh states */
} kv_task;


/* m (rows), l (rows), acc (rows x d) laid out in one float run */
static size_t state_floats(int rows, int d) { return rv_pad16((size_t)rows) * 2 + rv_pad16((size_t)rows * d); }

static void state_init(rv_attn_state *st, float *base, int rows, int d, const float *q, float *scratch)
{
    st->rows = rows;
    st->head_dim = d;
    st->q = q;
    st->q_stride = d;
    st->scratch = scratch;
    st->m = base;
    st->l = base + rv_pad16((size_t)rows);
    st->acc = base + 2 * rv_pad16((size_t)rows);
    rv_attn_state_clear(st->m, st->l, st->acc, rows, d);
}

size_t rv_kv_span_scratch_floats(int rows, int head_dim)
{
    if (rows <= RV_KV_STREAM_ROWS)
        return 0;
    int block = rows < RV_ATTN_TILE_ROWS ? rows : RV_ATTN_TILE_ROWS;
    return rv_pad16(RV_ATTN_TILE_SCRATCH_FLOATS(head_dim)) + rv_pad16((size_t)block * head_dim) +
           2 * rv_pad16((size_t)block) + rv_pad16(2 * (size_t)block * sizeof(void *) / sizeof(float) + 1);
}

void rv_kv_fold_spans(rv_attn_state *st, const rv_kv_span *spans, int nspans, const int *visible,
                      int f16, float *scratch, const rv_ops *ops)
{
    const int d = st->head_dim;
    if (st->rows <= RV_KV_STREAM_ROWS) {
        (f16 ? ops->attend_spans_f16 : ops->attend_spans_f32)(st, spans, nspans, visible);
        return;
    }
    /* tiles of up to RV_ATTN_TILE_ROWS rows: complete attention over the spans (normalised,
     * with its m and l), merged into the state as acc = out * l */
    const int block = st->rows < RV_ATTN_TILE_ROWS ? st->rows : RV_ATTN_TILE_ROWS;
    float *tile = scratch, *out = tile + rv_pad16(RV_ATTN_TILE_SCRATCH_FLOATS(d));
    float *m = out + rv_pad16((size_t)block * d), *l = m + rv_pad16((size_t)block);
    const float **qrow = (const float **)(l + rv_pad16((size_t)block));
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

/* the unit plan of one query tile: head groups and context pieces */
static void plan_tile(int rows, int KVH, int64_t kend, int per_tile, int align, int *hg, int *nsplit,
                      int64_t *piece)
{
    int64_t most = kend / KV_MIN_SPLIT > 1 ? kend / KV_MIN_SPLIT : 1;
    if (rows <= RV_KV_STREAM_ROWS) {     /* every head in one task unless threads need more */
        *nsplit = per_tile < most ? per_tile : (int)most;
        int g = (per_tile + *nsplit - 1) / *nsplit;
        *hg = g < KVH ? g : KVH;
    } else {                             /* a head per task */
        *hg = KVH;
        int want = (per_tile + KVH - 1) / KVH;
        *nsplit = want < most ? want : (int)most;
    }
    *piece = kend;
    if (*nsplit > 1) {
        int64_t p = (kend + *nsplit - 1) / *nsplit;
        p = (p + align - 1) / align * align;
        *nsplit = (int)((kend + p - 1) / p);
        *piece = p;
    }
}

static int head_begin(int g, int hg, int KVH) { return (int)((int64_t)KVH * g / hg); }

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

    int64_t ntiles = 0, pairs = 0, kv_tokens = 0;
    for (int qi = 0; qi < nq; qi++) {
        const rv_kv_query *q = &queries[qi];
        if (q->q_len <= 0 || q->kv_len <= 0 || (causal && q->q_len > q->kv_len))
            return RV_EINVAL;
        ntiles += (q->q_len + tq - 1) / tq;
        pairs += (int64_t)q->q_len * q->kv_len - (causal ? (int64_t)q->q_len * (q->q_len - 1) / 2 : 0);
        kv_tokens += q->kv_len;
    }
    /* small calls run on the calling thread (rv_threads.h); every format counts as fp16 */
    nthreads = rv_attn_team_size(nthreads, H, KVH, d, pairs, kv_tokens, 2);
    /* enough pieces for every thread to have a few (balance under load) */
    const int64_t want = nthreads > 1 ? 4 * (int64_t)nthreads : 1;
    const int per_tile = (int)((want + ntiles - 1) / ntiles);
    int align = src->split_align > 0 ? src->split_align : 1;
    if (align < RV_ATTN_CHUNK)
        align *= (RV_ATTN_CHUNK + align - 1) / align;

    /* two passes over the plan: count, then fill */
    int64_t ntasks = 0;
    size_t npartial = 0, qpack_max = 1, states_max = 1;
    int rows_max = 1, nh_max = 1;
    for (int pass = 0; pass < 2; pass++) {
        int64_t k = 0;
        size_t off = 0;
        for (int qi = 0; qi < nq; qi++) {
            const rv_kv_query *q = &queries[qi];
            for (int i0 = 0; i0 < q->q_len; i0 += tq) {
                const int i1 = i0 + tq < q->q_len ? i0 + tq : q->q_len;
                const int rows = (i1 - i0) * g;
                const int64_t kend = tile_key_end(q, i1, causal);
                int hg, nsplit;
                int64_t piece;
                plan_tile(rows, KVH, kend, per_tile, align, &hg, &nsplit, &piece);
                for (int gi = 0; gi < hg; gi++) {
                    const int h0 = head_begin(gi, hg, KVH), nh = head_begin(gi + 1, hg, KVH) - h0;
                    if (pass == 0) {
                        rows_max = rows > rows_max ? rows : rows_max;
                        nh_max = nh > nh_max ? nh : nh_max;
                        size_t qp = (size_t)nh * rv_pad16((size_t)rows * d), sf = (size_t)nh * state_floats(rows, d);
                        qpack_max = qp > qpack_max ? qp : qpack_max;
                        states_max = sf > states_max ? sf : states_max;
                    }
                    for (int sp = 0; sp < nsplit; sp++, k++) {
                        if (pass == 1) {
                            kv_task *t = &tasks[k];
                            t->qi = qi;
                            t->h0 = h0;
                            t->nh = nh;
                            t->i0 = i0;
                            t->i1 = i1;
                            t->t0 = (int64_t)sp * piece;
                            t->t1 = t->t0 + piece < kend ? t->t0 + piece : kend;
                            t->nsplit = sp == 0 ? nsplit : 0;
                            t->partial = off;
                        }
                        if (nsplit > 1)
                            off += (size_t)nh * state_floats(rows, d);
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

    /* per thread: packed scaled queries and states of its heads, the state structs, row
     * positions, visible counts, the kernels' scratch and the source's */
    size_t extra = src->extra_floats ? rv_pad16(src->extra_floats(src, rows_max)) : 0;
    const size_t st_structs = rv_pad16(sizeof(rv_attn_state) * (size_t)nh_max / sizeof(float) + 1);
    const size_t per_thread = qpack_max + states_max + st_structs + rv_pad16((size_t)rows_max * 2) /* int64 pos */
                              + rv_pad16((size_t)rows_max) /* int vis */ +
                              rv_pad16(RV_ATTN_SCRATCH_FLOATS(rows_max, d)) + extra;
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
        float *qpack = thread_scratch + per_thread * (size_t)tid;
        float *own = qpack + qpack_max;
        rv_attn_state *states = (rv_attn_state *)(own + states_max);
        int64_t *row_pos = (int64_t *)((float *)states + st_structs);
        int *vis = (int *)((float *)row_pos + rv_pad16((size_t)rows_max * 2));
        float *kscratch = (float *)vis + rv_pad16((size_t)rows_max);
        float *xscratch = kscratch + rv_pad16(RV_ATTN_SCRATCH_FLOATS(rows_max, d));
        const int rows = (t->i1 - t->i0) * g;
        const size_t sf = state_floats(rows, d), qf = rv_pad16((size_t)rows * d);
        const int split = t->nsplit != 1;
        float *state_mem = split ? partials + t->partial : own;

        for (int j = 0; j < t->nh; j++) {
            float *qp = qpack + (size_t)j * qf;
            for (int i = t->i0; i < t->i1; i++) {
                const float *qrow = q->q + ((size_t)i * H + (size_t)(t->h0 + j) * g) * d;
                float *dst = qp + (size_t)(i - t->i0) * g * d;
                for (size_t c = 0; c < (size_t)g * d; c++)
                    dst[c] = qrow[c] * scale;
            }
            state_init(&states[j], state_mem + (size_t)j * sf, rows, d, qp, kscratch);
        }
        for (int i = t->i0; i < t->i1; i++)
            for (int r = 0; r < g; r++)
                row_pos[(i - t->i0) * g + r] = q->kv_len - q->q_len + i;
        src->fold(src, q->seq, t->h0, t->nh, t->t0, t->t1, states, causal ? row_pos : NULL, vis, xscratch, ops);
        if (!split)
            for (int j = 0; j < t->nh; j++)
                for (int i = t->i0; i < t->i1; i++) {
                    int r = (i - t->i0) * g;
                    ops->attn_finalize(g, d, states[j].l + r, states[j].acc + (size_t)r * d,
                                       q->out + ((size_t)i * H + (size_t)(t->h0 + j) * g) * d, d);
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
            const int rows = (t->i1 - t->i0) * g;
            const size_t sf = state_floats(rows, d), unit = (size_t)t->nh * sf;
            for (int j = 0; j < t->nh; j++) {
                float *m = partials + t->partial + (size_t)j * sf, *l = m + rv_pad16((size_t)rows);
                float *acc = m + 2 * rv_pad16((size_t)rows);
                for (int sp = 1; sp < t->nsplit; sp++) {
                    const float *o = m + sp * unit;
                    ops->attn_merge(rows, d, m, l, acc, o, o + rv_pad16((size_t)rows), o + 2 * rv_pad16((size_t)rows));
                }
                for (int i = t->i0; i < t->i1; i++) {
                    int r = (i - t->i0) * g;
                    ops->attn_finalize(g, d, l + r, acc + (size_t)r * d,
                                       q->out + ((size_t)i * H + (size_t)(t->h0 + j) * g) * d, d);
                }
            }
        }
    }

done:
    free(tasks);
    rv_kv_free(thread_scratch);
    rv_kv_free(partials);
    return status;
}
