"""Helpers shared by ruvpy's benchmark scripts (tools/bench_*.py).

    from _bench_common import read_bandwidth, median_time, print_table, emit_json, machine_info

- read_bandwidth(): the machine's read bandwidth in GB/s, measured with every ruvpy thread
  streaming its own share of a buffer much larger than the last-level cache (C + OpenMP loop,
  ruvpy._attention._stream_read). The best of several passes by default (the ceiling attention
  kernels are compared with); stat="median" for a ceiling comparable with a median kernel time.
- stream_pass(buf, threads): seconds of one such pass over a given buffer (paired measurements).
- median_time(fn): median seconds of fn() over repeats, after warm-up calls.
- print_table(rows, columns): aligned text table of a list of dicts.
- emit_json(obj, path): prints the JSON, and writes it to path when one is given.
- machine_info(): CPU, cores, load, ruvpy.info() -- what a result was measured on.
Timings on a shared machine are noisy: compare numbers measured side by side in one run.
"""
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run from a source checkout without installing (built in place)
    sys.path.insert(0, ROOT)


def _llc_bytes():
    """Size of the largest CPU cache (sysfs), or 32 MiB when unknown."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            digits = text.rstrip("KMG")
            if digits.isdigit():
                best = max(best, int(digits) * mult)
    except OSError:
        pass
    return best or 32 << 20


def read_bandwidth(nbytes=None, repeats=7, threads=None, stat="best"):
    """Read bandwidth (GB/s, 1e9 bytes) of `repeats` passes over a buffer of nbytes (default:
    16x the last-level cache, at least 256 MiB) with `threads` threads (default: ruvpy's thread
    count): the best pass (stat="best") or the median one (stat="median")."""
    if stat not in ("best", "median"):
        raise ValueError(f"stat must be 'best' or 'median', got {stat!r}")
    if nbytes is None:
        nbytes = max(256 << 20, 16 * _llc_bytes())
    buf = np.ones(nbytes, dtype=np.uint8)  # written once: every page is mapped before timing
    stream_pass(buf, threads)
    rates = [nbytes / stream_pass(buf, threads) / 1e9 for _ in range(repeats)]
    return max(rates) if stat == "best" else statistics.median(rates)


def stream_pass(buf, threads=None):
    """Seconds of one read of every byte of the contiguous buffer buf with `threads` threads
    (default: ruvpy's thread count)."""
    from ruvpy import _attention, get_num_threads
    nt = threads or get_num_threads()
    t0 = time.perf_counter()
    _attention._stream_read(buf, nt)
    return time.perf_counter() - t0


def settle(seconds=0.3):
    """Pause before timing a library: numpy's OpenBLAS and torch's OpenMP workers keep spinning
    for a while after their last call, and on 2 cores they would steal the next library's."""
    time.sleep(seconds)


def median_time(fn, repeats=11, warmup=2, min_time=0.0):
    """Median wall time of fn() in seconds over `repeats` calls (more calls, up to 10x, while
    their total is below min_time seconds), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    deadline = time.perf_counter() + min_time
    while len(times) < repeats or (time.perf_counter() < deadline and len(times) < 10 * repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fmt(value):
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e6:
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def print_table(rows, columns=None, file=None):
    """rows: list of dicts; columns: keys to show, in order (default: keys of the first row)."""
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    out = file or sys.stdout
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)), file=out)


def emit_json(obj, path=None):
    """Print obj as JSON; also write it to path if given."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=str)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def machine_info():
    import ruvpy
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg": load, "python": platform.python_version(),
            "numpy": np.__version__, "ruvpy": ruvpy.info()}
