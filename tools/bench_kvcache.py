"""Benchmark ruvpy's KV caches: decode attention, bytes per token, quantization quality.

    python tools/bench_kvcache.py [--json out.json] [--repeats 15] [--threads N] [--quick]
        [--shapes 32/8/128,9/3/64] [--lengths 4096,16384] [--data random,outliers]
        [--formats q4,turbo] [--decode-only]

(--shapes / --lengths / --data / --formats pick parts of the decode table for short runs;
--decode-only skips the bytes-per-token and quality tables.)

Decode (q_len 1) over 4096 and 16384 tokens for (heads, kv heads, head_dim) = (32, 8, 128) and
(9, 3, 64): contiguous fp16 K/V (ruvpy.attention, the attention kernels' own layout), the paged
cache (fp16, blocks of 16), and the two-tier cache (hot_tokens 256 fp16 + cold q8 / q4 /
turbo). Times are medians of calls interleaved round-robin (every format measured side by side
in each round, so machine load hits them alike; each round starts one format later, so every
format takes every place in a round equally often); "vs contiguous" is time / contiguous time. The
contiguous K/V lie in fresh 2 MiB-aligned memory advised for transparent huge pages, as the
caches' bulk storage does (not in whatever heap malloc hands back: see placed_like_kv);
"huge pages" is the share of them the kernel backs with huge pages (from /proc/self/smaps, an
upper bound where their mapping merged with a neighbour's).
"GB/s" is the bytes the format stores for those tokens (allocated, from the cache's stats)
over the time. Random normal K/V at both lengths, and K/V with outlier channels (as below) at
16384: q4 keeps those channels apart at 8 bits, which costs it extra work (TurboQuant's rotation
spreads them). Targets (issue 12) at the longest length, both shapes, with and without outlier
channels: two-tier turbo at most contiguous fp16's time, two-tier q4 at least 1.15x faster.

Bytes per token: a cache's allocations per token of one layer, K and V (stats of the caches
above, i.e. measured, not a formula), and its ratio to fp16.

Quality: attention output of 32 query rows against float64 attention over the original
float32 K/V, as cosine similarity and relative error (||out - ref|| / ||ref||), on random
normal K/V and on K/V with outlier channels (4 channels of K and of V x20, as real keys have).
"""
import argparse
import mmap
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import emit_json, machine_info, print_table  # noqa: E402

import ruvpy  # noqa: E402
from ruvpy import PagedKVCache, TwoTierKVCache  # noqa: E402

SHAPES = [(32, 8, 128), (9, 3, 64)]
LENGTHS = [4096, 16384]
COLD = ["q8", "q4", "turbo"]


def cold_formats():
    """The cold formats this build has (turbo may not be there yet)."""
    ok = []
    for cold in COLD:
        try:
            TwoTierKVCache(1, 1, 64, cold=cold, max_tokens=16).close()
            ok.append(cold)
        except ValueError:
            pass
    return ok


def random_kv(rng, n, kvh, d, outliers=False):
    k = rng.standard_normal((n, kvh, d)).astype(np.float32)
    v = rng.standard_normal((n, kvh, d)).astype(np.float32)
    if outliers:
        k[:, :, rng.choice(d, 4, replace=False)] *= 20
        v[:, :, rng.choice(d, 4, replace=False)] *= 20
    return k, v


def reference(q, k, v):
    """float64 attention of every query row over every token (no mask)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    L, H, d = q.shape
    g = H // k.shape[1]
    out = np.empty((L, H, d))
    for h in range(H):
        s = q[:, h] @ k[:, h // g].T / np.sqrt(d)
        s -= s.max(axis=1, keepdims=True)
        p = np.exp(s)
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ v[:, h // g]
    return out


def filled_caches(kvh, d, k, v, colds, hot_tokens):
    """{name: (cache, seq)}: the paged cache (fp16, blocks of 16) and a two-tier cache per cold
    format, each holding k, v in one layer of one sequence."""
    n = k.shape[0]
    made = {"paged fp16": PagedKVCache(1, kvh, d, block_size=16, max_tokens=n, dtype="float16")}
    for cold in colds:
        made[f"two-tier {cold}"] = TwoTierKVCache(1, kvh, d, hot_tokens=hot_tokens, cold=cold, max_tokens=n)
    out = {}
    for name, cache in made.items():
        seq = cache.add_sequence()
        cache.append(seq, 0, k, v)
        out[name] = (cache, seq)
    return out


def stored_bytes(cache):
    """Bytes a cache's storage of its tokens took (allocations, from its stats)."""
    st = cache.stats()
    return st.tiers["paged"]["bytes"] if st.kind == "paged" else st.hot_bytes + st.cold_bytes


