"""Issue 13's defects, each reproduced: memory corruption from Python (pool views released
early, user code run between a check and the use of what it checked, a second __init__),
hangs from re-entering a cache, silent wrong results (out overlapping q, a scale that
overflows float32, a loaded position that disagrees with its tokens) and integer overflow
or loose types. Whatever could crash the process runs in a subprocess. Every refused call
must leave the caches, the arena and the sequences exactly as they were (snapshots).
(The two lost-data defects -- evictions surviving a rollback, a failed step exit wedging the
Runtime -- are covered in test_runtime.py and test_step_exit.py, and their tests here check
that they would have caught the old code.)"""
from __future__ import annotations

import gc
import json
import os
import struct
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import ruvpy
from ruvpy import BufferPool, PagedKVCache, TwoTierKVCache
from ruvpy.seqfile import SequenceFileError, decode_sequence, encode_sequence

from _helpers import (REPO, Evil, EvilCount, EvilId, assert_attention_close, cache_snapshot,
                      runtime_snapshot)

H, KVH, D = 4, 2, 16
CACHES = {
    "paged": lambda **kw: PagedKVCache(2, KVH, D, block_size=4, max_tokens=kw.get("max_tokens", 64)),
    "two-tier": lambda **kw: TwoTierKVCache(2, KVH, D, hot_tokens=4, migration_batch=4, group_size=8,
                                            cold="q8", max_tokens=kw.get("max_tokens", 64),
                                            policy=kw.get("policy", "error")),
}


