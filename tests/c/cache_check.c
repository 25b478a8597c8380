/* C-level driver of the KV caches, run natively and under qemu-aarch64: the paged cache, the
 * two-tier cache with every cold format of the codec table, the attention scheduler over
 * both, and the encoders behind them -- the code the kernel-table check (kernel_check.c)
 * never runs. On AArch64 `char` is unsigned and the NEON kernels meet the caches' layouts;
 * tests/test_cache_drivers.py compares what this program reports on every ISA against float64
 * references and against the other architecture.
 *
 *   cache_check SCRIPT OUT ISA     run the operations of SCRIPT on ISA's kernel table,
 *                                  writing what they report to OUT
 *
 * Output on stdout: "table ISA", "FAIL op I: why" per operation whose status was not the one
 * the script expects, then "done OPS FAILED". Exit 0 if nothing failed, 1 if something did, 2
 * for a malformed script, 77 if the CPU (or this binary) lacks ISA.
 *
 * SCRIPT (little-endian, written by tests/c/cache_harness.py): operations back to back, each
 *   "RVOP" u32 | u32 op | 8 x i64 args | u32 n_arrays | n_arrays x (u32 dtype | u64 count |
 *   count elements)           dtype: 0 f32, 1 u16, 2 i32, 3 f64, 4 u8, 5 i64 (DT_* below)
 * OUT: records back to back, each  u32 op index | u32 field | u32 dtype | u64 count | elements.
 * Sequences are named by script ids (0 .. MAX_IDS-1), mapped here to the cache's slots. The
 * cold format is named by its entry in the codec table (rv_codecs), never assumed: a format
 * added to or changed in that table is driven the same way. */
#define _DEFAULT_SOURCE
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attention/rv_attention.h"
#include "kernels/rv_ops.h"
#include "kvcache/rv_codec.h"
#include "kvcache/rv_paged.h"
#include "kvcache/rv_twotier.h"
#include "memory/rv_memory.h"

enum { DT_F32 = 0, DT_U16 = 1, DT_I32 = 2, DT_F64 = 3, DT_U8 = 4, DT_I64 = 5, DT_COUNT };
static const size_t dt_size[DT_COUNT] = {4, 2, 4, 8, 1, 8};

enum {
    OP_PAGED = 1,      /* layers, kv_heads, head_dim, block_size, num_blocks, dtype */
    OP_TWOTIER,        /* layers, kv_heads, head_dim, hot, group_tokens, group_size, max_tokens,
                          pool | arrays: codec name (u8), bits (f64) */
    OP_ADD,            /* id */
    OP_FORK,           /* parent, child, expect */
    OP_RELEASE,        /* id */
    OP_BEGIN,          /* id, expect */
    OP_COMMIT,         /* id */
    OP_ROLLBACK,       /* id */
    OP_APPEND,         /* id, layer, n, src_dtype (0 f32, 1 f16), expect | k, v */
    OP_ROOM,           /* layer, evict, expect | ids (i64), n (i64): two-tier make_room (its
                          code is `expect`); paged: emits the free blocks needed (field 0) */
    OP_EVICT,          /* id, n (two-tier) */
    OP_TRUNCATE,       /* id, n, expect */
    OP_READ,           /* id, layer: emits k (0), v (1) as float32 */
    OP_ATTEND,         /* id, layer, heads, q_len, causal | q (f32): emits out (0) */
    OP_EXPORT,         /* id, layer: two-tier: blobs (0), sizes (1), skip/cut/hot_len (2), hot k
                          (3), hot v (4); paged: the stored K (3), V (4). Kept for OP_IMPORT. */
    OP_IMPORT,         /* id (freshly added), layer, expect, shorten, room | optional arrays as
                          OP_EXPORT emits (else the layer's last export; paged: K and V only):
                          see op_import */
    OP_STATS,          /* emits counters (0) and per id the length of each layer (1; -1: dead)
                          and the two-tier cold length (2) */
    OP_COUNT
};

#define MAX_IDS 16
#define MAX_ARRAYS 8

typedef struct {
    uint32_t dtype;
    uint64_t count;
    void *data;
} array;

