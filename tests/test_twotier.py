"""TwoTierKVCache: token order across migration, attention over quantized codes against a
float64 reference, quality of q8/q4 on K/V with outlier channels, bytes from allocations,
eviction, transactions, forks, export/import and bad input."""
import gc
import json
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ruvpy import KVCacheFull, PagedKVCache, TwoTierKVCache

from _helpers import (CODES_EVALUATION_ORDER_BOUND, COLD_LEVELS, FP32_ATTENTION_BOUND, as_stored_fp16,
                      assert_attention_close, assert_cache_attention_close, attention_error, cosine, heap_bytes_in_use, indexed_kv, outlier_kv,
                      assert_q4_close, q4_int_values, q4_kernel_reference, q4_kernel_reference_bound, quantization_bound,
                      random_kv, reference_attention, turbo_mse)
import turbo_format
from _helpers import cache_snapshot as snapshot

# what malloc adds beyond the bytes requested (chunk headers, alignment) and the binding's
# Python objects: measured up to 12 KiB for caches of 0.4 MiB
HEAP_SLACK = 16 * 1024


@pytest.mark.parametrize("cold", ["q8", "q4"])
def test_order_preserved_across_migration(cold):
    rng = np.random.default_rng(0)
    cache = TwoTierKVCache(2, 2, 16, hot_tokens=10, migration_batch=8, cold=cold, max_tokens=1000)
    seq = cache.add_sequence()
    total = 0
    for n in (1, 7, 3, 20, 1, 1, 40, 5):
        for layer in range(2):
            cache.append(seq, layer, *indexed_kv(total, n, 2, 16, rng))
        total += n
        st = cache.stats()
        assert st.tiers["cold"]["tokens"] + st.tiers["hot"]["tokens"] == total
        assert 10 <= st.tiers["hot"]["tokens"] < 18 or total < 18
        for layer in range(2):
            _, v = cache.get_kv(seq, layer)
            assert np.array_equal(v[:, 0, 0], np.arange(total)), (n, layer)
    assert cache.stats().tiers["cold"]["tokens"] == 64      # 78 tokens: 14 stay hot


@pytest.mark.parametrize("cold", ["q8", "q4", "turbo"])
def test_attention_over_codes_equals_attention_over_their_values(isa, cold):
    """The kernel reads the codes in place; it must compute exactly attention over what the
    codes decode to (get_kv), for decode, causal prefill and GQA, across tiers."""
    rng = np.random.default_rng(1)
    kvh, H, d = 2, 6, 40
    cache = TwoTierKVCache(1, kvh, d, hot_tokens=24, migration_batch=16, group_size=16, cold=cold,
                           max_tokens=600)
    seq = cache.add_sequence()
    k, v = outlier_kv(rng, 333, kvh, d)
    cache.append(seq, 0, k[:100], v[:100])
    cache.append(seq, 0, k[100:], v[100:])
    kk, vv = cache.get_kv(seq, 0)
    for q_len, causal in ((1, True), (7, True), (333, True), (4, False)):
        q = rng.standard_normal((q_len, H, d)).astype(np.float32)
        out = cache.attention(seq, 0, q, causal=causal)
        if cold == "turbo":
            ref, bound = turbo_format.kernel_reference(cache, seq, 0, q, causal=causal)
            assert np.all(np.abs(out - ref).max(-1) <= bound)
            continue
        # q4 scores with int8 query weights per 16 channels: its reference does the same
        if cold == "q4":
            assert_q4_close(out, *q4_kernel_reference_bound(cache, seq, 0, q, causal), vv)
            continue
        err = attention_error(out, reference_attention(q, kk, vv, causal), vv)
        assert err <= CODES_EVALUATION_ORDER_BOUND


@pytest.mark.parametrize("cold,bound", [("q8", 0.999), ("q4", 0.99)])
def test_quality_with_outlier_channels(cold, bound):
    rng = np.random.default_rng(2)
    kvh, H, d = 4, 16, 128
    cache = TwoTierKVCache(1, kvh, d, hot_tokens=64, cold=cold, max_tokens=4096)
    seq = cache.add_sequence()
    k, v = outlier_kv(rng, 2048, kvh, d)
    cache.append(seq, 0, k, v)
    assert cache.stats().tiers["cold"]["tokens"] >= 1920       # nearly all of it quantized
    q = rng.standard_normal((32, H, d)).astype(np.float32)
    out = cache.attention(seq, 0, q, causal=False)
    assert cosine(out, reference_attention(q, k, v, causal=False)) >= bound


@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("d,group_size", [(128, 32), (64, 32), (128, 16), (128, 64), (256, 32), (128, 48),
                                          (64, 16), (40, 16), (96, 32)])
