"""ruvpy.attention and the kernel table's attention block against a float64 numpy reference.

The reference runs on the very values the kernel was given (float16 K/V: the same float16
values), so every path is held to the float32 bound FP32_ATTENTION_BOUND (tests/_helpers.py,
next to the measured worst error it bounds)."""
import os
import subprocess
import sys
import textwrap
import threading
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import ruvpy
from ruvpy import _attention

from _helpers import (FP32_ATTENTION_BOUND, REPO, assert_attention_close, attention_error,
                      first_parallel_size, random_qkv, reference_attention, threads_chosen)

make = random_qkv


def check(out, q, k, v, causal=True, scale=None):
    """out against float64 attention over the same q, k, v within the float32 bound."""
    return assert_attention_close(out, q, k, v, causal, scale)


@st.composite
def problems(draw):
    """Shapes within the issue's ranges, bounded so the float64 reference stays quick."""
    d = draw(st.integers(1, 256))
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.integers(1, 8))
    causal = draw(st.booleans())
    budget = 6_000_000 // (d * kv_heads * group)          # q_len * kv_len budget
    kv_len = draw(st.integers(1, max(1, min(2000, budget))))
    q_max = min(300, max(1, budget // kv_len))
    if causal:
        q_max = min(q_max, kv_len)
    q_len = draw(st.one_of(st.just(1), st.integers(1, q_max)))
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    return q_len, kv_len, kv_heads * group, kv_heads, d, causal, dtype


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems(), seed=st.integers(0, 2**32 - 1))
def test_matches_reference(isa, problem, seed):
    q_len, kv_len, heads, kv_heads, d, causal, dtype = problem
    q, k, v = make(np.random.default_rng(seed), q_len, kv_len, heads, kv_heads, d, dtype)
    check(ruvpy.attention(q, k, v, causal=causal), q, k, v, causal)


@pytest.mark.parametrize("q_len,kv_len,heads,kv_heads,d", [
    (1, 4097, 32, 8, 128),   # decode, GQA group of 4 (streaming kernel, context splits)
    (1, 3000, 9, 3, 64),     # decode, 3 KV heads on 2 threads
    (1, 700, 32, 1, 64),     # MQA decode: 32 rows go to the tiled kernel
    (3, 500, 4, 2, 48),      # a few query tokens: streaming with causal rows
    (200, 260, 8, 2, 128),   # prefill with a cached prefix
    (70, 70, 3, 1, 80),      # partial tiles, group of 3
    (17, 1500, 2, 1, 256),   # few tiles, long context: tiled kernel with context splits
])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_model_shapes(isa, q_len, kv_len, heads, kv_heads, d, dtype):
    q, k, v = make(np.random.default_rng(q_len * 7 + d), q_len, kv_len, heads, kv_heads, d, dtype)
    for causal in (True, False):
        check(ruvpy.attention(q, k, v, causal=causal), q, k, v, causal)


@pytest.mark.parametrize("q_len,kv_len,heads,kv_heads,d", [
    (1, 5000, 9, 3, 64), (1, 3000, 8, 1, 128), (40, 900, 8, 2, 64), (5, 4000, 2, 1, 128)])
def test_thread_counts_agree(isa, two_threads, q_len, kv_len, heads, kv_heads, d):
    assert threads_chosen(q_len, kv_len, heads, kv_heads, d, np.float32) == 2
    q, k, v = make(np.random.default_rng(1), q_len, kv_len, heads, kv_heads, d)
    one, two = two_threads.one_and_two(lambda: ruvpy.attention(q, k, v))
    # the context-split merges add in another order: float32 rounding apart
    assert attention_error(one, two, v) <= FP32_ATTENTION_BOUND
    check(one, q, k, v)
    check(two, q, k, v)


def assert_threads_agree(two_threads, attend, expected_threads, v):
    """attend() on 1 and on 2 threads: bit for bit the same when the driver stays serial
    anyway, within float rounding of the context-split merges when it goes parallel."""
    one, two = two_threads.one_and_two(attend)
    if expected_threads == 1:
        assert np.array_equal(one, two)
    else:
        assert attention_error(one, two, v) <= FP32_ATTENTION_BOUND
    return two


def test_two_threads_start_a_second_os_thread():
    """In a fresh interpreter a call given two threads above the work threshold starts an
    OpenMP worker (one more OS thread), and a call on one thread does not: the thread count
    reaches the kernels, not only get_num_threads()."""
    code = textwrap.dedent("""
        import numpy as np, psutil, ruvpy
        rng = np.random.default_rng(0)
        q = rng.standard_normal((1, 8, 128)).astype(np.float32)
        k = rng.standard_normal((16384, 2, 128)).astype(np.float32)
        me = psutil.Process()
        ruvpy.set_num_threads(1)
        before = me.num_threads()
        ruvpy.attention(q, k, k)
        serial = me.num_threads()
        ruvpy.set_num_threads(2)
        assert ruvpy.get_num_threads() == 2
        ruvpy.attention(q, k, k)
        print(before, serial, me.num_threads())
    """)
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    before, serial, parallel = map(int, result.stdout.split())
    assert threads_chosen(1, 16384, 8, 2, 128, np.float32) == 2
    assert serial == before and parallel == before + 1


@pytest.mark.parametrize("prefill,heads,kv_heads,d,dtype", [
    (False, 9, 3, 64, np.float16),    # SmolLM2 decode (streaming kernel)
    (False, 32, 8, 128, np.float32),  # streaming, context splits
    (False, 16, 1, 64, np.float32),   # MQA decode: 16 rows go to the tiled kernel
    (True, 4, 2, 32, np.float32),     # causal prefill, q_len = kv_len (tiled)
])
def test_threads_agree_across_the_parallel_threshold(isa, two_threads, prefill, heads, kv_heads,
                                                     d, dtype):
    """Small calls run serially even when given 2 threads (a parallel region costs more than
    it saves); sizes just below and at the threshold give the same result either way."""
    def threads_at(n):
        return threads_chosen(n if prefill else 1, n, heads, kv_heads, d, dtype)

    first = first_parallel_size(threads_at)
    rng = np.random.default_rng(first)
    for n, expected in ((first - 1, 1), (first, 2)):
        assert threads_at(n) == expected
        q, k, v = make(rng, n if prefill else 1, n, heads, kv_heads, d, dtype)
        check(assert_threads_agree(two_threads, lambda: ruvpy.attention(q, k, v), expected, v),
              q, k, v)


def test_causal_offset_rule(isa):
    """Query i sits at kv_len - q_len + i: the last query sees everything (as non-causal), the
    first of a prefill over an empty cache only key 0 (so its output is v[0])."""
    q, k, v = make(np.random.default_rng(2), 33, 33, 4, 2, 16)
    causal = ruvpy.attention(q, k, v, causal=True)
    full = ruvpy.attention(q, k, v, causal=False)
    np.testing.assert_array_equal(causal[-1], full[-1])       # the same keys, the same sums
    np.testing.assert_array_equal(causal[0], v[0][[0, 0, 1, 1]])   # weight exactly 1 on key 0
    assert np.abs(causal[:-1] - full[:-1]).max() > 1e-3
    q2, k2, v2 = make(np.random.default_rng(3), 5, 40, 4, 2, 16)   # 35 cached tokens
    check(ruvpy.attention(q2, k2, v2, causal=True), q2, k2, v2, True)


@pytest.mark.parametrize("q_len", [1, 3, 80])
def test_large_logits_exact(isa, q_len):
    """Scores of +-1e4 (exact in float32) neither overflow nor underflow: ties average exactly,
    a unique maximum takes all the weight, an all -1e4 row is still a proper average."""
    d, kv_len = 16, 100
    rng = np.random.default_rng(4)
    k = np.sign(rng.standard_normal((kv_len, 1, d))).astype(np.float32)
    v = rng.standard_normal((kv_len, 1, d)).astype(np.float32)
    q = np.empty((q_len, 3, d), np.float32)
    q[:, 0] = 625.0 * k[7, 0]                 # score 1e4 at key 7, others <= 1e4 - 1250
    q[:, 1] = 0.0
    q[:, 1, 0] = 1e4                          # scores +-1e4: ties among the positive keys
    q[:, 2] = -625.0 * k[7, 0]                # score -1e4 at key 7
    for causal in (False, True):
        out = ruvpy.attention(q, k, v, causal=causal, scale=1.0)
        assert np.isfinite(out).all()
        check(out, q, k, v, causal, scale=1.0)
    out = ruvpy.attention(q, k, v, causal=False, scale=1.0)
    # exp(-1250) is 0 in float32: the maximum takes all the weight, bit for bit
    np.testing.assert_array_equal(out[:, 0], np.broadcast_to(v[7, 0], (q_len, d)))
    pos = k[:, 0, 0] > 0
    # the mean of ~50 ties: float32 sums of values |v| < 4 (measured <= 2.4e-7)
    np.testing.assert_allclose(out[:, 1], np.broadcast_to(v[pos, 0].mean(0), (q_len, d)),
                               rtol=0, atol=4 * FP32_ATTENTION_BOUND)
    uniform = ruvpy.attention(q, k, np.ones_like(v), causal=False, scale=-1.0)  # all near -1e4
    np.testing.assert_allclose(uniform, 1.0, rtol=0, atol=FP32_ATTENTION_BOUND)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_out_reuse_allocates_nothing(isa, dtype):
    q, k, v = make(np.random.default_rng(5), 1, 3000, 32, 8, 128, dtype)
    out = np.full(q.shape, np.nan, np.float32)
    assert ruvpy.attention(q, k, v, out=out) is out
    check(out, q, k, v)
    q2 = q[::-1].copy() * 2
    ruvpy.attention(q2, k, v, out=out)
    check(out, q2, k, v)
    held = _attention.scratch_bytes()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(20):
            ruvpy.attention(q, k, v, out=out)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < out.nbytes // 2, peak           # no output (or other array) allocated
    assert _attention.scratch_bytes() == held     # the cached scratch is reused, not regrown
    ruvpy.attention(q, k, v)                      # a fresh result when out is not given
    check(ruvpy.attention(q, k, v), q, k, v)


def test_in_place_on_q(isa):
    q, k, v = make(np.random.default_rng(6), 50, 50, 4, 2, 32)
    expect = reference_attention(q, k, v)
    ruvpy.attention(q, k, v, out=q)
    assert attention_error(q, expect, v) <= FP32_ATTENTION_BOUND


def test_non_contiguous_inputs(isa):
    rng = np.random.default_rng(7)
    q_len, kv_len, heads, kv_heads, d = 9, 120, 8, 2, 64
    qkv = rng.standard_normal((q_len, (heads + 2 * 4) * d)).astype(np.float32)
    q = qkv[:, :heads * d].reshape(q_len, heads, d)                 # fused projection: strided tokens
    cache = rng.standard_normal((kv_len + 8, 4, d)).astype(np.float16)
    k = cache[:kv_len, 1:3]                                          # a head slice of a bigger cache
    v = cache[8:, ::2]
    check(ruvpy.attention(q, k, v), q, k, v)
    kt = np.ascontiguousarray(np.transpose(k.astype(np.float32), (0, 2, 1))).transpose(0, 2, 1)
    check(ruvpy.attention(q, kt, v.astype(np.float32)), q, kt, v.astype(np.float32))  # last axis strided: copied
    check(ruvpy.attention(q, k[::-1], v[::-1]), q, k[::-1], v[::-1])               # negative strides
    for causal in (True, False):      # decode over the same views: the streaming kernel
        check(ruvpy.attention(q[-1:], k, v, causal=causal), q[-1:], k, v, causal)
        k32, v32 = cache.astype(np.float32)[:kv_len, ::3], cache.astype(np.float32)[8:, 1:3]
        check(ruvpy.attention(q[-1:], k32, v32, causal=causal), q[-1:], k32, v32, causal)
    out_big = np.zeros((q_len, heads, 2 * d), np.float32)
    out = out_big[:, :, :d]
    ruvpy.attention(q, k, v, out=out)
    check(out, q, k, v)
    assert not out_big[:, :, d:].any()


def test_bad_input():
    q, k, v = make(np.random.default_rng(8), 4, 10, 4, 2, 16)
    with pytest.raises(ValueError, match=r"k and v shapes differ.*\(10, 2, 16\).*\(9, 2, 16\)"):
        ruvpy.attention(q, k, v[:9])
    with pytest.raises(ValueError, match=r"head_dim differs.*\(4, 4, 16\).*\(10, 2, 8\)"):
        ruvpy.attention(q, k[..., :8].copy(), v[..., :8].copy())
    with pytest.raises(ValueError, match=r"multiple of num_kv_heads"):
        ruvpy.attention(q, k[:, :1].repeat(3, 1), v[:, :1].repeat(3, 1))
    with pytest.raises(ValueError, match=r"q_len <= kv_len.*\(4, 4, 16\).*\(3, 2, 16\)"):
        ruvpy.attention(q, k[:3], v[:3], causal=True)
    ruvpy.attention(q, k[:3], v[:3], causal=False)                 # fine without the mask
    with pytest.raises(ValueError, match=r"empty.*\(0, 2, 16\)"):
        ruvpy.attention(q, k[:0], v[:0], causal=False)
    with pytest.raises(ValueError, match=r"3-D"):
        ruvpy.attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"head_dim must be 1..256"):
        z = np.zeros((1, 1, 257), np.float32)
        ruvpy.attention(z, z, z)
    with pytest.raises(TypeError, match=r"q must be float32, got float64"):
        ruvpy.attention(q.astype(np.float64), k, v)
    with pytest.raises(TypeError, match=r"q must be float32, got float64"):
        ruvpy.attention(q.tolist(), k, v)       # no silent down-cast of float64 data
    with pytest.raises(TypeError, match=r"float32 or float16, got int32"):
        ruvpy.attention(q, k.astype(np.int32), v.astype(np.int32))
    with pytest.raises(TypeError, match=r"same dtype"):
        ruvpy.attention(q, k, v.astype(np.float16))
    with pytest.raises(TypeError, match=r"out must be float32, got float64"):
        ruvpy.attention(q, k, v, out=np.zeros(q.shape))
    with pytest.raises(ValueError, match=r"out has shape \(4, 4, 8\), expected .*\(4, 4, 16\)"):
        ruvpy.attention(q, k, v, out=np.zeros((4, 4, 8), np.float32))
    with pytest.raises(TypeError, match=r"out must be a numpy array"):
        ruvpy.attention(q, k, v, out=[0.0])
    ro = np.zeros(q.shape, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"read-only"):
        ruvpy.attention(q, k, v, out=ro)
    with pytest.raises(ValueError, match=r"contiguous last axis"):
        ruvpy.attention(q, k, v, out=np.zeros((16, 4, 4), np.float32).transpose(2, 1, 0))
    kv = np.zeros((10, 2, 16), np.float32)
    with pytest.raises(ValueError, match=r"overlaps k or v"):
        ruvpy.attention(np.zeros((10, 2, 16), np.float32), kv, kv, out=kv)
    with pytest.raises(ValueError, match=r"overlaps q"):
        ruvpy.attention(q, k, v, out=q[::-1])
    with pytest.raises(ValueError, match=r"finite"):
        ruvpy.attention(q, k, v, scale=float("nan"))
    out = np.zeros(q.shape, np.float32)
    assert ruvpy.attention(q[:0], k, v, out=out[:0]).shape == (0, 4, 16)


