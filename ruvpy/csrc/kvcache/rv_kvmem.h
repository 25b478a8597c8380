/* Memory helpers of the KV caches: 64-byte aligned blocks whose sizes the caches add up, so
 * that every byte count they report is the sum of what they really allocated. */
#ifndef RV_KVMEM_H
#define RV_KVMEM_H

#include <stdlib.h>
#include <string.h>

#include "rv_common.h"

/* nbytes rounded up to RV_ALIGN: the size rv_kv_alloc really takes (0 if that overflows) */
RV_INLINE size_t rv_kv_alloc_size(size_t nbytes)
{
    if (nbytes == 0)
        nbytes = 1;
    return nbytes > SIZE_MAX - (RV_ALIGN - 1) ? 0 : (nbytes + RV_ALIGN - 1) & ~(size_t)(RV_ALIGN - 1);
}

/* RV_ALIGN-aligned, uninitialised; NULL when out of memory */
RV_INLINE void *rv_kv_alloc(size_t nbytes)
{
    size_t n = rv_kv_alloc_size(nbytes);
    return n ? aligned_alloc(RV_ALIGN, n) : NULL;
}

RV_INLINE void rv_kv_free(void *p) { free(p); }

/* A block of at least nbytes for bulk K/V storage, RV_ALIGN-aligned. A large one (4 MiB or
 * more) is a fresh mapping of its own, 2 MiB-aligned and advised to use transparent huge
 * pages (streamed through by every attention call, it would otherwise miss the TLB every
 * 4 KiB; and malloc could hand back heap already faulted in 4 KiB pages). *allocated = the
 * bytes really taken. Free with rv_kv_free_large(p, nbytes) -- the same nbytes. */
void *rv_kv_alloc_large(size_t nbytes, size_t *allocated);
void rv_kv_free_large(void *p, size_t nbytes);
/* what rv_kv_alloc_large(nbytes) takes (0 if too large) */
size_t rv_kv_alloc_large_size(size_t nbytes);
/* A fresh private mapping of `size` bytes (a multiple of the page size), 2 MiB-aligned and
 * advised to use transparent huge pages; NULL when mmap fails. Unmap with rv_kv_unmap_huge. */
void *rv_kv_map_huge(size_t size);
void rv_kv_unmap_huge(void *p, size_t size);
/* bytes in such mappings now (large blocks, two-tier slabs: malloc's counts do not see them) */
size_t rv_kv_mapped_bytes(void);

/* rv_kv_alloc / rv_kv_free that add / subtract the real size to / from *counter */
RV_INLINE void *rv_kv_alloc_counted(size_t nbytes, size_t *counter)
{
    void *p = rv_kv_alloc(nbytes);
    if (p)
        *counter += rv_kv_alloc_size(nbytes);
    return p;
}

RV_INLINE void rv_kv_free_counted(void *p, size_t nbytes, size_t *counter)
{
    if (p) {
        rv_kv_free(p);
        *counter -= rv_kv_alloc_size(nbytes);
    }
}

/* A slot for a new sequence in an array of per-sequence structs of `elem` bytes whose first
 * member is `int live`: a dead one if any, else a new zeroed one at the end (the array grows
 * by doubling; its bytes count in *meta). RV_OK or RV_ENOMEM; *seqs may move. */
RV_INLINE int rv_kv_slot_new(void **seqs, int *nslots, int *cap, size_t elem, size_t *meta, int *slot)
{
    for (int i = 0; i < *nslots; i++)
        if (!*(const int *)((const char *)*seqs + (size_t)i * elem)) {
            *slot = i;
            return RV_OK;
        }
    if (*nslots == *cap) {
        int ncap = *cap ? 2 * *cap : 8;
        void *grown = rv_kv_alloc_counted(elem * (size_t)ncap, meta);
        if (!grown)
            return RV_ENOMEM;
        if (*nslots)
            memcpy(grown, *seqs, elem * (size_t)*nslots);
        rv_kv_free_counted(*seqs, elem * (size_t)*cap, meta);
        *seqs = grown;
        *cap = ncap;
    }
    memset((char *)*seqs + (size_t)*nslots * elem, 0, elem);
    *slot = (*nslots)++;
    return RV_OK;
}

/* *out = a * b, nonzero on overflow */
RV_INLINE int rv_kv_mul(size_t a, size_t b, size_t *out) { return __builtin_mul_overflow(a, b, out); }

#endif
