"""The Runtime (ruvpy/runtime.py): configuration, steps over the KV cache, rollback, memory
budget, statistics and sequence files. References: float64 numpy attention over the same K/V
(the cache's own get_kv history)."""
import json
import os
import struct
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ruvpy
from ruvpy import runtime as rtmod
from ruvpy.runtime import (IncompleteStepError, RuntimeConfig, RuntimeStats,
                           SequenceFileError, read_sequence_file, write_sequence_file)

SMALL = dict(num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16)


# ----------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------

def test_config_defaults_and_options():
    cfg = RuntimeConfig(**SMALL)
    assert cfg.kv_cache == "paged" and cfg.kv_dtype == "float16" and cfg.max_tokens is None
    assert cfg.cold_format is None
    assert cfg.cache_options() == {"block_size": 16, "dtype": "float16"}
    two = RuntimeConfig(**SMALL, kv_cache="two-tier", cold="q8", hot_tokens=32)
    assert two.cold_format == "q8"
    assert two.cache_options() == {"hot_tokens": 32, "cold": "q8", "group_size": 32,
                                   "migration_batch": 64, "policy": "error"}
    assert RuntimeConfig(**SMALL, kv_cache="two-tier").cold_format == "q4"
    turbo = RuntimeConfig(**SMALL, kv_cache="turbo", turbo_bits=2.5, policy="evict-oldest")
    assert turbo.cache_options()["cold"] == "turbo"
    assert turbo.cache_options()["turbo_bits"] == 2.5
    assert turbo.storage_fields()["turbo_bits"] == 2.5
    json.dumps(turbo.as_dict())


@pytest.mark.parametrize("changes, error, words", [
    (dict(num_layers=0), ValueError, "num_layers"),
    (dict(num_layers=2.0), TypeError, "num_layers"),
    (dict(num_heads=True), TypeError, "num_heads"),
    (dict(num_heads=5), ValueError, "multiple of num_kv_heads"),
    (dict(head_dim=257), ValueError, "head_dim"),
    (dict(max_tokens=0), ValueError, "max_tokens"),
    (dict(memory_budget=-1), ValueError, "memory_budget"),
    (dict(memory_budget="1GB"), TypeError, "memory_budget"),
    (dict(threads=0), ValueError, "threads"),
    (dict(kv_cache="flat"), ValueError, "kv_cache"),
    (dict(kv_dtype="bfloat16"), ValueError, "kv_dtype"),
    (dict(kv_cache="two-tier", cold="q2"), ValueError, "cold"),
    (dict(policy="lru"), ValueError, "policy"),
    (dict(policy="evict-oldest"), ValueError, "evict-oldest"),
    (dict(cold="q8"), ValueError, "cold"),
    (dict(kv_cache="two-tier", kv_dtype="float32"), ValueError, "kv_dtype"),
    (dict(kv_cache="turbo", cold="q4"), ValueError, "turbo"),
    (dict(kv_cache="turbo", turbo_bits=3.0), ValueError, "turbo_bits"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(arena_bytes=0), ValueError, "arena_bytes"),
])
def test_config_rejects_bad_values(changes, error, words):
    with pytest.raises(error, match=words):
        RuntimeConfig(**{**SMALL, **changes})


def test_config_is_frozen():
    cfg = RuntimeConfig(**SMALL)
    with pytest.raises(AttributeError):
        cfg.num_layers = 4


# ----------------------------------------------------------------------------------------
# sequence files (the format alone)
# ----------------------------------------------------------------------------------------

def _sample_arrays(rng):
    return {"k": rng.standard_normal((5, 2, 16)).astype(np.float16),
            "codes": rng.integers(0, 255, (3, 7), dtype=np.uint8),
            "scales": rng.standard_normal(11).astype(np.float32),
            "empty": np.zeros((0, 4), np.int32)}


def test_sequence_file_round_trip(tmp_path):
    arrays = _sample_arrays(np.random.default_rng(0))
    path = tmp_path / "seq.ruvkv"
    write_sequence_file(path, {"config": {"a": 1}, "position": 9}, arrays)
    header, back = read_sequence_file(path)
    assert header == {"config": {"a": 1}, "position": 9}
    assert back.keys() == arrays.keys()
    for name, a in arrays.items():
        assert back[name].dtype == a.dtype and back[name].shape == a.shape
        np.testing.assert_array_equal(back[name], a)
    assert not list(tmp_path.glob("*.tmp"))


def test_sequence_file_detects_every_flipped_byte(tmp_path):
    path = tmp_path / "seq.ruvkv"
    write_sequence_file(path, {"position": 1}, _sample_arrays(np.random.default_rng(1)))
    good = path.read_bytes()
    bad = tmp_path / "bad.ruvkv"
    for i in range(0, len(good), 7):
        flipped = bytearray(good)
        flipped[i] ^= 0x10
        bad.write_bytes(bytes(flipped))
        with pytest.raises(SequenceFileError):
            read_sequence_file(bad)


