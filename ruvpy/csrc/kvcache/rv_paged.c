/* The paged KV cache (see rv_paged.h). */
#include <stdlib.h>
#include <string.h>

#include "attention/rv_attention.h"
#include "kvcache/rv_paged.h"
#include "kvcache/rv_kvmem.h"

/* metadata allocations count in meta_bytes */
#define meta_alloc(c, n) rv_kv_alloc_counted((n), &(c)->meta_bytes)
#define meta_free(c, p, n) rv_kv_free_counted((p), (n), &(c)->meta_bytes)

/* token `slot` of block b in layer `layer`'s K (kv 0) or V (kv 1): a row of row_elems */
RV_INLINE unsigned char *slot_ptr(const rv_paged *c, int layer, int kv, int32_t b, int64_t slot)
{
    size_t row = (((size_t)layer * 2 + kv) * (size_t)c->num_blocks + (size_t)b) * (size_t)c->block_size + (size_t)slot;
    return c->pool + row * c->row_elems * c->elem;
}

size_t rv_paged_block_bytes(int num_layers, int num_kv_heads, int head_dim, int block_size, int dtype)
{
    size_t b;
    if (num_layers <= 0 || num_kv_heads <= 0 || head_dim <= 0 || block_size <= 0 ||
        rv_kv_mul((size_t)block_size * head_dim * (dtype == RV_KV_F32 ? 4 : 2),
                  (size_t)num_layers * 2 * num_kv_heads, &b))
        return 0;
    return b;
}

int rv_paged_create(rv_paged **out, int num_layers, int num_kv_heads, int head_dim,
                    int block_size, int64_t num_blocks, int dtype)
{
    *out = NULL;
    if (num_layers <= 0 || num_kv_heads <= 0 || head_dim <= 0 || block_size <= 0 ||
        num_blocks <= 0 || num_blocks > INT32_MAX || (dtype != RV_KV_F32 && dtype != RV_KV_F16))
        return RV_EINVAL;
    rv_paged *c = (rv_paged *)calloc(1, sizeof(rv_paged));
    if (!c)
        return RV_ENOMEM;
    c->meta_bytes = sizeof(rv_paged);
    c->num_layers = num_layers;
    c->num_kv_heads = num_kv_heads;
    c->head_dim = head_dim;
    c->block_size = block_size;
    c->dtype = dtype;
    c->elem = dtype == RV_KV_F32 ? 4 : 2;
    c->row_elems = (size_t)num_kv_heads * head_dim;
    size_t pool, bb = rv_paged_block_bytes(num_layers, num_kv_heads, head_dim, block_size, dtype);
    if (!bb || rv_kv_mul(bb, (size_t)num_blocks, &pool) || !rv_kv_alloc_size(pool))
        goto fail_inval;
    c->block_bytes = bb;
    c->num_blocks = (int32_t)num_blocks;
    c->pool = (unsigned char *)rv_kv_alloc_large(pool, &c->pool_bytes);
    c->refcount = (int32_t *)meta_alloc(c, sizeof(int32_t) * (size_t)num_blocks);
    c->free_stack = (int32_t *)meta_alloc(c, sizeof(int32_t) * (size_t)num_blocks);
    c->tally = (int64_t *)meta_alloc(c, sizeof(int64_t) * (size_t)num_blocks);
    if (!c->pool || !c->refcount || !c->free_stack || !c->tally) {
        rv_paged_destroy(c);
        return RV_ENOMEM;
    }
    memset(c->refcount, 0, sizeof(int32_t) * (size_t)num_blocks);
    memset(c->tally, 0, sizeof(int64_t) * (size_t)num_blocks);
    /* the top of the stack is block 0, so blocks are taken in address order */
    for (int32_t i = 0; i < c->num_blocks; i++)
        c->free_stack[i] = c->num_blocks - 1 - i;
    c->nfree = c->num_blocks;
    *out = c;
    return RV_OK;
fail_inval:
    free(c);
    return RV_EINVAL;
}

