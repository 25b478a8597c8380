"""Truncation (cache.truncate, Runtime.truncate_sequence: transformers' Cache.crop) and
sequences as bytes (Runtime.export_sequence / import_sequence: moving sequences between
workers). Checked against what the caches held before (get_kv), an independent count of the
tokens a two-tier cache stores, float64 attention, and bad input that changes nothing."""
import json

import numpy as np
import pytest
from _helpers import assert_attention_close, assert_cache_attention_close
from hypothesis import given, settings, strategies as st

from ruvpy import KVCacheFull, PagedKVCache, Runtime, RuntimeConfig, TwoTierKVCache
from ruvpy.kvexport import VERSION
from ruvpy.runtime import SequenceFileError

KVH, D, G = 2, 16, 8


def kv(rng, n):
    return (rng.standard_normal((n, KVH, D)).astype(np.float32),
            rng.standard_normal((n, KVH, D)).astype(np.float32))


def snapshot(cache):
    state = {"stats": json.dumps(cache.stats().as_dict(), sort_keys=True, default=str), "nbytes": cache.nbytes}
    for seq in cache.sequences():
        state[seq] = [tuple(a.tobytes() for a in cache.get_kv(seq, layer)) for layer in range(2)]
    return state


def exported(cache, rng, n):
    """A sequence of n random tokens in both layers of `cache`, and its export."""
    a = cache.add_sequence()
    for layer in range(2):
        cache.append(a, layer, *kv(rng, n))
    return a, cache.export_sequence(a)


def caches():
    return {"paged": PagedKVCache(2, KVH, D, block_size=4, max_tokens=400),
            "q4": TwoTierKVCache(2, KVH, D, hot_tokens=5, migration_batch=G, cold="q4", max_tokens=400),
            "turbo": TwoTierKVCache(2, KVH, D, hot_tokens=5, migration_batch=G, cold="turbo", max_tokens=400)}


