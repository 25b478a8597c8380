"""TurboQuant code widths per layer (turbo_widths) and the planner that picks them
(ruvpy.kvplan): each layer's groups are the format as tests/turbo_format.py reads it at that
layer's widths, attention on every ISA is the codes' attention, sizes and allocations follow
each layer, exports carry the widths, bad widths are refused with nothing changed, and a
Runtime keeps a pool class per size."""
import numpy as np
import pytest

import ruvpy
from ruvpy import Runtime, RuntimeConfig, TwoTierKVCache
from ruvpy.seqfile import SequenceFileError

import turbo_format as tf
from _helpers import random_kv
from _helpers import cache_snapshot as snapshot

# per layer: every width the format has at least once, fractions on both sides, at D = 64
WIDTHS_64 = [(2.0, 4.0), (3.25, 2.75), (4.0, 3.5), (3.75, 3.0), (2.5, 2.25)]
# D = 128 (head_dim 128, and 80 padded to it): steps of 0.125
WIDTHS_128 = [(3.125, 2.875), (2.0, 2.0), (4.0, 4.0)]


def filled(widths, kvh, d, G, n, rng, hot_tokens=0, **kw):
    cache = TwoTierKVCache(len(widths), kvh, d, hot_tokens=hot_tokens, migration_batch=G, cold="turbo",
                           max_tokens=n, turbo_widths=widths, **kw)
    seq = cache.add_sequence()
    data = []
    for layer in range(len(widths)):
        k, v = random_kv(rng, n, kvh, d)
        k += rng.standard_normal(d).astype(np.float32) * 3          # an offset: the mean is used
        cache.append(seq, layer, k, v)
        data.append((k, v))
    return cache, seq, data


@pytest.mark.parametrize("widths,kvh,d,G", [(WIDTHS_64, 3, 64, 64), (WIDTHS_64, 2, 40, 16),
                                            (WIDTHS_128, 2, 128, 32), (WIDTHS_128, 1, 80, 20)])
def test_each_layer_is_the_format_at_its_widths(widths, kvh, d, G):
    """Every layer's cold groups, read by tests/turbo_format.py from the exported bytes at
    that layer's widths, are what get_kv returns, and each is that layer's size."""
    rng = np.random.default_rng(d + G)
    n = 3 * G + 5
    cache, seq, data = filled(widths, kvh, d, G, n, rng)
    meta, arrays = cache.export_sequence(seq)
    assert meta["turbo_widths"] == [list(w) for w in widths]
    for layer, w in enumerate(widths):
        sizes, blobs = arrays[f"cold_sizes.{layer}"], arrays[f"cold.{layer}"]
        size = kvh * tf.segment_layout(d, G, w)["size"]
        assert list(sizes) == [size] * 3
        kk, vv = cache.get_kv(seq, layer)
        for g in range(3):
            rk, rv = tf.decode_blob(blobs[g * size:(g + 1) * size], kvh, d, G, w)
            for got, want in ((kk, rk), (vv, rv)):
                assert np.abs(got[g * G:(g + 1) * G] - want).max() <= 1e-5 * np.abs(want).max()
        assert np.array_equal(vv[3 * G:], data[layer][1][3 * G:].astype(np.float16).astype(np.float32))
    # the widths given are the widths the layers have: the uniform rate's own, per layer, is
    # the uniform cache, byte for byte
    uniform = tf.widths(3.5, d, G)
    D = tf.padded_dim(d)
    as_pair = ((2 + (uniform[0] + uniform[1]) / D), (2 + (uniform[2] + uniform[3]) / D))
    same, seq2, _ = filled([as_pair], kvh, d, G, n, np.random.default_rng(d + G))
    plain = TwoTierKVCache(1, kvh, d, hot_tokens=0, migration_batch=G, cold="turbo", max_tokens=n)
    s = plain.add_sequence()
    plain.append(s, 0, *data[0])
    same_arrays = same.export_sequence(seq2)[1]
    assert np.array_equal(same_arrays["cold.0"], plain.export_sequence(s)[1]["cold.0"])


@pytest.mark.parametrize("widths,H,kvh,d,G", [(WIDTHS_64, 9, 3, 64, 64), (WIDTHS_128, 4, 2, 128, 32)])
def test_attention_is_each_layers_codes_attention(isa, widths, H, kvh, d, G):
    """Decode, prefill and non-causal attention of every layer equal float64 attention over
    that layer's codes at its widths (turbo_format.kernel_reference), on every ISA."""
    rng = np.random.default_rng(7 + d)
    n = 3 * G + 9
    cache, seq, _ = filled(widths, kvh, d, G, n, rng, hot_tokens=5)
    for layer in range(len(widths)):
        for q_len, causal in ((1, True), (6, True), (3, False)):
            q = (rng.standard_normal((q_len, H, d)) * 2).astype(np.float32)
            out = cache.attention(seq, layer, q, causal=causal)
            ref, bound = tf.kernel_reference(cache, seq, layer, q, causal=causal,
                                             value_weights_8bit=isa in tf.VALUE_WEIGHTS_8BIT_TABLES)
            err = np.abs(out - ref).max(-1)
            assert np.all(err <= bound), (layer, q_len, float((err / bound).max()))