def test_q4_value_sums_against_their_reference(isa, d, group_size, outliers):
    """q4 values over codes: with avx512vnni and avx2, they are summed with 8-bit weights (quant_impl.h
    qk_values_int), and outlier value channels' lanes replaced by float sums (qk_outlier_values); every
    table stays within the reference's bound, which is 0 in the outlier channels. Channel
    groups of different ranges and offsets (short of the outlier ratio, so only the chosen
    channels are outliers): a lane read with another group's weights or zero, or channels
    permuted, is off by a large fraction of max|v|; an outlier lane summed with 8-bit or
    scaled weights, or with its group's zero, is off by far more than the float bound."""
    rng = np.random.default_rng(d * 1000 + group_size + outliers)
    kvh, G = 2, 40                                   # groups of 40 tokens: blocks not multiples of 16
    for rows in (1, 2, 3, 4):
        H = kvh * rows
        cache = TwoTierKVCache(1, kvh, d, hot_tokens=24, migration_batch=G, group_size=group_size, cold="q4",
                               max_tokens=800)
        seq = cache.add_sequence()
        k, v = random_kv(rng, 333, kvh, d)
        grp = np.arange(d) // group_size
        v *= np.array([1.0, 1.6, 1.2, 2.0])[grp % 4]          # per-group ranges
        v += np.array([0.0, 6.0, -4.0, 2.0])[grp % 4] + np.arange(d) * 0.02   # and offsets
        if outliers:      # value channels at either end of a row and inside both halves
            chans = [0, d // 2 - 1, d // 2 + 3, d - 1]      # d / 16 at most
            v[:, :, chans] = v[:, :, chans] * 20 + 30
            k[:, :, [1, d - 2]] *= 20
        cache.append(seq, 0, k, v)
        _, vv = cache.get_kv(seq, 0)
        for q_len, causal in ((1, True), (7, True), (50, True), (3, False)):
            q = (rng.standard_normal((q_len, H, d)) * 0.3).astype(np.float32)
            out = cache.attention(seq, 0, q, causal=causal)
            ref, bound = q4_kernel_reference_bound(cache, seq, 0, q, causal)
            assert_q4_close(out, ref, bound, vv)
            if q4_int_values(d, min(group_size, d)):
                assert bound.max() > 0
                if outliers:      # outlier channels (in every group) exact: the float bound alone
                    assert not bound[..., chans].any()
                # the bound is far below what a wrong lane would cost
                assert bound.max() < 0.05 * np.abs(vv).max(), bound.max() / np.abs(vv).max()
            else:
                assert not bound.any()


@pytest.mark.parametrize("d", [64, 128])
def test_q4_value_sums_keep_their_precision_beside_a_strongly_attended_token(isa, d):
    """Real attention puts most of a group's weight on a few tokens (the first, recent ones).
    The 8-bit value weights' step is set by a block's largest weight, so a block that shares
    such a token rounds every other token's weight coarsely: with 64-token blocks the least
    layer's cosine on SmolLM2's own K/V fell from 0.989 to 0.978. Here one token in 64 takes
    ~50x the weight of each other one; the kernels must stay within the bound of 16-token
    blocks (Q4_VALUE_BLOCK), which 64-token blocks break."""
    rng = np.random.default_rng(d)
    kvh, n, H = 1, 512, 4
    cache = TwoTierKVCache(1, kvh, d, hot_tokens=0, cold="q4", max_tokens=n)
    seq = cache.add_sequence()
    k, v = random_kv(rng, n, kvh, d)
    q = (rng.standard_normal((1, H, d)) * 0.3).astype(np.float32)
    direction = q[0].mean(0) / np.linalg.norm(q[0].mean(0))
    k *= 0.1
    peaks = np.arange(5, n, 64)
    k[peaks, 0] = direction * (4.0 * np.sqrt(d) / np.median(q[0] @ direction))   # scores ~4 above
    cache.append(seq, 0, k, v)
    assert cache.stats().tiers["cold"]["tokens"] == n
    _, vv = cache.get_kv(seq, 0)
    out = cache.attention(seq, 0, q, causal=False)
    ref, bound = q4_kernel_reference_bound(cache, seq, 0, q, causal=False)
    # the data is as meant: each peak weighs 20-200x an ordinary token of its group
    s = q[0] @ cache.get_kv(seq, 0)[0][:, 0].T / np.sqrt(d)
    ratio = np.exp(s[:, peaks] - np.median(s, axis=1, keepdims=True))
    assert 20 < np.median(ratio) < 200, np.median(ratio)
    assert_q4_close(out, ref, bound, vv)


@pytest.mark.parametrize("bits", [2.5, 3.5, 4.5])
def test_turbo_estimators(bits):
    """TurboQuant's values come back with the Lloyd-Max error of their codes' widths, key inner
    products with that of the keys' widths (MSE codes: no bias worth the name), and the bytes
    allocated are what the format says, within turbo_bits."""
    rng = np.random.default_rng(12)
    d, n = 128, 2048
    cache = TwoTierKVCache(1, 1, d, hot_tokens=0, cold="turbo", turbo_bits=bits, max_tokens=n)
    seq = cache.add_sequence()
    k, v = random_kv(rng, n, 1, d)
    cache.append(seq, 0, k, v)
    kk, vv = cache.get_kv(seq, 0)
    q = rng.standard_normal((200, d))
    exact, estimate = k[:, 0] @ q.T, kk[:, 0] @ q.T
    # MSE codes shrink towards zero by about their MSE (measured 0.043 at 2.5 bits, whose key
    # MSE is 0.045; 0.012 / 0.0126 at 3.5; 0.0091 / 0.0095 at 4.5)
    assert abs((estimate * exact).mean() / (exact * exact).mean() - 1) < 1.2 * turbo_mse(bits, d, part="k")
    # measured: keys 0.975-0.977, values 0.986-0.991 of the square root of the Lloyd-Max MSE
    rel = np.linalg.norm(estimate - exact) / np.linalg.norm(exact)
    assert 0.85 * np.sqrt(turbo_mse(bits, d, part="k")) < rel < 1.05 * np.sqrt(turbo_mse(bits, d, part="k"))
    vrel = np.linalg.norm(vv - v) / np.linalg.norm(v)
    assert 0.9 * np.sqrt(turbo_mse(bits, d)) < vrel < 1.05 * np.sqrt(turbo_mse(bits, d))
    st = cache.stats()
    # the format's bytes (tests/turbo_format.py) per group, each in an allocation of 64-byte
    # header + blob rounded up to 64
    group = turbo_format.segment_layout(d, 64, bits)["size"]
    assert st.cold_bytes == n // 64 * (-(-(64 + group) // 64) * 64)
    assert st.cold_bits_per_value <= bits + 0.1
    q = rng.standard_normal((16, 4, d)).astype(np.float32)
    out = cache.attention(seq, 0, q, causal=False)
    assert cosine(out, reference_attention(q, k, v, causal=False)) > {2.5: 0.8, 3.5: 0.93, 4.5: 0.96}[bits]


def test_turbo_keeps_token_order():
    """Turbo values are approximations: every returned token must still be nearest to the
    token appended at its position."""
    rng = np.random.default_rng(13)
    cache = TwoTierKVCache(1, 2, 32, hot_tokens=5, migration_batch=16, cold="turbo", max_tokens=200)
    seq = cache.add_sequence()
    k, v = random_kv(rng, 150, 2, 32)
    for a, b in ((0, 7), (7, 60), (60, 61), (61, 150)):
        cache.append(seq, 0, k[a:b], v[a:b])
    kk, vv = cache.get_kv(seq, 0)
    assert cache.stats().tiers["cold"]["tokens"] == 144
    for got, want in ((kk, k), (vv, v)):
        dist = ((got[:, None] - want[None]) ** 2).sum((2, 3))
        assert np.array_equal(dist.argmin(1), np.arange(150))
    assert np.array_equal(vv[144:], v[144:].astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("kvh, d", [(8, 128), (3, 64)])
def test_q4_stored_bytes_per_token(kvh, d):
    """Codes + scales + outliers, from what was allocated, against fp16 K/V; the outlier data
    takes the most outlier channels a head may have (head_dim / 16 of K and of V), which
    weigh most at head_dim 64: 0.324x there (the fp16 per-token value-group scales alone cost
    a bit per value, and an outlier value channel's 8-bit row leaves its 4-bit slot in the
    token rows unused, rv_coldq.h), 0.306x at 128."""
    rng = np.random.default_rng(3)
    cache = TwoTierKVCache(2, kvh, d, hot_tokens=0, cold="q4", max_tokens=4096)
    seq = cache.add_sequence()
    for layer in range(2):
        cache.append(seq, layer, *outlier_kv(rng, 1024, kvh, d))
    st = cache.stats()
    assert st.tiers["cold"]["tokens"] == 1024 and st.tiers["hot"]["tokens"] == 0
    fp16 = 2 * 2 * kvh * d * 2                       # K and V, two layers
    assert st.cold_bytes_per_token == st.tiers["cold"]["bytes"] / 1024
    assert st.cold_bytes_per_token <= 0.33 * fp16
    assert st.compression_ratio == pytest.approx(fp16 / st.cold_bytes_per_token)
    assert cache.nbytes == st.hot_bytes + st.cold_bytes + st.metadata_bytes + st.slab_slack_bytes == st.bytes
    # the classmethod is the same allocation size (groups without outliers), per token
    assert TwoTierKVCache.bytes_per_token(2, kvh, d) <= st.cold_bytes_per_token
    cache.free(seq)
    st = cache.stats()
    assert st.cold_bytes == 0 and st.hot_bytes == 0 and st.cold_groups == 0


@pytest.mark.parametrize("cold", ["q8", "q4", "turbo"])
def test_bytes_are_what_the_heap_handed_out(cold):
    """nbytes (and so every byte count built on it) is what the cache really allocated:
    glibc's own count of the heap moves by as much as the cache grows with migrations,
    shrinks with frees and goes back to where it was on close."""
    rng = np.random.default_rng(31)
    inputs = [outlier_kv(rng, 300, 4, 64) for _ in range(3)]
    gc.collect()
    base = heap_bytes_in_use()
    cache = TwoTierKVCache(2, 4, 64, hot_tokens=32, migration_batch=32, cold=cold, max_tokens=4000)
    seqs = []
    for k, v in inputs:
        seqs.append(cache.add_sequence())
        for layer in range(2):
            cache.append(seqs[-1], layer, k, v)
        grown = heap_bytes_in_use() - base
        assert cache.nbytes <= grown <= cache.nbytes + HEAP_SLACK, (cache.nbytes, grown)
    assert cache.stats().tiers["cold"]["tokens"] >= 3 * 256
    cache.free(seqs[1])
    grown = heap_bytes_in_use() - base
    assert cache.nbytes <= grown <= cache.nbytes + HEAP_SLACK, (cache.nbytes, grown)
    cache.close()
    assert heap_bytes_in_use() - base <= HEAP_SLACK


def test_eviction_keeps_the_newest_max_tokens(isa):
    """The newest tokens stay; cold ones go in whole groups of 4 (part of a group would free
    none of its memory), so up to 3 fewer than max_tokens may be kept."""
    rng = np.random.default_rng(4)
    cache = TwoTierKVCache(2, 1, 8, hot_tokens=6, migration_batch=4, max_tokens=50,
                           policy="evict-oldest")
    seq = cache.add_sequence()
    total = 0
    for n in (30, 7, 13, 1, 1, 22, 3, 50):
        for layer in range(2):
            cache.append(seq, layer, *indexed_kv(total, n, 1, 8, rng))
        total += n
        keep = cache.seq_len(seq, 0)
        assert keep == total if total <= 50 else 50 - 4 < keep <= 50
        assert cache.seq_len(seq, 1) == keep
        assert cache.stats().budget_tokens == cache.stats().stored_tokens == keep   # no group cut
        for layer in range(2):
            _, v = cache.get_kv(seq, layer)
            assert np.array_equal(v[:, 0, 0], np.arange(total - keep, total))
        assert cache.stats().evicted_tokens == total - keep
    q = rng.standard_normal((1, 2, 8)).astype(np.float32)
    assert_cache_attention_close(cache, seq, 1, q, cache.attention(seq, 1, q))
    with pytest.raises(KVCacheFull, match="eviction cannot help"):
        cache.reserve([seq], [51])


def test_eviction_takes_from_the_requesting_sequence_first():
    rng = np.random.default_rng(5)
    cache = TwoTierKVCache(1, 1, 4, hot_tokens=4, migration_batch=4, max_tokens=40,
                           policy="evict-oldest")
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append(a, 0, *indexed_kv(0, 20, 1, 4, rng))
    cache.append(b, 0, *indexed_kv(0, 20, 1, 4, rng))
    cache.reserve([b], [5])             # two whole cold groups of 4: the second's rest frees room
    assert cache.seq_len(a, 0) == 20 and cache.seq_len(b, 0) == 12
    assert np.array_equal(cache.get_kv(b, 0)[1][:, 0, 0], np.arange(8, 20))
    cache.reserve([b], [35])            # b has only 12: the rest comes from a, oldest first
    assert cache.seq_len(b, 0) == 0 and cache.seq_len(a, 0) == 4     # its 4 groups, not 3 and 3 tokens
    assert np.array_equal(cache.get_kv(a, 0)[1][:, 0, 0], np.arange(16, 20))


def test_eviction_drops_shared_tokens_from_every_holder():
    """A fork's oldest tokens are cold groups its parent shares: dropping them from the fork
    alone frees nothing, so the parent drops the same oldest tokens next -- the fork loses as
    many tokens as it appends, rounded up to a whole group (its memory goes only with its
    last token), not its whole shared prefix."""
    rng = np.random.default_rng(17)
    cache = TwoTierKVCache(1, 1, 8, hot_tokens=4, migration_batch=8, max_tokens=40,
                           policy="evict-oldest")
    parent = cache.add_sequence()
    cache.append(parent, 0, *indexed_kv(0, 36, 1, 8, rng))      # 32 cold + 4 hot
    child = cache.fork(parent)                                  # + 4 hot: full
    assert cache.stats().stored_tokens == 40
    cache.append(child, 0, *indexed_kv(100, 2, 1, 8, rng))
    assert cache.stats().stored_tokens == 40 - 8 + 2
    assert np.array_equal(cache.get_kv(child, 0)[1][:, 0, 0], np.r_[8:36, 100, 101])
    assert np.array_equal(cache.get_kv(parent, 0)[1][:, 0, 0], np.arange(8, 36))


def test_eviction_during_a_transaction_keeps_the_budget_after_rollback():
    """A request from outside an open transaction evicts outside it: the rollback brings back
    nothing whose room was given away. A request mixing both sides raises."""
    rng = np.random.default_rng(18)
    cache = TwoTierKVCache(1, 1, 8, hot_tokens=4, migration_batch=8, max_tokens=40,
                           policy="evict-oldest")
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append(a, 0, *indexed_kv(0, 20, 1, 8, rng))
    cache.append(b, 0, *indexed_kv(0, 20, 1, 8, rng))
    cache.begin([a])
    cache.append(b, 0, *indexed_kv(20, 10, 1, 8, rng))          # b gives up its own oldest 10,
    assert cache.seq_len(a, 0) == 20                            # in whole groups of 8: 16
    assert np.array_equal(cache.get_kv(b, 0)[1][:, 0, 0], np.arange(16, 30))
    before = snapshot(cache)
    with pytest.raises(KVCacheFull, match="inside the open transaction .* and some outside"):
        cache.reserve([a, b], [4, 4])   # 6 free: eviction needed
    assert snapshot(cache) == before
    cache.rollback([a])
    assert cache.stats().stored_tokens == 34 == cache.seq_len(a, 0) + cache.seq_len(b, 0)


def test_policy_error_raises_before_writing():
    rng = np.random.default_rng(6)
    cache = TwoTierKVCache(2, 2, 8, hot_tokens=4, migration_batch=4, max_tokens=30)
    a, b = cache.add_sequence(), cache.add_sequence()
    for layer in range(2):
        cache.append(a, layer, *random_kv(rng, 26, 2, 8))    # 20 cold + 6 hot
    before = snapshot(cache)
    with pytest.raises(KVCacheFull, match="requested"):
        cache.append(b, 0, *random_kv(rng, 5, 2, 8))
    with pytest.raises(KVCacheFull):
        cache.reserve([a, b], [3, 2])
    with pytest.raises(KVCacheFull, match="hot"):
        cache.fork(a)                   # the 6 hot tokens it would copy do not fit
    q = np.zeros((5, 4, 8), np.float32)
    with pytest.raises(KVCacheFull):
        cache.append_attend(1, [b], [5], q, *random_kv(rng, 5, 2, 8))
    assert snapshot(cache) == before
    cache.reserve([a, b], [2, 2])


@pytest.mark.parametrize("cold", ["q8", "q4", "turbo"])
def test_transactions_restore_exactly(cold):
    rng = np.random.default_rng(7)
    cache = TwoTierKVCache(2, 2, 8, hot_tokens=6, migration_batch=4, cold=cold, max_tokens=80,
                           policy="evict-oldest")
    a, b = cache.add_sequence(), cache.add_sequence()
    for layer in range(2):
        cache.append(a, layer, *random_kv(rng, 23, 2, 8))
        cache.append(b, layer, *random_kv(rng, 9, 2, 8))
    before = snapshot(cache)
    cache.begin([a, b])
    cache.reserve([a, b], [40, 5])         # evicts inside the transaction
    for layer in range(2):
        k, v = random_kv(rng, 45, 2, 8)
        cache.append_attend(layer, [a, b], [40, 5], rng.standard_normal((45, 2, 8)).astype(np.float32), k, v)
    assert cache.stats().tiers["hot"]["tokens"] > 40          # no migration inside
    cache.rollback([a, b])
    assert snapshot(cache) == before
    # committed, the same appends migrate
    cache.begin([a])
    for layer in range(2):
        cache.append(a, layer, *random_kv(rng, 30, 2, 8))
    cache.commit([a])
    assert cache.seq_len(a, 0) == 53 and cache.stats().sequences[a]["hot_tokens"] < 10


@pytest.mark.parametrize("cold", ["q4", "turbo"])
def test_fork_shares_cold_groups_and_diverges(isa, cold):
    rng = np.random.default_rng(8)
    cache = TwoTierKVCache(1, 2, 16, hot_tokens=8, migration_batch=8, max_tokens=200, cold=cold)
    parent = cache.add_sequence()
    cache.append(parent, 0, *random_kv(rng, 43, 2, 16))
    cold_bytes = cache.stats().cold_bytes
    child = cache.fork(parent)
    assert cache.stats().cold_bytes == cold_bytes          # shared, not copied
    before = cache.get_kv(parent, 0)
    cache.append(child, 0, *random_kv(rng, 30, 2, 16))
    after = cache.get_kv(parent, 0)
    assert all(np.array_equal(x, y) for x, y in zip(before, after))
    ck, _ = cache.get_kv(child, 0)
    shared = cache.stats().sequences[parent]["cold_tokens"]       # the child's hot tail has
    assert shared == 32 and len(ck) == 73                         # migrated since: requantized
    assert np.array_equal(ck[:shared], before[0][:shared])
    assert np.linalg.norm(ck[:43] - before[0]) < 0.5 * np.linalg.norm(before[0])
    cache.free(parent)
    assert np.array_equal(cache.get_kv(child, 0)[0], ck)
    cache.free(child)
    st = cache.stats()
    assert st.cold_groups == 0 and st.cold_bytes == 0 and st.hot_bytes == 0


def test_fork_of_a_cold_sequence_takes_no_budget():
    """max_tokens counts tokens stored: a fork shares its parent's cold groups (counted once)
    and pays only for the hot tail it copies."""
    rng = np.random.default_rng(14)
    cache = TwoTierKVCache(2, 1, 8, hot_tokens=0, migration_batch=8, max_tokens=100)
    parent = cache.add_sequence()
    for layer in range(2):
        cache.append(parent, layer, *random_kv(rng, 64, 1, 8))
    assert cache.stats().tiers["hot"]["tokens"] == 0
    forks = [cache.fork(parent) for _ in range(5)]        # 6 x 64 tokens held, 64 stored
    st_ = cache.stats()
    assert st_.stored_tokens == 64 and [r["tokens"] for r in st_.layers] == [64, 64]
    assert st_.tiers["cold"]["tokens"] == 64 and st_.tokens == 6 * 64
    assert st_.cold_groups == 2 * 8 and st_.cold_groups_shared == 2 * 8
    for layer in range(2):      # the 36 free tokens, then nothing
        cache.append(forks[0], layer, *random_kv(rng, 36, 1, 8))
    before = snapshot(cache)
    with pytest.raises(KVCacheFull, match="0 free"):
        cache.append(forks[1], 0, *random_kv(rng, 1, 1, 8))
    assert snapshot(cache) == before
    # a hot tail is copied: it costs its tokens
    hot = TwoTierKVCache(1, 1, 8, hot_tokens=4, migration_batch=8, max_tokens=100)
    p = hot.add_sequence()
    hot.append(p, 0, *random_kv(rng, 69, 1, 8))           # 64 cold + 5 hot
    hot.fork(p)
    assert hot.stats().stored_tokens == 74
    hot.fork(p)
    assert hot.stats().stored_tokens == 79
    before = snapshot(hot)      # an import shares nothing: its 69 tokens do not fit in 21
    with pytest.raises(KVCacheFull, match="69 tokens"):
        hot.import_sequence(*hot.export_sequence(p))
    assert snapshot(hot) == before


@pytest.mark.parametrize("layers", [1, 2])
def test_forks_appending_hit_the_budget_at_the_exact_token(layers):
    rng = np.random.default_rng(15)
    cache = TwoTierKVCache(layers, 1, 8, hot_tokens=5, migration_batch=4, max_tokens=120)
    parent = cache.add_sequence()
    for layer in range(layers):
        cache.append(parent, layer, *random_kv(rng, 47, 1, 8))   # 40 cold + 7 hot
    child = cache.fork(parent)
    stored = 40 + 7 + 7
    assert cache.stats().stored_tokens == stored
    turn = 0
    while stored < 120:         # one token at a time, alternating, migrating on the way
        seq = (parent, child)[turn % 2]
        for layer in range(layers):
            cache.append(seq, layer, *random_kv(rng, 1, 1, 8))
        stored += 1
        turn += 1
        assert cache.stats().stored_tokens == stored
    assert cache.stats().tiers["cold"]["tokens"] > 40        # both have migrated since
    before = snapshot(cache)
    for seq in (parent, child):
        with pytest.raises(KVCacheFull, match="requested"):
            cache.append(seq, layers - 1, *random_kv(rng, 1, 1, 8))
        with pytest.raises(KVCacheFull):
            cache.reserve([seq], [1])
        with pytest.raises(KVCacheFull):
            cache.fork(seq)
    assert snapshot(cache) == before
    cache.free(child)           # gives back its own tokens, not the shared ones
    assert cache.stats().stored_tokens == cache.seq_len(parent, 0) == 47 + (turn + 1) // 2


def test_rollback_after_a_fork_restores_the_accounting():
    rng = np.random.default_rng(16)
    cache = TwoTierKVCache(2, 1, 8, hot_tokens=3, migration_batch=4, max_tokens=60,
                           policy="evict-oldest")
    parent = cache.add_sequence()
    for layer in range(2):
        cache.append(parent, layer, *indexed_kv(0, 30, 1, 8, rng))   # 24 cold + 6 hot
    child = cache.fork(parent)
    assert cache.stats().stored_tokens == 36
    before = snapshot(cache)
    cache.begin([child])
    cache.reserve([child], [28])        # 4 over: the child drops its 24 shared tokens (they
    assert cache.seq_len(child, 0) == 2  # free nothing, the parent holds them), then 4 own
    for layer in range(2):
        cache.append(child, layer, *indexed_kv(100, 28, 1, 8, rng))
    assert cache.seq_len(parent, 0) == 30 and cache.seq_len(child, 1) == 30
    assert cache.stats().stored_tokens == 60
    cache.rollback([child])
    assert snapshot(cache) == before
    # the budget is as it was: 24 free tokens exactly, no eviction
    for layer in range(2):
        cache.append(child, layer, *indexed_kv(30, 24, 1, 8, rng))
    assert cache.seq_len(parent, 0) == 30 and cache.seq_len(child, 0) == 54
    assert cache.stats().stored_tokens == 60 and cache.stats().evicted_tokens == 0
    # inside a transaction only its sequences give up tokens: the child's shared ones free
    # nothing, so room it cannot make raises before anything changes
    before = snapshot(cache)
    cache.begin([child])
    with pytest.raises(KVCacheFull, match="transaction"):
        cache.reserve([child], [31])
    cache.reserve([child], [30])
    assert cache.stats().stored_tokens == 30 and cache.seq_len(child, 0) == 0
    cache.rollback([child])
    assert snapshot(cache) == before


@pytest.mark.parametrize("cold", ["q8", "q4", "turbo"])
def test_export_import_round_trip(cold):
    rng = np.random.default_rng(9)
    make = lambda **kw: TwoTierKVCache(2, 2, 16, hot_tokens=8, migration_batch=8, cold=cold,
                                       max_tokens=kw.pop("max_tokens", 200), **kw)
    cache = make(policy="evict-oldest", max_tokens=60)
    a = cache.add_sequence()
    for n in (50, 21):                       # evicts the oldest cold groups, whole
        for layer in range(2):
            cache.append(a, layer, *outlier_kv(rng, n, 2, 16))
    meta, arrays = cache.export_sequence(a)
    json.dumps(meta)
    other = make()
    b = other.import_sequence(meta, arrays)
    for layer in range(2):
        for x, y in zip(cache.get_kv(a, layer), other.get_kv(b, layer)):
            assert np.array_equal(x, y)
    before = snapshot(other)
    broken = dict(arrays)
    blob = arrays["cold.1"].copy()
    if cold == "turbo":                       # the first head's key mean range: infinite
        blob[:2] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)
    else:
        blob[0] ^= 0x40                                           # the first head offset
    broken["cold.1"] = blob
    with pytest.raises(ValueError, match="malformed"):
        other.import_sequence(meta, broken)
    with pytest.raises(ValueError, match="hot_k.0"):
        other.import_sequence(meta, dict(arrays, **{"hot_k.0": arrays["hot_k.0"][:-1]}))
    with pytest.raises(ValueError, match="migration_batch"):
        TwoTierKVCache(2, 2, 16, migration_batch=4, cold=cold, max_tokens=200).import_sequence(meta, arrays)
    with pytest.raises(KVCacheFull):
        make(max_tokens=30).import_sequence(meta, arrays)
    assert snapshot(other) == before


def test_q4_import_checks_outlier_counts_and_channels():
    """A q4 blob's outlier counts and channel numbers index the kernel's rows: an imported
    blob with too many outliers, a channel >= head_dim or channels out of order is refused and
    the cache is left as it was. Offsets follow the head segment layout of rv_coldq.h."""
    rng = np.random.default_rng(19)
    d, G = 32, 8                                    # at most 2 outliers of K and of V
    make = lambda: TwoTierKVCache(1, 1, d, hot_tokens=0, migration_batch=G, cold="q4", max_tokens=64)
    cache = make()
    seq = cache.add_sequence()
    cache.append(seq, 0, *outlier_kv(rng, G, 1, d))
    meta, arrays = cache.export_sequence(seq)
    blob = arrays["cold.0"]
    counts = 4 + 2 * 2 * d + 2 * 2 * G + G * d // 2   # head offset, k/v scales and zeros, vcodes
    assert tuple(blob[counts:counts + 2]) == (2, 2)
    kidx, vidx = blob[counts + 2:counts + 4], blob[counts + 4:counts + 6]
    assert list(kidx) == sorted(kidx) and list(vidx) == sorted(vidx)
    other = make()
    b = other.import_sequence(meta, arrays)         # the untouched blob imports
    before = snapshot(other)
    for at, value in ((counts, 3), (counts + 1, 3), (counts + 2, d), (counts + 5, d + 7),
                      (counts + 3, kidx[0]), (counts + 4, vidx[1])):
        bad = blob.copy()
        bad[at] = value
        with pytest.raises(ValueError, match="malformed"):
            other.import_sequence(meta, dict(arrays, **{"cold.0": bad}))
        assert snapshot(other) == before, at
    other.free(b)


def test_exports_are_deterministic():
    """Every byte of a group blob is written (padding too): the same tokens export the same
    bytes whatever the allocator held before."""
    rng = np.random.default_rng(20)
    k, v = outlier_kv(rng, 12, 1, 3, channels=1)

    def exported(churn):
        cache = TwoTierKVCache(1, 1, 3, hot_tokens=0, migration_batch=1, cold="q8", max_tokens=400)
        for _ in range(churn):                       # leave garbage in freed heap blocks
            s = cache.add_sequence()
            cache.append(s, 0, *outlier_kv(rng, 30, 1, 3, channels=1, factor=1e4))
            cache.free(s)
        s = cache.add_sequence()
        cache.append(s, 0, k, v)
        return cache.export_sequence(s)[1]

    first, second = exported(0), exported(5)
    assert first.keys() == second.keys()
    for name in first:
        assert np.array_equal(first[name], second[name]), name


def test_append_attend_and_threads(isa, two_threads):
    rng = np.random.default_rng(10)
    kvh, H, d = 2, 4, 32
    cache = TwoTierKVCache(1, kvh, d, hot_tokens=32, migration_batch=32, max_tokens=5000)
    a = cache.add_sequence()
    cache.append(a, 0, *random_kv(rng, 3000, kvh, d))
    counts = [1, 12]
    k, v = random_kv(rng, 13, kvh, d)
    q = rng.standard_normal((13, H, d)).astype(np.float32)

    def step():
        c2 = TwoTierKVCache(1, kvh, d, hot_tokens=32, migration_batch=32, max_tokens=5000)
        s2 = c2.import_sequence(*cache.export_sequence(a))
        t2 = c2.add_sequence()
        out = c2.append_attend(0, [s2, t2], counts, q, k, v, out=np.empty_like(q))
        # the long one is mostly cold: attention over its codes
        assert_cache_attention_close(c2, s2, 0, q[:1], out[:1])
        # the new one is all hot: attention over the float16 of what was appended
        assert_attention_close(out[1:], q[1:], as_stored_fp16(k[1:]), as_stored_fp16(v[1:]))
        return out

    one, two = two_threads.one_and_two(step)
    assert attention_error(one, two, v) <= FP32_ATTENTION_BOUND


@pytest.mark.parametrize("cold", ["q8", "q4"])
def test_stored_kv_against_what_was_appended(isa, cold):
    """get_kv (which the other tests use as the reference for attention over the codes) is
    checked against the inputs themselves: the hot tail holds exactly their float16, and
    the cold tokens are within half a quantization step of them (keys per channel over
    tokens, values per token over channels: the format's min-max groups lie inside those
    slices), on K/V with outlier channels too. And attention follows: within the float32
    bound over get_kv, within the quantization's effect over the inputs."""
    rng = np.random.default_rng(30)
    kvh, H, d, hot = 2, 4, 32, 16
    cache = TwoTierKVCache(2, kvh, d, hot_tokens=hot, migration_batch=16, group_size=16,
                           cold=cold, max_tokens=1000)
    seq = cache.add_sequence()
    fed = {0: random_kv(rng, 203, kvh, d), 1: outlier_kv(rng, 203, kvh, d)}
    for layer, (k, v) in fed.items():
        for a, b in ((0, 1), (1, 60), (60, 61), (61, 203)):
            cache.append(seq, layer, k[a:b], v[a:b])
    cold_tokens = cache.stats().sequences[seq]["cold_tokens"]
    assert 203 - cold_tokens >= hot and cold_tokens >= 160
    for layer, (k, v) in fed.items():
        kk, vv = cache.get_kv(seq, layer)
        assert np.array_equal(kk[cold_tokens:], as_stored_fp16(k[cold_tokens:]))
        assert np.array_equal(vv[cold_tokens:], as_stored_fp16(v[cold_tokens:]))
        k16, v16 = as_stored_fp16(k[:cold_tokens]), as_stored_fp16(v[:cold_tokens])
        assert (np.abs(kk[:cold_tokens] - k16) <= quantization_bound(k16, COLD_LEVELS[cold], 0)).all()
        assert (np.abs(vv[:cold_tokens] - v16) <= quantization_bound(v16, COLD_LEVELS[cold], -1)).all()
        q = rng.standard_normal((5, H, d)).astype(np.float32)
        out = cache.attention(seq, layer, q)
        assert_cache_attention_close(cache, seq, layer, q, out)
        # a swap of K and V, or a token out of place, is far outside the quantization's effect
        far = attention_error(out, reference_attention(q, v, k), v)
        assert far > 10 * attention_error(out, reference_attention(q, k, v), v)


@pytest.mark.parametrize("cold", ["q8", "q4"])
def test_cold_groups_of_small_range_stay_within_half_a_step(cold):
    """A min-max group's binary16 step (range / L) is subnormal below a range of L * 6.1e-5
    (0.016 for q8) and was rounded to the nearest multiple of 2^-24: rounded down, the top
    code stopped short of the group's maximum by up to L * 2^-25, so a q8 value group
    spanning 1e-4 came back up to ~19 steps off (7.5e-6 of a 1e-4 range). The step is now
    rounded up where rounding to nearest would not reach the maximum: every cold value is
    within half of its stored step, at most half a step of its range plus half of 2^-24."""
    L = COLD_LEVELS[cold]
    kvh, d, G = 2, 32, 32
    rng = np.random.default_rng(31)
    for span in (3e-2, 1e-3, 3e-4, 1e-4, 1e-5):
        cache = TwoTierKVCache(1, kvh, d, hot_tokens=16, migration_batch=G, group_size=32, cold=cold,
                               max_tokens=256)
        seq = cache.add_sequence()
        k = as_stored_fp16(rng.uniform(-span / 2, span / 2, (2 * G + 16, kvh, d)))
        v = as_stored_fp16(rng.uniform(0, span, (2 * G + 16, kvh, d)))
        cache.append(seq, 0, k, v)
        kk, vv = cache.get_kv(seq, 0)
        n = cache.stats().sequences[seq]["cold_tokens"]
        assert n == 2 * G
        for got, x, axis in ((kk, k, 0), (vv, v, -1)):
            for g0 in range(0, n, G):
                xs = x[g0:g0 + G].astype(np.float64)
                step = (xs.max(axis, keepdims=True) - xs.min(axis, keepdims=True)) / L
                err = np.abs(got[g0:g0 + G] - xs)
                assert np.all(err <= 0.5 * step * (1 + 2.0 ** -9) + 2.0 ** -25), \
                    f"span {span}: {np.max(err / step):.2f} steps off"


def test_bad_input_leaves_cache_unchanged():
    rng = np.random.default_rng(11)
    cache = TwoTierKVCache(2, 2, 8, hot_tokens=4, migration_batch=4, max_tokens=64)
    a, empty = cache.add_sequence(), cache.add_sequence()
    cache.append(a, 0, *random_kv(rng, 9, 2, 8))
    before = snapshot(cache)
    k, v = random_kv(rng, 3, 2, 8)
    with pytest.raises(KeyError, match="31337"):
        cache.append(31337, 0, k, v)
    with pytest.raises(ValueError, match="num_kv_heads"):
        cache.append(a, 0, *random_kv(rng, 3, 1, 8))
    with pytest.raises(TypeError, match="float32 or float16"):
        cache.append(a, 0, k.astype(np.int32), v.astype(np.int32))
    with pytest.raises(ValueError, match="empty"):
        cache.attention(empty, 0, np.zeros((1, 2, 8), np.float32))
    with pytest.raises(ValueError, match="layer"):
        cache.attention(a, 5, np.zeros((1, 2, 8), np.float32))
    with pytest.raises(KVCacheFull):
        cache.append(a, 0, *random_kv(rng, 56, 2, 8))
    assert snapshot(cache) == before
    for kwargs, exc in (({"cold": "q3"}, ValueError), ({"policy": "lru"}, ValueError),
                        ({"migration_batch": 0}, ValueError), ({"hot_tokens": -1}, ValueError),
                        ({"group_size": "32"}, TypeError), ({"cold": "turbo", "turbo_bits": 3}, ValueError),
                        ({"cold": "turbo", "turbo_bits": "3.5"}, TypeError)):
        with pytest.raises(exc):
            TwoTierKVCache(2, 2, 8, max_tokens=64, **kwargs)
    # a cold group's head segments are addressed with 32-bit offsets: groups of 2^28 values or
    # more are refused up front (this one would be 4.4 GiB)
    # (the message's count in 64 bits: UBSan found it computed in C int, printing a wrapped value)
    with pytest.raises(ValueError, match="= 5242880000 values.*migration_batch"):
        TwoTierKVCache(1, 5000, 256, migration_batch=4096, cold="turbo", max_tokens=64)
    TwoTierKVCache(1, 256, 256, migration_batch=4096, cold="q8", max_tokens=64).close()


OPS = st.lists(st.tuples(st.sampled_from(["append", "fork", "free", "txn", "evict"]),
                         st.integers(0, 1000), st.integers(1, 20)), max_size=30)


@settings(max_examples=40, deadline=None)
@given(OPS, st.sampled_from(["q8", "q4"]))
def test_random_operations_keep_order_and_bytes(ops, cold):
    """V = token index: after any mix of appends, forks, frees, rolled-back transactions and
    evictions every sequence holds its newest tokens in order, and freeing everything gives
    every byte back."""
    rng = np.random.default_rng(0)
    cache = TwoTierKVCache(1, 1, 4, hot_tokens=5, migration_batch=4, cold=cold, max_tokens=60,
                           policy="evict-oldest")
    model = {cache.add_sequence(): [0, 0]}       # seq -> [first kept index, next index]
    for op, pick, n in ops:
        live = sorted(model)
        target = live[pick % len(live)] if live else None
        if target is None:
            model[cache.add_sequence()] = [0, 0]
        elif op == "append":
            lo, hi = model[target]
            before = {s: cache.seq_len(s, 0) for s in model}
            cache.append(target, 0, *indexed_kv(hi, n, 1, 4, rng))
            model[target][1] = hi + n
            for s in model:      # what eviction took, oldest first
                if s != target:
                    model[s][0] += before[s] - cache.seq_len(s, 0)
            model[target][0] = model[target][1] - cache.seq_len(target, 0)
        elif op == "fork":
            try:
                model[cache.fork(target)] = list(model[target])
            except KVCacheFull:
                pass
        elif op == "free":
            cache.free(target)
            del model[target]
        elif op == "txn":
            snap = snapshot(cache)
            cache.begin([target])
            try:       # evicts only inside the transaction: may not find room
                cache.append(target, 0, *indexed_kv(0, n, 1, 4, rng))
            except KVCacheFull:
                pass
            cache.rollback([target])
            assert snapshot(cache) == snap
        else:
            cache.reserve([target], [n])
            for s in model:
                model[s][0] = model[s][1] - cache.seq_len(s, 0)
        for s, (lo, hi) in model.items():
            assert np.array_equal(cache.get_kv(s, 0)[1][:, 0, 0], np.arange(lo, hi))
        assert cache.stats().stored_tokens <= 60      # forks share cold tokens: held may be more
    for s in list(model):
        cache.free(s)
    st_ = cache.stats()
    assert st_.hot_bytes == 0 and st_.cold_bytes == 0 and st_.cold_groups == 0 and st_.tokens == 0


class StoredTokensModel:
    """What a two-tier cache stores, modelled independently of its code: each sequence is its
    tokens oldest first as (identity, value) and how many of the oldest are cold. Appends
    land hot; outside a transaction hot_tokens + G hot tokens migrate their oldest G to cold;
    a fork shares the cold tokens (same identities) and copies the hot ones (new identities);
    a sequence drops its oldest tokens. Stored = distinct cold identities + every hot token;
    charged (what max_tokens bounds) = group x the distinct groups some cold token is held of
    + every hot token."""

    def __init__(self, hot_tokens, group):
        self.hot_tokens, self.group, self.seqs, self.next_id = hot_tokens, group, {}, 0
        self.group_of, self.groups = {}, 0      # cold identity -> the migration that made it

    def new_ids(self, n):
        self.next_id += n
        return range(self.next_id - n, self.next_id)

    def add(self, seq):
        self.seqs[seq] = [[], 0]

    def append(self, seq, values, migrate=True):
        toks = self.seqs[seq][0]
        toks.extend(zip(self.new_ids(len(values)), values))
        if migrate:
            self.migrate(seq)

    def migrate(self, seq):
        toks, cold = self.seqs[seq]
        while len(toks) - cold >= self.hot_tokens + self.group:
            for i, _ in toks[cold:cold + self.group]:
                self.group_of[i] = self.groups
            self.groups += 1
            cold += self.group
        self.seqs[seq][1] = cold

    def fork(self, seq, child):
        toks, cold = self.seqs[seq]
        self.seqs[child] = [toks[:cold] + list(zip(self.new_ids(len(toks) - cold),
                                                   [v for _, v in toks[cold:]])), cold]

    def drop_oldest(self, seq, n):
        toks, cold = self.seqs[seq]
        self.seqs[seq] = [toks[n:], max(0, cold - n)]

    def hot(self, seq):
        return len(self.seqs[seq][0]) - self.seqs[seq][1]

    def stored(self, without=()):
        kept = [s for s in self.seqs if s not in without]
        return (len({i for s in kept for i, _ in self.seqs[s][0][:self.seqs[s][1]]}) +
                sum(self.hot(s) for s in kept))

    def charged(self, without=()):
        kept = [s for s in self.seqs if s not in without]
        return (self.group * len({self.group_of[i] for s in kept for i, _ in self.seqs[s][0][:self.seqs[s][1]]}) +
                sum(self.hot(s) for s in kept))


ACCOUNTING_OPS = st.lists(st.tuples(st.sampled_from(["append"] * 4 + ["fork"] * 2 + [
                                        "free", "evict", "add", "txn-rollback", "txn-commit"]),
                                    st.integers(0, 1000), st.integers(1, 16)), min_size=8, max_size=40)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 24), ACCOUNTING_OPS, st.sampled_from(["error", "evict-oldest"]),
       st.sampled_from(["q8", "q4"]))