def test_concurrent_callers(isa):
    """Python threads calling at once (each with its own cached scratch) get correct results."""
    cases = [make(np.random.default_rng(10 + i), ql, kl, h, kh, d, dt)
             for i, (ql, kl, h, kh, d, dt) in enumerate([
                 (1, 2000, 8, 2, 64, np.float32), (64, 300, 4, 1, 32, np.float16),
                 (1, 900, 9, 3, 64, np.float16), (100, 100, 4, 4, 96, np.float32)])]
    expected = [reference_attention(*c) for c in cases]
    errors = []

    def work(i):
        try:
            out = np.empty(cases[i][0].shape, np.float32)
            for _ in range(6):
                ruvpy.attention(*cases[i], out=out)
                assert attention_error(out, expected[i], cases[i][2]) <= FP32_ATTENTION_BOUND
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i % len(cases),)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# ---- the kernel table's attention block, as a paged KV cache drives it ----

def paged(rng, kv_len, block, d, dtype):
    """K/V of one head in shuffled blocks of a pool, with their block table."""
    nb = (kv_len + block - 1) // block
    table = rng.permutation(nb + 3)[:nb]
    kp = rng.standard_normal((nb + 3, block, d)).astype(dtype)
    vp = rng.standard_normal((nb + 3, block, d)).astype(dtype)
    k = kp[table].reshape(-1, d)[:kv_len]
    v = vp[table].reshape(-1, d)[:kv_len]
    return kp, vp, table, k, v


