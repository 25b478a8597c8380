"""The KV export format: one sequence of a KV cache as (meta, arrays), in the cache's stored
format (quantized tiers stay codes). meta is JSON-able; arrays maps names to numpy arrays.
ruvpy._kvcache gathers and writes the raw data; this module decides what an export holds and
checks what comes in (everything is fetched from `arrays` first, then validated, so a
mapping's code cannot run between a check and the use of what it checked).

    meta   {"format": "ruvpy.kvcache", "version": 6, "kind": "paged" | "two-tier",
            <the cache's configuration fields>, "lengths": [tokens per layer],
            two-tier: "skip": [evicted leading tokens of the first cold group, per layer],
                      "cut": [truncated trailing tokens of the last cold group, per layer]}
    arrays paged:    "k.<layer>", "v.<layer>" [length, kv heads, head_dim] in the cache's dtype
           two-tier: "cold.<layer>" uint8 (the cold groups' blobs back to back),
                     "cold_sizes.<layer>" int64 (each blob's bytes),
                     "hot_k.<layer>", "hot_v.<layer>" float16 [hot tokens, kv heads, head_dim]
Version 2 (before truncation) had no "cut"; it still imports. Version 4 changed the TurboQuant
cold groups (fixed-size groups: key means, int8 codebooks, no QJL signs), version 5 the q4
groups (outlier value channels channel-major), version 6 the q4 groups again (outlier value
channels' 8-bit codes in rows of their own): an export whose cold groups have an older layout
than its format's latest is refused, the others still import.
"""
from __future__ import annotations

import numpy as np

__all__ = ["FORMAT", "VERSION", "meta_for", "pack_paged", "pack_twotier", "unpack_paged",
           "unpack_twotier"]

FORMAT = "ruvpy.kvcache"
VERSION = 6   # 6: q4 outlier value channels as 8-bit rows (rv_coldq.h); 5: q4 outlier value
              # channels channel-major; 4: TurboQuant groups v3 (rv_turbo.h); 3: "cut"
              # (truncation inside a cold group); 2: q4 outliers as split nibbles, turbo
              # outlier channels (2026-11-23)
READABLE = (2, 3, 4, 5, 6)
# the versions whose cold groups a format reads (formats not named: every readable version)
COLD_READABLE = {"turbo": (4, 5, 6), "q4": (6,)}
_COLD_NAMES = {"turbo": "TurboQuant", "q4": "q4"}

_F16 = np.dtype(np.float16)
_U8 = np.dtype(np.uint8)
_I64 = np.dtype(np.int64)


def meta_for(kind, fields):
    """The meta of an export from a cache of these configuration fields."""
    return {"format": FORMAT, "version": VERSION, **fields, "kind": kind}


def pack_paged(fields, lengths, layers):
    """(meta, arrays) of a paged cache's sequence: layers = [(k, v), ...]."""
    meta = meta_for("paged", fields)
    meta["lengths"] = [int(n) for n in lengths]
    arrays = {}
    for layer, (k, v) in enumerate(layers):
        arrays[f"k.{layer}"] = k
        arrays[f"v.{layer}"] = v
    return meta, arrays


def pack_twotier(fields, layers):
    """(meta, arrays) of a two-tier cache's sequence: layers = [(length, skip, cut, blobs,
    sizes, hot_k, hot_v), ...]."""
    meta = meta_for("two-tier", fields)
    meta["lengths"], meta["skip"], meta["cut"] = [], [], []
    arrays = {}
    for layer, (length, skip, cut, blobs, sizes, hot_k, hot_v) in enumerate(layers):
        meta["lengths"].append(int(length))
        meta["skip"].append(int(skip) if len(sizes) else 0)
        meta["cut"].append(int(cut) if len(sizes) else 0)
        arrays[f"cold.{layer}"] = blobs
        arrays[f"cold_sizes.{layer}"] = sizes
        arrays[f"hot_k.{layer}"] = hot_k
        arrays[f"hot_v.{layer}"] = hot_v
    return meta, arrays


