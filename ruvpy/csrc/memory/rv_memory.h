/* ruvpy's memory layer in C: 64-byte aligned blocks, the arena's bump pointer and the
 * size-classed buffer pool. ruvpy/_memory.pyx wraps them; its .pxd mirrors this header so
 * that Cython code (and C drivers handed these structs) can use them without the GIL. */
#ifndef RV_MEMORY_H
#define RV_MEMORY_H

#include <pthread.h>
#include <string.h>

#include "rv_common.h"

/* ---- aligned blocks ------------------------------------------------------------------ */

/* n rounded up to a multiple of RV_ALIGN; 0 when that overflows (callers treat 0 for n > 0
 * as "too large"). */
RV_INLINE size_t rv_align_up(size_t n)
{
    return n > SIZE_MAX - (RV_ALIGN - 1) ? 0 : (n + RV_ALIGN - 1) & ~(size_t)(RV_ALIGN - 1);
}

/* *out = a * b; nonzero when that overflows. */
RV_INLINE int rv_mul_size(size_t a, size_t b, size_t *out)
{
    return __builtin_mul_overflow(a, b, out);
}

/* A block of at least nbytes (rounded up to RV_ALIGN), RV_ALIGN-aligned, uninitialised.
 * NULL when out of memory or nbytes is absurd. nbytes == 0 gives one aligned line. */
void *rv_aligned_alloc(size_t nbytes);
void rv_aligned_free(void *block);

/* The debug poison: all-ones bytes read as NaN in every float width (f16/f32/f64). */
#define RV_POISON_BYTE 0xFF

/* ---- arena: a bump pointer over one block ----------------------------------------------
 * Not synchronised: the Python wrapper serialises it with the GIL (alloc never releases it);
 * C code that bumps one arena from several threads must lock around it. */
typedef struct {
    unsigned char *base;        /* borrowed: the block belongs to the Python owner object */
    size_t capacity;            /* multiple of RV_ALIGN */
    size_t offset;              /* bytes used since the last reset, multiple of RV_ALIGN */
    size_t high_water;          /* the largest offset ever reached */
    size_t allocation_count;    /* allocations since the last reset */
    size_t reset_count;
    int debug;                  /* poison [0, high_water) on reset */
} rv_arena;

/* Start of nbytes of arena memory (the bump advances by nbytes rounded up to RV_ALIGN), or
 * NULL, leaving the arena unchanged, when they do not fit. Every result is RV_ALIGN-aligned
 * because base, capacity and offset are. */
RV_INLINE void *rv_arena_bump(rv_arena *a, size_t nbytes)
{
    size_t remaining = a->capacity - a->offset;
    if (RV_UNLIKELY(nbytes > remaining))
        return NULL;
    /* nbytes <= remaining and remaining is a multiple of RV_ALIGN: rounding cannot pass it */
    unsigned char *p = a->base + a->offset;
    a->offset += (nbytes + RV_ALIGN - 1) & ~(size_t)(RV_ALIGN - 1);
    if (a->offset > a->high_water)
        a->high_water = a->offset;
    a->allocation_count++;
    return p;
}

/* O(1): only the counters move, unless the arena poisons in debug mode. */
RV_INLINE void rv_arena_reset(rv_arena *a)
{
    if (a->debug)
        memset(a->base, RV_POISON_BYTE, a->high_water);
    a->offset = 0;
    a->allocation_count = 0;
    a->reset_count++;
}

/* ---- scratch: one shared region and one region per thread -----------------------------
 * What a parallel driver's work buffers come from (ruvpy.ScratchSpace owns the memory): the
 * shared region holds what every thread reads (a plan's task list, context splits' partial
 * states), thread t's region what only OpenMP thread t touches. Drivers say how much they
 * need (their plan's shared_bytes / thread_bytes) before they run. */
typedef struct {
    unsigned char *shared;      /* shared_bytes, RV_ALIGN-aligned (NULL if 0) */
    size_t shared_bytes;
    unsigned char *threads;     /* thread t's region at threads + t * thread_stride */
    size_t thread_stride;       /* multiple of RV_ALIGN */
    size_t thread_bytes;        /* usable bytes of each thread's region */
    int nthreads;
} rv_scratch;

