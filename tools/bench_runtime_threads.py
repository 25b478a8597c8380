"""N Runtimes driven by N Python threads at once, against the same N run one after another.

    python tools/bench_runtime_threads.py [--runtimes 8] [--context 2048] [--steps 32]
                                          [--repeats 3] [--kv paged,two-tier] [--json out.json]

Each Runtime (kernel threads = 1, so the only parallelism is the Python threads) holds one
sequence of --context tokens (12 layers, 9 heads / 3 KV heads of 64, SmolLM2-like) and runs
--steps decode steps (q/k/v prepared beforehand: the time is the Runtime's). "serial" runs
the N workloads one after another in the main thread; "threads" runs them in N threads
started together. If the kernels held the GIL the threads could not beat serial; the ceiling
is the number of cores (this machine: os.cpu_count(), shown) -- a speed-up > 1 is the GIL
released. Both orders alternate over --repeats rounds; medians are reported. The outputs of
both modes are compared bit for bit.
Take the exclusive CPU lock on a shared machine: flock -x /tmp/ruvpy-cpu.lock python ...
"""
import argparse
import os
import statistics
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import emit_json, machine_info, print_table  # noqa: E402

from ruvpy import Runtime, RuntimeConfig  # noqa: E402

SHAPE = dict(num_layers=12, num_heads=9, num_kv_heads=3, head_dim=64)


class Workload:
    """One Runtime filled to `context` tokens, and the q/k/v of `steps` decode steps."""

    def __init__(self, kv_cache, context, steps, seed):
        rng = np.random.default_rng(seed)
        extra = {} if kv_cache == "paged" else dict(hot_tokens=256, cold="q8")
        self.cfg = cfg = RuntimeConfig(**SHAPE, kv_cache=kv_cache, threads=1,
                                       max_tokens=context + 4 * steps + 64, **extra)
        self.rt = Runtime(cfg)
        self.seq = self.rt.add_sequence()
        H, KVH, D, L = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
        with self.rt.step([self.seq], [context]) as step:
            for layer in range(L):
                step.attention(layer, rng.standard_normal((context, H, D), np.float32),
                               rng.standard_normal((context, KVH, D), np.float32),
                               rng.standard_normal((context, KVH, D), np.float32))
        self.q = rng.standard_normal((steps, L, 1, H, D), np.float32)
        self.kv = rng.standard_normal((steps, L, 2, 1, KVH, D), np.float32)
        self.steps = steps

    def run(self):
        """steps decode steps; then they are truncated away (when the cache can), so every
        round attends over the same context. Returns the last step's outputs."""
        rt, seq = self.rt, self.seq
        start = rt.position(seq)
        outs = []
        for i in range(self.steps):
            with rt.step([seq], [1]) as step:
                outs = [step.attention(layer, self.q[i, layer], self.kv[i, layer, 0],
                                       self.kv[i, layer, 1]).copy()
                        for layer in range(self.cfg.num_layers)]
        if hasattr(rt, "truncate_sequence"):
            rt.truncate_sequence(seq, start)
        return np.array(outs)

    def close(self):
        self.rt.close()


def run_serial(workloads):
    t0 = time.perf_counter()
    outs = [w.run() for w in workloads]
    return time.perf_counter() - t0, outs


def run_threads(workloads):
    outs = [None] * len(workloads)
    start = threading.Barrier(len(workloads) + 1)

    def body(i):
        start.wait()
        outs[i] = workloads[i].run()

    threads = [threading.Thread(target=body, args=(i,)) for i in range(len(workloads))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, outs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runtimes", type=int, default=8)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kv", default="paged,two-tier")
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows, results = [], []
    for kv in [k.strip() for k in args.kv.split(",") if k.strip()]:
        print(f"== {kv}: {args.runtimes} runtimes x {args.steps} decode steps at "
              f"{args.context} tokens", file=sys.stderr, flush=True)
        workloads = [Workload(kv, args.context, args.steps, seed) for seed in range(args.runtimes)]
        try:
            serial, threaded = [], []
            run_serial(workloads)                         # warm-up (pages, pools, plans)
            for r in range(args.repeats):
                for mode in (("serial", "threads") if r % 2 == 0 else ("threads", "serial")):
                    if mode == "serial":
                        t, outs_s = run_serial(workloads)
                        serial.append(t)
                    else:
                        t, outs_t = run_threads(workloads)
                        threaded.append(t)
                    print(f"  round {r + 1}/{args.repeats} {mode}: {t:.3f} s", file=sys.stderr,
                          flush=True)
                same = all(np.array_equal(a, b) for a, b in zip(outs_s, outs_t))
                if not same:
                    raise SystemExit(f"{kv}: threaded outputs differ from serial ones")
        finally:
            for w in workloads:
                w.close()
        s, t = statistics.median(serial), statistics.median(threaded)
        result = {"kv_cache": kv, "runtimes": args.runtimes, "steps": args.steps,
                  "context": args.context, "serial_s": serial, "threads_s": threaded,
                  "serial_median_s": s, "threads_median_s": t, "speedup": s / t,
                  "outputs_equal": True}
        results.append(result)
        rows.append({"kv": kv, "runtimes": args.runtimes, "serial s": f"{s:.3f}",
                     "threads s": f"{t:.3f}", "speed-up": f"{s / t:.2f}x",
                     "steps/s threads": f"{args.runtimes * args.steps / t:.0f}"})
    print_table(rows, ["kv", "runtimes", "serial s", "threads s", "speed-up", "steps/s threads"])
    print(f"cores: {os.cpu_count()} (the ceiling of the speed-up)")
    emit_json({"machine": machine_info(), "results": results}, args.json)


if __name__ == "__main__":
    main()