def run_isolated(code):
    """Run `code` in a fresh interpreter importing this worktree's ruvpy; returns its stdout.
    A crash (segfault, abort) or a hang fails the test with what it printed."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (f"exit status {proc.returncode}\nstdout:\n{proc.stdout}\n"
                                  f"stderr:\n{proc.stderr[-3000:]}")
    return proc.stdout


def filled_cache(kind, rng, lengths=(6, 3), **kw):
    cache = CACHES[kind](**kw)
    for n in lengths:
        s = cache.add_sequence()
        for layer in range(cache.num_layers):
            k = rng.standard_normal((n, KVH, D)).astype(np.float32)
            cache.append(s, layer, k, -k)
    return cache


def qkv(rng, n, heads=H):
    return (rng.standard_normal((n, heads, D)).astype(np.float32),
            rng.standard_normal((n, KVH, D)).astype(np.float32),
            rng.standard_normal((n, KVH, D)).astype(np.float32))


# ---------------------------------------------------------------------------------------
# 1. memory corruption: pool views
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("make_view", ["array", "asarray"])
def test_a_pool_view_outlives_an_early_release_of_its_base(make_view):
    # Before: the view's base was a memoryview; releasing it let buf.release() give the
    # block back while the view still pointed into it, and the next acquire reused it.
    out = run_isolated(f"""
        import numpy as np
        from ruvpy import BufferPool
        pool = BufferPool()
        buf = pool.acquire(4096)
        x = buf.array((1024,), np.float32) if {make_view!r} == "array" else np.asarray(buf)
        x[:] = 7
        try:
            x.base.release()
        except (AttributeError, BufferError, TypeError, ValueError):
            pass
        buf.release()
        other = pool.acquire(4096)
        assert other.address != x.ctypes.data, "the view's block was handed out again"
        other.array()[:] = 0
        assert (x == 7).all()
        del x
        import gc; gc.collect()
        assert pool.stats().outstanding_bytes == 4096, pool.stats()   # only `other` is out
        print("ok")
    """)
    assert out.strip() == "ok"


def test_pool_views_have_bases_python_cannot_release():
    pool = BufferPool()
    buf = pool.acquire(1000)
    for view in (buf.array((10,), np.float32), np.asarray(buf), buf.array()):
        assert not isinstance(view.base, memoryview)
        assert not hasattr(view.base, "release")
        assert view.ctypes.data == buf.address
    buf.release()
    assert pool.stats().returns == 0          # the views still hold it
    del view
    gc.collect()
    assert pool.stats().returns == 1 and pool.stats().outstanding_bytes == 0


def test_a_shape_that_releases_the_buffer_gets_no_view():
    # the shape's conversion ran after the liveness check: releasing the buffer from it
    # produced a view over a NULL (or recycled) pointer
    out = run_isolated("""
        import numpy as np
        from ruvpy import BufferPool
        pool = BufferPool()
        buf = pool.acquire(4096)
        class Size(int):
            def __index__(self):
                buf.release()
                return int.__int__(self)
            __int__ = __index__
        try:
            x = buf.array((Size(16),), np.float32)
        except ValueError as exc:
            print("refused:", "released" in str(exc))
        else:
            x[:] = 1
            print("view made over", x.ctypes.data)
    """)
    assert out.strip() == "refused: True"


# ---------------------------------------------------------------------------------------
# 1. memory corruption: user code between validation and pointer use
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(CACHES))
def test_scale_and_causal_run_before_the_arrays_are_checked(kind):
    # S.__float__ shrinking `out` (or q) after its checks corrupted the heap: the
    # conversions now run first, so the shrunk arrays are what gets validated.
    out = run_isolated(f"""
        import numpy as np, ruvpy
        import test_hardening as th
        rng = np.random.default_rng(0)
        cache = th.filled_cache({kind!r}, rng)
        for target in ("out", "q"):
            for arg in ("scale", "causal"):
                q = rng.standard_normal((2, th.H, th.D)).astype(np.float32)
                out = np.empty_like(q)
                victim = out if target == "out" else q
                evil = th.Evil(0.25 if arg == "scale" else True,
                               lambda: victim.resize((1, 1, 1), refcheck=False))
                try:
                    cache.attention(0, 0, q, out=out, **{{arg: evil}})
                except ValueError as exc:
                    assert "shape" in str(exc), exc
                else:
                    raise AssertionError(f"{{target}} shrunk by {{arg}} was accepted")
        print("ok")
    """.replace("import test_hardening", "import sys; sys.path.insert(0, 'tests'); import test_hardening"))
    assert out.strip() == "ok"


@pytest.mark.parametrize("kind", sorted(CACHES))
def test_plan_attend_scale_runs_before_the_arrays(kind):
    out = run_isolated(f"""
        import sys; sys.path.insert(0, 'tests')
        import numpy as np
        import test_hardening as th
        rng = np.random.default_rng(1)
        cache = th.filled_cache({kind!r}, rng)
        for victim_name in ("q", "k", "v", "out"):
            plan = cache.plan([0], [2], num_heads=th.H)
            q, k, v = th.qkv(rng, 2)
            out = np.empty_like(q)
            victim = dict(q=q, k=k, v=v, out=out)[victim_name]
            evil = th.Evil(0.25, lambda: victim.resize((1, 1, 1), refcheck=False))
            before = cache.seq_len(0, 0)
            try:
                plan.attend(0, q, k, v, out=out, scale=evil)
            except ValueError:
                pass
            else:
                raise AssertionError(victim_name)
            assert cache.seq_len(0, 0) == before
        print("ok")
    """)
    assert out.strip() == "ok"


@pytest.mark.parametrize("kind", sorted(CACHES))
def test_array_subclasses_cannot_lie_about_their_shape(kind):
    # an ndarray subclass's Python-level .shape is not what C reads: the caches check the
    # arrays at C level (a subclass is viewed as a plain ndarray first)
    class Liar(np.ndarray):
        @property
        def shape(self):
            return (64, KVH, D)

    rng = np.random.default_rng(2)
    cache = filled_cache(kind, rng)
    k = rng.standard_normal((2, KVH, D)).astype(np.float32).view(Liar)
    cache.append(0, 0, k, k)                  # 2 rows, as the data says
    assert cache.seq_len(0, 0) == 6 + 2
    q = rng.standard_normal((1, H, D)).astype(np.float32).view(Liar)
    cache.attention(0, 0, q)


@pytest.mark.parametrize("kind", sorted(CACHES))
def test_ids_are_resolved_before_the_arrays(kind):
    rng = np.random.default_rng(3)
    cache = filled_cache(kind, rng)
    q = rng.standard_normal((2, H, D)).astype(np.float32)
    out = np.empty_like(q)
    EvilId.callback = lambda: out.resize((1, 1, 1), refcheck=False)
    with pytest.raises(ValueError, match="shape"):
        cache.attention(EvilId(0), 0, q, out=out)
    # an id whose conversion re-enters the cache: it is converted before the cache's lock is
    # taken, so the call it makes works (it used to be refused as a re-entry), and the append
    # then goes to the id's value
    assert cache.seq_len(1) > 0
    held = cache.seq_len(0)
    EvilId.callback = lambda: cache.free(1)
    cache.append(EvilId(0), 0, *qkv(rng, 1)[1:])
    assert EvilId.callback is None, "the id's conversion did not run"
    assert cache.sequences() == [0] and cache.seq_len(0) == held + 1


@pytest.mark.parametrize("kind", sorted(CACHES))
def test_import_fetches_every_array_before_checking_any(kind):
    rng = np.random.default_rng(4)
    cache = filled_cache(kind, rng)
    meta, arrays = cache.export_sequence(0)

    class Mapping(dict):
        def __getitem__(self, name):
            value = dict.__getitem__(self, name)
            # each fetch shrinks every array fetched before it: a check-then-fetch order
            # would see the old shapes and copy from shrunk buffers
            for earlier in fetched:
                try:
                    earlier.resize((0,), refcheck=False)
                except ValueError:
                    pass
            fetched.append(value)
            return value

    fetched = []
    before = cache_snapshot(cache)
    try:
        seq = cache.import_sequence(meta, Mapping({n: a.copy() for n, a in arrays.items()}))
    except ValueError:
        assert cache_snapshot(cache) == before
    else:
        assert cache.seq_len(seq, 0) == cache.seq_len(0, 0)


def test_kv_caches_refuse_a_second_init():
    for cls, kwargs in ((PagedKVCache, {}), (TwoTierKVCache, {"hot_tokens": 4, "migration_batch": 4})):
        cache = cls(1, 1, 8, max_tokens=16, **kwargs)
        s = cache.add_sequence()
        cache.append(s, 0, np.ones((3, 1, 8), np.float32), np.ones((3, 1, 8), np.float32))
        before = cache_snapshot(cache)
        with pytest.raises(RuntimeError, match="already initialized"):
            cache.__init__(4, 4, 64, max_tokens=1 << 20, **kwargs)
        with pytest.raises(RuntimeError, match="already initialized"):
            cache.__init__(1, 1, 8, max_tokens=-1, **kwargs)    # failing halfway: still refused
        assert (cache.num_layers, cache.num_kv_heads, cache.head_dim) == (1, 1, 8)
        assert cache_snapshot(cache) == before
        # a first __init__ that fails leaves the fields untouched and the cache unusable
        fresh = cls.__new__(cls)
        with pytest.raises(ValueError):
            fresh.__init__(3, 2, 8, max_tokens=16, **kwargs, **({"block_size": 0} if cls is PagedKVCache
                                                               else {"group_size": 0}))
        assert (fresh.num_layers, fresh.num_kv_heads, fresh.head_dim, fresh.max_tokens) == (0, 0, 0, 0)
        with pytest.raises(RuntimeError, match="closed"):
            fresh.add_sequence()
        fresh.__init__(1, 1, 8, max_tokens=16, **kwargs)     # then a good one works
        assert fresh.seq_len(fresh.add_sequence()) == 0


def test_runtime_refuses_a_second_init():
    cfg = ruvpy.RuntimeConfig(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, max_tokens=64)
    rt = ruvpy.Runtime(cfg)
    seq = rt.add_sequence()
    with pytest.raises(RuntimeError, match="already initialized"):
        rt.__init__(cfg)
    assert rt.sequences == [seq]
    rt.close()


# ---------------------------------------------------------------------------------------
# 3. hangs: re-entering a cache from a callback
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(CACHES))
def test_reentering_a_cache_raises_instead_of_deadlocking(kind):
    # Before: the cache's lock is not re-entrant and its wait ran without the GIL: the
    # callback blocked forever (the subprocess would time out).
    out = run_isolated(f"""
        import sys; sys.path.insert(0, 'tests')
        import numpy as np
        import test_hardening as th
        cache = th.filled_cache({kind!r}, np.random.default_rng(5))
        th.EvilCount.callback = lambda: cache.sequences()
        calls = [lambda n: cache.reserve([0], [n]), lambda n: cache.truncate(0, n),
                 lambda n: cache.plan([0], [n], num_heads=th.H),
                 lambda n: cache.scratch_for(th.H, [n], [n])]
        for call in calls:
            try:
                call(th.EvilCount(1))
            except RuntimeError as exc:
                assert "re-enter" in str(exc), exc
            else:
                pass   # converted before the lock was taken: no re-entry at all
        print(cache.sequences())
    """)
    assert out.strip() == "[0, 1]"


@pytest.mark.parametrize("kind", sorted(CACHES))
def test_reentering_a_cache_from_code_python_runs_inside_a_call_is_refused(kind):
    # arguments are converted before the lock: what can still run inside a call is code
    # Python itself runs there (a finalizer, a profile hook: here one stopping in the call's
    # kvstats part). Calling back into the cache from it raises instead of waiting forever.
    out = run_isolated(f"""
        import sys; sys.path.insert(0, 'tests')
        import numpy as np
        import test_hardening as th
        cache = th.filled_cache({kind!r}, np.random.default_rng(5))
        seen = []
        def hook(frame, event, arg):
            if event == "call" and not seen and frame.f_code.co_filename.endswith("kvstats.py"):
                try:
                    cache.sequences()
                except RuntimeError as exc:
                    seen.append("refused" if "re-entered" in str(exc) else str(exc))
                else:
                    seen.append("not refused")
        sys.setprofile(hook)
        try:
            cache.stats()
        finally:
            sys.setprofile(None)
        print(seen, cache.sequences())
    """)
    assert out.strip() == "['refused'] [0, 1]"


def test_a_thread_waiting_for_a_cache_can_be_interrupted():
    # the wait for another thread's call polls with the GIL for signals instead of blocking
    # uninterruptibly inside the lock
    out = run_isolated("""
        import sys; sys.path.insert(0, 'tests')
        import signal, threading, _thread, numpy as np
        import test_hardening as th
        # a process started in the background inherits SIGINT ignored, and then Python
        # installs no handler: interrupt_main() would do nothing
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from _helpers import HoldingCacheLock
        cache = th.filled_cache("paged", np.random.default_rng(6))
        with HoldingCacheLock(cache):
            threading.Timer(0.2, _thread.interrupt_main).start()
            try:
                cache.sequences()           # waits for the holder: Ctrl-C must get through
            except KeyboardInterrupt:
                print("interrupted")
        print(cache.sequences())
    """)
    assert out.split() == ["interrupted", "[0,", "1]"]


# ---------------------------------------------------------------------------------------
# 4. silent wrong results
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(CACHES))
def test_cache_attention_refuses_out_overlapping_q(kind):
    rng = np.random.default_rng(7)
    cache = filled_cache(kind, rng)
    block = rng.standard_normal(5 * H * D).astype(np.float32)
    q = block[:4 * H * D].reshape(4, H, D)
    shifted = block[D:D + 4 * H * D].reshape(4, H, D)     # q's memory, one head later
    before = cache_snapshot(cache)
    for out in (q[::-1], q[:, ::-1], shifted):
        with pytest.raises(ValueError, match="overlaps q"):
            cache.attention(0, 0, q, out=out)
    with pytest.raises(ValueError, match="overlaps q"):
        cache.append_attend(0, [1], [4], q, *qkv(rng, 4)[1:], out=q[::-1])
    with pytest.raises(ValueError, match="overlaps q"):
        cache.plan([1], [4], num_heads=H).attend(0, q, *qkv(rng, 4)[1:], out=q[:, ::-1])
    assert cache_snapshot(cache) == before
    # in place (out is q) is right; get_kv is exactly what is stored (fp16, and the two-tier
    # cache's 6 tokens are all still hot), so the float32 bound holds
    k, v = cache.get_kv(0, 0)
    ref = q.copy()
    cache.attention(0, 0, q, out=q, causal=False, threads=2)
    assert_attention_close(q, ref, k, v, causal=False)


def test_step_attention_refuses_out_overlapping_q():
    cfg = ruvpy.RuntimeConfig(num_layers=1, num_heads=H, num_kv_heads=KVH, head_dim=D, max_tokens=64)
    rng = np.random.default_rng(8)
    with ruvpy.Runtime(cfg) as rt:
        s = rt.add_sequence()
        before = runtime_snapshot(rt)
        with pytest.raises(ValueError, match="overlaps q"):
            with rt.step([s], [3]) as step:
                q, k, v = qkv(rng, 3)
                step.attention(0, q, k, v, out=q[::-1])
        assert runtime_snapshot(rt) == before


def _tiny_blocks(hidden=32, vocab=16):
    from ruvpy._linear import DecoderBlocks, QMatrix

    def qm(rows, cols):
        return QMatrix(np.full(rows * cols, 0.5, np.float32).view(np.uint8), "F32", rows, cols)
    return DecoderBlocks(hidden, 1, 1, 32, 32, 1e-5, 1e4, [], qm(vocab, hidden), qm(vocab, hidden),
                         np.ones(hidden, np.float32))


def _step_buffers(blocks, hidden=32):
    from ruvpy._linear import StepBuffers
    work = np.zeros(blocks.work_bytes(1) + 64, np.uint8)
    work = work[(-work.ctypes.data) & 63:][:blocks.work_bytes(1)]
    z = lambda *shape: np.zeros(shape, np.float32)
    return StepBuffers(blocks, 1, z(1, hidden), z(1, 1, 32), z(1, 1, 32), z(1, 1, 32), z(1, 1, 32),
                       z(2, 1, 16), work)


def test_decoder_blocks_refuse_a_second_init():
    """DecoderBlocks.__init__ called again replaced the kept matrices: failing, it left the
    old embedding in use but no longer kept alive (begin() read freed memory: a segfault);
    succeeding with a larger hidden size, StepBuffers checked against the first shape were
    written 2016 floats past their end. A second __init__ is refused, a failed first one
    leaves an object that refuses to run, and None is no DecoderBlocks or StepBuffers."""
    from ruvpy._linear import DecoderBlocks, StepBuffers
    blocks = _tiny_blocks()
    b = _step_buffers(blocks)
    with pytest.raises(RuntimeError, match="already initialized"):
        blocks.__init__(2048, 1, 1, 32, 32, 1e-5, 1e4, [], None, None, None)
    blocks.begin(b, [3], [0])                                   # still the first shape
    np.testing.assert_array_equal(b.x, np.full((1, 32), 0.5, np.float32))
    broken = DecoderBlocks.__new__(DecoderBlocks)
    with pytest.raises(ValueError, match="embedding"):
        broken.__init__(32, 1, 1, 32, 32, 1e-5, 1e4, [], "not a QMatrix", None, np.ones(32, np.float32))
    with pytest.raises(RuntimeError, match="did not complete"):
        _step_buffers(broken)
    with pytest.raises(RuntimeError, match="did not complete"):
        broken.begin(b, [3], [0])
    with pytest.raises(TypeError):
        StepBuffers(None, 1, *([None] * 7))
    with pytest.raises(TypeError):
        blocks.begin(None, [3], [0])


@pytest.mark.parametrize("kind", list(CACHES))
@pytest.mark.parametrize("order", [">", "<"])
def test_arrays_in_the_other_byte_order_are_refused_by_dtype(kind, order):
    """A '>f4' array has float32's type number; the fast checks compared only that, so a
    C-contiguous big-endian k, v, q or out was read (written) as little-endian floats:
    garbage K/V stored, garbage attention, no error. Contiguous or not, it is refused now,
    naming its dtype; the same values in native order still work."""
    rng = np.random.default_rng(9)
    cache = filled_cache(kind, rng)
    q, k, v = qkv(rng, 2)
    swapped = lambda a: a.astype(a.dtype.newbyteorder(order))     # same values
    if order == "<" and sys.byteorder == "little":                    # native: accepted
        cache.append_attend(0, [0], [2], swapped(q), swapped(k), swapped(v), out=swapped(q))
        return
    before = cache_snapshot(cache)
    for kk, vv in ((swapped(k), swapped(v)), (swapped(k.astype(np.float16)), swapped(v.astype(np.float16)))):
        with pytest.raises(TypeError, match="k must be float32 or float16, got >f"):
            cache.append(0, 0, kk, vv)
    with pytest.raises(TypeError, match="q must be float32, got >f4"):
        cache.attention(0, 0, swapped(q))
    with pytest.raises(TypeError, match="out must be a float32 numpy array, got >f4"):
        cache.attention(0, 0, q, out=swapped(np.empty_like(q)))
    with pytest.raises(TypeError, match="got >f"):
        cache.plan([0], [2], num_heads=H).attend(0, q, swapped(k), v)
    assert cache_snapshot(cache) == before
    cfg = ruvpy.RuntimeConfig(num_layers=1, num_heads=H, num_kv_heads=KVH, head_dim=D, max_tokens=64,
                              **({"kv_cache": "two-tier", "hot_tokens": 4, "migration_batch": 4}
                                 if kind == "two-tier" else {}))
    with ruvpy.Runtime(cfg) as rt:
        s = rt.add_sequence()
        before = runtime_snapshot(rt)
        with pytest.raises(TypeError, match=">f2"):
            with rt.step([s], [2]) as step:
                step.attention(0, q, swapped(k.astype(np.float16)), swapped(v.astype(np.float16)))
        assert runtime_snapshot(rt) == before


@pytest.mark.parametrize("scale", [1e300, -1e39, float("inf"), float("nan")])
def test_a_scale_overflowing_float32_is_refused(scale):
    rng = np.random.default_rng(9)
    cfg = ruvpy.RuntimeConfig(num_layers=1, num_heads=H, num_kv_heads=KVH, head_dim=D, max_tokens=64)
    for kind in sorted(CACHES):
        cache = filled_cache(kind, rng)
        before = cache_snapshot(cache)
        q, k, v = qkv(rng, 2)
        with pytest.raises(ValueError, match="scale"):
            cache.attention(0, 0, q, scale=scale)
        with pytest.raises(ValueError, match="scale"):
            cache.append_attend(0, [0], [2], q, k, v, scale=scale)
        with pytest.raises(ValueError, match="scale"):
            cache.plan([0], [2], num_heads=H).attend(0, q, k, v, scale=scale)
        assert cache_snapshot(cache) == before
    with pytest.raises(ValueError, match="scale"):
        ruvpy.attention(q, k, v, scale=scale)
    with ruvpy.Runtime(cfg) as rt:
        s = rt.add_sequence()
        before = runtime_snapshot(rt)
        with pytest.raises(ValueError, match="scale"):
            with rt.step([s], [2]) as step:
                step.attention(0, q, k, v, scale=scale)
        assert runtime_snapshot(rt) == before


def _saved(rt, seq, tmp_path, edit):
    """rt's snapshot of seq, its header edited by edit(header), re-encoded with a valid
    checksum."""
    header, arrays = decode_sequence(rt.export_sequence(seq))
    edit(header)
    path = tmp_path / "edited.seq"
    path.write_bytes(encode_sequence(header, arrays))
    return path


@pytest.mark.parametrize("kv_cache", ["paged", "two-tier"])
def test_load_checks_the_position_against_the_stored_tokens(kv_cache, tmp_path):
    cfg = ruvpy.RuntimeConfig(num_layers=2, num_heads=H, num_kv_heads=KVH, head_dim=D, max_tokens=256,
                              kv_cache=kv_cache)
    rng = np.random.default_rng(10)
    with ruvpy.Runtime(cfg) as rt:
        s = rt.add_sequence()
        with rt.step([s], [5]) as step:
            for layer in range(2):
                step.attention(layer, *qkv(rng, 5))
        before = runtime_snapshot(rt)
        bad = [4, -1, 2 ** 63, 2 ** 62 + 1, 5.0, True]
        if kv_cache == "paged":       # a paged cache never evicts: position == tokens held
            bad.append(6)
        for position in bad:
            path = _saved(rt, s, tmp_path, lambda h: h.update(position=position))
            with pytest.raises(SequenceFileError, match="position"):
                rt.load_sequence(path)
            assert runtime_snapshot(rt) == before
        # layers of different lengths are no committed state either
        path = _saved(rt, s, tmp_path, lambda h: h["meta"].update(lengths=[5, 4]))
        with pytest.raises(SequenceFileError):
            rt.load_sequence(path)
        assert runtime_snapshot(rt) == before
        good = rt.load_sequence(_saved(rt, s, tmp_path, lambda h: None))
        assert rt.position(good) == 5


# ---------------------------------------------------------------------------------------
# 5. integer overflow and loose types
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(CACHES))
def test_token_counts_are_checked_ints(kind):
    rng = np.random.default_rng(11)
    cache = filled_cache(kind, rng)
    before = cache_snapshot(cache)
    for n, error in ((2 ** 63 - 1, ValueError), (2 ** 64, ValueError), (2 ** 31, ValueError),
                     (-1, ValueError), ("5", TypeError), (2.9, TypeError), (5.0, TypeError),
                     (True, TypeError), (None, TypeError), (np.float64(2), TypeError)):
        with pytest.raises(error):
            cache.reserve([0], [n])
        with pytest.raises(error):
            cache.plan([0], [n], num_heads=H)
        with pytest.raises(error):
            cache.truncate(0, n)
        assert cache_snapshot(cache) == before
    cache.reserve([0], [np.int16(3)])        # numpy ints are ints


def test_runtime_token_counts_are_checked_ints():
    cfg = ruvpy.RuntimeConfig(num_layers=1, num_heads=H, num_kv_heads=KVH, head_dim=D, max_tokens=64)
    with ruvpy.Runtime(cfg) as rt:
        s = rt.add_sequence()
        before = runtime_snapshot(rt)
        for n, error in ((2 ** 64, ValueError), (2 ** 63 - 1, ValueError), ("5", TypeError),
                         (2.9, TypeError), (True, TypeError)):
            with pytest.raises(error):
                with rt.step([s], [n]):
                    pass
            if error is TypeError:
                with pytest.raises(error):
                    rt.truncate_sequence(s, n)
            else:
                rt.truncate_sequence(s, n)      # at or past the position: nothing to cut
            assert runtime_snapshot(rt) == before


def test_capacity_and_sizes_are_64_bit():
    cache = PagedKVCache(1, 1, 1, block_size=65536, max_tokens=2 ** 31, dtype="float16")
    assert cache.capacity_tokens == 2 ** 31
    cache.close()
    # sizes that overflow are refused, never reported as 0 or negative
    with pytest.raises(ValueError):
        PagedKVCache.bytes_per_token(2 ** 31 - 1, 2 ** 31 - 1, 256, block_size=2 ** 31 - 1)
    for heads in (2 ** 20, 2 ** 31 - 1):
        with pytest.raises(ValueError, match="cold group"):
            TwoTierKVCache.bytes_per_token(1, heads, 256)
        with pytest.raises(ValueError, match="cold group"):
            TwoTierKVCache(1, heads, 256, max_tokens=64)
    assert TwoTierKVCache.bytes_per_token(1, 8, 256) > 0


@pytest.mark.parametrize("max_tokens", [2 ** 63, 2 ** 64, 10 ** 30])
def test_huge_max_tokens_raise_value_error(max_tokens):
    for make in (lambda: PagedKVCache(1, 1, 8, max_tokens=max_tokens),
                 lambda: TwoTierKVCache(1, 1, 8, max_tokens=max_tokens),
                 lambda: ruvpy.RuntimeConfig(num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
                                             max_tokens=max_tokens),
                 lambda: ruvpy.RuntimeConfig(num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
                                             memory_budget=max_tokens)):
        with pytest.raises(ValueError):
            make()


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "1e400", "infG"])
def test_cli_memory_budget_rejects_non_finite_sizes(text):
    proc = subprocess.run([sys.executable, "-m", "ruvpy", "generate", "hi", f"--memory-budget={text}",
                           "--model", os.devnull], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr        # argparse's usage error, no traceback
    assert "Traceback" not in proc.stderr and "byte size" in proc.stderr


def _file_with_header(tmp_path, header, arrays=None):
    path = tmp_path / "crafted.seq"
    path.write_bytes(encode_sequence(header, arrays or {}))
    return path


def _in_arrays(header, old, new):
    """header with the first `old` inside its array directory replaced by `new`."""
    start = header.index('"arrays":')
    return header[:start] + header[start:].replace(old, new, 1)


def _reencode(data, edit_json):
    """A sequence file's bytes with its JSON header text edited and a valid checksum."""
    import hashlib
    pre = struct.Struct("<8sIIQQ")
    magic, version, reserved, hbytes, dbytes = pre.unpack_from(data)
    header = edit_json(data[pre.size:pre.size + hbytes].decode())
    head = pre.pack(magic, version, reserved, len(header), dbytes) + header.encode()
    start = (len(head) + 63) & ~63
    body = head + bytes(start - len(head)) + data[((pre.size + hbytes + 63) & ~63):-32]
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize("edit", [
    lambda h: h.replace('"shape":[', '"shape":[Infinity,', 1),
    lambda h: h.replace('"offset":0', '"offset":Infinity', 1),
    lambda h: h.replace('"offset":0', '"offset":-Infinity', 1),
    lambda h: h.replace('"nbytes":', '"nbytes":NaN,"x":', 1),
    lambda h: h.replace('"offset":0', '"offset":1e400', 1),
    lambda h: h.replace('"shape":[', '"shape":[' + "[" * 100000 + "]" * 100000 + ",", 1),
    lambda h: "[" * 100000 + "]" * 100000,
    lambda h: '{"a":' * 100000 + "1" + "}" * 100000,
    lambda h: h.replace('"shape":[', '"shape":[' + "9" * 5000 + ",", 1),
    lambda h: _in_arrays(h, '"dtype":"', '"dtype":{"names":["a"],"formats":["<f4"]},"y":"'),
    lambda h: _in_arrays(h, '"dtype":"', '"dtype":[["a","<f4",[2]]],"y":"'),
    lambda h: _in_arrays(h, '"dtype":"', '"dtype":"V8","y":"'),
    lambda h: _in_arrays(h, '"dtype":"', '"dtype":"(,)i4","y":"'),
    lambda h: _in_arrays(h, '"shape":[', '"shape":[2.5,'),
    lambda h: _in_arrays(h, '"shape":[', '"shape":[true,'),
    lambda h: _in_arrays(h, '"arrays":[', '"arrays":[7,'),
], ids=["inf-shape", "inf-offset", "-inf-offset", "nan-nbytes", "huge-float", "deep-shape",
        "deep-list", "deep-dict", "huge-int", "dict-dtype", "subarray-dtype", "void-dtype",
        "comma-dtype",
        "float-shape", "bool-shape", "entry-not-object"])
