"""A two-tier cache whose capacity fills a slab (2 MiB or more of cold groups) carves its cold
groups from slabs of its own (kvcache/rv_slab.c): 2 MiB-aligned mappings advised to use
transparent huge pages, read here from /proc/self/smaps independently of the cache's counts.
Freed blocks are reused, a wholly free slab is unmapped, and the bytes add up: cold_bytes
stays the groups' own allocations (header + blob, aligned) and the slabs' other bytes are
reported apart (slab_slack_bytes) and counted in nbytes. Smaller caches take their groups from
malloc as before. What the groups hold, and so attention, does not depend on where they live:
checked bit for bit against the same data in a cache whose groups are BufferPool buffers."""
import os

import numpy as np
import pytest

from ruvpy import BufferPool, Runtime, RuntimeConfig, TwoTierKVCache
from ruvpy._kvcache import _mapped_bytes

from _helpers import (assert_cache_attention_close, heap_bytes_in_use, outlier_kv, process_mappings,
                      random_kv)

HUGE_PAGE = 2 << 20
THP = os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled")

KVH, D, G = 4, 128, 64


mappings = process_mappings


def named_mappings():
    """(start, end) of the mappings with a name (the heap, files): never a slab."""
    with open("/proc/self/maps") as f:
        rows = [line.split() for line in f]
    return {tuple(int(x, 16) for x in row[0].split("-")) for row in rows if len(row) > 5}


def slab_mappings(before):
    """The anonymous mappings made since `before` of 2 MiB multiples (a slab is one; the
    heap, which may grow meanwhile, is not anonymous in /proc/self/maps). glibc's thread-arena
    heaps are anonymous too, but mapped MAP_NORESERVE ("nr"), which ruvpy's mappings are not:
    numpy's huge-page advice on a large array there splits them into pieces that may be 2 MiB
    multiples (an 8 MiB get_kv result once failed the fork test below)."""
    now, named = mappings(), named_mappings()
    return {r: f for r, f in now.items()
            if r not in before and r not in named and (r[1] - r[0]) % HUGE_PAGE == 0 and "nr" not in f}


def large(cold="q4", tokens=8192, layers=2, **kw):
    cache = TwoTierKVCache(layers, KVH, D, hot_tokens=64, cold=cold, migration_batch=G,
                           max_tokens=tokens, **kw)
    assert TwoTierKVCache.uses_slabs(layers, KVH, D, hot_tokens=64, cold=cold, migration_batch=G,
                                     max_tokens=tokens)
    return cache


def check_bytes(cache, counted_before):
    """The accounting identities, against the process's own count of the caches' mappings."""
    st = cache.stats()
    assert st.slab_slack_bytes == st.slab_mapped_bytes - st.slab_cold_bytes >= 0
    assert st.slab_cold_bytes + st.pooled_cold_bytes <= st.cold_bytes
    assert st.bytes == st.hot_bytes + st.cold_bytes + st.metadata_bytes + st.slab_slack_bytes
    assert _mapped_bytes() - counted_before == st.slab_mapped_bytes
    assert st.slab_mapped_bytes % HUGE_PAGE == 0
    return st


@pytest.mark.parametrize("cold", ["q4", "q8", "turbo"])
def test_cold_groups_of_a_large_cache_live_in_aligned_huge_page_slabs(cold):
    rng = np.random.default_rng(1)
    counted, before = _mapped_bytes(), mappings()
    cache = large(cold)
    seq = cache.add_sequence()
    assert cache.stats().slab_mapped_bytes == 0           # nothing mapped before a group exists
    for layer in range(2):
        cache.append(seq, layer, *outlier_kv(rng, 4096, KVH, D))
    st = check_bytes(cache, counted)
    assert st.cold_groups == 2 * (4096 - 64) // G
    assert st.slab_cold_bytes == st.cold_bytes and st.pooled_cold_bytes == 0
    slabs = slab_mappings(before)
    assert sum(e - s for s, e in slabs) == st.slab_mapped_bytes > 0
    for (start, end), flags in slabs.items():
        assert start % HUGE_PAGE == 0
        if THP:
            assert "hg" in flags                          # MADV_HUGEPAGE
    # a slab's uncarved tail is less than 1/16 of it, and only the newest has free room
    assert st.slab_slack_bytes < st.slab_mapped_bytes // 16 + cache.group_bytes_max(
        2, KVH, D, hot_tokens=64, cold=cold, migration_batch=G) + HUGE_PAGE
    cache.close()
    assert _mapped_bytes() == counted
    assert not set(slabs) & set(mappings())