typedef struct {
    uint32_t op;
    int64_t a[8];
    int n;
    array arr[MAX_ARRAYS];
} op_t;

/* one layer's export */
typedef struct {
    unsigned char *blobs;
    int64_t *sizes, ngroups;
    int32_t skip, cut;
    void *hot_k, *hot_v;         /* two-tier hot tokens (binary16) or paged stored K/V */
    int64_t hot_len;
    int hot_f16;
} export_t;

#define MAX_LAYERS 8

typedef struct {
    rv_paged *paged;
    rv_tt *tt;
    rv_pool *pool;
    int slot[MAX_IDS];           /* -1: no sequence */
    export_t exported[MAX_LAYERS];   /* each layer's last export */
} state;

static FILE *out_file;
static uint32_t op_index;

static void emit(uint32_t field, uint32_t dtype, uint64_t count, const void *data)
{
    uint32_t head[3] = {op_index, field, dtype};
    fwrite(head, 4, 3, out_file);
    fwrite(&count, 8, 1, out_file);
    if (count)
        fwrite(data, dt_size[dtype], count, out_file);
}

static int read_op(FILE *f, op_t *o)
{
    char magic[4];
    size_t got = fread(magic, 1, 4, f);
    if (got == 0)
        return 0;
    uint32_t n;
    if (got != 4 || memcmp(magic, "RVOP", 4) || fread(&o->op, 4, 1, f) != 1 || fread(o->a, 8, 8, f) != 8 ||
        fread(&n, 4, 1, f) != 1 || n > MAX_ARRAYS)
        return -1;
    o->n = (int)n;
    for (int i = 0; i < o->n; i++) {
        array *a = &o->arr[i];
        if (fread(&a->dtype, 4, 1, f) != 1 || a->dtype >= DT_COUNT || fread(&a->count, 8, 1, f) != 1 ||
            a->count > ((uint64_t)1 << 32))
            return -1;
        a->data = malloc(a->count * dt_size[a->dtype] + 1);
        if (!a->data || fread(a->data, dt_size[a->dtype], a->count, f) != a->count)
            return -1;
    }
    return 1;
}

static void free_op(op_t *o)
{
    for (int i = 0; i < o->n; i++)
        free(o->arr[i].data);
    memset(o, 0, sizeof *o);
}

static void drop_export(export_t *e)
{
    free(e->blobs);
    free(e->sizes);
    free(e->hot_k);
    free(e->hot_v);
    memset(e, 0, sizeof *e);
}

static void drop_cache(state *s)
{
    if (s->paged)
        rv_paged_destroy(s->paged);
    if (s->tt)
        rv_tt_destroy(s->tt);
    if (s->pool)      /* after the cache: its groups go back to the pool */
        rv_pool_destroy(s->pool);
    s->paged = NULL;
    s->tt = NULL;
    s->pool = NULL;
    for (int i = 0; i < MAX_IDS; i++)
        s->slot[i] = -1;
    for (int l = 0; l < MAX_LAYERS; l++)
        drop_export(&s->exported[l]);
}

static int num_layers(const state *s) { return s->paged ? s->paged->num_layers : s->tt->num_layers; }
static int row_elems(const state *s)
{
    return s->paged ? (int)s->paged->row_elems : s->tt->num_kv_heads * s->tt->head_dim;
}

static int64_t seq_len(const state *s, int slot, int layer)
{
    if (s->tt)
        return rv_tt_len(s->tt, slot, layer);
    const rv_paged_seq *q = &s->paged->seqs[slot];
    return q->ntok[layer];
}

/* the codec table's index of `name` (-1: no such format) */
static int codec_index(const array *name)
{
    for (int i = 0; i < RV_CODEC_COUNT; i++)
        if (strlen(rv_codecs[i]->name) == name->count && !memcmp(rv_codecs[i]->name, name->data, name->count))
            return i;
    return -1;
}

