"""tools/bench_kvcache.py's bookkeeping: the rounds rotate so that every format takes every
place in a round equally often, the contiguous K/V are copied into fresh 2 MiB-aligned private memory
advised for huge pages (like the caches' pools), and the huge-page share is read from the
process's mappings. (No timing is asserted.)"""
import mmap
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import bench_kvcache  # noqa: E402

from _helpers import process_mappings  # noqa: E402


def vm_flags(address):
    for (lo, hi), flags in process_mappings().items():
        if lo <= address < hi:
            return flags
    raise AssertionError(f"{address:#x} is in no mapping")


@pytest.mark.parametrize("count, repeats", [(5, 15), (3, 7), (1, 4)])
def test_rounds_rotate_through_every_order(count, repeats):
    names = [f"f{i}" for i in range(count)]
    orders = bench_kvcache.round_orders(names, repeats)
    assert len(orders) == repeats
    assert all(sorted(o) == sorted(names) for o in orders)
    assert [o[0] for o in orders] == [names[r % count] for r in range(repeats)]
    whole = orders[:repeats - repeats % count]   # whole cycles: every format in every place alike
    places = Counter((i, name) for o in whole for i, name in enumerate(o))
    assert len(places) == count * count and set(places.values()) == {len(whole) // count}


def test_interleaved_medians_times_every_call_in_the_rotated_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    med = bench_kvcache.interleaved_medians(fns, repeats=4, warmup=1)
    assert set(med) == set("abc") and all(t >= 0 for t in med.values())
    assert calls == list("abc") + list("abc") + list("bca") + list("cab") + list("abc")


def test_contiguous_kv_is_a_private_aligned_huge_page_copy():
    a = np.random.default_rng(0).standard_normal((300, 3, 64)).astype(np.float16)
    b = bench_kvcache.placed_like_kv(a)
    np.testing.assert_array_equal(b, a)
    assert b.dtype == a.dtype and b.flags.c_contiguous
    assert b.ctypes.data % bench_kvcache.HUGE_PAGE == 0
    flags = vm_flags(b.ctypes.data)
    assert "sh" not in flags               # shared anonymous memory is shmem: no THP from advice
    if hasattr(mmap, "MADV_HUGEPAGE") and os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
        assert "hg" in flags
    share = bench_kvcache.huge_page_share(b)
    assert 0.0 <= share <= 1.0


def test_huge_page_share_of_small_pages_is_zero():
    region = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE)
    region.madvise(mmap.MADV_NOHUGEPAGE)
    a = np.frombuffer(region, np.uint8)
    a[:] = 1                                  # every page present, none of them huge
    assert bench_kvcache.huge_page_share(a) == 0.0
    del a
    region.close()
