/* The two-tier KV cache (see rv_twotier.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "rv_limits.h"
#include "attention/rv_attention.h"
#include "kvcache/rv_twotier.h"
#include "kvcache/rv_kvmem.h"

#define meta_alloc(c, n) rv_kv_alloc_counted((n), &(c)->meta_bytes)
#define meta_free(c, p, n) rv_kv_free_counted((p), (n), &(c)->meta_bytes)

static int params_valid(const rv_tt_params *p)
{
    return p->num_layers > 0 && p->num_kv_heads > 0 && p->head_dim > 0 && p->head_dim <= RV_MAX_HEAD_DIM &&
           p->hot_tokens >= 0 && p->hot_tokens <= RV_MAX_HOT_TOKENS && p->group_tokens > 0 &&
           p->group_tokens <= RV_MAX_GROUP_TOKENS && p->group_size > 0 && p->max_tokens > 0 && p->cold >= 0 &&
           p->cold < RV_CODEC_COUNT;
}

/* whether p gives layers code widths of their own (else one codec state serves every layer) */
static int per_layer(const rv_tt_params *p) { return p->turbo_widths != NULL; }

static rv_codec_cfg codec_cfg(const rv_tt_params *p, int layer)
{
    rv_codec_cfg cfg = {p->num_kv_heads, p->head_dim, p->group_tokens, p->group_size, p->turbo_bits, 0.0, 0.0};
    if (per_layer(p)) {
        cfg.key_bits = p->turbo_widths[2 * layer];
        cfg.value_bits = p->turbo_widths[2 * layer + 1];
    }
    return cfg;
}

/* the codec's sizes for layer `layer` of p, or RV_EINVAL */
static int layer_sizes(const rv_tt_params *p, int layer, rv_codec_sizes *sz)
{
    rv_codec_cfg cfg = codec_cfg(p, layer);
    return rv_codecs[p->cold]->sizes(&cfg, sz);
}

/* The codec's sizes over every layer: the smallest blob of any layer, the largest, the
 * largest scratches and the states' bytes together; RV_EINVAL for invalid parameters (widths
 * only with TurboQuant). */
static int codec_sizes(const rv_tt_params *p, rv_codec_sizes *sz)
{
    if (!params_valid(p) || (per_layer(p) && rv_codecs[p->cold] != &rv_codec_turbo))
        return RV_EINVAL;
    int rc = layer_sizes(p, 0, sz);
    for (int l = 1; rc == RV_OK && per_layer(p) && l < p->num_layers; l++) {
        rv_codec_sizes one;
        rc = layer_sizes(p, l, &one);
        sz->state_bytes += one.state_bytes;
        sz->blob_min = one.blob_min < sz->blob_min ? one.blob_min : sz->blob_min;
        sz->blob_max = one.blob_max > sz->blob_max ? one.blob_max : sz->blob_max;
        sz->encode_floats = one.encode_floats > sz->encode_floats ? one.encode_floats : sz->encode_floats;
        sz->decode_floats = one.decode_floats > sz->decode_floats ? one.decode_floats : sz->decode_floats;
    }
    return rc;
}

/* bytes of one group of every layer, each its smallest (largest) blob plus header; 0 for
 * invalid parameters */
static size_t layers_alloc_bytes(const rv_tt_params *p, int most)
{
    size_t total = 0;
    for (int l = 0; l < p->num_layers; l++) {
        rv_codec_sizes sz;
        if (layer_sizes(p, per_layer(p) ? l : 0, &sz) != RV_OK)
            return 0;
        total += rv_kv_alloc_size(RV_TT_GROUP_HDR + (most ? sz.blob_max : sz.blob_min));
    }
    return total;
}

static size_t ring_bytes(int kvh, int d, int64_t cap) { return 2 * 2 * (size_t)kvh * (size_t)cap * (size_t)d; }

/* the work buffer: the hot rows of one group as binary16 [2][kvh][G][d] (migration input),
 * then the codec's encoding scratch, or (inspection) one head's decoded K and V and the
 * codec's decoding scratch */
static size_t work_floats(const rv_tt_params *p, const rv_codec_sizes *sz)
{
    const size_t rows = (size_t)p->group_tokens * p->head_dim;
    const size_t gather = rv_pad16((size_t)p->num_kv_heads * rows);      /* 2 x binary16 = 1 float */
    const size_t decode = 2 * rv_pad16(rows) + rv_pad16(sz->decode_floats);
    const size_t encode = rv_pad16(sz->encode_floats);
    return gather + (encode > decode ? encode : decode);
}

size_t rv_tt_group_alloc_bytes(const rv_tt_params *p, int most)
{
    rv_codec_sizes sz;
    if (codec_sizes(p, &sz) != RV_OK)
        return 0;
    return rv_kv_alloc_size(RV_TT_GROUP_HDR + (most ? sz.blob_max : sz.blob_min));
}

size_t rv_tt_layer_group_alloc_bytes(const rv_tt_params *p, int layer, int most)
{
    rv_codec_sizes sz;
    if (codec_sizes(p, &sz) != RV_OK || layer < 0 || layer >= p->num_layers ||
        layer_sizes(p, per_layer(p) ? layer : 0, &sz) != RV_OK)
        return 0;
    return rv_kv_alloc_size(RV_TT_GROUP_HDR + (most ? sz.blob_max : sz.blob_min));
}

size_t rv_tt_groups_alloc_bytes(const rv_tt_params *p, int most)
{
    rv_codec_sizes sz;
    return codec_sizes(p, &sz) == RV_OK ? layers_alloc_bytes(p, most) : 0;
}

size_t rv_tt_hot_alloc_bytes(const rv_tt_params *p, int64_t tokens)
{
    return tokens > 0 ? rv_kv_alloc_size(ring_bytes(p->num_kv_heads, p->head_dim, tokens)) : 0;
}