def test_sizes_and_allocations_follow_each_layer():
    """bytes_per_token is the layers' groups together, group_bytes_max the largest,
    layer_group_bytes_max each; a cache on its own slabs gives every group a block of its own
    size, so the bits per value from allocations are the layers' formula's."""
    kvh, d, G, L = 3, 64, 64, len(WIDTHS_64)
    kw = dict(cold="turbo", migration_batch=G, turbo_widths=WIDTHS_64)
    per_layer = TwoTierKVCache.layer_group_bytes_max(L, kvh, d, **kw)
    sizes = [kvh * tf.segment_layout(d, G, w)["size"] for w in WIDTHS_64]
    assert len(set(per_layer)) == len(set(sizes)) > 1
    assert all(a >= s + 64 for a, s in zip(per_layer, sizes))           # header + blob, aligned
    assert TwoTierKVCache.bytes_per_token(L, kvh, d, **kw) == sum(per_layer) / G
    assert TwoTierKVCache.group_bytes_max(L, kvh, d, **kw) == max(per_layer)
    # large enough for slabs
    n = 20 * 1024
    assert TwoTierKVCache.uses_slabs(L, kvh, d, max_tokens=n, **kw)
    cache = TwoTierKVCache(L, kvh, d, hot_tokens=0, max_tokens=n, **kw)
    seq = cache.add_sequence()
    rng = np.random.default_rng(3)
    for layer in range(L):
        cache.append(seq, layer, *random_kv(rng, 10 * G, kvh, d))
    stats = cache.stats()
    assert stats.cold_bytes == stats.slab_cold_bytes == 10 * sum(per_layer)
    want_bits = 8 * 10 * sum(per_layer) / (10 * G * L * 2 * kvh * d)
    assert stats.cold_bits_per_value == pytest.approx(want_bits, rel=1e-12)
    cache.close()


def test_export_import_keeps_the_widths_and_refuses_others():
    """Export -> import -> export is byte-identical with the widths; an export loads only into
    a cache of the same widths (a uniform cache, other widths, and the other way round are
    refused naming turbo_widths), leaving it as it was."""
    rng = np.random.default_rng(11)
    kvh, d, G = 3, 64, 64
    make = lambda widths: TwoTierKVCache(len(WIDTHS_64), kvh, d, hot_tokens=16, migration_batch=G,
                                         cold="turbo", max_tokens=800, turbo_widths=widths)

    def exported(widths, n):
        cache = make(widths)
        seq = cache.add_sequence()
        for layer in range(len(WIDTHS_64)):
            cache.append(seq, layer, *random_kv(rng, n, kvh, d))
        return cache, seq, *cache.export_sequence(seq)

    cache, seq, meta, arrays = exported(WIDTHS_64, 300)
    other = make(WIDTHS_64)
    b = other.import_sequence(meta, arrays)
    meta2, arrays2 = other.export_sequence(b)
    assert meta2 == meta and all(np.array_equal(arrays[k], arrays2[k]) for k in arrays)
    q = rng.standard_normal((1, 9, d)).astype(np.float32)
    for layer in range(len(WIDTHS_64)):
        assert np.array_equal(cache.attention(seq, layer, q), other.attention(b, layer, q))
    swapped = list(WIDTHS_64)
    swapped[1] = (3.5, 2.5)          # a layer of the same size, other widths
    assert (TwoTierKVCache.layer_group_bytes_max(5, kvh, d, cold="turbo", turbo_widths=swapped)
            == TwoTierKVCache.layer_group_bytes_max(5, kvh, d, cold="turbo", turbo_widths=WIDTHS_64))
    for target in (make(None), make(swapped)):
        before = snapshot(target)
        with pytest.raises(ValueError, match="turbo_widths"):
            target.import_sequence(meta, arrays)
        assert snapshot(target) == before
    _, _, pmeta, parrays = exported(None, 200)
    before = snapshot(other)
    with pytest.raises(ValueError, match="turbo_widths"):
        other.import_sequence(pmeta, parrays)
    assert snapshot(other) == before
    # an export without the field (older, uniform) still loads into a uniform cache
    older = {k: v for k, v in pmeta.items() if k != "turbo_widths"}
    make(None).import_sequence(older, parrays)


