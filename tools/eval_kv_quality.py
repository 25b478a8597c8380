"""What each KV-cache format costs the model: SmolLM2 quality with fp32, fp16, q8, q4 and
TurboQuant (2.5 / 3.5 / 4.5 bits) KV, on real English nobody here wrote.

    python tools/eval_kv_quality.py [--quick] [--json out.json] [--plot out.png]
                                    [--formats fp16 q4 turbo3.5 ...]

Measures, for every format (one model, its weights shared by one Runtime per format):

1. Perplexity on real text: the GPL-3 text from Debian's common licenses and the Python
   language reference's prose (pydoc_data: "compound statements" and "special method names"),
   fed `--chunk` tokens per step so that the earlier tokens sit in the cold tier (hot tier
   `--hot` tokens, migration batches of 64). Reported per text and relative to fp16 and fp32.
2. Greedy agreement over `--gen` generated tokens. The reference is fp32 KV's greedy
   continuation of a long prompt (a request to summarise the first ~600 tokens of the GPL-3
   preamble, so the prompt is mostly cold while generating). Teacher-forced top-1 agreement
   (each format fed the reference tokens, in steps of 16: the share of positions whose argmax
   is the reference token) and free-running agreement (the format's own greedy continuation:
   tokens equal to the reference before the first difference, and position-wise).
3. Passkey ("needle") retrieval: a 5-digit key hidden at depths 10% / 50% / 90% of a filler
   text of 1k-6k tokens; the answer counts when the key's digits start the greedy reply.
   fp32 KV's row is what the model itself manages.
4. Attention-output cosine per layer on real K/V: Q/K/V captured from the model (fp32 KV,
   the perplexity text), then every layer's causal attention out of a one-layer cache of
   each format against float64 attention over the captured float32 K/V: with hot tier 0
   (every full group of 64 cold) and with the perplexity runs' hot tier. Mean over the query
   rows at positions >= 64 and the heads; reported per layer, with the minimum over layers.
5. Bits per value from allocations: on the model's own K/V (the cold store's bytes over its
   stored values in the perplexity run), and on random normal K/V and K/V with outlier
   channels (4 key and 4 value channels x20) for the (32, 8, 128) and (9, 3, 64) shapes.

Prints progress while running, tables at the end, then JSON (--json writes it too); --plot
writes perplexity against bits per value. --quick is a short iteration run (fewer tokens, one
text, 64 generated tokens, 1k and 2k passkey prompts, 512 captured tokens).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import emit_json, machine_info, print_table  # noqa: E402

import ruvpy  # noqa: E402
import ruvpy.models  # noqa: E402
from ruvpy import PagedKVCache, TwoTierKVCache  # noqa: E402
from ruvpy.kvplan import capture_qkv, plan_turbo_widths, row_cosines  # noqa: E402
from ruvpy.kvplan import exact_attention as reference_attention  # noqa: E402

GPL3 = "/usr/share/common-licenses/GPL-3"
# the text the per-layer widths are calibrated on: neither of the two measured on
CALIBRATION = "/usr/share/common-licenses/Apache-2.0"
MIGRATION = 64
PLANNED = "plan"        # a format's turbo_widths, chosen at the start of the run (plan_formats)

# name -> (Runtime options, one-layer cache constructor for the cosine test)
FORMATS = {
    "fp32": dict(kv_cache="paged", kv_dtype="float32"),
    "fp16": dict(kv_cache="paged", kv_dtype="float16"),
    "q8": dict(kv_cache="two-tier", cold="q8"),
    "q4": dict(kv_cache="two-tier", cold="q4"),
    "turbo2.5": dict(kv_cache="turbo", turbo_bits=2.5),
    "turbo3.5": dict(kv_cache="turbo", turbo_bits=3.5),
    "turbo4.5": dict(kv_cache="turbo", turbo_bits=4.5),
    # per-layer widths at turbo 3.5's bytes, calibrated on CALIBRATION (ruvpy.kvplan)
    "turbo3.5-plan": dict(kv_cache="turbo", turbo_bits=3.5, turbo_widths=PLANNED),
}


def plan_formats(names, model, tokens):
    """Choose the per-layer widths of the planned formats among `names` on `tokens` tokens
    of the calibration text: {name: the plan as JSON}."""
    plans = {}
    for name in names:
        opts = FORMATS[name]
        if opts.get("turbo_widths") != PLANNED:
            continue
        t = time.perf_counter()
        with open(CALIBRATION, encoding="utf-8") as f:
            plan = plan_turbo_widths(model, f.read(), bits=opts["turbo_bits"], tokens=tokens,
                                     migration_batch=MIGRATION, progress=lambda m: log(f"  plan {name}: {m}"))
        opts["turbo_widths"] = plan.widths
        layer, worst = plan.worst
        log(f"planned {name} on {tokens} tokens of {CALIBRATION}: worst layer {layer} at {worst:.4f} "
            f"(uniform: {min(plan.uniform_cosines):.4f}), {plan.group_bytes} of {plan.uniform_group_bytes} "
            f"bytes per group of every layer ({time.perf_counter() - t:.0f} s)")
        plans[name] = {"calibration": CALIBRATION, "tokens": tokens, "widths": [list(w) for w in plan.widths],
                       "calibration_cosines": list(plan.cosines),
                       "calibration_uniform_cosines": list(plan.uniform_cosines),
                       "group_bytes": plan.group_bytes, "uniform_group_bytes": plan.uniform_group_bytes}
    return plans


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def one_layer_cache(name, kvh, d, max_tokens, hot_tokens=0, layer=0):
    """A one-layer cache of format `name` as the model's layer `layer` has it."""
    opts = FORMATS[name]
    if opts["kv_cache"] == "paged":
        return PagedKVCache(1, kvh, d, block_size=16, max_tokens=max_tokens, dtype=opts["kv_dtype"])
    cold = opts.get("cold", "turbo")
    extra = {"turbo_bits": opts["turbo_bits"]} if cold == "turbo" else {}
    if opts.get("turbo_widths") is not None:
        extra["turbo_widths"] = [opts["turbo_widths"][layer]]
    return TwoTierKVCache(1, kvh, d, hot_tokens=hot_tokens, migration_batch=MIGRATION, cold=cold,
                          max_tokens=max_tokens, **extra)


