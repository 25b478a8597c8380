/* The two-tier KV cache (see rv_twotier.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kvcache/rv_twotier.h"
#include "kvcache/rv_kvattn.h"
#include "kvcache/rv_kvmem.h"

#define meta_alloc(c, n) rv_kv_alloc_counted((n), &(c)->meta_bytes)
#define meta_free(c, p, n) rv_kv_free_counted((p), (n), &(c)->meta_bytes)

static int params_valid(const rv_tt_params *p)
{
    /* a group's head offsets are 32-bit: the Python layer bounds kvh * d * G at 2^28 */
    return p->num_layers > 0 && p->num_kv_heads > 0 && p->head_dim > 0 && p->head_dim <= 256 &&
           (int64_t)p->num_kv_heads * p->head_dim * p->group_tokens <= ((int64_t)1 << 28) &&
           p->hot_tokens >= 0 && p->group_tokens > 0 && p->group_size > 0 && p->max_tokens > 0 &&
           (p->cold == RV_TT_Q8 || p->cold == RV_TT_Q4 ||
            (p->cold == RV_TT_TURBO && (p->turbo_bits == 2.5 || p->turbo_bits == 3.5 || p->turbo_bits == 4.5)));
}

static void coldq_cfg(const rv_tt_params *p, rv_coldq_cfg *q)
{
    q->num_kv_heads = p->num_kv_heads;
    q->head_dim = p->head_dim;
    q->group_tokens = p->group_tokens;
    q->group_size = p->group_size < p->head_dim ? p->group_size : p->head_dim;
    q->bits = p->cold == RV_TT_Q8 ? 8 : 4;
    /* dense-and-sparse keys and values: up to max(1, head_dim / 16) outlier channels, at most 8 */
    int most = p->head_dim / 16;
    q->max_outliers = q->bits == 8 ? 0 : (most < 1 ? 1 : (most > 8 ? 8 : most));
}

size_t rv_tt_group_alloc_bytes(const rv_tt_params *p)
{
    if (!params_valid(p))
        return 0;
    size_t blob;
    if (p->cold == RV_TT_TURBO) {
        rv_turbo *t = rv_turbo_create(p->num_kv_heads, p->head_dim, p->group_tokens, p->turbo_bits);
        if (!t)
            return 0;
        blob = rv_turbo_blob_bytes(t);
        rv_turbo_destroy(t);
    } else {
        rv_coldq_cfg q;
        coldq_cfg(p, &q);
        blob = rv_coldq_blob_bytes(&q, NULL, NULL);
    }
    return rv_kv_alloc_size(RV_TT_GROUP_HDR + blob);
}

static size_t ring_bytes(int kvh, int d, int64_t cap) { return 2 * 2 * (size_t)kvh * (size_t)cap * (size_t)d; }

size_t rv_tt_hot_alloc_bytes(const rv_tt_params *p, int64_t tokens)
{
    return tokens > 0 ? rv_kv_alloc_size(ring_bytes(p->num_kv_heads, p->head_dim, tokens)) : 0;
}

int rv_tt_create(rv_tt **out, const rv_tt_params *p)
{
    *out = NULL;
    if (!params_valid(p))
        return RV_EINVAL;
    rv_tt *c = (rv_tt *)calloc(1, sizeof(rv_tt));
    if (!c)
        return RV_ENOMEM;
    c->meta_bytes = sizeof(rv_tt);
    c->num_layers = p->num_layers;
    c->num_kv_heads = p->num_kv_heads;
    c->head_dim = p->head_dim;
    c->hot_tokens = p->hot_tokens;
    c->group_tokens = p->group_tokens;
    c->cold = p->cold;
    c->max_tokens = p->max_tokens;
    coldq_cfg(p, &c->q);
    c->used = (int64_t *)meta_alloc(c, sizeof(int64_t) * (size_t)p->num_layers);
    if (p->cold == RV_TT_TURBO) {
        c->turbo = rv_turbo_create(p->num_kv_heads, p->head_dim, p->group_tokens, p->turbo_bits);
        if (c->turbo)
            c->meta_bytes += rv_turbo_bytes(c->turbo);
    }
    if (!c->used || (p->cold == RV_TT_TURBO && !c->turbo)) {
        rv_kv_free(c->used);
        free(c);
        return RV_ENOMEM;
    }
    memset(c->used, 0, sizeof(int64_t) * (size_t)p->num_layers);
    *out = c;
    return RV_OK;
}

/* ---- cold groups ---- */

_Static_assert(sizeof(rv_tt_group) <= RV_TT_GROUP_HDR, "the group header outgrew its room");

/* a new group with one reference and no holder yet: stored 0 until its list holds it */
static rv_tt_group *group_new(rv_tt *c, size_t blob_bytes)
{
    size_t n = RV_TT_GROUP_HDR + blob_bytes;
    rv_tt_group *g = (rv_tt_group *)rv_kv_alloc(n);
    if (!g)
        return NULL;
    memset(g, 0, sizeof *g);
    g->refs = 1;
    g->blob_bytes = blob_bytes;
    g->alloc_bytes = rv_kv_alloc_size(n);
    c->cold_bytes += g->alloc_bytes;
    c->cold_groups++;
    return g;
}

static void group_share(rv_tt *c, rv_tt_group *g)
{
    if (g->refs++ == 1)
        c->shared_groups++;
}

static void group_drop(rv_tt *c, rv_tt_group *g)
{
    if (--g->refs == 1)
        c->shared_groups--;
    if (g->refs == 0) {
        c->cold_bytes -= g->alloc_bytes;
        c->cold_groups--;
        rv_kv_free(g);
    }
}