def test_sequence_file_detects_truncation_and_trailing_bytes(tmp_path):
    path = tmp_path / "seq.ruvkv"
    write_sequence_file(path, {"position": 1}, _sample_arrays(np.random.default_rng(2)))
    good = path.read_bytes()
    bad = tmp_path / "bad.ruvkv"
    for cut in sorted({0, 4, 8, 31, 32, 40, len(good) // 2, len(good) - 33, len(good) - 1}):
        bad.write_bytes(good[:cut])
        with pytest.raises(SequenceFileError, match="truncated|magic"):
            read_sequence_file(bad)
    bad.write_bytes(good + b"\0")
    with pytest.raises(SequenceFileError, match="trailing"):
        read_sequence_file(bad)


def test_sequence_file_rejects_other_formats_and_versions(tmp_path):
    path = tmp_path / "seq.ruvkv"
    write_sequence_file(path, {}, {"x": np.arange(3)})
    good = bytearray(path.read_bytes())
    other = tmp_path / "other"
    other.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(SequenceFileError, match="magic"):
        read_sequence_file(other)
    newer = bytearray(good)
    struct.pack_into("<I", newer, 8, rtmod.FILE_VERSION + 1)
    other.write_bytes(bytes(newer))
    with pytest.raises(SequenceFileError, match="version"):
        read_sequence_file(other)


def test_sequence_file_rejects_a_malicious_directory_even_with_a_valid_checksum(tmp_path):
    """A directory pointing outside the data, or at object dtypes, is refused even when
    somebody recomputed the checksum."""
    import hashlib
    path = tmp_path / "seq.ruvkv"
    for entry in ({"name": "x", "dtype": "|O", "shape": [1], "offset": 0, "nbytes": 8},
                  {"name": "x", "dtype": "<f4", "shape": [1000], "offset": 0, "nbytes": 4000},
                  {"name": "x", "dtype": "<f4", "shape": [2], "offset": 0, "nbytes": 4},
                  {"name": "x", "dtype": "<f4", "shape": [1], "offset": 3, "nbytes": 4},
                  {"name": 7, "dtype": "<f4", "shape": [1], "offset": 0, "nbytes": 4},
                  {"dtype": "<f4"}):
        header = json.dumps({"arrays": [entry]}).encode()
        data = bytes(64)
        start = (32 + len(header) + 63) // 64 * 64
        body = (struct.pack("<8sIIQQ", rtmod.FILE_MAGIC, rtmod.FILE_VERSION, 0, len(header),
                            len(data)) + header + bytes(start - 32 - len(header)) + data)
        path.write_bytes(body + hashlib.sha256(body).digest())
        with pytest.raises(SequenceFileError):
            read_sequence_file(path)


def test_sequence_file_write_is_atomic(tmp_path):
    path = tmp_path / "seq.ruvkv"
    write_sequence_file(path, {"v": 1}, {"x": np.arange(4)})
    before = path.read_bytes()
    with pytest.raises(TypeError, match="numeric"):
        write_sequence_file(path, {"v": 2}, {"x": np.array([object()])})
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))


# ----------------------------------------------------------------------------------------
# statistics rendering
# ----------------------------------------------------------------------------------------

def _fake_stats():
    return RuntimeStats(
        arena={"capacity": 1 << 20, "used": 4096, "remaining": (1 << 20) - 4096,
               "high_water_mark": 8192, "allocation_count": 3, "reset_count": 7},
        pool={"hits": 5, "misses": 2, "allocations": 2, "returns": 6, "drops": 0,
              "pooled_bytes": 8192, "outstanding_bytes": 0},
        scratch_bytes=1 << 18,
        kv={"kind": "two-tier", "capacity_tokens": 512, "tokens": 1240, "bytes": 123456,
            "bytes_in_use": 12240, "bytes_per_token": 241.1, "details": {"blocks": 3},
            "tiers": {"hot": {"tokens": 40, "bytes": 10240},
                      "cold": {"tokens": 1200, "bytes": 2000}},
            "layers": [{"layer": i, "tokens": 1240, "bytes": 41152} for i in range(3)],
            "sequences": [{"seq": 0, "position": 1000, "tokens": 1000, "bytes": 99},
                          {"seq": 12, "position": 240, "tokens": 240, "bytes": 1}]},
        budget_bytes=200000, budget_used_pct=61.728, rss_bytes=300 << 20,
        rss_growth_bytes=-(1 << 19), steps=10, rollbacks=1, attention_calls=30,
        arena_fallbacks=0)