static void seq_clear(rv_paged *c, rv_paged_seq *s)
{
    meta_free(c, s->blocks, sizeof(int32_t) * (size_t)s->cap);
    meta_free(c, s->ntok, sizeof(int64_t) * (size_t)c->num_layers);
    meta_free(c, s->snap_blocks, sizeof(int32_t) * (size_t)s->cap);
    meta_free(c, s->snap_ntok, sizeof(int64_t) * (size_t)c->num_layers);
    memset(s, 0, sizeof *s);
}

void rv_paged_destroy(rv_paged *c)
{
    if (!c)
        return;
    for (int i = 0; i < c->nslots; i++)
        seq_clear(c, &c->seqs[i]);
    meta_free(c, c->seqs, sizeof(rv_paged_seq) * (size_t)c->slot_cap);
    rv_kv_free_large(c->pool, c->block_bytes * (size_t)c->num_blocks);
    rv_kv_free(c->refcount);
    rv_kv_free(c->free_stack);
    rv_kv_free(c->tally);
    free(c);
}

/* ---- blocks ---- */

RV_INLINE int32_t block_take(rv_paged *c)
{
    int32_t b = c->free_stack[--c->nfree];
    c->refcount[b] = 1;
    return b;
}

RV_INLINE void block_drop(rv_paged *c, int32_t b)
{
    if (--c->refcount[b] == 0)
        c->free_stack[c->nfree++] = b;
}

/* Release a table's blocks last to first, so the free stack hands them out again in order. */
static void blocks_drop_all(rv_paged *c, const int32_t *blocks, int64_t n)
{
    for (int64_t i = n - 1; i >= 0; i--)
        block_drop(c, blocks[i]);
}

/* ---- sequences ---- */

/* make room for `need` table entries, in the table and in its transaction snapshot (which
 * grows with it, so that a transaction's begin allocates nothing) */
static int table_reserve(rv_paged *c, rv_paged_seq *s, int64_t need)
{
    if (need <= s->cap)
        return RV_OK;
    int64_t cap = s->cap ? s->cap : 4;
    while (cap < need)
        cap *= 2;
    int32_t *t = (int32_t *)meta_alloc(c, sizeof(int32_t) * (size_t)cap);
    int32_t *snap = (int32_t *)meta_alloc(c, sizeof(int32_t) * (size_t)cap);
    if (!t || !snap) {
        meta_free(c, t, sizeof(int32_t) * (size_t)cap);
        meta_free(c, snap, sizeof(int32_t) * (size_t)cap);
        return RV_ENOMEM;
    }
    if (s->nblocks)
        memcpy(t, s->blocks, sizeof(int32_t) * (size_t)s->nblocks);
    if (s->snap_nblocks)
        memcpy(snap, s->snap_blocks, sizeof(int32_t) * (size_t)s->snap_nblocks);
    meta_free(c, s->blocks, sizeof(int32_t) * (size_t)s->cap);
    meta_free(c, s->snap_blocks, sizeof(int32_t) * (size_t)s->cap);
    s->blocks = t;
    s->snap_blocks = snap;
    s->cap = cap;
    return RV_OK;
}

int rv_paged_add(rv_paged *c, int *slot)
{
    int i, rc = rv_kv_slot_new((void **)&c->seqs, &c->nslots, &c->slot_cap, sizeof(rv_paged_seq),
                               &c->meta_bytes, &i);
    if (rc)
        return rc;
    rv_paged_seq *s = &c->seqs[i];
    s->ntok = (int64_t *)meta_alloc(c, sizeof(int64_t) * (size_t)c->num_layers);
    s->snap_ntok = (int64_t *)meta_alloc(c, sizeof(int64_t) * (size_t)c->num_layers);
    if (!s->ntok || !s->snap_ntok || table_reserve(c, s, 4)) {
        seq_clear(c, s);
        return RV_ENOMEM;
    }
    memset(s->ntok, 0, sizeof(int64_t) * (size_t)c->num_layers);
    s->live = 1;
    *slot = i;
    return RV_OK;
}

