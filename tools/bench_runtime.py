"""What the Runtime itself costs per step.attention call and per step at decode, excluding the
attention kernel.

    python tools/bench_runtime.py [--contexts 128] [--repeats 300] [--threads N] [--json out.json]

The same decode inputs (SmolLM2-135M's shape: 30 layers, 9/3 heads x 64) go through
`step.attention` and through the cache call it makes directly (the step's AttentionPlan.attend,
where the cache plans steps; before that, the cache's append_attend), alternating, each step
rolled back so the context stays put; overhead = median(step.attention) - median(direct call).
Likewise a step's enter + exit against the reserve + begin (+ plan) + commit calls it makes. The context is synthetic K/V filled through Runtime steps. Prints a table, JSON with
--json. (Until the GGUF weights moved into ruvpy's kernels this was part 2 of bench_decode.py.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

try:
    import ruvpy
except ImportError:    # run as `python tools/bench_runtime.py` from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import ruvpy
from ruvpy.runtime import Runtime, RuntimeConfig

CACHES = {
    "paged fp16": dict(kv_cache="paged", kv_dtype="float16"),
    "two-tier q4": dict(kv_cache="two-tier", cold="q4"),
}
FILL_CHUNK = 512


class _Rollback(Exception):
    """Raised inside a step to roll it back (keeps the context length fixed)."""


def fill_context(runtime, seq, tokens, rng):
    """Append `tokens` synthetic tokens to seq (random K/V of unit scale) through steps."""
    cfg = runtime.config
    done = 0
    while done < tokens:
        n = min(FILL_CHUNK, tokens - done)
        with runtime.step([seq], [n]) as step:
            q = rng.standard_normal((n, cfg.num_heads, cfg.head_dim), dtype=np.float32)
            for layer in range(cfg.num_layers):
                kv = rng.standard_normal((2, n, cfg.num_kv_heads, cfg.head_dim),
                                         dtype=np.float32)
                step.attention(layer, q, kv[0], kv[1])
        done += n


def _cache_calls(cache, seqs, n_tokens, heads):
    """What a step's enter does to the cache (reserve, begin, and plan where the cache plans
    steps); returns the per-layer call a step.attention makes."""
    cache.reserve(seqs, n_tokens)
    cache.begin(seqs)
    if hasattr(cache, "plan"):
        plan = cache.plan(seqs, n_tokens, num_heads=heads)
        return lambda layer, q, k, v, out: plan.attend(layer, q, k, v, out=out)
    return lambda layer, q, k, v, out: cache.append_attend(layer, seqs, n_tokens, q, k, v, out=out)


def bench_runtime_overhead(shape, cache_name, context, repeats, rng):
    """Median ns per decode step.attention vs the direct cache call, and per step
    enter+exit vs reserve/begin/commit, over `repeats` alternating rounds."""
    layers, heads, kv_heads, head_dim = shape
    cfg = RuntimeConfig(num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                        head_dim=head_dim, max_tokens=context + 2 * repeats + 64,
                        **CACHES[cache_name])
    via_step, direct, step_frame, direct_frame = [], [], [], []
    clock = time.perf_counter_ns
    with Runtime(cfg) as rt:
        seq = rt.add_sequence()
        fill_context(rt, seq, context, rng)
        cache, seqs, n_tokens = rt.cache, [seq], [1]
        q = rng.standard_normal((1, heads, head_dim), dtype=np.float32)
        k = rng.standard_normal((1, kv_heads, head_dim), dtype=np.float32)
        v = rng.standard_normal((1, kv_heads, head_dim), dtype=np.float32)
        out = np.empty((1, heads, head_dim), np.float32)
        for _ in range(repeats):
            # through the Runtime (rolled back by an exception: the context stays put)
            try:
                t0 = clock()
                with rt.step(seqs, n_tokens) as step:
                    t1 = clock()
                    for layer in range(layers):
                        a = clock()
                        step.attention(layer, q, k, v)
                        via_step.append(clock() - a)
                    raise _Rollback
            except _Rollback:
                pass
            step_frame.append(t1 - t0)
            # the cache alone, same inputs (and the step frame's direct equivalent)
            t0 = clock()
            attend = _cache_calls(cache, seqs, n_tokens, heads)
            t1 = clock()
            for layer in range(layers):
                a = clock()
                attend(layer, q, k, v, out)
                direct.append(clock() - a)
            cache.rollback(seqs)
            direct_frame.append(t1 - t0)
        # a complete step's enter + exit (commit, arena reset), versus the cache calls it
        # makes (reserve + begin, commit); the attention calls in between are not timed
        full_step, full_direct = [], []
        for _ in range(repeats):
            step = rt.step(seqs, n_tokens)
            t0 = clock()
            step.__enter__()
            t1 = clock()
            for layer in range(layers):
                step.attention(layer, q, k, v)
            t2 = clock()
            step.__exit__(None, None, None)
            full_step.append(t1 - t0 + clock() - t2)
            t0 = clock()
            attend = _cache_calls(cache, seqs, n_tokens, heads)
            t1 = clock()
            for layer in range(layers):
                attend(layer, q, k, v, out)
            t2 = clock()
            cache.commit(seqs)
            full_direct.append(t1 - t0 + clock() - t2)
    med = statistics.median
    return {"cache": cache_name, "context": context, "calls": len(via_step),
            "step_attention_ns": med(via_step), "direct_call_ns": med(direct),
            "overhead_per_call_ns": med(via_step) - med(direct),
            "step_enter_ns": med(step_frame), "direct_reserve_begin_ns": med(direct_frame),
            "full_step_ns": med(full_step), "full_direct_ns": med(full_direct),
            "overhead_per_step_ns": med(full_step) - med(full_direct)}



def _table(title, columns, rows):
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128])
    parser.add_argument("--repeats", type=int, default=300, help="steps per method")
    parser.add_argument("--caches", nargs="+", choices=list(CACHES), default=list(CACHES))
    parser.add_argument("--threads", type=int, default=None, help="ruvpy kernel threads")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        ruvpy.set_num_threads(args.threads)
        for options in CACHES.values():
            options["threads"] = args.threads
    rng = np.random.default_rng(0)
    shape = (30, 9, 3, 64)        # SmolLM2-135M: layers, heads, kv heads, head_dim
    results = [bench_runtime_overhead(shape, cache, context, args.repeats, rng)
               for cache in args.caches for context in args.contexts]
    info = ruvpy.info()
    print(f"ruvpy {ruvpy.__version__}, ISA {info['isa']}, {info['threads']} threads")
    print(_table(
        f"\nRuntime overhead at decode (shape {shape}, medians in microseconds; overhead = "
        f"through the Runtime minus the cache's own call)",
        ["cache", "context", "step.attention", "cache call", "overhead/call",
         "step enter+exit", "reserve+begin+commit", "overhead/step"],
        [[r["cache"], str(r["context"]), f"{r['step_attention_ns'] / 1e3:.2f}",
          f"{r['direct_call_ns'] / 1e3:.2f}", f"{r['overhead_per_call_ns'] / 1e3:.2f}",
          f"{r['full_step_ns'] / 1e3:.2f}", f"{r['full_direct_ns'] / 1e3:.2f}",
          f"{r['overhead_per_step_ns'] / 1e3:.2f}"] for r in results]))
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