static int groups_push(rv_tt *c, rv_tt_layer *L, rv_tt_group *g)
{
    if (L->ngroups == L->gcap) {
        int64_t cap = L->gcap ? 2 * L->gcap : 8;
        rv_tt_group **a = (rv_tt_group **)meta_alloc(c, sizeof(rv_tt_group *) * (size_t)cap);
        if (!a)
            return RV_ENOMEM;
        if (L->ngroups)
            memcpy(a, L->groups, sizeof(rv_tt_group *) * (size_t)L->ngroups);
        meta_free(c, L->groups, sizeof(rv_tt_group *) * (size_t)L->gcap);
        L->groups = a;
        L->gcap = cap;
    }
    L->groups[L->ngroups++] = g;
    return RV_OK;
}

/* free the groups before `first` (evicted) and move the live ones to the front */
static void groups_compact(rv_tt *c, rv_tt_layer *L)
{
    if (L->first == 0)
        return;
    for (int64_t i = 0; i < L->first; i++)
        group_drop(c, L->groups[i]);
    memmove(L->groups, L->groups + L->first, sizeof(rv_tt_group *) * (size_t)(L->ngroups - L->first));
    L->ngroups -= L->first;
    L->first = 0;
}

RV_INLINE int64_t cold_len(const rv_tt *c, const rv_tt_layer *L)
{
    return (L->ngroups - L->first) * c->group_tokens - L->skip;
}

/* ---- the budget: tokens stored (rv_twotier.h) ---- */

/* Count (sign +1) or uncount (-1) L as a full holder of its live groups in [lo, hi). */
static void hold_groups(rv_tt_layer *L, int64_t lo, int64_t hi, int sign)
{
    if (lo < L->first)
        lo = L->first;
    if (hi > L->ngroups)
        hi = L->ngroups;
    for (int64_t i = lo; i < hi; i++)
        if (i > L->first || L->skip == 0)
            L->groups[i]->full += sign;
}

/* the first token of g that some sequence holds (group_tokens: none does) */
static int32_t group_floor(const rv_tt *c, int layer, const rv_tt_group *g)
{
    if (g->full > 0)
        return 0;
    /* every live holder sees part of it: it is their first live group, skip > 0 */
    int32_t floor = c->group_tokens;
    for (int i = 0; i < c->nslots; i++) {
        const rv_tt_seq *s = &c->seqs[i];
        if (!s->live)
            continue;
        const rv_tt_layer *L = &s->layers[layer];
        if (L->first < L->ngroups && L->groups[L->first] == g && L->skip < floor)
            floor = L->skip;
    }
    return floor;
}

/* after its holders' views changed: recount what the groups [lo, hi) of L store */
static void restat_groups(rv_tt *c, int layer, const rv_tt_layer *L, int64_t lo, int64_t hi)
{
    if (hi > L->ngroups)
        hi = L->ngroups;
    for (int64_t i = lo; i < hi; i++) {
        rv_tt_group *g = L->groups[i];
        int32_t stored = c->group_tokens - group_floor(c, layer, g);
        c->used[layer] += stored - g->stored;
        g->stored = stored;
    }
}

/* Move L's view to its first `first` groups and `skip` more tokens gone (eviction) or back
 * (rollback), keeping the full counts and what the touched groups store exact. */
static void move_view(rv_tt *c, int layer, rv_tt_layer *L, int64_t first, int32_t skip)
{
    const int64_t lo = first < L->first ? first : L->first;
    const int64_t hi = (first > L->first ? first : L->first) + 1;
    hold_groups(L, lo, hi, -1);
    L->first = first;
    L->skip = skip;
    hold_groups(L, lo, hi, +1);
    restat_groups(c, layer, L, lo, hi);
}

static int slot_listed(int slot, const int *slots, int n)
{
    for (int i = 0; i < n; i++)
        if (slots[i] == slot)
            return 1;
    return 0;
}

int64_t rv_tt_stored_without(rv_tt *c, int layer, const int *slots, int n)
{
    int64_t stored = 0;
    c->epoch++;
    /* pass 0: each group's smallest start among the remaining holders; pass 1: sum once */
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < c->nslots; i++) {
            const rv_tt_seq *s = &c->seqs[i];
            if (!s->live || slot_listed(i, slots, n))
                continue;
            const rv_tt_layer *L = &s->layers[layer];
            if (pass == 0)
                stored += L->hot_len;
            for (int64_t gi = L->first; gi < L->ngroups; gi++) {
                rv_tt_group *g = L->groups[gi];
                int32_t start = gi == L->first ? L->skip : 0;
                if (pass == 0 && g->mark != c->epoch) {
                    g->mark = c->epoch;
                    g->tmp = start;
                } else if (pass == 0) {
                    g->tmp = start < g->tmp ? start : g->tmp;
                } else if (g->tmp >= 0) {
                    stored += c->group_tokens - g->tmp;
                    g->tmp = -1;
                }
            }
        }
    return stored;
}

/* ---- the hot ring ---- */

RV_INLINE uint16_t *ring_row(const rv_tt *c, const rv_tt_layer *L, int kv, int head, int64_t pos)
{
    return L->hot + (((size_t)kv * c->num_kv_heads + head) * (size_t)L->hot_cap + (size_t)pos) * c->head_dim;
}

