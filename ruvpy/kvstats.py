"""What a KV cache reports about itself: the stats classes and their assembly from the raw
counters the caches' C code keeps (ruvpy._kvcache reads them; this module decides what they
mean and how they are presented)."""
from __future__ import annotations

import numpy as np

__all__ = ["KVCacheStats", "PagedKVStats", "TwoTierKVStats", "paged_stats", "twotier_stats"]


class KVCacheStats:
    """A snapshot of a KV cache. Every cache's stats have:

    kind, num_layers, num_kv_heads, head_dim, capacity_tokens (tokens per layer the cache
    may hold, all sequences together), tokens (tokens held: the sum over sequences of their
    longest layer), bytes (allocated now, everything: == cache.nbytes), tiers {name:
    {"tokens", "bytes"}}, layers [{"layer", "tokens", "bytes"}], sequences {id: {"tokens",
    "bytes", ...}} (a shared block's bytes are split among its holders), plus the
    cache-specific fields documented on PagedKVStats / TwoTierKVStats."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def as_dict(self):
        """A JSON-able dict (sequence ids become strings)."""
        return _jsonable(self.__dict__)

    def __repr__(self):
        return (f"<{type(self).__name__} {self.kind}: {self.tokens} tokens, "
                f"{self.bytes} bytes, {len(self.sequences)} sequences>")


class PagedKVStats(KVCacheStats):
    """KVCacheStats of a PagedKVCache, plus: dtype, block_size, bytes_per_block,
    blocks_total, blocks_used, blocks_shared (held by more than one sequence, or kept for a
    rollback: inside a transaction a block left by copy-on-write stays held, counted in the
    cache's bytes and blocks_used but in no sequence's), blocks_free,
    pool_bytes, metadata_bytes, internal_fragmentation (fraction of the used blocks' token
    slots, over all layers, that hold no token; shared blocks counted once); per sequence
    also "blocks" and "shared_blocks"."""


class TwoTierKVStats(KVCacheStats):
    """KVCacheStats of a TwoTierKVCache, plus: cold ("q8", "q4", "turbo"), hot_tokens_limit,
    migration_batch, group_size, policy, cold_groups (allocated), cold_groups_shared (held by
    more than one sequence, or kept for a rollback), hot_bytes, cold_bytes, metadata_bytes,
    pooled_cold_bytes (of cold_bytes: buffers of an attached BufferPool), slab_cold_bytes (of
    cold_bytes: blocks of the cache's huge-page slabs), slab_mapped_bytes (those slabs'
    mappings), slab_slack_bytes (their bytes not in cold groups: slab_mapped_bytes -
    slab_cold_bytes; counted in `bytes`, not in cold_bytes), stored_tokens, budget_tokens,
    cold_bytes_per_token (cold bytes / stored cold tokens, all layers), fp16
    bytes_per_token (what a token costs in the hot tier's format), compression_ratio (fp16
    bytes of the stored cold tokens / their cold bytes), cold_bits_per_value, evicted_tokens
    (tokens dropped from sequences since creation); tiers "hot" and "cold"; per sequence also
    "hot_tokens" and "cold_tokens".

    Stored vs held: forks share cold groups. `tokens` and the per-sequence counts are what
    each sequence holds (a shared token counts for every sequence holding it, as in the paged
    cache's stats). `stored_tokens`, the tiers' tokens and each layer's tokens count a shared
    cold token ONCE: every sequence's hot tokens (a fork copies its parent's) plus each cold
    group's tokens that some sequence still holds. stored_tokens and the tiers are those of
    the fullest layer (stored_tokens == hot + cold tokens there). `budget_tokens` -- what
    max_tokens bounds, in the layer it binds -- counts a cold group whole (migration_batch
    slots) while any of its tokens is held, since its allocation is: it exceeds the tokens
    stored by the slots of groups partly evicted or truncated. bytes are allocations, a
    shared group's counted once (split among holders per sequence)."""


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