@pytest.mark.parametrize("mode", ["spans", "chunks", "rows"])
@pytest.mark.parametrize("rows,kv_len,block,d,causal", [
    (4, 1000, 16, 128, False), (3, 77, 16, 64, True), (1, 300, 64, 5, False),
    (40, 530, 16, 96, True), (64, 129, 32, 33, True), (8, 64, 7, 16, True)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_kernel_block_on_paged_kv(isa, mode, rows, kv_len, block, d, causal, dtype):
    rng = np.random.default_rng(rows * 1000 + kv_len)
    kp, vp, table, k, v = paged(rng, kv_len, block, d, dtype)
    q = (rng.standard_normal((rows, d)) / np.sqrt(d)).astype(np.float32)
    visible = None
    if causal:  # rows = query tokens at the end of the sequence, one row each
        visible = np.minimum(kv_len, kv_len - rows + 1 + np.arange(rows)).clip(0)
    out = _attention._kernel_attend(q, kp, vp, table, kv_len, visible, mode)
    ref = reference_attention(q[:, None], k[:, None], v[:, None], causal=causal, scale=1.0)[:, 0]
    if visible is not None:
        ref[visible == 0] = 0.0
    assert attention_error(out, ref, v) <= FP32_ATTENTION_BOUND


def test_kernel_block_rows_that_see_nothing(isa):
    rng = np.random.default_rng(11)
    kp, vp, table, k, v = paged(rng, 50, 16, 32, np.float32)
    q = rng.standard_normal((6, 32)).astype(np.float32)
    visible = np.array([0, 1, 0, 17, 50, 0])
    for mode in ("spans", "chunks", "rows"):
        out = _attention._kernel_attend(q, kp, vp, table, 50, visible, mode)
        assert not out[visible == 0].any()
        np.testing.assert_array_equal(out[1], v[0])            # one visible key: its value row
        for r in (3, 4):
            ref = reference_attention(q[r][None, None], k[:visible[r], None],
                                      v[:visible[r], None], False, 1.0)
            assert attention_error(out[r], ref[0, 0], v) <= FP32_ATTENTION_BOUND


def test_stream_read_checksum():
    buf = np.arange(1 << 16, dtype=np.uint64)
    assert _attention._stream_read(buf, 2) == int(buf.sum())
    assert _attention._stream_read(buf[:5], 1) == 10
