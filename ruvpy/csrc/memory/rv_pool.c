/* Aligned blocks and the size-classed buffer pool (see rv_memory.h). */
#include <stddef.h>
#include <stdlib.h>

#include "memory/rv_memory.h"

const size_t rv_pool_class_bytes[RV_POOL_CLASSES] = {
    (size_t)1 << 10, (size_t)1 << 12, (size_t)1 << 14, (size_t)1 << 16, (size_t)1 << 18,
};

void *rv_aligned_alloc(size_t nbytes)
{
    size_t rounded = rv_align_up(nbytes ? nbytes : 1);
    if (rounded == 0 || rounded > (size_t)PTRDIFF_MAX)
        return NULL;
    return aligned_alloc(RV_ALIGN, rounded);
}

void rv_aligned_free(void *block)
{
    free(block);
}

int rv_pool_class_for(const rv_pool *p, size_t nbytes)
{
    for (int c = 0; c < p->nclasses; c++)
        if (nbytes <= p->cls[c].nbytes)
            return c;
    return -1;
}

rv_pool *rv_pool_create_classes(const size_t *bytes, const size_t *max_buffers, int n)
{
    if (n < 1 || n > RV_POOL_MAX_CLASSES)
        return NULL;
    for (int c = 0; c < n; c++)
        if (bytes[c] == 0 || bytes[c] % RV_ALIGN || (c && bytes[c] <= bytes[c - 1]) ||
            max_buffers[c] > RV_POOL_MAX_BUFFERS_PER_CLASS || bytes[c] > (size_t)PTRDIFF_MAX)
            return NULL;
    const size_t size = offsetof(rv_pool, cls) + (size_t)n * sizeof(rv_pool_class);
    rv_pool *p = rv_aligned_alloc(size);
    if (!p)
        return NULL;
    memset(p, 0, size);
    p->nclasses = n;
    p->max_buffers = max_buffers[0];
    int c = 0;
    for (; c < n; c++) {
        rv_pool_class *k = &p->cls[c];
        k->nbytes = bytes[c];
        k->max_buffers = max_buffers[c];
        /* one spare slot so that max_buffers == 0 still gets a valid (unused) array */
        k->free_list = malloc((max_buffers[c] + 1) * sizeof(void *));
        if (!k->free_list || pthread_mutex_init(&k->lock, NULL) != 0) {
            free(k->free_list);
            goto fail;
        }
    }
    return p;
fail:
    while (--c >= 0) {
        pthread_mutex_destroy(&p->cls[c].lock);
        free(p->cls[c].free_list);
    }
    rv_aligned_free(p);
    return NULL;
}

rv_pool *rv_pool_create(size_t max_buffers_per_class)
{
    size_t limits[RV_POOL_CLASSES];
    for (int c = 0; c < RV_POOL_CLASSES; c++)
        limits[c] = max_buffers_per_class;
    return rv_pool_create_classes(rv_pool_class_bytes, limits, RV_POOL_CLASSES);
}

void rv_pool_destroy(rv_pool *p)
{
    if (!p)
        return;
    rv_pool_clear(p);
    for (int c = 0; c < p->nclasses; c++) {
        pthread_mutex_destroy(&p->cls[c].lock);
        free(p->cls[c].free_list);
    }
    rv_aligned_free(p);
}

void *rv_pool_acquire(rv_pool *p, int c)
{
    rv_pool_class *k = &p->cls[c];
    void *buffer = NULL;
    pthread_mutex_lock(&k->lock);
    if (k->count > 0) {
        buffer = k->free_list[--k->count];
        k->hits++;
    } else {
        k->misses++;
    }
    pthread_mutex_unlock(&k->lock);
    if (!buffer) {
        buffer = rv_aligned_alloc(k->nbytes);
        if (!buffer)
            return NULL;
        __atomic_fetch_add(&k->allocations, 1, __ATOMIC_RELAXED);
    }
    __atomic_fetch_add(&k->outstanding, 1, __ATOMIC_RELAXED);
    return buffer;
}

void rv_pool_release(rv_pool *p, int c, void *buffer)
{
    rv_pool_class *k = &p->cls[c];
    pthread_mutex_lock(&k->lock);
    int pooled = k->count < k->max_buffers;
    if (pooled) {
        k->free_list[k->count++] = buffer;
        k->returns++;
    } else {
        k->drops++;
    }
    __atomic_fetch_sub(&k->outstanding, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&k->lock);
    if (!pooled)
        rv_aligned_free(buffer);
}

int rv_pool_prewarm(rv_pool *p, int c, size_t count, size_t *added)
{
    rv_pool_class *k = &p->cls[c];
    *added = 0;
    for (; *added < count; ++*added) {
        void *buffer = rv_aligned_alloc(k->nbytes);   /* outside the lock: may be slow */
        if (!buffer)
            return RV_ENOMEM;
        pthread_mutex_lock(&k->lock);
        int room = k->count < k->max_buffers;
        if (room) {
            k->free_list[k->count++] = buffer;
            __atomic_fetch_add(&k->allocations, 1, __ATOMIC_RELAXED);
        }
        pthread_mutex_unlock(&k->lock);
        if (!room) {
            rv_aligned_free(buffer);
            break;
        }
    }
    return RV_OK;
}

void rv_pool_clear(rv_pool *p)
{
    for (int c = 0; c < p->nclasses; c++) {
        rv_pool_class *k = &p->cls[c];
        pthread_mutex_lock(&k->lock);
        for (size_t i = 0; i < k->count; i++)
            rv_aligned_free(k->free_list[i]);
        k->count = 0;
        pthread_mutex_unlock(&k->lock);
    }
}

void rv_pool_get_stats(rv_pool *p, rv_pool_stats *out)
{
    memset(out, 0, sizeof(*out));
    for (int c = 0; c < p->nclasses; c++) {
        rv_pool_class *k = &p->cls[c];
        pthread_mutex_lock(&k->lock);
        out->hits += k->hits;
        out->misses += k->misses;
        out->returns += k->returns;
        out->drops += k->drops;
        out->free_buffers[c] = k->count;
        out->pooled_bytes += k->count * k->nbytes;
        out->allocations += __atomic_load_n(&k->allocations, __ATOMIC_RELAXED);
        out->outstanding_bytes += __atomic_load_n(&k->outstanding, __ATOMIC_RELAXED) * k->nbytes;
        pthread_mutex_unlock(&k->lock);
    }
}

size_t rv_pool_meta_bytes(const rv_pool *p)
{
    size_t n = rv_align_up(offsetof(rv_pool, cls) + (size_t)p->nclasses * sizeof(rv_pool_class));
    for (int c = 0; c < p->nclasses; c++)
        n += (p->cls[c].max_buffers + 1) * sizeof(void *);
    return n;
}
