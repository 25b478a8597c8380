/* The two-tier KV cache: per (sequence, layer) an fp16 hot ring of the most recent tokens and a
 * cold list of immutable quantized groups of `group_tokens` tokens (one migration batch), in
 * whichever cold format its codec (kvcache/rv_codec.h) is: the cache never branches on it.
 *
 * Token order of a (sequence, layer): the live cold groups oldest first (the first `skip`
 * tokens of the first one evicted, the last `cut` tokens of the last one truncated away), then
 * the hot ring from hot_head. Appends go to the hot ring; outside a transaction, whenever the
 * ring holds hot_tokens + group_tokens tokens its oldest group_tokens tokens are quantized into
 * a new cold group (migration). Cold groups are reference counted: fork shares them and copies
 * only the hot ring.
 *
 * Budget (max_tokens, per layer): `used` counts token slots, not the tokens each sequence
 * sees: every sequence's hot tokens (its own copies) plus, once, group_tokens for each cold
 * group that some sequence still holds. A holder sees a range of each of its groups (all of
 * it, but for `skip` evicted tokens of its first live one and `cut` truncated tokens of its
 * last), and a group keeps its whole allocation while any token of it is held, so it is
 * charged whole: charging only the tokens still held let a cut group's empty slots go to new
 * groups, and the live groups outgrew the cold store a memory budget sized (about a group
 * per sequence and layer). A fork costs only its hot tail; evicting a shared token frees room
 * only once no sequence holds it any more, and evicting part of a group frees none (the
 * eviction policy drops whole groups). `stored` counts the tokens themselves (each group's
 * union of its holders' ranges, once), for the stats.
 *
 * Transactions: inside one a sequence never migrates (its hot ring grows instead) and
 * evictions only move its counters (dropped groups are freed at commit, and the ring never
 * reuses slots that a rollback would need), so rollback is exact; commit migrates.
 *
 * Memory: hot rings K then V, each [kv head][hot_cap][head_dim] binary16; cold groups from a
 * buffer pool's size class when one is attached (rv_tt_use_pool), else from the cache's own
 * huge-page slabs (kvcache/rv_slab.h: the decode kernels stream every group, and on the 4 KiB
 * pages malloc hands out they miss the TLB) when its capacity (max_tokens in every layer, in
 * the largest groups) fills at least one slab, else from the C allocator (a small cache must
 * not pay 2 MiB for one group; like a paged pool, whose size is its capacity, a large one
 * pays for what it was sized for). A slab that cannot be mapped falls back to the C
 * allocator. One work buffer for
 * migration and inspection, allocated with the cache. Every byte is counted: hot_bytes,
 * cold_bytes (what each group's allocation really takes: header + blob, aligned), meta_bytes
 * (everything else) and the slabs' slack (their mapped bytes not in groups: class rounding,
 * free blocks, uncarved tails; rv_tt_slab_slack_bytes).
 * Not synchronised: the Python wrapper serialises all calls on one cache. */
#ifndef RV_TWOTIER_H
#define RV_TWOTIER_H

#include <stddef.h>
#include <stdint.h>

#include "rv_common.h"
#include "kernels/rv_ops.h"
#include "memory/rv_memory.h"
#include "kvcache/rv_codec.h"
#include "kvcache/rv_slab.h"

/* A cold group: this header, then its blob (the format's bytes) at RV_TT_GROUP_HDR. */
#define RV_TT_GROUP_HDR 64
typedef struct {
    int32_t refs;            /* group lists holding it (live or evicted awaiting a commit) */
    int32_t full;            /* live holders that see all of it (no skip, no cut) */
    int32_t stored;          /* its tokens some holder sees (counted in `stored`; while > 0
                                `used` charges it group_tokens) */
    int32_t tmp;             /* scratch of a usage pass (rv_tt_usage_begin: holders counted)
                                while mark == epoch */
    int32_t origin;          /* RV_TT_FROM_*: where its memory came from */
    int32_t size_class;      /* from a slab or the pool: its size class there */
    uint64_t mark;
    size_t blob_bytes;
    size_t alloc_bytes;      /* what the allocation really takes (header + blob, aligned) */
    struct rv_slab *slab;    /* from a slab: which one */
} rv_tt_group;
enum { RV_TT_FROM_HEAP = 0, RV_TT_FROM_POOL = 1, RV_TT_FROM_SLAB = 2 };
#define RV_TT_BLOB(g) ((unsigned char *)(g) + RV_TT_GROUP_HDR)