class Sneaky(float):
    def __float__(self):
        raise RuntimeError("ran")


@pytest.mark.parametrize("widths,error", [
    ([(3.75, 3.0)] * 4, ValueError),                 # 4 layers for 5
    ("3.5", TypeError),
    (3.5, TypeError),
    ([(3.75, 3.0)] * 4 + [(3.75,)], TypeError),
    ([(3.75, 3.0)] * 4 + [(3.75, 3.0, 3.0)], TypeError),
    ([(3.75, 3.0)] * 4 + [("3.75", 3.0)], TypeError),
    ([(3.75, 3.0)] * 4 + [(True, 3.0)], TypeError),
    ([(3.75, 3.0)] * 4 + [(None, 3.0)], TypeError),
    ([(3.75, 3.0)] * 4 + [(3.1, 3.0)], ValueError),  # not a step of 0.25 at head_dim 64
    ([(3.75, 3.0)] * 4 + [(4.25, 3.0)], ValueError),
    ([(3.75, 3.0)] * 4 + [(1.75, 3.0)], ValueError),
    ([(3.75, 3.0)] * 4 + [(float("nan"), 3.0)], ValueError),
    ([(3.75, 3.0)] * 4 + [(3.75, float("inf"))], ValueError),
    ([(3.75, 3.0)] * 4 + [(Sneaky(3.0), 3.0)], RuntimeError),
])
def test_bad_widths_are_refused(widths, error):
    """Wrong counts, shapes, types and widths the format does not have raise before anything
    is built; so do widths for a cold format other than turbo. (A float subclass whose
    __float__ raises: its exception, nothing built.)"""
    with pytest.raises(error):
        TwoTierKVCache(5, 3, 64, cold="turbo", max_tokens=256, turbo_widths=widths)
    with pytest.raises(error):
        TwoTierKVCache.bytes_per_token(5, 3, 64, cold="turbo", turbo_widths=widths)
    with pytest.raises(error, match="RuntimeConfig|ran"):
        RuntimeConfig(num_layers=5, num_heads=9, num_kv_heads=3, head_dim=64, kv_cache="turbo",
                      turbo_widths=widths)


def test_widths_are_read_once_from_the_callers_objects():
    """A number whose __float__ edits its own row, or answers differently each time, cannot
    make the cache read past its widths or report widths other than the ones it was built
    with (found by review: the row was iterated live after its length was checked, and the
    widths were checked a second time after the C cache existed)."""
    class Shrink(float):
        def __float__(self):
            if len(self.row) == 2:
                self.row.pop()
            return 3.0

    s = Shrink(3.0)
    row = [s, 2.0]
    s.row = row
    cache = TwoTierKVCache(1, 1, 64, max_tokens=256, cold="turbo", turbo_widths=[row])
    assert cache.turbo_widths == ((3.0, 2.0),) and row == [s]
    cache.close()

    class Fickle(float):
        calls = 0

        def __float__(self):
            Fickle.calls += 1
            return 2.0 if Fickle.calls == 1 else 4.0

    rng = np.random.default_rng(9)
    cache = TwoTierKVCache(1, 1, 64, hot_tokens=0, max_tokens=256, cold="turbo", turbo_widths=[(Fickle(2.0), 2.0)])
    assert Fickle.calls == 1 and cache.turbo_widths == ((2.0, 2.0),)
    seq = cache.add_sequence()
    cache.append(seq, 0, *random_kv(rng, 128, 1, 64))
    meta, arrays = cache.export_sequence(seq)
    assert meta["turbo_widths"] == [[2.0, 2.0]]
    same = TwoTierKVCache(1, 1, 64, hot_tokens=0, max_tokens=256, cold="turbo", turbo_widths=[(2.0, 2.0)])
    same.import_sequence(meta, arrays)


@pytest.mark.parametrize("widths,error,words", [
    ([[10 ** 400, 3.0]], ValueError, "turbo_widths\\[0\\]"),
    (np.array(3.0), TypeError, "turbo_widths must be a sequence"),
    (np.zeros((1, 2, 2)), TypeError, "turbo_widths must be a sequence"),
])
def test_odd_widths_are_refused_by_name(widths, error, words):
    with pytest.raises(error, match=words):
        TwoTierKVCache(1, 1, 64, max_tokens=256, cold="turbo", turbo_widths=widths)
    with pytest.raises(error, match="RuntimeConfig"):
        RuntimeConfig(num_layers=1, num_heads=1, num_kv_heads=1, head_dim=64, kv_cache="turbo",
                      turbo_widths=widths)