def test_crafted_sequence_files_raise_sequence_file_error(edit, tmp_path):
    cfg = ruvpy.RuntimeConfig(num_layers=1, num_heads=H, num_kv_heads=KVH, head_dim=D, max_tokens=64)
    rng = np.random.default_rng(12)
    with ruvpy.Runtime(cfg) as rt:
        s = rt.add_sequence()
        with rt.step([s], [3]) as step:
            step.attention(0, *qkv(rng, 3))
        data = _reencode(rt.export_sequence(s), edit)
        before = runtime_snapshot(rt)
        with pytest.raises(SequenceFileError):
            decode_sequence(data)
        with pytest.raises(SequenceFileError):
            rt.import_sequence(data)
        path = tmp_path / "crafted.seq"
        path.write_bytes(data)
        with pytest.raises(SequenceFileError):
            rt.load_sequence(path)
        assert runtime_snapshot(rt) == before


# ---------------------------------------------------------------------------------------
# 1. memory corruption: the kernel and matmul entry points (ruvpy._kernels, ruvpy._linear)
# ---------------------------------------------------------------------------------------

def test_matmul_accumulate_and_threads_run_before_out_is_checked():
    # accumulate's __bool__ ran after out's pointer was taken: shrinking out there made the
    # product write past the new block. threads' __int__ was asked twice (the check saw 2,
    # the team size the second answer).
    out = run_isolated("""
        import numpy as np
        import sys; sys.path.insert(0, 'tests')
        from _helpers import Evil
        from ruvpy._linear import QMatrix
        w = np.arange(64 * 256, dtype=np.float32).reshape(64, 256) / 1e4
        m = QMatrix(w.view(np.uint8).reshape(-1), "F32", 64, 256)
        x = np.ones((8, 256), np.float32)
        out = np.zeros((8, 64), np.float32)
        try:
            m.matmul(x, out=out, accumulate=Evil(True, lambda: out.resize((1, 1), refcheck=False)))
        except ValueError as exc:
            assert "out must be" in str(exc), exc
        else:
            raise AssertionError("out shrunk by accumulate.__bool__ was accepted")

        class Shifty(int):
            def __int__(self):
                return -5
        try:
            m.matmul(x, threads=Shifty(2))
        except ValueError as exc:
            assert "threads" in str(exc), exc
        else:
            raise AssertionError("a thread count whose __int__ says -5 was accepted")
        print("ok")
    """)
    assert out.strip() == "ok"