/* n rows of (kv, head) from ring position pos on (wrapping) into dst, contiguous */
static void ring_gather(const rv_tt *c, const rv_tt_layer *L, int kv, int head, int64_t pos, int64_t n,
                        uint16_t *dst)
{
    const size_t d = (size_t)c->head_dim;
    int64_t first = L->hot_cap - pos < n ? L->hot_cap - pos : n;
    memcpy(dst, ring_row(c, L, kv, head, pos), sizeof(uint16_t) * d * (size_t)first);
    if (n > first)
        memcpy(dst + d * (size_t)first, ring_row(c, L, kv, head, 0), sizeof(uint16_t) * d * (size_t)(n - first));
}

/* Re-allocate the ring with cap slots, keeping the n tokens from ring position base at
 * positions 0..n-1. RV_ENOMEM leaves it as it was. */
static int ring_resize(rv_tt *c, rv_tt_layer *L, int64_t cap, int64_t base, int64_t n)
{
    uint16_t *ring = NULL;
    if (cap > 0) {
        ring = (uint16_t *)rv_kv_alloc_counted(ring_bytes(c->num_kv_heads, c->head_dim, cap), &c->hot_bytes);
        if (!ring)
            return RV_ENOMEM;
    }
    rv_tt_layer moved = *L;
    moved.hot = ring;
    moved.hot_cap = cap;
    for (int kv = 0; kv < 2 && n > 0; kv++)
        for (int h = 0; h < c->num_kv_heads; h++)
            ring_gather(c, L, kv, h, base, n, ring_row(c, &moved, kv, h, 0));
    rv_kv_free_counted(L->hot, ring_bytes(c->num_kv_heads, c->head_dim, L->hot_cap), &c->hot_bytes);
    L->hot = ring;
    L->hot_cap = cap;
    return RV_OK;
}

/* Slots the ring must keep: its tokens, and inside a transaction the ones evicted since begin
 * (a rollback brings them back). Their first position is returned in *base. */
static int64_t ring_kept(const rv_tt_layer *L, int in_txn, int64_t *base)
{
    int64_t back = in_txn ? L->txn_hot_evicted : 0;
    *base = L->hot_cap ? ((L->hot_head - back) % L->hot_cap + L->hot_cap) % L->hot_cap : 0;
    return back + L->hot_len;
}

/* room for `more` tokens after the hot tail */
static int ring_reserve(rv_tt *c, rv_tt_layer *L, int in_txn, int64_t more)
{
    int64_t base, kept = ring_kept(L, in_txn, &base), need = kept + more;
    if (need <= L->hot_cap)
        return RV_OK;
    /* doubling (a decode step must not copy the ring), up to the steady-state size unless a
     * long append needs more */
    const int64_t target = (int64_t)c->hot_tokens + c->group_tokens;
    int64_t cap = L->hot_cap ? L->hot_cap : 16;
    while (cap < need)
        cap *= 2;
    if (cap > target)
        cap = target > need ? target : need;
    int64_t back = kept - L->hot_len;
    if (ring_resize(c, L, cap, base, kept))
        return RV_ENOMEM;
    L->hot_head = back;
    if (in_txn)
        L->s_hot_head = 0;    /* the snapshot's head was `base` */
    return RV_OK;
}

/* after migrating: give back what a burst (a long append) grew the ring to (best effort) */
static void ring_shrink(rv_tt *c, rv_tt_layer *L)
{
    const int64_t target = (int64_t)c->hot_tokens + c->group_tokens;
    if (L->hot_cap > target && L->hot_len <= target && ring_resize(c, L, target, L->hot_head, L->hot_len) == RV_OK)
        L->hot_head = 0;
}

/* ---- migration: the oldest group_tokens hot tokens -> one cold group ---- */

/* TurboQuant: every head's G tokens as floats, then one encode (groups have a fixed size) */
static rv_tt_group *encode_turbo_group(rv_tt *c, const rv_tt_layer *L, const rv_ops *ops)
{
    const int kvh = c->num_kv_heads, d = c->head_dim, G = c->group_tokens;
    const size_t rows = (size_t)G * d;
    rv_tt_group *g = NULL;
    float *kf = (float *)malloc(sizeof(float) * (2 * rows * kvh + rv_turbo_scratch_floats(c->turbo)));
    uint16_t *h16 = (uint16_t *)malloc(sizeof(uint16_t) * rows);
    if (kf && h16) {
        float *vf = kf + rows * kvh;
        for (int h = 0; h < kvh; h++)
            for (int kv = 0; kv < 2; kv++) {
                ring_gather(c, L, kv, h, L->hot_head, G, h16);
                ops->f16_to_f32(h16, (kv ? vf : kf) + rows * h, rows);
            }
        if ((g = group_new(c, rv_turbo_blob_bytes(c->turbo))))
            rv_turbo_encode(c->turbo, kf, vf, RV_TT_BLOB(g), vf + rows * kvh);
    }
    free(kf);
    free(h16);
    return g;
}

