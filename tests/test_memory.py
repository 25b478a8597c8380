"""ruvpy's memory layer: Arena, BufferPool / PooledBuffer, ScratchSpace, MemoryManager."""
import gc
import os
import pickle
import subprocess
import sys
import threading
import weakref

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ruvpy
from ruvpy import (Arena, ArenaExhausted, ArenaStats, BufferPool, MemoryManager, PooledBuffer,
                   PoolStats, ScratchSpace)

from _helpers import skip_under_sanitizer

ALIGN = 64
KIB = 1024
DTYPES = [np.float32, np.float16, np.float64, np.int8, np.uint8, np.int32, np.int64,
          np.complex64, "f4", np.dtype(">f8"), np.dtype([("a", "f4"), ("b", "i2")])]


def align_up(n):
    return (n + ALIGN - 1) // ALIGN * ALIGN


def address(arr):
    return arr.__array_interface__["data"][0]


def nbytes_of(shape, dtype):
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


# ---------------------------------------------------------------------------------------
# Arena
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_alloc_gives_aligned_contiguous_writable_views(dtype):
    arena = Arena(64 * KIB)
    arrays = [arena.alloc(shape, dtype) for shape in [(3,), (16, 64), (1, 5, 7), 33, (0,), ()]]
    for arr in arrays:
        assert address(arr) % ALIGN == 0
        assert arr.dtype == np.dtype(dtype)
        assert arr.flags.c_contiguous and arr.flags.writeable and arr.flags.aligned
    assert [a.shape for a in arrays] == [(3,), (16, 64), (1, 5, 7), (33,), (0,), ()]
    # disjoint: fill each with its own pattern, then check none was overwritten
    for i, arr in enumerate(arrays):
        arr.reshape(-1).view(np.uint8)[...] = i + 1
    for i, arr in enumerate(arrays):
        assert (arr.reshape(-1).view(np.uint8) == i + 1).all()


def test_default_dtype_is_float32_and_none_means_default():
    arena = Arena(4 * KIB)
    assert arena.alloc(4).dtype == np.float32
    assert arena.alloc((4,), None).dtype == np.float32
    assert arena.alloc((2, 2), dtype=np.dtype(np.float16)).dtype == np.float16


def test_shapes_accept_lists_and_numpy_integers():
    arena = Arena(4 * KIB)
    assert arena.alloc([2, 3]).shape == (2, 3)
    assert arena.alloc((np.int64(4), np.uint8(2))).shape == (4, 2)
    assert arena.alloc(np.int32(5)).shape == (5,)


class ArenaModel:
    """What an arena's stats must be: a bump pointer with 64-byte rounding."""

    def __init__(self, capacity):
        self.capacity = align_up(capacity)
        self.offset = self.high_water = self.count = self.resets = 0

    def alloc(self, nbytes):
        if nbytes > self.capacity - self.offset:
            return None
        start = self.offset
        self.offset += align_up(nbytes)
        self.high_water = max(self.high_water, self.offset)
        self.count += 1
        return start

    def reset(self):
        self.offset = self.count = 0
        self.resets += 1

    def stats(self):
        return ArenaStats(self.capacity, self.offset, self.capacity - self.offset,
                          self.high_water, self.count, self.resets)


shapes = st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple)
operations = st.lists(st.one_of(st.tuples(shapes, st.sampled_from([np.float32, np.float16,
                                                                     np.int8, np.float64])),
                                st.just("reset")), max_size=40)


@settings(max_examples=150, deadline=None)
@given(capacity=st.integers(1, 20000), ops=operations)
def test_arena_matches_a_bump_pointer_model(capacity, ops):
    arena = Arena(capacity)
    model = ArenaModel(capacity)
    base = address(arena.alloc(0))   # a zero-byte allocation sits at offset 0
    model.alloc(0)
    for op in ops:
        if op == "reset":
            arena.reset()
            model.reset()
        else:
            shape, dtype = op
            nbytes = nbytes_of(shape, dtype)
            expected = model.alloc(nbytes)
            if expected is None:
                before = arena.stats()
                with pytest.raises(ArenaExhausted) as info:
                    arena.alloc(shape, dtype)
                assert arena.stats() == before
                assert info.value.requested == nbytes
                assert info.value.remaining == before.remaining
            else:
                arr = arena.alloc(shape, dtype)
                assert address(arr) == base + expected
                assert address(arr) % ALIGN == 0
                assert arr.shape == shape and arr.nbytes == nbytes
        assert arena.stats() == model.stats()
        s = arena.stats()
        assert s.used + s.remaining == s.capacity


