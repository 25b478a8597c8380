"""cache.plan(...): one step's attention planned once, each layer one call. Against float64
attention over the cache's own K/V (get_kv), on every ISA path: mixed prefill and decode
sequences, strided queries and outputs (a fused QKV projection's slices), what a layer call
re-checks (arrays, lengths changed behind the plan's back, sequences gone), the scratch a
plan works in, and bad input that changes nothing."""
import json

import numpy as np
import pytest
from _helpers import assert_attention_close

from ruvpy import PagedKVCache, Runtime, RuntimeConfig, ScratchSpace, TwoTierKVCache

H, KVH, D = 8, 2, 32


def make(kind):
    if kind == "paged":
        return PagedKVCache(3, KVH, D, block_size=8, max_tokens=4096)
    return TwoTierKVCache(3, KVH, D, hot_tokens=16, migration_batch=16, cold=kind, max_tokens=4096)


def snapshot(cache):
    state = {"stats": json.dumps(cache.stats().as_dict(), sort_keys=True, default=str), "nbytes": cache.nbytes}
    for seq in cache.sequences():
        state[seq] = [tuple(a.tobytes() for a in cache.get_kv(seq, layer)) for layer in range(3)]
    return state


def fused(rng, n):
    """q, k, v as slices of one [n, H + 2 KVH, D] projection: strided tokens."""
    qkv = rng.standard_normal((n, H + 2 * KVH, D), dtype=np.float32)
    return qkv[:, :H], np.ascontiguousarray(qkv[:, H:H + KVH]), np.ascontiguousarray(qkv[:, H + KVH:])


@pytest.mark.parametrize("kind", ["paged", "q8", "q4", "turbo"])
def test_a_plan_attends_every_layer_like_the_reference(isa, kind):
    rng = np.random.default_rng(0)
    cache = make(kind)
    a, b, c = cache.add_sequence(), cache.add_sequence(), cache.add_sequence()
    for layer in range(3):
        cache.append(a, layer, *fused(rng, 70)[1:])
        cache.append(b, layer, *fused(rng, 5)[1:])
    counts = [1, 9, 30]                 # decode, a short prefill, a first prefill
    plan = cache.plan([a, b, c], counts, num_heads=H)
    assert plan.num_tokens == 40 and plan.seqs == (a, b, c) and plan.n_tokens == (1, 9, 30)
    for layer in range(3):
        q, k, v = fused(rng, 40)
        out = np.empty((40, 2 * H, D), np.float32)[:, ::2]        # strided output too
        assert plan.attend(layer, q, k, v, out=out) is out
        offsets = np.cumsum([0] + counts)
        for i, s in enumerate((a, b, c)):
            rows = slice(offsets[i], offsets[i + 1])
            # fp16 K/V and quantized tiers: the reference runs over the same stored K/V
            assert_attention_close(out[rows], q[rows], *cache.get_kv(s, layer))
    assert [cache.seq_len(s, 2) for s in (a, b, c)] == [71, 14, 30]


def test_a_layer_call_rechecks_what_can_change():
    rng = np.random.default_rng(1)
    cache = make("paged")
    a, b = cache.add_sequence(), cache.add_sequence()
    plan = cache.plan([a, b], [2, 1], num_heads=H)
    q, k, v = fused(rng, 3)
    plan.attend(0, q, k, v)
    # appended behind the plan's back in layer 1: that layer is re-planned for its lengths
    cache.append(a, 1, *fused(rng, 5)[1:])
    out = plan.attend(1, q, k, v)
    assert_attention_close(out[:2], q[:2], *cache.get_kv(a, 1))
    before = snapshot(cache)
    for args, error, words in (((3, q, k, v), ValueError, "out of range"),
                               ((2, q[:2], k[:2], v[:2]), ValueError, "add up"),
                               ((2, q, k.astype(np.float64), v), TypeError, "float32 or float16"),
                               ((2.0, q, k, v), TypeError, "layer")):
        with pytest.raises(error, match=words):
            plan.attend(*args)
    with pytest.raises(ValueError, match="overlaps q"):
        plan.attend(2, q, k, v, out=q[::-1])
    buf = np.zeros(3 * H * D + 3 * KVH * D - 16, np.float32)
    out = buf[:3 * H * D].reshape(3, H, D)
    kk = buf[-3 * KVH * D:].reshape(3, KVH, D)         # its first rows are out's last
    with pytest.raises(ValueError, match="overlaps k"):
        plan.attend(2, q, kk, v, out=out)
    assert snapshot(cache) == before
    qq = q.copy()
    assert plan.attend(2, qq, k, v, out=qq) is qq          # in place is fine
    cache.free(b)
    with pytest.raises(KeyError, match="gone"):
        plan.attend(0, q, k, v)


def test_plan_arguments_are_checked_before_anything():
    cache = make("q4")
    a = cache.add_sequence()
    before = snapshot(cache)
    for kwargs, error in ((dict(seqs=[a, 99], n_tokens=[1, 1]), KeyError),
                          (dict(seqs=[a, a], n_tokens=[1, 1]), ValueError),
                          (dict(seqs=[a], n_tokens=[-1]), ValueError),
                          (dict(seqs=[a], n_tokens=[1.5]), TypeError),
                          (dict(seqs=[a], n_tokens=[1, 2]), ValueError),
                          (dict(seqs=[a], n_tokens=[1], num_heads=3), ValueError),
                          (dict(seqs=[a], n_tokens=[1], threads=0), ValueError)):
        kwargs.setdefault("num_heads", H)
        with pytest.raises(error):
            cache.plan(**kwargs)
    assert snapshot(cache) == before


def test_a_plan_runs_in_the_scratch_it_is_given(isa):
    rng = np.random.default_rng(2)
    cache = make("paged")
    a = cache.add_sequence()
    for layer in range(3):
        cache.append(a, layer, *fused(rng, 3000)[1:])
    plan = cache.plan([a], [1], num_heads=H, threads=2)
    shared, per_thread, team = plan.scratch_needed
    assert team == plan.team and cache.scratch_for(H, [1], [3001], threads=2) == plan.scratch_needed
    with pytest.raises(ValueError, match="smaller"):
        plan.use_scratch(ScratchSpace(max(64, per_thread // 2), max_threads=team, shared_bytes=shared))
    scratch = ScratchSpace(per_thread, max_threads=team, shared_bytes=shared)
    plan.use_scratch(scratch)
    q, k, v = fused(rng, 1)
    out = plan.attend(0, q, k, v)
    assert_attention_close(out, q, *cache.get_kv(a, 0))
    assert np.any(scratch.get(0, np.float32) != 0)      # the work happened there


def test_caches_and_steps_take_strided_queries(isa):
    rng = np.random.default_rng(3)
    cache = make("q4")
    a = cache.add_sequence()
    cache.append(a, 0, *fused(rng, 50)[1:])
    q = fused(rng, 4)[0]
    assert not q.flags.c_contiguous
    assert_attention_close(cache.attention(a, 0, q), q, *cache.get_kv(a, 0))
    cfg = RuntimeConfig(num_layers=2, num_heads=H, num_kv_heads=KVH, head_dim=D, max_tokens=256)
    with Runtime(cfg) as rt:
        s = rt.add_sequence()
        with rt.step([s], [6]) as step:
            for layer in range(2):
                q, k, v = fused(rng, 6)
                out = step.attention(layer, q, k, v)
                assert_attention_close(out, q, k.astype(np.float16), v.astype(np.float16))
