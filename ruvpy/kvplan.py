"""Per-layer TurboQuant code widths: give the layers whose attention needs more bits more of
them, within the memory of a uniform turbo_bits.

Layers differ: at 3.5 bits per value in every layer, SmolLM2's worst layer's attention output
has a mean cosine of 0.981 to the exact one while its best has 0.995. plan_turbo_widths
measures every layer at every code width the format has -- the model's own Q/K/V on a
calibration text, each layer's K/V through a one-layer TurboQuant cache (the real codec and
attention kernels), against float64 attention over the same K/V -- and picks per layer the
(key_bits, value_bits) that make the worst layer as good as it can be at no more bytes than
turbo_bits uses in every layer; then, with what is left, lifts the worst layers further.

    plan = ruvpy.kvplan.plan_turbo_widths(model, text)       # a LlamaModel, real text
    model = ruvpy.models.load(kv_cache="turbo", turbo_widths=plan.widths)

The widths are the model's, not a sequence's: calibrate on text like what the model will
read, but not on the text you measure with.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ruvpy._kvcache import TwoTierKVCache, turbo_width_steps

__all__ = ["TurboPlan", "candidate_widths", "capture_qkv", "exact_attention", "row_cosines",
           "attention_cosines", "plan_turbo_widths", "plan_from_captured"]


# ---- the model's own Q/K/V ------------------------------------------------------------------

class _CaptureStep:
    def __init__(self, step, store):
        self._step, self._store = step, store

    def __enter__(self):
        self._step.__enter__()
        return self

    def __exit__(self, *exc):
        return self._step.__exit__(*exc)

    @property
    def positions(self):
        return self._step.positions

    def attention(self, layer, q, k, v, **kw):
        self._store.setdefault(layer, []).append((q.copy(), k.copy(), v.copy()))
        return self._step.attention(layer, q, k, v, **kw)

    def __getattr__(self, name):
        return getattr(self._step, name)


class _CaptureRuntime:
    """Wraps the Runtime the model drives and records every layer's q, k, v (the model is
    not touched: it calls runtime.step(...).attention(layer, q, k, v) as always)."""

    def __init__(self, runtime):
        self._runtime, self.store = runtime, {}

    def step(self, seqs, n_tokens):
        return _CaptureStep(self._runtime.step(seqs, n_tokens), self.store)

    def __getattr__(self, name):
        return getattr(self._runtime, name)


def capture_qkv(model, ids, chunk=256):
    """{layer: (q [n, H, d], k [n, KVH, d], v)} float32 of `model` (a LlamaModel) over the
    token ids, fed `chunk` at a time: what its attention sees with its own KV cache."""
    real = model.runtime
    cap = _CaptureRuntime(real)
    model.runtime = cap
    try:
        seq = model.new_sequence()
        try:
            for a in range(0, len(ids), chunk):
                model.forward_last(seq, ids[a:a + chunk])
        finally:
            model.remove_sequence(seq)
    finally:
        model.runtime = real
    return {layer: tuple(np.concatenate([p[i] for p in parts]) for i in range(3))
            for layer, parts in sorted(cap.store.items())}


def exact_attention(q, k, v):
    """Causal attention in float64 over q, k, v of one length n (GQA): [n, H, d]."""
    n, H, d = q.shape
    g = H // k.shape[1]
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.empty((n, H, d))
    mask = np.triu(np.ones((n, n), bool), 1)
    for h in range(H):
        s = q[:, h] @ k[:, h // g].T / np.sqrt(d)
        s[mask] = -np.inf
        s -= s.max(axis=1, keepdims=True)
        p = np.exp(s)
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ v[:, h // g]
    return out


def row_cosines(out, ref):
    """Cosine of every row (the last axis) of out to ref's."""
    out = np.asarray(out, np.float64)
    return (out * ref).sum(-1) / np.maximum(np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1), 1e-300)


# ---- widths and what they cost --------------------------------------------------------------

def candidate_widths(head_dim):
    """Every (key_bits, value_bits) the format has at head_dim: 2 to 4 bits per rotated
    coordinate in steps of 16 / D."""
    steps = turbo_width_steps(head_dim)
    return [(k, v) for k in steps for v in steps]


def _one_layer(kvh, d, max_tokens, migration_batch, widths=None, bits=3.5):
    return TwoTierKVCache(1, kvh, d, hot_tokens=0, migration_batch=migration_batch, cold="turbo",
                          max_tokens=max_tokens, turbo_bits=bits,
                          turbo_widths=None if widths is None else [widths])


def attention_cosines(q, k, v, ref, widths=None, *, bits=3.5, migration_batch=64):
    """Mean cosine over the heads and the query rows past the first group of a one-layer
    TurboQuant cache's attention (every full group of migration_batch tokens cold, widths
    (key_bits, value_bits) or uniform `bits`) to ref (exact_attention of the same q, k, v)."""
    n, kvh, d = k.shape
    cache = _one_layer(kvh, d, n, migration_batch, widths, bits)
    try:
        seq = cache.add_sequence()
        cache.append(seq, 0, k, v)
        out = cache.attention(seq, 0, q, causal=True)
    finally:
        cache.close()
    return float(row_cosines(out, ref)[migration_batch:].mean())


