/* The attention scheduler (see rv_attention.h). ISA-independent: all arithmetic on K/V goes
 * through the kernel table; this file plans, schedules and merges. */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "attention/rv_attention.h"
#include "rv_limits.h"
#include "rv_thread_block.h"
#include "rv_threads.h"

#ifdef _OPENMP
#include <omp.h>
#define RV_THREAD_ID() omp_get_thread_num()
#else
#define RV_THREAD_ID() 0
#endif

static int imin(int a, int b) { return a < b ? a : b; }
static int64_t i64min(int64_t a, int64_t b) { return a < b ? a : b; }

/* One work item: KV heads [h0, h0 + nh) of query tokens [i0, i1) of query qi, keys [t0, t1). */
typedef struct {
    int qi;
    int h0, nh;
    int i0, i1;
    int64_t t0, t1;
    int nsplit;          /* pieces of its (query, tile, heads) unit, on the first piece; others 0 */
    size_t partial;      /* split: float offset of this piece's nh states in the partials */
} kv_task;

/* m (rows), l (rows), acc (rows x d) laid out in one float run */
static size_t state_floats(int rows, int d) { return rv_pad16((size_t)rows) * 2 + rv_pad16((size_t)rows * d); }

static void state_init(rv_attn_state *st, float *base, int rows, int d, const float *q, float *scratch)
{
    const size_t r16 = rv_pad16((size_t)rows);
    *st = (rv_attn_state){.rows = rows, .head_dim = d, .q = q, .q_stride = d, .m = base, .l = base + r16,
                          .acc = base + 2 * r16, .scratch = scratch};
    rv_attn_state_clear(st->m, st->l, st->acc, rows, d);
}

/* ---- folding spans (shared by the sources) ---- */

size_t rv_kv_span_scratch_floats(int rows, int head_dim)
{
    if (rows <= RV_STREAM_MAX_ROWS)
        return 0;
    int block = rows < RV_ATTN_TILE_ROWS ? rows : RV_ATTN_TILE_ROWS;
    return rv_pad16(RV_ATTN_TILE_SCRATCH_FLOATS(head_dim)) + rv_pad16((size_t)block * head_dim) +
           2 * rv_pad16((size_t)block) + rv_pad16(2 * (size_t)block * sizeof(void *) / sizeof(float) + 1);
}