def test_accounting_with_shared_groups_matches_a_model(prompt, ops, policy, cold):
    """After any mix of appends, forks, frees, evictions and transactions the cache stores
    exactly what the model says (each layer, stats and the budget: an append fits exactly
    when the model says it does, eviction frees the room asked for and less than a group
    more), every sequence holds the model's tokens in order, and freeing everything gives
    the budget and every byte back."""
    rng = np.random.default_rng(1)
    H, G, MAX = 3, 4, 32
    cache = TwoTierKVCache(2, 1, 4, hot_tokens=H, migration_batch=G, cold=cold, max_tokens=MAX,
                           policy=policy)
    model = StoredTokensModel(H, G)
    model.add(cache.add_sequence())
    values = iter(range(1, 10**6))

    def append_both(seq, n):
        vals = [next(values) for _ in range(n)]
        k, _ = random_kv(rng, n, 1, 4)
        v = np.broadcast_to(np.array(vals, np.float32)[:, None, None], (n, 1, 4)).copy()
        for layer in range(2):
            cache.append(seq, layer, k, v)
        return vals

    def appended(seq, n, in_txn=False):
        """append n to seq; check the budget decision against the model; update the model"""
        charged = model.charged()
        free_without = MAX - model.charged(without=[seq]) if in_txn else MAX
        lens = {s: cache.seq_len(s, 0) for s in model.seqs}
        fits = charged + n <= MAX
        can_evict = policy == "evict-oldest" and n <= free_without
        if not fits and not can_evict:
            snap = snapshot(cache)
            with pytest.raises(KVCacheFull):
                append_both(seq, n)
            assert snapshot(cache) == snap
            return False
        vals = append_both(seq, n)
        for s in model.seqs:        # what eviction took, oldest first
            model.drop_oldest(s, lens[s] - cache.seq_len(s, 0) + (n if s == seq else 0))
        model.append(seq, vals, migrate=not in_txn)
        if not fits:                # the room asked for, in whole groups (no skip: less than one more)
            assert MAX - G < model.charged() <= MAX
        else:
            assert all(cache.seq_len(s, 0) == lens[s] + (n if s == seq else 0) for s in model.seqs)
        return True

    if prompt:                  # a first sequence with cold groups for the forks to share
        appended(0, prompt)
    for op, pick, n in ops:
        live = sorted(model.seqs)
        target = live[pick % len(live)] if live else None
        if target is None or op == "add":
            model.add(cache.add_sequence())
        elif op == "append":
            appended(target, n)
        elif op == "fork":
            if model.charged() + model.hot(target) <= MAX:
                model.fork(target, cache.fork(target))
            else:
                snap = snapshot(cache)
                with pytest.raises(KVCacheFull):
                    cache.fork(target)
                assert snapshot(cache) == snap
        elif op == "free":
            cache.free(target)
            del model.seqs[target]
        elif op == "evict":
            fits = model.charged() + n <= MAX
            if policy == "evict-oldest" and n <= MAX:
                lens = {s: cache.seq_len(s, 0) for s in model.seqs}
                cache.reserve([target], [n])
                for s in model.seqs:
                    model.drop_oldest(s, lens[s] - cache.seq_len(s, 0))
                assert MAX - G < model.charged() + n <= MAX if not fits else model.charged() + n <= MAX
            elif fits:
                cache.reserve([target], [n])
            else:
                with pytest.raises(KVCacheFull):
                    cache.reserve([target], [n])
        else:
            snap = snapshot(cache)
            saved = {s: [list(t), c] for s, (t, c) in model.seqs.items()}
            cache.begin([target])
            appended(target, n, in_txn=True)
            if op == "txn-rollback":
                cache.rollback([target])
                assert snapshot(cache) == snap
                model.seqs = saved
            else:
                cache.commit([target])
                model.migrate(target)
        st_ = cache.stats()
        assert [r["tokens"] for r in st_.layers] == [model.stored()] * 2
        assert st_.stored_tokens == model.stored() <= st_.budget_tokens == model.charged() <= MAX
        assert st_.tiers["hot"]["tokens"] == sum(model.hot(s) for s in model.seqs)
        for s, (toks, c) in model.seqs.items():
            assert st_.sequences[s]["cold_tokens"] == c
            for layer in range(2):
                assert np.array_equal(cache.get_kv(s, layer)[1][:, 0, 0], [v for _, v in toks])
    for s in list(model.seqs):
        cache.free(s)
    st_ = cache.stats()
    assert st_.stored_tokens == 0 and [r["tokens"] for r in st_.layers] == [0, 0]
    assert st_.hot_bytes == 0 and st_.cold_bytes == 0 and st_.cold_groups == 0
    if policy == "error":
        cache.reserve([cache.add_sequence()], [MAX])     # the whole budget is free again