# ---- the plan -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TurboPlan:
    """widths: per layer (key_bits, value_bits), for turbo_widths. bits: the uniform
    turbo_bits whose cold bytes it does not exceed; group_bytes / uniform_group_bytes: one
    cold group of every layer, the plan's and turbo_bits'. cosines / uniform_cosines: per
    layer the calibration's mean attention cosine at the plan's widths and at turbo_bits';
    tokens: how many tokens the calibration captured."""
    widths: tuple
    bits: float
    group_bytes: int
    uniform_group_bytes: int
    cosines: tuple
    uniform_cosines: tuple
    tokens: int = 0

    @property
    def worst(self):
        """(layer, cosine) of the plan's worst layer on the calibration text."""
        layer = int(np.argmin(self.cosines))
        return layer, self.cosines[layer]


def _choose(cos, cost, budget):
    """Per layer a candidate index: the worst layer's cosine as high as the budget allows,
    then the worst layers lifted one by one (leximin) while it lasts. cos [layers, candidates],
    cost [candidates] (bytes), budget: bytes of all layers."""
    layers = cos.shape[0]

    def cheapest_reaching(t):
        picks = []
        for layer in range(layers):
            ok = np.flatnonzero(cos[layer] >= t)
            if not len(ok):
                return None
            picks.append(int(ok[np.argmin(cost[ok])]))
        return picks

    levels = np.unique(cos)
    lo, hi, best = 0, len(levels) - 1, None     # the highest level some plan within budget reaches
    while lo <= hi:
        mid = (lo + hi) // 2
        picks = cheapest_reaching(levels[mid])
        if picks is not None and cost[picks].sum() <= budget:
            best, lo = picks, mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise ValueError("no candidate widths fit the budget")
    spent = cost[best].sum()
    while True:
        # the worst layer that can still be lifted within what is left, to its cheapest better
        for layer in np.argsort([cos[l, best[l]] for l in range(layers)], kind="stable"):
            now = cos[layer, best[layer]]
            better = np.flatnonzero((cos[layer] > now) & (cost - cost[best[layer]] <= budget - spent))
            if len(better):
                pick = int(better[np.argmin(cost[better])])
                spent += cost[pick] - cost[best[layer]]
                best[layer] = pick
                break
        else:
            return best


def plan_from_captured(captured, *, bits=3.5, migration_batch=64, candidates=None, progress=None):
    """The TurboPlan of captured Q/K/V ({layer: (q, k, v)}, capture_qkv's), at no more cold
    bytes than uniform turbo_bits. progress(message): called as layers are measured."""
    layers = sorted(captured)
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"captured must hold layers 0 .. n-1, got {layers}")
    n, kvh, d = captured[0][1].shape
    for layer in layers:
        q, k, v = captured[layer]
        if k.shape != (n, kvh, d) or v.shape != k.shape or q.ndim != 3 or q.shape[0] != n or \
                q.shape[2] != d or q.shape[1] % kvh:
            raise ValueError(f"captured layer {layer}'s q, k, v have shapes {q.shape}, {k.shape}, "
                             f"{v.shape}; layer 0's k is {(n, kvh, d)}")
    if n < 2 * migration_batch:
        raise ValueError(f"captured holds {n} tokens: at least 2 x migration_batch ({2 * migration_batch}) "
                         f"are needed for one cold group and queries past it")
    candidates = list(candidate_widths(d) if candidates is None else candidates)
    cost = np.array([TwoTierKVCache.group_bytes_max(1, kvh, d, cold="turbo", migration_batch=migration_batch,
                                                    turbo_widths=[w]) for w in candidates], np.int64)
    uniform = int(TwoTierKVCache.group_bytes_max(1, kvh, d, cold="turbo", migration_batch=migration_batch,
                                                 turbo_bits=bits))
    cos = np.empty((len(layers), len(candidates)))
    uniform_cos = []
    for layer in layers:
        q, k, v = captured[layer]
        ref = exact_attention(q, k, v)
        for j, w in enumerate(candidates):
            cos[layer, j] = attention_cosines(q, k, v, ref, w, migration_batch=migration_batch)
        uniform_cos.append(attention_cosines(q, k, v, ref, bits=bits, migration_batch=migration_batch))
        if progress:
            progress(f"layer {layer}: cosine {cos[layer].min():.4f}-{cos[layer].max():.4f} over "
                     f"{len(candidates)} widths, {uniform_cos[-1]:.4f} at {bits} bits")
    picks = _choose(cos, cost, uniform * len(layers))
    return TurboPlan(widths=tuple(tuple(candidates[j]) for j in picks), bits=float(bits),
                     group_bytes=int(cost[picks].sum()), uniform_group_bytes=uniform * len(layers),
                     cosines=tuple(float(cos[l, j]) for l, j in enumerate(picks)),
                     uniform_cosines=tuple(uniform_cos), tokens=int(n))


def plan_turbo_widths(model, text, *, bits=3.5, tokens=1024, migration_batch=64, progress=None):
    """The TurboPlan of `model` (a LlamaModel) calibrated on its first `tokens` tokens of
    `text` (a str, or token ids)."""
    ids = model.tokenize(text) if isinstance(text, str) else list(text)
    ids = ids[:tokens]
    if len(ids) < 2 * migration_batch:
        raise ValueError(f"the calibration text has {len(ids)} tokens (of the {tokens} asked for): at "
                         f"least 2 x migration_batch ({2 * migration_batch}) are needed")
    captured = capture_qkv(model, ids)
    if progress:
        progress(f"captured Q/K/V of {len(ids)} tokens, {len(captured)} layers")
    return plan_from_captured(captured, bits=bits, migration_batch=migration_batch, progress=progress)
