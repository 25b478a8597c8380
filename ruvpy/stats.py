"""RuntimeStats: where a Runtime's memory is at one moment, and how it is shown (a table, or
JSON). Built by Runtime.stats() from the parts' own stats."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from ruvpy.config import MiB

__all__ = ["RuntimeStats", "kv_summary", "kv_free_tokens"]


def _human_bytes(n):
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def _table(title, header, rows):
    """An aligned text table: numbers right-aligned, text left-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(_looks_numeric(r[i]) for r in cells[1:]) and len(cells) > 1
               for i in range(len(header))]

    def line(row):
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(row, widths, numeric)).rstrip()

    rule = "-" * len(line(cells[0]))
    return "\n".join([title, line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _looks_numeric(text):
    head = text.split(" ")[0].rstrip("%")
    try:
        float(head)
        return True
    except ValueError:
        return text in ("-", "")


@dataclasses.dataclass
class RuntimeStats:
    """Where a Runtime's memory is, at one moment. All sizes in bytes.

    arena: capacity, used, remaining, high_water_mark, allocation_count, reset_count;
    pool: hits, misses, allocations, returns, drops, pooled_bytes, outstanding_bytes;
    scratch_bytes; kv: kind, capacity_tokens, tokens (held now), bytes (allocated now, all
    tiers and metadata, reserved_bytes included: what the budget caps), bytes_in_use (token
    storage in use), reserved_bytes (of bytes: buffers the buffer pool holds ready for a
    two-tier cache's cold groups -- prewarmed to its capacity, or given back -- not in use;
    bytes = bytes_in_use + the cache's metadata and slab slack + reserved_bytes),
    bytes_per_token, free_tokens (tokens per layer that still fit: a paged cache's free
    blocks, a two-tier cache's capacity less the slots it is charged: the tokens it stores,
    a partly dropped cold group counted whole), free_bytes (free_tokens
    at bytes_per_token), free_sequences (sequences that may still be added; None: no limit
    but the tokens), details (the cache's own counters: blocks, fragmentation, ...), tiers
    {name: {tokens, bytes}}, layers [{layer, tokens, bytes}], sequences [{seq, position,
    tokens, bytes}] (position: tokens ever appended = next RoPE position; tokens: held now,
    fewer after evictions; bytes: a shared block's bytes are split among its holders);
    budget_bytes / budget_used_pct (None without a memory_budget); rss_bytes /
    rss_growth_bytes (process resident memory, and its growth since the runtime was
    created); steps (committed), rollbacks, attention_calls, arena_fallbacks (attention
    outputs that did not fit the arena and were allocated by numpy); total_bytes: every byte
    the Runtime holds (the KV cache's storage and metadata, the arena, the buffer pool's free
    and handed-out buffers, the scratch), and memory: those parts {name: bytes} (a pool
    buffer holding a cold group, or held ready for one, counts once, as KV); weights: None,
    or the model's memory-mapped GGUF weights (path, mapped_bytes, resident_bytes: pages in
    RAM now, nbytes: tensor bytes), file-backed pages outside total_bytes.
    """

    arena: dict
    pool: dict
    scratch_bytes: int
    kv: dict
    budget_bytes: int | None
    budget_used_pct: float | None
    rss_bytes: int
    rss_growth_bytes: int
    steps: int
    rollbacks: int
    attention_calls: int
    arena_fallbacks: int
    total_bytes: int = 0
    memory: dict = dataclasses.field(default_factory=dict)
    weights: dict | None = None

    def as_dict(self):
        """A JSON-able dict (plain ints, floats, strings, lists, dicts)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=_json_default))

    def format(self):
        """The statistics as aligned text tables."""
        a, p, kv = self.arena, self.pool, self.kv
        budget = ("-" if self.budget_bytes is None else
                  f"{_human_bytes(self.budget_bytes)}, {self.budget_used_pct:.1f}% used")
        summary = [
            ("KV cache", f"{kv['kind']}, capacity {kv['capacity_tokens']} tokens, "
                         f"{_human_bytes(kv['bytes'])} allocated"
                         + (f" ({_human_bytes(kv['reserved_bytes'])} of it cold-group buffers "
                            f"held ready, unused)" if kv.get("reserved_bytes") else "")),
            ("KV in use", f"{kv['tokens']} tokens held ("
                          f"{100 * kv['tokens'] / max(1, kv['capacity_tokens']):.1f}% of "
                          f"capacity), {_human_bytes(kv['bytes_in_use'])} of token storage"
                          + (f"; room for {kv['free_tokens']} more tokens "
                             f"({_human_bytes(kv['free_bytes'])})" if "free_tokens" in kv else "")),
            ("KV details", ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in kv.get("details", {}).items()
                                     if k not in _DETAILS_SHOWN_ELSEWHERE) or "-"),
            ("KV budget", budget),
            ("arena", f"{_human_bytes(a['used'])} used of {_human_bytes(a['capacity'])}, "
                      f"high water {_human_bytes(a['high_water_mark'])}"),
            ("buffer pool", f"{p['hits']} hits, {p['misses']} misses, {p['allocations']} "
                            f"allocations, {p['returns']} returns, {p['drops']} drops, "
                            f"{_human_bytes(p['pooled_bytes'])} pooled"),
            ("scratch", _human_bytes(self.scratch_bytes)),
            ("total", f"{_human_bytes(self.total_bytes)} held by the runtime ("
                      + ", ".join(f"{k} {_human_bytes(v)}" for k, v in self.memory.items()) + ")"
             if self.memory else _human_bytes(self.total_bytes)),
            ("weights", "-" if self.weights is None else
             f"{_human_bytes(self.weights['mapped_bytes'])} mapped, "
             f"{_human_bytes(self.weights['resident_bytes'])} resident "
             f"({os.path.basename(self.weights['path'])})"),
            ("process RSS", f"{_human_bytes(self.rss_bytes)} "
                            f"({self.rss_growth_bytes / MiB:+.2f} MiB since start)"),
            ("steps", f"{self.steps} committed, {self.rollbacks} rolled back, "
                      f"{self.attention_calls} attention calls, {self.arena_fallbacks} "
                      f"arena fallbacks"),
        ]
        width = max(len(k) for k, _ in summary)
        parts = ["ruvpy runtime memory",
                 "\n".join(f"  {k.ljust(width)}  {v}" for k, v in summary)]
        parts.append(_table("KV tiers", ("tier", "tokens", "bytes"),
                            [(name, t["tokens"], t["bytes"]) for name, t in kv["tiers"].items()]))
        parts.append(_table("KV per layer", ("layers", "tokens", "bytes"),
                            _layer_runs(kv["layers"])))
        parts.append(_table("KV per sequence", ("seq", "position", "tokens", "bytes"),
                            [(r["seq"], r["position"], r["tokens"], r["bytes"])
                             for r in kv["sequences"]]))
        return "\n\n".join(parts)

    def __str__(self):
        return self.format()


# cache stats fields that format() leaves out of "KV details" (shown elsewhere or shape)
_DETAILS_SHOWN_ELSEWHERE = {"num_layers", "num_kv_heads", "head_dim", "tokens"}


def _layer_runs(layers):
    """Table rows for per-layer stats, consecutive layers with equal counts on one row
    ("0-29", tokens, bytes: each)."""
    rows = []
    for r in layers:
        if rows and rows[-1][1:] == [r["tokens"], r["bytes"]] and \
                rows[-1][0][-1] == r["layer"] - 1:
            rows[-1][0].append(r["layer"])
        else:
            rows.append([[r["layer"]], r["tokens"], r["bytes"]])
    return [(_ranges(run), tokens, nbytes) for run, tokens, nbytes in rows]


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if hasattr(value, "_asdict"):
        return value._asdict()
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def _ranges(indices):
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], None
    for i, x in enumerate(indices):
        if start is None:
            start = x
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(parts)


def kv_summary(kv):
    """(tiers, layers, details) of a cache's stats for RuntimeStats.kv."""
    return _kv_tiers(kv), _kv_layers(kv), _kv_details(kv)


def kv_free_tokens(kv):
    """Tokens per layer a cache (its stats `kv`) still has room for: a paged cache's free
    blocks (the unused slots of sequences' last blocks are theirs alone), a two-tier cache's
    capacity less the slots its fullest layer is charged (a shared cold group counts once, a
    partly dropped one whole)."""
    if kv.kind == "paged":
        return int(kv.blocks_free) * int(kv.block_size)
    return max(0, int(kv.capacity_tokens) - int(kv.budget_tokens))


def _kv_tiers(kv):
    return {str(name): {"tokens": int(t["tokens"]), "bytes": int(t["bytes"])}
            for name, t in kv.tiers.items()}


def _kv_layers(kv):
    return [{"layer": int(r["layer"]), "tokens": int(r["tokens"]), "bytes": int(r["bytes"])}
            for r in kv.layers]


def _kv_sequence(kv, seq):
    row = kv.sequences.get(seq, {})
    return {"tokens": int(row.get("tokens", 0)), "bytes": int(row.get("bytes", 0))}


def _kv_details(kv):
    """The cache-specific scalar fields of its stats (blocks, fragmentation, ...)."""
    return {k: v for k, v in kv.as_dict().items()
            if k not in ("tiers", "layers", "sequences", "bytes", "capacity_tokens", "kind")
            and isinstance(v, (int, float, str, bool))}