def test_stats_format_is_an_aligned_table():
    text = _fake_stats().format()
    assert "61.7% used" in text and "-0.50 MiB" in text
    lines = text.splitlines()
    seq_header = lines.index(next(l for l in lines if l.startswith("seq")))
    rows = lines[seq_header + 2:seq_header + 4]
    # numeric columns are right-aligned: the rows end at the same column
    assert len(rows[0]) == len(rows[1]) == len(lines[seq_header])
    assert rows[1].split() == ["12", "240", "240", "1"]
    assert str(_fake_stats()) == text


def test_stats_as_dict_is_json():
    d = _fake_stats().as_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["kv"]["tiers"]["cold"]["tokens"] == 1200 and d["kv"]["sequences"][1]["seq"] == 12


# ----------------------------------------------------------------------------------------
# the runtime over the real KV caches
# ----------------------------------------------------------------------------------------

from ruvpy.runtime import Runtime  # noqa: E402
from ruvpy._kvcache import KVCacheFull  # noqa: E402

KINDS = {
    "paged16": dict(kv_cache="paged"),
    "paged32": dict(kv_cache="paged", kv_dtype="float32", block_size=8),
    "two-tier-q8": dict(kv_cache="two-tier", cold="q8", hot_tokens=16, group_size=16,
                        migration_batch=16),
    "two-tier-q4": dict(kv_cache="two-tier", cold="q4", hot_tokens=16, group_size=16,
                        migration_batch=16),
}


def make_runtime(kind="paged16", **changes):
    return Runtime(RuntimeConfig(**{**SMALL, "max_tokens": 1024, **KINDS[kind], **changes}))


def reference_attention(q, k, v, scale=None):
    """float64 causal attention of q [n, H, d] over k, v [T, KVH, d]; query i sits at
    T - n + i."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    n, heads, d = q.shape
    total, kv_heads = k.shape[0], k.shape[1]
    group = heads // kv_heads
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    out = np.empty_like(q)
    visible = np.arange(total)[None, :] <= (total - n + np.arange(n))[:, None]
    for h in range(heads):
        scores = q[:, h] @ k[:, h // group].T * scale
        scores = np.where(visible, scores, -np.inf)
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ v[:, h // group]
    return out


def random_qkv(rng, n, cfg=None):
    c = cfg or RuntimeConfig(**SMALL)
    q = rng.standard_normal((n, c.num_heads, c.head_dim)).astype(np.float32)
    k = rng.standard_normal((n, c.num_kv_heads, c.head_dim)).astype(np.float32)
    v = rng.standard_normal((n, c.num_kv_heads, c.head_dim)).astype(np.float32)
    return q, k, v


def run_step(rt, seqs, n_tokens, rng):
    """One full step with random q/k/v; returns ({layer: (q, out copy, {seq: (k, v)})},
    positions), with the K/V each sequence held when that layer attended (a two-tier cache
    may requantize at commit, so the history read after the step can differ slightly)."""
    outputs = {}
    with rt.step(seqs, n_tokens) as step:
        positions = step.positions.copy()
        for layer in range(rt.config.num_layers):
            q, k, v = random_qkv(rng, sum(n_tokens), rt.config)
            out = step.attention(layer, q, k, v).copy()
            outputs[layer] = (q, out, {seq: rt.get_kv(seq, layer) for seq in seqs})
    return outputs, positions


def snapshot(rt):
    """Everything a failed step must leave unchanged."""
    state = {"sequences": rt.sequences, "kv_bytes": rt.cache.nbytes,
             "kv_stats": json.dumps(rt.cache.stats().as_dict(), sort_keys=True, default=str)}
    for seq in rt.sequences:
        state[seq] = (rt.position(seq),
                      [rt.seq_len(seq, layer) for layer in range(rt.config.num_layers)],
                      [tuple(a.tobytes() for a in rt.get_kv(seq, layer))
                       for layer in range(rt.config.num_layers)])
    return state


def test_step_lifecycle_positions_and_arena():
    rng = np.random.default_rng(0)
    with make_runtime() as rt:
        a, b = rt.add_sequence(), rt.add_sequence()
        assert rt.sequences == [a, b]
        run_step(rt, [a], [5], rng)
        step = rt.step([a, b], [1, 3])
        with pytest.raises(RuntimeError, match="not open"):
            step.attention(0, *random_qkv(rng, 4))
        with step:
            np.testing.assert_array_equal(step.positions, [5, 0, 1, 2])
            np.testing.assert_array_equal(step.seq_offsets, [0, 1, 4])
            assert step.seqs == (a, b) and step.n_tokens == (1, 3) and step.num_tokens == 4
            buf = step.alloc((4, 576))
            assert buf.shape == (4, 576) and buf.dtype == np.float32
            assert rt.arena.stats().used >= buf.nbytes
            for layer in range(rt.config.num_layers):
                out = step.attention(layer, *random_qkv(rng, 4))
                assert out.shape == (4, 4, 16) and out.dtype == np.float32
            assert step.attended_layers == [0, 1, 2]
        assert rt.arena.stats().used == 0
        assert rt.position(a) == 6 and rt.position(b) == 3
        assert rt.seq_len(a) == 6 and rt.seq_len(b, 2) == 3
        with pytest.raises(RuntimeError, match="ended"):
            step.attention(0, *random_qkv(rng, 4))
        with pytest.raises(RuntimeError, match="ended"):
            step.alloc(3)
        with pytest.raises(RuntimeError, match="only once"):
            with step:
                pass
        stats = rt.stats()
        assert stats.steps == 2 and stats.attention_calls == 6 and stats.rollbacks == 0


@pytest.mark.parametrize("kind", list(KINDS))
def test_mixed_prefill_and_decode_step_matches_reference(kind, isa):
    """A step holding a long prefill, single-token decodes and a short prefill gives, for
    every sequence and layer, float64 attention over that sequence's own K/V history."""
    rng = np.random.default_rng(1)
    with make_runtime(kind) as rt:
        seqs = [rt.add_sequence() for _ in range(4)]
        run_step(rt, seqs[:3], [40, 7, 1], rng)
        run_step(rt, seqs[:2], [1, 25], rng)
        n_tokens = [1, 1, 9, 33]
        outputs, positions = run_step(rt, seqs, n_tokens, rng)
        offsets = np.concatenate([[0], np.cumsum(n_tokens)])
        for i, seq in enumerate(seqs):
            rows = slice(offsets[i], offsets[i + 1])
            np.testing.assert_array_equal(
                positions[rows], np.arange(rt.position(seq) - n_tokens[i], rt.position(seq)))
            for layer, (q, out, seen) in outputs.items():
                k, v = seen[seq]
                expected = reference_attention(q[rows], k, v)
                np.testing.assert_allclose(out[rows], expected, rtol=1e-4, atol=2e-5)
                # ... and the functional kernel on the concatenated history
                np.testing.assert_allclose(out[rows], ruvpy.attention(q[rows], k, v),
                                           rtol=1e-5, atol=1e-6)


