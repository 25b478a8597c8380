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

#endif