static rv_tt_group *encode_group(rv_tt *c, const rv_tt_layer *L, const rv_ops *ops)
{
    if (c->turbo)
        return encode_turbo_group(c, L, ops);
    const int kvh = c->num_kv_heads, d = c->head_dim, G = c->group_tokens;
    const int mo = c->q.max_outliers > 0 ? c->q.max_outliers : 1;
    rv_tt_group *g = NULL;
    size_t rows = (size_t)G * d;
    float *kf = (float *)malloc(sizeof(float) * (2 * rows + rv_coldq_scratch_floats(&c->q)));
    uint16_t *h16 = (uint16_t *)malloc(sizeof(uint16_t) * 2 * rows);
    int *counts = (int *)malloc(sizeof(int) * 2 * (size_t)kvh);
    uint8_t *idx = (uint8_t *)malloc(2 * (size_t)kvh * mo);
    if (!kf || !h16 || !counts || !idx)
        goto done;
    float *vf = kf + rows, *scratch = vf + rows;
    int *nk = counts, *nv = counts + kvh;
    uint8_t *kidx = idx, *vidx = idx + (size_t)kvh * mo;
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) {
            g = group_new(c, rv_coldq_blob_bytes(&c->q, nk, nv));
            if (!g)
                goto done;
            rv_coldq_write_header(&c->q, RV_TT_BLOB(g), nk, nv);
        }
        for (int h = 0; h < kvh; h++) {
            ring_gather(c, L, 0, h, L->hot_head, G, h16);
            ring_gather(c, L, 1, h, L->hot_head, G, h16 + rows);
            ops->f16_to_f32(h16, kf, 2 * rows);
            if (pass == 0)
                rv_coldq_select(&c->q, kf, vf, &nk[h], kidx + (size_t)h * mo, &nv[h], vidx + (size_t)h * mo, scratch);
            else
                rv_coldq_encode_head(&c->q, RV_TT_BLOB(g), h, kf, vf, nk[h], kidx + (size_t)h * mo, nv[h],
                                     vidx + (size_t)h * mo);
        }
    }
done:
    free(kf);
    free(h16);
    free(counts);
    free(idx);
    return g;
}

static int migrate(rv_tt *c, rv_tt_layer *L, const rv_ops *ops)
{
    const int64_t G = c->group_tokens;
    int rc = RV_OK;
    while (L->hot_len >= (int64_t)c->hot_tokens + G) {
        rv_tt_group *g = encode_group(c, L, ops);
        if (!g || groups_push(c, L, g)) {
            if (g)
                group_drop(c, g);
            rc = RV_ENOMEM;
            break;
        }
        g->full = 1;          /* G tokens move from the hot count to the cold one: `used` stays */
        g->stored = (int32_t)G;
        L->hot_head = (L->hot_head + G) % L->hot_cap;
        L->hot_len -= G;
    }
    ring_shrink(c, L);
    return rc;
}

/* ---- sequences ---- */

static void layer_clear(rv_tt *c, rv_tt_layer *L)
{
    for (int64_t i = 0; i < L->ngroups; i++)
        group_drop(c, L->groups[i]);
    meta_free(c, L->groups, sizeof(rv_tt_group *) * (size_t)L->gcap);
    rv_kv_free_counted(L->hot, ring_bytes(c->num_kv_heads, c->head_dim, L->hot_cap), &c->hot_bytes);
    memset(L, 0, sizeof *L);
}

static void seq_clear(rv_tt *c, rv_tt_seq *s)
{
    if (s->layers) {
        for (int l = 0; l < c->num_layers; l++)
            layer_clear(c, &s->layers[l]);
        meta_free(c, s->layers, sizeof(rv_tt_layer) * (size_t)c->num_layers);
    }
    memset(s, 0, sizeof *s);
}

void rv_tt_destroy(rv_tt *c)
{
    if (!c)
        return;
    for (int i = 0; i < c->nslots; i++)
        seq_clear(c, &c->seqs[i]);
    meta_free(c, c->seqs, sizeof(rv_tt_seq) * (size_t)c->slot_cap);
    rv_kv_free(c->used);
    rv_turbo_destroy(c->turbo);
    free(c);
}

int rv_tt_add(rv_tt *c, int *slot)
{
    int i, rc = rv_kv_slot_new((void **)&c->seqs, &c->nslots, &c->slot_cap, sizeof(rv_tt_seq),
                               &c->meta_bytes, &i);
    if (rc)
        return rc;
    rv_tt_seq *s = &c->seqs[i];
    s->layers = (rv_tt_layer *)meta_alloc(c, sizeof(rv_tt_layer) * (size_t)c->num_layers);
    if (!s->layers)
        return RV_ENOMEM;
    memset(s->layers, 0, sizeof(rv_tt_layer) * (size_t)c->num_layers);
    s->live = 1;
    *slot = i;
    return RV_OK;
}

int64_t rv_tt_len(const rv_tt *c, int slot, int layer)
{
    const rv_tt_layer *L = &c->seqs[slot].layers[layer];
    return cold_len(c, L) + L->hot_len;
}

int64_t rv_tt_cold_len(const rv_tt *c, int slot, int layer)
{
    return cold_len(c, &c->seqs[slot].layers[layer]);
}

/* Uncount everything slot holds from the budget, then free it. */
void rv_tt_release(rv_tt *c, int slot)
{
    rv_tt_seq *s = &c->seqs[slot];
    for (int l = 0; l < c->num_layers && s->layers; l++) {
        rv_tt_layer *L = &s->layers[l];
        move_view(c, l, L, L->ngroups, 0);      /* sees none of its groups any more */
        c->used[l] -= L->hot_len;
    }
    if (s->in_txn)
        c->open_txns--;
    seq_clear(c, s);
}