size_t rv_tt_fixed_bytes(const rv_tt_params *p)
{
    rv_codec_sizes sz;
    if (codec_sizes(p, &sz) != RV_OK)
        return 0;
    return sizeof(rv_tt) + rv_kv_alloc_size(2 * sizeof(int64_t) * (size_t)p->num_layers) + sz.state_bytes +
           rv_kv_alloc_size(sizeof(void *) * (size_t)p->num_layers) +
           rv_kv_alloc_size(sizeof(float) * work_floats(p, &sz));
}

/* the most bytes the cache's cold groups can take (saturating): max_tokens of every layer in
 * its largest groups */
static size_t cold_capacity_bytes(const rv_tt_params *p)
{
    const size_t groups = (size_t)((p->max_tokens + p->group_tokens - 1) / p->group_tokens);
    size_t bytes;
    return rv_kv_mul(groups, layers_alloc_bytes(p, 1), &bytes) ? SIZE_MAX : bytes;
}

/* The distinct largest group sizes (header included) of p's layers, ascending, into
 * sizes[RV_SLAB_MAX_CLASSES]: how many, or 0 if there are more. */
static int layer_group_sizes(const rv_tt_params *p, size_t *sizes)
{
    int n = 0;
    for (int l = 0; l < p->num_layers; l++) {
        rv_codec_sizes sz;
        if (layer_sizes(p, l, &sz) != RV_OK)
            return 0;
        const size_t b = rv_kv_alloc_size(RV_TT_GROUP_HDR + sz.blob_max);
        int i = 0;
        while (i < n && sizes[i] < b)
            i++;
        if (i < n && sizes[i] == b)
            continue;
        if (n == RV_SLAB_MAX_CLASSES)
            return 0;
        memmove(sizes + i + 1, sizes + i, sizeof(size_t) * (size_t)(n - i));
        sizes[i] = b;
        n++;
    }
    return n;
}

/* The slab classes of p's groups; whether the capacity fills a slab (the policy: see the
 * header). Layers with code widths of their own have groups of one size each: a class of
 * each size (unless uniform_slabs), so that a group takes a block of its own size (while its
 * class has one to give: else a free block of a larger class, as rv_slab_alloc does). */
static int slab_init(rv_slab_heap *h, const rv_tt_params *p, const rv_codec_sizes *sz)
{
    size_t sizes[RV_SLAB_MAX_CLASSES];
    const int n = per_layer(p) && !p->uniform_slabs ? layer_group_sizes(p, sizes) : 0;
    const size_t smallest = p->uniform_slabs ? sz->blob_max : sz->blob_min;
    const int rc = n > 0 ? rv_slab_init_sizes(h, sizes, n)
                         : rv_slab_init(h, RV_TT_GROUP_HDR + smallest, RV_TT_GROUP_HDR + sz->blob_max);
    return rc == RV_OK && cold_capacity_bytes(p) >= h->slab_bytes;
}

int rv_tt_uses_slabs(const rv_tt_params *p)
{
    rv_codec_sizes sz;
    rv_slab_heap h;
    return codec_sizes(p, &sz) == RV_OK && slab_init(&h, p, &sz);
}

size_t rv_tt_cold_store_bytes(const rv_tt_params *p, int slabs)
{
    rv_codec_sizes sz;
    rv_slab_heap h;
    if (codec_sizes(p, &sz) != RV_OK)
        return 0;
    const size_t pooled = cold_capacity_bytes(p);
    if (!slabs || !slab_init(&h, p, &sz) || pooled == SIZE_MAX)
        return pooled;
    /* whole slabs of the largest blocks (block_max: the last class), a block per group */
    const size_t block = h.class_bytes[h.nclasses - 1], per_slab = (h.slab_bytes - RV_SLAB_HDR) / block;
    const size_t groups = (size_t)((p->max_tokens + p->group_tokens - 1) / p->group_tokens) * (size_t)p->num_layers;
    size_t bytes;
    return rv_kv_mul((groups + per_slab - 1) / per_slab, h.slab_bytes, &bytes) ? SIZE_MAX : bytes;
}

int rv_tt_create(rv_tt **out, const rv_tt_params *p)
{
    *out = NULL;
    rv_codec_sizes sz;
    int rc = codec_sizes(p, &sz);
    if (rc != RV_OK)
        return rc;
    rv_tt *c = (rv_tt *)calloc(1, sizeof(rv_tt));
    if (!c)
        return RV_ENOMEM;
    c->meta_bytes = sizeof(rv_tt);
    c->num_layers = p->num_layers;
    c->num_kv_heads = p->num_kv_heads;
    c->head_dim = p->head_dim;
    c->hot_tokens = p->hot_tokens;
    c->group_tokens = p->group_tokens;
    c->max_tokens = p->max_tokens;
    c->codec = rv_codecs[p->cold];
    c->pool_class = -1;
    c->work_floats = work_floats(p, &sz);
    c->use_slabs = slab_init(&c->slabs, p, &sz);
    c->codec_per_layer = per_layer(p);
    c->codec_states = (void **)meta_alloc(c, sizeof(void *) * (size_t)p->num_layers);
    if (c->codec_states) {
        memset(c->codec_states, 0, sizeof(void *) * (size_t)p->num_layers);
        for (int l = 0; rc == RV_OK && l < (c->codec_per_layer ? p->num_layers : 1); l++) {
            rv_codec_cfg cfg = codec_cfg(p, l);
            rc = c->codec->create(&cfg, &c->codec_states[l]);
        }
        for (int l = 1; rc == RV_OK && !c->codec_per_layer && l < p->num_layers; l++)
            c->codec_states[l] = c->codec_states[0];
    }
    if (rc == RV_OK)
        c->meta_bytes += sz.state_bytes;
    c->used = (int64_t *)meta_alloc(c, 2 * sizeof(int64_t) * (size_t)p->num_layers);
    c->work = (float *)meta_alloc(c, sizeof(float) * c->work_floats);
    if (rc != RV_OK || !c->codec_states || !c->used || !c->work) {
        rv_tt_destroy(c);
        return rc != RV_OK ? rc : RV_ENOMEM;
    }
    memset(c->used, 0, 2 * sizeof(int64_t) * (size_t)p->num_layers);
    c->stored = c->used + p->num_layers;
    *out = c;
    return RV_OK;
}