@settings(max_examples=12, deadline=None)
@given(history=st.lists(st.integers(0, 40), min_size=1, max_size=4),
       new=st.lists(st.integers(1, 20), min_size=4, max_size=4),
       kind=st.sampled_from(["paged16", "two-tier-q4"]), seed=st.integers(0, 2**16))
def test_any_mix_of_sequences_matches_reference(history, new, kind, seed):
    rng = np.random.default_rng(seed)
    with make_runtime(kind, num_layers=1) as rt:
        seqs = [rt.add_sequence() for _ in history]
        warm = [(s, n) for s, n in zip(seqs, history) if n]
        if warm:
            run_step(rt, [s for s, _ in warm], [n for _, n in warm], rng)
        n_tokens = new[:len(seqs)]
        order = list(reversed(seqs))      # step order need not be creation order
        outputs, _ = run_step(rt, order, n_tokens, rng)
        q, out, seen = outputs[0]
        start = 0
        for seq, n in zip(order, n_tokens):
            k, v = seen[seq]
            np.testing.assert_allclose(out[start:start + n],
                                       reference_attention(q[start:start + n], k, v),
                                       rtol=1e-4, atol=2e-5)
            start += n


@pytest.mark.parametrize("kind", ["paged16", "two-tier-q4"])
def test_exception_inside_a_step_rolls_every_sequence_back(kind):
    rng = np.random.default_rng(2)
    with make_runtime(kind) as rt:
        a, b, c = (rt.add_sequence() for _ in range(3))
        run_step(rt, [a, b], [30, 3], rng)
        before = snapshot(rt)
        with pytest.raises(ZeroDivisionError):
            with rt.step([a, b, c], [1, 20, 2]) as step:
                step.attention(0, *random_qkv(rng, 23))
                step.attention(1, *random_qkv(rng, 23))
                1 / 0
        assert snapshot(rt) == before
        assert rt.stats().rollbacks == 1 and rt.arena.stats().used == 0
        # the runtime goes on as if the step never happened
        _, positions = run_step(rt, [a, c], [1, 1], rng)
        np.testing.assert_array_equal(positions, [30, 0])


def test_a_step_that_skips_layers_is_rolled_back_and_reported():
    rng = np.random.default_rng(3)
    with make_runtime() as rt:
        a = rt.add_sequence()
        run_step(rt, [a], [4], rng)
        before = snapshot(rt)
        with pytest.raises(IncompleteStepError, match="layers 1-2 of 3"):
            with rt.step([a], [1]) as step:
                step.attention(0, *random_qkv(rng, 1))
        assert snapshot(rt) == before
        with pytest.raises(IncompleteStepError, match="layers 0-2 of 3"):
            with rt.step([a], [1]):
                pass
        assert snapshot(rt) == before


