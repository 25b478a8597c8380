/* How many threads a parallel region should use, from the work it has to do.
 *
 * Why: an OpenMP region costs a fork and a join (a barrier that waits for the slowest thread).
 * Measured on the 2-core Zen 4 VM (tools/bench_threads.py and an empty `omp parallel` region,
 * 2026-11-23): 0.6 us while the worker is still spinning from the last region; 7-40 us to wake
 * a worker that went to sleep (OMP_WAIT_POLICY=passive, or a few ms after the last region);
 * and when other processes keep the cores busy, one or more scheduler time slices, 8-64 ms per
 * call (median!), because the join waits for a worker that has no core -- while the spinning
 * threads keep theirs. Decode attention at short
 * contexts takes microseconds serially (q_len 1, (9,3,64) fp16: 3 us at 16 keys, 14 us at
 * 256), so there a second thread saves at most a few microseconds and risks milliseconds.
 *
 * The estimate of a call's serial time: RV_NS_PER_MAC per multiply-add (q.k and p.v, both
 * counted) plus RV_NS_PER_KV_BYTE per byte of K/V streamed, fitted to serial ruvpy.attention
 * with 1 thread (AVX-512): decode fp16 (9,3,64) 15.5 ns per token and KV head (model 14.1),
 * fp32 15.7-19.8 (model 20.5); (32,8,128) fp16 30 (model 33), fp32 46 (model 46); causal
 * prefill 0.024 ns per MAC (model 0.020). Other ISAs are slower, so the estimate errs towards
 * serial there, which is the safe side.
 *
 * Each thread must get at least RV_MIN_NS_PER_THREAD of that work: with two threads a call
 * goes parallel from ~100 us serial time, where halving it saves ~50 us, more than a sleeping
 * worker's wake-up (7-40 us) costs. Measured at that boundary, idle: (32,8,128) fp16 at 256
 * keys 63 us serial vs 35 us on 2 hot threads; (9,3,64) at 1024 keys 50 vs 29 us -- the few
 * tens of microseconds given up there are what buys immunity from the millisecond stalls
 * under load. Long contexts (>= a few hundred us) keep every thread. */
#ifndef RV_THREADS_H
#define RV_THREADS_H

#include <stdint.h>

#include "rv_common.h"

#define RV_NS_PER_MAC 0.020
#define RV_NS_PER_KV_BYTE 0.025
#define RV_MIN_NS_PER_THREAD 50000.0

/* Threads for a region with `work_ns` of serial work: at most `nthreads`, and no more than
 * give each thread RV_MIN_NS_PER_THREAD; 1 (serial) for small work. */
RV_INLINE int rv_team_size(int nthreads, double work_ns)
{
    if (nthreads <= 1)
        return 1;
    const double fit = work_ns / RV_MIN_NS_PER_THREAD;
    return fit >= (double)nthreads ? nthreads : (fit < 2.0 ? 1 : (int)fit);
}

/* Threads for an attention call: `pairs` (query token, visible key) pairs summed over the
 * call's queries, each costing 2 * heads * head_dim multiply-adds (q.k and p.v), and
 * `kv_tokens` keys whose K and V rows (kv_heads * head_dim elements of kv_elem_bytes each)
 * are streamed once. Caches with compressed tiers pass their fp16-equivalent size (2 bytes):
 * dequantizing costs about the time the bytes saved would have. */
RV_INLINE int rv_attn_team_size(int nthreads, int heads, int kv_heads, int head_dim, int64_t pairs,
                                int64_t kv_tokens, int kv_elem_bytes)
{
    const double macs = 2.0 * heads * head_dim * (double)pairs;
    const double kv_bytes = 2.0 * kv_heads * head_dim * kv_elem_bytes * (double)kv_tokens;
    return rv_team_size(nthreads, macs * RV_NS_PER_MAC + kv_bytes * RV_NS_PER_KV_BYTE);
}

