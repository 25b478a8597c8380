/* The paged KV cache: one preallocated pool of fixed-size blocks shared by every layer and
 * sequence, per-sequence block tables, reference-counted blocks with an O(1) free stack and
 * copy-on-write forks.
 *
 * A block holds block_size token slots of every layer, K and V. The pool is laid out
 * [layer][K, V][block][slot][kv head][head_dim]: within a layer's K (or V) a run of blocks with
 * consecutive ids is one token-major (NHD) stretch, which the attention kernels stream with
 * every head at once; blocks are handed out lowest id first, so a sequence's blocks mostly
 * are such runs. A sequence owns a table of block ids and a token count per layer (layers are
 * appended one after another inside a model step).
 * Blocks are only ever written past a sequence's last token, so after a fork only the block
 * holding a sequence's write position can need copying: a write into a block whose reference
 * count is above one first copies it (copy-on-write).
 *
 * Not synchronised: the Python wrapper serialises all calls on one cache. */
#ifndef RV_PAGED_H
#define RV_PAGED_H

#include <stddef.h>
#include <stdint.h>

#include "rv_common.h"
#include "kernels/rv_ops.h"

#define RV_KV_F32 0
#define RV_KV_F16 1

typedef struct {
    int live;
    int32_t *blocks;          /* block ids in token order */
    int64_t nblocks, cap;
    int64_t *ntok;            /* [num_layers] tokens per layer */
    /* transaction snapshot (in_txn): the table and counts at begin (buffers of the table's
     * capacity, kept between transactions: a step allocates nothing) */
    int in_txn;
    int32_t *snap_blocks;
    int64_t snap_nblocks;
    int64_t *snap_ntok;
} rv_paged_seq;

typedef struct {
    int num_layers, num_kv_heads, head_dim, block_size, dtype;
    size_t elem;              /* bytes per stored value */
    size_t row_elems;         /* num_kv_heads * head_dim: one token of one layer's K (or V) */
    size_t block_bytes;       /* one block: every layer, K and V */
    int32_t num_blocks;
    unsigned char *pool;      /* num_blocks * block_bytes (rv_kv_alloc_large: pool_bytes) */
    int32_t *refcount;        /* [num_blocks] */
    int32_t *free_stack;      /* [num_blocks]: free block ids, top at nfree - 1 */
    int64_t *tally;           /* [num_blocks] zeros between calls: scratch of block counting */
    int32_t nfree;
    rv_paged_seq *seqs;       /* slots; dead ones are reused */
    int nslots, slot_cap;
    int open_txns;            /* sequences inside a transaction */
    size_t meta_bytes;        /* every allocation besides the pool */
    size_t pool_bytes;
} rv_paged;

/* Bytes of one block (every layer, K and V): what the pool allocates per block. 0 when the
 * shape is invalid or too large. */
size_t rv_paged_block_bytes(int num_layers, int num_kv_heads, int head_dim, int block_size, int dtype);

int rv_paged_create(rv_paged **out, int num_layers, int num_kv_heads, int head_dim,
                    int block_size, int64_t num_blocks, int dtype);
void rv_paged_destroy(rv_paged *c);

/* slot of a new empty sequence (RV_ENOMEM) */
int rv_paged_add(rv_paged *c, int *slot);
/* child shares every block of parent (RV_ENOMEM; RV_EINVAL while a transaction is open) */
int rv_paged_fork(rv_paged *c, int parent, int *child);
/* Drops the sequence's blocks (inside its own transaction: committed first). A block another
 * sequence's snapshot needs keeps that snapshot's reference. */
void rv_paged_release(rv_paged *c, int slot);

/* Free blocks that appending n[i] tokens to slots[i] (distinct) would take, in `layer` or
 * (layer < 0) in every layer: new blocks plus copy-on-write copies. Exact when the writers of a
 * shared block are all inside transactions (a Runtime step) or none is; with both, one more
 * than needed when the only writer inside comes after all the block's other holders. */
int64_t rv_paged_blocks_needed(const rv_paged *c, int nseq, const int *slots, const int64_t *n, int layer);

/* Append n tokens, k/v [n, kv heads, head_dim] contiguous, float32 (src_dtype RV_KV_F32) or
 * float16 bits. RV_EFULL (pool) or RV_ENOMEM before anything changes. */
int rv_paged_append(rv_paged *c, int slot, int layer, const void *k, const void *v, int64_t n,
                    int src_dtype, const rv_ops *ops);

/* Copy a layer's K/V into [len, kv heads, head_dim] arrays: float32 (as_f32) or the stored
 * dtype. */
void rv_paged_read(const rv_paged *c, int slot, int layer, void *k, void *v, int as_f32, const rv_ops *ops);

/* Transactions (per sequence). begin: RV_ENOMEM or RV_EINVAL (already open). */
int rv_paged_begin(rv_paged *c, int slot);
void rv_paged_commit(rv_paged *c, int slot);
void rv_paged_rollback(rv_paged *c, int slot);

/* Keep the first n tokens of slot in every layer: the blocks past them go back to the pool
 * (a shared block the cut falls in stays shared: the next write copies it). Refused
 * (RV_EINVAL) while a transaction is open. */
int rv_paged_truncate(rv_paged *c, int slot, int64_t n);

/* The attention source of `layer` (its fold streams runs of consecutive blocks). */
struct rv_kv_source;
void rv_paged_source(const rv_paged *c, int layer, int num_heads, struct rv_kv_source *src);

/* Bytes rv_paged_create allocates for num_blocks blocks (pool and metadata), 0 if invalid. */
size_t rv_paged_create_bytes(int num_layers, int num_kv_heads, int head_dim, int block_size, int64_t num_blocks,
                             int dtype);

typedef struct {
    int64_t blocks_used, blocks_shared, blocks_free;
    int64_t slots_used;       /* allocated token slots of used blocks, summed over layers */
    int64_t tokens_stored;    /* distinct stored tokens (shared blocks once), over layers */
} rv_paged_stats;
void rv_paged_get_stats(const rv_paged *c, rv_paged_stats *st);

#endif