def test_matmul_out_subclass_cannot_lie_about_its_shape_or_layout():
    from ruvpy._linear import QMatrix

    class Liar(np.ndarray):
        @property
        def shape(self):
            return (8, 64)

        @property
        def flags(self):
            return np.ones((8, 64), np.float32).flags

    w = (np.arange(64 * 256, dtype=np.float32).reshape(64, 256) % 7) / 7
    m = QMatrix(w.view(np.uint8).reshape(-1), "F32", 64, 256)
    x = np.ones((8, 256), np.float32)
    for bad in (np.zeros((1, 64), np.float32), np.zeros((64, 8), np.float32).T):
        with pytest.raises(ValueError, match="out must be"):
            m.matmul(x, out=bad.view(Liar))
    good = np.zeros((8, 64), np.float32).view(Liar)
    assert m.matmul(x, out=good) is good
    np.testing.assert_allclose(good.view(np.ndarray), x.astype(np.float64) @ w.T.astype(np.float64),
                               rtol=1e-6)


def test_rmsnorm_eps_and_array_conversions_run_before_the_arrays_are_viewed():
    out = run_isolated("""
        import numpy as np
        import sys; sys.path.insert(0, 'tests')
        from _helpers import Evil
        from ruvpy import _linear, _kernels
        # eps's __float__ shrinking x: x is converted after it, so what is normed is the
        # shrunk x (before: its old, freed block)
        x = np.ones((64, 256), np.float32)
        got = _linear.rmsnorm(x, eps=Evil(1e-5, lambda: x.resize((1, 256), refcheck=False)))
        assert got.shape == (1, 256), got.shape
        np.testing.assert_allclose(got, 1 / np.sqrt(1 + 1e-5), rtol=1e-6)

        class Shrinks:             # converting it shrinks the array given before it
            def __init__(self, victim, n):
                self.victim, self.n = victim, n
            def __array__(self, dtype=None, copy=None):
                self.victim.resize((self.n,), refcheck=False)
                return np.ones(self.n, np.float32)
        a = np.ones(1 << 16, np.float32)
        assert _kernels.dot(a, Shrinks(a, 16)) == 16.0
        y = np.ones(1 << 16, np.float32)
        try:
            _kernels.axpy(2.0, Shrinks(y, 32), y)
        except ValueError:
            raise AssertionError("y shrunk to 32 and x of 32 must agree")
        assert y.shape == (32,) and np.all(y == 3.0), y
        c = np.ones(64, np.float32)
        got = _linear.rope_pairs(np.ones((2, 128), np.float32), c, Shrinks(c, 64))
        assert got.shape == (2, 128)
        print("ok")
    """)
    assert out.strip() == "ok"