HUGE_PAGE = 2 << 20


def placed_like_kv(a):
    """A copy of a in memory placed the way ruvpy's caches place their bulk K/V: a fresh
    anonymous mapping, its start 2 MiB-aligned, advised to use transparent huge pages, every
    page touched now. a.astype()'s memory comes from malloc, which may hand back heap that an
    earlier case freed, already faulted in 4 KiB pages that the advice no longer changes: the
    same contiguous fp16 decode then measured 25-50% slower, depending on what was built before
    (see huge_page_share)."""
    region = mmap.mmap(-1, a.nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE)   # shared memory: no THP
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    whole = np.frombuffer(region, np.uint8)
    start = -whole.ctypes.data % HUGE_PAGE
    out = whole[start:start + a.nbytes].view(a.dtype).reshape(a.shape)   # keeps region alive
    out[...] = a
    return out


def huge_page_share(a):
    """Share of a's bytes that the kernel backs with transparent huge pages (AnonHugePages of
    the mappings a lies in, from /proc/self/smaps; None where that is not readable)."""
    lo, hi = a.ctypes.data, a.ctypes.data + a.nbytes
    huge = 0
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(None, 1)[0]
                if not head.endswith(":"):          # a mapping's header: start-end perms ...
                    start, end = (int(x, 16) for x in head.split("-"))
                    inside = start < hi and end > lo
                    span = min(end, hi) - max(start, lo)
                    whole_mapping = start >= lo and end <= hi
                elif inside and head == "AnonHugePages:":
                    kib = int(line.split()[1]) << 10
                    huge += kib if whole_mapping else min(kib, span)
    except OSError:
        return None
    return min(huge / a.nbytes, 1.0) if a.nbytes else 0.0


def make_caches(kvh, d, k, v, colds):
    """{name: (attend(q, out), stored bytes of these tokens)} for every format, and the
    contiguous K and V arrays."""
    k16, v16 = placed_like_kv(k.astype(np.float16)), placed_like_kv(v.astype(np.float16))
    made = {"contiguous fp16": (lambda q, out: ruvpy.attention(q, k16, v16, out=out), k16.nbytes + v16.nbytes)}
    for name, (cache, seq) in filled_caches(kvh, d, k16, v16, colds, hot_tokens=256).items():
        made[name] = (lambda q, out, c=cache, s=seq: c.attention(s, 0, q, out=out), stored_bytes(cache))
    return made, (k16, v16)


def round_orders(names, repeats):
    """The order of each round: round r starts at name r mod len(names), so that every format
    takes every place in a round equally often (no format always runs right after the same
    one, or first after the pause between rounds: what the call before left in the caches,
    and any drift within a round, is spread over the formats alike)."""
    names = list(names)
    return [names[r % len(names):] + names[:r % len(names)] for r in range(repeats)]


def interleaved_medians(fns, repeats, warmup=2):
    """Median seconds of each function, the calls interleaved round-robin (rotating order)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for order in round_orders(fns, repeats):
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def bench_decode(args, colds):
    rows = []
    rng = np.random.default_rng(0)
    lengths = args.lengths or (LENGTHS[:1] if args.quick else LENGTHS)
    for H, kvh, d in args.shapes or SHAPES:
        # outlier channels cost the quantized formats extra work: timed at the longest length
        cases = [(n, "random") for n in lengths] + [(lengths[-1], "outliers")]
        for n, data in cases:
            if args.data and data not in args.data:
                continue
            k, v = random_kv(rng, n, kvh, d, outliers=data == "outliers")
            made, contiguous = make_caches(kvh, d, k, v, colds)
            huge = [huge_page_share(a) for a in contiguous]
            q = rng.standard_normal((1, H, d)).astype(np.float32)
            out = np.empty_like(q)
            med = interleaved_medians({name: (lambda f=f: f(q, out)) for name, (f, _) in made.items()},
                                      args.repeats)
            base = med["contiguous fp16"]
            for name, (_, nbytes) in made.items():
                rows.append({"shape": f"{H}/{kvh}/{d}", "tokens": n, "data": data, "format": name,
                             "ms": med[name] * 1e3, "vs contiguous": med[name] / base,
                             "GB/s": nbytes / med[name] / 1e9})
            rows[-len(made)]["huge pages"] = None if None in huge else min(huge)
            del made, contiguous
    return rows


# issue 12: turbo at least as fast as contiguous fp16, q4 at least 1.15x faster
SPEEDUP_TARGETS = {"two-tier turbo": 1.0, "two-tier q4": 1.15}


def decode_targets(rows):
    """Per shape and data at the longest length: each targeted format's speed-up over
    contiguous fp16 against its target."""
    longest = max(r["tokens"] for r in rows)
    out = []
    for r in rows:
        if r["tokens"] == longest and r["format"] in SPEEDUP_TARGETS:
            speedup = 1.0 / r["vs contiguous"]
            out.append({"shape": r["shape"], "tokens": longest, "data": r["data"], "format": r["format"],
                        "speed-up": speedup, "target": SPEEDUP_TARGETS[r["format"]],
                        "met": speedup >= SPEEDUP_TARGETS[r["format"]]})
    return out


def bytes_per_token(colds):
    """Allocated bytes per token of one layer (K and V), from the caches' stats."""
    rows = []
    rng = np.random.default_rng(1)
    n = 4096
    for H, kvh, d in SHAPES:
        fp16 = 2 * 2 * kvh * d
        for outliers in (False, True):
            k, v = random_kv(rng, n, kvh, d, outliers)
            found = {}
            for name, (cache, _) in filled_caches(kvh, d, k, v, colds, hot_tokens=0).items():
                st = cache.stats()
                if st.kind == "paged":
                    found[name] = stored_bytes(cache) / st.tokens
                else:                    # the cold store's own cost (its hot ring aside)
                    found[name.replace("two-tier ", "") + " cold"] = st.cold_bytes_per_token
            for name, b in found.items():
                rows.append({"shape": f"{H}/{kvh}/{d}", "data": "outliers" if outliers else "random",
                             "format": name, "bytes/token": b, "vs fp16": b / fp16,
                             "bits/value": 8 * b / (2 * kvh * d)})
    return rows