void rv_tt_use_pool(rv_tt *c, rv_pool *pool, int cls)
{
    c->pool = pool;
    c->pool_class = cls;
}

/* ---- cold groups ---- */

_Static_assert(sizeof(rv_tt_group) <= RV_TT_GROUP_HDR, "the group header outgrew its room");

size_t rv_tt_slab_mapped_bytes(const rv_tt *c) { return c->slabs.mapped_bytes; }
size_t rv_tt_slab_slack_bytes(const rv_tt *c) { return c->slabs.mapped_bytes - c->cold_slab_bytes; }

/* a new group with one reference and no holder yet: stored 0 until its list holds it */
static rv_tt_group *group_new(rv_tt *c, size_t blob_bytes)
{
    const size_t n = RV_TT_GROUP_HDR + blob_bytes;
    rv_tt_group *g = NULL;
    size_t taken = rv_kv_alloc_size(n);
    int origin = RV_TT_FROM_HEAP, cls = -1;
    struct rv_slab *slab = NULL;
    int pool_cls = c->pool ? c->pool_class : -1;
    while (pool_cls >= 0 && pool_cls < c->pool->nclasses && n > c->pool->cls[pool_cls].nbytes)
        pool_cls++;
    if (pool_cls >= 0 && pool_cls < c->pool->nclasses) {
        g = (rv_tt_group *)rv_pool_acquire(c->pool, pool_cls);
        taken = c->pool->cls[pool_cls].nbytes;
        origin = RV_TT_FROM_POOL;
        cls = pool_cls;
    } else {
        if (c->use_slabs)
            g = (rv_tt_group *)rv_slab_alloc(&c->slabs, n, &slab, &cls);
        if (g)
            origin = RV_TT_FROM_SLAB;
        else                  /* small cache, or no slab could be mapped */
            g = (rv_tt_group *)rv_kv_alloc(n);
    }
    if (!g)
        return NULL;
    memset(g, 0, sizeof *g);
    g->refs = 1;
    g->origin = origin;
    g->size_class = cls;
    g->slab = slab;
    g->blob_bytes = blob_bytes;
    g->alloc_bytes = taken;
    c->cold_bytes += taken;
    c->cold_pooled_bytes += origin == RV_TT_FROM_POOL ? taken : 0;
    c->cold_slab_bytes += origin == RV_TT_FROM_SLAB ? taken : 0;
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
        if (g->origin == RV_TT_FROM_POOL) {
            c->cold_pooled_bytes -= g->alloc_bytes;
            rv_pool_release(c->pool, g->size_class, g);
        } else if (g->origin == RV_TT_FROM_SLAB) {
            c->cold_slab_bytes -= g->alloc_bytes;
            rv_slab_free(&c->slabs, g->slab, g->size_class, g);
        } else {
            rv_kv_free(g);
        }
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
    return L->ngroups > L->first ? (L->ngroups - L->first) * c->group_tokens - L->skip - L->cut : 0;
}

/* the tokens [*a, *b) of live group i of L that L sees */
RV_INLINE void seen_range(const rv_tt *c, const rv_tt_layer *L, int64_t i, int32_t *a, int32_t *b)
{
    *a = i == L->first ? L->skip : 0;
    *b = i == L->ngroups - 1 ? c->group_tokens - L->cut : c->group_tokens;
}

/* ---- the budget: slots charged, tokens stored (rv_twotier.h) ---- */

/* n more hot tokens in `layer` (n < 0: fewer), or tokens moving between the tiers: each is
 * a slot charged and a token stored */
RV_INLINE void count_tokens(rv_tt *c, int layer, int64_t n)
{
    c->used[layer] += n;
    c->stored[layer] += n;
}

/* what a group storing `stored` tokens is charged: its whole allocation while it stores any */
RV_INLINE int32_t group_charge(const rv_tt *c, int32_t stored) { return stored > 0 ? c->group_tokens : 0; }

/* Count (sign +1) or uncount (-1) L as a full holder of its live groups in [lo, hi). */
static void hold_groups(const rv_tt *c, rv_tt_layer *L, int64_t lo, int64_t hi, int sign)
{
    if (lo < L->first)
        lo = L->first;
    if (hi > L->ngroups)
        hi = L->ngroups;
    for (int64_t i = lo; i < hi; i++) {
        int32_t a, b;
        seen_range(c, L, i, &a, &b);
        if (a == 0 && b == c->group_tokens)
            L->groups[i]->full += sign;
    }
}

/* The tokens of a group its holders see, from their ranges: prefixes [0, e) (its last
 * group, cut), suffixes [s, G) (its first, skipped) and middles [s, e) (both: a view of one
 * group). With prefixes up to P and suffixes from S, the union is [0, P) and [S, G), plus what
 * middles add in between, which is counted token by token (rare: cut and skip in one group). */
typedef struct {
    int32_t prefix_end, suffix_start;
    int middles;
} rv_tt_cover;

RV_INLINE void cover_add(rv_tt_cover *cv, int32_t a, int32_t b, int32_t G)
{
    if (a == 0)
        cv->prefix_end = b > cv->prefix_end ? b : cv->prefix_end;
    else if (b == G)
        cv->suffix_start = a < cv->suffix_start ? a : cv->suffix_start;
    else
        cv->middles = 1;
}

/* whether a live holder of g in `layer` sees token t of it */
static int token_held(const rv_tt *c, int layer, const rv_tt_group *g, int32_t t);