int rv_tt_fork(rv_tt *c, int parent, int *child)
{
    if (c->open_txns)
        return RV_EINVAL;
    /* the copy shares the cold groups (it sees what the parent sees: they store no more) and
     * copies the hot tail, which is what it costs */
    for (int l = 0; l < c->num_layers; l++)
        if (c->used[l] + c->seqs[parent].layers[l].hot_len > c->max_tokens)
            return RV_EFULL;
    int i, rc = rv_tt_add(c, &i);
    if (rc)
        return rc;
    for (int l = 0; l < c->num_layers; l++) {
        const rv_tt_layer *P = &c->seqs[parent].layers[l];
        rv_tt_layer *L = &c->seqs[i].layers[l];
        for (int64_t g = P->first; g < P->ngroups; g++) {
            if (groups_push(c, L, P->groups[g]))
                goto fail;
            group_share(c, P->groups[g]);
            L->skip = P->skip;
            hold_groups(L, L->ngroups - 1, L->ngroups, +1);
        }
        if (P->hot_len) {
            if (ring_reserve(c, L, 0, P->hot_len))
                goto fail;
            for (int kv = 0; kv < 2; kv++)
                for (int h = 0; h < c->num_kv_heads; h++)
                    ring_gather(c, P, kv, h, P->hot_head, P->hot_len, ring_row(c, L, kv, h, 0));
            L->hot_len = P->hot_len;
            c->used[l] += L->hot_len;
        }
    }
    *child = i;
    return RV_OK;
fail:
    rv_tt_release(c, i);      /* what the copy counted so far (its groups store no more) */
    return RV_ENOMEM;
}

/* ---- eviction ---- */

static void evict_layer(rv_tt *c, rv_tt_seq *s, rv_tt_layer *L, int layer, int64_t n)
{
    const int64_t G = c->group_tokens, cold = cold_len(c, L), from_cold = n < cold ? n : cold;
    move_view(c, layer, L, L->first + (L->skip + from_cold) / G, (int32_t)((L->skip + from_cold) % G));
    n -= from_cold;
    if (n > 0) {
        c->used[layer] -= n;
        L->hot_head = (L->hot_head + n) % L->hot_cap;
        L->hot_len -= n;
        if (s->in_txn)
            L->txn_hot_evicted += n;
    }
    if (!s->in_txn)
        groups_compact(c, L);
}

void rv_tt_evict(rv_tt *c, int slot, int64_t n)
{
    rv_tt_seq *s = &c->seqs[slot];
    int64_t most = 0;
    for (int l = 0; l < c->num_layers; l++) {
        int64_t len = rv_tt_len(c, slot, l), e = n < len ? n : len;
        evict_layer(c, s, &s->layers[l], l, e);
        most = e > most ? e : most;
    }
    s->evicted += most;
    c->evicted += most;
}

/* ---- appends ---- */

int rv_tt_append(rv_tt *c, int slot, int layer, const void *k, const void *v, int64_t n,
                 int src_dtype, const rv_ops *ops)
{
    rv_tt_seq *s = &c->seqs[slot];
    rv_tt_layer *L = &s->layers[layer];
    if (n <= 0)
        return RV_OK;
    if (c->used[layer] + n > c->max_tokens)
        return RV_EFULL;
    if (ring_reserve(c, L, s->in_txn, n))
        return RV_ENOMEM;
    const int kvh = c->num_kv_heads, d = c->head_dim;
    const size_t elem = src_dtype == 0 ? 4 : 2;
    for (int64_t t = 0; t < n; t++) {
        int64_t pos = (L->hot_head + L->hot_len + t) % L->hot_cap;
        for (int h = 0; h < kvh; h++) {
            size_t off = ((size_t)t * kvh + h) * d * elem;
            for (int kv = 0; kv < 2; kv++) {
                const void *src = (const char *)(kv ? v : k) + off;
                uint16_t *dst = ring_row(c, L, kv, h, pos);
                if (src_dtype == 0)
                    ops->f32_to_f16((const float *)src, dst, (size_t)d);
                else
                    memcpy(dst, src, sizeof(uint16_t) * (size_t)d);
            }
        }
    }
    L->hot_len += n;
    c->used[layer] += n;
    if (!s->in_txn)
        migrate(c, L, ops);   /* out of memory: the tokens stay hot, still correct */
    return RV_OK;
}

/* ---- transactions ---- */

int rv_tt_begin(rv_tt *c, int slot)
{
    rv_tt_seq *s = &c->seqs[slot];
    if (s->in_txn)
        return RV_EINVAL;
    for (int l = 0; l < c->num_layers; l++) {
        rv_tt_layer *L = &s->layers[l];
        L->s_first = L->first;
        L->s_skip = L->skip;
        L->s_hot_head = L->hot_head;
        L->s_hot_len = L->hot_len;
        L->s_hot_cap = L->hot_cap;
        L->txn_hot_evicted = 0;
    }
    s->s_evicted = s->evicted;
    s->in_txn = 1;
    c->open_txns++;
    return RV_OK;
}

void rv_tt_commit(rv_tt *c, int slot, const rv_ops *ops)
{
    rv_tt_seq *s = &c->seqs[slot];
    if (!s->in_txn)
        return;
    s->in_txn = 0;
    c->open_txns--;
    for (int l = 0; l < c->num_layers; l++) {
        rv_tt_layer *L = &s->layers[l];
        L->txn_hot_evicted = 0;
        groups_compact(c, L);
        migrate(c, L, ops);
    }
}