def quality(colds):
    rows = []
    rng = np.random.default_rng(2)
    n = 4096
    for H, kvh, d in SHAPES:
        for outliers in (False, True):
            k, v = random_kv(rng, n, kvh, d, outliers)
            q = rng.standard_normal((32, H, d)).astype(np.float32)
            ref = reference(q, k, v)
            # two-tier: hot_tokens=64, 98% of the tokens are in the cold store
            for name, (cache, seq) in filled_caches(kvh, d, k, v, colds, hot_tokens=64).items():
                out = cache.attention(seq, 0, q, causal=False).astype(np.float64)
                cos_rows = (out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)
                rows.append({"shape": f"{H}/{kvh}/{d}", "data": "outliers" if outliers else "random",
                             "format": name,
                             "cosine": float(out.ravel() @ ref.ravel() / np.linalg.norm(out) / np.linalg.norm(ref)),
                             "min row cosine": float(cos_rows.min()),
                             "rel error": float(np.linalg.norm(out - ref) / np.linalg.norm(ref))})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="4096 tokens only")
    ap.add_argument("--shapes", type=lambda t: [tuple(int(x) for x in s.split("/")) for s in t.split(",")],
                    help="decode shapes heads/kv_heads/head_dim, comma-separated (default: both)")
    ap.add_argument("--lengths", type=lambda t: [int(x) for x in t.split(",")],
                    help="decode lengths, comma-separated (outlier data runs at the longest)")
    ap.add_argument("--data", type=lambda t: t.split(","), help="decode data: random, outliers or both")
    ap.add_argument("--formats", type=lambda t: t.split(","),
                    help="cold formats to time beside contiguous and paged fp16 (default: all built)")
    ap.add_argument("--decode-only", action="store_true", help="skip the bytes and quality tables")
    args = ap.parse_args()
    if args.threads:
        ruvpy.set_num_threads(args.threads)
    colds = [c for c in cold_formats() if not args.formats or c in args.formats]
    result = {"machine": machine_info(), "threads": ruvpy.get_num_threads()}
    print(f"ruvpy {ruvpy.__version__}, isa {ruvpy.get_isa()}, {ruvpy.get_num_threads()} threads\n")
    result["decode"] = bench_decode(args, colds)
    print("Decode attention (q_len 1), median ms")
    print_table(result["decode"])
    result["targets"] = decode_targets(result["decode"])
    if result["targets"]:
        print("\nDecode targets at the longest length (speed-up = contiguous fp16 time / format time)")
        print_table(result["targets"])
    if args.decode_only:
        print()
        emit_json(result, args.json)
        return
    result["bytes_per_token"] = bytes_per_token(colds)
    print("\nBytes per token (one layer, K and V; allocated)")
    print_table(result["bytes_per_token"])
    result["quality"] = quality(colds)
    print("\nQuality vs float64 attention over the float32 K/V (32 query rows, 4096 tokens)")
    print_table(result["quality"])
    print()
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