def test_freed_blocks_are_reused_and_free_slabs_unmapped():
    rng = np.random.default_rng(2)
    counted, before = _mapped_bytes(), mappings()
    cache = large("turbo", tokens=16384, layers=1)
    seq = cache.add_sequence()
    k, v = random_kv(rng, 8192, KVH, D)
    cache.append(seq, 0, k, v)
    full = check_bytes(cache, counted)
    slabs = set(slab_mappings(before))
    # dropping 8 groups and appending them again, 40 times over: 320 groups' worth, far more
    # than a slab holds, maps nothing new when the freed blocks are taken again
    for _ in range(40):
        cache.truncate(seq, 8192 - 8 * G - 64)
        cache.append(seq, 0, k[-8 * G - 64:], v[-8 * G - 64:])
        assert check_bytes(cache, counted).slab_mapped_bytes == full.slab_mapped_bytes
    assert set(slab_mappings(before)) == slabs
    # keeping the first group only: every slab but its one is wholly free, and unmapped
    cache.truncate(seq, G)
    st = check_bytes(cache, counted)
    assert st.cold_groups == 1 and 0 < st.slab_mapped_bytes < full.slab_mapped_bytes
    assert len(slab_mappings(before)) == 1
    cache.free(seq)
    st = check_bytes(cache, counted)
    assert st.cold_bytes == st.slab_mapped_bytes == st.slab_slack_bytes == 0
    assert not slab_mappings(before)
    cache.close()
    assert _mapped_bytes() == counted


def test_forks_share_slab_blocks_until_the_last_holder_goes():
    rng = np.random.default_rng(3)
    counted, before = _mapped_bytes(), mappings()
    cache = large("q4", layers=1)
    parent = cache.add_sequence()
    cache.append(parent, 0, *outlier_kv(rng, 4096, KVH, D))
    mapped = check_bytes(cache, counted).slab_mapped_bytes
    child = cache.fork(parent)
    k, v = cache.get_kv(child, 0)
    cache.free(parent)
    st = check_bytes(cache, counted)
    assert st.slab_mapped_bytes == mapped and st.cold_groups == (4096 - 64) // G
    k2, v2 = cache.get_kv(child, 0)
    np.testing.assert_array_equal(k2, k)
    np.testing.assert_array_equal(v2, v)
    cache.free(child)
    assert check_bytes(cache, counted).slab_mapped_bytes == 0 and not slab_mappings(before)
    cache.close()


def test_a_small_cache_takes_its_groups_from_malloc():
    """Capacity under one slab: no mapping of its own, its groups on malloc's heap."""
    kw = dict(hot_tokens=64, cold="q4", migration_batch=G, max_tokens=1024)
    assert not TwoTierKVCache.uses_slabs(1, KVH, D, **kw)
    rng = np.random.default_rng(4)
    counted = _mapped_bytes()
    heap = heap_bytes_in_use()
    cache = TwoTierKVCache(1, KVH, D, **kw)
    seq = cache.add_sequence()
    cache.append(seq, 0, *random_kv(rng, 1024, KVH, D))
    st = check_bytes(cache, counted)
    assert st.cold_groups > 0 and st.slab_mapped_bytes == st.slab_cold_bytes == 0
    assert _mapped_bytes() == counted
    assert heap_bytes_in_use() - heap >= st.bytes
    cache.close()