int rv_paged_fork(rv_paged *c, int parent, int *child)
{
    if (c->open_txns)
        return RV_EINVAL;
    int i, rc = rv_paged_add(c, &i);
    if (rc)
        return rc;
    rv_paged_seq *p = &c->seqs[parent], *s = &c->seqs[i];   /* after add: seqs may move */
    if (table_reserve(c, s, p->nblocks)) {
        seq_clear(c, s);
        return RV_ENOMEM;
    }
    memcpy(s->blocks, p->blocks, sizeof(int32_t) * (size_t)p->nblocks);
    s->nblocks = p->nblocks;
    memcpy(s->ntok, p->ntok, sizeof(int64_t) * (size_t)c->num_layers);
    for (int64_t b = 0; b < s->nblocks; b++)
        c->refcount[s->blocks[b]]++;
    *child = i;
    return RV_OK;
}

void rv_paged_release(rv_paged *c, int slot)
{
    rv_paged_seq *s = &c->seqs[slot];
    if (s->in_txn) {
        rv_paged_commit(c, slot);
    }
    blocks_drop_all(c, s->blocks, s->nblocks);
    seq_clear(c, s);
}

/* ---- appends ---- */

/* whether table index b of s held `block` when its transaction began (the snapshot then holds
 * a reference of its own to it, once the table has moved off it) */
RV_INLINE int in_snapshot(const rv_paged_seq *s, int64_t b, int32_t block)
{
    return s->in_txn && b < s->snap_nblocks && s->snap_blocks[b] == block;
}

/* The first table index a write of this many tokens lands in (layer < 0: any layer). */
static int64_t first_written_block(const rv_paged *c, const rv_paged_seq *s, int layer)
{
    int64_t lo = INT64_MAX;
    for (int l = layer < 0 ? 0 : layer; l < (layer < 0 ? c->num_layers : layer + 1); l++)
        if (s->ntok[l] < lo)
            lo = s->ntok[l];
    return lo / c->block_size;
}

static int64_t blocks_for(const rv_paged *c, int64_t tokens)
{
    return (tokens + c->block_size - 1) / c->block_size;
}

/* rv_paged_blocks_needed's tally of a block: its writers, plus this once per writer inside a
 * transaction */
#define TALLY_TXN (INT64_C(1) << 32)

int64_t rv_paged_blocks_needed(const rv_paged *c, int nseq, const int *slots, const int64_t *n, int layer)
{
    int64_t need = 0, ncand = 0;
    /* new blocks past each table's end, and the shared blocks the writes land in (tallied) */
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < nseq; i++) {
            const rv_paged_seq *s = &c->seqs[slots[i]];
            if (n[i] <= 0)
                continue;
            if (pass == 0) {
                int64_t longest = 0;
                for (int l = layer < 0 ? 0 : layer; l < (layer < 0 ? c->num_layers : layer + 1); l++)
                    if (s->ntok[l] + n[i] > longest)
                        longest = s->ntok[l] + n[i];
                int64_t more = blocks_for(c, longest) - s->nblocks;
                need += more > 0 ? more : 0;
            }
            for (int64_t b = first_written_block(c, s, layer); b < s->nblocks; b++) {
                const int32_t id = s->blocks[b];
                if (c->refcount[id] <= 1)
                    continue;
                if (pass == 0) {
                    c->tally[id] += s->in_txn ? TALLY_TXN + 1 : 1;
                    ncand++;
                } else if (c->tally[id] > 0) {
                    /* Copy-on-write: the k writers of a block shared by r holders copy it k
                     * times, except that when all r write, the last one finds it unshared --
                     * unless a writer is inside a transaction: its snapshot keeps the block
                     * (rv_paged_append), so every writer copies */
                    const int64_t k = c->tally[id] % TALLY_TXN, in_txn = c->tally[id] >= TALLY_TXN;
                    need += k - (k >= c->refcount[id] && !in_txn ? 1 : 0);
                    c->tally[id] = 0;
                }
            }
            if (pass == 1 && ncand == 0)
                break;
        }
    return need;
}

static void store_rows(const rv_paged *c, unsigned char *dst, const unsigned char *src, size_t n,
                       int src_dtype, const rv_ops *ops)
{
    if (c->dtype == src_dtype)
        memcpy(dst, src, n * c->elem);
    else if (c->dtype == RV_KV_F16)
        ops->f32_to_f16((const float *)src, (uint16_t *)dst, n);
    else
        ops->f16_to_f32((const uint16_t *)src, (float *)dst, n);
}