/* ---- starting a team: workers that cannot be made are a status, not an exit ----
 *
 * libgomp starts the workers a region lacks with pthread_create and, when one fails, prints
 * "libgomp: Thread creation failed" and exits the process (gomp_fatal). Under an address-space
 * limit (RLIMIT_AS) a worker's stack -- 8 MiB of address space by default -- is what fails
 * first. So every parallel region of ruvpy is preceded by rv_team_start(T): it returns
 * RV_ETHREAD, and the region does not run, when the T - 1 workers could not be started.
 *
 * What libgomp does (team.c, gomp_team_start): each thread that starts regions has its own
 * pool of workers, kept between regions; a top-level region of T threads reuses the pool's
 * workers, creates the missing ones and lets the surplus exit, so the pool then holds exactly
 * T - 1 (a region of one thread leaves it alone). A nested region creates all of its workers
 * anew. The check therefore keeps, per thread, the pool size its regions left, and only when
 * a region needs more workers than that does it probe: it creates the missing number of
 * threads at once with libgomp's stack size (OMP_STACKSIZE / GOMP_STACKSIZE as libgomp parses
 * them -- it read them when it was loaded, the probe reads them now --, else the pthread
 * default) and joins them. Joined, their stacks stay mapped in glibc's stack cache (40 MiB of
 * stacks by default), where libgomp's pthread_create right after takes them, so it needs no
 * new address space; larger stacks are unmapped and libgomp maps them again a moment later,
 * which another thread's allocation in between could still take.
 *
 * The record must be one per process: libgomp's pools are, and a region of one extension
 * shrinks the pool another extension's record counts on. ruvpy._kernels holds it
 * (rv_team_check_here, instantiated there only) and every extension points rv_team_check at
 * it at import; with the hook unset (C test programs) rv_team_start checks nothing.
 * Not seen by the record: OpenMP regions the application itself runs from the same thread
 * (they resize the pool too), omp_pause_resource. OMP_DYNAMIC and OMP_THREAD_LIMIT make team
 * sizes libgomp's choice: then every region probes for all its workers (never too few). */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) || defined(__clang__)
#define RV_WEAK __attribute__((weak))
#else
#define RV_WEAK
#endif

typedef int (*rv_team_check_fn)(int nthreads);

/* the process's team check (ruvpy._kernels's), set by each extension at import; NULL: none.
 * Weak: every translation unit of an extension that includes this shares the one variable. */
RV_WEAK rv_team_check_fn rv_team_check;

/* points this extension's rv_team_check at the process's check (at import) */
static inline void rv_team_bind(rv_team_check_fn check) { rv_team_check = check; }

/* RV_OK, or RV_ETHREAD if the workers of a `nthreads`-thread region cannot be started; call
 * right before the region: nothing of the region's may be done yet, and nothing may fail
 * between the two (the check records the pool the region will leave) */
RV_INLINE int rv_team_start(int nthreads)
{
#ifdef _OPENMP
    const rv_team_check_fn check = rv_team_check;
    return nthreads > 1 && check ? check(nthreads) : RV_OK;
#else
    (void)nthreads;
    return RV_OK;
#endif
}

/* the calling thread's record (rv_team_check_here's), and why its last check failed */
typedef struct {
    int pool_workers;   /* workers of this thread's libgomp pool, as its regions left it */
    int threads;        /* the team asked for */
    int missing;        /* the workers that had to be started */
    int err;            /* pthread_create's error (EAGAIN: no memory for a stack) */
} rv_team_state;

static inline rv_team_state *rv_team_here(void)
{
    static _Thread_local rv_team_state state;
    return &state;
}

#ifdef _OPENMP
/* s past its white space (isspace's in the C locale, as libgomp skips it) */
static inline const char *rv_skip_space(const char *s)
{
    while (*s == ' ' || (*s >= '\t' && *s <= '\r'))
        s++;
    return s;
}

/* libgomp's parse_stacksize: a number, optional space, an optional unit B, K (default), M or
 * G, optional space; 0 if unset or malformed (libgomp then keeps the default too) */
