"""Soak: a long decode run through the Runtime while sequences come and go under a memory
budget, with failed steps injected; memory is sampled as it goes.

    python tools/soak.py [--steps 100000] [--sample-every 1000] [--warmup 10000]
                         [--kv two-tier|paged] [--budget-kib 384] [--seed 0]
                         [--out tools/soak] [--no-plot]

The run (defaults): a two-tier Runtime (q4 cold, 64 hot tokens, groups of 32, policy
"evict-oldest") of 2 layers, 4 heads / 2 KV heads of 32, with a KV budget of 384 KiB. Every
step decodes one token for each live sequence (1..4 of them, all in one step); now and then
a sequence arrives with a prefill of 8..96 tokens (that step is mixed prefill + decode), is
forked, or leaves after a random lifetime of 50..3,000 tokens. When the budget is reached
the oldest cold groups are evicted (the documented policy); a paged cache (--kv paged) keeps
every token, so there the step is refused (KVCacheFull, nothing changed) and the longest
sequence leaves. Every 9,973 steps a step raises
midway (after attending one layer); the step must roll back: every position, length and the
eviction count are as before it.

Checked at every step:
  * no token is lost except to eviction: for every sequence, position (tokens ever fed) -
    tokens held == the tokens evicted from it, and the sum over all sequences (the removed
    ones included) equals the cache's own evicted_tokens counter;
  * the KV cache never holds more bytes than the budget;
  * the attention output is finite.
Sampled every --sample-every steps: RSS (psutil), the arena's high-water mark, KV bytes and
tokens, total_bytes, glibc's heap in use, live sequences and evicted tokens.
After warm-up (--warmup steps) RSS must stay within 5 MiB (max - min of the samples); the
arena's high-water mark may grow only at a step of more tokens than every step before it.

Writes <out>.json (every sample and the verdict) and, with matplotlib (optional), <out>.png;
prints progress, a table and the JSON summary. Exit status 1 if a check fails.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from ruvpy import KVCacheFull, Runtime, RuntimeConfig  # noqa: E402

MiB = 1 << 20
RSS_FLAT_BYTES = 5 * MiB
FAIL_EVERY = 9973


class InjectedFailure(Exception):
    """Raised inside a step on purpose: the step must roll back."""


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]


def _heap_in_use():
    """Bytes glibc has handed out (mallinfo2: uordblks + hblkhd), or None elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        fn = libc.mallinfo2
    except (OSError, AttributeError, TypeError):
        return None
    fn.restype = _Mallinfo2
    m = fn()
    return int(m.uordblks + m.hblkhd)


def make_config(kv, budget):
    base = dict(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, arena_bytes=1 * MiB,
                memory_budget=budget, max_sequences=6)
    if kv == "paged":
        return RuntimeConfig(**base, kv_cache="paged", block_size=16)
    return RuntimeConfig(**base, kv_cache="two-tier", cold="q4", hot_tokens=64, group_size=32,
                         migration_batch=32, policy="evict-oldest")