@pytest.mark.parametrize("cold", ["q4", "turbo"])
def test_attention_and_export_do_not_depend_on_where_groups_live(cold):
    """The same data in slabs and in BufferPool buffers: identical reads, attention and
    exported codes; an export imported into a slab cache exports the same again."""
    rng = np.random.default_rng(5)
    kw = dict(hot_tokens=64, cold=cold, migration_batch=G, max_tokens=8192)
    largest = TwoTierKVCache.group_bytes_max(1, KVH, D, **kw)
    pool = BufferPool(4, size_classes=[(-(-largest // 64) * 64, 256)])
    slab, pooled = TwoTierKVCache(1, KVH, D, **kw), TwoTierKVCache(1, KVH, D, pool=pool, **kw)
    k, v = outlier_kv(rng, 4000, KVH, D)
    seqs = []
    for cache in (slab, pooled):
        seq = cache.add_sequence()
        cache.append(seq, 0, k, v)
        seqs.append(seq)
    assert slab.stats().slab_cold_bytes == slab.stats().cold_bytes > 0
    assert pooled.stats().slab_mapped_bytes == 0 and pooled.stats().pooled_cold_bytes > 0
    for a, b in zip(slab.get_kv(seqs[0], 0), pooled.get_kv(seqs[1], 0)):
        np.testing.assert_array_equal(a, b)
    q = rng.standard_normal((1, 8, D)).astype(np.float32)
    out = slab.attention(seqs[0], 0, q, threads=1)
    np.testing.assert_array_equal(out, pooled.attention(seqs[1], 0, q, threads=1))
    assert_cache_attention_close(slab, seqs[0], 0, q, out)
    meta, arrays = pooled.export_sequence(seqs[1])
    again = slab.import_sequence(meta, arrays)
    meta2, arrays2 = slab.export_sequence(again)
    assert meta2 == meta and arrays2.keys() == arrays.keys()
    for name in arrays:
        np.testing.assert_array_equal(arrays2[name], arrays[name])
    slab.close()
    pooled.close()


def test_a_large_runtime_cache_takes_cold_groups_from_slabs():
    """The Runtime's own decode benefits: a two-tier cache whose capacity fills a slab takes
    its groups from its slabs, not from the pool (which then keeps no class for them); a small
    one keeps the pool's prewarmed class. RuntimeStats still add up to every byte."""
    rng = np.random.default_rng(6)
    for tokens, slabs in ((8192, True), (256, False)):
        cfg = RuntimeConfig(num_layers=2, num_heads=8, num_kv_heads=KVH, head_dim=D,
                            max_tokens=tokens, kv_cache="two-tier", hot_tokens=64,
                            migration_batch=G, arena_bytes=1 << 16)
        counted = _mapped_bytes()
        rt = Runtime(cfg)
        seq = rt.add_sequence()
        n = min(tokens, 2048)
        for layer in range(2):
            rt.cache.append(seq, layer, *random_kv(rng, n, KVH, D))
        st = rt.cache.stats()
        assert st.cold_groups > 0
        if slabs:
            assert st.slab_cold_bytes == st.cold_bytes and st.pooled_cold_bytes == 0
        else:
            assert st.slab_mapped_bytes == 0 and st.pooled_cold_bytes == st.cold_bytes
        assert _mapped_bytes() - counted == st.slab_mapped_bytes
        # the pool's class holds the groups not in use ready (prewarmed): KV too
        (class_bytes,) = (0,) if slabs else rt._cold_classes
        reserved = (rt._sizing.cold_groups - st.cold_groups) * class_bytes
        assert rt.memory_bytes()["kv"] == st.bytes + reserved
        assert rt.stats().kv["reserved_bytes"] == reserved
        rt.close()
        assert _mapped_bytes() == counted


@pytest.mark.parametrize("cold", ["q4", "turbo"])
def test_a_budget_holds_when_slab_groups_grow(cold):
    """Under a memory_budget the sizing counts the cold store as whole slabs of the capacity's
    largest groups. With blocks of several size classes, groups that grow over time (q4's
    outlier channels appearing after a fill without them) could not reuse the smaller blocks
    the evicted groups freed while their slabs still held live ones: the heap mapped slabs
    past the sizing's count, and the KV cache stood at 106-119% of its budget between
    steps (181% here). Under a budget every slab block is of the largest size; the budget
    holds. (TurboQuant groups are all of one size: a control.)"""
    L, H, kvh, d, group = 1, 8, 8, 128, 64
    cfg = RuntimeConfig(num_layers=L, num_heads=H, num_kv_heads=kvh, head_dim=d, hot_tokens=16,
                        migration_batch=group, memory_budget=5_000_000, max_sequences=1,
                        policy="evict-oldest", arena_bytes=1 << 20,
                        **(dict(kv_cache="turbo") if cold == "turbo" else
                           dict(kv_cache="two-tier", cold="q4")))
    rng = np.random.default_rng(17)
    with Runtime(cfg) as rt:
        assert rt.cache.stats().slab_mapped_bytes == 0 and rt._sizing.cold_slabs
        seq, most = rt.add_sequence(), 0
        # a fill without outlier channels (the smallest groups), then with (the largest), twice
        for outliers in (False, True, False, True):
            for _ in range(2 * rt.capacity_tokens // group):
                if outliers:
                    k, v = outlier_kv(rng, group, kvh, d, channels=8)
                else:
                    k, v = random_kv(rng, group, kvh, d)
                with rt.step([seq], [group]) as step:
                    step.attention(0, rng.standard_normal((group, H, d)).astype(np.float32), k, v)
                most = max(most, rt.stats().kv["bytes"])
        assert rt.stats().kv["details"]["slab_mapped_bytes"] > 0
        assert most <= cfg.memory_budget, (most, cfg.memory_budget)