def test_stats_arithmetic():
    arena = Arena(1000)
    s = arena.stats()
    assert s == ArenaStats(1024, 0, 1024, 0, 0, 0)
    arena.alloc((10,), np.float32)            # 40 bytes -> 64
    arena.alloc((20,), np.float32)            # 80 bytes -> 128
    s = arena.stats()
    assert (s.used, s.remaining, s.high_water_mark, s.allocation_count) == (192, 832, 192, 2)
    assert s.utilization == pytest.approx(192 / 1024)
    arena.reset()
    arena.alloc(4, np.float64)
    s = arena.stats()
    assert (s.used, s.high_water_mark, s.allocation_count, s.reset_count) == (64, 192, 1, 1)


def test_exhaustion_names_sizes_and_leaves_the_arena_usable():
    arena = Arena(4096)
    arena.alloc((900,), np.float32)           # 3600 -> 3648 used, 448 left
    before = arena.stats()
    with pytest.raises(ArenaExhausted) as info:
        arena.alloc((1000,), np.float32)      # 4000 bytes
    err = info.value
    assert isinstance(err, MemoryError)
    assert "4000" in str(err) and "448" in str(err)
    assert (err.requested, err.remaining, err.capacity) == (4000, 448, 4096)
    assert arena.stats() == before
    small = arena.alloc((112,), np.float32)   # exactly the 448 bytes left
    small[:] = 1.0
    assert arena.stats().remaining == 0
    arena.reset()
    assert arena.alloc((1024,), np.float32).nbytes == 4096
    restored = pickle.loads(pickle.dumps(err))
    assert str(restored) == str(err) and restored.requested == 4000


def test_reset_is_o1_it_neither_touches_memory_nor_tracks_allocations():
    arena = Arena(64 * KIB)
    keep = arena.alloc((16,), np.float32)
    keep[:] = np.arange(16)
    watchers = []
    for i in range(100_000):
        arr = arena.alloc((8,), np.float32)
        if i % 10_000 == 0:
            watchers.append(weakref.ref(arr))
        if arena.stats().remaining < 64:
            arena.reset()
    del arr
    # The arena keeps no record of its allocations: every array it handed out is gone once
    # the caller drops it, and the arena refers to nothing but its block...
    assert all(w() is None for w in watchers)
    assert gc.get_referents(arena) == [keep.base]
    # ...and a reset (non-debug) moves counters only: memory written before it is untouched.
    keep = arena.alloc((16,), np.float32)
    keep[:] = np.arange(16)
    arena.reset()
    np.testing.assert_array_equal(keep, np.arange(16))
    assert arena.stats().used == 0 and arena.stats().allocation_count == 0


def test_views_outlive_the_arena():
    arena = Arena(8 * KIB)
    a = arena.alloc((32,), np.float64)
    b = arena.alloc((4, 4), np.int32)
    a[:] = np.linspace(0, 1, 32)
    b[:] = 7
    del arena
    gc.collect()
    np.testing.assert_array_equal(a, np.linspace(0, 1, 32))
    assert (b == 7).all()
    a[:] = 3.0
    b += 1
    assert (a == 3.0).all() and (b == 8).all()


def test_close_and_context_manager():
    with Arena(4 * KIB) as arena:
        arr = arena.alloc((8,))
        arr[:] = 5
    assert arena.closed
    for call in (lambda: arena.alloc(4), arena.reset, arena.stats, arena.__enter__):
        with pytest.raises(ValueError, match="closed"):
            call()
    arena.close()   # idempotent
    assert (arr == 5).all()
    arr[:] = 6
    assert (arr == 6).all()