# ---- texts ----------------------------------------------------------------------------------

def texts():
    """{name: text}: real English written elsewhere."""
    out = {}
    if os.path.isfile(GPL3):
        with open(GPL3, encoding="utf-8") as f:
            out["GPL-3"] = f.read()
    try:
        from pydoc_data import topics
        out["python-docs"] = topics.topics["compound"] + "\n\n" + topics.topics["specialnames"]
    except (ImportError, KeyError):
        pass
    if not out:
        raise SystemExit("no evaluation text found (GPL-3 in /usr/share/common-licenses, pydoc_data)")
    return out


# ---- the model per format -------------------------------------------------------------------

class Models:
    """One set of weights, a model (Runtime) per format, made on demand and closed after use."""

    def __init__(self, max_tokens, hot_tokens):
        t = time.perf_counter()
        self.base = ruvpy.models.load(kv_cache="paged", kv_dtype="float32", max_tokens=max_tokens)
        self.max_tokens, self.hot_tokens = max_tokens, hot_tokens
        log(f"model loaded in {time.perf_counter() - t:.1f} s: {self.base!r}")

    def make(self, name):
        opts = dict(FORMATS[name], max_tokens=self.max_tokens)
        if opts["kv_cache"] != "paged":
            opts.update(hot_tokens=self.hot_tokens, migration_batch=MIGRATION)
        if hasattr(self.base, "with_kv_cache"):
            return self.base.with_kv_cache(**opts)
        return ruvpy.models.load(self.base.path, **opts)     # pragma: no cover (older models API)