def test_bad_step_input_raises_clearly_and_changes_nothing():
    rng = np.random.default_rng(4)
    with make_runtime() as rt:
        a, b = rt.add_sequence(), rt.add_sequence()
        run_step(rt, [a, b], [6, 2], rng)
        before = snapshot(rt)
        with pytest.raises(KeyError, match="unknown sequence 99"):
            rt.step([a, 99], [1, 1])
        with pytest.raises(TypeError, match="sequence id"):
            rt.step(["a"], [1])
        with pytest.raises(ValueError, match="repeat"):
            rt.step([a, a], [1, 1])
        with pytest.raises(ValueError, match="2 sequences but 1"):
            rt.step([a, b], [1])
        with pytest.raises(ValueError, match=">= 1"):
            rt.step([a], [0])
        with pytest.raises(TypeError, match="int"):
            rt.step([a], [1.5])
        with pytest.raises(ValueError, match="at least one"):
            rt.step([], [])
        with rt.step([a, b], [1, 2]) as step:
            q, k, v = random_qkv(rng, 3)
            bad_calls = [
                ((0, q[:2], k, v), ValueError, r"q has shape \[2, 4, 16\], expected \[3, 4, 16\]"),
                ((0, q, k[:, :1], v), ValueError, r"k has shape \[3, 1, 16\]"),
                ((0, q, k, v[..., :8]), ValueError, r"v has shape"),
                ((0, q.astype(np.float64), k, v), TypeError, "q must be float32"),
                ((0, q, k.astype(np.float16), v), TypeError, "float32 or both float16"),
                ((0, q.tolist(), k, v), TypeError, "numpy array"),
                ((3, q, k, v), ValueError,
                 r"layer 3 is out of range \(the runtime has layers 0..2\)"),
                ((-1, q, k, v), ValueError, "out of range"),
                ((1.0, q, k, v), TypeError, "layer must be an int"),
            ]
            for args, error, words in bad_calls:
                with pytest.raises(error, match=words):
                    step.attention(*args)
            with pytest.raises(ValueError, match="out must be"):
                step.attention(0, q, k, v, out=np.empty((3, 4, 8), np.float32))
            step.attention(np.int64(0), q, k, v)      # numpy ints are fine
            with pytest.raises(ValueError, match="layer 0 was already attended"):
                step.attention(0, q, k, v)
            # nothing above disturbed the step: it completes and commits normally
            step.attention(1, q, k, v)
            out = np.empty((3, 4, 16), np.float32)
            assert step.attention(2, q, k, v, out=out) is out
            with pytest.raises(RuntimeError, match="while a step is open"):
                rt.add_sequence()
            with pytest.raises(RuntimeError, match="another step is open"):
                with rt.step([a], [1]):
                    pass
        assert rt.position(a) == 7 and rt.position(b) == 4
        before = snapshot(rt)
        for call, error in ((lambda: rt.remove_sequence(42), KeyError),
                            (lambda: rt.fork_sequence(42), KeyError),
                            (lambda: rt.get_kv(42, 0), KeyError),
                            (lambda: rt.position(-1), KeyError),
                            (lambda: rt.remove_sequence(None), TypeError)):
            with pytest.raises(error):
                call()
        assert snapshot(rt) == before


def test_use_after_close_is_a_clear_error(tmp_path):
    rng = np.random.default_rng(5)
    rt = make_runtime()
    a = rt.add_sequence()
    run_step(rt, [a], [3], rng)
    rt.save_sequence(a, tmp_path / "a.kv")
    rt.close()
    rt.close()  # idempotent
    assert rt.closed and "closed" in repr(rt)
    calls = [rt.add_sequence, lambda: rt.fork_sequence(a), lambda: rt.remove_sequence(a),
             lambda: rt.step([a], [1]), rt.reset, rt.stats, lambda: rt.sequences,
             lambda: rt.save_sequence(a, tmp_path / "b.kv"),
             lambda: rt.load_sequence(tmp_path / "a.kv"), lambda: rt.arena, lambda: rt.cache,
             lambda: rt.seq_len(a)]
    for call in calls:
        with pytest.raises(RuntimeError, match=rf"{rt.name} is closed"):
            call()
    with pytest.raises(RuntimeError, match="closed"):
        with rt:
            pass


def test_close_inside_a_step_abandons_it_safely():
    rng = np.random.default_rng(6)
    rt = make_runtime()
    a = rt.add_sequence()
    with rt.step([a], [2]) as step:
        out = step.attention(0, *random_qkv(rng, 2))
        rt.close()
        with pytest.raises(RuntimeError, match="closed"):
            step.attention(1, *random_qkv(rng, 2))
        with pytest.raises(RuntimeError, match="closed"):
            _ = step.positions
    assert out.shape == (2, 4, 16) and np.isfinite(out).all()   # still readable memory