typedef struct {
    rv_tt_group **groups;    /* [0, first) are evicted ones awaiting a commit */
    int64_t ngroups, gcap, first;
    int32_t skip;            /* evicted leading tokens of groups[first] */
    int32_t cut;             /* truncated trailing tokens of groups[ngroups - 1] */
    uint16_t *hot;
    int64_t hot_cap, hot_head, hot_len;
    /* transaction snapshot */
    int64_t s_first, s_hot_head, s_hot_len, s_hot_cap;
    int32_t s_skip, s_cut;
    int64_t txn_hot_evicted;  /* hot tokens evicted since begin (their slots stay reserved) */
} rv_tt_layer;

typedef struct {
    int live, in_txn;
    rv_tt_layer *layers;
    int64_t evicted, s_evicted;   /* tokens evicted from it (most of any layer); at begin */
    uint64_t birth;               /* creation order (eviction picks the oldest of equals) */
} rv_tt_seq;

typedef struct {
    int num_layers, num_kv_heads, head_dim;
    int hot_tokens, group_tokens;
    const rv_codec *codec;   /* the cold format */
    void **codec_states;     /* [num_layers] each layer's state: one shared by every layer
                                unless they have widths of their own */
    int codec_per_layer;     /* codec_states are distinct (each destroyed) */
    int64_t max_tokens;
    int64_t *used;           /* [num_layers] slots charged against max_tokens (the budget above) */
    int64_t *stored;         /* [num_layers] tokens stored (the budget above; one allocation
                                with `used`) */
    rv_tt_seq *seqs;
    int nslots, slot_cap;
    int open_txns;
    size_t hot_bytes, cold_bytes, meta_bytes;
    size_t cold_pooled_bytes;     /* of cold_bytes: pool buffers */
    size_t cold_slab_bytes;       /* of cold_bytes: slab blocks */
    rv_slab_heap slabs;
    int use_slabs;           /* cold groups from slabs (the policy above) */
    int64_t cold_groups;     /* distinct groups allocated */
    int64_t evicted;         /* tokens evicted, all sequences (a rollback takes its own back) */
    int64_t shared_groups;   /* distinct groups with more than one reference */
    uint64_t epoch;          /* marks of rv_tt_used_without and of usage passes */
    uint64_t births;
    rv_pool *pool;           /* cold groups from its classes, or NULL: each from the smallest
                                class from pool_class on that holds it */
    int pool_class;
    float *work;             /* migration / inspection scratch: work_floats */
    size_t work_floats;
    int *victims;            /* eviction order scratch: victims_cap ints */
    int victims_cap;
} rv_tt;

typedef struct {
    int num_layers, num_kv_heads, head_dim;
    int hot_tokens, group_tokens, group_size;
    int cold;                /* index into rv_codecs */
    double turbo_bits;
    /* TurboQuant only: per layer the code bits per rotated coordinate of keys and of values
     * ([num_layers][2], rv_codec_cfg.key_bits / value_bits: layers whose attention needs more
     * bits get more), or NULL: every layer from turbo_bits. Read at creation only. */
    const double *turbo_widths;
    int64_t max_tokens;
    /* slab blocks all of the largest group's size (one class): a block any group freed
     * serves any later one, so the slabs never take more than the largest groups of the
     * capacity would (rv_tt_cold_store_bytes) -- what a memory budget's sizing counts. With
     * classes by size (0) a heap whose groups grow (q4 outlier channels coming) could not
     * reuse the smaller blocks freed and mapped slabs past that. */
    int uniform_slabs;
} rv_tt_params;

/* RV_OK, RV_EINVAL (parameters: see rv_limits.h and the codec), RV_ENOMEM. */
int rv_tt_create(rv_tt **out, const rv_tt_params *p);
void rv_tt_destroy(rv_tt *c);