_BLOCK_FREED = """
import gc, psutil, numpy as np
from ruvpy import Arena
size = 64 << 20
process = psutil.Process()
gc.collect()
rss0 = process.memory_info().rss
arena = Arena(size)
arr = arena.alloc((size,), np.uint8)
arr[:] = 1                                 # make the pages resident
assert process.memory_info().rss - rss0 > size // 2
arena.close()
assert process.memory_info().rss - rss0 > size // 2   # the array still holds it
del arr
gc.collect()
assert process.memory_info().rss - rss0 < size // 4
"""


def test_block_is_freed_when_the_last_array_dies():
    skip_under_sanitizer("freed memory stays in ASan's quarantine: RSS does not drop")
    """In a fresh process: in this one, memory other tests freed (torch, transformers) may
    still be resident in the C heap and be handed to the arena, so its RSS would not move."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _BLOCK_FREED], capture_output=True,
                            text=True, cwd=root, timeout=120)
    assert result.returncode == 0, result.stderr


def test_zeros():
    arena = Arena(4 * KIB, debug=True)
    z = arena.zeros((3, 5), np.float64)
    assert z.shape == (3, 5) and (z == 0).all()


def test_debug_poisons_on_creation_and_reset():
    arena = Arena(8 * KIB, debug=True)
    assert arena.debug
    fresh = arena.alloc((100,), np.float32)
    assert np.isnan(fresh).all()
    f32 = arena.alloc((64,), np.float32)
    f16 = arena.alloc((64,), np.float16)
    f64 = arena.alloc((64,), np.float64)
    ints = arena.alloc((64,), np.int32)
    for arr in (f32, f16, f64, ints):
        arr[:] = 1
    arena.reset()
    assert np.isnan(f32).all() and np.isnan(f16).all() and np.isnan(f64).all()
    assert (ints == -1).all()
    # also memory written through a stale view after a reset, beyond the newer allocations
    arena.alloc((4,), np.float32)
    f64[:] = 2.0
    arena.reset()
    assert np.isnan(f64).all()


def test_non_debug_reset_keeps_values():
    arena = Arena(4 * KIB)
    arr = arena.alloc((8,))
    arr[:] = 2.5
    arena.reset()
    assert (arr == 2.5).all()
    again = arena.alloc((8,))
    assert address(again) == address(arr)   # the same memory is handed out again


def test_arena_shared_by_python_threads_hands_out_disjoint_memory():
    threads, per_thread = 8, 1000
    arena = Arena(threads * per_thread * 64)
    arrays = [[] for _ in range(threads)]

    def worker(t):
        for i in range(per_thread):
            arr = arena.alloc((16,), np.int32)
            arr[:] = t * per_thread + i
            arrays[t].append(arr)

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    flat = [arr for per in arrays for arr in per]
    assert len({address(arr) for arr in flat}) == threads * per_thread
    assert arena.stats().allocation_count == threads * per_thread
    assert arena.stats().remaining == 0
    for t, per in enumerate(arrays):
        assert all((arr == t * per_thread + i).all() for i, arr in enumerate(per))


@pytest.mark.parametrize("capacity, error", [
    (-1, ValueError), (0, ValueError), (1.5, TypeError), ("10", TypeError), (None, TypeError),
    (True, TypeError), (1 << 62, MemoryError), (1 << 70, MemoryError),
])
def test_bad_capacity(capacity, error):
    with pytest.raises(error):
        Arena(capacity)


@pytest.mark.parametrize("shape, error", [
    ((-1,), ValueError), ((2.5,), TypeError), (2.5, TypeError), ((True,), TypeError),
    ((2, None), TypeError), ("abc", TypeError), (((2,),), TypeError), ((1,) * 33, ValueError),
    ((1 << 40, 1 << 40), ValueError), ((1 << 40,), ArenaExhausted), ((1 << 62,), ValueError),
    ((1 << 80,), ValueError),
    ((0, 1 << 62), ValueError), ((np.float32(2),), TypeError),
])
def test_bad_shapes(shape, error):
    arena = Arena(4 * KIB)
    before = arena.stats()
    with pytest.raises(error):
        arena.alloc(shape)
    assert arena.stats() == before
    assert arena.alloc((2,)).shape == (2,)


@pytest.mark.parametrize("dtype", [
    object, "O", np.dtype([("a", "O")]), "no such dtype", "U", "S", np.dtype(("f4", (2,))),
    3.5, *([np.dtypes.StringDType()] if hasattr(np.dtypes, "StringDType") else []),   # numpy 2
], ids=str)
def test_bad_dtypes(dtype):
    arena = Arena(4 * KIB)
    before = arena.stats()
    with pytest.raises(TypeError):
        arena.alloc((4,), dtype)
    assert arena.stats() == before


# ---------------------------------------------------------------------------------------
# BufferPool
# ---------------------------------------------------------------------------------------

def test_a_pool_holds_up_to_max_classes_and_pays_for_its_own():
    """72 classes (the defaults and every size a two-tier cache's cold groups can have); a
    pool's metadata is its own classes', not room for the most."""
    assert BufferPool.MAX_CLASSES == 72
    many = BufferPool(1, size_classes=[64 * (i + 1) for i in range(72)])
    with many.acquire(64 * 72) as buf:
        assert buf.capacity == 64 * 72
    assert len(many.stats().free_buffers) == 72
    with pytest.raises(ValueError, match="1 to 72 classes"):
        BufferPool(1, size_classes=[64 * (i + 1) for i in range(73)])
    one = BufferPool(1, size_classes=[64])
    assert one.metadata_bytes < BufferPool(1).metadata_bytes < many.metadata_bytes


def test_size_classes():
    assert BufferPool.SIZE_CLASSES == (1 * KIB, 4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB)
    pool = BufferPool()
    assert pool.max_buffers_per_class == 32
    for nbytes, capacity in [(0, 1 * KIB), (1, 1 * KIB), (1024, 1 * KIB), (1025, 4 * KIB),
                             (4096, 4 * KIB), (4097, 16 * KIB), (65537, 256 * KIB),
                             (256 * KIB, 256 * KIB)]:
        with pool.acquire(nbytes) as buf:
            assert (buf.nbytes, len(buf), buf.capacity) == (nbytes, nbytes, capacity)
            assert buf.address % ALIGN == 0
    with pytest.raises(ValueError, match="largest size class"):
        pool.acquire(256 * KIB + 1)


@settings(max_examples=200, deadline=None)
@given(nbytes=st.integers(0, 256 * KIB), dtype=st.sampled_from([np.uint8, np.float32, np.int64]))
def test_acquire_takes_the_smallest_class_that_fits(nbytes, dtype):
    pool = BufferPool()
    with pool.acquire(nbytes) as buf:
        fitting = [c for c in BufferPool.SIZE_CLASSES if c >= nbytes]
        assert buf.capacity == fitting[0] and buf.nbytes == nbytes
        assert buf.address % ALIGN == 0
        arr = buf.array(dtype=dtype)
        assert arr.shape == (nbytes // np.dtype(dtype).itemsize,)
        arr[...] = 7
        assert (buf.array(dtype=dtype) == 7).all()
        del arr
    assert pool.stats().returns == 1


def test_pool_accounting_hits_misses_returns_drops():
    pool = BufferPool(max_buffers_per_class=2)
    assert pool.stats() == PoolStats(0, 0, 0, 0, 0, 0, 0, (0,) * 5)
    bufs = [pool.acquire(1000) for _ in range(3)]
    s = pool.stats()
    assert (s.hits, s.misses, s.allocations, s.outstanding_bytes) == (0, 3, 3, 3 * KIB)
    addresses = {b.address for b in bufs}
    assert len(addresses) == 3
    for b in bufs:
        b.release()
    s = pool.stats()
    assert (s.returns, s.drops, s.pooled_bytes, s.outstanding_bytes) == (2, 1, 2 * KIB, 0)
    assert s.free_buffers == (2, 0, 0, 0, 0)
    again = pool.acquire(10)
    assert again.address in addresses
    s = pool.stats()
    assert (s.hits, s.misses, s.allocations, s.pooled_bytes) == (1, 3, 3, 1 * KIB)
    assert s.hit_rate == pytest.approx(0.25)
    other = pool.acquire(5000)                # another class: its own free list
    assert pool.stats().misses == 4
    other.release()
    again.release()
    assert pool.stats().free_buffers == (2, 0, 1, 0, 0)


def test_prewarm_and_clear():
    pool = BufferPool(max_buffers_per_class=4)
    assert pool.prewarm(4 * KIB, 3) == 3
    assert pool.prewarm(4 * KIB, 10) == 1     # capped at max_buffers_per_class
    s = pool.stats()
    assert (s.allocations, s.pooled_bytes, s.free_buffers[1]) == (4, 16 * KIB, 4)
    buf = pool.acquire(3000)
    assert pool.stats().hits == 1
    pool.clear()
    s = pool.stats()
    assert (s.pooled_bytes, s.free_buffers) == (0, (0,) * 5)
    buf.release()                              # buffers out during clear() still come back
    assert pool.stats().free_buffers[1] == 1
    with pytest.raises(ValueError):
        pool.prewarm(1000, 1)
    with pytest.raises(ValueError):
        pool.prewarm(4 * KIB, -1)
    with pytest.raises(TypeError):
        pool.prewarm(4 * KIB, 1.0)


def test_double_release_and_use_after_release_are_errors():
    pool = BufferPool()
    buf = pool.acquire(100)
    buf.release()
    with pytest.raises(ValueError, match="already released"):
        buf.release()
    assert buf.released and buf.address == 0
    with pytest.raises(ValueError):
        buf.array()
    with pytest.raises(ValueError):
        np.asarray(buf)
    with pytest.raises(ValueError):
        with buf:
            pass
    s = pool.stats()
    assert (s.returns, s.drops, s.free_buffers[0]) == (1, 0, 1)   # returned exactly once


def test_context_manager_and_garbage_collection_release():
    pool = BufferPool()
    with pool.acquire(100) as buf:
        assert not buf.released
    assert buf.released and pool.stats().returns == 1
    with pool.acquire(100) as buf:
        buf.release()                          # releasing inside the block is fine
    assert pool.stats().returns == 2
    buf = pool.acquire(100)
    del buf
    assert pool.stats().returns == 3 and pool.stats().outstanding_bytes == 0


def test_numpy_and_memoryview_views():
    pool = BufferPool()
    buf = pool.acquire(1000)
    mv = memoryview(buf.array())
    assert mv.nbytes == 1000 and not mv.readonly
    mv[:4] = b"abcd"
    arr = buf.array((10, 5), np.float32)       # 200 bytes
    assert arr.shape == (10, 5) and address(arr) == buf.address
    assert bytes(buf.array()[:4]) == b"abcd"
    assert buf.array(dtype=np.float64).shape == (125,)
    np.asarray(buf)[4:8] = 9
    assert bytes(mv[4:8]) == b"\t\t\t\t"
    assert np.asarray(buf, dtype=np.int16).shape == (1000,)     # converted: a copy
    with pytest.raises(ValueError, match="needs a copy"):
        np.asarray(buf, dtype=np.int16, copy=False)
    with pytest.raises(TypeError):
        memoryview(buf)           # no raw buffer protocol: see test_hardening.py
    with pytest.raises(ValueError, match="needs 1004 bytes"):
        buf.array((251,), np.float32)
    with pytest.raises(TypeError):
        buf.array((4,), object)
    with pytest.raises(TypeError):
        PooledBuffer()


def test_views_postpone_the_return_to_the_pool():
    pool = BufferPool()
    buf = pool.acquire(512)
    arr = buf.array((128,), np.float32)
    arr[:] = 4.0
    buf.release()                              # a view is alive: the memory stays out
    s = pool.stats()
    assert (s.returns, s.outstanding_bytes) == (0, 1 * KIB)
    other = pool.acquire(512)                  # so it cannot be handed out again
    assert other.address != address(arr)
    assert (arr == 4.0).all()
    del arr
    gc.collect()
    assert pool.stats().returns == 1 and pool.stats().outstanding_bytes == 1 * KIB
    other.release()
    # a memoryview of a view keeps the buffer object itself alive; it goes back when the
    # view ends
    buf = pool.acquire(512)
    mv = memoryview(buf.array())
    del buf
    assert pool.stats().returns == 2 and pool.stats().outstanding_bytes == 1 * KIB
    mv[0] = 1
    mv.release()
    assert pool.stats().returns == 3 and pool.stats().outstanding_bytes == 0


def test_buffers_keep_their_pool_alive():
    pool = BufferPool()
    buf = pool.acquire(100)
    stats = pool.stats
    del pool
    gc.collect()
    buf.array()[:] = 1
    buf.release()
    assert stats().returns == 1


@pytest.mark.parametrize("arg, error", [
    (-1, ValueError), (1.0, TypeError), ("8", TypeError), (None, TypeError), (True, TypeError),
    (1 << 62, ValueError), (1 << 80, ValueError),
])
def test_bad_acquire(arg, error):
    pool = BufferPool()
    with pytest.raises(error):
        pool.acquire(arg)
    assert pool.stats() == PoolStats(0, 0, 0, 0, 0, 0, 0, (0,) * 5)


@pytest.mark.parametrize("arg, error", [
    (-1, ValueError), (2.0, TypeError), (None, TypeError), (1 << 40, ValueError),
])
def test_bad_pool_size(arg, error):
    with pytest.raises(error):
        BufferPool(arg)


def test_zero_max_buffers_drops_everything():
    pool = BufferPool(0)
    pool.acquire(10).release()
    s = pool.stats()
    assert (s.returns, s.drops, s.pooled_bytes) == (0, 1, 0)
    assert pool.prewarm(1 * KIB, 3) == 0


def test_threads_never_lose_or_share_a_buffer():
    threads, iterations, held_max = 8, 10_000, 3
    pool = BufferPool(max_buffers_per_class=4)
    live = set()
    live_lock = threading.Lock()
    errors = []
    sizes = [100, 1000, 3000, 10_000, 50_000, 200_000]

    def worker(tid):
        rng = np.random.default_rng(tid)
        held = []
        try:
            for i in range(iterations):
                buf = pool.acquire(int(rng.choice(sizes)))
                tag = np.array([tid, i], dtype=np.int64)
                with live_lock:
                    assert buf.address not in live, "buffer handed out twice"
                    live.add(buf.address)
                buf.array((2,), np.int64)[:] = tag
                held.append((buf, tag))
                if len(held) > held_max or i == iterations - 1:
                    while held:
                        old, old_tag = held.pop(rng.integers(len(held)))
                        assert (old.array((2,), np.int64) == old_tag).all(), "buffer clobbered"
                        with live_lock:
                            live.remove(old.address)
                        old.release()
        except BaseException as exc:   # reported by the main thread
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors[0]
    s = pool.stats()
    total = threads * iterations
    assert s.hits + s.misses == total
    assert s.returns + s.drops == total
    assert s.allocations == s.misses
    assert s.outstanding_bytes == 0
    # every buffer ever allocated is either dropped (freed) or on a free list, exactly once
    assert s.allocations - s.drops == sum(s.free_buffers)
    assert all(n <= 4 for n in s.free_buffers)
    assert s.pooled_bytes == sum(n * c for n, c in zip(s.free_buffers, BufferPool.SIZE_CLASSES))
    drained = [pool.acquire(c) for c, n in zip(BufferPool.SIZE_CLASSES, s.free_buffers)
               for _ in range(n)]
    assert len({b.address for b in drained}) == len(drained)
    assert pool.stats().hits == s.hits + len(drained)


def test_pool_under_openmp_threads_without_the_gil():
    from ruvpy._memory import _hammer_pool
    pool = BufferPool(max_buffers_per_class=3)
    threads, iterations = 8, 100_000
    assert _hammer_pool(pool, threads, iterations) == 0
    s = pool.stats()
    total = 2 * threads * iterations
    assert s.hits + s.misses == total and s.returns + s.drops == total
    assert s.outstanding_bytes == 0 and s.allocations == s.misses
    assert s.allocations - s.drops == sum(s.free_buffers)
    drained = [pool.acquire(c) for c, n in zip(BufferPool.SIZE_CLASSES, s.free_buffers)
               for _ in range(n)]
    assert len({b.address for b in drained}) == len(drained)


# ---------------------------------------------------------------------------------------
# ScratchSpace
# ---------------------------------------------------------------------------------------

def test_scratch_regions_are_distinct_aligned_and_zeroed():
    scratch = ScratchSpace(1000, max_threads=4)
    assert (scratch.bytes_per_thread, scratch.max_threads, scratch.stride) == (1000, 4, 1024)
    assert scratch.nbytes == 4 * 1024
    views = [scratch.get(t) for t in range(4)]
    starts = [address(v) for v in views]
    assert all(s % ALIGN == 0 for s in starts)
    assert all(b - a >= 1000 for a, b in zip(starts, starts[1:]))
    assert all(v.shape == (1000,) and v.dtype == np.uint8 and (v == 0).all() for v in views)
    assert scratch.get(2, np.float32).shape == (250,)
    with pytest.raises(ValueError):
        scratch.get(4)
    with pytest.raises(ValueError):
        scratch.get(-1)
    with pytest.raises(TypeError):
        scratch.get(1.0)


def test_scratch_default_thread_count_and_threads_do_not_interfere():
    scratch = ScratchSpace(4096)
    assert scratch.max_threads == ruvpy._kernels.max_threads()
    scratch = ScratchSpace(4096, max_threads=8)
    barrier = threading.Barrier(8)
    errors = []

    def worker(t):
        region = scratch.get(t, np.int32)
        for round_ in range(200):
            region[:] = t * 1000 + round_
            if round_ % 50 == 0:
                barrier.wait()
            if not (region == t * 1000 + round_).all():
                errors.append(t)

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    view = scratch.get(3, np.int32)
    del scratch
    gc.collect()
    assert (view == 3199).all()


@pytest.mark.parametrize("args, error", [
    ((0,), ValueError), ((-5,), ValueError), ((10.0,), TypeError), ((100, 0), ValueError),
    ((100, 1 << 20), ValueError), ((1 << 62, 2), MemoryError), ((100, 2.0), TypeError),
])
def test_bad_scratch(args, error):
    with pytest.raises(error):
        ScratchSpace(*args)


# ---------------------------------------------------------------------------------------
# MemoryManager
# ---------------------------------------------------------------------------------------

def test_memory_manager_for_model_holds_one_step():
    hidden, vocab, batch = 576, 49152, 2
    mm = MemoryManager.for_model(hidden, vocab, batch, max_threads=2)
    expected = MemoryManager.arena_bytes_for(hidden, vocab, batch)
    assert expected == 2 * (16 * (batch * hidden * 4 + 64) + 2 * (batch * vocab * 4 + 64))
    assert mm.arena.capacity == align_up(expected)
    assert mm.scratch.bytes_per_thread == 4 * hidden * 4 and mm.scratch.max_threads == 2
    for step in range(3):
        # the documented working set, twice over (the headroom), fits in each step
        for _ in range(2):
            for _ in range(16):
                mm.arena.alloc((batch, hidden))
            for _ in range(2):
                mm.arena.alloc((batch, vocab))
        with pytest.raises(ArenaExhausted):
            mm.arena.alloc((batch, vocab))
        mm.reset_step()
        assert mm.arena.stats().used == 0
    with mm.pool.acquire(2000):
        s = mm.stats()
        assert s.arena.reset_count == 3 and s.pool.outstanding_bytes == 4 * KIB
        assert s.scratch_bytes == mm.scratch.nbytes
        assert s.reserved_bytes == (s.arena.capacity + s.pool.pooled_bytes +
                                    s.pool.outstanding_bytes + s.scratch_bytes)
    mm.close()
    assert mm.arena.closed


def test_memory_manager_options_and_small_models():
    mm = MemoryManager.for_model(8, 16, 1, debug=True, pool_buffers_per_class=1)
    assert mm.arena.debug and mm.pool.max_buffers_per_class == 1
    assert mm.scratch.bytes_per_thread == 4096   # floor for tiny models
    with MemoryManager(1000, 100, max_threads=1) as manual:
        assert manual.arena.capacity == 1024 and manual.scratch.max_threads == 1
    assert manual.arena.closed


@pytest.mark.parametrize("args, error", [
    ((0, 10, 1), ValueError), ((-1, 10, 1), ValueError), ((64, 10, 1.5), TypeError),
    ((64, "10", 1), TypeError), ((1 << 40, 1 << 40, 1 << 20), MemoryError),
])
def test_bad_memory_manager(args, error):
    with pytest.raises(error):
        MemoryManager.for_model(*args)
