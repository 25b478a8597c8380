"""TwoTierKVCache(cold="turbo") on K/V with outlier channels: the dense-and-sparse part of the
format (a few channels per head and group taken out of the rotation, kept at 8 bits). Attention
quality against a float64 reference, the estimators on the rest, token order, bytes from the
allocations, and imported blobs whose outlier part is malformed."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ruvpy import TwoTierKVCache

from _helpers import (cosine, outlier_kv, random_kv, reference_attention,
                      turbo_key_relative_error_bound, turbo_value_mse)
from _helpers import cache_snapshot as snapshot


def filled(kvh, d, k, v, **kw):
    cache = TwoTierKVCache(1, kvh, d, cold="turbo", max_tokens=len(k), **{"hot_tokens": 0, **kw})
    seq = cache.add_sequence()
    cache.append(seq, 0, k, v)
    return cache, seq


@pytest.mark.parametrize("H,kvh,d", [(16, 4, 128), (9, 3, 64)])
def test_quality_with_outlier_channels(isa, H, kvh, d):
    """x20 channels left in the rotation gave 0.46-0.59 cosine (every score off by the order of
    the whole key norm in a softmax those channels make peaked); taken out, TurboQuant codes
    Gaussian-like rest and the outliers keep 8 bits."""
    rng = np.random.default_rng(21)
    k, v = outlier_kv(rng, 2048, kvh, d)
    cache, seq = filled(kvh, d, k, v, hot_tokens=64)
    assert cache.stats().tiers["cold"]["tokens"] >= 1920
    q = rng.standard_normal((32, H, d)).astype(np.float32)
    out = cache.attention(seq, 0, q, causal=False)
    ref = reference_attention(q, k, v, causal=False)
    assert cosine(out, ref) >= 0.95
    rows = (out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert rows.min() >= 0.6          # was negative: rows whose softmax picked the wrong keys


@pytest.mark.parametrize("bits", [2.5, 3.5, 4.5])
def test_estimators_on_the_rest_and_outliers_at_8_bits(bits):
    """With the outlier channels out, the key inner products over the other channels are
    still unbiased (QJL) and the values keep the Lloyd-Max error of their bits; the outlier
    channels come back within their 8-bit step."""
    rng = np.random.default_rng(22)
    d, n = 128, 2048
    k, v = random_kv(rng, n, 1, d)
    ck, cv = rng.choice(d, 4, replace=False), rng.choice(d, 4, replace=False)
    k[:, :, ck] *= 20
    v[:, :, cv] *= 20
    cache, seq = filled(1, d, k, v, turbo_bits=bits)
    kk, vv = cache.get_kv(seq, 0)
    rest_k, rest_v = np.setdiff1d(np.arange(d), ck), np.setdiff1d(np.arange(d), cv)
    q = rng.standard_normal((200, d))
    q[:, ck] = 0                               # inner products over the rest only
    exact, estimate = k[:, 0] @ q.T, kk[:, 0] @ q.T
    assert abs((estimate * exact).mean() / (exact * exact).mean() - 1) < 0.02
    assert np.linalg.norm(estimate - exact) / np.linalg.norm(exact) < 1.05 * turbo_key_relative_error_bound(bits)
    vrel = np.linalg.norm(vv[:, :, rest_v] - v[:, :, rest_v]) / np.linalg.norm(v[:, :, rest_v])
    assert np.sqrt(turbo_value_mse(bits)) * 0.85 < vrel < np.sqrt(turbo_value_mse(bits)) * 1.1
    for x, got, chans in ((k, kk, ck), (v, vv, cv)):
        # 8 bits over a range of ~8 sigma of a x20 channel, plus the rest's quantization error
        # that lands on these channels (the keys' QJL term is noisy per coordinate)
        err = np.linalg.norm(got[:, :, chans] - x[:, :, chans]) / np.linalg.norm(x[:, :, chans])
        assert err < 0.05


@settings(max_examples=10, deadline=None)
@given(cuts=st.lists(st.integers(1, 149), max_size=6))
def test_order_preserved_with_outlier_channels(cuts):
    """Appended in any chunks, every token returned is nearest to the token appended at its
    position, across hot and cold, with outliers chosen per group."""
    rng = np.random.default_rng(23)
    k, v = outlier_kv(rng, 150, 2, 32, channels=2)
    cache = TwoTierKVCache(1, 2, 32, hot_tokens=5, migration_batch=16, cold="turbo", max_tokens=150)
    seq = cache.add_sequence()
    edges = [0, *sorted(set(cuts)), 150]
    for a, b in zip(edges, edges[1:]):
        cache.append(seq, 0, k[a:b], v[a:b])
    assert cache.stats().tiers["cold"]["tokens"] == 144
    for got, want in zip(cache.get_kv(seq, 0), (k, v)):
        got, want = got.reshape(150, -1).astype(np.float64), want.reshape(150, -1).astype(np.float64)
        sq_dist = (got ** 2).sum(1)[:, None] - 2 * got @ want.T + (want ** 2).sum(1)[None, :]
        assert np.array_equal(np.argmin(sq_dist, axis=1), np.arange(150))


@pytest.mark.parametrize("kvh,d", [(4, 128), (3, 64)])
def test_groups_with_outliers_cost_their_codes(kvh, d):
    """Bytes come from the allocations: a group whose heads have outliers is larger by their
    8-bit codes, channel numbers and binary16 scale / zero (plus allocation rounding)."""
    rng = np.random.default_rng(24)
    n, G = 1024, 64
    plain, _ = filled(kvh, d, *random_kv(rng, n, kvh, d))
    spiky, _ = filled(kvh, d, *outlier_kv(rng, n, kvh, d))
    a, b = plain.stats(), spiky.stats()
    assert a.cold_groups == b.cold_groups == n // G
    # the format: 4 K + 4 V channels per head, each G codes, its number, scale and zero
    sizes = [c.export_sequence(0)[1]["cold_sizes.0"] for c in (plain, spiky)]
    assert np.all(sizes[1] - sizes[0] == kvh * 8 * (G + 1 + 4))
    # the allocations (what stats count): those blobs rounded up to the 64-byte alignment
    extra = b.cold_bytes - a.cold_bytes
    assert abs(extra - (sizes[1] - sizes[0]).sum()) < 64 * b.cold_groups
    assert b.cold_bits_per_value - a.cold_bits_per_value == pytest.approx(8 * extra / (n * 2 * kvh * d))
    # random normal data has no channel with 3x the median RMS
    assert a.cold_bits_per_value - (3.5 + 3 * 16 / (2 * d)) < 0.1


def _segment(blob, kvh, h):
    off = np.frombuffer(blob[:4 * kvh].tobytes(), np.uint32)
    return int(off[h]), int(off[h + 1]) if h + 1 < kvh else len(blob)


def test_malformed_outlier_parts_are_rejected():
    """Imported blobs are checked: outlier counts within max(1, head_dim / 16), channel numbers
    ascending and below head_dim, every size consistent; a bad one leaves the cache as it was."""
    rng = np.random.default_rng(25)
    kvh, d, G = 2, 32, 16
    make = lambda: TwoTierKVCache(1, kvh, d, hot_tokens=0, migration_batch=G, cold="turbo", max_tokens=64)
    cache = make()
    seq = cache.add_sequence()
    cache.append(seq, 0, *random_kv(rng, G, kvh, d))        # a group without outliers,
    cache.append(seq, 0, *outlier_kv(rng, G, kvh, d, channels=2))   # one with 2 + 2 per head
    meta, arrays = cache.export_sequence(seq)
    sizes, blobs = arrays["cold_sizes.0"], arrays["cold.0"]
    fixed = (sizes[0] - 4 * kvh) // kvh - 2           # a segment's part before the counts
    assert sizes[1] - sizes[0] == kvh * (4 * (G + 1 + 4))
    other = make()
    ok = other.import_sequence(meta, arrays)
    assert all(np.array_equal(x, y) for x, y in zip(cache.get_kv(seq, 0), other.get_kv(ok, 0)))
    before = snapshot(other)
    second = blobs[sizes[0]:]
    start, _ = _segment(second, kvh, 1)
    counts, idx = start + fixed, start + fixed + 2
    assert list(second[counts:counts + 2]) == [2, 2]

    def broken(edit, new_sizes=None):
        blob = second.copy()
        edit(blob)
        return dict(arrays, **{"cold.0": np.concatenate([blobs[:sizes[0]], blob]),
                               "cold_sizes.0": np.array(new_sizes or list(sizes), np.int64)})

    def put(pos, *values):
        def edit(blob):
            blob[pos:pos + len(values)] = values
        return edit

    bad = {
        "too many key outliers": broken(put(counts, 3)),
        "fewer value outliers than stored": broken(put(counts + 1, 1)),
        "key channels not ascending": broken(put(idx, second[idx + 1], second[idx])),
        "key channel repeated": broken(put(idx, second[idx + 1])),
        "value channel past head_dim": broken(put(idx + 3, d)),
        "head offset": broken(put(4, second[4] + 2)),
        "sizes shifted between groups": dict(arrays, **{"cold_sizes.0": sizes + np.array([2, -2])}),
    }
    for what, arr in bad.items():
        with pytest.raises(ValueError, match="malformed"):
            other.import_sequence(meta, arr)
        assert snapshot(other) == before, what


def test_channels_far_from_zero_are_outliers_too():
    """Real keys have channels that sit far from zero on every token with an ordinary range:
    what the rotation spreads is their energy, so they are taken out like wide ones."""
    rng = np.random.default_rng(26)
    kvh, d, G = 2, 64, 64
    k, v = random_kv(rng, 4 * G, kvh, d)
    k[:, :, [5, 40]] += 12.0                 # offset channels: range as any other
    cache, seq = filled(kvh, d, k, v)
    plain, _ = filled(kvh, d, *random_kv(rng, 4 * G, kvh, d))
    sizes = [c.export_sequence(0)[1]["cold_sizes.0"] for c in (plain, cache)]
    assert np.all(sizes[1] - sizes[0] == kvh * 2 * (G + 1 + 4))   # 2 key channels per head
    kk, _ = cache.get_kv(seq, 0)
    q = rng.standard_normal((100, d))
    rel = np.linalg.norm(kk[:, 0] @ q.T - k[:, 0] @ q.T) / np.linalg.norm(k[:, 0] @ q.T)
    assert rel < 0.2           # left in (the range rule), the offsets made it ~0.29