void rv_kv_fold_spans(rv_attn_state *st, const rv_kv_span *spans, int nspans, const int *visible,
                      int f16, float *scratch, const rv_ops *ops)
{
    const int d = st->head_dim;
    if (st->rows <= RV_STREAM_MAX_ROWS) {
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

/* ---- the contiguous source ---- */

static size_t tensors_extra_floats(const rv_kv_source *src, int rows)
{
    return rv_kv_span_scratch_floats(rows, src->head_dim);
}

static const void *elem_at(const void *base, int f16, ptrdiff_t elems)
{
    return (const char *)base + elems * (f16 ? 2 : 4);
}

static void tensors_fold(const rv_kv_source *src, int seq, int h0, int nh, int64_t t0, int64_t t1,
                         rv_attn_state *states, const int64_t *row_pos, int *vis, float *extra,
                         const rv_ops *ops)
{
    (void)seq;
    const rv_kv_tensors *T = (const rv_kv_tensors *)src->data;
    const int rows = states[0].rows, n = (int)(t1 - t0);
    const int *vv = rv_kv_visible(row_pos, rows, t0, n, vis);
    const void *k = elem_at(T->k, T->f16, h0 * T->k_head + (ptrdiff_t)t0 * T->k_tok);
    const void *v = elem_at(T->v, T->f16, h0 * T->v_head + (ptrdiff_t)t0 * T->v_tok);
    if (rows <= RV_STREAM_MAX_ROWS) {
        /* decode: every head of a block of tokens together (heads interleave in NHD pages) */
        const rv_kv_span span = {k, v, T->k_tok, T->v_tok, n};
        (T->f16 ? ops->attend_heads_f16 : ops->attend_heads_f32)(states, nh, &span, 1, T->k_head, T->v_head, vv);
        return;
    }
    for (int j = 0; j < nh; j++) {
        rv_kv_span span = {elem_at(k, T->f16, j * T->k_head), elem_at(v, T->f16, j * T->v_head), T->k_tok,
                           T->v_tok, n};
        rv_kv_fold_spans(&states[j], &span, 1, vv, T->f16, extra, ops);
    }
}

void rv_kv_source_tensors(rv_kv_source *src, const rv_kv_tensors *t, int num_heads, int num_kv_heads,
                          int head_dim)
{
    *src = (rv_kv_source){.data = t, .layer = 0, .num_heads = num_heads, .num_kv_heads = num_kv_heads,
                          .head_dim = head_dim, .kv_elem_bytes = t->f16 ? 2 : 4, .fold = tensors_fold,
                          .extra_floats = tensors_extra_floats, .split_align = 1};
}

/* ---- planning ---- */

static int64_t tile_key_end(const rv_kv_query *q, int i1, int causal)
{
    return causal ? q->kv_len - q->q_len + i1 : q->kv_len;
}

static int head_begin(int g, int hg, int KVH) { return (int)((int64_t)KVH * g / hg); }

/* The units of one query tile: head groups *hg, context pieces *nsplit of *piece keys. */
static void plan_tile(const rv_attn_plan *p, int rows, int KVH, int64_t kend, int *hg, int *nsplit, int64_t *piece)
{
    const int64_t most = kend / RV_MIN_SPLIT_KEYS > 1 ? kend / RV_MIN_SPLIT_KEYS : 1;
    const int T = p->nthreads;
    if (rows <= RV_STREAM_MAX_ROWS) {
        /* every head in one task, so a source streams each page once for all of them; split
         * the context for the threads (a multiple of the team, for even shares) and split the
         * heads only while there are fewer pieces than the tile must give the team */
        int s = (int)i64min(p->per_tile, most);
        if (T > 1 && s >= T)
            s -= s % T;
        *nsplit = s;
        *hg = s < p->min_per_tile ? imin(KVH, (p->min_per_tile + s - 1) / s) : 1;
    } else {   /* a head per task */
        *hg = KVH;
        const int want = (p->per_tile + KVH - 1) / KVH;
        *nsplit = (int)i64min(want, most);
    }
    *piece = kend;
    if (*nsplit > 1) {
        int64_t len = (kend + *nsplit - 1) / *nsplit;
        len = (len + p->align - 1) / p->align * p->align;
        *nsplit = (int)((kend + len - 1) / len);
        *piece = len;
    }
}

/* Walk the plan's units: count (tasks == NULL) or fill the tasks. Returns the task count and
 * the floats of partial states in *partial_floats. */
static int64_t walk_plan(rv_attn_plan *p, const rv_kv_source *src, const rv_kv_query *queries, int nq, int causal,
                         kv_task *tasks, size_t *partial_floats)
{
    const int KVH = src->num_kv_heads, d = src->head_dim, g = p->group, tq = p->tile_tokens;
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
            plan_tile(p, rows, KVH, kend, &hg, &nsplit, &piece);
            for (int gi = 0; gi < hg; gi++) {
                const int h0 = head_begin(gi, hg, KVH), nh = head_begin(gi + 1, hg, KVH) - h0;
                if (!tasks) {
                    size_t qp = (size_t)nh * rv_pad16((size_t)rows * d), sf = (size_t)nh * state_floats(rows, d);
                    p->rows_max = rows > p->rows_max ? rows : p->rows_max;
                    p->nh_max = nh > p->nh_max ? nh : p->nh_max;
                    p->qpack_max = qp > p->qpack_max ? qp : p->qpack_max;
                    p->states_max = sf > p->states_max ? sf : p->states_max;
                }
                for (int sp = 0; sp < nsplit; sp++, k++) {
                    if (tasks) {
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
    *partial_floats = off;
    return k;
}

int rv_attn_plan_make(rv_attn_plan *p, const rv_kv_source *src, const rv_kv_query *queries, int nq, int causal,
                      int nthreads)
{
    const int H = src->num_heads, KVH = src->num_kv_heads, d = src->head_dim;
    memset(p, 0, sizeof *p);
    p->nthreads = 1;
    if (KVH <= 0 || H < KVH || H % KVH != 0 || d <= 0 || nq < 0)
        return RV_EINVAL;
    const int g = H / KVH;
    int64_t ntiles = 0, pairs = 0, kv_tokens = 0;
    p->group = g;
    p->tile_tokens = g >= RV_TILE_ROWS ? 1 : RV_TILE_ROWS / g;
    for (int qi = 0; qi < nq; qi++) {
        const rv_kv_query *q = &queries[qi];
        if (q->q_len < 0 || (q->q_len > 0 && q->kv_len <= 0) || (causal && q->q_len > q->kv_len))
            return RV_EINVAL;
        ntiles += (q->q_len + p->tile_tokens - 1) / p->tile_tokens;
        pairs += (int64_t)q->q_len * q->kv_len - (causal ? (int64_t)q->q_len * (q->q_len - 1) / 2 : 0);
        kv_tokens += q->q_len > 0 ? q->kv_len : 0;
    }
    if (ntiles == 0)
        return RV_OK;
    /* small calls run on the calling thread (rv_threads.h) */
    const int T = rv_attn_team_size(nthreads, H, KVH, d, pairs, kv_tokens, src->kv_elem_bytes);
    p->nthreads = T;
    /* a few pieces per thread (balance under load), at least one per thread */
    const int64_t want = T > 1 ? (int64_t)RV_ITEMS_PER_THREAD * T : 1;
    p->per_tile = (int)((want + ntiles - 1) / ntiles);
    p->min_per_tile = (int)((T + ntiles - 1) / ntiles);
    int align = src->split_align > 0 ? src->split_align : 1;
    if (align < RV_ATTN_CHUNK)
        align *= (RV_ATTN_CHUNK + align - 1) / align;
    p->align = align;
    p->rows_max = p->nh_max = 1;
    p->qpack_max = p->states_max = 1;
    p->ntasks = walk_plan(p, src, queries, nq, causal, NULL, &p->npartial);
    p->extra = src->extra_floats ? rv_pad16(src->extra_floats(src, p->rows_max)) : 0;
    p->st_structs = rv_pad16(sizeof(rv_attn_state) * (size_t)p->nh_max / sizeof(float) + 1);
    /* per thread: packed scaled queries and states of its heads, the state structs, row
     * positions (int64), visible counts, the kernels' scratch and the source's */
    const size_t per_thread = p->qpack_max + p->states_max + p->st_structs + rv_pad16((size_t)p->rows_max * 2) +
                              rv_pad16((size_t)p->rows_max) + rv_pad16(RV_ATTN_SCRATCH_FLOATS(p->rows_max, d)) +
                              p->extra;
    p->thread_bytes = sizeof(float) * per_thread;
    p->shared_bytes = rv_pad16(sizeof(kv_task) * (size_t)p->ntasks / sizeof(float) + 1) * sizeof(float) +
                      sizeof(float) * p->npartial;
    return RV_OK;
}

/* ---- the calling thread's cached scratch (when the caller gives none): rv_thread_block.h ---- */
void rv_attention_release_scratch(void) { rv_thread_block_release(); }

size_t rv_attention_scratch_bytes(void) { return rv_thread_block_bytes(); }

/* the plan's scratch in the calling thread's cached block: its shared part, and the threads'
 * parts `*stride` bytes apart after it; NULL when the block cannot grow */
static unsigned char *own_scratch(const rv_attn_plan *p, size_t *stride)
{
    *stride = (p->thread_bytes + RV_ALIGN - 1) / RV_ALIGN * RV_ALIGN;
    return rv_thread_block(p->shared_bytes + *stride * (size_t)p->nthreads);
}

int rv_attn_reserve(const rv_attn_plan *p)
{
    size_t stride;
    return p->ntasks == 0 || own_scratch(p, &stride) ? RV_OK : RV_ENOMEM;
}

/* ---- running ---- */

/* pack and scale the query rows of KV heads h0.. of tokens [i0, i1): rows (token, head in group) */
static void pack_queries(const rv_kv_query *q, int h0, int nh, int i0, int i1, int g, int d, float scale,
                         float *qpack, size_t per_head)
{
    for (int j = 0; j < nh; j++)
        for (int i = i0; i < i1; i++)
            for (int r = 0; r < g; r++) {
                const float *src = q->q + i * q->q_tok + (ptrdiff_t)((h0 + j) * g + r) * q->q_head;
                float *dst = qpack + (size_t)j * per_head + ((size_t)(i - i0) * g + r) * d;
                for (int c = 0; c < d; c++)
                    dst[c] = src[c] * scale;
            }
}

/* out rows of query tokens [i0, i1), KV head h (its g query heads) from a state */
static void finalize(const rv_kv_query *q, int h, int i0, int i1, int g, int d, const float *l, const float *acc,
                     const rv_ops *ops)
{
    for (int i = i0; i < i1; i++) {
        const int r = (i - i0) * g;
        ops->attn_finalize(g, d, l + r, acc + (size_t)r * d, q->out + i * q->o_tok + (ptrdiff_t)h * g * q->o_head,
                           q->o_head);
    }
}

int rv_attn_run(const rv_attn_plan *p, const rv_kv_source *src, const rv_kv_query *queries, int nq, float scale,
                int causal, const rv_ops *ops, const rv_scratch *scratch)
{
    if (p->ntasks == 0)
        return RV_OK;
    const int g = p->group, d = src->head_dim, T = p->nthreads;
    unsigned char *shared, *threads;
    size_t stride;
    if (scratch) {
        if (!rv_scratch_fits(scratch, p->shared_bytes, p->thread_bytes, T))
            return RV_EINVAL;
        shared = scratch->shared;
        threads = scratch->threads;
        stride = scratch->thread_stride;
    } else {
        shared = own_scratch(p, &stride);
        if (!shared)
            return RV_ENOMEM;
        threads = shared + p->shared_bytes;
    }
    kv_task *tasks = (kv_task *)shared;
    float *partials = (float *)shared + rv_pad16(sizeof(kv_task) * (size_t)p->ntasks / sizeof(float) + 1);
    size_t npartial;
    rv_attn_plan plan = *p;   /* walk_plan only reads it when filling */
    if (walk_plan(&plan, src, queries, nq, causal, tasks, &npartial) != p->ntasks || npartial != p->npartial)
        return RV_EINVAL;   /* the queries are not the ones planned */
    const int64_t ntasks = p->ntasks;
    const size_t qpack_max = p->qpack_max, states_max = p->states_max, st_structs = p->st_structs;
    const size_t rows_max = (size_t)p->rows_max;
    const int team = rv_team_start(T);       /* last: nothing may fail after it (rv_threads.h) */
    if (team != RV_OK)
        return team;

#pragma omp parallel num_threads(T) if (T > 1)
    {
        float *qpack = (float *)(threads + stride * (size_t)RV_THREAD_ID());
        float *own = qpack + qpack_max;
        rv_attn_state *states = (rv_attn_state *)(own + states_max);
        int64_t *row_pos = (int64_t *)((float *)states + st_structs);
        int *vis = (int *)((float *)row_pos + rv_pad16(rows_max * 2));
        float *kscratch = (float *)vis + rv_pad16(rows_max);
        float *xscratch = kscratch + rv_pad16(RV_ATTN_SCRATCH_FLOATS((int)rows_max, d));
        /* causal: the longest tiles (last query tokens, planned last) first, for a balanced finish */
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < ntasks; it++) {
            const kv_task *t = &tasks[causal ? ntasks - 1 - it : it];
            const rv_kv_query *q = &queries[t->qi];
            const int rows = (t->i1 - t->i0) * g;
            const size_t sf = state_floats(rows, d), qf = rv_pad16((size_t)rows * d);
            const int split = t->nsplit != 1;
            float *state_mem = split ? partials + t->partial : own;
            pack_queries(q, t->h0, t->nh, t->i0, t->i1, g, d, scale, qpack, qf);
            for (int j = 0; j < t->nh; j++)
                state_init(&states[j], state_mem + (size_t)j * sf, rows, d, qpack + (size_t)j * qf, kscratch);
            for (int i = t->i0; i < t->i1; i++)
                for (int r = 0; r < g; r++)
                    row_pos[(i - t->i0) * g + r] = q->kv_len - q->q_len + i;
            src->fold(src, q->seq, t->h0, t->nh, t->t0, t->t1, states, causal ? row_pos : NULL, vis, xscratch, ops);
            if (!split)
                for (int j = 0; j < t->nh; j++)
                    finalize(q, t->h0 + j, t->i0, t->i1, g, d, states[j].l, states[j].acc, ops);
        }
        /* implicit barrier: every piece is done. Merge each split unit into its first piece. */
        if (npartial) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t ti = 0; ti < ntasks; ti++) {
                const kv_task *t = &tasks[ti];
                if (t->nsplit <= 1)
                    continue;
                const rv_kv_query *q = &queries[t->qi];
                const int rows = (t->i1 - t->i0) * g;
                const size_t sf = state_floats(rows, d), unit = (size_t)t->nh * sf, r16 = rv_pad16((size_t)rows);
                for (int j = 0; j < t->nh; j++) {
                    float *m = partials + t->partial + (size_t)j * sf, *l = m + r16, *acc = m + 2 * r16;
                    for (int sp = 1; sp < t->nsplit; sp++) {
                        const float *o = m + sp * unit;
                        ops->attn_merge(rows, d, m, l, acc, o, o + r16, o + 2 * r16);
                    }
                    finalize(q, t->h0 + j, t->i0, t->i1, g, d, l, acc, ops);
                }
            }
        }
    }
    return RV_OK;
}

int rv_kv_attend(const rv_kv_source *src, const rv_kv_query *queries, int nq, float scale, int causal,
                 const rv_ops *ops, int nthreads, const rv_scratch *scratch)
{
    rv_attn_plan plan;
    int rc = rv_attn_plan_make(&plan, src, queries, nq, causal, nthreads);
    return rc != RV_OK ? rc : rv_attn_run(&plan, src, queries, nq, scale, causal, ops, scratch);
}

/* ---- the functional API ---- */

static int args_valid(const rv_attn_args *a)
{
    return a && a->q_len >= 0 && a->kv_len >= 1 && a->kv_len <= RV_MAX_KV_LEN && a->num_kv_heads >= 1 &&
           a->num_heads >= a->num_kv_heads && a->num_heads % a->num_kv_heads == 0 && a->head_dim >= 1 &&
           a->head_dim <= RV_MAX_HEAD_DIM && !(a->causal && a->q_len > a->kv_len);
}

static void args_source(const rv_attn_args *a, rv_kv_tensors *t, rv_kv_source *src, rv_kv_query *q)
{
    *t = (rv_kv_tensors){a->k, a->v, a->k_tok, a->k_head, a->v_tok, a->v_head, a->kv_f16};
    rv_kv_source_tensors(src, t, a->num_heads, a->num_kv_heads, a->head_dim);
    *q = (rv_kv_query){0, a->q_len, a->kv_len, a->q, a->q_tok, a->q_head, a->out, a->o_tok, a->o_head};
}

int rv_attention_threads(int nthreads, const rv_attn_args *a)
{
    const int64_t q = a->q_len, kv = a->kv_len;
    const int64_t pairs = a->causal ? q * kv - q * (q - 1) / 2 : q * kv;
    return rv_attn_team_size(nthreads, a->num_heads, a->num_kv_heads, a->head_dim, pairs, kv, a->kv_f16 ? 2 : 4);
}

int rv_attention(const rv_ops *ops, int nthreads, const rv_attn_args *a, const rv_scratch *scratch)
{
    if (!ops || !args_valid(a))
        return RV_EINVAL;
    if (a->q_len == 0)
        return RV_OK;
    rv_kv_tensors t;
    rv_kv_source src;
    rv_kv_query q;
    args_source(a, &t, &src, &q);
    return rv_kv_attend(&src, &q, 1, a->scale, a->causal, ops, nthreads, scratch);
}

int rv_stream_read(const void *buf, size_t bytes, int nthreads, uint64_t *sum)
{
    const uint64_t *p = (const uint64_t *)buf;
    const size_t n = bytes / sizeof(uint64_t);
    uint64_t total = 0;
    if (nthreads < 1)
        nthreads = 1;
    const int team = rv_team_start(nthreads);
    if (team != RV_OK)
        return team;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
#ifdef _OPENMP
        const size_t t = (size_t)omp_get_thread_num(), nt = (size_t)omp_get_num_threads();
#else
        const size_t t = 0, nt = 1;
#endif
        size_t i = n * t / nt, hi = n * (t + 1) / nt;
        uint64_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};   /* independent sums: the loads run freely */
        for (; i + 8 <= hi; i += 8)
            for (int j = 0; j < 8; j++)
                s[j] += p[i + j];
        for (; i < hi; i++)
            s[0] += p[i];
        for (int j = 0; j < 8; j++)
            total += s[j];
    }
    *sum = total;
    return RV_OK;
}
