/* Blocks of a few sizes carved from slabs: 2 MiB-aligned private mappings advised to use
 * transparent huge pages (rv_kv_map_huge). A two-tier cache's cold groups live here once the
 * cache is large: the decode kernels stream through every group, and on 4 KiB pages (what
 * malloc hands out) each group costs TLB misses that huge pages avoid (measured 15-25% of
 * q4 / turbo decode at 16384 tokens, 32/8/128).
 *
 * Mechanism only: the owner decides when to use it. Sizes are `nclasses` classes, spanning
 * [block_min, block_max] evenly or of sizes the owner gives (multiples of RV_ALIGN, ascending:
 * rv_slab_init / rv_slab_init_sizes); a request takes the smallest class holding
 * it, from that class's free list, else any larger class's, else carved from the newest slab's
 * tail, else from a new slab (the old one's uncarved tail stays slack). O(nclasses) a step. A slab whose blocks are all free again
 * is unmapped at once (its free blocks leave their lists: O(its blocks)); destroy unmaps every
 * slab. Not synchronised: the owner serialises calls. */
#ifndef RV_SLAB_H
#define RV_SLAB_H

#include <stddef.h>
#include <stdint.h>

#include "rv_common.h"

/* classes evenly spaced over a range of sizes (rv_slab_init); of given sizes (rv_slab_init_sizes),
 * up to the 65 sizes TurboQuant layers with widths of their own can have */
#define RV_SLAB_SPACED_CLASSES 16
#define RV_SLAB_MAX_CLASSES 72
#define RV_SLAB_HDR RV_ALIGN        /* a slab's own header, at its start */

typedef struct rv_slab rv_slab;
typedef struct rv_slab_node rv_slab_node;

typedef struct {
    size_t class_bytes[RV_SLAB_MAX_CLASSES];   /* ascending multiples of RV_ALIGN */
    rv_slab_node *free[RV_SLAB_MAX_CLASSES];   /* free blocks per class (doubly linked) */
    int nclasses;
    size_t slab_bytes;       /* every slab's mapping: a multiple of 2 MiB */
    rv_slab *slabs;          /* newest first; blocks are carved from the head's tail */
    size_t mapped_bytes;     /* slabs' mappings, all of them */
    size_t block_bytes;      /* class bytes of the blocks handed out and not freed */
    int64_t nslabs, maps, unmaps;
} rv_slab_heap;

/* The classes for blocks of block_min .. block_max bytes (RV_OK; RV_EINVAL if block_min is 0,
 * block_min > block_max or a slab could not hold 16 of the largest). Maps nothing yet. */
int rv_slab_init(rv_slab_heap *h, size_t block_min, size_t block_max);
/* Classes of exactly these block sizes (n of them, ascending once aligned to RV_ALIGN): for an
 * owner whose blocks come in a few known sizes. RV_EINVAL otherwise. Maps nothing yet. */
int rv_slab_init_sizes(rv_slab_heap *h, const size_t *sizes, int n);
void rv_slab_destroy(rv_slab_heap *h);   /* unmaps every slab (blocks still out included) */

/* An RV_ALIGN-aligned block of at least nbytes, or NULL when out of memory (a slab could not
 * be mapped: nothing changed) or nbytes exceeds block_max. *slab, *cls: the block's slab and
 * class (it takes class_bytes[*cls]), which the caller keeps for rv_slab_free. */
void *rv_slab_alloc(rv_slab_heap *h, size_t nbytes, rv_slab **slab, int *cls);
void rv_slab_free(rv_slab_heap *h, rv_slab *slab, int cls, void *block);

#endif