def paged_stats(*, shape, dtype, block_size, capacity_tokens, nbytes, block_bytes, blocks_total,
                blocks_used, blocks_shared, blocks_free, slots_used, tokens_stored, pool_bytes,
                metadata_bytes, sequences):
    """PagedKVStats from the cache's counters. sequences: {id: (blocks, shared_blocks,
    share_bytes, [tokens per layer])}."""
    num_layers, num_kv_heads, head_dim = shape
    seqs, layer_tokens, total = {}, [0] * num_layers, 0
    for seq, (blocks, shared, share_bytes, lengths) in sorted(sequences.items()):
        for layer, n in enumerate(lengths):
            layer_tokens[layer] += n
        longest = max(lengths) if lengths else 0
        total += longest
        seqs[seq] = {"tokens": longest, "bytes": share_bytes, "blocks": blocks,
                     "shared_blocks": shared}
    used_bytes = blocks_used * block_bytes
    return PagedKVStats(
        kind="paged", num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
        dtype=dtype, block_size=block_size, capacity_tokens=capacity_tokens, tokens=total,
        bytes=nbytes, tiers={"paged": {"tokens": total, "bytes": used_bytes}},
        layers=[{"layer": layer, "tokens": layer_tokens[layer],
                 "bytes": used_bytes // num_layers} for layer in range(num_layers)],
        sequences=seqs, bytes_per_block=block_bytes, blocks_total=blocks_total,
        blocks_used=blocks_used, blocks_shared=blocks_shared, blocks_free=blocks_free,
        pool_bytes=pool_bytes, metadata_bytes=metadata_bytes,
        internal_fragmentation=(1.0 - tokens_stored / slots_used) if slots_used else 0.0)


def twotier_stats(*, shape, config, capacity_tokens, nbytes, used, stored, usage, hot_bytes, cold_bytes,
                  metadata_bytes, pooled_cold_bytes, cold_groups, cold_groups_shared,
                  evicted_tokens, slab_cold_bytes=0, slab_mapped_bytes=0):
    """TwoTierKVStats from the cache's counters. config: cold, hot_tokens_limit,
    migration_batch, group_size, policy. used: slots charged against the capacity per layer;
    stored: tokens stored per layer. usage: {id: [(hot
    tokens, cold tokens, hot bytes, cold bytes) per layer]}."""
    num_layers, num_kv_heads, head_dim = shape
    layer_rows = [{"layer": layer, "tokens": stored[layer], "bytes": 0} for layer in range(num_layers)]
    layer_hot = [0] * num_layers
    seqs, tokens = {}, 0
    for seq, layers in sorted(usage.items()):
        entry = {"tokens": 0, "bytes": 0, "hot_tokens": 0, "cold_tokens": 0}
        for layer, (hot, cold, hbytes, cbytes) in enumerate(layers):
            entry["tokens"] = max(entry["tokens"], hot + cold)
            entry["hot_tokens"] = max(entry["hot_tokens"], hot)
            entry["cold_tokens"] = max(entry["cold_tokens"], cold)
            entry["bytes"] += hbytes + cbytes
            layer_rows[layer]["bytes"] += hbytes + cbytes
            layer_hot[layer] += hot
        seqs[seq] = entry
        tokens += entry["tokens"]
    fullest = max(range(num_layers), key=lambda layer: stored[layer])
    hot_tokens = layer_hot[fullest]
    cold_tokens = stored[fullest] - hot_tokens
    cold_token_layers = sum(stored[layer] - layer_hot[layer] for layer in range(num_layers))
    fp16_token = 2 * 2 * num_kv_heads * head_dim      # K and V, one layer
    return TwoTierKVStats(
        kind="two-tier", num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
        **config, capacity_tokens=capacity_tokens, tokens=tokens, stored_tokens=stored[fullest],
        budget_tokens=max(used),
        bytes=nbytes,
        tiers={"hot": {"tokens": hot_tokens, "bytes": hot_bytes},
               "cold": {"tokens": cold_tokens, "bytes": cold_bytes}},
        layers=layer_rows, sequences=seqs, cold_groups=cold_groups,
        cold_groups_shared=cold_groups_shared, hot_bytes=hot_bytes, cold_bytes=cold_bytes,
        metadata_bytes=metadata_bytes, pooled_cold_bytes=pooled_cold_bytes,
        slab_cold_bytes=slab_cold_bytes, slab_mapped_bytes=slab_mapped_bytes,
        slab_slack_bytes=slab_mapped_bytes - slab_cold_bytes,
        fp16_bytes_per_token=fp16_token * num_layers,
        cold_bytes_per_token=(cold_bytes / cold_token_layers * num_layers)
        if cold_token_layers else 0.0,
        compression_ratio=(fp16_token * cold_token_layers / cold_bytes) if cold_bytes else 0.0,
        cold_bits_per_value=(8.0 * cold_bytes / (cold_token_layers * 2 * num_kv_heads * head_dim))
        if cold_token_layers else 0.0,
        evicted_tokens=evicted_tokens)