static int create_twotier(state *s, const op_t *o)
{
    rv_tt_params p;
    memset(&p, 0, sizeof p);
    p.num_layers = (int)o->a[0];
    p.num_kv_heads = (int)o->a[1];
    p.head_dim = (int)o->a[2];
    p.hot_tokens = (int)o->a[3];
    p.group_tokens = (int)o->a[4];
    p.group_size = (int)o->a[5];
    p.max_tokens = o->a[6];
    p.cold = codec_index(&o->arr[0]);
    p.turbo_bits = *(const double *)o->arr[1].data;
    if (p.cold < 0)
        return RV_EINVAL;
    int rc = rv_tt_create(&s->tt, &p);
    if (rc != RV_OK || !o->a[7])
        return rc;
    /* cold groups from a pool class sized for the largest blob, as a Runtime sets it up */
    size_t bytes = rv_align_up(rv_tt_group_alloc_bytes(&p, 1)), keep = 64, added;
    s->pool = rv_pool_create_classes(&bytes, &keep, 1);
    if (!s->pool)
        return RV_ENOMEM;
    rc = rv_pool_prewarm(s->pool, 0, 8, &added);
    if (rc == RV_OK)
        rv_tt_use_pool(s->tt, s->pool, 0);
    return rc;
}

static int append(state *s, int slot, int layer, const void *k, const void *v, int64_t n, int src_dtype,
                  const rv_ops *ops)
{
    if (s->tt)
        return rv_tt_append(s->tt, slot, layer, k, v, n, src_dtype, ops);
    return rv_paged_append(s->paged, slot, layer, k, v, n, src_dtype, ops);
}

static int op_room(state *s, const op_t *o)
{
    const int nseq = (int)o->arr[0].count;
    int slots[MAX_IDS];
    if (nseq > MAX_IDS || o->arr[1].count != (uint64_t)nseq)
        return RV_EINVAL;
    for (int i = 0; i < nseq; i++)
        slots[i] = s->slot[((const int64_t *)o->arr[0].data)[i]];
    const int64_t *n = (const int64_t *)o->arr[1].data;
    if (s->paged) {
        int64_t needed = rv_paged_blocks_needed(s->paged, nseq, slots, n, (int)o->a[0]);
        emit(0, DT_I64, 1, &needed);
        return RV_OK;
    }
    int bind = -1;
    return rv_tt_make_room(s->tt, slots, n, nseq, (int)o->a[0], (int)o->a[1], &bind);
}

static void op_read(state *s, int slot, int layer, const rv_ops *ops)
{
    const int64_t len = seq_len(s, slot, layer);
    const size_t count = (size_t)len * (size_t)row_elems(s);
    float *k = malloc(count * 4 + 4), *v = malloc(count * 4 + 4);
    if (s->tt)
        rv_tt_read(s->tt, slot, layer, k, v, ops);
    else
        rv_paged_read(s->paged, slot, layer, k, v, 1, ops);
    emit(0, DT_F32, count, k);
    emit(1, DT_F32, count, v);
    free(k);
    free(v);
}

static int op_attend(state *s, const op_t *o, const rv_ops *ops)
{
    const int slot = s->slot[o->a[0]], layer = (int)o->a[1], heads = (int)o->a[2], q_len = (int)o->a[3];
    const int d = s->paged ? s->paged->head_dim : s->tt->head_dim;
    if (o->n != 1 || o->arr[0].count != (uint64_t)q_len * heads * d)
        return RV_EINVAL;
    rv_kv_source src;
    if (s->tt)
        rv_tt_source(s->tt, layer, heads, &src);
    else
        rv_paged_source(s->paged, layer, heads, &src);
    float *out = malloc((size_t)q_len * heads * d * 4 + 4);
    rv_kv_query q = {.seq = slot, .q_len = q_len, .kv_len = seq_len(s, slot, layer),
                     .q = (const float *)o->arr[0].data, .q_tok = (ptrdiff_t)heads * d, .q_head = d,
                     .out = out, .o_tok = (ptrdiff_t)heads * d, .o_head = d};
    int rc = rv_kv_attend(&src, &q, 1, 1.0f / sqrtf((float)d), (int)o->a[4], ops, 1, NULL);
    if (rc == RV_OK)
        emit(0, DT_F32, (uint64_t)q_len * heads * d, out);
    free(out);
    return rc;
}