def test_fork_and_remove():
    rng = np.random.default_rng(7)
    with make_runtime() as rt:
        parent = rt.add_sequence()
        run_step(rt, [parent], [21], rng)
        child = rt.fork_sequence(parent)
        assert rt.position(child) == 21 and rt.sequences == [parent, child]
        for layer in range(3):
            for x, y in zip(rt.get_kv(parent, layer), rt.get_kv(child, layer)):
                np.testing.assert_array_equal(x, y)
        parent_kv = [rt.get_kv(parent, layer) for layer in range(3)]
        outputs, positions = run_step(rt, [child], [2], rng)
        np.testing.assert_array_equal(positions, [21, 22])
        for layer, (q, out, seen) in outputs.items():
            np.testing.assert_array_equal(rt.get_kv(parent, layer)[0], parent_kv[layer][0])
            k, v = seen[child]
            assert len(k) == 23
            np.testing.assert_allclose(out, reference_attention(q, k, v), rtol=1e-4, atol=2e-5)
        rt.remove_sequence(parent)
        assert rt.sequences == [child]
        with pytest.raises(KeyError, match=f"unknown sequence {parent}"):
            rt.step([parent], [1])
        run_step(rt, [child], [1], rng)
        rt.reset()
        assert rt.sequences == [] and rt.stats().kv["bytes"] == rt.cache.nbytes