int rv_paged_append(rv_paged *c, int slot, int layer, const void *k, const void *v, int64_t n,
                    int src_dtype, const rv_ops *ops)
{
    rv_paged_seq *s = &c->seqs[slot];
    if (n <= 0)
        return RV_OK;
    if (rv_paged_blocks_needed(c, 1, &slot, &n, layer) > c->nfree)
        return RV_EFULL;
    const int64_t start = s->ntok[layer], end = start + n;
    const int64_t want = blocks_for(c, end);
    if (table_reserve(c, s, want))
        return RV_ENOMEM;
    /* copy-on-write of shared blocks the write lands in. Inside a transaction the snapshot
     * keeps its reference to the block left (dropped at commit): another holder must not
     * write into it in place, since a rollback brings this sequence back to it */
    for (int64_t b = start / c->block_size; b < s->nblocks; b++) {
        int32_t old = s->blocks[b];
        if (c->refcount[old] > 1) {
            int32_t fresh = block_take(c);
            for (int l = 0; l < c->num_layers; l++)
                for (int kv = 0; kv < 2; kv++)
                    memcpy(slot_ptr(c, l, kv, fresh, 0), slot_ptr(c, l, kv, old, 0),
                           (size_t)c->block_size * c->row_elems * c->elem);
            if (!in_snapshot(s, b, old))
                c->refcount[old]--;
            s->blocks[b] = fresh;
        }
    }
    while (s->nblocks < want)
        s->blocks[s->nblocks++] = block_take(c);

    const int bs = c->block_size;
    const size_t row = c->row_elems * (src_dtype == RV_KV_F32 ? 4 : 2);
    for (int64_t t = start; t < end; t++) {
        int32_t b = s->blocks[t / bs];
        store_rows(c, slot_ptr(c, layer, 0, b, t % bs), (const unsigned char *)k + (size_t)(t - start) * row,
                   c->row_elems, src_dtype, ops);
        store_rows(c, slot_ptr(c, layer, 1, b, t % bs), (const unsigned char *)v + (size_t)(t - start) * row,
                   c->row_elems, src_dtype, ops);
    }
    s->ntok[layer] = end;
    return RV_OK;
}

void rv_paged_read(const rv_paged *c, int slot, int layer, void *k, void *v, int as_f32, const rv_ops *ops)
{
    const rv_paged_seq *s = &c->seqs[slot];
    const int bs = c->block_size;
    const size_t row = c->row_elems * (as_f32 ? 4 : c->elem);
    for (int64_t t = 0; t < s->ntok[layer]; t++)
        for (int kv = 0; kv < 2; kv++) {
            const unsigned char *src = slot_ptr(c, layer, kv, s->blocks[t / bs], t % bs);
            unsigned char *dst = (unsigned char *)(kv ? v : k) + (size_t)t * row;
            if (!as_f32 || c->dtype == RV_KV_F32)
                memcpy(dst, src, row);
            else
                ops->f16_to_f32((const uint16_t *)src, (float *)dst, c->row_elems);
        }
}

/* ---- transactions ----
 * begin keeps a copy of the table and counts. During a transaction a sequence only grows, and
 * a block its table leaves by copy-on-write keeps the reference the table had, now the
 * snapshot's: it stays alive and shared, so no other holder writes into it in place (fork and
 * release are refused while any transaction is open). Commit drops the snapshot's references
 * to blocks the table left; rollback drops the table's blocks the snapshot does not have and
 * takes the snapshot back. */

int rv_paged_begin(rv_paged *c, int slot)
{
    rv_paged_seq *s = &c->seqs[slot];
    if (s->in_txn)
        return RV_EINVAL;
    if (s->nblocks)
        memcpy(s->snap_blocks, s->blocks, sizeof(int32_t) * (size_t)s->nblocks);
    s->snap_nblocks = s->nblocks;
    memcpy(s->snap_ntok, s->ntok, sizeof(int64_t) * (size_t)c->num_layers);
    s->in_txn = 1;
    c->open_txns++;
    return RV_OK;
}

static void snapshot_free(rv_paged *c, rv_paged_seq *s)
{
    s->snap_nblocks = 0;
    s->in_txn = 0;
    c->open_txns--;
}