static inline size_t rv_env_stacksize(const char *name)
{
    const char *s = getenv(name);
    char *end;
    unsigned long shift = 10;
    if (!s)
        return 0;
    s = rv_skip_space(s);
    if (!*s)
        return 0;
    errno = 0;
    const unsigned long v = strtoul(s, &end, 10);
    if (errno || end == s)
        return 0;
    const char *unit = rv_skip_space(end);
    if (*unit) {
        switch (*unit | 0x20) {
        case 'b': shift = 0; break;
        case 'k': break;
        case 'm': shift = 20; break;
        case 'g': shift = 30; break;
        default: return 0;
        }
        if (*rv_skip_space(unit + 1))
            return 0;
    }
    return ((v << shift) >> shift) == v ? (size_t)(v << shift) : 0;
}

static inline void *rv_team_probe_thread(void *arg) { return arg; }

/* Start n threads as libgomp would start workers, all alive at once, then join them: 0, or
 * the first pthread_create error */
static inline int rv_team_probe(int n)
{
    pthread_attr_t attr;
    pthread_t *ids = malloc(sizeof(pthread_t) * (size_t)n);
    int err = 0, started = 0;
    if (!ids)
        return ENOMEM;
    if ((err = pthread_attr_init(&attr)) != 0)
        goto out;
    {
        size_t size = rv_env_stacksize("OMP_STACKSIZE");
        if (!size)
            size = rv_env_stacksize("GOMP_STACKSIZE");
        if (size)
            pthread_attr_setstacksize(&attr, size);   /* refused: libgomp keeps the default too */
    }
    for (; started < n; started++)
        if ((err = pthread_create(&ids[started], &attr, rv_team_probe_thread, NULL)) != 0)
            break;
    for (int i = 0; i < started; i++)
        pthread_join(ids[i], NULL);
    pthread_attr_destroy(&attr);
out:
    free(ids);
    return err;
}
#endif

/* RV_OK when the calling thread's libgomp can field a team of `nthreads` without creating a
 * thread, or the threads it must create could be created just now; else RV_ETHREAD, the
 * reason in rv_team_here(). `record`: the region runs next, so the pool is taken to be what
 * it leaves; 0 for a check ahead of work that must not start unless the region can (nothing
 * recorded: the region's own check probes again). */
static inline int rv_team_check_impl(int nthreads, int record)
{
#ifdef _OPENMP
    rv_team_state *st = rv_team_here();
    const int want = nthreads - 1;
    if (want < 1)
        return RV_OK;
    int missing, pooled = 1;
    if (omp_get_level() > 0) {
        if (omp_get_active_level() >= omp_get_max_active_levels())
            return RV_OK;       /* nested and not active: a team of one */
        missing = want;         /* nested: every worker is new */
        pooled = 0;
    } else if (omp_get_dynamic() || omp_get_thread_limit() < INT_MAX) {
        missing = want;         /* libgomp sizes the team: assume no worker is kept */
        if (record)
            st->pool_workers = 0;
        pooled = 0;
    } else {
        missing = want - st->pool_workers;
    }
    if (missing > 0) {
        const int err = rv_team_probe(missing);
        if (err) {
            st->threads = nthreads;
            st->missing = missing;
            st->err = err;
            return RV_ETHREAD;
        }
    }
    if (pooled && record)
        st->pool_workers = want;   /* the region grows or shrinks the pool to this */
    return RV_OK;
#else
    (void)nthreads;
    (void)record;
    return RV_OK;
#endif
}

/* the check behind rv_team_check: right before the region (nothing may fail in between, or
 * the record would count workers libgomp never started) */
static inline int rv_team_check_here(int nthreads) { return rv_team_check_impl(nthreads, 1); }

/* the same question asked ahead of work the region's failure must not leave done */
static inline int rv_team_precheck_here(int nthreads) { return rv_team_check_impl(nthreads, 0); }

#endif