void rv_tt_rollback(rv_tt *c, int slot)
{
    rv_tt_seq *s = &c->seqs[slot];
    if (!s->in_txn)
        return;
    for (int l = 0; l < c->num_layers; l++) {
        rv_tt_layer *L = &s->layers[l];
        move_view(c, l, L, L->s_first, L->s_skip);   /* the groups it sees store as before */
        c->used[l] += L->s_hot_len - L->hot_len;
        L->hot_head = L->s_hot_head;
        L->hot_len = L->s_hot_len;
        L->txn_hot_evicted = 0;
        /* give back what the transaction grew the ring to (best effort: a failed allocation
         * keeps the larger ring, with the same tokens) */
        if (L->hot_cap != L->s_hot_cap && ring_resize(c, L, L->s_hot_cap, L->hot_head, L->hot_len) == RV_OK)
            L->hot_head = 0;
    }
    c->evicted -= s->evicted - s->s_evicted;
    s->evicted = s->s_evicted;
    s->in_txn = 0;
    c->open_txns--;
}

/* ---- reading ---- */

int rv_tt_read(const rv_tt *c, int slot, int layer, float *k, float *v, const rv_ops *ops)
{
    const rv_tt_layer *L = &c->seqs[slot].layers[layer];
    const int kvh = c->num_kv_heads, d = c->head_dim, G = c->group_tokens;
    size_t need = c->turbo ? rv_turbo_scratch_floats(c->turbo) : rv_coldq_dequant_floats(&c->q);
    float *tmp = (float *)malloc(sizeof(float) * (2 * (size_t)G * d + need));
    if (!tmp)
        return RV_ENOMEM;
    float *kf = tmp, *vf = tmp + (size_t)G * d, *params = vf + (size_t)G * d;
    int64_t t = 0;
    for (int64_t gi = L->first; gi < L->ngroups; gi++) {
        int a = gi == L->first ? L->skip : 0;
        for (int h = 0; h < kvh; h++) {
            if (c->turbo) {
                rv_turbo_decode(c->turbo, RV_TT_BLOB(L->groups[gi]), h, kf, vf, params);
            } else {
                rv_coldq_head view;
                rv_coldq_head_view(&c->q, RV_TT_BLOB(L->groups[gi]), h, &view);
                rv_coldq_dequant(&c->q, &view, kf, vf, params, ops);
            }
            for (int j = a; j < G; j++) {
                size_t o = ((size_t)(t + j - a) * kvh + h) * d;
                memcpy(k + o, kf + (size_t)j * d, sizeof(float) * d);
                memcpy(v + o, vf + (size_t)j * d, sizeof(float) * d);
            }
        }
        t += G - a;
    }
    for (int64_t i = 0; i < L->hot_len; i++, t++) {
        int64_t pos = (L->hot_head + i) % L->hot_cap;
        for (int h = 0; h < kvh; h++) {
            size_t o = ((size_t)t * kvh + h) * d;
            ops->f16_to_f32(ring_row(c, L, 0, h, pos), k + o, (size_t)d);
            ops->f16_to_f32(ring_row(c, L, 1, h, pos), v + o, (size_t)d);
        }
    }
    free(tmp);
    return RV_OK;
}

/* ---- attention: cold groups dequantized chunk by chunk, then the hot ring, one state ---- */

/* per-thread scratch of the fold: a group head's parameters as floats, the fused kernel's
 * scratch, the span kernels' */

/* per-thread scratch of the fold: the cold tier's (a group head's parameters and the fused
 * kernel's scratch; TurboQuant: rotated queries and states of up to every head) and the span
 * kernels' */
/* per head of a TurboQuant fold: prepared queries, then (m, l, acc [rows][D]) */
static size_t tt_turbo_head_floats(const rv_turbo *tq, int rows)
{
    return rv_turbo_query_floats(tq, rows) + 2 * rv_pad16((size_t)rows) +
           rv_pad16((size_t)rows * rv_turbo_padded_dim(tq));
}

static size_t tt_extra_floats(const rv_kv_source *src, int rows)
{
    const rv_tt *c = (const rv_tt *)src->cache;
    size_t cold;
    if (c->turbo) {
        /* decode tasks fold every head (at most RV_KV_STREAM_ROWS rows), prefill tasks one:
         * per head the prepared queries and a rotated-domain state; then the key mean, the
         * kernel's scratch */
        const int many = rows < RV_KV_STREAM_ROWS ? rows : RV_KV_STREAM_ROWS;
        size_t a = (size_t)c->num_kv_heads * tt_turbo_head_floats(c->turbo, many);
        size_t b = tt_turbo_head_floats(c->turbo, rows);
        cold = (a > b ? a : b) + rv_pad16((size_t)c->head_dim) + rv_pad16((size_t)rows * c->head_dim) +
               rv_pad16(RV_TATTN_SCRATCH_FLOATS((c->group_tokens + 15) / 16 * 16, rv_turbo_padded_dim(c->turbo)));
    } else {
        cold = rv_pad16(rv_coldq_param_floats(&c->q)) + rv_pad16(RV_QATTN_SCRATCH_FLOATS(c->group_tokens, c->head_dim));
    }
    return rv_pad16(cold) + rv_kv_span_scratch_floats(rows, c->head_dim);
}

/* The TurboQuant cold tokens [t0, t1) of heads h0.. into the states: the queries rotated (and
 * made int8) once, rotated-domain states folded group by group, rotated back and merged in. */
