"""SmolLM2-135M decode speed over ruvpy's Runtime, where the step time goes, and what the
Runtime itself costs per step.attention call.

    python tools/bench_decode.py [--contexts 128 1024 4096] [--decode-steps 24] [--json out.json]

1. Decode tokens/s at each context length with the paged fp16 cache and the two-tier q4 cache.
   The context is filled with synthetic K/V through Runtime steps (attention cost depends on
   the context length, not on the values; a real 4096-token prefill would dominate the run),
   then the real model decodes `--decode-steps` tokens with `forward_last`; medians.
   Each decode step is split into ruvpy time (step.attention calls: KV append + attention +
   Runtime overhead; and step enter/exit: reserve, begin, commit, arena reset) and the rest
   of the model's step (numpy matmuls, RMSNorm, RoPE, SwiGLU, logits).
2. Runtime overhead per step.attention call at decode, excluding the kernel: the same decode
   inputs through `step.attention` and through the cache call it makes directly (the step's
   AttentionPlan.attend, where the cache plans steps; before that, the cache's
   append_attend), alternating, each step rolled back so the context stays put;
   overhead = median(step.attention) - median(direct call). Likewise for a step's
   enter + exit versus the reserve + begin (+ plan) + commit calls they make.

Prints a table and writes JSON (--json). Timings are medians on a shared, noisy machine.
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
except ImportError:    # run as `python tools/bench_decode.py` from a source checkout
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


# ----------------------------------------------------------------------------------------
# timing proxies: wrap the Runtime the model drives, without touching ruvpy or the model
# ----------------------------------------------------------------------------------------

class _TimedStep:
    def __init__(self, step, clock):
        self._step, self._clock = step, clock

    def __enter__(self):
        t = time.perf_counter()
        self._step.__enter__()
        self._clock["step_overhead"] += time.perf_counter() - t
        return self

    def __exit__(self, *exc):
        t = time.perf_counter()
        result = self._step.__exit__(*exc)
        self._clock["step_overhead"] += time.perf_counter() - t
        return result

    @property
    def positions(self):
        return self._step.positions

    def attention(self, layer, q, k, v, **kwargs):
        t = time.perf_counter()
        out = self._step.attention(layer, q, k, v, **kwargs)
        self._clock["attention"] += time.perf_counter() - t
        return out

    def __getattr__(self, name):
        return getattr(self._step, name)


class _TimedRuntime:
    def __init__(self, runtime):
        self._runtime = runtime
        self.clock = {"attention": 0.0, "step_overhead": 0.0}

    def step(self, seqs, n_tokens):
        return _TimedStep(self._runtime.step(seqs, n_tokens), self.clock)

    def __getattr__(self, name):
        return getattr(self._runtime, name)


# ----------------------------------------------------------------------------------------
# 1. model decode
# ----------------------------------------------------------------------------------------

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


def bench_model_decode(base_model, cache_name, context, decode_steps, rng):
    options = CACHES[cache_name]
    model = base_model.with_kv_cache(max_tokens=context + decode_steps + 64, **options)
    try:
        seq = model.new_sequence()
        fill_context(model.runtime, seq, context - 1, rng)
        timed = _TimedRuntime(model.runtime)
        real_runtime, model.runtime = model.runtime, timed
        token = model.tokenize("The")[0]
        step_times, ruvpy_times, attention_times = [], [], []
        logits = model.forward_last(seq, [token])        # warm-up (first touch of buffers)
        for _ in range(decode_steps):
            token = int(np.argmax(logits))
            timed.clock.update(attention=0.0, step_overhead=0.0)
            t = time.perf_counter()
            logits = model.forward_last(seq, [token])
            step_times.append(time.perf_counter() - t)
            attention_times.append(timed.clock["attention"])
            ruvpy_times.append(timed.clock["attention"] + timed.clock["step_overhead"])
        model.runtime = real_runtime
        kv_bytes = real_runtime.cache.nbytes
    finally:
        model.close()
    step = statistics.median(step_times)
    ruvpy_share = statistics.median(r / s for r, s in zip(ruvpy_times, step_times))
    return {"cache": cache_name, "context": context, "decode_steps": decode_steps,
            "step_ms": 1e3 * step, "tokens_per_s": 1.0 / step,
            "ruvpy_ms": 1e3 * statistics.median(ruvpy_times),
            "attention_ms": 1e3 * statistics.median(attention_times),
            "ruvpy_share": ruvpy_share, "numpy_share": 1.0 - ruvpy_share,
            "kv_bytes": kv_bytes}


# ----------------------------------------------------------------------------------------
# 2. Runtime overhead per call
# ----------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------

def _table(title, columns, rows):
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--decode-steps", type=int, default=24)
    parser.add_argument("--overhead-repeats", type=int, default=300,
                        help="steps per method for the overhead measurement")
    parser.add_argument("--caches", nargs="+", choices=list(CACHES), default=list(CACHES))
    parser.add_argument("--threads", type=int, default=None,
                        help="RuntimeConfig.threads for ruvpy's kernels (default: the process "
                             "setting)")
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="numpy's OpenBLAS threads during model steps (ruvpy.models' "
                             "default: 1)")
    parser.add_argument("--no-model", action="store_true",
                        help="only the Runtime overhead (no model needed)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        ruvpy.set_num_threads(args.threads)     # the direct cache calls run with them too
        for options in CACHES.values():
            options["threads"] = args.threads
    rng = np.random.default_rng(0)
    info = ruvpy.info()
    results = {"isa": info["isa"], "threads": args.threads or info["threads"],
               "blas_threads": args.blas_threads, "decode": [], "overhead": []}
    shape = (30, 9, 3, 64)        # SmolLM2-135M: layers, heads, kv heads, head_dim

    if not args.no_model:
        from ruvpy import models

        base = models.load(max_tokens=256, blas_threads=args.blas_threads)
        shape = (base.config.num_layers, base.config.num_heads, base.config.num_kv_heads,
                 base.config.head_dim)
        try:
            for cache_name in args.caches:
                for context in args.contexts:
                    r = bench_model_decode(base, cache_name, context, args.decode_steps, rng)
                    results["decode"].append(r)
                    print(f"  {cache_name:12s} ctx {context:5d}: {r['tokens_per_s']:6.1f} tok/s",
                          file=sys.stderr, flush=True)
        finally:
            base.close()
    for cache_name in args.caches:
        results["overhead"].append(
            bench_runtime_overhead(shape, cache_name, min(args.contexts), args.overhead_repeats,
                                   rng))

    print(f"ruvpy {ruvpy.__version__}, ISA {info['isa']}, {results['threads']} ruvpy threads, "
          f"{args.blas_threads} BLAS threads")
    if results["decode"]:
        print(_table(
            "\nSmolLM2-135M decode (median per token; ruvpy = attention + KV cache + step "
            "overhead, rest = numpy matmuls & element-wise)",
            ["cache", "context", "tok/s", "step ms", "ruvpy ms", "attn ms", "ruvpy %",
             "numpy %", "KV MiB"],
            [[r["cache"], str(r["context"]), f"{r['tokens_per_s']:.1f}", f"{r['step_ms']:.2f}",
              f"{r['ruvpy_ms']:.2f}", f"{r['attention_ms']:.2f}",
              f"{100 * r['ruvpy_share']:.1f}", f"{100 * r['numpy_share']:.1f}",
              f"{r['kv_bytes'] / 2**20:.1f}"] for r in results["decode"]]))
    print(_table(
        f"\nRuntime overhead at decode (shape {shape}, medians in microseconds; overhead = "
        f"through the Runtime minus the cache's own call)",
        ["cache", "context", "step.attention", "cache call", "overhead/call",
         "step enter+exit", "reserve+begin+commit", "overhead/step"],
        [[r["cache"], str(r["context"]), f"{r['step_attention_ns'] / 1e3:.2f}",
          f"{r['direct_call_ns'] / 1e3:.2f}", f"{r['overhead_per_call_ns'] / 1e3:.2f}",
          f"{r['full_step_ns'] / 1e3:.2f}", f"{r['full_direct_ns'] / 1e3:.2f}",
          f"{r['overhead_per_step_ns'] / 1e3:.2f}"] for r in results["overhead"]]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