static int32_t cover_count(const rv_tt *c, int layer, const rv_tt_group *g, const rv_tt_cover *cv)
{
    const int32_t G = c->group_tokens, P = cv->prefix_end, S = cv->suffix_start;
    if (P >= S)
        return G;
    if (!cv->middles)
        return P + (G - S);
    int32_t held = P + (G - S);
    for (int32_t t = P; t < S; t++)
        held += token_held(c, layer, g, t);
    return held;
}

/* what g stores: the tokens some live holder sees (0: none holds it) */
static int32_t group_stored(const rv_tt *c, int layer, const rv_tt_group *g)
{
    if (g->full > 0)
        return c->group_tokens;
    /* every live holder sees part of it: it is their first or last live group */
    rv_tt_cover cv = {0, c->group_tokens, 0};
    for (int i = 0; i < c->nslots; i++) {
        const rv_tt_seq *s = &c->seqs[i];
        if (!s->live)
            continue;
        const rv_tt_layer *L = &s->layers[layer];
        if (L->ngroups <= L->first)
            continue;
        for (int end = 0; end < 2; end++) {
            const int64_t gi = end ? L->ngroups - 1 : L->first;
            if (L->groups[gi] != g || (end && gi == L->first))
                continue;
            int32_t a, b;
            seen_range(c, L, gi, &a, &b);
            cover_add(&cv, a, b, c->group_tokens);
        }
    }
    return cover_count(c, layer, g, &cv);
}

static void restat_group(rv_tt *c, int layer, rv_tt_group *g)
{
    const int32_t stored = group_stored(c, layer, g);
    c->stored[layer] += stored - g->stored;
    c->used[layer] += group_charge(c, stored) - group_charge(c, g->stored);
    g->stored = stored;
}

/* after its holders' views changed: recount what the groups [lo, hi) of L store */
static void restat_groups(rv_tt *c, int layer, const rv_tt_layer *L, int64_t lo, int64_t hi)
{
    if (hi > L->ngroups)
        hi = L->ngroups;
    for (int64_t i = lo; i < hi; i++)
        restat_group(c, layer, L->groups[i]);
}

/* Move L's view to its first `first` groups, `skip` tokens of the first gone (eviction) or back
 * (rollback) and `cut` tokens of the last, keeping the full counts and what the touched groups
 * store exact. A view with no token left sees no group (first = ngroups, no skip or cut). */
static void move_view(rv_tt *c, int layer, rv_tt_layer *L, int64_t first, int32_t skip, int32_t cut)
{
    if (first >= L->ngroups || (first == L->ngroups - 1 && skip + cut >= c->group_tokens)) {
        first = L->ngroups;
        skip = cut = 0;
    }
    const int64_t lo = first < L->first ? first : L->first;
    const int64_t hi = L->ngroups;        /* the last group's fullness depends on cut */
    hold_groups(c, L, lo, hi, -1);
    L->first = first;
    L->skip = skip;
    L->cut = cut;
    hold_groups(c, L, lo, hi, +1);
    restat_groups(c, layer, L, lo, hi);
}

static int slot_listed(int slot, const int *slots, int n)
{
    for (int i = 0; i < n; i++)
        if (slots[i] == slot)
            return 1;
    return 0;
}

static int token_held(const rv_tt *c, int layer, const rv_tt_group *g, int32_t t)
{
    for (int i = 0; i < c->nslots; i++) {
        const rv_tt_seq *s = &c->seqs[i];
        if (!s->live)
            continue;
        const rv_tt_layer *L = &s->layers[layer];
        for (int64_t gi = L->first; gi < L->ngroups; gi++) {
            if (L->groups[gi] != g)
                continue;
            int32_t a, b;
            seen_range(c, L, gi, &a, &b);
            if (a <= t && t < b)
                return 1;
        }
    }
    return 0;
}