static int op_export(state *s, int slot, int layer, const rv_ops *ops)
{
    export_t *e = &s->exported[layer];
    drop_export(e);
    const size_t row = (size_t)row_elems(s);
    if (s->paged) {
        const size_t elem = s->paged->elem;
        e->hot_len = seq_len(s, slot, layer);
        e->hot_f16 = elem == 2;
        e->hot_k = malloc((size_t)e->hot_len * row * elem + 4);
        e->hot_v = malloc((size_t)e->hot_len * row * elem + 4);
        rv_paged_read(s->paged, slot, layer, e->hot_k, e->hot_v, 0, ops);
        emit(3, e->hot_f16 ? DT_U16 : DT_F32, (uint64_t)e->hot_len * row, e->hot_k);
        emit(4, e->hot_f16 ? DT_U16 : DT_F32, (uint64_t)e->hot_len * row, e->hot_v);
        return RV_OK;
    }
    e->ngroups = rv_tt_export_groups(s->tt, slot, layer);
    const size_t bytes = rv_tt_export_bytes(s->tt, slot, layer);
    e->hot_len = rv_tt_len(s->tt, slot, layer) - rv_tt_cold_len(s->tt, slot, layer);
    e->hot_f16 = 1;
    e->blobs = malloc(bytes + 1);
    e->sizes = malloc((size_t)e->ngroups * 8 + 8);
    e->hot_k = malloc((size_t)e->hot_len * row * 2 + 2);
    e->hot_v = malloc((size_t)e->hot_len * row * 2 + 2);
    rv_tt_export_layer(s->tt, slot, layer, e->blobs, e->sizes, &e->skip, &e->cut, e->hot_k, e->hot_v);
    const int64_t meta[3] = {e->skip, e->cut, e->hot_len};
    emit(0, DT_U8, bytes, e->blobs);
    emit(1, DT_I64, (uint64_t)e->ngroups, e->sizes);
    emit(2, DT_I64, 3, meta);
    emit(3, DT_U16, (uint64_t)e->hot_len * row, e->hot_k);
    emit(4, DT_U16, (uint64_t)e->hot_len * row, e->hot_v);
    return RV_OK;
}

/* Fills layer `layer` of the empty sequence `slot` from an export: the script's arrays, or
 * the layer's last export. As ruvpy's import does: the blobs are validated first, the tokens
 * must fit the budget (RV_EFULL) -- here, with `room`, after the eviction policy made room
 * for them as it would for appended tokens. */
static int op_import(state *s, const op_t *o, const rv_ops *ops)
{
    const int slot = s->slot[o->a[0]], layer = (int)o->a[1];
    const int64_t shorten = o->a[3];
    const int room = (int)o->a[4];
    const size_t row = (size_t)row_elems(s);
    export_t e = s->exported[layer];
    if (o->n) {
        const int f = s->paged ? 0 : 3;     /* a paged import has only K and V */
        if (o->n != f + 2)
            return -100;
        e.hot_k = o->arr[f].data;
        e.hot_v = o->arr[f + 1].data;
        e.hot_f16 = o->arr[f].dtype == DT_U16;
        e.hot_len = (int64_t)(o->arr[f].count / row);
        if (!s->paged) {
            const int64_t *meta = (const int64_t *)o->arr[2].data;
            e.blobs = o->arr[0].data;
            e.sizes = o->arr[1].data;
            e.ngroups = (int64_t)o->arr[1].count;
            if (o->arr[2].count != 3 || meta[2] != e.hot_len)
                return -100;
            e.skip = (int32_t)meta[0];
            e.cut = (int32_t)meta[1];
        }
    }
    if (s->paged)
        return rv_paged_append(s->paged, slot, layer, e.hot_k, e.hot_v, e.hot_len, e.hot_f16, ops);
    size_t off = 0;
    for (int64_t g = 0; g < e.ngroups; g++) {
        const int64_t bytes = e.sizes[g] - (g == 0 ? shorten : 0);   /* a damaged file: cut short */
        if (rv_tt_validate_blob(s->tt, layer, e.blobs + off, (size_t)bytes) != 0)
            return RV_EINVAL;
        off += (size_t)e.sizes[g];
    }
    /* the slots it is charged: its own copy of every group, whole (a skip or cut frees none) */
    int64_t length = e.ngroups * s->tt->group_tokens + e.hot_len;
    int bind;
    if (room && rv_tt_make_room(s->tt, &slot, &length, 1, layer, 1, &bind) != RV_TT_ROOM_OK)
        return RV_EFULL;
    if (s->tt->used[layer] + length > s->tt->max_tokens)
        return RV_EFULL;
    return rv_tt_import_layer(s->tt, slot, layer, e.blobs, e.sizes, e.ngroups, e.skip, e.cut, e.hot_k, e.hot_v,
                              e.hot_len, ops);
}

