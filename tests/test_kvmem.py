"""A paged cache's large pool (4 MiB or more) is a fresh mapping of its own: 2 MiB-aligned,
exactly its page-rounded size, advised to use transparent huge pages, and unmapped when the
cache closes. From malloc it could be heap that an earlier allocation freed, already faulted
in 4 KiB pages that the huge-page advice no longer changes (the same paged decode then ran
25-50% slower depending on what the process had allocated before). The mappings are read
from /proc/self/smaps, independently of the cache's own counts."""
import mmap
import os

import numpy as np
import pytest

from ruvpy import KVCacheFull, PagedKVCache
from ruvpy._kvcache import _mapped_bytes

from _helpers import assert_cache_attention_close, heap_bytes_in_use, process_mappings, random_kv

HUGE_PAGE = 2 << 20
THP = os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled")


mappings = process_mappings


def new_mappings(before, after):
    return {r: flags for r, flags in after.items() if r not in before}


def pool_bytes_for(tokens, kv_heads, d, block_size=16):
    """The pool's bytes as a formula: K and V fp16 of every token slot, page-rounded."""
    raw = 2 * 2 * kv_heads * d * tokens
    return -(-raw // mmap.PAGESIZE) * mmap.PAGESIZE


@pytest.mark.parametrize("tokens", [16384, 16384 + 48])      # a whole number of pages, and not
def test_a_large_pool_is_a_fresh_aligned_mapping_of_its_own(tokens):
    want = pool_bytes_for(tokens, 1, 64)
    counted = _mapped_bytes()
    before = mappings()
    cache = PagedKVCache(1, 1, 64, block_size=16, max_tokens=tokens, dtype="float16")
    fresh = new_mappings(before, mappings())
    assert cache.stats().pool_bytes == want
    pools = [r for r in fresh if r[1] - r[0] == want]
    assert len(pools) == 1, (want, fresh)
    (start, end), = pools
    assert start % HUGE_PAGE == 0
    if THP:
        assert "hg" in fresh[(start, end)]             # MADV_HUGEPAGE
    assert _mapped_bytes() - counted == want
    cache.close()
    assert (start, end) not in mappings()
    assert _mapped_bytes() == counted


def test_a_small_pool_comes_from_malloc():
    """Below 4 MiB the pool is malloc's (glibc's own count grows by it) and maps nothing of
    its own."""
    counted = _mapped_bytes()
    heap = heap_bytes_in_use()
    cache = PagedKVCache(1, 1, 64, block_size=16, max_tokens=4096, dtype="float16")   # 2 MiB
    pool = cache.stats().pool_bytes
    assert pool == 2 * 2 * 64 * 4096
    assert _mapped_bytes() == counted
    assert heap_bytes_in_use() - heap >= pool
    cache.close()


def test_every_block_of_a_mapped_pool_holds_its_tokens():
    """Filled to the last block, the mapped pool reads back what was appended, and attention
    over it matches float64 attention."""
    rng = np.random.default_rng(5)
    n, kvh, d = 16384, 2, 64
    cache = PagedKVCache(2, kvh, d, block_size=16, max_tokens=n, dtype="float16")
    assert cache.stats().pool_bytes >= 2 * HUGE_PAGE
    seq = cache.add_sequence()
    for layer in range(2):
        k, v = random_kv(rng, n, kvh, d)
        cache.append(seq, layer, k, v)
        gk, gv = cache.get_kv(seq, layer)
        np.testing.assert_array_equal(gk, k.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(gv, v.astype(np.float16).astype(np.float32))
    assert cache.stats().blocks_free == 0
    q = rng.standard_normal((1, 4, d)).astype(np.float32)
    out = cache.attention(seq, 1, q)
    assert_cache_attention_close(cache, seq, 1, q, out)
    with pytest.raises(KVCacheFull):
        cache.append(seq, 0, *random_kv(rng, 1, kvh, d))       # the pool is full
    cache.close()