def test_in_place_kernels_update_a_subclass_through_its_memory():
    # _kernels.axpy / scale asked a subclass's Python-level reshape / flags for the buffer to
    # update: one returning another array left y unchanged
    from ruvpy import _kernels

    class Elsewhere(np.ndarray):
        def reshape(self, *shape, **kw):
            return np.zeros(self.size, np.float32)

    y = np.ones(100, np.float32).view(Elsewhere)
    _kernels.axpy(2.0, np.ones(100, np.float32), y)
    np.testing.assert_array_equal(y.view(np.ndarray), 3.0)
    _kernels.scale(0.5, y)
    np.testing.assert_array_equal(y.view(np.ndarray), 1.5)
    strided = np.ones((10, 20), np.float32)[:, ::2].view(Elsewhere)
    _kernels.scale(4.0, strided)
    np.testing.assert_array_equal(strided.view(np.ndarray), 4.0)


class LyingInt(int):
    """An int whose comparisons lie: every `<` and `>` false, `>=` true, `<=` true past 1000."""

    def __lt__(self, other):
        return False

    def __gt__(self, other):
        return False

    def __le__(self, other):
        return other > 1000

    def __ge__(self, other):
        return True


@pytest.mark.parametrize("value", [-1, 0])
def test_a_lying_int_subclass_is_checked_by_its_value(value):
    """Sizes are compared as exact ints: -1 and 0 dressed as an int subclass whose comparisons
    lie are refused with the value named (they used to reach the C helper's error marker
    without an exception: SystemError)."""
    with pytest.raises(ValueError, match=f"got {value}"):
        ruvpy.PagedKVCache(LyingInt(value), 2, 16, max_tokens=64)