def _check_meta(meta, fields):
    if not isinstance(meta, dict):
        raise TypeError(f"import_sequence: meta must be a dict, got {type(meta).__name__}")
    if meta.get("format") != FORMAT or meta.get("version") not in READABLE:
        raise ValueError(f"import_sequence: not a {FORMAT} v{VERSION} export "
                         f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
    cold = fields.get("cold")
    if cold in COLD_READABLE and meta.get("version") not in COLD_READABLE[cold]:
        first = COLD_READABLE[cold][0]
        raise ValueError(f"import_sequence: a v{meta.get('version')} export's {_COLD_NAMES[cold]} "
                         f"groups have the layout before v{first}; this cache reads v{first} "
                         f"or later only")
    diffs = [f"{k}: export {meta.get(k)!r}, cache {v!r}" for k, v in fields.items()
             if meta.get(k) != v]
    if diffs:
        raise ValueError("import_sequence: the export is from another configuration (" +
                         "; ".join(diffs) + ")")


def _counts(meta, key, num_layers, below=None):
    values = meta.get(key)
    if (not isinstance(values, list) or len(values) != num_layers or
            any(type(x) is not int or x < 0 or (below is not None and x >= below) for x in values)):
        bound = "(>= 0)" if below is None else f"in [0, {below})"
        raise ValueError(f"import_sequence: meta[{key!r}] must be {num_layers} ints {bound}, "
                         f"got {values!r}")
    return list(values)


def _fetch(arrays, names):
    """Every named array, fetched before anything is checked (a mapping's __getitem__ may run
    code): name -> object."""
    fetched = {}
    for name in names:
        try:
            fetched[name] = arrays[name]
        except (KeyError, TypeError, IndexError):
            raise ValueError(f"import_sequence: array {name!r} is missing") from None
    return fetched


def _array(fetched, name, shape, dtype):
    a = fetched[name]
    if type(a) is not np.ndarray:
        raise ValueError(f"import_sequence: {name!r} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise ValueError(f"import_sequence: {name!r} must be {np.dtype(dtype)}, got {a.dtype}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"import_sequence: {name!r} must have shape {shape}, got {a.shape}")
    return np.ascontiguousarray(a)


def unpack_paged(meta, arrays, fields, num_layers, num_kv_heads, head_dim, dtype):
    """Checked arrays of a paged export: (lengths, [(k, v) per layer]), contiguous, of the
    cache's dtype. ValueError / TypeError naming what is wrong."""
    _check_meta(meta, fields)
    lengths = _counts(meta, "lengths", num_layers)
    fetched = _fetch(arrays, [f"{kv}.{layer}" for layer in range(num_layers) for kv in "kv"])
    layers = []
    for layer in range(num_layers):
        shape = (lengths[layer], num_kv_heads, head_dim)
        layers.append((_array(fetched, f"k.{layer}", shape, dtype),
                       _array(fetched, f"v.{layer}", shape, dtype)))
    return lengths, layers


def unpack_twotier(meta, arrays, fields, num_layers, num_kv_heads, head_dim, group_tokens):
    """Checked arrays of a two-tier export: [(length, skip, cut, blobs, sizes, hot_k, hot_v,
    hot_len) per layer]; the blobs themselves are validated by the cache's codec."""
    _check_meta(meta, fields)
    lengths = _counts(meta, "lengths", num_layers)
    skips = _counts(meta, "skip", num_layers, below=group_tokens)
    cuts = _counts(meta, "cut", num_layers, below=group_tokens) if "cut" in meta or \
        meta.get("version") != 2 else [0] * num_layers
    fetched = _fetch(arrays, [f"{name}.{layer}" for layer in range(num_layers)
                              for name in ("cold_sizes", "cold", "hot_k", "hot_v")])
    layers = []
    for layer in range(num_layers):
        sizes = fetched[f"cold_sizes.{layer}"]
        if type(sizes) is not np.ndarray or sizes.dtype != _I64 or sizes.ndim != 1:
            raise ValueError(f"import_sequence: 'cold_sizes.{layer}' must be a 1-d int64 array")
        sizes = np.array(sizes)                  # our own copy: its values are checked below
        ngroups = len(sizes)
        if np.any(sizes <= 0):
            g = int(np.argmax(sizes <= 0))
            raise ValueError(f"import_sequence: cold group {g} of layer {layer} is malformed "
                             f"({sizes[g]} bytes)")
        total = int(sizes.sum(dtype=np.int64)) if ngroups else 0
        blobs = _array(fetched, f"cold.{layer}", (total,), _U8)
        skip, cut = skips[layer], cuts[layer]
        if ngroups == 0 and (skip or cut):
            raise ValueError(f"import_sequence: layer {layer} skips or cuts tokens of no cold group")
        if ngroups == 1 and skip + cut >= group_tokens:
            raise ValueError(f"import_sequence: layer {layer}: skip {skip} and cut {cut} leave no "
                             f"token of its cold group")
        hot_len = lengths[layer] - (ngroups * group_tokens - skip - cut)
        if hot_len < 0:
            raise ValueError(f"import_sequence: layer {layer}: length {lengths[layer]} is shorter "
                             f"than its {ngroups} cold groups of {group_tokens} tokens")
        shape = (hot_len, num_kv_heads, head_dim)
        layers.append((lengths[layer], skip, cut, blobs, sizes,
                       _array(fetched, f"hot_k.{layer}", shape, _F16),
                       _array(fetched, f"hot_v.{layer}", shape, _F16), hot_len))
    return layers