int64_t rv_tt_used_without(rv_tt *c, int layer, const int *slots, int n)
{
    int64_t used = 0;
    c->epoch++;
    for (int i = 0; i < c->nslots; i++) {
        const rv_tt_seq *s = &c->seqs[i];
        if (!s->live || slot_listed(i, slots, n))
            continue;
        const rv_tt_layer *L = &s->layers[layer];
        used += L->hot_len;
        for (int64_t gi = L->first; gi < L->ngroups; gi++) {
            rv_tt_group *g = L->groups[gi];
            if (g->mark != c->epoch) {      /* held by a remaining sequence: charged once, whole */
                g->mark = c->epoch;
                used += c->group_tokens;
            }
        }
    }
    return used;
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

/* The first `lead` rows of every head of the gather buffer, k and v [kvh][G][d] binary16: the
 * tokens [a, a + lead) of L's last (truncated) group, decoded (so that a new group can take
 * them after a truncation inside a group; they are quantized again once). */
static void gather_reopened(const rv_tt *c, int layer, const rv_tt_layer *L, int32_t a, int32_t lead, uint16_t *k,
                            uint16_t *v, const rv_ops *ops)
{
    const int G = c->group_tokens, d = c->head_dim;
    const size_t rows = (size_t)G * d;
    float *kf = c->work + rv_pad16((size_t)c->num_kv_heads * rows), *vf = kf + rv_pad16(rows);
    float *scratch = vf + rv_pad16(rows);
    const unsigned char *blob = RV_TT_BLOB(L->groups[L->ngroups - 1]);
    for (int h = 0; h < c->num_kv_heads; h++) {
        c->codec->decode_head(c->codec_states[layer], blob, h, kf, vf, scratch, ops);
        ops->f32_to_f16(kf + (size_t)a * d, k + (size_t)h * rows, (size_t)lead * d);
        ops->f32_to_f16(vf + (size_t)a * d, v + (size_t)h * rows, (size_t)lead * d);
    }
}

/* A group of the lead reopened tokens (above) and the oldest G - lead hot tokens. */
static rv_tt_group *encode_group(rv_tt *c, int layer, const rv_tt_layer *L, int32_t a, int32_t lead, const rv_ops *ops)
{
    const int kvh = c->num_kv_heads, d = c->head_dim, G = c->group_tokens;
    const size_t rows = (size_t)G * d;
    uint16_t *k = (uint16_t *)c->work, *v = k + (size_t)kvh * rows;
    float *scratch = c->work + rv_pad16((size_t)kvh * rows);
    if (lead > 0)
        gather_reopened(c, layer, L, a, lead, k, v, ops);
    for (int h = 0; h < kvh; h++) {
        ring_gather(c, L, 0, h, L->hot_head, G - lead, k + (size_t)h * rows + (size_t)lead * d);
        ring_gather(c, L, 1, h, L->hot_head, G - lead, v + (size_t)h * rows + (size_t)lead * d);
    }
    /* the size depends on the outlier channels the data has */
    const void *state = c->codec_states[layer];
    rv_tt_group *g = group_new(c, c->codec->encoded_bytes(state, k, v, scratch, ops));
    if (g)
        c->codec->encode(state, k, v, RV_TT_BLOB(g), scratch, ops);
    return g;
}

/* Drop L's last live group (uncounting L as its holder); the one before becomes the last. */
static void pop_last_group(rv_tt *c, int layer, rv_tt_layer *L)
{
    const int64_t last = L->ngroups - 1;
    rv_tt_group *g = L->groups[last];
    hold_groups(c, L, last - 1, last + 1, -1);
    L->ngroups--;
    L->cut = 0;
    if (L->first >= L->ngroups) {
        L->first = L->ngroups;
        L->skip = 0;
    }
    hold_groups(c, L, last - 1, last, +1);
    if (last - 1 >= L->first)
        restat_group(c, layer, L->groups[last - 1]);
    restat_group(c, layer, g);
    group_drop(c, g);
}

static int migrate(rv_tt *c, int layer, rv_tt_layer *L, const rv_ops *ops)
{
    const int64_t G = c->group_tokens;
    int rc = RV_OK;
    while (L->hot_len >= (int64_t)c->hot_tokens + G) {
        /* after a truncation inside a group: that group's tokens open the new one */
        int32_t a = 0, lead = 0;
        if (L->cut > 0 && L->ngroups > L->first) {
            int32_t b;
            seen_range(c, L, L->ngroups - 1, &a, &b);
            lead = b - a;
            /* the new group is charged G; what the old one is charged without L must leave room */
            rv_tt_group *old = L->groups[L->ngroups - 1];
            const int32_t before = group_charge(c, old->stored);
            L->ngroups--;
            const int32_t after = group_charge(c, group_stored(c, layer, old));
            L->ngroups++;
            if (c->used[layer] + lead - (before - after) > c->max_tokens) {
                rc = RV_EFULL;    /* its other holders keep it: the tokens stay hot for now */
                break;
            }
        }
        rv_tt_group *g = encode_group(c, layer, L, a, lead, ops);
        if (!g) {
            rc = RV_ENOMEM;
            break;
        }
        if (lead > 0)
            pop_last_group(c, layer, L);     /* its tokens are in g */
        if (groups_push(c, L, g)) {
            group_drop(c, g);
            rc = RV_ENOMEM;   /* (after a reopening the lead tokens stay dropped: not reached in
                                 practice, the list just shrank) */
            break;
        }
        g->full = 1;          /* G tokens move from the hot count to the cold one */
        g->stored = (int32_t)G;
        count_tokens(c, layer, lead);   /* the reopened ones, counted again (the old group's
                                           restat uncounted them) */
        L->hot_head = (L->hot_head + G - lead) % L->hot_cap;
        L->hot_len -= G - lead;
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
    meta_free(c, c->victims, sizeof(int) * (size_t)c->victims_cap);
    rv_kv_free(c->used);
    rv_kv_free(c->work);
    rv_slab_destroy(&c->slabs);     /* empty by now: every group was dropped */
    for (int l = 0; c->codec_states && l < (c->codec_per_layer ? c->num_layers : 1); l++)
        if (c->codec_states[l])
            c->codec->destroy(c->codec_states[l]);
    meta_free(c, c->codec_states, sizeof(void *) * (size_t)c->num_layers);
    free(c);
}

int rv_tt_add(rv_tt *c, int *slot)
{
    /* the eviction order has room for every slot: it grows before the slot array does (as
     * rv_kv_slot_new will: no dead slot to reuse), so that eviction allocates nothing */
    int dead = 0;
    for (int j = 0; j < c->nslots && !dead; j++)
        dead = !c->seqs[j].live;
    if (!dead && c->nslots == c->slot_cap) {
        const int cap = c->slot_cap ? 2 * c->slot_cap : 8;
        int *victims = (int *)meta_alloc(c, sizeof(int) * (size_t)cap);
        if (!victims)
            return RV_ENOMEM;
        meta_free(c, c->victims, sizeof(int) * (size_t)c->victims_cap);
        c->victims = victims;
        c->victims_cap = cap;
    }
    int i, rc = rv_kv_slot_new((void **)&c->seqs, &c->nslots, &c->slot_cap, sizeof(rv_tt_seq), &c->meta_bytes, &i);
    if (rc)
        return rc;
    rv_tt_seq *s = &c->seqs[i];
    s->layers = (rv_tt_layer *)meta_alloc(c, sizeof(rv_tt_layer) * (size_t)c->num_layers);
    if (!s->layers)
        return RV_ENOMEM;
    memset(s->layers, 0, sizeof(rv_tt_layer) * (size_t)c->num_layers);
    s->live = 1;
    s->birth = c->births++;
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
        move_view(c, l, L, L->ngroups, 0, 0);      /* sees none of its groups any more */
        count_tokens(c, l, -L->hot_len);
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
            if (groups_push(c, L, P->groups[g])) {
                for (int64_t j = 0; j < L->ngroups; j++)     /* not counted as a holder yet */
                    group_drop(c, L->groups[j]);
                L->ngroups = 0;
                goto fail;
            }
            group_share(c, P->groups[g]);
        }
        L->skip = P->skip;
        L->cut = P->cut;
        hold_groups(c, L, 0, L->ngroups, +1);   /* it sees what the parent sees: no group stores more */
        if (P->hot_len) {
            if (ring_reserve(c, L, 0, P->hot_len))
                goto fail;
            for (int kv = 0; kv < 2; kv++)
                for (int h = 0; h < c->num_kv_heads; h++)
                    ring_gather(c, P, kv, h, P->hot_head, P->hot_len, ring_row(c, L, kv, h, 0));
            L->hot_len = P->hot_len;
            count_tokens(c, l, L->hot_len);
        }
    }
    *child = i;
    return RV_OK;
fail:
    rv_tt_release(c, i);      /* what the copy counted so far (its groups store no more) */
    return RV_ENOMEM;
}