static void tt_fold_turbo(const rv_tt *c, const rv_tt_layer *L, int h0, int nh, int64_t t0, int64_t t1,
                          rv_attn_state *states, const int64_t *row_pos, int *vis, float *extra,
                          const rv_ops *ops)
{
    const rv_turbo *tq = c->turbo;
    const int D = rv_turbo_padded_dim(tq), G = c->group_tokens, rows = states[0].rows, d = c->head_dim;
    const size_t per_head = tt_turbo_head_floats(tq, rows), qf = rv_turbo_query_floats(tq, rows);
    const size_t r16 = rv_pad16((size_t)rows);
    float *mu = extra + (size_t)nh * per_head;
    float *out = mu + rv_pad16((size_t)d);                   /* [rows][d] */
    float *kscratch = out + rv_pad16((size_t)rows * d);
    for (int j = 0; j < nh; j++) {
        float *prep = extra + (size_t)j * per_head, *m = prep + qf, *l = m + r16, *acc = l + r16;
        rv_turbo_prepare_queries(tq, states[j].q, states[j].q_stride, rows, prep);
        rv_attn_state_clear(m, l, acc, rows, D);
    }
    for (int64_t t = t0; t < t1;) {
        const int64_t gi = L->first + (t + L->skip) / G;
        const int a = (int)((t + L->skip) % G);
        const int n = G - a < t1 - t ? G - a : (int)(t1 - t);
        const int *vv = rv_kv_visible(row_pos, rows, t, n, vis);
        for (int j = 0; j < nh; j++) {
            float *prep = extra + (size_t)j * per_head, *m = prep + qf, *l = m + r16, *acc = l + r16;
            rv_attn_state rot = {rows, D, NULL, D, m, l, acc, states[0].scratch};
            struct rv_thead th;
            rv_turbo_head(tq, RV_TT_BLOB(L->groups[gi]), h0 + j, prep, rows, states[j].q, states[j].q_stride, mu, &th);
            if (j + 1 < nh || t + n < t1) {      /* the segment that comes next in memory */
                const unsigned char *next = RV_TT_BLOB(L->groups[j + 1 < nh ? gi : gi + 1]);
                th.prefetch = rv_turbo_segment(tq, next, j + 1 < nh ? h0 + j + 1 : h0);
                th.prefetch_bytes = rv_turbo_head_bytes(tq);
            }
            ops->attend_tgroup(&rot, &th, a, n, vv, kscratch);
        }
        t += n;
    }
    for (int j = 0; j < nh; j++) {
        float *prep = extra + (size_t)j * per_head, *m = prep + qf, *l = m + r16, *acc = l + r16;
        rv_turbo_unrotate(tq, acc, rows, out, d);
        ops->attn_merge(rows, d, states[j].m, states[j].l, states[j].acc, m, l, out);
    }
}

static void tt_fold(const rv_kv_source *src, int seq, int h0, int nh, int64_t t0, int64_t t1,
                    rv_attn_state *states, const int64_t *row_pos, int *vis, float *extra,
                    const rv_ops *ops)
{
    const rv_tt *c = (const rv_tt *)src->cache;
    const rv_tt_layer *L = &c->seqs[seq].layers[src->layer];
    const int d = c->head_dim, G = c->group_tokens, rows = states[0].rows;
    const int64_t ncold = cold_len(c, L);
    float *params = extra;
    float *qscratch = params + rv_pad16(rv_coldq_param_floats(&c->q));
    float *sscratch = extra + (tt_extra_floats(src, rows) - rv_kv_span_scratch_floats(rows, d));
    /* cold: group by group, every head of a group in turn (memory order), the fused kernel
     * reading the codes and prefetching the segment that comes next */
    int64_t t = t0;
    const int64_t cold_end = t1 < ncold ? t1 : ncold;
    if (c->turbo && t < cold_end) {
        tt_fold_turbo(c, L, h0, nh, t, cold_end, states, row_pos, vis, extra, ops);
        t = cold_end;
    }
    while (t < cold_end) {
        const int64_t gi = L->first + (t + L->skip) / G;
        const int a = (int)((t + L->skip) % G);
        const int n = G - a < cold_end - t ? G - a : (int)(cold_end - t);
        const int *vv = rv_kv_visible(row_pos, rows, t, n, vis);
        for (int j = 0; j < nh; j++) {
            rv_coldq_head view;
            struct rv_qhead qh;
            rv_coldq_head_view(&c->q, RV_TT_BLOB(L->groups[gi]), h0 + j, &view);
            rv_coldq_qhead(&c->q, &view, params, &qh, ops);
            /* the next segment in memory: where it starts is in this group's header (in cache)
             * or right after the next group's; its size up to its outlier part (reading that
             * part's counts now would wait for memory before the kernel could start) */
            if (j + 1 < nh) {
                qh.prefetch = rv_coldq_head_start(RV_TT_BLOB(L->groups[gi]), h0 + j + 1);
                qh.prefetch_bytes = rv_coldq_segment_bytes(&c->q, 0, 0);
            } else if (t + n < cold_end) {
                qh.prefetch = RV_TT_BLOB(L->groups[gi + 1]) + 4 * (size_t)c->num_kv_heads;
                qh.prefetch_bytes = rv_coldq_segment_bytes(&c->q, 0, 0);
            }
            ops->attend_qgroup(&states[j], &qh, a, n, vv, qscratch);
        }
        t += n;
    }
    /* hot: the ring's part of the range, at most two runs (it wraps) */
    while (t < t1) {
        const int64_t pos = (L->hot_head + (t - ncold)) % L->hot_cap;
        const int64_t n = L->hot_cap - pos < t1 - t ? L->hot_cap - pos : t1 - t;
        const int *vv = rv_kv_visible(row_pos, rows, t, n, vis);
        const ptrdiff_t head_stride = (ptrdiff_t)L->hot_cap * d;
        if (rows <= RV_KV_STREAM_ROWS) {
            ops->attend_heads_f16(states, nh, ring_row(c, L, 0, h0, pos), d, head_stride,
                                  ring_row(c, L, 1, h0, pos), d, head_stride, (int)n, vv);
        } else {
            for (int j = 0; j < nh; j++) {
                rv_kv_span sp = {ring_row(c, L, 0, h0 + j, pos), ring_row(c, L, 1, h0 + j, pos), d, d, (int)n};
                rv_kv_fold_spans(&states[j], &sp, 1, vv, 1, sscratch, ops);
            }
        }
        t += n;
    }
}