def log_softmax_nll(logits, targets):
    """Negative log-likelihood (float64) of targets under each row of logits."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x).sum(axis=1))
    return lse - x[np.arange(len(targets)), targets]


def perplexity(model, ids, chunk):
    """exp(mean NLL) of ids[1:] given the preceding tokens, fed `chunk` tokens per step."""
    seq = model.new_sequence()
    nll = []
    try:
        for a in range(0, len(ids) - 1, chunk):
            part = ids[a:min(a + chunk, len(ids) - 1)]
            logits = model.forward(seq, part)
            nll.append(log_softmax_nll(logits, np.asarray(ids[a + 1:a + 1 + len(part)])))
        bits = kv_bits(model.runtime)
    finally:
        model.remove_sequence(seq)
    return float(np.exp(np.concatenate(nll).mean())), bits


def kv_bits(runtime):
    """Bits per stored K/V value of the runtime's cache, from its allocations: the cold store
    for two-tier caches, the blocks in use for the paged cache."""
    st = runtime.cache.stats()
    if st.kind == "two-tier":
        return st.cold_bits_per_value if st.cold_bits_per_value else None
    cfg = runtime.config
    values = st.tokens * 2 * cfg.num_kv_heads * cfg.head_dim * cfg.num_layers
    return 8.0 * st.tiers["paged"]["bytes"] / values if values else None


def teacher_forced(model, prompt_ids, ref, step=16):
    """Share of positions where the model's argmax is the reference token, fed the reference
    `step` tokens at a time after the prompt."""
    seq = model.new_sequence()
    try:
        logits = model.forward_last(seq, prompt_ids)
        hits = [int(np.argmax(logits)) == ref[0]]
        for a in range(0, len(ref) - 1, step):
            part = ref[a:min(a + step, len(ref) - 1)]
            out = model.forward(seq, part)
            hits += list(np.argmax(out, axis=1) == np.asarray(ref[a + 1:a + 1 + len(part)]))
    finally:
        model.remove_sequence(seq)
    return float(np.mean(hits))


def generation_prompt(model, text):
    ids = model.tokenize(text)
    passage = model.detokenize(ids[:600])
    return model.chat_prompt("Summarise the following text in your own words, in detail.\n\n" + passage)


# ---- passkey --------------------------------------------------------------------------------

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize "
         "it. I will quiz you about the pass key.\n\n")
QUESTION = "\n\nWhat is the pass key? The pass key is"


def passkey_prompt(model, length, depth, key):
    """Token ids of a passkey prompt of about `length` tokens, the key at `depth` (0..1)."""
    fill_ids = model.tokenize(FILLER)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(model.tokenize(INTRO + needle + QUESTION))
    reps = max(1, (length - fixed) // len(fill_ids))
    before = int(round(depth * reps))
    text = INTRO + FILLER * before + needle + FILLER * (reps - before) + QUESTION
    return model.tokenize(text)


def passkey(model, length, depth, key):
    ids = passkey_prompt(model, length, depth, key)
    reply = model.generate(ids, 8)
    digits = "".join(ch for ch in reply if ch.isdigit())
    return digits.startswith(str(key)), len(ids), reply


# ---- attention cosine on captured K/V -------------------------------------------------------

def layer_cosines(captured, names, refs, hot_tokens=0):
    """{name: [mean cosine per layer]} of each format's cache attention against refs."""
    res = {}
    for name in names:
        per_layer = []
        for layer, (q, k, v) in captured.items():
            n, kvh, d = k.shape
            cache = one_layer_cache(name, kvh, d, n, hot_tokens=hot_tokens, layer=layer)
            seq = cache.add_sequence()
            cache.append(seq, 0, k, v)
            out = cache.attention(seq, 0, q, causal=True)
            cache.close()
            per_layer.append(float(row_cosines(out, refs[layer])[MIGRATION:].mean()))
        res[name] = per_layer
        log(f"  cosine {name:9s} (hot tier {hot_tokens}) min over layers {min(per_layer):.4f} "
            f"(layer {int(np.argmin(per_layer))})")
    return res