/* Whether `s` has room for a driver needing shared / per_thread bytes on nthreads threads. */
RV_INLINE int rv_scratch_fits(const rv_scratch *s, size_t shared, size_t per_thread, int nthreads)
{
    return s && s->shared_bytes >= shared && s->thread_bytes >= per_thread && s->nthreads >= nthreads;
}

/* ---- buffer pool: per-size-class free lists, one mutex per class ------------------------
 * The classes are the five defaults (1, 4, 16, 64, 256 KiB) or the caller's own (at most
 * RV_POOL_MAX_CLASSES, ascending), each with its own limit of free buffers: a Runtime adds a
 * class for each size its two-tier cache's cold groups have (the codec's largest blob of a
 * layer) and keeps its whole capacity of them on the free list, so migration never calls the
 * allocator. A pool's allocation holds its own classes only. */

#define RV_POOL_CLASSES 5               /* the default classes */
/* the defaults and a class for each size a two-tier cache's cold groups can have: TurboQuant
 * layers with widths of their own have one of up to 65 sizes (key + value code bits from 4 to
 * 8 in steps of 1/16 at head_dim 256) */
#define RV_POOL_MAX_CLASSES 72
#define RV_POOL_MAX_BUFFERS_PER_CLASS ((size_t)1 << 24)

typedef struct {
    pthread_mutex_t lock;
    void **free_list;           /* max_buffers slots, `count` used */
    size_t count;
    size_t nbytes;              /* the class's buffer size */
    size_t max_buffers;         /* free buffers kept at most */
    /* counters: changed under `lock`, except allocations and outstanding (atomics) */
    uint64_t hits, misses, returns, drops;
    uint64_t allocations;       /* buffers this class ever allocated (misses + prewarm) */
    uint64_t outstanding;       /* buffers handed out and not yet returned or dropped */
} __attribute__((aligned(RV_ALIGN))) rv_pool_class;  /* own cache line: no false sharing */

typedef struct {
    int nclasses;
    size_t max_buffers;         /* the default limit per class */
    rv_pool_class cls[];        /* nclasses of them */
} rv_pool;

typedef struct {
    uint64_t hits, misses, allocations, returns, drops;
    size_t pooled_bytes, outstanding_bytes;
    size_t free_buffers[RV_POOL_MAX_CLASSES];
} rv_pool_stats;

extern const size_t rv_pool_class_bytes[RV_POOL_CLASSES];  /* 1, 4, 16, 64, 256 KiB */

/* The smallest class of p holding nbytes, or -1 when nbytes exceeds the largest. */
int rv_pool_class_for(const rv_pool *p, size_t nbytes);

/* A pool of the default classes keeping at most max_buffers_per_class (<=
 * RV_POOL_MAX_BUFFERS_PER_CLASS) free buffers per class; NULL when out of memory or the limit
 * is absurd. The struct is cache-line aligned, hence heap-allocated here rather than embedded
 * in a Python object. */
rv_pool *rv_pool_create(size_t max_buffers_per_class);
/* A pool of n classes (1 <= n <= RV_POOL_MAX_CLASSES) of bytes[i] (ascending, each a multiple
 * of RV_ALIGN) keeping at most max_buffers[i] free buffers each; NULL if invalid or out of
 * memory. */
rv_pool *rv_pool_create_classes(const size_t *bytes, const size_t *max_buffers, int n);
void rv_pool_destroy(rv_pool *p);   /* frees the pooled buffers and the pool */

/* A buffer of class c: a pooled one (a hit) or a new allocation (a miss), NULL when out of
 * memory. Give it back with rv_pool_release: onto the free list (a return) or, when the class
 * already holds its max_buffers, freed (a drop). Both block on the class mutex only around the
 * free-list step; allocation and freeing happen outside it. */
void *rv_pool_acquire(rv_pool *p, int c);
void rv_pool_release(rv_pool *p, int c, void *buffer);

/* Allocate and pool up to `count` buffers of class c, never beyond its max_buffers; the number
 * added in *added. RV_ENOMEM if an allocation failed (those made so far stay pooled). */
int rv_pool_prewarm(rv_pool *p, int c, size_t count, size_t *added);
void rv_pool_clear(rv_pool *p);                  /* free every pooled buffer */
/* bytes the pool itself takes: its struct and each class's free list (max_buffers slots) */
size_t rv_pool_meta_bytes(const rv_pool *p);
void rv_pool_get_stats(rv_pool *p, rv_pool_stats *out);

#endif
