/* Large allocations of the KV caches (see rv_kvmem.h). */
#define _DEFAULT_SOURCE 1      /* madvise, MAP_ANONYMOUS */
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kvcache/rv_kvmem.h"

#define HUGE_PAGE ((size_t)2 << 20)
/* from this size on a block gets a mapping of its own (two huge pages: below that the
 * alignment would buy little and the mapping count would grow with every small cache) */
#define OWN_MAPPING_MIN (2 * HUGE_PAGE)

static size_t mapped_bytes;    /* in own mappings now (atomics: caches come and go on any thread) */

static size_t page_size(void)
{
    static size_t page;
    if (!page) {
        long p = sysconf(_SC_PAGESIZE);
        page = p > 0 ? (size_t)p : 4096;
    }
    return page;
}

static int own_mapping(size_t nbytes) { return nbytes >= OWN_MAPPING_MIN; }

size_t rv_kv_alloc_large_size(size_t nbytes)
{
    if (!own_mapping(nbytes))
        return rv_kv_alloc_size(nbytes);
    const size_t page = page_size();
    return nbytes > SIZE_MAX - page ? 0 : (nbytes + page - 1) & ~(page - 1);
}

/* A large block is mapped on its own (rv_kv_map_huge). From malloc it could be heap that an
 * earlier allocation freed, already faulted in 4 KiB pages that the advice no longer changes:
 * the same paged decode then ran 25-50% slower depending on what the process had allocated
 * before. */
void *rv_kv_alloc_large(size_t nbytes, size_t *allocated)
{
    if (!own_mapping(nbytes)) {
        void *p = rv_kv_alloc(nbytes);
        *allocated = p ? rv_kv_alloc_size(nbytes) : 0;
        return p;
    }
    const size_t size = rv_kv_alloc_large_size(nbytes);
    void *p = size ? rv_kv_map_huge(size) : NULL;
    *allocated = p ? size : 0;
    return p;
}

void rv_kv_free_large(void *p, size_t nbytes)
{
    if (!p)
        return;
    if (!own_mapping(nbytes)) {
        rv_kv_free(p);
        return;
    }
    rv_kv_unmap_huge(p, rv_kv_alloc_large_size(nbytes));
}

/* The start is 2 MiB-aligned (the excess of an over-sized mapping is unmapped again, so the
 * mapping takes exactly `size`) and advised to use transparent huge pages. */
void *rv_kv_map_huge(size_t size)
{
    if (!size || size % page_size() || size > SIZE_MAX - HUGE_PAGE)
        return NULL;
    const size_t span = size + HUGE_PAGE;
    unsigned char *base = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        return NULL;
    unsigned char *p = (unsigned char *)(((uintptr_t)base + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
    if (p > base)
        munmap(base, (size_t)(p - base));
    if (base + span > p + size)
        munmap(p + size, (size_t)(base + span - (p + size)));
#ifdef MADV_HUGEPAGE
    madvise(p, size, MADV_HUGEPAGE);   /* a hint: the streaming kernels miss the TLB less */
#endif
    __atomic_add_fetch(&mapped_bytes, size, __ATOMIC_RELAXED);
    return p;
}

void rv_kv_unmap_huge(void *p, size_t size)
{
    munmap(p, size);
    __atomic_sub_fetch(&mapped_bytes, size, __ATOMIC_RELAXED);
}

size_t rv_kv_mapped_bytes(void) { return __atomic_load_n(&mapped_bytes, __ATOMIC_RELAXED); }