/* ---- sizes, by arithmetic (0 for invalid parameters) ---- */
/* bytes a cold group's allocation takes: its smallest blob (largest: most != 0) plus header,
 * the smallest (largest) of any layer's */
size_t rv_tt_group_alloc_bytes(const rv_tt_params *p, int most);
/* the same of layer `layer`'s groups */
size_t rv_tt_layer_group_alloc_bytes(const rv_tt_params *p, int layer, int most);
/* bytes a group of every layer takes together (the cost of group_tokens tokens of a sequence) */
size_t rv_tt_groups_alloc_bytes(const rv_tt_params *p, int most);
/* bytes of a hot ring holding `tokens` tokens (aligned allocation) */
size_t rv_tt_hot_alloc_bytes(const rv_tt_params *p, int64_t tokens);
/* whether a cache of p takes its cold groups from slabs (when no pool is attached) */
int rv_tt_uses_slabs(const rv_tt_params *p);
/* bytes the cache allocates at creation (its struct, counters, codec tables, work buffer) */
size_t rv_tt_fixed_bytes(const rv_tt_params *p);
/* The most bytes the cold store takes with max_tokens in every layer in full groups of the
 * largest size: whole slabs when `slabs` and the cache uses them (rv_tt_uses_slabs), else
 * the groups' own allocations (a pool's or malloc's). (Without p->uniform_slabs, freed
 * blocks of smaller size classes can make a slab heap take more.) */
size_t rv_tt_cold_store_bytes(const rv_tt_params *p, int slabs);

/* the slabs' mapped bytes, and of them those not in cold groups */
size_t rv_tt_slab_mapped_bytes(const rv_tt *c);
size_t rv_tt_slab_slack_bytes(const rv_tt *c);

/* Take cold groups from `pool`: each from the smallest of its classes cls, cls + 1, ... that
 * holds it (the classes ascend; one that holds none: slabs or the allocator as without a
 * pool). The pool must outlive the cache's groups: the Python wrapper keeps it alive. */
void rv_tt_use_pool(rv_tt *c, rv_pool *pool, int cls);

int rv_tt_add(rv_tt *c, int *slot);
/* RV_EFULL when the copied hot tail does not fit max_tokens (the shared cold groups take no
 * room); RV_EINVAL inside a transaction. Nothing changes unless it returns RV_OK. */
int rv_tt_fork(rv_tt *c, int parent, int *child);
/* callers must not release while a transaction is open */
void rv_tt_release(rv_tt *c, int slot);

int64_t rv_tt_len(const rv_tt *c, int slot, int layer);
int64_t rv_tt_cold_len(const rv_tt *c, int slot, int layer);

/* Drop the oldest min(n, length) tokens of slot in every layer (the room they free: the
 * groups no other sequence holds any token of, and hot tokens). */
void rv_tt_evict(rv_tt *c, int slot, int64_t n);
/* The slots `layer` would charge (its `used`) if the n sequences `slots` held nothing
 * (recounted from the group lists; with n == 0 it equals used[layer]). */
int64_t rv_tt_used_without(rv_tt *c, int layer, const int *slots, int n);
/* Keep the first n tokens of slot in every layer (those past it are dropped: hot ones, whole
 * cold groups, and the tail of the cold group the cut falls in, which stays shared). Refused
 * (RV_EINVAL) inside a transaction. */
int rv_tt_truncate(rv_tt *c, int slot, int64_t n);