void rv_paged_commit(rv_paged *c, int slot)
{
    rv_paged_seq *s = &c->seqs[slot];
    if (!s->in_txn)
        return;
    for (int64_t b = s->snap_nblocks - 1; b >= 0; b--)
        if (s->blocks[b] != s->snap_blocks[b])
            block_drop(c, s->snap_blocks[b]);
    snapshot_free(c, s);
}

void rv_paged_rollback(rv_paged *c, int slot)
{
    rv_paged_seq *s = &c->seqs[slot];
    if (!s->in_txn)
        return;
    /* the snapshot never has more blocks than the table (it only grew), so it fits */
    for (int64_t b = s->nblocks - 1; b >= 0; b--)
        if (b >= s->snap_nblocks || s->blocks[b] != s->snap_blocks[b])
            block_drop(c, s->blocks[b]);
    if (s->snap_nblocks)
        memcpy(s->blocks, s->snap_blocks, sizeof(int32_t) * (size_t)s->snap_nblocks);
    s->nblocks = s->snap_nblocks;
    memcpy(s->ntok, s->snap_ntok, sizeof(int64_t) * (size_t)c->num_layers);
    snapshot_free(c, s);
}

/* ---- attention straight out of the blocks ---- */

/* the longest run of blocks with consecutive ids from table index bi on, in tokens from
 * token t (< t1): one NHD stretch of every layer's K and V */
static int64_t run_tokens(const rv_paged *c, const rv_paged_seq *s, int64_t t, int64_t t1)
{
    const int bs = c->block_size;
    int64_t bi = t / bs, end = (bi + 1) * bs;
    while (end < t1 && s->blocks[bi + 1] == s->blocks[bi] + 1 && end - t < (1 << 24)) {
        bi++;
        end += bs;
    }
    return (end < t1 ? end : t1) - t;
}

/* spans handed to the tiled kernel per call (one per run of blocks) */
#define PAGED_SPANS 32

static size_t paged_extra_floats(const rv_kv_source *src, int rows)
{
    return rv_kv_span_scratch_floats(rows, src->head_dim);
}

static void paged_fold(const rv_kv_source *src, int seq, int h0, int nh, int64_t t0, int64_t t1,
                       rv_attn_state *states, const int64_t *row_pos, int *vis, float *extra,
                       const rv_ops *ops)
{
    const rv_paged *c = (const rv_paged *)src->data;
    const rv_paged_seq *s = &c->seqs[seq];
    const int bs = c->block_size, d = c->head_dim, f16 = c->dtype == RV_KV_F16, rows = states[0].rows;
    const ptrdiff_t tok = (ptrdiff_t)c->row_elems;
    const size_t head_bytes = (size_t)d * c->elem;
    rv_kv_span spans[PAGED_SPANS];
    if (rows <= RV_STREAM_MAX_ROWS) {
        /* decode: every head of the runs of blocks at once, in memory order. A call that stops
         * inside the range stops at a multiple of RV_ATTN_HEAD_BLOCK keys from t0 (itself one,
         * split_align): the kernel's blocks are then those of one call over the whole range,
         * whichever blocks hold the tokens, so the result does not depend on the block ids */
        for (int64_t t = t0; t < t1;) {
            const int64_t start = t;
            int ns = 0;
            while (t < t1 && ns < PAGED_SPANS) {
                const int64_t n = run_tokens(c, s, t, t1);
                spans[ns++] = (rv_kv_span){slot_ptr(c, src->layer, 0, s->blocks[t / bs], t % bs) + h0 * head_bytes,
                                           slot_ptr(c, src->layer, 1, s->blocks[t / bs], t % bs) + h0 * head_bytes,
                                           tok, tok, (int)n};
                t += n;
            }
            for (int64_t over = t < t1 ? (t - start) % RV_ATTN_HEAD_BLOCK : 0; over > 0;) {
                rv_kv_span *last = &spans[ns - 1];
                const int64_t cut = over < last->n ? over : last->n;
                last->n -= (int)cut;
                t -= cut;
                over -= cut;
                ns -= last->n == 0;
            }
            (f16 ? ops->attend_heads_f16 : ops->attend_heads_f32)(states, nh, spans, ns, d, d,
                                                                 rv_kv_visible(row_pos, rows, start, t - start, vis));
        }
        return;
    }
    /* prefill: the tiled kernel per head over the runs */
    for (int j = 0; j < nh; j++) {
        for (int64_t t = t0; t < t1;) {
            const int64_t start = t;
            int ns = 0;
            while (t < t1 && ns < PAGED_SPANS) {
                int64_t n = run_tokens(c, s, t, t1);
                rv_kv_span sp = {slot_ptr(c, src->layer, 0, s->blocks[t / bs], t % bs) + (h0 + j) * head_bytes,
                                 slot_ptr(c, src->layer, 1, s->blocks[t / bs], t % bs) + (h0 + j) * head_bytes,
                                 tok, tok, (int)n};
                spans[ns++] = sp;
                t += n;
            }
            rv_kv_fold_spans(&states[j], spans, ns, rv_kv_visible(row_pos, rows, start, t - start, vis), f16,
                             extra, ops);
        }
    }
}