@pytest.mark.parametrize("make", [lambda: TwoTierKVCache(2, 2, 16, hot_tokens=8, migration_batch=8, max_tokens=4000),
                                  lambda: PagedKVCache(2, 2, 16, block_size=4, max_tokens=4000)],
                         ids=["two-tier", "paged"])
def test_python_threads_share_a_cache(make):
    """Attention runs without the GIL; appends, forks and frees from other threads wait for
    it (one lock per cache): no crash, and every sequence ends up with what was appended."""
    cache = make()
    seqs = [cache.add_sequence() for _ in range(4)]
    fed = {s: ([], []) for s in seqs}
    errors = []

    def work(i):
        rng = np.random.default_rng(i)
        mine = seqs[i]
        try:
            for step in range(60):
                k, v = random_kv(rng, 3, 2, 16)
                fed[mine][0].append(k)
                fed[mine][1].append(v)
                q = rng.standard_normal((3, 4, 16)).astype(np.float32)
                for layer in range(2):
                    out = cache.append_attend(layer, [mine], [3], q, k, v)
                child = cache.fork(mine)
                q1 = q[:1]
                child_out = cache.attention(child, 1, q1)
                if step < 2:     # still all hot (8 + 8 tokens): exactly the float16 inputs
                    history = [as_stored_fp16(np.concatenate(x)) for x in fed[mine]]
                    assert_attention_close(out, q, *history)
                    assert_attention_close(child_out, q1, *history, causal=False)
                cache.free(child)
        except Exception as exc:      # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert [cache.seq_len(s, 1) for s in seqs] == [180] * 4 and cache.sequences() == seqs
    # every sequence holds what its own thread appended, in order: the float16 of it (the
    # paged cache; the two-tier hot tail), or within the q4 bound of it (cold)
    two_tier = isinstance(cache, TwoTierKVCache)
    for s in seqs:
        inputs = [as_stored_fp16(np.concatenate(x)) for x in fed[s]]
        cold = cache.stats().sequences[s]["cold_tokens"] if two_tier else 0
        for layer in range(2):
            for got, want, axis in zip(cache.get_kv(s, layer), inputs, (0, -1)):
                assert np.array_equal(got[cold:], want[cold:])
                assert not cold or (np.abs(got[:cold] - want[:cold]) <=
                                    quantization_bound(want[:cold], COLD_LEVELS["q4"], axis)).all()