def soak(steps, sample_every, warmup, kv="two-tier", budget=384 * 1024, seed=0, progress=True,
         fail_every=FAIL_EVERY):
    cfg = make_config(kv, budget)
    rng = np.random.default_rng(seed)
    H, KVH, D, L = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    # inputs come from fixed pools: the soak measures the runtime, not numpy's generator
    q_pool = rng.standard_normal((256, H, D)).astype(np.float32)
    kv_pool = rng.standard_normal((256, KVH, D)).astype(np.float32)
    process = psutil.Process()
    samples, problems = [], []
    counts = {"steps": 0, "tokens_fed": 0, "prefills": 0, "forks": 0, "removed": 0, "retired_full": 0,
              "injected_failures": 0, "refused_full": 0}
    lifetime, inherited = {}, {}        # seq -> tokens to live; lost tokens it was born with
    lost_by_removed = 0                 # tokens evicted from sequences since removed
    failed_at = set()                   # steps that failed once on purpose
    arena_hw = largest_step = 0         # the arena grows only for a step larger than all before
    t0 = time.perf_counter()

    def evicted_from(rt, seq):
        return rt.position(seq) - rt.seq_len(seq, 0) - inherited[seq]

    def check_tokens(rt, where):
        nonlocal problems
        evicted = rt.cache.stats().evicted_tokens if hasattr(rt.cache.stats(), "evicted_tokens") else 0
        lost = lost_by_removed + sum(evicted_from(rt, s) for s in rt.sequences)
        for s in rt.sequences:
            lens = {rt.seq_len(s, layer) for layer in range(L)}
            if len(lens) != 1:
                problems.append(f"{where}: sequence {s} has different lengths per layer {lens}")
        if kv == "paged" and lost:
            problems.append(f"{where}: {lost} tokens missing without eviction")
        if lost != evicted:
            problems.append(f"{where}: {lost} tokens missing, the cache evicted {evicted}")

    def sample(rt, i):
        st = rt.stats()
        samples.append({"step": i, "rss": process.memory_info().rss,
                        "arena_high_water": int(st.arena["high_water_mark"]),
                        "kv_bytes": int(st.kv["bytes"]), "kv_tokens": int(st.kv["tokens"]),
                        "total_bytes": int(st.total_bytes), "heap": _heap_in_use(),
                        "sequences": len(rt.sequences),
                        "evicted_tokens": int(getattr(rt.cache.stats(), "evicted_tokens", 0)),
                        "seconds": round(time.perf_counter() - t0, 2)})

    with Runtime(cfg) as rt:
        def add(n_prefill):
            seq = rt.add_sequence()
            lifetime[seq] = int(rng.integers(50, 3000))
            inherited[seq] = 0
            return seq, n_prefill

        live_new = [add(32)]
        i = 0
        while i < steps:
            seqs = rt.sequences
            # arrivals, forks and departures, between steps
            if len(seqs) < 4 and rng.random() < 0.01 and len(seqs) < cfg.max_sequences:
                try:
                    live_new.append(add(int(rng.integers(8, 97))))
                except (KVCacheFull, RuntimeError) as exc:
                    counts["refused_full"] += 1
                    if "sequence" not in str(exc) and not isinstance(exc, KVCacheFull):
                        raise
            if seqs and len(seqs) < 4 and rng.random() < 0.002:
                parent = seqs[int(rng.integers(len(seqs)))]
                if parent not in {s for s, _ in live_new}:
                    try:
                        child = rt.fork_sequence(parent)
                        lifetime[child] = int(rng.integers(50, 3000))
                        inherited[child] = rt.position(child) - rt.seq_len(child, 0)
                        counts["forks"] += 1
                    except (KVCacheFull, RuntimeError):
                        counts["refused_full"] += 1
            for s in list(rt.sequences):
                if rt.position(s) >= lifetime[s] and len(rt.sequences) > 1:
                    lost_by_removed += evicted_from(rt, s)
                    rt.remove_sequence(s)
                    del lifetime[s], inherited[s]      # the soak's own state stays flat too
                    counts["removed"] += 1
            prefill = dict(live_new)
            live_new = []
            seqs = rt.sequences
            if not seqs:
                live_new.append(add(32))
                continue
            n_tokens = [prefill.get(s, 1) for s in seqs]
            total = sum(n_tokens)
            fail = i > 0 and i % fail_every == 0 and i not in failed_at
            before = {s: (rt.position(s), rt.seq_len(s, 0)) for s in seqs}
            evicted_before = int(getattr(rt.cache.stats(), "evicted_tokens", 0))
            j = i % 128
            try:
                with rt.step(seqs, n_tokens) as step:
                    for layer in range(L):
                        out = step.attention(layer, np.resize(q_pool[j:], (total, H, D)),
                                             np.resize(kv_pool[j:], (total, KVH, D)),
                                             np.resize(kv_pool[j + 1:], (total, KVH, D)))
                        if fail:
                            raise InjectedFailure(f"step {i}")
                        if not np.isfinite(out).all():
                            problems.append(f"step {i}: non-finite attention output")
            except KVCacheFull:
                # the paged cache keeps every token (no eviction policy): when it is full the
                # longest sequence leaves, after the refused step changed nothing
                if kv != "paged":
                    raise
                after = {s: (rt.position(s), rt.seq_len(s, 0)) for s in seqs}
                if after != before:
                    problems.append(f"step {i}: a refused (full) step changed the sequences")
                victim = max(seqs, key=lambda s: rt.seq_len(s, 0))
                rt.remove_sequence(victim)
                del lifetime[victim], inherited[victim]
                counts["retired_full"] += 1
                live_new = [(s, n) for s, n in prefill.items() if s in before and s != victim]
                continue
            except InjectedFailure:
                counts["injected_failures"] += 1
                after = {s: (rt.position(s), rt.seq_len(s, 0)) for s in seqs}
                if after != before or int(getattr(rt.cache.stats(), "evicted_tokens", 0)) != evicted_before:
                    problems.append(f"step {i}: the failed step changed the sequences "
                                    f"({before} -> {after})")
                live_new = [(s, n) for s, n in prefill.items() if s in before]   # retry them
                failed_at.add(i)          # then the same step again, which succeeds
                continue
            counts["steps"] += 1
            counts["tokens_fed"] += total
            hw = int(rt.arena.stats().high_water_mark)
            if hw > arena_hw and total <= largest_step:
                problems.append(f"step {i}: the arena's high-water mark grew {arena_hw} -> {hw} "
                                f"at a step of {total} tokens (an earlier one had {largest_step})")
            arena_hw, largest_step = max(arena_hw, hw), max(largest_step, total)
            counts["prefills"] += len(prefill)
            kv_bytes = int(rt.cache.nbytes)
            if kv_bytes > budget:
                problems.append(f"step {i}: KV holds {kv_bytes} bytes > budget {budget}")
            if i % 97 == 0:
                check_tokens(rt, f"step {i}")
            if i % sample_every == 0 or i == steps - 1:
                check_tokens(rt, f"step {i}")
                sample(rt, i)
                if progress:
                    s = samples[-1]
                    print(f"  step {i:>7}/{steps}: RSS {s['rss'] / MiB:8.2f} MiB, arena hw "
                          f"{s['arena_high_water'] / 1024:7.1f} KiB, KV {s['kv_bytes'] / 1024:7.1f} "
                          f"KiB, {s['sequences']} seqs, evicted {s['evicted_tokens']}, "
                          f"{s['seconds']:.0f} s", file=sys.stderr, flush=True)
            if len(problems) > 50:
                break
            i += 1
    after = [s for s in samples if s["step"] >= warmup]
    rss = [s["rss"] for s in after]
    hw = [s["arena_high_water"] for s in after]
    verdict = {
        "rss_drift_bytes": (max(rss) - min(rss)) if rss else None,
        "rss_first_after_warmup": rss[0] if rss else None,
        "rss_last": rss[-1] if rss else None,
        "arena_high_water_moved_bytes": (max(hw) - min(hw)) if hw else None,
        "heap_drift_bytes": (max(s["heap"] for s in after) - min(s["heap"] for s in after))
        if after and after[0]["heap"] is not None else None,
    }
    if rss and verdict["rss_drift_bytes"] > RSS_FLAT_BYTES:
        problems.append(f"RSS moved {verdict['rss_drift_bytes'] / MiB:.2f} MiB after warm-up "
                        f"(limit 5 MiB)")
    return {"config": {"kv": kv, "budget_bytes": budget, "steps": steps, "warmup": warmup,
                       "sample_every": sample_every, "seed": seed, "fail_every": fail_every},
            "counts": counts, "verdict": verdict, "problems": problems[:50],
            "ok": not problems, "seconds": round(time.perf_counter() - t0, 1),
            "samples": samples}


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = result["samples"]
    x = [r["step"] for r in s]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7.5), sharex=True)
    axes[0].plot(x, [r["rss"] / MiB for r in s], label="process RSS")
    warm = result["config"]["warmup"]
    axes[0].axvline(warm, color="grey", ls=":", label="end of warm-up")
    axes[0].set_ylabel("MiB")
    axes[0].legend(loc="lower right")
    drift = result["verdict"]["rss_drift_bytes"]
    axes[0].set_title(f"ruvpy soak: {result['counts']['steps']:,} steps, "
                      f"{result['config']['kv']} KV under a {result['config']['budget_bytes'] // 1024} KiB "
                      f"budget; RSS drift after warm-up {drift / MiB if drift is not None else float('nan'):.2f} MiB",
                      fontsize=10)
    axes[1].plot(x, [r["arena_high_water"] / 1024 for r in s], label="arena high-water mark",
                 color="tab:green")
    axes[1].set_ylabel("KiB")
    axes[1].legend(loc="lower right")
    axes[2].plot(x, [r["kv_bytes"] / 1024 for r in s], label="KV bytes", color="tab:orange")
    axes[2].axhline(result["config"]["budget_bytes"] / 1024, color="red", ls="--", label="budget")
    axes[2].set_ylabel("KiB")
    axes[2].set_xlabel("decode step")
    axes[2].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--sample-every", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=10_000)
    p.add_argument("--kv", choices=("two-tier", "paged"), default="two-tier")
    p.add_argument("--budget-kib", type=int, default=384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "soak"))
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    result = soak(args.steps, args.sample_every, args.warmup, args.kv, args.budget_kib * 1024,
                  args.seed)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    if not args.no_plot:
        try:
            plot(result, args.out + ".png")
        except ImportError:
            print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    v = result["verdict"]
    print(f"{'steps':>8} {'tokens fed':>10} {'failures':>8} {'RSS drift MiB':>13} "
          f"{'arena hw moved':>14} {'heap drift KiB':>14} {'ok':>4}")
    heap = v["heap_drift_bytes"]
    print(f"{result['counts']['steps']:>8} {result['counts']['tokens_fed']:>10} "
          f"{result['counts']['injected_failures']:>8} {v['rss_drift_bytes'] / MiB:>13.3f} "
          f"{v['arena_high_water_moved_bytes']:>14} "
          f"{(heap / 1024 if heap is not None else float('nan')):>14.1f} {str(result['ok']):>4}")
    print(json.dumps({k: result[k] for k in ("config", "counts", "verdict", "problems", "ok",
                                             "seconds")}, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
