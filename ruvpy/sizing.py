"""How big a Runtime's KV cache is, by arithmetic from C's own numbers (a paged block's
bytes, the most a two-tier cold group takes, the bytes a cache allocates when created):
nothing is built to find out.

A memory budget holds the token storage at its worst-case cost per token, the hot tiers a
two-tier cache keeps per sequence, and a metadata allowance (1/64 of the budget, 8 KiB .. 1
MiB) for the bookkeeping that grows with the sequences. A two-tier cache's budget also holds
what it allocates when created (the migration work buffer, the format's tables) and its cold
store as allocated: whole 2 MiB-multiple slabs when it uses them, the last partly empty.
"""
from __future__ import annotations

import dataclasses
import math

from ruvpy import _kvcache
from ruvpy.config import DEFAULT_MAX_TOKENS

__all__ = ["KVSizing", "size_kv", "METADATA_ALLOWANCE_MIN", "METADATA_ALLOWANCE_MAX"]

METADATA_ALLOWANCE_MIN = 8 * 1024     # of a memory_budget, kept for the cache's bookkeeping
METADATA_ALLOWANCE_MAX = 1 << 20


@dataclasses.dataclass(frozen=True)
class KVSizing:
    """A KV cache's plan. bytes_per_token: a token of all layers at the storage's usual cost
    (a paged block / a cold group without outliers, per token); budget_bytes_per_token: at
    its worst (the most a cold group takes); hot_tier_bytes: one two-tier sequence's fp16
    tier at most between steps (a step appending n tokens holds up to n - 1 more until it
    ends: nothing migrates inside one); capacity_tokens: tokens per layer, all sequences; max_sequences:
    live sequences at once (None: as many as fit); group_bytes: the most one cold group
    takes (two-tier); layer_group_bytes: the most one of each layer's takes (they differ when
    layers have TurboQuant widths of their own), the size classes a Runtime's pool keeps for
    them; cold_groups: how many cold groups the capacity holds (all layers); cold_slabs: the
    cold groups come from the cache's own huge-page slabs (else from the Runtime's pool)."""
    cache_class: type
    shape: tuple
    options: dict
    bytes_per_token: float
    budget_bytes_per_token: float
    hot_tier_bytes: int
    capacity_tokens: int
    max_sequences: int | None
    group_bytes: int
    cold_groups: int
    cold_slabs: bool = False
    layer_group_bytes: tuple = ()