/* ---- eviction and truncation ---- */

static void evict_layer(rv_tt *c, rv_tt_seq *s, rv_tt_layer *L, int layer, int64_t n)
{
    const int64_t G = c->group_tokens, cold = cold_len(c, L), from_cold = n < cold ? n : cold;
    if (from_cold > 0)
        move_view(c, layer, L, L->first + (L->skip + from_cold) / G, (int32_t)((L->skip + from_cold) % G), L->cut);
    n -= from_cold;
    if (n > 0) {
        count_tokens(c, layer, -n);
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

int rv_tt_truncate(rv_tt *c, int slot, int64_t n)
{
    if (c->open_txns || n < 0)
        return RV_EINVAL;
    rv_tt_seq *s = &c->seqs[slot];
    const int64_t G = c->group_tokens;
    for (int l = 0; l < c->num_layers; l++) {
        rv_tt_layer *L = &s->layers[l];
        const int64_t cold = cold_len(c, L);
        if (n >= cold + L->hot_len)
            continue;
        if (n >= cold) {                      /* the newest hot tokens go */
            count_tokens(c, l, -(cold + L->hot_len - n));
            L->hot_len = n - cold;
            continue;
        }
        count_tokens(c, l, -L->hot_len);
        L->hot_len = 0;
        L->hot_head = 0;
        /* the groups past the n-th cold token go; the cut falls inside the last one kept */
        int64_t last = n > 0 ? L->first + (L->skip + n - 1) / G : L->first - 1;
        while (L->ngroups - 1 > last)
            pop_last_group(c, l, L);
        if (L->ngroups > L->first)
            move_view(c, l, L, L->first, L->skip, (int32_t)(G - 1 - (L->skip + n - 1) % G));
    }
    return RV_OK;
}

/* ---- room for appends: the eviction policy ---- */

/* The oldest tokens L must drop to give up its oldest n (n <= its length): a cold one goes
 * with the rest of its group, whose allocation -- and charge -- goes only with its last token
 * (dropping part of a group would free no room). */
static int64_t evict_extent(const rv_tt *c, const rv_tt_layer *L, int64_t n)
{
    const int64_t G = c->group_tokens, cold = cold_len(c, L);
    if (n >= cold)
        return n;                         /* every group goes, then hot tokens one by one */
    const int64_t to_group_end = (L->skip + n + G - 1) / G * G - L->skip;
    return to_group_end < cold ? to_group_end : cold;
}

/* the fullest layer in [lo, hi) */
static int fullest_layer(const rv_tt *c, int lo, int hi)
{
    int best = lo;
    for (int l = lo; l < hi; l++)
        if (c->used[l] > c->used[best])
            best = l;
    return best;
}

int rv_tt_make_room(rv_tt *c, const int *slots, const int64_t *n, int nseq, int layer, int evict, int *bind)
{
    const int lo = layer < 0 ? 0 : layer, hi = layer < 0 ? c->num_layers : layer + 1;
    int64_t requested = 0;
    for (int i = 0; i < nseq; i++)
        requested += n[i];
    *bind = fullest_layer(c, lo, hi);
    int64_t over = c->used[*bind] + requested - c->max_tokens;
    if (over <= 0)
        return RV_TT_ROOM_OK;
    if (!evict)
        return RV_TT_ROOM_FULL;
    if (requested > c->max_tokens)
        return RV_TT_ROOM_TOO_MANY;
    if (c->victims_cap < c->nslots)          /* (rv_tt_add keeps it large enough) */
        return RV_TT_ROOM_NOMEM;
    /* which sequences may give up tokens: all, or with a transaction open those on the
     * requesters' side of it */
    int side = -1;          /* -1: any; 1: inside the transaction; 0: outside */
    if (c->open_txns) {
        int inside = 0;
        for (int i = 0; i < nseq; i++)
            inside += c->seqs[slots[i]].in_txn;
        if (inside != 0 && inside != nseq)
            return RV_TT_ROOM_MIXED;
        side = inside ? 1 : 0;
    }
    /* the victims: the requesters, then the others longest first (older first among equals) */
    int nv = 0;
    for (int i = 0; i < nseq; i++)
        if (side < 0 || c->seqs[slots[i]].in_txn == side)
            c->victims[nv++] = slots[i];
    const int first_other = nv;
    for (int i = 0; i < c->nslots; i++) {
        const rv_tt_seq *s = &c->seqs[i];
        if (!s->live || slot_listed(i, slots, nseq) || (side >= 0 && s->in_txn != side))
            continue;
        /* insertion: by length in layer 0 descending, then birth ascending */
        const int64_t len = rv_tt_len(c, i, 0);
        int j = nv++;
        while (j > first_other) {
            const int p = c->victims[j - 1];
            const int64_t plen = rv_tt_len(c, p, 0);
            if (plen > len || (plen == len && c->seqs[p].birth < s->birth))
                break;
            c->victims[j] = p;
            j--;
        }
        c->victims[j] = i;
    }
    /* inside a transaction only those victims may give up tokens: is that enough? (outside
     * one, emptying every sequence frees everything) */
    if (side >= 0)
        for (int l = lo; l < hi; l++)
            if (rv_tt_used_without(c, l, c->victims, nv) + requested > c->max_tokens)
                return RV_TT_ROOM_TXN_SIDE;
    while (over > 0) {
        int evicted = 0;
        for (int i = 0; i < nv; i++) {
            const int64_t len = rv_tt_len(c, c->victims[i], *bind);
            const int64_t take = evict_extent(c, &c->seqs[c->victims[i]].layers[*bind], over < len ? over : len);
            if (take <= 0)
                continue;
            const int64_t before = c->used[*bind];
            rv_tt_evict(c, c->victims[i], take);
            evicted = 1;
            if (c->used[*bind] < before)
                break;
            /* only tokens others still hold: the next victims drop theirs */
        }
        if (!evicted)
            return RV_TT_ROOM_TXN_SIDE;    /* unreachable: everything evictable is gone */
        *bind = fullest_layer(c, lo, hi);
        over = c->used[*bind] + requested - c->max_tokens;
    }
    return RV_TT_ROOM_OK;
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
    count_tokens(c, layer, n);
    if (!s->in_txn)
        migrate(c, layer, L, ops);   /* out of memory: the tokens stay hot, still correct */
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
        L->s_cut = L->cut;
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
        migrate(c, l, L, ops);
    }
}

void rv_tt_rollback(rv_tt *c, int slot)
{
    rv_tt_seq *s = &c->seqs[slot];
    if (!s->in_txn)
        return;
    for (int l = 0; l < c->num_layers; l++) {
        rv_tt_layer *L = &s->layers[l];
        /* the groups it sees store as before */
        move_view(c, l, L, L->s_first, L->s_skip, L->s_cut);
        count_tokens(c, l, L->s_hot_len - L->hot_len);
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

void rv_tt_read(const rv_tt *c, int slot, int layer, float *k, float *v, const rv_ops *ops)
{
    const rv_tt_layer *L = &c->seqs[slot].layers[layer];
    const int kvh = c->num_kv_heads, d = c->head_dim, G = c->group_tokens;
    const size_t rows = (size_t)G * d;
    float *kf = c->work + rv_pad16((size_t)kvh * rows), *vf = kf + rv_pad16(rows), *scratch = vf + rv_pad16(rows);
    int64_t t = 0;
    for (int64_t gi = L->first; gi < L->ngroups; gi++) {
        int32_t a, b;
        seen_range(c, L, gi, &a, &b);
        for (int h = 0; h < kvh; h++) {
            c->codec->decode_head(c->codec_states[layer], RV_TT_BLOB(L->groups[gi]), h, kf, vf, scratch, ops);
            for (int j = a; j < b; j++) {
                size_t o = ((size_t)(t + j - a) * kvh + h) * d;
                memcpy(k + o, kf + (size_t)j * d, sizeof(float) * d);
                memcpy(v + o, vf + (size_t)j * d, sizeof(float) * d);
            }
        }
        t += b - a;
    }
    for (int64_t i = 0; i < L->hot_len; i++, t++) {
        int64_t pos = (L->hot_head + i) % L->hot_cap;
        for (int h = 0; h < kvh; h++) {
            size_t o = ((size_t)t * kvh + h) * d;
            ops->f16_to_f32(ring_row(c, L, 0, h, pos), k + o, (size_t)d);
            ops->f16_to_f32(ring_row(c, L, 1, h, pos), v + o, (size_t)d);
        }
    }
}

/* ---- attention: the cold groups through the codec, then the hot ring, into one state ---- */

/* the codec's scratch for a task of `rows` rows: decode tasks fold every head (at most
 * RV_STREAM_MAX_ROWS rows), prefill tasks one */
static size_t tt_cold_floats(const rv_tt *c, int layer, int rows)
{
    const void *state = c->codec_states[layer];
    const size_t many = c->codec->attend_scratch_floats(state,
                                                        rows < RV_STREAM_MAX_ROWS ? rows : RV_STREAM_MAX_ROWS,
                                                        c->num_kv_heads);
    const size_t one = c->codec->attend_scratch_floats(state, rows, 1);
    return rv_pad16(many > one ? many : one);
}

/* per-thread scratch of the fold: the codec's, then the span kernels' */
static size_t tt_extra_floats(const rv_kv_source *src, int rows)
{
    const rv_tt *c = (const rv_tt *)src->data;
    return tt_cold_floats(c, src->layer, rows) + rv_kv_span_scratch_floats(rows, c->head_dim);
}

static void tt_fold(const rv_kv_source *src, int seq, int h0, int nh, int64_t t0, int64_t t1,
                    rv_attn_state *states, const int64_t *row_pos, int *vis, float *extra,
                    const rv_ops *ops)
{
    const rv_tt *c = (const rv_tt *)src->data;
    const rv_tt_layer *L = &c->seqs[seq].layers[src->layer];
    const int d = c->head_dim, G = c->group_tokens, rows = states[0].rows;
    const int64_t ncold = cold_len(c, L);
    float *sscratch = extra + tt_cold_floats(c, src->layer, rows);
    const void *state = c->codec_states[src->layer];
    /* cold: group by group, every head of a group in turn (memory order), the codec reading
     * the codes in place and prefetching the segment that comes next */
    int64_t t = t0;
    const int64_t cold_end = t1 < ncold ? t1 : ncold;
    if (t < cold_end) {
        c->codec->attend_begin(state, states, nh, extra, ops);
        while (t < cold_end) {
            const int64_t gi = L->first + (t + L->skip) / G;
            const int a = (int)((t + L->skip) % G);
            const int n = G - a < cold_end - t ? G - a : (int)(cold_end - t);
            const int *vv = rv_kv_visible(row_pos, rows, t, n, vis);
            const unsigned char *blob = RV_TT_BLOB(L->groups[gi]);
            for (int j = 0; j < nh; j++) {
                /* the segment that comes next in memory: the next head, or the next group's first */
                const unsigned char *next = j + 1 < nh ? blob : (t + n < cold_end ? RV_TT_BLOB(L->groups[gi + 1]) : NULL);
                c->codec->attend_group(state, blob, h0 + j, j, nh, a, n, vv, states, next,
                                       j + 1 < nh ? h0 + j + 1 : h0, extra, ops);
            }
            t += n;
        }
        c->codec->attend_end(state, states, nh, extra, ops);
    }
    /* hot: the ring's part of the range, at most two runs (it wraps), in one call: the
     * kernel's blocks then do not depend on where the ring wraps */
    if (t < t1) {
        const ptrdiff_t head_stride = (ptrdiff_t)L->hot_cap * d;
        const int *vv = rv_kv_visible(row_pos, rows, t, t1 - t, vis);
        int64_t pos[2], len[2];
        int nruns = 0;
        for (int64_t u = t; u < t1; nruns++) {
            pos[nruns] = (L->hot_head + (u - ncold)) % L->hot_cap;
            len[nruns] = L->hot_cap - pos[nruns] < t1 - u ? L->hot_cap - pos[nruns] : t1 - u;
            u += len[nruns];
        }
        for (int j = 0; j < (rows <= RV_STREAM_MAX_ROWS ? 1 : nh); j++) {
            rv_kv_span sp[2];
            for (int r = 0; r < nruns; r++)
                sp[r] = (rv_kv_span){ring_row(c, L, 0, h0 + j, pos[r]), ring_row(c, L, 1, h0 + j, pos[r]), d, d,
                                     (int)len[r]};
            if (rows <= RV_STREAM_MAX_ROWS)
                ops->attend_heads_f16(states, nh, sp, nruns, head_stride, head_stride, vv);
            else
                rv_kv_fold_spans(&states[j], sp, nruns, vv, 1, sscratch, ops);
        }
    }
}

void rv_tt_source(const rv_tt *c, int layer, int num_heads, rv_kv_source *src)
{
    /* every format counts as fp16 for the team size: dequantizing costs about what the bytes
     * saved would have */
    *src = (rv_kv_source){.data = c, .layer = layer, .num_heads = num_heads, .num_kv_heads = c->num_kv_heads,
                          .head_dim = c->head_dim, .kv_elem_bytes = 2, .fold = tt_fold,
                          .extra_floats = tt_extra_floats, .split_align = c->group_tokens};
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
                        int32_t *skip, int32_t *cut, uint16_t *hot_k, uint16_t *hot_v)
{
    const rv_tt_layer *L = &c->seqs[slot].layers[layer];
    const int kvh = c->num_kv_heads, d = c->head_dim;
    for (int64_t g = L->first; g < L->ngroups; g++) {
        memcpy(blobs, RV_TT_BLOB(L->groups[g]), L->groups[g]->blob_bytes);
        blobs += L->groups[g]->blob_bytes;
        sizes[g - L->first] = (int64_t)L->groups[g]->blob_bytes;
    }
    *skip = L->skip;
    *cut = L->cut;
    for (int64_t i = 0; i < L->hot_len; i++) {
        int64_t pos = (L->hot_head + i) % L->hot_cap;
        for (int h = 0; h < kvh; h++) {
            memcpy(hot_k + ((size_t)i * kvh + h) * d, ring_row(c, L, 0, h, pos), sizeof(uint16_t) * d);
            memcpy(hot_v + ((size_t)i * kvh + h) * d, ring_row(c, L, 1, h, pos), sizeof(uint16_t) * d);
        }
    }
}

int rv_tt_validate_blob(const rv_tt *c, int layer, const unsigned char *blob, size_t bytes)
{
    return c->codec->validate(c->codec_states[layer], blob, bytes);
}

int rv_tt_import_layer(rv_tt *c, int slot, int layer, const unsigned char *blobs, const int64_t *sizes,
                       int64_t ngroups, int32_t skip, int32_t cut, const uint16_t *hot_k, const uint16_t *hot_v,
                       int64_t hot_len, const rv_ops *ops)
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
    L->cut = ngroups ? cut : 0;
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
    hold_groups(c, L, 0, L->ngroups, +1);       /* counted only now that nothing can fail */
    restat_groups(c, layer, L, 0, L->ngroups);
    count_tokens(c, layer, hot_len);
    /* a hot tier saved by a cache with more hot_tokens: what this one keeps hot, the rest
     * quantized as an append would (out of memory: the tokens stay hot, still correct) */
    migrate(c, layer, L, ops);
    return RV_OK;
fail:
    layer_clear(c, L);
    return RV_ENOMEM;
}

void rv_tt_usage_begin(rv_tt *c) { c->epoch++; }

void rv_tt_seq_usage(rv_tt *c, int slot, int layer, rv_tt_usage *u)
{
    const rv_tt_layer *L = &c->seqs[slot].layers[layer];
    u->hot_tokens = L->hot_len;
    u->cold_tokens = cold_len(c, L);
    u->hot_bytes = L->hot ? rv_kv_alloc_size(ring_bytes(c->num_kv_heads, c->head_dim, L->hot_cap)) : 0;
    u->cold_bytes = 0;
    for (int64_t i = 0; i < L->ngroups; i++) {
        rv_tt_group *g = L->groups[i];
        if (g->mark != c->epoch) {      /* the pass's first holder of g */
            g->mark = c->epoch;
            g->tmp = 0;
        }
        const size_t refs = (size_t)g->refs;
        /* whole bytes that add up to alloc_bytes over its holders (floor alone lost up to
         * refs - 1 bytes a group: the sequences' bytes fell short of the cache's) */
        u->cold_bytes += g->alloc_bytes / refs + ((size_t)g->tmp < g->alloc_bytes % refs);
        g->tmp++;
    }
}
