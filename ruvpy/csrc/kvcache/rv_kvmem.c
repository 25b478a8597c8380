/* Large allocations of the KV caches (see rv_kvmem.h). */
#define _DEFAULT_SOURCE 1      /* madvise */
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "kvcache/rv_kvmem.h"

#define HUGE_PAGE ((size_t)2 << 20)

size_t rv_kv_alloc_large_size(size_t nbytes) { return rv_kv_alloc_size(nbytes); }

/* Asked of the allocator as is (2 MiB-aligning the block itself made the allocator map up
 * to 2 MiB more than the cache counted); the transparent huge pages are asked for the
 * 2 MiB-aligned stretch inside it, which for a pool of many MiB is nearly all of it. */
void *rv_kv_alloc_large(size_t nbytes, size_t *allocated)
{
    void *p = rv_kv_alloc(nbytes);
    *allocated = p ? rv_kv_alloc_size(nbytes) : 0;
#ifdef MADV_HUGEPAGE
    if (p && nbytes >= 2 * HUGE_PAGE) {
        uintptr_t lo = ((uintptr_t)p + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1);
        uintptr_t hi = ((uintptr_t)p + nbytes) & ~(uintptr_t)(HUGE_PAGE - 1);
        if (hi > lo)   /* a hint: the streaming kernels miss the TLB less */
            madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
    }
#endif
    return p;
}
