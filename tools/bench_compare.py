"""Run one of ruvpy's benchmark scripts against two checkouts side by side, and compare.

    python tools/bench_compare.py --old /tmp/old-checkout [--new .] --rounds 3 \
        bench_kvcache.py -- --repeats 15 --quick

Each round runs `python <checkout>/tools/<script> --json ... <args>` once per checkout, in
separate subprocesses, the order alternating from round to round (old, new; new, old; ...)
so that drift in the machine's load hits both alike; each checkout imports its own in-place
build. The script's JSON tables (every list of row dicts in it) are matched row by row (rows
agree on their text and integer fields), every time-like column (ms, _ns, seconds, tok/s,
GB/s; in a table without any, every float column) is reduced to its median over the rounds, and both tables are printed with the ratio
new / old next to each value (for a rate, tok/s or GB/s, higher is better; for a time, lower).
The comparison is also written as JSON (--json). On a shared machine give --lock PATH: each
run then takes that file's exclusive lock (flock) for itself alone and releases it between
runs, so that other work is held off only while something is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

TIME_MARKS = ("ms", "_ns", "seconds", "tok/s", "GB/s", "GBps", "_us")
RATE_MARKS = ("tok/s", "GB/s", "GBps", "GFLOPs")


def is_metric(name):
    return any(mark in name for mark in TIME_MARKS + RATE_MARKS)


def tables_of(result, prefix=""):
    """{table name: rows} for every list of dicts in a script's JSON."""
    found = {}
    if isinstance(result, dict):
        for key, value in result.items():
            if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
                found[prefix + key] = value
            elif isinstance(value, dict) and key not in ("machine",):
                found.update(tables_of(value, prefix + key + "."))
    return found


def row_key(row):
    return tuple((k, v) for k, v in row.items()
                 if isinstance(v, (str, bool)) or (isinstance(v, int) and not is_metric(k)))


def run_once(checkout, script, args, env, lock=None):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        cmd = [sys.executable, os.path.join(checkout, "tools", script), "--json", out, *args]
        if lock:
            cmd = ["flock", "-x", lock] + cmd
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=checkout, env=dict(env, PYTHONPATH=checkout),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{checkout}: {' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f), time.perf_counter() - t0
    finally:
        os.unlink(out)


def _median(values):
    """median of the numbers (None where a run has none)"""
    numbers = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(numbers) if numbers else None


def fmt(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def print_table(title, header, rows):
    cells = [header] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(title)
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    print()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", required=True, help="checkout of the old code (built in place)")
    ap.add_argument("--new", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help="checkout of the new code (default: this one)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write the comparison here")
    ap.add_argument("--lock", help="take this file's exclusive flock for each run")
    ap.add_argument("script", help="a tools/ script, e.g. bench_kvcache.py")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="its arguments, after --")
    opts = ap.parse_args(argv)
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    sides = {"old": os.path.abspath(opts.old), "new": os.path.abspath(opts.new)}
    env = dict(os.environ)
    runs = {"old": [], "new": []}
    raw = []       # every run's own JSON, kept in the comparison
    for r in range(opts.rounds):
        order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
        for side in order:
            result, seconds = run_once(sides[side], opts.script, args, env, opts.lock)
            runs[side].append(tables_of(result))
            raw.append({"round": r, "side": side, "result": result})
            print(f"round {r + 1}/{opts.rounds}: {side} in {seconds:.0f} s", file=sys.stderr, flush=True)
            time.sleep(1.0)      # let the other side's threads settle
    comparison = {"script": opts.script, "args": args, "rounds": opts.rounds, "checkouts": sides,
                  "tables": {}, "runs": raw}
    for table in runs["new"][0]:
        header_keys, metrics, rows = None, None, []
        for row in runs["new"][0][table]:
            key = row_key(row)
            values = {}
            for side in sides:
                matches = [next((x for x in run.get(table, []) if row_key(x) == key), None)
                           for run in runs[side]]
                matches = [m for m in matches if m is not None]
                values[side] = matches
            if not values["old"]:
                continue
            if metrics is None:
                header_keys = [k for k, _ in key]
                numbers = [k for k, v in row.items() if isinstance(v, float)
                           and any(isinstance(m.get(k), (int, float)) for m in values["old"])]
                # the timings when there are any, else every measured number (bytes, errors)
                metrics = [k for k in numbers if is_metric(k)] or numbers
            entry = {k: v for k, v in key}
            printed = [v for _, v in key]
            for metric in metrics:
                old = _median([m.get(metric) for m in values["old"]])
                new = _median([m.get(metric) for m in values["new"]])
                ratio = new / old if old and new is not None else None
                entry[metric] = {"old": old, "new": new, "new/old": ratio}
                printed += [old, new, ratio]
            rows.append(printed)
            comparison["tables"].setdefault(table, []).append(entry)
        if rows:
            header = header_keys + [f"{m} {s}" for m in metrics for s in ("old", "new", "new/old")]
            print_table(f"{opts.script} {table} (medians of {opts.rounds} rounds; old = {sides['old']})",
                        header, rows)
    print(json.dumps({k: v for k, v in comparison.items() if k != "runs"}, indent=1))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(comparison, f, indent=1)


if __name__ == "__main__":
    main()