def test_widths_need_the_turbo_format():
    with pytest.raises(ValueError, match="cold='turbo'"):
        TwoTierKVCache(2, 3, 64, cold="q4", max_tokens=256, turbo_widths=[(3.75, 3.0)] * 2)
    with pytest.raises(ValueError, match="turbo_widths"):
        RuntimeConfig(num_layers=2, num_heads=9, num_kv_heads=3, head_dim=64, kv_cache="two-tier",
                      turbo_widths=[(3.75, 3.0)] * 2)
    # a numpy array of pairs is a sequence of pairs; the config keeps exact floats
    cfg = RuntimeConfig(num_layers=2, num_heads=9, num_kv_heads=3, head_dim=64, kv_cache="turbo",
                        turbo_widths=np.array([[4, 3.5], [2, 2.25]]))
    assert cfg.turbo_widths == ((4.0, 3.5), (2.0, 2.25))
    assert hash(cfg) == hash(cfg)


def stepped(rt, n, rng):
    """A new sequence of rt given n tokens of random Q/K/V in every layer, in one step."""
    cfg = rt.config
    seq = rt.add_sequence()
    with rt.step([seq], [n]) as step:
        for layer in range(cfg.num_layers):
            step.attention(layer, rng.standard_normal((n, cfg.num_heads, cfg.head_dim)).astype(np.float32),
                           *random_kv(rng, n, cfg.num_kv_heads, cfg.head_dim))
    return seq


def test_a_runtime_keeps_a_pool_class_per_group_size():
    """A Runtime whose cold groups come from its pool keeps a class for each layer size,
    prewarmed with the capacity's groups of those layers; its memory report counts the free
    ones as KV; save/load keeps the widths and refuses a runtime without them."""
    widths = [(4.0, 3.5), (3.0, 3.0), (4.0, 3.5)]
    cfg = RuntimeConfig(num_layers=3, num_heads=9, num_kv_heads=3, head_dim=64, kv_cache="turbo",
                        max_tokens=512, hot_tokens=32, turbo_widths=widths)
    rt = Runtime(cfg)
    assert not rt._sizing.cold_slabs
    sizes = sorted({-(-b // 64) * 64 for b in rt._sizing.layer_group_bytes})
    assert rt._cold_classes == tuple(sizes) and len(sizes) == 2
    groups_per_layer = rt._sizing.cold_groups // 3
    free = dict(zip(rt._pool.size_classes, rt._pool.stats().free_buffers))
    assert free[sizes[0]] >= groups_per_layer and free[sizes[1]] >= 2 * groups_per_layer
    seq = stepped(rt, 200, np.random.default_rng(5))
    st = rt.cache.stats()
    assert st.pooled_cold_bytes == st.cold_bytes == 2 * (sizes[0] + 2 * sizes[1])
    reserved = sum(int(f) * s for s, f in zip(rt._pool.size_classes, rt._pool.stats().free_buffers)
                   if s in sizes)
    assert rt.memory_bytes()["kv"] == st.bytes + reserved
    data = rt.export_sequence(seq)
    back = rt.import_sequence(data)
    for layer in range(3):
        assert all(np.array_equal(x, y) for x, y in zip(rt.cache.get_kv(back, layer), rt.cache.get_kv(seq, layer)))
    other = Runtime(RuntimeConfig(num_layers=3, num_heads=9, num_kv_heads=3, head_dim=64, kv_cache="turbo",
                                  max_tokens=512, hot_tokens=32))
    before = other.stats().kv["tokens"]
    with pytest.raises(SequenceFileError, match="turbo_widths"):
        other.import_sequence(data)
    assert other.stats().kv["tokens"] == before
    rt.close()
    other.close()


def test_a_runtime_with_every_group_size_keeps_a_class_for_each():
    """Widths of 17 different sizes (every key + value sum at head_dim 64) in a Runtime whose
    cold groups come from its pool: a class each beside the five defaults (found by review:
    the pool allowed 8 classes, and such a Runtime could not be built), every group in its own
    size's class."""
    widths = [(2.0 + i / 4, 2.0) if i <= 8 else (4.0, 2.0 + (i - 8) / 4) for i in range(17)]
    cfg = RuntimeConfig(num_layers=17, num_heads=3, num_kv_heads=1, head_dim=64, kv_cache="turbo",
                        max_tokens=256, hot_tokens=16, turbo_widths=widths)
    rt = Runtime(cfg)
    assert not rt._sizing.cold_slabs and len(rt._cold_classes) == 17
    stepped(rt, 100, np.random.default_rng(4))
    st = rt.cache.stats()
    assert st.cold_bytes == sum(rt._cold_classes)          # one group per layer, each its own size
    rt.close()