static void op_stats(state *s)
{
    int64_t counters[16] = {0};
    int nc = 0;
    const int L = num_layers(s);
    if (s->paged) {
        rv_paged_stats st;
        rv_paged_get_stats(s->paged, &st);
        counters[nc++] = st.blocks_used;
        counters[nc++] = st.blocks_shared;
        counters[nc++] = st.blocks_free;
        counters[nc++] = st.slots_used;
        counters[nc++] = st.tokens_stored;
    } else {
        counters[nc++] = s->tt->cold_groups;
        counters[nc++] = s->tt->shared_groups;
        counters[nc++] = s->tt->evicted;
        for (int l = 0; l < L && nc < 16; l++)
            counters[nc++] = s->tt->used[l];
    }
    emit(0, DT_I64, (uint64_t)nc, counters);
    int64_t *lens = malloc(sizeof(int64_t) * 2 * MAX_IDS * (size_t)L);
    for (int i = 0; i < MAX_IDS; i++)
        for (int l = 0; l < L; l++) {
            const int slot = s->slot[i];
            lens[i * L + l] = slot < 0 ? -1 : seq_len(s, slot, l);
            lens[(MAX_IDS + i) * L + l] = slot < 0 || !s->tt ? -1 : rv_tt_cold_len(s->tt, slot, l);
        }
    emit(1, DT_I64, (uint64_t)MAX_IDS * L, lens);
    emit(2, DT_I64, (uint64_t)MAX_IDS * L, lens + MAX_IDS * L);
    free(lens);
}

/* RV_OK or an RV_* status (compared with the script's expectation by the caller); -100: the
 * operation does not apply (malformed script) */
