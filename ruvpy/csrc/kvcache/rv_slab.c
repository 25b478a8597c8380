/* Blocks carved from huge-page slabs (see rv_slab.h). */
#include <string.h>

#include "kvcache/rv_kvmem.h"
#include "kvcache/rv_slab.h"

#define HUGE_PAGE ((size_t)2 << 20)
#define MIN_BLOCKS_PER_SLAB 16       /* the uncarvable tail of a slab: under 1/16 of it */

struct rv_slab {                     /* at the start of its mapping (RV_SLAB_HDR bytes) */
    rv_slab *prev, *next;
    size_t bump;                     /* carved up to here (from the mapping's start) */
    size_t live;                     /* blocks handed out */
};
_Static_assert(sizeof(rv_slab) <= RV_SLAB_HDR, "the slab header outgrew its room");

struct rv_slab_node {                /* at the start of a free block */
    rv_slab_node *prev, *next;
    rv_slab *slab;
    int cls;
};

/* slabs for h's classes: 16 blocks of the largest at least */
static void size_slabs(rv_slab_heap *h)
{
    const size_t want = RV_SLAB_HDR + MIN_BLOCKS_PER_SLAB * h->class_bytes[h->nclasses - 1];
    h->slab_bytes = (want + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
}

int rv_slab_init(rv_slab_heap *h, size_t block_min, size_t block_max)
{
    memset(h, 0, sizeof *h);
    block_min = rv_kv_alloc_size(block_min);
    block_max = rv_kv_alloc_size(block_max);
    if (!block_min || !block_max || block_min > block_max || block_max > SIZE_MAX / (4 * MIN_BLOCKS_PER_SLAB))
        return RV_EINVAL;
    /* classes evenly spaced over [min, max]: a block wastes under 1/15 of the span */
    const size_t span = block_max - block_min;
    int n = (int)(span / RV_ALIGN) + 1;
    if (n > RV_SLAB_SPACED_CLASSES)
        n = RV_SLAB_SPACED_CLASSES;
    for (int i = 0; i < n; i++) {
        size_t b = n == 1 ? block_max : rv_kv_alloc_size(block_min + span * (size_t)i / (size_t)(n - 1));
        if (i == n - 1)
            b = block_max;
        if (i > 0 && b <= h->class_bytes[h->nclasses - 1])
            continue;
        h->class_bytes[h->nclasses++] = b;
    }
    size_slabs(h);
    return RV_OK;
}

int rv_slab_init_sizes(rv_slab_heap *h, const size_t *sizes, int n)
{
    memset(h, 0, sizeof *h);
    if (n <= 0 || n > RV_SLAB_MAX_CLASSES)
        return RV_EINVAL;
    for (int i = 0; i < n; i++) {
        const size_t b = rv_kv_alloc_size(sizes[i]);
        if (!b || b > SIZE_MAX / (4 * MIN_BLOCKS_PER_SLAB) || (i > 0 && b <= h->class_bytes[h->nclasses - 1]))
            return RV_EINVAL;
        h->class_bytes[h->nclasses++] = b;
    }
    size_slabs(h);
    return RV_OK;
}

static void free_push(rv_slab_heap *h, rv_slab *s, int cls, void *block)
{
    rv_slab_node *f = (rv_slab_node *)block;
    f->slab = s;
    f->cls = cls;
    f->prev = NULL;
    f->next = h->free[cls];
    if (f->next)
        f->next->prev = f;
    h->free[cls] = f;
}

static void free_unlink(rv_slab_heap *h, rv_slab_node *f)
{
    if (f->prev)
        f->prev->next = f->next;
    else
        h->free[f->cls] = f->next;
    if (f->next)
        f->next->prev = f->prev;
}

static void slab_unmap(rv_slab_heap *h, rv_slab *s)
{
    if (s->prev)
        s->prev->next = s->next;
    else
        h->slabs = s->next;
    if (s->next)
        s->next->prev = s->prev;
    rv_kv_unmap_huge(s, h->slab_bytes);
    h->mapped_bytes -= h->slab_bytes;
    h->nslabs--;
    h->unmaps++;
}

void rv_slab_destroy(rv_slab_heap *h)
{
    while (h->slabs)
        slab_unmap(h, h->slabs);
    memset(h->free, 0, sizeof h->free);
    h->block_bytes = 0;
}

void *rv_slab_alloc(rv_slab_heap *h, size_t nbytes, rv_slab **slab, int *cls_out)
{
    int cls = 0;
    while (cls < h->nclasses && h->class_bytes[cls] < nbytes)
        cls++;
    if (cls == h->nclasses)
        return NULL;
    /* a free block of this class or, failing that, of the next larger one that has any */
    for (int c = cls; c < h->nclasses; c++) {
        rv_slab_node *f = h->free[c];
        if (!f)
            continue;
        free_unlink(h, f);
        rv_slab *s = f->slab;
        s->live++;
        h->block_bytes += h->class_bytes[c];
        *slab = s;
        *cls_out = c;
        return f;
    }
    const size_t bytes = h->class_bytes[cls];
    rv_slab *s = h->slabs;
    if (!s || h->slab_bytes - s->bump < bytes) {
        s = (rv_slab *)rv_kv_map_huge(h->slab_bytes);
        if (!s)
            return NULL;
        memset(s, 0, sizeof *s);
        s->bump = RV_SLAB_HDR;
        s->next = h->slabs;
        if (s->next)
            s->next->prev = s;
        h->slabs = s;
        h->mapped_bytes += h->slab_bytes;
        h->nslabs++;
        h->maps++;
    }
    void *block = (unsigned char *)s + s->bump;
    s->bump += bytes;
    s->live++;
    h->block_bytes += bytes;
    *slab = s;
    *cls_out = cls;
    return block;
}

void rv_slab_free(rv_slab_heap *h, rv_slab *slab, int cls, void *block)
{
    h->block_bytes -= h->class_bytes[cls];
    if (--slab->live > 0) {
        free_push(h, slab, cls, block);
        return;
    }
    /* wholly free: its other blocks (all carved ones are free now) leave their lists */
    unsigned char *p = (unsigned char *)slab + RV_SLAB_HDR, *end = (unsigned char *)slab + slab->bump;
    while (p < end) {
        rv_slab_node *f = (rv_slab_node *)p;
        const size_t bytes = h->class_bytes[(void *)p == block ? cls : f->cls];
        if ((void *)p != block)
            free_unlink(h, f);
        p += bytes;
    }
    slab_unmap(h, slab);
}
