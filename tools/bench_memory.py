"""Benchmark ruvpy's memory layer against numpy.empty and a plain Python list free-list.

    python tools/bench_memory.py [--json PATH] [--quick]

All cases run side by side in one process, interleaved sample by sample (so machine noise
hits them alike); each sample times a loop of calls, and the table shows the median over
samples of the time per call. Times include the benchmark loop itself (the same for every
case; shown as "loop overhead"), so ratios are conservative.

Targets (issue 2): arena alloc of a small array <= 0.5x numpy.empty of the same shape (alloc
includes a reset every ARENA_RESET_EVERY allocations); pool acquire+release <= 1 us median.
The "reference floors" rows bound what any Python-level allocator returning an ndarray can
reach: a call taking two arguments, and creating + freeing one ndarray object (view()).

OPENBLAS_NUM_THREADS defaults to 1 here: numpy's OpenBLAS otherwise keeps spinning threads
that compete with the benchmark on a small machine (they slow every case alike).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import ruvpy  # noqa: E402

ARENA_RESET_EVERY = 1000        # allocations per step between resets
SMALL_SHAPES = [(64,), (16, 64)]
POOL_SIZES = [1024, 64 * 1024]
ARENA_TARGET_RATIO = 0.5
POOL_TARGET_NS = 1000.0


def make_loop(body, names, setup_each_chunk="pass"):
    """A function running `body` chunks x ARENA_RESET_EVERY times, `setup_each_chunk` before
    each chunk (the same loop shape for every case), with `names` bound as locals."""
    bind = "".join(f"    {name} = env[{name!r}]\n" for name in names)
    src = (f"def run(chunks, env):\n{bind}"
           f"    for _ in range(chunks):\n"
           f"        {setup_each_chunk}\n"
           f"        for _ in range({ARENA_RESET_EVERY}):\n"
           f"            {body}\n")
    namespace = {}
    exec(compile(src, "<bench>", "exec"), namespace)
    return namespace["run"]


class Case:
    def __init__(self, group, name, body, env, setup_each_chunk="pass"):
        self.group, self.name, self.env = group, name, env
        self.run = make_loop(body, env, setup_each_chunk)
        self.samples = []

    def sample(self, chunks):
        start = time.perf_counter_ns()
        self.run(chunks, self.env)
        self.samples.append((time.perf_counter_ns() - start) / (chunks * ARENA_RESET_EVERY))

    @property
    def median(self):
        return statistics.median(self.samples)


def build_cases():
    f32 = np.float32
    template = np.empty(64, f32)
    cases = [
        Case("reference floors", "loop overhead (empty body)", "pass", {}),
        Case("reference floors", "dict.get(shape, f32): a 2-argument C call", "get(shape, f32)",
             {"get": {}.get, "shape": (64,), "f32": f32}),
        Case("reference floors", "ndarray.view(): any call returning a new ndarray",
             "view()", {"view": template.view}),
    ]
    arena = ruvpy.Arena(ARENA_RESET_EVERY * 16 * 64 * 4 + 4096)
    for shape in SMALL_SHAPES:
        group = f"alloc {shape} float32"
        cases += [
            Case(group, "numpy.empty", "empty(shape, f32)",
                 {"empty": np.empty, "shape": shape, "f32": f32}),
            Case(group, f"Arena.alloc (+reset every {ARENA_RESET_EVERY})", "alloc(shape, f32)",
                 {"alloc": arena.alloc, "reset": arena.reset, "shape": shape, "f32": f32},
                 setup_each_chunk="reset()"),
        ]
    pool = ruvpy.BufferPool()
    for nbytes in POOL_SIZES:
        group = f"buffer of {nbytes // 1024} KiB"
        free_list = [bytearray(nbytes) for _ in range(32)]
        pool.prewarm(pool.SIZE_CLASSES[[c >= nbytes for c in pool.SIZE_CLASSES].index(True)], 4)
        env = {"acquire": pool.acquire, "n": nbytes, "empty": np.empty, "u8": np.uint8,
               "fl": free_list}
        cases += [
            Case(group, "numpy.empty (alloc + free)", "empty(n, u8)", env),
            Case(group, "list free-list pop+append", "b = fl.pop(); fl.append(b)", env),
            Case(group, "pool acquire+release", "acquire(n).release()", env),
            Case(group, "pool with-block", "with acquire(n): pass", env),
            Case(group, "pool acquire, freed by GC", "acquire(n)", env),
        ]
    return cases


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the JSON here (default: stdout, after the table)")
    parser.add_argument("--quick", action="store_true", help="fewer samples (smoke test)")
    args = parser.parse_args()
    samples, chunks = (5, 5) if args.quick else (31, 40)

    cases = build_cases()
    for case in cases:       # warm-up: first-touch pages, pool misses, caches
        case.sample(2)
        case.samples.clear()
    for _ in range(samples):
        for case in cases:
            case.sample(chunks)

    by_group = {}
    for case in cases:
        by_group.setdefault(case.group, {})[case.name] = case.median
    view_ns = next(v for k, v in by_group["reference floors"].items() if k.startswith("ndarray"))
    arena_ratios, floor_ratios = {}, {}
    for shape in SMALL_SHAPES:
        group = by_group[f"alloc {shape} float32"]
        arena_ns = next(v for k, v in group.items() if k.startswith("Arena.alloc"))
        arena_ratios[str(shape)] = arena_ns / group["numpy.empty"]
        floor_ratios[str(shape)] = view_ns / group["numpy.empty"]
    pool_ns = {f"{n // 1024} KiB": by_group[f"buffer of {n // 1024} KiB"]["pool acquire+release"]
               for n in POOL_SIZES}

    print(f"ruvpy {ruvpy.__version__} memory benchmark: median of {samples} samples x "
          f"{chunks * ARENA_RESET_EVERY} calls, ns per call")
    width = max(len(c.name) for c in cases)
    for group, results in by_group.items():
        print(f"\n{group}")
        for name, ns in results.items():
            print(f"  {name:<{width}}  {ns:9.1f} ns")
    print("\ntargets")
    for shape, ratio in arena_ratios.items():
        verdict = "ok" if ratio <= ARENA_TARGET_RATIO else "MISSED"
        print(f"  arena alloc {shape}: {ratio:.2f}x numpy.empty (target <= "
              f"{ARENA_TARGET_RATIO}x) {verdict}; ndarray.view() alone: "
              f"{floor_ratios[shape]:.2f}x")
    for size, ns in pool_ns.items():
        verdict = "ok" if ns <= POOL_TARGET_NS else "MISSED"
        print(f"  pool acquire+release {size}: {ns:.0f} ns (target <= {POOL_TARGET_NS:.0f} ns) "
              f"{verdict}")

    report = {
        "benchmark": "memory",
        "ruvpy": ruvpy.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "isa": ruvpy.get_isa(),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "samples": samples,
        "calls_per_sample": chunks * ARENA_RESET_EVERY,
        "arena_reset_every": ARENA_RESET_EVERY,
        "median_ns": by_group,
        "arena_over_numpy_empty": arena_ratios,
        "ndarray_view_over_numpy_empty": floor_ratios,
        "pool_acquire_release_ns": pool_ns,
        "targets_met": {
            "arena_alloc_le_0.5x_numpy_empty": all(r <= ARENA_TARGET_RATIO
                                                    for r in arena_ratios.values()),
            "pool_acquire_release_le_1us": all(ns <= POOL_TARGET_NS for ns in pool_ns.values()),
        },
    }
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
        print(f"\nJSON written to {args.json}")
    else:
        print("\n" + text)


if __name__ == "__main__":
    main()