# ----------------------------------------------------------------------------------------
# memory budget
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
def test_memory_budget_sizes_the_cache(kind):
    budget = 300_000
    with make_runtime(kind, max_tokens=None, memory_budget=budget) as rt:
        assert rt.bytes_per_token == \
            type(rt.cache).bytes_per_token(3, 2, 16, **rt.config.cache_options())
        # the budget holds: the token storage at its worst-case cost per token, one hot tier
        # (two-tier) and the metadata allowance; what it leaves out is less than a block
        per_token = rt.budget_bytes_per_token
        assert per_token >= rt.bytes_per_token
        if kind.startswith("paged"):
            assert per_token == rt.bytes_per_token and rt.hot_tier_bytes == 0
            block = rt.config.block_size
        else:
            assert rt.hot_tier_bytes == type(rt.cache).hot_tier_bytes(
                3, 2, 16, **rt.config.cache_options())
            block = 1
        allowance = max(rtmod.METADATA_ALLOWANCE_MIN, budget // 64)
        storage = budget - allowance - rt.hot_tier_bytes
        assert rt.capacity_tokens * per_token <= storage < (rt.capacity_tokens + block) * per_token
        assert rt.cache.nbytes <= budget
        stats = rt.stats()
        assert stats.budget_bytes == budget
        assert stats.budget_used_pct == pytest.approx(100 * rt.cache.nbytes / budget)
    # max_tokens still caps when it is the smaller limit
    with make_runtime(kind, max_tokens=64, memory_budget=budget) as rt:
        assert rt.capacity_tokens == 64
    with pytest.raises(ValueError, match="holds no token"):
        make_runtime(kind, memory_budget=10)


def test_a_two_tier_budget_admits_the_hot_tiers_it_holds():
    with make_runtime("two-tier-q4", max_tokens=None, memory_budget=300_000) as rt:
        assert rt.max_sequences == 1
        a = rt.add_sequence()
        with pytest.raises(KVCacheFull, match="hot"):
            rt.add_sequence()
        with pytest.raises(KVCacheFull, match="hot"):
            rt.fork_sequence(a)
        assert rt.sequences == [a]
    with make_runtime("two-tier-q4", max_tokens=None, memory_budget=300_000,
                      max_sequences=3) as rt:
        assert rt.max_sequences == 3
        seqs = [rt.add_sequence() for _ in range(3)]
        assert (rt.capacity_tokens * rt.budget_bytes_per_token + 3 * rt.hot_tier_bytes
                <= 300_000)
        with pytest.raises(KVCacheFull, match="max_sequences=3"):
            rt.add_sequence()
        rt.remove_sequence(seqs[0])
        rt.add_sequence()


def test_a_full_budget_raises_kvcachefull_and_changes_nothing():
    rng = np.random.default_rng(8)
    with make_runtime(max_tokens=None, memory_budget=60_000) as rt:
        capacity = rt.capacity_tokens
        a, b = rt.add_sequence(), rt.add_sequence()
        run_step(rt, [a], [capacity - 16], rng)
        before = snapshot(rt)
        with pytest.raises(KVCacheFull):
            with rt.step([a, b], [1, 16]):
                pass
        assert snapshot(rt) == before
        assert rt.cache.nbytes <= 60_000
        run_step(rt, [b], [16], rng)       # what fits still works: the last free block
        assert rt.position(a) == capacity - 16 and rt.position(b) == 16


def test_evict_oldest_keeps_decoding_within_the_budget():
    rng = np.random.default_rng(9)
    budget = 120_000
    with make_runtime("two-tier-q4", max_tokens=None, memory_budget=budget,
                      policy="evict-oldest") as rt:
        a = rt.add_sequence()
        total = rt.capacity_tokens + 100
        for n in [64] * (total // 64) + [1] * (total % 64):
            outputs, _ = run_step(rt, [a], [n], rng)
            assert rt.cache.nbytes <= budget
        assert rt.position(a) == total
        assert rt.seq_len(a) < total        # the oldest tokens went
        # what remains is attended exactly: reference over the surviving K/V
        outputs, positions = run_step(rt, [a], [1], rng)
        assert positions[0] == total
        for layer, (q, out, seen) in outputs.items():
            k, v = seen[a]
            np.testing.assert_allclose(out, reference_attention(q, k, v), rtol=1e-4, atol=2e-5)


# ----------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
def test_save_load_round_trip(kind, tmp_path):
    rng = np.random.default_rng(10)
    path = tmp_path / "seq.ruvkv"
    with make_runtime(kind) as rt:
        a = rt.add_sequence()
        run_step(rt, [a], [45], rng)
        run_step(rt, [a], [1], rng)
        rt.save_sequence(a, path)
        with make_runtime(kind) as other:
            other.add_sequence()          # ids need not match
            b = other.load_sequence(path)
            assert other.position(b) == rt.position(a) == 46
            for layer in range(3):
                for x, y in zip(rt.get_kv(a, layer), other.get_kv(b, layer)):
                    np.testing.assert_array_equal(x, y)
            # both continue identically
            q, k, v = random_qkv(rng, 2)
            outs = []
            for r, s in ((rt, a), (other, b)):
                with r.step([s], [2]) as step:
                    outs.append([step.attention(l, q, k, v).copy() for l in range(3)])
            np.testing.assert_array_equal(outs[0], outs[1])
        c = rt.load_sequence(path)            # a copy next to the original
        assert rt.position(c) == 46 and rt.seq_len(c) == 46


def test_quantized_tiers_stay_quantized_on_disk(tmp_path):
    rng = np.random.default_rng(11)
    sizes = {}
    for kind in ("paged16", "two-tier-q4"):
        with make_runtime(kind) as rt:
            a = rt.add_sequence()
            run_step(rt, [a], [256], rng)
            rt.save_sequence(a, tmp_path / kind)
            sizes[kind] = os.path.getsize(tmp_path / kind)
    # q4 codes (+ scales) for 240 of 256 tokens: well under half of fp16
    assert sizes["two-tier-q4"] < 0.5 * sizes["paged16"]


def test_corrupt_truncated_or_mismatched_files_change_nothing(tmp_path):
    rng = np.random.default_rng(12)
    path = tmp_path / "seq.ruvkv"
    with make_runtime() as rt:
        a = rt.add_sequence()
        run_step(rt, [a], [20], rng)
        rt.save_sequence(a, path)
        good = path.read_bytes()
        before = snapshot(rt)
        bad = tmp_path / "bad.ruvkv"
        for damaged, words in ((good[:len(good) // 2], "truncated"),
                               (good[:100] + bytes([good[100] ^ 1]) + good[101:], "checksum"),
                               (b"nonsense", "magic")):
            bad.write_bytes(damaged)
            with pytest.raises(SequenceFileError, match=words):
                rt.load_sequence(bad)
            assert snapshot(rt) == before
        with pytest.raises(FileNotFoundError):
            rt.load_sequence(tmp_path / "missing")
        for kind, changes, words in (("paged32", {}, "kv_dtype: file 'float16', runtime 'float32'"),
                                     ("paged16", {"head_dim": 8}, "head_dim"),
                                     ("paged16", {"num_layers": 2}, "num_layers"),
                                     ("two-tier-q4", {}, "kv_cache")):
            with make_runtime(kind, **changes) as other:
                other_before = snapshot(other)
                with pytest.raises(SequenceFileError, match=words):
                    other.load_sequence(path)
                assert snapshot(other) == other_before
        with pytest.raises(KeyError):
            rt.save_sequence(7, tmp_path / "x")
        assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------
# statistics and threads
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["paged16", "two-tier-q4"])
def test_stats_report_the_runtime(kind):
    rng = np.random.default_rng(13)
    with make_runtime(kind, memory_budget=500_000) as rt:
        a, b = rt.add_sequence(), rt.add_sequence()
        run_step(rt, [a, b], [50, 3], rng)
        s = rt.stats()
        assert s.kv["bytes"] == rt.cache.nbytes and s.kv["capacity_tokens"] == rt.capacity_tokens
        assert s.kv["tokens"] == 53
        assert sum(t["tokens"] for t in s.kv["tiers"].values()) == 53
        assert [r["layer"] for r in s.kv["layers"]] == [0, 1, 2]
        assert all(r["tokens"] == 53 for r in s.kv["layers"])
        assert [(r["seq"], r["position"], r["tokens"]) for r in s.kv["sequences"]] == \
            [(a, 50, 50), (b, 3, 3)]
        assert sum(r["bytes"] for r in s.kv["sequences"]) == s.kv["bytes_in_use"]
        assert s.arena["high_water_mark"] >= 53 * 4 * 16 * 4 * 3
        assert s.rss_bytes > 0 and s.steps == 1
        d = s.as_dict()
        assert json.loads(json.dumps(d)) == d
        text = s.format()
        for word in ("KV tiers", "KV per layer", "KV per sequence", "arena", "budget"):
            assert word in text


def test_thread_counts_agree_and_are_restored():
    """threads=1 and threads=2 (context splits, sequences and heads in parallel) give the
    same attention; the process-wide thread count is back after each step."""
    from ruvpy import get_num_threads, set_num_threads
    results = []
    previous = get_num_threads()
    set_num_threads(2)
    try:
        for threads in (1, 2):
            rng = np.random.default_rng(14)
            with make_runtime(threads=threads) as rt:
                seqs = [rt.add_sequence() for _ in range(3)]
                run_step(rt, seqs, [300, 40, 5], rng)
                with rt.step(seqs, [1, 1, 4]) as step:
                    assert get_num_threads() == threads
                    q, k, v = random_qkv(rng, 6)
                    results.append([step.attention(layer, q, k, v).copy()
                                    for layer in range(3)])
                assert get_num_threads() == 2
    finally:
        set_num_threads(previous)
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_steps_from_two_python_threads_do_not_interleave():
    rng = np.random.default_rng(17)
    with make_runtime() as rt:
        a = rt.add_sequence()
        errors = []
        inside, release = threading.Event(), threading.Event()

        def other_thread():
            inside.wait()
            try:
                with rt.step([a], [1]):
                    pass
            except RuntimeError as exc:
                errors.append(str(exc))
            finally:
                release.set()

        t = threading.Thread(target=other_thread)
        t.start()
        with rt.step([a], [1]) as step:
            inside.set()
            release.wait(10)
            for layer in range(3):
                step.attention(layer, *random_qkv(rng, 1))
        t.join()
        assert errors and "another step is open" in errors[0]
        assert rt.position(a) == 1


def test_outputs_too_large_for_the_arena_fall_back_to_numpy_and_are_counted():
    from ruvpy import ArenaExhausted
    rng = np.random.default_rng(18)
    with make_runtime(arena_bytes=4096) as rt:
        a = rt.add_sequence()
        with rt.step([a], [20]) as step:     # 20 x 4 x 16 float32 = 5 KiB per output
            with pytest.raises(ArenaExhausted, match="requested"):
                step.alloc((2048,))
            small = step.alloc((16,))
            for layer in range(3):
                q, k, v = random_qkv(rng, 20)
                out = step.attention(layer, q, k, v)
                np.testing.assert_allclose(out, reference_attention(q, *rt.get_kv(a, layer)),
                                           rtol=1e-4, atol=2e-5)
            assert small.shape == (16,)
        stats = rt.stats()
        assert stats.arena_fallbacks == 3 and stats.steps == 1
        assert stats.arena["used"] == 0 and stats.arena["capacity"] == 4096


def test_runtimes_in_parallel_python_threads_stay_independent():
    """Each thread drives its own Runtime (the kernels release the GIL): every step's
    attention still equals the reference over that runtime's own K/V."""
    failures = []

    def worker(seed):
        try:
            rng = np.random.default_rng(seed)
            with make_runtime("two-tier-q8" if seed % 2 else "paged16") as rt:
                seqs = [rt.add_sequence(), rt.add_sequence()]
                for _ in range(15):
                    outputs, _ = run_step(rt, seqs, [int(rng.integers(1, 9)), 1], rng)
                    q, out, seen = outputs[2]
                    n = len(q) - 1
                    np.testing.assert_allclose(out[:n], reference_attention(q[:n], *seen[seqs[0]]),
                                               rtol=1e-4, atol=2e-5)
                    np.testing.assert_allclose(out[n:], reference_attention(q[n:], *seen[seqs[1]]),
                                               rtol=1e-4, atol=2e-5)
                assert rt.position(seqs[1]) == 15
        except BaseException as exc:       # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]