/* ---- room for appends: the eviction policy ---- */
#define RV_TT_ROOM_OK 0
#define RV_TT_ROOM_FULL 1          /* policy "error": the tokens do not fit */
#define RV_TT_ROOM_TOO_MANY 2      /* more than the cache holds: eviction cannot help */
#define RV_TT_ROOM_MIXED 3         /* requesters on both sides of an open transaction */
#define RV_TT_ROOM_TXN_SIDE 4      /* the requesters' side of the transaction holds too few */
#define RV_TT_ROOM_NOMEM 5         /* out of memory for the eviction order */
/* Make sure appending n[i] tokens to slots[i] (distinct, live) in `layer` (< 0: every layer)
 * fits max_tokens. evict == 0: just check. evict != 0 ("evict-oldest"): drop the oldest tokens
 * until the room asked for is free -- first of the requesting sequences (so each keeps its
 * newest tokens), then of the others, longest first (older sequences first among equals);
 * cold tokens go with the rest of their group (part of a group frees no room: up to
 * group_tokens - 1 tokens more than asked may go), hot ones exactly; a dropped token another
 * sequence still holds frees no room, so its other holders drop it next. While a transaction is open only sequences on the requesters' side of it may give up
 * tokens (a rollback must not bring back tokens whose room was given away). Returns an
 * RV_TT_ROOM_* code; nothing changes unless it is RV_TT_ROOM_OK. *bind: the fullest layer. */
int rv_tt_make_room(rv_tt *c, const int *slots, const int64_t *n, int nseq, int layer, int evict, int *bind);

/* Append n tokens (k/v [n, kv heads, head_dim], float32 or binary16 by src_dtype 0/1).
 * RV_EFULL (max_tokens) or RV_ENOMEM before anything changes. Migrates outside transactions
 * (a migration that runs out of memory leaves the tokens hot). */
int rv_tt_append(rv_tt *c, int slot, int layer, const void *k, const void *v, int64_t n,
                 int src_dtype, const rv_ops *ops);

int rv_tt_begin(rv_tt *c, int slot);
void rv_tt_commit(rv_tt *c, int slot, const rv_ops *ops);
void rv_tt_rollback(rv_tt *c, int slot);

/* Copy a layer's K/V dequantized into float32 [len, kv heads, head_dim]. */
void rv_tt_read(const rv_tt *c, int slot, int layer, float *k, float *v, const rv_ops *ops);

/* The attention source of `layer` (kvcache: its fold walks the cold groups, then the ring). */
struct rv_kv_source;
void rv_tt_source(const rv_tt *c, int layer, int num_heads, struct rv_kv_source *src);

/* export / import of one layer: its live cold groups' blobs and its hot tokens */
int64_t rv_tt_export_groups(const rv_tt *c, int slot, int layer);   /* live groups */
size_t rv_tt_export_bytes(const rv_tt *c, int slot, int layer);     /* their blob bytes */
/* blobs back to back into `blobs`, sizes into `sizes`; the skip, cut and hot K/V (binary16,
 * [hot_len, kv heads, head_dim]) */
void rv_tt_export_layer(const rv_tt *c, int slot, int layer, unsigned char *blobs, int64_t *sizes,
                        int32_t *skip, int32_t *cut, uint16_t *hot_k, uint16_t *hot_v);
/* 0 if the blob is well formed for layer `layer` of this cache */
int rv_tt_validate_blob(const rv_tt *c, int layer, const unsigned char *blob, size_t bytes);
/* Fill layer `layer` of an empty sequence (validated data), then migrate what exceeds this
 * cache's hot tier (saved by one with more hot_tokens). RV_ENOMEM (the layer stays empty). */
int rv_tt_import_layer(rv_tt *c, int slot, int layer, const unsigned char *blobs, const int64_t *sizes,
                       int64_t ngroups, int32_t skip, int32_t cut, const uint16_t *hot_k,
                       const uint16_t *hot_v, int64_t hot_len, const rv_ops *ops);

typedef struct {
    int64_t hot_tokens, cold_tokens;   /* summed over layers */
    size_t hot_bytes, cold_bytes;      /* allocations (a shared group's bytes split by refs) */
} rv_tt_usage;
/* A usage pass: rv_tt_usage_begin, then rv_tt_seq_usage for every (live slot, layer), with no
 * other call in between. A shared group's alloc_bytes are split among its holders in whole
 * bytes that add up to it: each takes alloc_bytes / refs and the first alloc_bytes % refs
 * holders the pass visits one more (so the sequences' bytes add up to the cache's). */
void rv_tt_usage_begin(rv_tt *c);
/* usage of one sequence in one layer, within a usage pass */
void rv_tt_seq_usage(rv_tt *c, int slot, int layer, rv_tt_usage *u);

#endif