@pytest.mark.parametrize("kind", ["paged", "q4", "turbo"])
@pytest.mark.parametrize("n", [0, 3, 8, 13, 20, 37, 45, 60])
def test_truncation_keeps_exactly_the_first_tokens(kind, n):
    """45 tokens: for the two-tier caches 5 groups of 8 cold (40) and 5 hot, so cuts fall in
    the hot ring, on a group boundary, inside a group, and in the first group."""
    rng = np.random.default_rng(n)
    cache = caches()[kind]
    a = cache.add_sequence()
    for layer in range(2):
        cache.append(a, layer, *kv(rng, 45))
    before = [cache.get_kv(a, layer) for layer in range(2)]
    cache.truncate(a, n)
    for layer in range(2):
        assert cache.seq_len(a, layer) == min(n, 45)
        for x, y in zip(cache.get_kv(a, layer), before[layer]):
            np.testing.assert_array_equal(x, y[:n])
    st = cache.stats()
    if kind == "paged":
        assert st.blocks_used == -(-min(n, 45) // 4)                 # the rest went back
    else:
        assert st.stored_tokens == min(n, 45) and st.cold_groups == 2 * -(-min(n, 40) // G)   # 2 layers
    # it goes on: appends, migrations (a cut group's tokens open the next group), attention
    for layer in range(2):
        cache.append(a, layer, *kv(rng, 30))
        k, v = cache.get_kv(a, layer)
        assert len(k) == min(n, 45) + 30
        q = rng.standard_normal((3, 4, D)).astype(np.float32)
        assert_cache_attention_close(cache, a, layer, q, cache.attention(a, layer, q))
    cache.free(a)
    st = cache.stats()
    assert st.tokens == 0 and (kind == "paged" or (st.cold_bytes == 0 and st.hot_bytes == 0))


def test_a_cut_cold_group_is_kept_and_reopened_once():
    """Truncating inside a cold group keeps it (fewer tokens); the next migration requantizes
    the kept tokens together with the new ones into a new group."""
    rng = np.random.default_rng(5)
    cache = caches()["q4"]
    a = cache.add_sequence()
    k, v = kv(rng, 45)
    cache.append(a, 0, k, v)
    cache.truncate(a, 19)                       # groups 0, 1 and 3 tokens of group 2
    st = cache.stats()
    assert st.cold_groups == 3 and st.sequences[a]["cold_tokens"] == 19 and st.stored_tokens == 19
    kept = cache.get_kv(a, 0)[0]
    cache.append(a, 0, *kv(rng, 13))           # hot 13 >= 5 + 8: migrates 3 kept + 5 new
    st = cache.stats()
    assert st.cold_groups == 3 and st.sequences[a]["cold_tokens"] == 24 and st.stored_tokens == 32
    again = cache.get_kv(a, 0)[0][:19]
    np.testing.assert_array_equal(again[:16], kept[:16])                     # untouched groups
    assert np.abs(again[16:] - kept[16:]).max() < 0.25 * np.abs(kept).max()  # requantized once


@pytest.mark.parametrize("kind", ["paged", "q4"])
def test_truncating_a_fork_leaves_the_other_alone(kind):
    rng = np.random.default_rng(6)
    cache = caches()[kind]
    a = cache.add_sequence()
    for layer in range(2):
        cache.append(a, layer, *kv(rng, 45))
    b = cache.fork(a)
    before = [cache.get_kv(a, layer) for layer in range(2)]
    stored = cache.stats().as_dict().get("stored_tokens")
    cache.truncate(b, 19)                       # inside a shared block / cold group
    for layer in range(2):
        assert all(np.array_equal(x, y) for x, y in zip(cache.get_kv(a, layer), before[layer]))
        assert all(np.array_equal(x, y[:19]) for x, y in zip(cache.get_kv(b, layer), before[layer]))
    if kind == "q4":
        # shared groups store once: b's cut frees no cold token (a holds them), its hot copies go
        assert cache.stats().stored_tokens == stored - 5
    for layer in range(2):                      # b writes into the shared block: a copy
        cache.append(b, layer, *kv(rng, 20))
        assert all(np.array_equal(x, y) for x, y in zip(cache.get_kv(a, layer), before[layer]))
    cache.free(a)
    cache.free(b)
    st = cache.stats()
    assert st.tokens == 0 and (kind == "paged" or st.cold_groups == 0)
    if kind == "paged":
        assert st.blocks_free == st.blocks_total


@pytest.mark.parametrize("kind", ["paged", "q4"])
def test_bad_truncations_change_nothing(kind):
    rng = np.random.default_rng(7)
    cache = caches()[kind]
    a = cache.add_sequence()
    cache.append(a, 0, *kv(rng, 20))
    before = snapshot(cache)
    for n, error in ((-1, ValueError), (1.5, TypeError), ("3", TypeError), (True, TypeError),
                     (2 ** 64, ValueError)):
        with pytest.raises(error):
            cache.truncate(a, n)
    with pytest.raises(KeyError):
        cache.truncate(99, 1)
    cache.begin([a])
    with pytest.raises(RuntimeError, match="transaction"):
        cache.truncate(a, 1)
    cache.rollback([a])
    cache.truncate(a, 25)                       # longer than it is: nothing to do
    assert snapshot(cache) == before


KINDS = {"paged": dict(kv_cache="paged"),
         "two-tier": dict(kv_cache="two-tier", cold="q4", hot_tokens=8, migration_batch=8),
         "turbo": dict(kv_cache="turbo", hot_tokens=8, migration_batch=8)}


def runtime(kind, **changes):
    return Runtime(RuntimeConfig(**{**dict(num_layers=2, num_heads=4, num_kv_heads=KVH, head_dim=D,
                                           max_tokens=512), **KINDS[kind], **changes}))


def step(rt, seq, n, rng):
    """One step; returns each layer's (q, out) and the K/V it attended over."""
    seen = []
    with rt.step([seq], [n]) as st:
        for layer in range(2):
            q = rng.standard_normal((n, 4, D)).astype(np.float32)
            out = st.attention(layer, q, *kv(rng, n)).copy()
            seen.append((q, out, rt.get_kv(seq, layer)))
    return seen


@pytest.mark.parametrize("kind", list(KINDS))
def test_runtime_truncation_moves_the_position(kind):
    rng = np.random.default_rng(8)
    with runtime(kind) as rt:
        a = rt.add_sequence()
        step(rt, a, 30, rng)
        step(rt, a, 1, rng)
        before = [rt.get_kv(a, layer) for layer in range(2)]
        rt.truncate_sequence(a, 21)
        assert rt.position(a) == 21 and rt.seq_len(a) == 21
        assert all(np.array_equal(x, y[:21]) for x, y in zip(rt.get_kv(a, 0), before[0]))
        rt.truncate_sequence(a, 40)             # past the end: nothing changes
        assert rt.position(a) == 21
        with rt.step([a], [2]) as st:
            np.testing.assert_array_equal(st.positions, [21, 22])
            for layer in range(2):
                st.attention(layer, rng.standard_normal((2, 4, D)).astype(np.float32), *kv(rng, 2))
        groups = getattr(rt.cache.stats(), "cold_groups", None)
        seen = step(rt, a, 1, rng)
        # its commit moved no token to the cold tier (24 tokens: 16 cold, 8 hot), so the cache
        # holds what the step attended over
        assert getattr(rt.cache.stats(), "cold_groups", None) == groups
        for layer, (q, out, _) in enumerate(seen):
            assert_cache_attention_close(rt.cache, a, layer, q, out)
        with pytest.raises(ValueError):
            rt.truncate_sequence(a, -1)
        with pytest.raises(KeyError):
            rt.truncate_sequence(a + 7, 1)
        before = rt.position(a)
        with rt.step([a], [1]) as st:
            with pytest.raises(RuntimeError, match="while a step is open"):
                rt.truncate_sequence(a, 1)
            for layer in range(2):
                st.attention(layer, rng.standard_normal((1, 4, D)).astype(np.float32), *kv(rng, 1))
        assert rt.position(a) == before + 1 == 25


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_import_bytes_round_trip(kind, tmp_path):
    rng = np.random.default_rng(9)
    with runtime(kind) as rt, runtime(kind) as other:
        a = rt.add_sequence()
        step(rt, a, 37, rng)
        rt.truncate_sequence(a, 29)            # (two-tier: a cut cold group travels too)
        data = rt.export_sequence(a)
        assert isinstance(data, bytes)
        rt.save_sequence(a, tmp_path / "a.ruvkv")
        assert (tmp_path / "a.ruvkv").read_bytes() == data   # save writes exactly these bytes
        other.add_sequence()
        b = other.import_sequence(data)
        assert other.position(b) == 29
        for layer in range(2):
            assert all(np.array_equal(x, y) for x, y in zip(other.get_kv(b, layer), rt.get_kv(a, layer)))
        q = rng.standard_normal((1, 4, D)).astype(np.float32)
        k, v = kv(rng, 1)
        outs = []
        for r, s in ((rt, a), (other, b)):
            with r.step([s], [1]) as st:
                outs.append([st.attention(layer, q, k, v).copy() for layer in range(2)])
        np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("cold", ["q8", "q4", "turbo"])
def test_a_larger_hot_tier_imported_migrates_into_this_caches_cold_store(cold):
    """hot_tokens is not a storage field: a sequence exported with a larger hot tier imports
    into a cache with a smaller one. Its whole fp16 tier used to arrive hot, past
    hot_tokens + migration_batch (the bound a memory budget reserves per sequence); now the
    excess is quantized on import, as an append would have, and the tokens read back as the
    cold format holds them."""
    rng = np.random.default_rng(12)
    big = TwoTierKVCache(2, KVH, D, hot_tokens=64, migration_batch=G, cold=cold, max_tokens=400)
    small = TwoTierKVCache(2, KVH, D, hot_tokens=5, migration_batch=G, cold=cold, max_tokens=400)
    a = big.add_sequence()
    for layer in range(2):
        big.append(a, layer, *kv(rng, 50))
    assert big.stats().sequences[a]["hot_tokens"] == 50             # all of it hot there
    b = small.import_sequence(*big.export_sequence(a))
    usage = small.stats().sequences[b]
    assert usage["tokens"] == 50 and usage["hot_tokens"] <= 5 + G - 1
    for layer in range(2):
        (k0, v0), (k1, v1) = big.get_kv(a, layer), small.get_kv(b, layer)
        assert small.seq_len(b, layer) == 50
        np.testing.assert_array_equal(k1[-usage["hot_tokens"]:], k0[-usage["hot_tokens"]:])
        scale = np.abs(k0).max()
        assert np.abs(k1 - k0).max() <= (0.02 if cold == "q8" else 0.5) * scale
    # and it goes on like a sequence appended here
    for layer in range(2):
        small.append(b, layer, *kv(rng, 3))
    assert small.stats().sequences[b]["hot_tokens"] <= 5 + G - 1


@pytest.mark.parametrize("kind", ["paged", "q4"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_an_import_holding_non_finite_kv_is_refused(kind, bad):
    """append refuses NaN and infinite K/V; a crafted export could carry them in past it
    (attention then returned NaN). Refused by name, nothing changed."""
    rng = np.random.default_rng(13)
    cache = caches()[kind]
    _, (meta, arrays) = exported(cache, rng, 20)
    name = "k.1" if kind == "paged" else "hot_v.1"
    arrays = dict(arrays)
    arrays[name] = arrays[name].copy()
    arrays[name][1, 0, 3] = bad
    before = snapshot(cache)
    with pytest.raises(ValueError, match=rf"import_sequence: {name}\[1, 0, 3\] is {bad}: K/V must be finite"):
        cache.import_sequence(meta, arrays)
    assert snapshot(cache) == before


@pytest.mark.parametrize("cold", ["q8", "q4"])
@pytest.mark.parametrize("half", [0x7C00, 0xFE00])           # +inf, a NaN
def test_a_cold_group_with_a_non_finite_scale_is_refused(cold, half):
    """The q8 / q4 group check looked at offsets, counts and outlier channels only (turbo's
    also checks its parameters): a NaN or infinite key scale in a crafted export imported
    and made attention NaN. Every scale and zero of every head must be finite."""
    rng = np.random.default_rng(14)
    cache = TwoTierKVCache(2, KVH, D, hot_tokens=5, migration_batch=G, cold=cold, max_tokens=400)
    _, (meta, arrays) = exported(cache, rng, 20)
    good = cache.import_sequence(meta, arrays)          # as exported: fine
    cache.free(good)
    blob = arrays["cold.0"].copy()
    head1 = int(np.frombuffer(blob[4:8].tobytes(), np.uint32)[0])   # head 1's segment
    blob[head1 + 2:head1 + 4] = np.frombuffer(np.uint16(half).tobytes(), np.uint8)   # kscale[1]
    before = snapshot(cache)
    with pytest.raises(ValueError, match="cold group 0 of layer 0 is malformed"):
        cache.import_sequence(meta, {**arrays, "cold.0": blob})
    assert snapshot(cache) == before


def test_bad_sequence_bytes_change_nothing():
    rng = np.random.default_rng(10)
    with runtime("two-tier") as rt:
        a = rt.add_sequence()
        step(rt, a, 20, rng)
        data = rt.export_sequence(a)
        before = (rt.sequences, rt.cache.nbytes, [rt.get_kv(a, 0)[0].tobytes()])
        for bad, words in ((data[:len(data) // 2], "truncated"), (b"junk", "magic"),
                           (data[:100] + bytes([data[100] ^ 1]) + data[101:], "checksum")):
            with pytest.raises(SequenceFileError, match=words):
                rt.import_sequence(bad)
        with pytest.raises(TypeError, match="bytes-like"):
            rt.import_sequence("not bytes")
        with runtime("paged") as other:
            with pytest.raises(SequenceFileError, match="kv_cache"):
                other.import_sequence(data)
        assert (rt.sequences, rt.cache.nbytes, [rt.get_kv(a, 0)[0].tobytes()]) == before
        rt.import_sequence(bytearray(data))    # any bytes-like object


def test_a_version_2_kv_export_still_imports():
    """Exports from before truncation (KV format version 2) have no "cut"; q8 groups kept
    their layout through every version."""
    rng = np.random.default_rng(11)

    def q8():
        return TwoTierKVCache(2, KVH, D, hot_tokens=5, migration_batch=G, cold="q8", max_tokens=400)
    cache = q8()
    a = cache.add_sequence()
    for layer in range(2):
        cache.append(a, layer, *kv(rng, 30))
    meta, arrays = cache.export_sequence(a)
    assert meta["version"] == VERSION == 6 and meta["cut"] == [0, 0]
    old = {k: v for k, v in meta.items() if k != "cut"}
    old["version"] = 2
    b = q8().import_sequence(old, arrays)
    assert b == 0
    for version in (3, 4, 5):
        target = q8()
        assert target.import_sequence(dict(meta, version=version), arrays) == 0
        assert target.get_kv(0, 1)[0].tobytes() == cache.get_kv(a, 1)[0].tobytes()
    with pytest.raises(ValueError, match="v6"):
        q8().import_sequence(dict(meta, version=7), arrays)


@pytest.mark.parametrize("cold, name, versions", [("turbo", "TurboQuant", [2, 3]), ("q4", "q4", [2, 3, 4, 5])])
def test_exports_with_an_older_group_layout_are_refused(cold, name, versions):
    """Version 4 changed the TurboQuant groups' layout, versions 5 and 6 the q4 groups' (outlier
    value channels channel-major, then as 8-bit rows): older blobs are not read as new ones (q8 exports of those
    versions still import, above). The cache stays empty; the current version imports."""
    rng = np.random.default_rng(12)
    cache = caches()[cold]
    _, (meta, arrays) = exported(cache, rng, 30)
    for version in versions:
        target = caches()[cold]
        with pytest.raises(ValueError, match=f"v{version} export's {name} groups"):
            target.import_sequence(dict(meta, version=version), arrays)
        assert target.nbytes == caches()[cold].nbytes and list(target.sequences()) == []
    assert caches()[cold].import_sequence(meta, arrays) == 0


class GroupModel:
    """What a two-tier cache stores, with truncation, modelled independently of its code.
    A sequence is its tokens oldest first as (identity, value), how many of the oldest are
    cold, and `offset`: where its first cold group began before the tokens evicted from it
    (groups are G tokens from there on). Appends land hot; hot_tokens + G hot tokens migrate
    G to cold -- unless a truncation left the last group short by `lead` tokens: then those
    lead tokens and G - lead hot ones form a new group (the lead tokens get new identities:
    the old group may still serve a fork), if the budget holds it. A fork shares the cold
    tokens and copies the hot ones; eviction drops the oldest; truncation keeps the first n.
    Stored = distinct cold identities + every hot token. Charged (what the budget bounds) =
    G x the distinct groups some cold token is held of (a cut group keeps its memory) + every
    hot token."""

    def __init__(self, hot_tokens, group, budget):
        self.hot_tokens, self.group, self.budget = hot_tokens, group, budget
        self.seqs, self.next_id = {}, 0
        self.group_of, self.groups = {}, 0     # cold identity -> the migration that made it

    def ids(self, n):
        self.next_id += n
        return list(range(self.next_id - n, self.next_id))

    def stored(self):
        return (len({i for toks, cold, _ in self.seqs.values() for i, _ in toks[:cold]}) +
                sum(len(toks) - cold for toks, cold, _ in self.seqs.values()))

    def charged(self):
        return (self.group * len({self.group_of[i] for toks, cold, _ in self.seqs.values() for i, _ in toks[:cold]}) +
                sum(len(toks) - cold for toks, cold, _ in self.seqs.values()))

    def append(self, seq, values):
        self.seqs[seq][0].extend(zip(self.ids(len(values)), values))
        self.migrate(seq)

    def migrate(self, seq):
        G = self.group
        while True:
            toks, cold, offset = self.seqs[seq]
            if len(toks) - cold < self.hot_tokens + G:
                return
            lead = min(cold, (offset + cold) % G)     # what it sees of a short last group
            if lead:
                moved = [(i, v) for i, (_, v) in zip(self.ids(lead), toks[cold - lead:cold])]
                new = [toks[:cold - lead] + moved + toks[cold:], cold + G - lead,
                       0 if cold == lead else offset]
                self.grouped(new[0][cold - lead:cold - lead + G])
                before, self.seqs[seq] = self.seqs[seq], new
                if self.charged() > self.budget:    # its other holders keep the old group
                    self.seqs[seq] = before
                    return
            else:
                self.grouped(toks[cold:cold + G])
                self.seqs[seq] = [toks, cold + G, offset]

    def grouped(self, toks):
        for i, _ in toks:
            self.group_of[i] = self.groups
        self.groups += 1

    def fork(self, seq, child):
        toks, cold, offset = self.seqs[seq]
        self.seqs[child] = [toks[:cold] + list(zip(self.ids(len(toks) - cold), [v for _, v in toks[cold:]])),
                            cold, offset]

    def drop_oldest(self, seq, n):
        toks, cold, offset = self.seqs[seq]
        gone = min(n, cold)
        cold -= gone
        self.seqs[seq] = [toks[n:], cold, (offset + gone) % self.group if cold else 0]

    def truncate(self, seq, n):
        toks, cold, offset = self.seqs[seq]
        cold = min(cold, n)
        self.seqs[seq] = [toks[:n], cold, offset if cold else 0]


TRUNCATION_OPS = st.lists(st.tuples(st.sampled_from(["append"] * 4 + ["fork", "free", "truncate", "truncate",
                                                     "evict", "add"]),
                                    st.integers(0, 1000), st.integers(0, 16)), min_size=8, max_size=45)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 24), TRUNCATION_OPS, st.sampled_from(["error", "evict-oldest"]),
       st.sampled_from(["q8", "q4"]))
def test_truncation_accounting_matches_a_model(prompt, ops, policy, cold):
    """After any mix of appends, forks, frees, evictions and truncations (cuts in shared and
    unshared cold groups, reopened by later migrations) the cache stores what the model says,
    in every layer and in stats, each sequence holds the model's values in order, an append
    fits exactly when the model says it does (cut groups charged whole), and freeing
    everything gives back every byte."""
    rng = np.random.default_rng(1)
    H, G, MAX = 3, 4, 40
    cache = TwoTierKVCache(2, 1, 4, hot_tokens=H, migration_batch=G, cold=cold, max_tokens=MAX, policy=policy)
    model = GroupModel(H, G, MAX)
    values = iter(range(1, 10 ** 6))

    def add():
        model.seqs[cache.add_sequence()] = [[], 0, 0]

    def append(seq, n):
        vals = [next(values) for _ in range(n)]
        lens = {s: cache.seq_len(s, 0) for s in model.seqs}
        fits = model.charged() + n <= MAX
        if not fits and (policy == "error" or n > MAX):
            snap = snapshot(cache)
            with pytest.raises(KVCacheFull):
                cache.append(seq, 0, np.zeros((n, 1, 4), np.float32), np.zeros((n, 1, 4), np.float32))
            assert snapshot(cache) == snap
            return
        k = rng.standard_normal((n, 1, 4)).astype(np.float32)
        v = np.broadcast_to(np.array(vals, np.float32)[:, None, None], (n, 1, 4)).copy()
        for layer in range(2):
            cache.append(seq, layer, k, v)
        for s in model.seqs:        # what eviction took, oldest first
            model.drop_oldest(s, lens[s] - cache.seq_len(s, 0) + (n if s == seq else 0))
        model.append(seq, vals)

    add()
    if prompt:
        append(0, prompt)
    for op, pick, n in ops:
        live = sorted(model.seqs)
        target = live[pick % len(live)] if live else None
        if target is None or op == "add":
            add()
        elif op == "append" and n:
            append(target, n)
        elif op == "fork":
            if model.charged() + len(model.seqs[target][0]) - model.seqs[target][1] <= MAX:
                model.fork(target, cache.fork(target))
            else:
                with pytest.raises(KVCacheFull):
                    cache.fork(target)
        elif op == "free":
            cache.free(target)
            del model.seqs[target]
        elif op == "truncate":
            keep = pick % (len(model.seqs[target][0]) + 2)
            cache.truncate(target, keep)
            model.truncate(target, keep)
        elif op == "evict" and policy == "evict-oldest" and 0 < n <= MAX:
            lens = {s: cache.seq_len(s, 0) for s in model.seqs}
            cache.reserve([target], [n])
            for s in model.seqs:
                model.drop_oldest(s, lens[s] - cache.seq_len(s, 0))
            assert model.charged() + n <= MAX
        agree(cache, model, MAX)
    for s in list(model.seqs):
        cache.free(s)
    model.seqs.clear()
    agree(cache, model, MAX)
    assert cache.nbytes == cache.stats().metadata_bytes          # every token's byte is back


def agree(cache, model, budget):
    """the cache holds what the model says: stored tokens per layer, the slots charged, each
    sequence's cold tokens and its values in order (the value of token i is in channel 0 of
    its V)"""
    st_ = cache.stats()
    stored = model.stored()
    assert stored <= budget and st_.stored_tokens == stored
    assert st_.budget_tokens == model.charged() <= budget
    assert {r["layer"]: r["tokens"] for r in st_.layers} == {0: stored, 1: stored}
    held = {s: (st_.sequences[s]["cold_tokens"], [cache.get_kv(s, layer)[1][:, 0, 0].tolist() for layer in (0, 1)])
            for s in model.seqs}
    assert held == {s: (cold, [[float(v) for _, v in toks]] * 2) for s, (toks, cold, _) in model.seqs.items()}


def test_the_export_format_docstring_shows_the_current_version():
    """ruvpy.kvexport's docstring shows an export's meta: its "version" is what exports carry
    (it said 3 while exports were at 5)."""
    import re

    import ruvpy.kvexport as kvexport

    shown = re.findall(r'"version": (\d+)', kvexport.__doc__)
    assert shown and all(int(v) == VERSION for v in shown), shown
    cache = TwoTierKVCache(1, KVH, D, hot_tokens=5, migration_batch=G, cold="q4", max_tokens=64)
    seq = cache.add_sequence()
    cache.append(seq, 0, *kv(np.random.default_rng(1), 20))
    assert cache.export_sequence(seq)[0]["version"] == VERSION
