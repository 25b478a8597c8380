/* The calling thread's cached block of memory, for C entry points whose caller gives no scratch:
 * grown to the largest request (a quarter more, to stop regrowing), kept between calls, freed
 * by release or when the thread exits (the pthread key's destructor). Header-only and static:
 * each translation unit that includes it (one per extension) has a key of its own.
 * Block layout: its capacity (size_t), then the data RV_ALIGN bytes in. */
#ifndef RV_THREAD_BLOCK_H
#define RV_THREAD_BLOCK_H

#include <pthread.h>
#include <stdlib.h>

#include "rv_common.h"

static pthread_key_t rv_thread_block_key;
static pthread_once_t rv_thread_block_once = PTHREAD_ONCE_INIT;
static int rv_thread_block_key_ok;

static void rv_thread_block_key_create(void)
{
    rv_thread_block_key_ok = pthread_key_create(&rv_thread_block_key, free) == 0;
}

/* this thread's block, NULL if the key could not be made */
static inline char *rv_thread_block_held(int *ok)
{
    pthread_once(&rv_thread_block_once, rv_thread_block_key_create);
    *ok = rv_thread_block_key_ok;
    return rv_thread_block_key_ok ? (char *)pthread_getspecific(rv_thread_block_key) : NULL;
}

/* at least `need` bytes, RV_ALIGN-aligned; NULL when out of memory */
static inline void *rv_thread_block(size_t need)
{
    int ok;
    char *block = rv_thread_block_held(&ok);
    if (!ok)
        return NULL;
    if (block && *(size_t *)(void *)block >= need)
        return block + RV_ALIGN;
    const size_t cap = (need + need / 4 + RV_ALIGN - 1) / RV_ALIGN * RV_ALIGN;
    char *fresh = aligned_alloc(RV_ALIGN, cap + RV_ALIGN);
    if (!fresh)
        return NULL;
    *(size_t *)(void *)fresh = cap;
    if (pthread_setspecific(rv_thread_block_key, fresh) != 0) {
        free(fresh);
        return NULL;
    }
    free(block);
    return fresh + RV_ALIGN;
}

static inline void rv_thread_block_release(void)
{
    int ok;
    char *block = rv_thread_block_held(&ok);
    if (ok) {
        free(block);
        pthread_setspecific(rv_thread_block_key, NULL);
    }
}

/* bytes this thread's block holds (0: none) */
static inline size_t rv_thread_block_bytes(void)
{
    int ok;
    const char *block = rv_thread_block_held(&ok);
    return block ? *(const size_t *)(const void *)block + RV_ALIGN : 0;
}

#endif
