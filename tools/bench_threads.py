"""Decode attention with 1 thread vs ruvpy's default threads, on an idle and on a loaded machine.

    python tools/bench_threads.py [--json out.json] [--seconds 0.25] [--quick] [--loads idle,loaded]

Why: an OpenMP region of T threads ends at a barrier that waits for its slowest thread. When
other processes keep every core busy, a worker may wait a whole scheduler time slice for a
core, so a call that takes microseconds serially can take milliseconds in parallel. Decode at
short contexts (q_len 1, tens to hundreds of keys, hundreds of attention calls per token) is
exactly that case.

Cases: q_len 1 against kv_len 16 .. 16384 keys, (heads, kv heads, head_dim) = (9, 3, 64) and
(32, 8, 128), through ruvpy.attention (contiguous fp16 K/V), PagedKVCache (fp16, blocks of 16)
and TwoTierKVCache (hot 256 fp16 + cold q8). Each case is timed with 1 thread and with the
default thread count ("picks": the threads the drivers then actually use, fewer for
small calls): calls back to back for --seconds, then the other thread count, twice
(side by side under the same load); per-call median and mean (the throughput) in microseconds. "loaded": one busy-loop process per core runs in the
background (started here, stopped at the end). libgomp's waiting is set by OMP_WAIT_POLICY /
GOMP_SPINCOUNT in the environment before the run; the JSON records them.
"""
import argparse
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import emit_json, machine_info, print_table, settle  # noqa: E402

import ruvpy  # noqa: E402
from ruvpy import PagedKVCache, TwoTierKVCache  # noqa: E402

SHAPES = [(9, 3, 64), (32, 8, 128)]
KV_LENS = [16, 64, 256, 1024, 4096, 16384]
QUICK_KV_LENS = [16, 256, 4096]


class BusyLoad:
    """One busy-looping Python process per core, for the duration of a `with` block."""

    def __init__(self, processes):
        self.n = processes
        self.procs = []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        time.sleep(0.5)  # let them reach their loops
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []


def decode_paths(shape, kv_len, rng):
    """{path: fn()} decode attention calls over kv_len keys, and the objects to close."""
    heads, kvh, d = shape
    k = rng.standard_normal((kv_len, kvh, d)).astype(np.float16)
    v = rng.standard_normal((kv_len, kvh, d)).astype(np.float16)
    q = rng.standard_normal((1, heads, d)).astype(np.float32)
    out = np.empty_like(q)
    paged = PagedKVCache(1, kvh, d, block_size=16, max_tokens=kv_len, dtype="float16")
    twotier = TwoTierKVCache(1, kvh, d, hot_tokens=256, cold="q8", max_tokens=kv_len)
    fns = {"attention fp16": lambda: ruvpy.attention(q, k, v, out=out)}
    for name, cache in (("paged fp16", paged), ("two-tier q8", twotier)):
        seq = cache.add_sequence()
        cache.append(seq, 0, k, v)
        fns[name] = lambda c=cache, s=seq: c.attention(s, 0, q, out=out)
    return fns, (paged, twotier)


def time_threads(fn, thread_counts, seconds, rounds=2, warmup=3):
    """{threads: [seconds per call]}: calls back to back for `seconds` per thread count and
    round, the thread counts alternating round after round. Sustained runs, not a few calls:
    under load the slow pattern (a worker waiting for a core at every region) sets in only
    after the first scheduler time slices."""
    times = {t: [] for t in thread_counts}
    for _ in range(rounds):
        for t in thread_counts:
            ruvpy.set_num_threads(t)
            for _ in range(warmup):
                fn()
            end = time.perf_counter() + seconds
            while True:
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                times[t].append(t1 - t0)
                if t1 >= end:
                    break
    return times


def threads_picked(shape, kv_len, threads):
    """Threads the drivers use for this decode given `threads` (the caches count as fp16, like
    the contiguous fp16 call); None for a build without the work-based choice."""
    from ruvpy import _attention
    pick = getattr(_attention, "_threads_for", None)
    return pick(1, kv_len, *shape, np.float16, True, threads) if pick else None


def run_load(load, kv_lens, threads, seconds, rng):
    rows = []
    for shape in SHAPES:
        for kv_len in kv_lens:
            fns, caches = decode_paths(shape, kv_len, rng)
            for path, fn in fns.items():
                times = time_threads(fn, [1, threads], seconds)
                one, many = np.array(times[1]) * 1e6, np.array(times[threads]) * 1e6
                rows.append({"load": load, "shape": "/".join(map(str, shape)), "kv_len": kv_len,
                             "path": path, "picks": threads_picked(shape, kv_len, threads),
                             "t1_med_us": float(np.median(one)),
                             f"t{threads}_med_us": float(np.median(many)),
                             "ratio_med": float(np.median(many) / np.median(one)),
                             "t1_mean_us": float(one.mean()), f"t{threads}_mean_us": float(many.mean()),
                             "ratio_mean": float(many.mean() / one.mean())})
            for c in caches:
                c.close()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the JSON result here")
    ap.add_argument("--seconds", type=float, default=0.25,
                    help="seconds of back-to-back calls per case, thread count and round (2 rounds)")
    ap.add_argument("--quick", action="store_true", help=f"only kv_len {QUICK_KV_LENS}")
    ap.add_argument("--loads", default="idle,loaded", help="comma-separated: idle, loaded")
    args = ap.parse_args(argv)
    ruvpy.set_num_threads(None)
    threads = ruvpy.get_num_threads()
    kv_lens = QUICK_KV_LENS if args.quick else KV_LENS
    rng = np.random.default_rng(0)
    started = time.time()
    rows = []
    for load in args.loads.split(","):
        settle()
        if load == "idle":
            rows += run_load(load, kv_lens, threads, args.seconds, rng)
        elif load == "loaded":
            with BusyLoad(os.cpu_count() or 1):
                rows += run_load(load, kv_lens, threads, args.seconds, rng)
        else:
            ap.error(f"unknown load {load!r} (idle, loaded)")
    ruvpy.set_num_threads(None)
    env = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    print(f"threads 1 vs {threads}, ISA {ruvpy.get_isa()}, env {env}")
    print_table(rows, ["load", "shape", "kv_len", "path", "picks", "t1_med_us", f"t{threads}_med_us", "ratio_med",
                       "t1_mean_us", f"t{threads}_mean_us", "ratio_mean"])
    print()
    emit_json({"benchmark": "threads", "threads": threads, "isa": ruvpy.get_isa(), "env": env,
               "seconds": time.time() - started, "results": rows, "machine": machine_info()}, args.json)


if __name__ == "__main__":
    main()
