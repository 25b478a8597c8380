/* Memory helpers of the KV caches: 64-byte aligned blocks whose sizes the caches add up, so
 * that every byte count they report is the sum of what they really allocated. */
#ifndef RV_KVMEM_H
#define RV_KVMEM_H

#include <stdlib.h>

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

/* *out = a * b, nonzero on overflow */
RV_INLINE int rv_kv_mul(size_t a, size_t b, size_t *out) { return __builtin_mul_overflow(a, b, out); }

#endif