void rv_paged_source(const rv_paged *c, int layer, int num_heads, rv_kv_source *src)
{
    /* the team size counts fp16 bytes whatever the dtype, as it always has for caches */
    *src = (rv_kv_source){.data = c, .layer = layer, .num_heads = num_heads, .num_kv_heads = c->num_kv_heads,
                          .head_dim = c->head_dim, .kv_elem_bytes = 2, .fold = paged_fold,
                          .extra_floats = paged_extra_floats, .split_align = c->block_size};
}

void rv_paged_get_stats(const rv_paged *c, rv_paged_stats *st)
{
    memset(st, 0, sizeof *st);
    st->blocks_free = c->nfree;
    st->blocks_used = c->num_blocks - c->nfree;
    for (int32_t b = 0; b < c->num_blocks; b++)
        st->blocks_shared += c->refcount[b] > 1;
    st->slots_used = st->blocks_used * c->block_size * c->num_layers;
    /* a shared block's tokens are stored once: take its fullest holder per block (in the
     * tally, which is zero between calls) */
    int64_t *fill = c->tally;
    for (int i = 0; i < c->nslots; i++) {
        const rv_paged_seq *s = &c->seqs[i];
        if (!s->live)
            continue;
        for (int64_t b = 0; b < s->nblocks; b++) {
            int64_t f = 0;
            for (int l = 0; l < c->num_layers; l++) {
                int64_t in = s->ntok[l] - b * c->block_size;
                f += in <= 0 ? 0 : (in >= c->block_size ? c->block_size : in);
            }
            if (f > fill[s->blocks[b]])
                fill[s->blocks[b]] = f;
        }
    }
    for (int32_t b = 0; b < c->num_blocks; b++) {
        st->tokens_stored += fill[b];
        fill[b] = 0;
    }
}

int rv_paged_truncate(rv_paged *c, int slot, int64_t n)
{
    if (c->open_txns || n < 0)
        return RV_EINVAL;
    rv_paged_seq *s = &c->seqs[slot];
    int64_t longest = 0;
    for (int l = 0; l < c->num_layers; l++) {
        if (s->ntok[l] > n)
            s->ntok[l] = n;
        longest = s->ntok[l] > longest ? s->ntok[l] : longest;
    }
    const int64_t keep = blocks_for(c, longest);
    if (keep < s->nblocks) {
        blocks_drop_all(c, s->blocks + keep, s->nblocks - keep);
        s->nblocks = keep;
    }
    return RV_OK;
}

size_t rv_paged_create_bytes(int num_layers, int num_kv_heads, int head_dim, int block_size, int64_t num_blocks,
                             int dtype)
{
    size_t pool, bb = rv_paged_block_bytes(num_layers, num_kv_heads, head_dim, block_size, dtype);
    if (!bb || num_blocks <= 0 || num_blocks > INT32_MAX || rv_kv_mul(bb, (size_t)num_blocks, &pool))
        return 0;
    return sizeof(rv_paged) + rv_kv_alloc_large_size(pool) + 2 * rv_kv_alloc_size(sizeof(int32_t) * (size_t)num_blocks) +
           rv_kv_alloc_size(sizeof(int64_t) * (size_t)num_blocks);
}