int rv_tt_attend(const rv_tt *c, int layer, int num_heads, const rv_kv_query *queries, int nq,
                 float scale, int causal, const rv_ops *ops, int nthreads)
{
    rv_kv_source src = {.cache = c, .layer = layer, .num_heads = num_heads, .num_kv_heads = c->num_kv_heads,
                         .head_dim = c->head_dim, .fold = tt_fold, .extra_floats = tt_extra_floats,
                         .split_align = c->group_tokens};
    return rv_kv_attend(&src, queries, nq, scale, causal, ops, nthreads);
}

/* ---- export / import ---- */

int64_t rv_tt_export_groups(const rv_tt *c, int slot, int layer)
{
    const rv_tt_layer *L = &c->seqs[slot].layers[layer];
    return L->ngroups - L->first;
}

size_t rv_tt_export_bytes(const rv_tt *c, int slot, int layer)
{
    const rv_tt_layer *L = &c->seqs[slot].layers[layer];
    size_t n = 0;
    for (int64_t g = L->first; g < L->ngroups; g++)
        n += L->groups[g]->blob_bytes;
    return n;
}

void rv_tt_export_layer(const rv_tt *c, int slot, int layer, unsigned char *blobs, int64_t *sizes,
                        int32_t *skip, uint16_t *hot_k, uint16_t *hot_v)
{
    const rv_tt_layer *L = &c->seqs[slot].layers[layer];
    const int kvh = c->num_kv_heads, d = c->head_dim;
    for (int64_t g = L->first; g < L->ngroups; g++) {
        memcpy(blobs, RV_TT_BLOB(L->groups[g]), L->groups[g]->blob_bytes);
        blobs += L->groups[g]->blob_bytes;
        sizes[g - L->first] = (int64_t)L->groups[g]->blob_bytes;
    }
    *skip = L->skip;
    for (int64_t i = 0; i < L->hot_len; i++) {
        int64_t pos = (L->hot_head + i) % L->hot_cap;
        for (int h = 0; h < kvh; h++) {
            memcpy(hot_k + ((size_t)i * kvh + h) * d, ring_row(c, L, 0, h, pos), sizeof(uint16_t) * d);
            memcpy(hot_v + ((size_t)i * kvh + h) * d, ring_row(c, L, 1, h, pos), sizeof(uint16_t) * d);
        }
    }
}

int rv_tt_validate_blob(const rv_tt *c, const unsigned char *blob, size_t bytes)
{
    return c->turbo ? rv_turbo_validate(c->turbo, blob, bytes) : rv_coldq_validate(&c->q, blob, bytes);
}

int rv_tt_import_layer(rv_tt *c, int slot, int layer, const unsigned char *blobs, const int64_t *sizes,
                       int64_t ngroups, int32_t skip, const uint16_t *hot_k, const uint16_t *hot_v,
                       int64_t hot_len)
{
    rv_tt_seq *s = &c->seqs[slot];
    rv_tt_layer *L = &s->layers[layer];
    const int kvh = c->num_kv_heads, d = c->head_dim;
    for (int64_t g = 0; g < ngroups; g++) {
        rv_tt_group *grp = group_new(c, (size_t)sizes[g]);
        if (!grp || groups_push(c, L, grp)) {
            if (grp)
                group_drop(c, grp);
            goto fail;
        }
        memcpy(RV_TT_BLOB(grp), blobs, (size_t)sizes[g]);
        blobs += sizes[g];
    }
    L->skip = ngroups ? skip : 0;
    if (hot_len > 0) {
        if (ring_reserve(c, L, 0, hot_len))
            goto fail;
        for (int64_t i = 0; i < hot_len; i++)
            for (int h = 0; h < kvh; h++) {
                memcpy(ring_row(c, L, 0, h, i), hot_k + ((size_t)i * kvh + h) * d, sizeof(uint16_t) * d);
                memcpy(ring_row(c, L, 1, h, i), hot_v + ((size_t)i * kvh + h) * d, sizeof(uint16_t) * d);
            }
        L->hot_len = hot_len;
    }
    hold_groups(L, 0, L->ngroups, +1);       /* counted only now that nothing can fail */
    restat_groups(c, layer, L, 0, L->ngroups);
    c->used[layer] += hot_len;
    return RV_OK;
fail:
    layer_clear(c, L);
    return RV_ENOMEM;
}

void rv_tt_seq_usage(const rv_tt *c, int slot, int layer, rv_tt_usage *u)
{
    const rv_tt_layer *L = &c->seqs[slot].layers[layer];
    u->hot_tokens = L->hot_len;
    u->cold_tokens = cold_len(c, L);
    u->hot_bytes = L->hot ? rv_kv_alloc_size(ring_bytes(c->num_kv_heads, c->head_dim, L->hot_cap)) : 0;
    u->cold_bytes = 0;
    for (int64_t g = 0; g < L->ngroups; g++)
        u->cold_bytes += L->groups[g]->alloc_bytes / (size_t)L->groups[g]->refs;
}