@pytest.mark.parametrize("scale", ["1", b"1", bytearray(b"1")])
def test_a_string_scale_is_refused_not_parsed(scale):
    """float("1") is 1.0: a scale given as text is a TypeError on every attention entry."""
    rng = np.random.default_rng(0)
    k, v = (rng.standard_normal((4, 2, 16)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((1, 4, 16)).astype(np.float32)
    with pytest.raises(TypeError, match="scale"):
        ruvpy.attention(q, k, v, scale=scale)
    cache = ruvpy.PagedKVCache(1, 2, 16, max_tokens=64)
    seq = cache.add_sequence()
    cache.append(seq, 0, k, v)
    with pytest.raises(TypeError, match="scale"):
        cache.attention(seq, 0, q, scale=scale)
    with ruvpy.Runtime(ruvpy.RuntimeConfig(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                                           max_tokens=64)) as rt:
        s = rt.add_sequence()
        with pytest.raises(TypeError, match="scale"):
            with rt.step([s], [1]) as step:
                step.attention(0, q, k[:1], v[:1], scale=scale)
        assert rt.position(s) == 0 and rt.seq_len(s) == 0


@pytest.mark.parametrize("field", ["num_layers", "max_tokens", "threads", "max_sequences", "block_size",
                                   "hot_tokens", "arena_bytes", "scratch_bytes_per_thread",
                                   "pool_buffers_per_class"])
def test_a_lying_int_config_field_is_checked_and_stored_by_its_value(field):
    """RuntimeConfig compares and stores sizes as exact ints: -1 dressed as a lying int
    subclass is refused at once (it used to pass the config, and max_sequences=-1 or
    scratch_bytes_per_thread=-1 even built a Runtime), and an accepted one is stored as int."""
    base = dict(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_tokens=64)
    with pytest.raises(ValueError, match=f"RuntimeConfig.{field} must be"):
        ruvpy.RuntimeConfig(**{**base, field: LyingInt(-1)})
    cfg = ruvpy.RuntimeConfig(**{**base, field: LyingInt(8)})
    assert type(getattr(cfg, field)) is int and getattr(cfg, field) == 8


def test_a_lying_int_token_count_is_checked_by_its_value():
    """A step's token count 0 as a lying int subclass is refused like 0 (it ran a 0-token
    step), and nothing changes."""
    with ruvpy.Runtime(ruvpy.RuntimeConfig(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                                           max_tokens=64)) as rt:
        a, b = rt.add_sequence(), rt.add_sequence()
        with pytest.raises(ValueError, match=">= 1, got 0"):
            rt.step([a, b], [LyingInt(0), 2])
        assert rt.position(a) == rt.position(b) == 0 and rt.stats().steps == 0