static int run_op(state *s, const op_t *o, const rv_ops *ops, int64_t *expect)
{
    const int64_t *a = o->a;
    *expect = RV_OK;
    if (o->op != OP_PAGED && o->op != OP_TWOTIER && !s->paged && !s->tt)
        return -100;
    /* every operation but these names a sequence by its script id in a[0] (a fork: the child's in a[1]) */
    const int takes_id = o->op != OP_PAGED && o->op != OP_TWOTIER && o->op != OP_ROOM && o->op != OP_STATS;
    if (takes_id && (a[0] < 0 || a[0] >= MAX_IDS || (o->op == OP_FORK && (a[1] < 0 || a[1] >= MAX_IDS))))
        return -100;
    const int slot = takes_id ? s->slot[a[0]] : -1;
    if (takes_id && (o->op == OP_ADD) != (slot < 0))
        return -100;     /* adding a live id, or naming a dead one */
    switch (o->op) {
    case OP_PAGED:
        drop_cache(s);
        return rv_paged_create(&s->paged, (int)a[0], (int)a[1], (int)a[2], (int)a[3], a[4], (int)a[5]);
    case OP_TWOTIER:
        drop_cache(s);
        return o->n == 2 ? create_twotier(s, o) : -100;
    case OP_ADD: {
        int got = -1, rc = s->tt ? rv_tt_add(s->tt, &got) : rv_paged_add(s->paged, &got);
        s->slot[a[0]] = got;
        return rc;
    }
    case OP_FORK: {
        int got = -1;
        *expect = a[2];
        int rc = s->tt ? rv_tt_fork(s->tt, slot, &got) : rv_paged_fork(s->paged, slot, &got);
        if (rc == RV_OK)
            s->slot[a[1]] = got;
        return rc;
    }
    case OP_RELEASE:
        if (s->tt)
            rv_tt_release(s->tt, slot);
        else
            rv_paged_release(s->paged, slot);
        s->slot[a[0]] = -1;
        return RV_OK;
    case OP_BEGIN:
        *expect = a[1];
        return s->tt ? rv_tt_begin(s->tt, slot) : rv_paged_begin(s->paged, slot);
    case OP_COMMIT:
        if (s->tt)
            rv_tt_commit(s->tt, slot, ops);
        else
            rv_paged_commit(s->paged, slot);
        return RV_OK;
    case OP_ROLLBACK:
        if (s->tt)
            rv_tt_rollback(s->tt, slot);
        else
            rv_paged_rollback(s->paged, slot);
        return RV_OK;
    case OP_APPEND: {
        *expect = a[4];
        const size_t count = (size_t)a[2] * (size_t)row_elems(s);
        const uint32_t dt = a[3] ? DT_U16 : DT_F32;
        if (o->n != 2 || o->arr[0].count != count || o->arr[1].count != count || o->arr[0].dtype != dt)
            return -100;
        return append(s, slot, (int)a[1], o->arr[0].data, o->arr[1].data, a[2], (int)a[3], ops);
    }
    case OP_ROOM:
        *expect = a[2];
        return o->n == 2 ? op_room(s, o) : -100;
    case OP_EVICT:
        if (!s->tt)
            return -100;
        rv_tt_evict(s->tt, slot, a[1]);
        return RV_OK;
    case OP_TRUNCATE:
        *expect = a[2];
        return s->tt ? rv_tt_truncate(s->tt, slot, a[1]) : rv_paged_truncate(s->paged, slot, a[1]);
    case OP_READ:
        op_read(s, slot, (int)a[1], ops);
        return RV_OK;
    case OP_ATTEND:
        return op_attend(s, o, ops);
    case OP_EXPORT:
        return a[1] >= 0 && a[1] < MAX_LAYERS ? op_export(s, slot, (int)a[1], ops) : -100;
    case OP_IMPORT:
        *expect = a[2];
        return a[1] >= 0 && a[1] < MAX_LAYERS ? op_import(s, o, ops) : -100;
    case OP_STATS:
        op_stats(s);
        return RV_OK;
    }
    return -100;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s SCRIPT OUT ISA\n", argv[0]);
        return 2;
    }
    const int isa = rv_isa_from_name(argv[3]);
    if (isa < 0 || !rv_isa_supported(isa)) {
        printf("unsupported %s\n", argv[3]);
        return 77;
    }
    const rv_ops *ops = rv_ops_for(isa);
    FILE *f = fopen(argv[1], "rb");
    out_file = fopen(argv[2], "wb");
    if (!f || !out_file) {
        fprintf(stderr, "cannot open %s or %s\n", argv[1], argv[2]);
        return 2;
    }
    printf("table %s\n", rv_isa_name(isa));
    state s;
    memset(&s, 0, sizeof s);
    drop_cache(&s);
    int failed = 0, r;
    op_t o;
    memset(&o, 0, sizeof o);
    for (op_index = 0; (r = read_op(f, &o)) == 1; op_index++) {
        int64_t expect;
        const int rc = run_op(&s, &o, ops, &expect);
        if (rc == -100) {
            printf("malformed op %u (%u)\n", op_index, o.op);
            return 2;
        }
        if (rc != expect) {
            printf("FAIL op %u (%u): status %d, expected %lld\n", op_index, o.op, rc, (long long)expect);
            failed++;
        }
        free_op(&o);
    }
    if (r < 0) {
        printf("malformed script at op %u\n", op_index);
        return 2;
    }
    drop_cache(&s);
    fclose(f);
    fclose(out_file);
    printf("done %u %d\n", op_index, failed);
    return failed ? 1 : 0;
}