# ---- bits per value on synthetic data -------------------------------------------------------

def synthetic_bits(names, n=4096):
    rows = []
    rng = np.random.default_rng(1)
    for H, kvh, d in [(32, 8, 128), (9, 3, 64)]:
        for data in ("random", "outliers"):
            k = rng.standard_normal((n, kvh, d)).astype(np.float32)
            v = rng.standard_normal((n, kvh, d)).astype(np.float32)
            if data == "outliers":
                k[:, :, rng.choice(d, 4, replace=False)] *= 20
                v[:, :, rng.choice(d, 4, replace=False)] *= 20
            row = {"shape": f"{H}/{kvh}/{d}", "data": data}
            for name in names:
                # (a model's per-layer widths are its own, not these shapes')
                if FORMATS[name]["kv_cache"] == "paged" or FORMATS[name].get("turbo_widths") is not None:
                    continue
                cache = one_layer_cache(name, kvh, d, n)
                cache.append(cache.add_sequence(), 0, k, v)
                row[name] = cache.stats().cold_bits_per_value
                cache.close()
            rows.append(row)
    return rows


# ---- main -----------------------------------------------------------------------------------

def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fp16 = next((r for r in rows if r["format"] == "fp16"), None)
    if fp16 is None:
        log("no plot: it shows perplexity against fp16 KV's, and fp16 was not measured")
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    text_names = [k[len("ppl "):] for k in fp16 if k.startswith("ppl ")]
    for tname, marker in zip(text_names, "os^D"):
        shown = [r for r in rows if r.get("bits/value") is not None and f"ppl {tname}" in r]
        xs = [r["bits/value"] for r in shown]
        ys = [100 * (r[f"ppl {tname}"] / fp16[f"ppl {tname}"] - 1) for r in shown]
        ax.plot(xs, ys, marker, label=tname, alpha=0.8)
        for r, x, y in zip(shown, xs, ys):
            ax.annotate(r["format"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.axhline(0, color="grey", lw=0.6)
    ax.axhline(1, color="grey", lw=0.6, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per stored K/V value (from allocations, SmolLM2's own K/V)")
    ax.set_ylabel("perplexity vs fp16 KV (%)")
    ax.set_title("SmolLM2-135M perplexity by KV format")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    log(f"plot written to {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short iteration run")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--tokens", type=int, default=None, help="perplexity tokens per text (1536; quick 512)")
    ap.add_argument("--chunk", type=int, default=32, help="tokens per step in the perplexity run")
    ap.add_argument("--hot", type=int, default=128, help="hot-tier tokens of the two-tier formats")
    ap.add_argument("--gen", type=int, default=None, help="generated tokens (256; quick 64)")
    ap.add_argument("--passkey", type=int, nargs="*", default=None,
                    help="passkey prompt lengths (1024 2048 4096 6144; quick 1024 2048)")
    ap.add_argument("--depths", type=float, nargs="+", default=None,
                    help="passkey depths, 0..1 (0.1 0.5 0.9; quick 0.5)")
    ap.add_argument("--capture", type=int, default=None, help="captured tokens for the cosine (1024; quick 512)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["ppl", "gen", "passkey", "cosine", "bits"])
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--plot", help="write perplexity vs bits per value to this PNG")
    args = ap.parse_args()
    q = args.quick
    n_tok = args.tokens or (512 if q else 1536)
    # bits per value are measured on the cold store; the last token is only a target, not fed
    if n_tok - 1 < args.hot + MIGRATION:
        ap.error(f"--tokens ({n_tok}) must be more than --hot ({args.hot}) + one cold group "
                 f"({MIGRATION}) for any token to reach the cold tier (the last token is not fed)")
    n_gen = args.gen or (64 if q else 256)
    lengths = args.passkey if args.passkey is not None else ([1024, 2048] if q else [1024, 2048, 4096, 6144])
    depths = args.depths or ([0.5] if q else [0.1, 0.5, 0.9])
    n_cap = args.capture or (512 if q else 1024)
    if "cosine" not in args.skip and n_cap <= args.hot + MIGRATION:
        # the cosine is taken over the rows after the first group, and with the hot tier some
        # group must be cold
        ap.error(f"--capture ({n_cap}) must be more than --hot ({args.hot}) + one cold group ({MIGRATION})")
    names = ["fp32", *[n for n in args.formats if n != "fp32"]]    # fp32 is the reference
    t_start = time.perf_counter()

    models = Models(max_tokens=max([8192, n_tok + 64]), hot_tokens=args.hot)
    all_texts = texts()
    if q:
        all_texts = dict(list(all_texts.items())[:1])
    tok = {name: models.base.tokenize(t)[:n_tok] for name, t in all_texts.items()}
    result = {"machine": machine_info(), "settings": {
        "quick": q, "tokens": n_tok, "chunk": args.chunk, "hot_tokens": args.hot, "migration_batch": MIGRATION,
        "generated": n_gen, "passkey_lengths": lengths, "passkey_depths": depths, "captured": n_cap,
        "texts": {k: len(v) for k, v in tok.items()}}}
    rows = {name: {"format": name} for name in names}
    result["turbo_plans"] = plan_formats(names, models.base, 512 if q else 1024)

    gen_prompt = generation_prompt(models.base, all_texts.get("GPL-3", next(iter(all_texts.values()))))
    ref_tokens = None
    keys = np.random.default_rng(7).integers(10000, 100000, size=len(lengths) * len(depths))
    passkey_rows = []
    for i, name in enumerate(names):
        model = models.make(name)
        row = rows[name]
        try:
            if "ppl" not in args.skip:
                for tname, ids in tok.items():
                    t = time.perf_counter()
                    ppl, bits = perplexity(model, ids, args.chunk)
                    row[f"ppl {tname}"] = ppl
                    row["bits/value"] = bits
                    shown = "no cold tokens" if bits is None else f"{bits:.3f} bits/value"
                    log(f"[{i + 1}/{len(names)}] {name:9s} perplexity {tname}: {ppl:.4f} "
                        f"({len(ids)} tokens, {time.perf_counter() - t:.0f} s, {shown})")
            if "gen" not in args.skip:
                t = time.perf_counter()
                if ref_tokens is None:
                    model.generate(gen_prompt, n_gen)
                    ref_tokens = list(model.last_generation.token_ids)
                    result["generation"] = {"prompt_tokens": len(gen_prompt), "reference_tokens": len(ref_tokens),
                                            "reference_text": model.detokenize(ref_tokens)}
                    own = ref_tokens
                else:
                    model.generate(gen_prompt, len(ref_tokens))
                    own = list(model.last_generation.token_ids)
                same = next((j for j, (a, b) in enumerate(zip(own, ref_tokens)) if a != b), min(len(own), len(ref_tokens)))
                row["greedy prefix"] = same
                row["greedy equal %"] = 100.0 * np.mean([a == b for a, b in zip(own, ref_tokens)])
                row["teacher-forced %"] = 100.0 * teacher_forced(model, gen_prompt, ref_tokens)
                log(f"[{i + 1}/{len(names)}] {name:9s} generation: prefix {same}/{len(ref_tokens)}, "
                    f"teacher-forced {row['teacher-forced %']:.1f}% ({time.perf_counter() - t:.0f} s)")
            if "passkey" not in args.skip and lengths:
                found = 0
                j = 0
                for length in lengths:
                    for depth in depths:
                        t = time.perf_counter()
                        ok, n_ids, reply = passkey(model, length, depth, int(keys[j]))
                        j += 1
                        found += ok
                        passkey_rows.append({"format": name, "length": n_ids, "depth": depth, "found": ok,
                                             "reply": reply.strip()})
                        log(f"[{i + 1}/{len(names)}] {name:9s} passkey {n_ids} tokens depth {depth}: "
                            f"{'found' if ok else 'missed'} {reply.strip()!r} ({time.perf_counter() - t:.0f} s)")
                row["passkey found"] = f"{found}/{j}"
        finally:
            model.close()

    if "cosine" not in args.skip:
        t = time.perf_counter()
        ids = next(iter(tok.values()))
        cap_ids = (ids * ((n_cap + len(ids) - 1) // len(ids)))[:n_cap] if len(ids) < n_cap else ids[:n_cap]
        if len(cap_ids) < n_cap:
            cap_ids = models.base.tokenize(next(iter(all_texts.values())))[:n_cap]
        captured = capture_qkv(models.base, cap_ids)
        refs = {layer: reference_attention(*qkv) for layer, qkv in captured.items()}
        log(f"captured Q/K/V of {len(cap_ids)} tokens, {len(captured)} layers ({time.perf_counter() - t:.0f} s)")
        cos = layer_cosines(captured, names, refs)
        result["cosine_per_layer"] = cos
        # as the perplexity runs hold them: the newest tokens in the hot tier
        cos_hot = layer_cosines(captured, names, refs, hot_tokens=args.hot)
        result["cosine_per_layer_hot"] = cos_hot
        for name in names:
            rows[name]["min layer cos"] = min(cos[name])
            rows[name]["mean cos"] = float(np.mean(cos[name]))
            rows[name]["min layer cos hot"] = min(cos_hot[name])
    models.base.close()

    table = []
    fp16 = rows.get("fp16", {})
    fp32 = rows["fp32"]
    for name in names:
        r = dict(rows[name])
        for tname in tok:
            key = f"ppl {tname}"
            if key in r:
                if key in fp16:
                    r[f"vs fp16 % {tname}"] = 100 * (r[key] / fp16[key] - 1)
                r[f"vs fp32 % {tname}"] = 100 * (r[key] / fp32[key] - 1)
        table.append(r)
    result["formats"] = table
    result["passkey"] = passkey_rows
    if "bits" not in args.skip:
        result["bits_synthetic"] = synthetic_bits(names)
    result["seconds"] = time.perf_counter() - t_start

    print(f"ruvpy {ruvpy.__version__}, isa {ruvpy.get_isa()}, {ruvpy.get_num_threads()} threads; "
          f"perplexity over {n_tok} tokens per text fed {args.chunk} per step, hot tier {args.hot}\n")
    cols = ["format", "bits/value"] + [c for c in table[0] if c.startswith(("ppl", "vs fp16"))] + \
        [c for c in ("greedy prefix", "teacher-forced %", "passkey found", "mean cos", "min layer cos",
                     "min layer cos hot") if c in table[0]]
    print_table(table, cols)
    if "cosine_per_layer" in result:
        print("\nAttention-output cosine per layer (real SmolLM2 K/V; every full group cold | hot tier "
              f"{args.hot} as in the perplexity runs)")
        cos, cos_hot = result["cosine_per_layer"], result["cosine_per_layer_hot"]
        print_table([{"layer": layer, **{n: cos[n][layer] for n in names},
                      **{f"{n} hot": cos_hot[n][layer] for n in names if n not in ("fp32", "fp16")}}
                     for layer in range(len(cos[names[0]]))])
    if result.get("bits_synthetic"):
        print("\nBits per value from allocations, synthetic K/V (4096 tokens, cold store)")
        print_table(result["bits_synthetic"])
    if passkey_rows:
        print("\nPasskey retrieval")
        print_table(passkey_rows)
    print()
    emit_json(result, args.json)
    if args.plot and "ppl" not in args.skip:
        plot(table, args.plot)


if __name__ == "__main__":
    main()