@pytest.mark.parametrize("action", ["free", "close"])
@pytest.mark.parametrize("make", [lambda: TwoTierKVCache(1, 8, 128, hot_tokens=64, migration_batch=64, cold="q8", max_tokens=20000),
                                  lambda: PagedKVCache(1, 8, 128, max_tokens=20000)],
                         ids=["two-tier", "paged"])
def test_freeing_or_closing_while_another_thread_attends(make, action):
    """One thread attends over a long sequence again and again (without the GIL) while
    another frees that sequence, or closes the cache: every call either returns exactly the
    result it returned before the race or raises a clear error (KeyError: the sequence is
    gone; RuntimeError: the cache is closed). Nothing crashes or reads freed memory."""
    rng = np.random.default_rng(32)
    cache = make()
    seq = cache.add_sequence()
    k, v = random_kv(rng, 8000, 8, 128)
    cache.append(seq, 0, k, v)
    q = rng.standard_normal((1, 32, 128)).astype(np.float32)
    first = cache.attention(seq, 0, q)
    if isinstance(cache, PagedKVCache):
        assert_attention_close(first, q, as_stored_fp16(k), as_stored_fp16(v))
    del k, v
    started, results, errors = threading.Event(), [], []

    def attend():
        try:
            for _ in range(200):
                results.append(cache.attention(seq, 0, q))
                started.set()
        except (KeyError, RuntimeError) as exc:
            errors.append(exc)
        finally:
            started.set()

    t = threading.Thread(target=attend)
    t.start()
    assert started.wait(60)
    if action == "free":
        cache.free(seq)
    else:
        cache.close()
    t.join()
    assert all(np.array_equal(r, first) for r in results)
    assert len(errors) == 1 and len(results) < 200
    assert isinstance(errors[0], KeyError if action == "free" else RuntimeError)
    if action == "free":
        assert seq not in cache.sequences() and cache.stats().tokens == 0
    cache.close()