def metadata_allowance(budget):
    return min(max(METADATA_ALLOWANCE_MIN, budget // 64), METADATA_ALLOWANCE_MAX)


def size_kv(cfg):
    """The KVSizing of a RuntimeConfig. ValueError when its memory_budget holds no token."""
    paged = cfg.kv_cache == "paged"
    cache_class = _kvcache.PagedKVCache if paged else _kvcache.TwoTierKVCache
    options = cfg.cache_options()
    shape = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    per_token = float(cache_class.bytes_per_token(*shape, **options))
    budget_per_token, hot, group, layer_groups = per_token, 0, 0, ()
    if not paged:
        hot = int(cache_class.hot_tier_bytes(*shape, **options))
        group = int(cache_class.group_bytes_max(*shape, **options))
        layer_groups = tuple(int(b) for b in cache_class.layer_group_bytes_max(*shape, **options))
        if cfg.memory_budget is not None:
            budget_per_token = max(per_token, sum(layer_groups) / cfg.migration_batch)
    fixed = 0 if paged else int(cache_class.fixed_bytes(*shape, **options))
    capacity = _capacity(cfg, budget_per_token, hot, fixed)
    slabs = False
    if paged:
        if cfg.memory_budget is not None:
            capacity = _fit_creation(cfg, cache_class, shape, options, capacity, budget_per_token)
    elif cfg.memory_budget is not None:
        capacity, slabs = _fit_two_tier(cfg, cache_class, shape, options, capacity, hot, fixed)
    else:
        slabs = bool(cache_class.uses_slabs(*shape, max_tokens=capacity, **options))
    max_sequences = _sequence_limit(cfg, cache_class, shape, options, capacity, slabs, hot, fixed)
    cold_groups = 0 if paged else -(-capacity // cfg.migration_batch) * cfg.num_layers
    return KVSizing(cache_class, shape, options, per_token, budget_per_token, hot, capacity,
                    max_sequences, group, cold_groups, slabs, layer_groups)


def _capacity(cfg, per_token, hot, fixed):
    """Tokens the KV cache is built for: max_tokens, and what fits in the memory budget less
    a metadata allowance (block tables, bookkeeping), the reserved hot tiers and what a
    two-tier cache allocates when created (`fixed`), at the worst cost per token."""
    capacity = cfg.max_tokens
    if cfg.memory_budget is not None:
        allowance = metadata_allowance(cfg.memory_budget)
        tiers = hot * (cfg.max_sequences or 1)
        fitting = int(max(0, cfg.memory_budget - allowance - tiers - fixed) // per_token)
        if cfg.kv_cache == "paged":
            fitting -= fitting % cfg.block_size
        if fitting < 1:
            raise ValueError(
                f"RuntimeConfig.memory_budget={cfg.memory_budget} bytes holds no token: one "
                f"token of all {cfg.num_layers} layers costs {per_token:.0f} bytes in a "
                f"{cfg.kv_cache} cache"
                + (f" (blocks of {cfg.block_size})" if cfg.kv_cache == "paged" else
                   f", after fp16 hot tiers of {tiers} bytes for {cfg.max_sequences or 1} "
                   f"sequence(s)")
                + (f", the {fixed} bytes it allocates when created" if fixed else "")
                + f" and a {allowance}-byte metadata allowance")
        capacity = fitting if capacity is None else min(capacity, fitting)
    return DEFAULT_MAX_TOKENS if capacity is None else capacity


def _fit_creation(cfg, cache_class, shape, options, capacity, per_token):
    """A paged cache's capacity, lowered until what it allocates when created (its pool and
    metadata, which may outgrow the allowance for small budgets) fits the budget."""
    for _ in range(64):
        excess = cache_class.bytes_for(*shape, max_tokens=capacity, **options) - cfg.memory_budget
        if excess <= 0:
            return capacity
        capacity -= max(1, math.ceil(excess / per_token))
        if cfg.kv_cache == "paged":
            capacity -= capacity % cfg.block_size
        if capacity < 1:
            break
    raise ValueError(f"RuntimeConfig.memory_budget={cfg.memory_budget} bytes cannot hold a "
                     f"{cfg.kv_cache} KV cache of even one token with its metadata")


# Slabs (huge pages: decode 15-25% faster over the cold groups) round the cold store up to
# whole 2 MiB multiples; under a tight budget the pool's groups then hold more tokens. Slabs
# unless they would cost more than this share of the capacity.
SLAB_CAPACITY_LOSS_MAX = 1 / 8


def _largest(upper, fits):
    """The largest capacity in [1, upper] that fits (fits is monotonic), or 0."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _fit_two_tier(cfg, cache_class, shape, options, upper, hot, fixed):
    """(capacity, slabs) of a two-tier cache under a budget: the most tokens whose cold store,
    as allocated, fits next to the fixed part, the metadata allowance and the reserved hot
    tiers; from slabs unless they would hold SLAB_CAPACITY_LOSS_MAX fewer tokens than pool
    groups (the last slab's empty part)."""
    room = cfg.memory_budget - metadata_allowance(cfg.memory_budget) - hot * (cfg.max_sequences or 1) - fixed

    def store(capacity, slabs):
        return cache_class.cold_store_bytes(*shape, max_tokens=capacity, slabs=slabs, **options)

    pooled = _largest(upper, lambda c: store(c, False) <= room)
    slabbed = _largest(upper, lambda c: store(c, True) <= room)
    if pooled < 1:
        raise ValueError(f"RuntimeConfig.memory_budget={cfg.memory_budget} bytes cannot hold a "
                         f"{cfg.kv_cache} KV cache of even one token with its metadata")
    if cache_class.uses_slabs(*shape, max_tokens=slabbed, **options) and \
            slabbed >= (1 - SLAB_CAPACITY_LOSS_MAX) * pooled:
        return slabbed, True
    return pooled, False


def _sequence_limit(cfg, cache_class, shape, options, capacity, slabs, hot, fixed):
    """Live sequences allowed at once: max_sequences, and for a two-tier cache under a
    budget, as many hot tiers as the budget holds next to a full cold store."""
    if cfg.memory_budget is None or not hot:
        return cfg.max_sequences
    spare = cfg.memory_budget - metadata_allowance(cfg.memory_budget) - fixed - \
        cache_class.cold_store_bytes(*shape, max_tokens=capacity, slabs=slabs, **options)
    fitting = max(1, int(spare // hot))
    return fitting if cfg.max_sequences is None else min(fitting, cfg.max_sequences)
