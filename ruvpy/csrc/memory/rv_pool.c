/* Aligned blocks and the size-classed buffer pool (see rv_memory.h). */
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

int rv_pool_class_for(size_t nbytes)
{
    for (int c = 0; c < RV_POOL_CLASSES; c++)
        if (nbytes <= rv_pool_class_bytes[c])
            return c;
    return -1;
}

rv_pool *rv_pool_create(size_t max_buffers_per_class)
{
    if (max_buffers_per_class > RV_POOL_MAX_BUFFERS_PER_CLASS)
        return NULL;
    rv_pool *p = rv_aligned_alloc(sizeof(rv_pool));
    if (!p)
        return NULL;
    memset(p, 0, sizeof(*p));
    p->max_buffers = max_buffers_per_class;
    int c = 0;
    for (; c < RV_POOL_CLASSES; c++) {
        rv_pool_class *k = &p->cls[c];
        k->nbytes = rv_pool_class_bytes[c];
        /* one spare slot so that max_buffers == 0 still gets a valid (unused) array */
        k->free_list = malloc((max_buffers_per_class + 1) * sizeof(void *));
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

void rv_pool_destroy(rv_pool *p)
{
    if (!p)
        return;
    rv_pool_clear(p);
    for (int c = 0; c < RV_POOL_CLASSES; c++) {
        pthread_mutex_destroy(&p->cls[c].lock);
        free(p->cls[c].free_list);
    }
    rv_aligned_free(p);
}

/* Take class c's lock: always when wait, else only if free right now. */
static int lock_class(rv_pool_class *k, int wait)
{
    if (wait) {
        pthread_mutex_lock(&k->lock);
        return RV_OK;
    }
    return pthread_mutex_trylock(&k->lock) == 0 ? RV_OK : RV_POOL_BUSY;
}

int rv_pool_pop(rv_pool *p, int c, int wait, void **out)
{
    rv_pool_class *k = &p->cls[c];
    if (lock_class(k, wait) != RV_OK)
        return RV_POOL_BUSY;
    int status;
    if (k->count > 0) {
        *out = k->free_list[--k->count];
        k->hits++;
        __atomic_fetch_add(&k->outstanding, 1, __ATOMIC_RELAXED);
        status = RV_OK;
    } else {
        k->misses++;
        status = RV_POOL_EMPTY;
    }
    pthread_mutex_unlock(&k->lock);
    return status;
}

void *rv_pool_new_buffer(rv_pool *p, int c)
{
    rv_pool_class *k = &p->cls[c];
    void *buffer = rv_aligned_alloc(k->nbytes);
    if (buffer) {
        __atomic_fetch_add(&k->allocations, 1, __ATOMIC_RELAXED);
        __atomic_fetch_add(&k->outstanding, 1, __ATOMIC_RELAXED);
    }
    return buffer;
}

int rv_pool_push(rv_pool *p, int c, int wait, void *buffer)
{
    rv_pool_class *k = &p->cls[c];
    if (lock_class(k, wait) != RV_OK)
        return RV_POOL_BUSY;
    int status;
    if (k->count < p->max_buffers) {
        k->free_list[k->count++] = buffer;
        k->returns++;
        status = RV_OK;
    } else {
        k->drops++;
        status = RV_POOL_FULL;
    }
    __atomic_fetch_sub(&k->outstanding, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&k->lock);
    return status;
}

void *rv_pool_acquire(rv_pool *p, int c)
{
    void *buffer = NULL;
    if (rv_pool_pop(p, c, 1, &buffer) == RV_OK)
        return buffer;
    return rv_pool_new_buffer(p, c);
}

void rv_pool_release(rv_pool *p, int c, void *buffer)
{
    if (rv_pool_push(p, c, 1, buffer) == RV_POOL_FULL)
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
        int room = k->count < p->max_buffers;
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
    for (int c = 0; c < RV_POOL_CLASSES; c++) {
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
    for (int c = 0; c < RV_POOL_CLASSES; c++) {
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
