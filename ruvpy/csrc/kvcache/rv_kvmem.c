/* Large allocations of the KV caches (see rv_kvmem.h). */
#define _DEFAULT_SOURCE 1      /* madvise */
#include <stdlib.h>
#include <sys/mman.h>

#include "kvcache/rv_kvmem.h"

#define HUGE_PAGE ((size_t)2 << 20)

size_t rv_kv_alloc_large_size(size_t nbytes)
{
    if (nbytes < 2 * HUGE_PAGE)
        return rv_kv_alloc_size(nbytes);
    return nbytes > SIZE_MAX - HUGE_PAGE ? 0 : (nbytes + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
}

void *rv_kv_alloc_large(size_t nbytes, size_t *allocated)
{
    if (nbytes < 2 * HUGE_PAGE) {
        *allocated = rv_kv_alloc_size(nbytes);
        return rv_kv_alloc(nbytes);
    }
    if (nbytes > SIZE_MAX - HUGE_PAGE)
        return NULL;
    size_t n = (nbytes + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
    void *p = aligned_alloc(HUGE_PAGE, n);
#ifdef MADV_HUGEPAGE
    if (p)
        madvise(p, n, MADV_HUGEPAGE);    /* a hint: the streaming kernels miss the TLB less */
#endif
    *allocated = n;
    return p;
}
