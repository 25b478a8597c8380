"""The Runtime (ruvpy/runtime.py): configuration, steps over the KV cache, rollback, memory
budget, statistics and sequence files.

Every attention output is checked against float64 attention over the q/k/v that were fed in
(see Feeder): never over what the runtime stored, so a runtime that mixes up what it stores
fails here."""
import gc
import hashlib
import json
import os
import struct
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ruvpy
from ruvpy import KVCacheFull, Runtime
from ruvpy.runtime import (IncompleteStepError, RuntimeConfig, RuntimeStats,
                           SequenceFileError, read_sequence_file, write_sequence_file)

from _helpers import (COLD_LEVELS, FP32_ATTENTION_BOUND, as_stored_fp16,
                      assert_attention_close, attention_error, heap_bytes_in_use,
                      quantization_bound, random_kv, reference_attention, runtime_snapshot,
                      threads_chosen)

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
    (dict(threads=1 << 17), ValueError, r"RuntimeConfig.threads must be in \[1, 65536\]"),
    (dict(max_tokens=2 ** 31), ValueError, r"RuntimeConfig.max_tokens must be in \[1, 2147483647\]"),
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
    version = struct.unpack_from("<I", good, 8)[0]
    struct.pack_into("<I", newer, 8, version + 1)
    other.write_bytes(bytes(newer))
    with pytest.raises(SequenceFileError, match="version"):
        read_sequence_file(other)


def test_sequence_file_rejects_a_malicious_directory_even_with_a_valid_checksum(tmp_path):
    """A directory pointing outside the data, or at object dtypes, is refused even when
    somebody recomputed the checksum."""
    path = tmp_path / "seq.ruvkv"
    write_sequence_file(path, {}, {"x": np.arange(3)})
    magic, version = struct.unpack_from("<8sI", path.read_bytes())
    for entry in ({"name": "x", "dtype": "|O", "shape": [1], "offset": 0, "nbytes": 8},
                  {"name": "x", "dtype": "<f4", "shape": [1000], "offset": 0, "nbytes": 4000},
                  {"name": "x", "dtype": "<f4", "shape": [2], "offset": 0, "nbytes": 4},
                  {"name": "x", "dtype": "<f4", "shape": [1], "offset": 3, "nbytes": 4},
                  {"name": 7, "dtype": "<f4", "shape": [1], "offset": 0, "nbytes": 4},
                  {"dtype": "<f4"}):
        header = json.dumps({"arrays": [entry]}).encode()
        data = bytes(64)
        start = (32 + len(header) + 63) // 64 * 64
        body = (struct.pack("<8sIIQQ", magic, version, 0, len(header),
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
#
# The reference for every attention output comes from the q/k/v that were fed in, never from
# what the runtime stored: a paged float16 cache holds exactly k.astype(float16) (float32:
# k itself); a two-tier cache holds its hot tail exactly as float16 and its cold tokens
# within the quantization's error, so the output is held to the float32 bound while nothing
# is cold and to the relative error its cold format reaches once something is.

KINDS = {
    "paged16": dict(kv_cache="paged"),
    "paged32": dict(kv_cache="paged", kv_dtype="float32", block_size=8),
    "two-tier-q8": dict(kv_cache="two-tier", cold="q8", hot_tokens=16, group_size=16,
                        migration_batch=16),
    "two-tier-q4": dict(kv_cache="two-tier", cold="q4", hot_tokens=16, group_size=16,
                        migration_batch=16),
    "turbo": dict(kv_cache="turbo", hot_tokens=16, group_size=16, migration_batch=16),
}
# ||out - ref|| / ||ref|| over a step's rows once a sequence has cold tokens (random K/V,
# head_dim 16): measured worst over 54 steps of 6 seeds q8 0.0059, q4 0.10, turbo 0.56 (the
# QJL residual's noise at head_dim 16). A swap of K and V gives >= 1.09; a dropped or
# misplaced hot token, or another sequence's history, far more than the q8 bound.
COLD_RELATIVE_ERROR = {"q8": 0.02, "q4": 0.25, "turbo": 0.75}


def make_runtime(kind="paged16", **changes):
    return Runtime(RuntimeConfig(**{**SMALL, "max_tokens": 1024, **KINDS[kind], **changes}))


def random_step_qkv(rng, n, cfg):
    return (rng.standard_normal((n, cfg.num_heads, cfg.head_dim)).astype(np.float32),
            *random_kv(rng, n, cfg.num_kv_heads, cfg.head_dim))


class Feeder:
    """Runs steps with random q/k/v on a Runtime and remembers every K/V row it fed to every
    sequence and layer: the only source of the references."""

    def __init__(self, rt, seed=0):
        self.rt, self.cfg = rt, rt.config
        self.rng = np.random.default_rng(seed)
        self.fed = {}          # seq -> per layer [k rows, v rows] (float32 inputs)

    def add(self):
        seq = self.rt.add_sequence()
        self.fed[seq] = [(self._empty(), self._empty()) for _ in range(self.cfg.num_layers)]
        return seq

    def track(self, seq, like=None):
        """Follow a sequence made elsewhere (load_sequence, fork_sequence of `like`)."""
        self.fed[seq] = list(self.fed[like]) if like is not None else \
            [(self._empty(), self._empty()) for _ in range(self.cfg.num_layers)]
        return seq

    def fork(self, seq):
        return self.track(self.rt.fork_sequence(seq), like=seq)

    def remove(self, seq):
        self.rt.remove_sequence(seq)
        del self.fed[seq]

    def _empty(self):
        return np.zeros((0, self.cfg.num_kv_heads, self.cfg.head_dim), np.float32)

    def stored(self, seq, layer, extra=None):
        """What the cache should hold for seq in layer, by the inputs: the newest seq_len
        tokens fed (eviction drops the oldest) plus `extra` new ones, as its dtype stores
        them."""
        k, v = self.fed[seq][layer]
        if extra is not None:
            k, v = np.concatenate([k, extra[0]]), np.concatenate([v, extra[1]])
        keep = self.rt.seq_len(seq, layer) + (0 if extra is None else len(extra[0]))
        k, v = k[len(k) - keep:], v[len(v) - keep:]
        if self.cfg.kv_dtype == "float32" and self.cfg.kv_cache == "paged":
            return k, v
        return as_stored_fp16(k), as_stored_fp16(v)

    def step(self, seqs, n_tokens, check=True, dtype=np.float32):
        """One full step; checks every output against the reference over the inputs (the
        K/V before the step plus this step's) and records the new rows once it committed.
        Returns ({layer: (q, k, v, out copy)}, positions)."""
        outputs = {}
        expected = {}
        with self.rt.step(seqs, n_tokens) as step:
            positions = step.positions.copy()
            offsets = step.seq_offsets.copy()
            for layer in range(self.cfg.num_layers):
                q, k, v = random_step_qkv(self.rng, sum(n_tokens), self.cfg)
                k, v = k.astype(dtype), v.astype(dtype)
                out = step.attention(layer, q, k, v).copy()
                outputs[layer] = (q, k, v, out)
                for i, seq in enumerate(seqs):
                    rows = slice(offsets[i], offsets[i + 1])
                    new = (k[rows].astype(np.float32), v[rows].astype(np.float32))
                    # lengths read inside the step include this step's tokens: take them off
                    before = self.rt.seq_len(seq, layer) - n_tokens[i]
                    expected[seq, layer] = (q[rows], out[rows], before, new)
        if check:
            for (seq, layer), (q, out, before, new) in expected.items():
                self.check(seq, layer, q, out, before, new)
        for (seq, layer), (_, _, _, new) in expected.items():
            k, v = self.fed[seq][layer]
            self.fed[seq][layer] = (np.concatenate([k, new[0]]), np.concatenate([v, new[1]]))
        return outputs, positions

    def check(self, seq, layer, q, out, before, new):
        k, v = self.fed[seq][layer]
        k, v = np.concatenate([k, new[0]]), np.concatenate([v, new[1]])
        keep = before + len(new[0])
        k, v = k[len(k) - keep:], v[len(v) - keep:]
        if not (self.cfg.kv_dtype == "float32" and self.cfg.kv_cache == "paged"):
            k, v = as_stored_fp16(k), as_stored_fp16(v)
        ref = reference_attention(q, k, v)
        cold = self.cfg.cold_format
        if cold is None or before <= self.cfg.hot_tokens:     # nothing has gone cold yet
            assert attention_error(out, ref, v) <= FP32_ATTENTION_BOUND, (seq, layer)
        else:
            rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
            assert rel <= COLD_RELATIVE_ERROR[cold], (seq, layer, rel)


def test_step_lifecycle_positions_and_arena():
    with make_runtime() as rt:
        feed = Feeder(rt)
        a, b = feed.add(), feed.add()
        assert rt.sequences == [a, b]
        feed.step([a], [5])
        step = rt.step([a, b], [1, 3])
        with pytest.raises(RuntimeError, match="not open"):
            step.attention(0, *random_step_qkv(feed.rng, 4, rt.config))
        with step:
            np.testing.assert_array_equal(step.positions, [5, 0, 1, 2])
            np.testing.assert_array_equal(step.seq_offsets, [0, 1, 4])
            assert step.seqs == (a, b) and step.n_tokens == (1, 3) and step.num_tokens == 4
            buf = step.alloc((4, 576))
            assert buf.shape == (4, 576) and buf.dtype == np.float32
            assert rt.arena.stats().used >= buf.nbytes
            for layer in range(rt.config.num_layers):
                out = step.attention(layer, *random_step_qkv(feed.rng, 4, rt.config))
                assert out.shape == (4, 4, 16) and out.dtype == np.float32
            assert step.attended_layers == [0, 1, 2]
        assert rt.arena.stats().used == 0
        assert rt.position(a) == 6 and rt.position(b) == 3
        assert rt.seq_len(a) == 6 and rt.seq_len(b, 2) == 3
        with pytest.raises(RuntimeError, match="ended"):
            step.attention(0, *random_step_qkv(feed.rng, 4, rt.config))
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
    every sequence and layer, float64 attention over that sequence's own inputs."""
    with make_runtime(kind) as rt:
        feed = Feeder(rt, seed=1)
        seqs = [feed.add() for _ in range(4)]
        feed.step(seqs[:3], [40, 7, 1])
        feed.step(seqs[:2], [1, 25])
        n_tokens = [1, 1, 9, 33]
        outputs, positions = feed.step(seqs, n_tokens)      # checked inside
        offsets = np.concatenate([[0], np.cumsum(n_tokens)])
        for i, seq in enumerate(seqs):
            rows = slice(offsets[i], offsets[i + 1])
            np.testing.assert_array_equal(
                positions[rows], np.arange(rt.position(seq) - n_tokens[i], rt.position(seq)))
        if kind.startswith("paged"):
            # ... and the functional kernel over the same inputs, step by step
            for layer, (q, _, _, out) in outputs.items():
                for i, seq in enumerate(seqs):
                    rows = slice(offsets[i], offsets[i + 1])
                    k, v = feed.stored(seq, layer)
                    assert attention_error(out[rows], ruvpy.attention(q[rows], k, v), v) \
                        <= FP32_ATTENTION_BOUND


@pytest.mark.parametrize("kind", ["paged16", "two-tier-q8"])
def test_float16_inputs_are_stored_as_given(kind):
    """K/V handed over as float16 are stored bit for bit (the hot tier of a two-tier cache)."""
    with make_runtime(kind) as rt:
        feed = Feeder(rt, seed=21)
        a = feed.add()
        feed.step([a], [9], dtype=np.float16)
        feed.step([a], [1], dtype=np.float16)
        for layer in range(3):
            for got, want in zip(rt.get_kv(a, layer), feed.stored(a, layer)):
                np.testing.assert_array_equal(got, want)


@settings(max_examples=12, deadline=None)
@given(history=st.lists(st.integers(0, 40), min_size=1, max_size=4),
       new=st.lists(st.integers(1, 20), min_size=4, max_size=4),
       kind=st.sampled_from(["paged16", "two-tier-q4"]), seed=st.integers(0, 2**16))
def test_any_mix_of_sequences_matches_reference(history, new, kind, seed):
    with make_runtime(kind, num_layers=1) as rt:
        feed = Feeder(rt, seed)
        seqs = [feed.add() for _ in history]
        warm = [(s, n) for s, n in zip(seqs, history) if n]
        if warm:
            feed.step([s for s, _ in warm], [n for _, n in warm])
        order = list(reversed(seqs))      # step order need not be creation order
        feed.step(order, new[:len(seqs)])


@pytest.mark.parametrize("kind", ["paged16", "two-tier-q8"])
def test_the_runtime_stores_what_was_fed(kind):
    """Independently of attention: after steps (migrations included) every layer of every
    sequence holds exactly the float16 of its inputs (two-tier: the hot tail), and the cold
    tokens lie within half a q8 step of them."""
    with make_runtime(kind) as rt:
        feed = Feeder(rt, seed=22)
        a, b = feed.add(), feed.add()
        for n in ([40, 3], [1, 1], [17, 30]):
            feed.step([a, b], n)
        for seq in (a, b):
            cold = rt.cache.stats().sequences[seq].get("cold_tokens", 0)
            if kind != "paged16":
                assert cold > 0
            for layer in range(3):
                for got, want, axis in zip(rt.get_kv(seq, layer), feed.stored(seq, layer), (0, -1)):
                    assert len(got) == len(want) == rt.position(seq)
                    np.testing.assert_array_equal(got[cold:], want[cold:])
                    if cold:
                        assert (np.abs(got[:cold] - want[:cold])
                                <= quantization_bound(want[:cold], COLD_LEVELS["q8"], axis)).all()


@pytest.mark.parametrize("kind", ["paged16", "two-tier-q4"])
def test_exception_inside_a_step_rolls_every_sequence_back(kind):
    with make_runtime(kind) as rt:
        feed = Feeder(rt, seed=2)
        a, b, c = (feed.add() for _ in range(3))
        feed.step([a, b], [30, 3])
        before = runtime_snapshot(rt)
        with pytest.raises(ZeroDivisionError):
            with rt.step([a, b, c], [1, 20, 2]) as step:
                step.attention(0, *random_step_qkv(feed.rng, 23, rt.config))
                step.attention(1, *random_step_qkv(feed.rng, 23, rt.config))
                1 / 0
        assert runtime_snapshot(rt) == before
        assert rt.stats().rollbacks == 1 and rt.arena.stats().used == 0
        # the runtime goes on as if the step never happened: attention over the inputs of the
        # committed steps only
        _, positions = feed.step([a, c], [1, 1])
        np.testing.assert_array_equal(positions, [30, 0])


def test_a_step_that_skips_layers_is_rolled_back_and_reported():
    with make_runtime() as rt:
        feed = Feeder(rt, seed=3)
        a = feed.add()
        feed.step([a], [4])
        before = runtime_snapshot(rt)
        with pytest.raises(IncompleteStepError, match="layers 1-2 of 3"):
            with rt.step([a], [1]) as step:
                step.attention(0, *random_step_qkv(feed.rng, 1, rt.config))
        assert runtime_snapshot(rt) == before
        with pytest.raises(IncompleteStepError, match="layers 0-2 of 3"):
            with rt.step([a], [1]):
                pass
        assert runtime_snapshot(rt) == before
        feed.step([a], [2])


class ScaleThatRaises:
    """A scale whose conversion fails inside the KV cache's call (as Ctrl-C would there)."""

    def __float__(self):
        raise RuntimeError("scale conversion failed")


@pytest.mark.parametrize("kind", ["paged16", "two-tier-q8"])
def test_a_cache_error_caught_inside_the_step_still_rolls_it_back(kind):
    """The application catches a failed attention call and carries on: the step must not
    commit a half-done layer. Either the step is rolled back (and says so) or every layer
    it committed holds exactly the calls that succeeded."""
    with make_runtime(kind) as rt:
        feed = Feeder(rt, seed=23)
        a = feed.add()
        feed.step([a], [20])
        before = runtime_snapshot(rt)
        try:
            with rt.step([a], [2]) as step:
                step.attention(0, *random_step_qkv(feed.rng, 2, rt.config))
                with pytest.raises(RuntimeError, match="scale conversion failed"):
                    step.attention(1, *random_step_qkv(feed.rng, 2, rt.config),
                                   scale=ScaleThatRaises())
                for layer in (1, 2):
                    step.attention(layer, *random_step_qkv(feed.rng, 2, rt.config))
        except RuntimeError as exc:
            assert "rolled back" in str(exc)
            assert runtime_snapshot(rt) == before and rt.stats().rollbacks == 1
        else:
            assert [rt.seq_len(a, layer) for layer in range(3)] == [22] * 3
        assert rt.arena.stats().used == 0
        feed.step([a], [1], check=False)          # the runtime is usable: no step is left open


@pytest.mark.parametrize("kind", ["paged16", "two-tier-q8"])
def test_a_commit_that_fails_falls_back_to_rollback(kind, monkeypatch):
    """Ctrl-C arriving as the step commits: the step is rolled back instead, every sequence
    is as it was, the interrupt propagates, and the next step works. A commit fails only
    so (a migration that cannot allocate leaves its tokens hot), so the cache class the
    runtime builds is swapped for one whose plans' second commit is interrupted."""
    import ruvpy._kvcache as kvcache
    base = kvcache.PagedKVCache if kind == "paged16" else kvcache.TwoTierKVCache
    commits = []

    class CommitInterrupted:
        """The step's plan, whose second commit is interrupted (the runtime commits through
        its plan; the plan commits under the cache's lock, with no Python in between)."""

        def __init__(self, plan):
            self._plan = plan

        def __getattr__(self, name):
            return getattr(self._plan, name)

        def commit(self):
            commits.append(list(self._plan.transaction_seqs))
            if len(commits) == 2:
                raise KeyboardInterrupt
            return self._plan.commit()

    class InterruptedOnce(base):
        def plan(self, *args, **kwargs):
            return CommitInterrupted(super().plan(*args, **kwargs))

    monkeypatch.setattr(kvcache, base.__name__, InterruptedOnce)
    with make_runtime(kind) as rt:
        assert isinstance(rt.cache, InterruptedOnce)
        feed = Feeder(rt, seed=26)
        a, b = feed.add(), feed.add()
        feed.step([a, b], [30, 5])
        before = runtime_snapshot(rt)
        with pytest.raises(KeyboardInterrupt):
            with rt.step([a, b], [20, 1]) as step:
                for layer in range(3):
                    step.attention(layer, *random_step_qkv(feed.rng, 21, rt.config))
        assert len(commits) == 2
        assert runtime_snapshot(rt) == before and rt.stats().rollbacks == 1
        feed.step([a, b], [20, 1])


# raw calls on rt.cache that would change a stepping sequence behind the runtime's back
RAW_CACHE_CALLS = {
    "commit": lambda cache, seq, kv, made: cache.commit([seq]),
    "rollback": lambda cache, seq, kv, made: cache.rollback([seq]),
    "append": lambda cache, seq, kv, made: cache.append(seq, 1, kv[1], kv[2]),
    "reserve": lambda cache, seq, kv, made: cache.reserve([seq], [4]),
    "append_attend": lambda cache, seq, kv, made: cache.append_attend(1, [seq], [2], *kv),
    "plan": lambda cache, seq, kv, made: cache.plan([seq], [2], num_heads=kv[0].shape[1]),
    "a plan made before": lambda cache, seq, kv, made: made.attend(1, *kv),
}


@pytest.mark.parametrize("call", sorted(RAW_CACHE_CALLS))
@pytest.mark.parametrize("kind", ["paged16", "two-tier-q8"])
def test_raw_cache_calls_on_a_stepping_sequence_are_refused(kind, call):
    """rt.cache is the raw cache: a commit() on it in the middle of a step used to keep half
    the step (the cache's lengths ran ahead of the runtime's positions for good), a raw
    append added tokens the runtime never counted. The step's transaction belongs to its
    plan: such calls raise RuntimeError, and the step goes on to commit exactly what a step
    without them commits."""
    def run(interfere):
        with make_runtime(kind) as rt:
            feed = Feeder(rt, seed=31)
            a = feed.add()
            feed.step([a], [20])
            made = rt.cache.plan([a], [2], num_heads=rt.config.num_heads)
            rng = np.random.default_rng(5)
            outs = []
            with rt.step([a], [2]) as step:
                outs.append(step.attention(0, *random_step_qkv(rng, 2, rt.config)).copy())
                if interfere:
                    with pytest.raises(RuntimeError, match=rf"sequences \[{a}\] are inside the "
                                                           r"transaction of an AttentionPlan"):
                        RAW_CACHE_CALLS[call](rt.cache, a, random_step_qkv(np.random.default_rng(6), 2,
                                                                           rt.config), made)
                for layer in (1, 2):
                    outs.append(step.attention(layer, *random_step_qkv(rng, 2, rt.config)).copy())
            assert rt.position(a) == 22
            assert [rt.seq_len(a, layer) for layer in range(3)] == [22] * 3
            with rt.step([a], [1]) as step:      # the next step sees the same history
                outs += [step.attention(layer, *random_step_qkv(rng, 1, rt.config)).copy()
                         for layer in range(3)]
            made.attend(0, *random_step_qkv(rng, 2, rt.config))   # outside a step: allowed
            return outs, runtime_snapshot(rt)

    (quiet, quiet_state), (loud, loud_state) = run(False), run(True)
    assert loud_state == quiet_state
    for got, want in zip(loud, quiet):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("ending", ["commit", "rollback"])
def test_a_raw_commit_from_another_thread_never_lands_inside_a_step(ending):
    """A thread calling rt.cache.commit([a]) over and over while this one steps `a`. The plan
    used to give up its claim, let go of the cache's lock, and then close the transaction:
    a raw commit landing in between kept the step's rows behind the runtime (found within
    4-88 steps), and on the rollback path half a step. Each raw commit must be refused."""
    class ModelFailed(Exception):
        pass

    with make_runtime(threads=1) as rt:
        a = rt.add_sequence()
        rng = np.random.default_rng(3)
        stop, accepted, refused, unexpected = threading.Event(), [], [], []

        def hammer():
            while not stop.is_set():
                try:
                    rt.cache.commit([a])
                    accepted.append(1)
                except RuntimeError as exc:      # inside a step: the plan's claim
                    refused.append(1)
                    if "AttentionPlan" not in str(exc):
                        unexpected.append(exc)
                except ValueError:               # between steps: no transaction
                    pass
                except BaseException as exc:
                    unexpected.append(exc)

        worker = threading.Thread(target=hammer)
        worker.start()
        try:
            for _ in range(300):
                try:
                    with rt.step([a], [1]) as step:
                        step.attention(0, *random_step_qkv(rng, 1, rt.config))
                        if ending == "rollback":
                            raise ModelFailed
                        for layer in (1, 2):
                            step.attention(layer, *random_step_qkv(rng, 1, rt.config))
                except ModelFailed:
                    pass
        finally:
            stop.set()
            worker.join()
        assert accepted == [] and unexpected == []
        assert refused          # the thread did reach the cache while a step was open
        want = 300 if ending == "commit" else 0
        assert rt.position(a) == want
        assert [rt.seq_len(a, layer) for layer in range(3)] == [want] * 3


def test_a_step_whose_transaction_cannot_be_recorded_leaves_none_open(monkeypatch):
    """A MemoryError while plan(..., begin=True) makes the transaction's claim (a weak
    reference to the plan) used to come after the transaction was opened in C, and left the
    sequences inside a transaction no one could close: every later step was refused. The
    claim is made first now, and the recording after the begin is undone as a whole."""
    import ruvpy._kvcache as kvcache

    class NoMemory:
        @staticmethod
        def ref(obj):
            raise MemoryError("no memory for the weak reference")

    with make_runtime() as rt:
        feed = Feeder(rt, seed=8)
        a = feed.add()
        feed.step([a], [5])
        before = runtime_snapshot(rt)
        with monkeypatch.context() as patch:
            patch.setattr(kvcache, "weakref", NoMemory)
            with pytest.raises(MemoryError, match="weak reference"):
                rt.step([a], [1]).__enter__()
        assert not rt.cache.in_transaction(a)
        assert runtime_snapshot(rt) == before
        feed.step([a], [2])


def test_an_exception_arriving_after_the_commit_keeps_the_step_counted():
    """A signal handler's exception (SIGTERM -> sys.exit, say) can arrive just after the
    step's commit returned. The runtime used to count the step rolled back while the cache
    had committed it: its positions fell behind the cache's lengths for good."""
    import ruvpy._kvcache as kvcache

    class LateSignal(Exception):
        pass

    class SignalAfterCommit:
        def __init__(self, plan):
            self._plan = plan

        def __getattr__(self, name):
            return getattr(self._plan, name)

        def commit(self):
            self._plan.commit()
            raise LateSignal

    class Cache(kvcache.PagedKVCache):
        armed = False

        def plan(self, *args, **kwargs):
            made = super().plan(*args, **kwargs)
            return SignalAfterCommit(made) if Cache.armed else made

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kvcache, "PagedKVCache", Cache)
        with make_runtime() as rt:
            feed = Feeder(rt, seed=12)
            a = feed.add()
            feed.step([a], [4])
            Cache.armed = True
            with pytest.raises(LateSignal):
                with rt.step([a], [3]) as step:
                    for layer in range(3):
                        step.attention(layer, *random_step_qkv(feed.rng, 3, rt.config))
            Cache.armed = False
            assert rt.position(a) == 7 and rt.stats().rollbacks == 0
            assert [rt.seq_len(a, layer) for layer in range(3)] == [7] * 3
            feed.step([a], [1], check=False)
            assert rt.position(a) == 8


def test_a_plan_closed_by_its_own_finalizer_closes_its_transaction():
    """A finalizer of a reference cycle holding a plan rolls it back: the cycle's weak
    references are cleared before finalizers run, so the plan no longer recognised its own
    claim, skipped every sequence and still reported itself closed -- the sequences stayed
    inside a transaction, and every new plan on them was refused."""
    import gc
    from ruvpy import PagedKVCache
    cache = PagedKVCache(1, 2, 16, max_tokens=256)
    seq = cache.add_sequence()
    closed = []

    class Holder:
        def __del__(self):
            self.plan.rollback()
            closed.append(self.plan.in_transaction)

    holder = Holder()
    holder.plan = cache.plan([seq], [1], num_heads=2, begin=True)
    holder.cycle = holder
    del holder
    gc.collect()
    assert closed == [False]
    assert not cache.in_transaction(seq)
    cache.plan([seq], [1], num_heads=2, begin=True).rollback()


def test_a_second_transaction_cannot_take_tokens_from_a_plans_sequences():
    """Inside transactions any sequence may give up tokens for another (evict-oldest): a
    second plan's room evicted tokens of a sequence a Runtime step's plan held, and after
    both closed the cache held more tokens than max_tokens. While a live plan's transaction
    is open on an evicting cache, another transaction is refused."""
    from ruvpy import TwoTierKVCache
    rng = np.random.default_rng(0)
    kv = lambda n: (rng.standard_normal((n, 2, 16)).astype(np.float32),
                    rng.standard_normal((n, 2, 16)).astype(np.float32))
    cache = TwoTierKVCache(1, 2, 16, hot_tokens=64, cold="q8", max_tokens=128,
                           policy="evict-oldest")
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.append(a, 0, *kv(100))
    cache.append(b, 0, *kv(20))
    held = cache.plan([a], [1], num_heads=2, begin=True)
    with pytest.raises(RuntimeError, match=r"sequences \[0\] are inside the transaction.*evict-oldest"):
        cache.plan([b], [60], num_heads=2, begin=True)
    with pytest.raises(RuntimeError, match="evict-oldest"):
        cache.begin([b])
    assert [cache.seq_len(s) for s in (a, b)] == [100, 20]
    assert not cache.in_transaction(b)
    held.rollback()
    cache.plan([b], [8], num_heads=2, begin=True).rollback()      # alone: allowed


def test_bad_step_input_raises_clearly_and_changes_nothing():
    with make_runtime() as rt:
        feed = Feeder(rt, seed=4)
        a, b = feed.add(), feed.add()
        feed.step([a, b], [6, 2])
        before = runtime_snapshot(rt)
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
            q, k, v = random_step_qkv(feed.rng, 3, rt.config)
            k_huge, v_nan = k.copy(), v.copy()
            k_huge[1, 0, 3], v_nan[2, 1, 5] = 1e5, np.nan
            bad_calls = [
                ((0, q, k_huge, v), ValueError, r"k\[1, 0, 3\] = 100000.0 is beyond float16's range"),
                ((0, q, k, v_nan), ValueError, r"v\[2, 1, 5\] is nan: K/V must be finite"),
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
        # what was committed is exactly the one valid call per layer
        for layer in range(3):
            np.testing.assert_array_equal(rt.get_kv(b, layer)[0][-2:], as_stored_fp16(k[1:]))
        before = runtime_snapshot(rt)
        for call, error in ((lambda: rt.remove_sequence(42), KeyError),
                            (lambda: rt.fork_sequence(42), KeyError),
                            (lambda: rt.get_kv(42, 0), KeyError),
                            (lambda: rt.position(-1), KeyError),
                            (lambda: rt.remove_sequence(None), TypeError)):
            with pytest.raises(error):
                call()
        assert runtime_snapshot(rt) == before


def test_use_after_close_is_a_clear_error(tmp_path):
    rt = make_runtime()
    feed = Feeder(rt, seed=5)
    a = feed.add()
    feed.step([a], [3])
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
        q, k, v = random_step_qkv(rng, 2, rt.config)
        out = step.attention(0, q, k, v)
        rt.close()
        with pytest.raises(RuntimeError, match="closed"):
            step.attention(1, *random_step_qkv(rng, 2, rt.config))
        with pytest.raises(RuntimeError, match="closed"):
            _ = step.positions
    # still readable memory, and still the result it was
    assert_attention_close(out, q, as_stored_fp16(k), as_stored_fp16(v))


@pytest.mark.parametrize("kind", ["paged16", "two-tier-q8", "turbo"])
def test_fork_and_remove(kind):
    with make_runtime(kind) as rt:
        feed = Feeder(rt, seed=7)
        parent = feed.add()
        feed.step([parent], [21])
        child = feed.fork(parent)
        assert rt.position(child) == 21 and rt.sequences == [parent, child]
        _, positions = feed.step([child], [2])        # attends over the parent's 21 + its 2
        np.testing.assert_array_equal(positions, [21, 22])
        feed.step([parent, child], [3, 1])            # both go on, each over its own history
        for layer in range(3):      # the parent never saw the child's tokens, nor it the parent's
            for seq in (parent, child):
                for got, want in zip(rt.get_kv(seq, layer), feed.stored(seq, layer)):
                    assert len(got) == 24
                    exact = slice(None) if kind == "paged16" else slice(-8, None)   # hot tail
                    np.testing.assert_array_equal(got[exact], want[exact])
        rt.remove_sequence(parent)
        del feed.fed[parent]
        assert rt.sequences == [child]
        with pytest.raises(KeyError, match=f"unknown sequence {parent}"):
            rt.step([parent], [1])
        feed.step([child], [1])
        rt.reset()
        assert rt.sequences == [] and rt.stats().kv["tokens"] == 0


@pytest.mark.parametrize("cold", ["q8", "turbo"])
def test_forks_under_eviction(cold):
    """policy="evict-oldest" with forks through the Runtime: parent and children keep
    decoding inside max_tokens, each attending over the newest of its own inputs; shared
    cold tokens go from every holder at once, never leaving one sequence holding the other's
    tokens or a hole."""
    kind = "two-tier-q8" if cold == "q8" else "turbo"
    with make_runtime(kind, max_tokens=160, policy="evict-oldest") as rt:
        feed = Feeder(rt, seed=24)
        parent = feed.add()
        feed.step([parent], [100])
        children = [feed.fork(parent), feed.fork(parent)]
        for i in range(12):
            seqs = [parent, *children]
            feed.step(seqs, [1 + i % 3, 5, 2])
            assert rt.stats().kv["tokens"] <= 3 * 160
            assert rt.cache.stats().stored_tokens <= 160
        for seq in [parent, *children]:
            assert rt.seq_len(seq) < rt.position(seq)          # the oldest went
        # the newest tokens of each are its own: its last appended rows, exactly (hot)
        for seq in [parent, *children]:
            for got, want in zip(rt.get_kv(seq, 0), feed.stored(seq, 0)):
                np.testing.assert_array_equal(got[-8:], want[-8:])
        feed.remove(children[0])
        feed.step([parent, children[1]], [20, 20])


@pytest.mark.parametrize("kind", ["two-tier-q8", "turbo"])
def test_a_failed_step_gives_back_what_eviction_took(kind, tmp_path):
    """Under policy="evict-oldest" a step that fails rolls back its evictions too: the
    sequences hold every token they had (the failure may be Ctrl-C in generate). Also when
    the room came from another sequence than the step's."""
    with make_runtime(kind, max_tokens=64, policy="evict-oldest") as rt:
        feed = Feeder(rt, seed=25)
        a, b = feed.add(), feed.add()
        feed.step([a], [32])
        feed.step([b], [32])
        before = runtime_snapshot(rt)
        for seqs, n in (([a], [16]), ([b], [40]), ([a, b], [8, 8])):
            with pytest.raises(KeyboardInterrupt):
                with rt.step(seqs, n) as step:
                    step.attention(0, *random_step_qkv(feed.rng, sum(n), rt.config))
                    raise KeyboardInterrupt
            assert runtime_snapshot(rt) == before, (seqs, n)
        # and a step that completes evicts as before: the requester's own oldest first
        feed.step([a], [16])
        assert rt.seq_len(a) == 32 and rt.seq_len(b) == 32 and rt.position(a) == 48
        b_short = feed.add()
        with rt.step([b_short], [8]) as step:      # must take room from a and b:
            with pytest.raises(RuntimeError, match="step"):   # they are inside its transaction
                rt.save_sequence(a, tmp_path / "a")
            for layer in range(3):
                step.attention(layer, *random_step_qkv(feed.rng, 8, rt.config))
        assert sum(rt.seq_len(s) for s in rt.sequences) <= 64
        # a's oldest cold group goes whole (8 of its 16 tokens would free none of its memory)
        assert rt.seq_len(b_short) == 8 and rt.seq_len(a) + rt.seq_len(b) == 64 - 16


# ----------------------------------------------------------------------------------------
# memory budget
# ----------------------------------------------------------------------------------------

def kv_bytes_per_token(cfg):
    """Bytes one token takes in a paged cache of cfg's dtype (K and V, every layer)."""
    itemsize = 4 if cfg.kv_dtype == "float32" else 2
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize


def fill(feed, seqs, chunk=7):
    """Steps of `chunk` tokens per sequence until the cache refuses one (KVCacheFull):
    returns how many tokens it took in all."""
    while True:
        try:
            feed.step(seqs, [chunk] * len(seqs), check=False)
        except KVCacheFull:
            return sum(feed.rt.seq_len(s) for s in seqs)


# what the heap holds beyond the bytes a runtime reports (its Python objects, malloc's chunk
# headers): measured 2-9 KiB
HEAP_SLACK = 16 * 1024


def reported_heap(rt):
    """The heap bytes a runtime says it holds and close() gives back: all of total_bytes
    (KV cache with the cold-group buffers its pool holds ready, arena, scratch, the pool's
    other buffers) but the pool's own lists, which outlive close()."""
    return rt.stats().total_bytes - rt.pool.metadata_bytes


def assert_close_gives_back_what_it_reported(rt):
    """Closing the runtime hands the heap back exactly the bytes its stats reported (glibc's
    count, so the runtime's own bookkeeping is not trusted); closes it."""
    reported = reported_heap(rt)
    gc.collect()
    before = heap_bytes_in_use()
    rt.close()
    gc.collect()
    given_back = before - heap_bytes_in_use()
    assert abs(given_back - reported) <= HEAP_SLACK, (reported, given_back)


@pytest.mark.parametrize("kind", list(KINDS))
def test_memory_budget_holds_and_is_used(kind):
    """Under memory_budget the KV cache fills to refusal within the budget, most of the budget
    holds tokens, and the bytes it reports are what the heap gets back when it closes
    (glibc's own count: the cache's bookkeeping is not what is checked against)."""
    budget = 300_000
    options = dict(max_tokens=None, memory_budget=budget, arena_bytes=1 << 16, max_sequences=2)
    with make_runtime(kind, **options) as rt:
        feed = Feeder(rt, seed=8)
        seqs = [feed.add(), feed.add()]
        tokens = fill(feed, seqs)
        stats = rt.stats()
        assert stats.kv["bytes"] <= budget
        assert stats.budget_bytes == budget
        assert stats.budget_used_pct == pytest.approx(100 * stats.kv["bytes"] / budget)
        assert tokens == stats.kv["tokens"]
        if kind.startswith("paged"):
            # the pool is the budget less a metadata allowance (1/64) and under a block
            assert tokens * kv_bytes_per_token(rt.config) >= 0.9 * budget
        else:
            # the cold tier at its format's bits, the hot tiers (16 + 16 tokens each) at fp16
            bits = {"q8": 8, "q4": 4, "turbo": 3.5}[rt.config.cold_format]
            cold_per_token = kv_bytes_per_token(rt.config) * bits / 16
            assert tokens * cold_per_token >= 0.4 * budget
        assert_close_gives_back_what_it_reported(rt)
    with make_runtime(kind, max_tokens=64, memory_budget=budget) as rt:   # the smaller limit
        assert rt.stats().kv["capacity_tokens"] == 64
    with pytest.raises(ValueError, match="holds no token"):
        make_runtime(kind, memory_budget=10)


@pytest.mark.parametrize("cold", ["q8", "q4", "turbo"])
@pytest.mark.parametrize("budget", [200_000, 8_000_000])
def test_a_two_tier_budget_holds_its_fixed_part_and_whole_slabs(cold, budget):
    """A two-tier cache filled to refusal stays within its budget at head_dim 64. The sizing
    left out what the cache allocates when created (its migration work buffer: 72 KB here,
    against an 8 KiB allowance; 113-127% of a 200 KB budget) and the slabs' rounding to 2 MiB
    (107-109% of 8 MB); both count now, and most of the budget still holds tokens (q4 fed
    outlier channels: its largest groups)."""
    cfg = RuntimeConfig(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, kv_cache="two-tier",
                        cold=cold, hot_tokens=16, migration_batch=64, memory_budget=budget,
                        max_sequences=1, arena_bytes=1 << 20)
    rng = np.random.default_rng(15)
    with Runtime(cfg) as rt:
        seq, most = rt.add_sequence(), 0
        try:
            while True:
                k = rng.uniform(-1, 1, (64, 2, 64)).astype(np.float32)
                k[:, :, :4] *= 20
                with rt.step([seq], [64]) as step:
                    for layer in range(2):
                        step.attention(layer, rng.standard_normal((64, 4, 64)).astype(np.float32), k, -k)
                most = max(most, rt.stats().kv["bytes"])
        except KVCacheFull:
            pass
        assert rt.position(seq) >= rt.capacity_tokens - 63
        assert most <= budget
        assert most >= (0.6 if budget < 1 << 20 else 0.95) * budget


def test_a_two_tier_budget_admits_the_hot_tiers_it_holds():
    with make_runtime("two-tier-q4", max_tokens=None, memory_budget=300_000) as rt:
        a = rt.add_sequence()
        with pytest.raises(KVCacheFull, match="hot"):
            rt.add_sequence()
        with pytest.raises(KVCacheFull, match="hot"):
            rt.fork_sequence(a)
        assert rt.sequences == [a]
    with make_runtime("two-tier-q4", max_tokens=None, memory_budget=300_000,
                      max_sequences=3) as rt:
        seqs = [rt.add_sequence() for _ in range(3)]
        with pytest.raises(KVCacheFull, match="max_sequences=3"):
            rt.add_sequence()
        rt.remove_sequence(seqs[0])
        rt.add_sequence()


def test_a_full_budget_raises_kvcachefull_and_changes_nothing():
    with make_runtime(max_tokens=None, memory_budget=60_000) as rt:
        capacity = rt.stats().kv["capacity_tokens"]
        feed = Feeder(rt, seed=9)
        a, b = feed.add(), feed.add()
        feed.step([a], [capacity - 16])
        before = runtime_snapshot(rt)
        with pytest.raises(KVCacheFull):
            with rt.step([a, b], [1, 16]):
                pass
        assert runtime_snapshot(rt) == before
        feed.step([b], [16])       # what fits still works: the last free block
        assert rt.position(a) == capacity - 16 and rt.position(b) == 16
        with pytest.raises(KVCacheFull):
            feed.step([b], [1])


@pytest.mark.parametrize("cold", ["q4", "turbo"])
def test_a_pool_mode_budget_counts_the_cold_groups_held_ready(cold):
    """Under a budget a small two-tier cache's cold groups come from a pool class prewarmed
    with all of them: memory the budget sized as KV and that is allocated from the start.
    kv["bytes"] and budget_used_pct left the unused ones out (a fresh runtime reported 5 KB
    of KV, its fixed part, while creating it took 273 KB); they count now, as reserved_bytes:
    kv["bytes"] is what creating the
    runtime took from the heap (glibc's count) but the arena, the scratch and the pool's own
    lists, and a step moves bytes from reserved to in use without changing it."""
    cfg = RuntimeConfig(**{**SMALL, **KINDS["two-tier-q4" if cold == "q4" else "turbo"]},
                        max_tokens=None, memory_budget=300_000, max_sequences=2, arena_bytes=1 << 16)
    with Runtime(cfg) as warm:            # process-wide first-use state (kernel tables, threads)
        warm_feed = Feeder(warm, seed=29)
        warm_feed.step([warm_feed.add(), warm_feed.add()], [70, 40], check=False)
    gc.collect()
    before = heap_bytes_in_use()
    rt = Runtime(cfg)
    gc.collect()
    grown = heap_bytes_in_use() - before
    assert not rt._sizing.cold_slabs and rt._sizing.cold_groups > 0
    s = rt.stats()
    others = s.arena["capacity"] + s.scratch_bytes + rt.pool.metadata_bytes
    assert abs(s.kv["bytes"] - (grown - others)) <= HEAP_SLACK, (s.kv["bytes"], grown - others)
    assert s.kv["reserved_bytes"] >= 0.5 * s.kv["bytes"] > 0       # the cold store, unused
    assert s.budget_used_pct == pytest.approx(100 * s.kv["bytes"] / cfg.memory_budget)
    feed = Feeder(rt, seed=29)
    a, b = feed.add(), feed.add()
    feed.step([a, b], [70, 40], check=False)
    feed.fed.clear()
    gc.collect()
    t = rt.stats()
    assert t.kv["details"]["cold_groups"] > 0
    # the groups came from the reserve: the heap grew by the hot rings and metadata only
    others = t.arena["capacity"] + t.scratch_bytes + rt.pool.metadata_bytes   # (scratch grew)
    assert abs(t.kv["bytes"] - (heap_bytes_in_use() - before - others)) <= HEAP_SLACK
    assert t.kv["reserved_bytes"] == s.kv["reserved_bytes"] - t.kv["details"]["pooled_cold_bytes"]
    assert t.kv["bytes"] == (t.kv["bytes_in_use"] + t.kv["details"]["metadata_bytes"] +
                             t.kv["details"]["slab_slack_bytes"] + t.kv["reserved_bytes"])
    assert t.kv["bytes"] <= cfg.memory_budget
    assert t.budget_used_pct == pytest.approx(100 * t.kv["bytes"] / cfg.memory_budget)
    # the parts still add up to every byte, and the shares of sequences / layers to those in use
    assert t.memory["kv"] == t.kv["bytes"] and sum(t.memory.values()) == t.total_bytes
    assert sum(r["bytes"] for r in t.kv["sequences"]) == t.kv["bytes_in_use"]
    assert sum(r["bytes"] for r in t.kv["layers"]) == t.kv["bytes_in_use"]
    assert "held ready" in t.format()
    assert_close_gives_back_what_it_reported(rt)


def test_cut_cold_groups_stay_within_the_groups_a_budget_planned():
    """A cold group truncated or partly evicted keeps its whole allocation. The budget counted
    only the tokens it still held, so the slots it had freed went to new groups: 7 sequences
    truncated to 1 token of a group of 64 left room for 7 more groups per layer than the
    sizing planned (the pool's 34 prewarmed groups), and the pool allocated past them (random
    steps and cuts of 8 sequences reached 103% of the budget). Counted whole, the
    cache's groups never need a buffer beyond those (the pool's own count of buffers it
    allocated), and the KV cache's bytes stay within the budget."""
    budget, G = 1_000_000, 64
    cfg = RuntimeConfig(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, kv_cache="two-tier",
                        cold="q4", hot_tokens=1, migration_batch=G, memory_budget=budget,
                        max_sequences=8, policy="evict-oldest", arena_bytes=1 << 20)
    rng = np.random.default_rng(23)
    with Runtime(cfg) as rt:
        assert not rt._sizing.cold_slabs
        planned = rt.pool.stats().allocations      # the prewarmed cold groups
        assert planned == rt._sizing.cold_groups

        def step(seq, n):
            k = rng.uniform(-1, 1, (n, 2, 64)).astype(np.float32)
            k[:, :, :4] *= 20                      # outlier channels: q4's largest groups
            with rt.step([seq], [n]) as s:
                for layer in range(2):
                    s.attention(layer, rng.standard_normal((n, 4, 64)).astype(np.float32), k, -k)
            assert rt.pool.stats().allocations == planned
            assert rt.stats().kv["bytes"] <= budget

        cut = [rt.add_sequence() for _ in range(7)]
        for seq in cut:
            step(seq, G + 2)                       # a cold group and 2 hot tokens
            rt.truncate_sequence(seq, 1)           # 1 token of the group left, all its memory
        filler = rt.add_sequence()
        while rt.position(filler) < 2 * rt.capacity_tokens:
            step(filler, G)                        # fills the rest, then evicts its own oldest
        for _ in range(2 * G):
            step(filler, 1)                        # decoding: one token of room at a time
        assert [rt.seq_len(seq) for seq in cut] == [1] * 7
        assert rt.stats().kv["details"]["evicted_tokens"] > 0
        assert_close_gives_back_what_it_reported(rt)


def test_evict_oldest_keeps_decoding_within_the_budget():
    budget = 120_000
    options = dict(max_tokens=None, memory_budget=budget, policy="evict-oldest", arena_bytes=1 << 16)
    with make_runtime("two-tier-q4", **options) as rt:
        feed = Feeder(rt, seed=10)
        a = feed.add()
        total = rt.stats().kv["capacity_tokens"] + 100
        for n in [64] * (total // 64) + [1] * (total % 64):
            feed.step([a], [n])           # the reference: the newest seq_len inputs
            assert rt.stats().kv["bytes"] <= budget
        assert rt.position(a) == total
        assert rt.seq_len(a) < total        # the oldest tokens went
        assert_close_gives_back_what_it_reported(rt)


# ----------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
def test_save_load_round_trip(kind, tmp_path):
    path = tmp_path / "seq.ruvkv"
    with make_runtime(kind) as rt:
        feed = Feeder(rt, seed=11)
        a = feed.add()
        feed.step([a], [45])
        feed.step([a], [1])
        rt.save_sequence(a, path)
        with make_runtime(kind) as other:
            other.add_sequence()          # ids need not match
            b = other.load_sequence(path)
            assert other.position(b) == rt.position(a) == 46
            for layer in range(3):
                for x, y in zip(rt.get_kv(a, layer), other.get_kv(b, layer)):
                    np.testing.assert_array_equal(x, y)
            # both continue identically, and as the inputs say
            q, k, v = random_step_qkv(feed.rng, 2, rt.config)
            outs = []
            for r, s in ((rt, a), (other, b)):
                with r.step([s], [2]) as step:
                    outs.append([step.attention(layer, q, k, v).copy() for layer in range(3)])
            np.testing.assert_array_equal(outs[0], outs[1])
            for layer in range(3):
                feed.check(a, layer, q, outs[1][layer], 46, (k, v))
        c = rt.load_sequence(path)            # a copy next to the original
        assert rt.position(c) == 46 and rt.seq_len(c) == 46


def test_quantized_tiers_stay_quantized_on_disk(tmp_path):
    sizes = {}
    for kind in ("paged16", "two-tier-q4", "turbo"):
        with make_runtime(kind) as rt:
            feed = Feeder(rt, seed=12)
            a = feed.add()
            feed.step([a], [256], check=False)
            rt.save_sequence(a, tmp_path / kind)
            sizes[kind] = os.path.getsize(tmp_path / kind)
    # q4 codes (+ scales) for 240 of 256 tokens: well under half of fp16; turbo less still
    assert sizes["two-tier-q4"] < 0.5 * sizes["paged16"]
    assert sizes["turbo"] < 0.5 * sizes["paged16"]


def file_parts(data):
    """(preamble fields, header dict, body bytes after the header) of a sequence file as the
    format defines it: a 32-byte preamble (magic 8s, version u32, flags u32, header bytes
    u64, data bytes u64), a JSON header, zero padding to 64 bytes, the data, and the SHA-256
    of everything before it."""
    magic, version, flags, header_bytes, data_bytes = struct.unpack_from("<8sIIQQ", data)
    header = json.loads(data[32:32 + header_bytes])
    start = (32 + header_bytes + 63) // 64 * 64
    return (magic, version, flags), header, data[start:start + data_bytes]


def file_from_parts(preamble, header, payload):
    """A sequence file with a valid checksum around any header."""
    magic, version, flags = preamble
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    start = (32 + len(raw) + 63) // 64 * 64
    body = (struct.pack("<8sIIQQ", magic, version, flags, len(raw), len(payload)) + raw
            + bytes(start - 32 - len(raw)) + payload)
    return body + hashlib.sha256(body).digest()


def saved_sequence(rt, path, n_tokens, seed):
    """A sequence of n_tokens fed tokens, saved at path: (feeder, seq, file parts)."""
    feed = Feeder(rt, seed=seed)
    seq = feed.add()
    feed.step([seq], [n_tokens])
    rt.save_sequence(seq, path)
    return feed, seq, file_parts(path.read_bytes())


def test_the_file_layout_is_what_file_parts_reads(tmp_path):
    with make_runtime() as rt:
        _, a, (preamble, header, payload) = saved_sequence(rt, tmp_path / "a", 5, seed=27)
        assert header["format"] == "ruvpy-sequence" and header["position"] == 5
        (tmp_path / "b").write_bytes(file_from_parts(preamble, header, payload))
        b = rt.load_sequence(tmp_path / "b")
        for layer in range(3):
            for x, y in zip(rt.get_kv(a, layer), rt.get_kv(b, layer)):
                np.testing.assert_array_equal(x, y)


def test_a_valid_checksum_over_a_malformed_header_is_refused(tmp_path):
    """Someone rewrote the header and recomputed the checksum: every field the runtime reads
    is checked before the cache is touched."""
    with make_runtime() as rt:
        feed, a, (preamble, header, payload) = saved_sequence(rt, tmp_path / "good", 20, seed=13)
        before = runtime_snapshot(rt)
        bad = tmp_path / "bad"
        for name, edit in (
                ("not JSON", b"{not json"),
                ("not UTF-8", b"\xff\xfe{}"),
                ("a list", []),
                ("no directory", {k: v for k, v in header.items() if k != "arrays"}),
                ("another format", {**header, "format": "something-else"}),
                ("no config", {k: v for k, v in header.items() if k != "config"}),
                ("config of another runtime", {**header, "config": {**header["config"], "head_dim": 8}}),
                ("negative position", {**header, "position": -1}),
                ("position a string", {**header, "position": "20"}),
                ("position a float", {**header, "position": 20.0}),
                ("meta missing", {k: v for k, v in header.items() if k != "meta"}),
                ("meta a list", {**header, "meta": []}),
                ("meta of other lengths", {**header, "meta": {**header["meta"], "lengths": [99, 99, 99]}}),
                ("meta empty", {**header, "meta": {}}),
                ("an array dropped", {**header, "arrays": header["arrays"][1:]}),
        ):
            bad.write_bytes(file_from_parts(preamble, edit, payload))
            with pytest.raises(SequenceFileError):
                rt.load_sequence(bad)
            assert runtime_snapshot(rt) == before, name
        bad.write_bytes(file_from_parts(preamble, header, payload))
        feed.track(rt.load_sequence(bad), like=a)     # the untouched parts load


def test_loading_into_a_full_cache_or_past_the_sequence_limit_changes_nothing(tmp_path):
    with make_runtime(max_tokens=64) as rt:
        feed = Feeder(rt, seed=14)
        a = feed.add()
        feed.step([a], [40])
        rt.save_sequence(a, tmp_path / "a")
        before = runtime_snapshot(rt)
        with pytest.raises(KVCacheFull):          # 40 more tokens do not fit in 64
            rt.load_sequence(tmp_path / "a")
        assert runtime_snapshot(rt) == before
    with make_runtime(max_sequences=2) as rt:
        a, b = rt.add_sequence(), rt.add_sequence()
        with pytest.raises(KVCacheFull, match="max_sequences=2"):
            rt.load_sequence(tmp_path / "a")
        rt.remove_sequence(b)
        c = rt.load_sequence(tmp_path / "a")
        assert rt.position(c) == 40


def test_saving_while_a_step_on_the_sequence_is_open(tmp_path):
    with make_runtime() as rt:
        feed = Feeder(rt, seed=15)
        a, b = feed.add(), feed.add()
        feed.step([a, b], [5, 5])
        with rt.step([a], [1]) as step:
            with pytest.raises(RuntimeError, match="step"):
                rt.save_sequence(a, tmp_path / "a")
            rt.save_sequence(b, tmp_path / "b")          # another sequence: its committed state
            for layer in range(3):
                step.attention(layer, *random_step_qkv(feed.rng, 1, rt.config))
        assert not (tmp_path / "a").exists()
        with make_runtime() as other:
            assert other.position(other.load_sequence(tmp_path / "b")) == 5


def test_corrupt_truncated_or_mismatched_files_change_nothing(tmp_path):
    path = tmp_path / "seq.ruvkv"
    with make_runtime() as rt:
        feed = Feeder(rt, seed=16)
        a = feed.add()
        feed.step([a], [20])
        rt.save_sequence(a, path)
        good = path.read_bytes()
        before = runtime_snapshot(rt)
        bad = tmp_path / "bad.ruvkv"
        for damaged, words in ((good[:len(good) // 2], "truncated"),
                               (good[:100] + bytes([good[100] ^ 1]) + good[101:], "checksum"),
                               (good + b"\0", "trailing"),
                               (b"nonsense", "magic")):
            bad.write_bytes(damaged)
            with pytest.raises(SequenceFileError, match=words):
                rt.load_sequence(bad)
            assert runtime_snapshot(rt) == before
        for i in range(0, len(good), 13):                # any flipped byte is caught
            flipped = bytearray(good)
            flipped[i] ^= 0x10
            bad.write_bytes(bytes(flipped))
            with pytest.raises(SequenceFileError):
                rt.load_sequence(bad)
        assert runtime_snapshot(rt) == before
        with pytest.raises(FileNotFoundError):
            rt.load_sequence(tmp_path / "missing")
        for kind, changes, words in (("paged32", {}, "kv_dtype: file 'float16', runtime 'float32'"),
                                     ("paged16", {"head_dim": 8}, "head_dim"),
                                     ("paged16", {"num_layers": 2}, "num_layers"),
                                     ("two-tier-q4", {}, "kv_cache"),
                                     ("turbo", {}, "kv_cache")):
            with make_runtime(kind, **changes) as other:
                other_before = runtime_snapshot(other)
                with pytest.raises(SequenceFileError, match=words):
                    other.load_sequence(path)
                assert runtime_snapshot(other) == other_before
        with pytest.raises(KeyError):
            rt.save_sequence(7, tmp_path / "x")
        assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------
# statistics and threads
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["paged16", "two-tier-q4"])
def test_stats_report_the_runtime(kind):
    with make_runtime(kind, memory_budget=500_000) as warm:    # the kernels' scratch, warm
        warm_feed = Feeder(warm, seed=17)
        warm_feed.step([warm_feed.add(), warm_feed.add()], [50, 3], check=False)
    with make_runtime(kind, memory_budget=500_000) as rt:
        feed = Feeder(rt, seed=17)
        a, b = feed.add(), feed.add()
        gc.collect()
        base = heap_bytes_in_use()
        kv_before = rt.stats().kv["bytes"]
        feed.step([a, b], [50, 3], check=False)
        feed.fed.clear()
        gc.collect()
        grown = heap_bytes_in_use() - base
        s = rt.stats()
        # the KV bytes follow what the heap really gave the cache (the paged pool is
        # allocated up front: nothing moves)
        assert abs((s.kv["bytes"] - kv_before) - grown) <= HEAP_SLACK
        block = 16 * kv_bytes_per_token(rt.config)
        if kind == "paged16":
            assert s.kv["capacity_tokens"] == 1024
            assert 64 * block <= s.kv["bytes"] <= 64 * block + 64 * 1024     # pool + metadata
            # 50 tokens take 4 blocks, 3 take 1
            assert s.kv["tiers"] == {"paged": {"tokens": 53, "bytes": 5 * block}}
            assert [r["bytes"] for r in s.kv["sequences"]] == [4 * block, block]
        else:
            hot, cold = s.kv["tiers"]["hot"], s.kv["tiers"]["cold"]
            # a: 50 tokens, two groups of 16 migrated (18 stay hot: fewer than 16 + 16); b: 3
            assert (hot["tokens"], cold["tokens"]) == (18 + 3, 32)
            per_token = kv_bytes_per_token(rt.config)
            assert hot["bytes"] >= 19 * per_token
            # 4-bit codes plus the format's scales and outliers: between a quarter and half
            # of fp16
            assert 32 * per_token / 4 <= cold["bytes"] <= 32 * per_token / 2
        assert s.kv["tokens"] == 53
        assert sum(t["tokens"] for t in s.kv["tiers"].values()) == 53
        assert [r["layer"] for r in s.kv["layers"]] == [0, 1, 2]
        assert all(r["tokens"] == 53 for r in s.kv["layers"])
        assert [(r["seq"], r["position"], r["tokens"]) for r in s.kv["sequences"]] == \
            [(a, 50, 50), (b, 3, 3)]
        assert sum(r["bytes"] for r in s.kv["sequences"]) == s.kv["bytes_in_use"]
        assert s.arena["high_water_mark"] >= 53 * 4 * 16 * 4
        assert s.rss_bytes > 0 and s.steps == 1 and s.attention_calls == 3
        assert s.budget_used_pct == pytest.approx(100 * s.kv["bytes"] / 500_000)
        d = s.as_dict()
        assert json.loads(json.dumps(d)) == d
        text = s.format()
        for word in ("KV tiers", "KV per layer", "KV per sequence", "arena", "budget"):
            assert word in text


def test_thread_counts_agree_and_are_restored(two_threads):
    """threads=1 and threads=2 (context splits, sequences and heads in parallel) give the
    same attention, both right by the inputs; the process-wide thread count is as it was
    after the steps."""
    shape = dict(num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64)
    assert threads_chosen(1, 5001, 8, 2, 64, np.float16) == 2      # this decode goes parallel
    results = []
    for threads in (1, 2):
        with make_runtime(threads=threads, max_tokens=8192, **shape) as rt:
            feed = Feeder(rt, seed=14)
            seqs = [feed.add() for _ in range(3)]
            feed.step(seqs, [5000, 40, 5], check=False)
            outputs, _ = feed.step(seqs, [1, 1, 4])       # checked against the inputs
            results.append([out for _, _, _, out in outputs.values()])
            assert ruvpy.get_num_threads() == 2
    for one, two in zip(*results):
        assert np.abs(one - two).max() <= FP32_ATTENTION_BOUND * 5    # |v| < 5: float32 apart


def test_steps_from_two_python_threads_do_not_interleave():
    with make_runtime() as rt:
        feed = Feeder(rt, seed=17)
        a = feed.add()
        errors = []
        inside, tried = threading.Event(), threading.Event()

        def other_thread():
            assert inside.wait(60)
            try:
                with rt.step([a], [1]):
                    pass
            except RuntimeError as exc:
                errors.append(str(exc))
            finally:
                tried.set()

        t = threading.Thread(target=other_thread)
        t.start()
        with rt.step([a], [1]) as step:
            inside.set()
            assert tried.wait(60)          # the other thread has tried, and failed
            for layer in range(3):
                step.attention(layer, *random_step_qkv(feed.rng, 1, rt.config))
        t.join()
        assert errors and "another step is open" in errors[0]
        assert rt.position(a) == 1


@pytest.mark.parametrize("action", ["remove", "close"])
def test_removing_or_closing_while_another_thread_attends(action):
    """A second Python thread removes a sequence, or closes the runtime, while the first is
    stepping (its attention runs without the GIL): a remove inside a step is refused with a
    clear error (between steps it goes through and the next step says the sequence is
    unknown); a close abandons the step and later calls say the runtime is closed. Nothing
    crashes or reads freed memory, and every output that was returned is right."""
    cfg = RuntimeConfig(num_layers=2, num_heads=8, num_kv_heads=8, head_dim=128,
                        max_tokens=16384, arena_bytes=1 << 22)
    rt = Runtime(cfg)
    feed = Feeder(rt, seed=19)
    seqs = [feed.add() for _ in range(96)]          # 96 x 64 tokens: long decode steps, cheap prefill
    feed.step(seqs, [64] * 96, check=False)
    first_history = [feed.stored(seqs[0], layer) for layer in range(2)]
    started, errors, outputs = threading.Event(), [], []

    def decode():
        try:
            for _ in range(40):
                q, k, v = random_step_qkv(feed.rng, 96, cfg)
                with rt.step(seqs, [1] * 96) as step:
                    started.set()
                    for layer in range(2):
                        out = step.attention(layer, q, k, v)
                        outputs.append((layer, q[:1].copy(), k[:1].copy(), v[:1].copy(), out[:1].copy()))
                if rt.closed:
                    break
        except (RuntimeError, KeyError) as exc:
            errors.append(exc)

    t = threading.Thread(target=decode)
    t.start()
    assert started.wait(60)
    if action == "remove":
        try:
            rt.remove_sequence(seqs[0])
        except RuntimeError as exc:
            assert "while a step is open" in str(exc)
    else:
        rt.close()
    t.join()
    # every returned output of the first sequence is attention over its own inputs (its
    # tokens of earlier decode steps are not kept here: check the first step's outputs only)
    for layer, q, k, v, out in outputs[:2]:
        hk, hv = first_history[layer]
        assert_attention_close(out, q, np.concatenate([hk, as_stored_fp16(k)]),
                               np.concatenate([hv, as_stored_fp16(v)]))
    if action == "close":
        assert rt.closed and all("closed" in str(e) for e in errors)
    else:
        assert all(isinstance(e, KeyError) for e in errors)
        rt.close()


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
                q, k, v = random_step_qkv(rng, 20, rt.config)
                out = step.attention(layer, q, k, v)
                assert_attention_close(out, q, as_stored_fp16(k), as_stored_fp16(v))
            assert small.shape == (16,)
        stats = rt.stats()
        assert stats.arena_fallbacks == 3 and stats.steps == 1
        assert stats.arena["used"] == 0 and stats.arena["capacity"] == 4096


def test_runtimes_in_parallel_python_threads_stay_independent():
    """Each thread drives its own Runtime (the kernels release the GIL): every step's
    attention still equals the reference over that runtime's own inputs."""
    failures = []

    def worker(seed):
        try:
            with make_runtime("two-tier-q8" if seed % 2 else "paged16") as rt:
                feed = Feeder(rt, seed)
                seqs = [feed.add(), feed.add()]
                for _ in range(15):
                    feed.step(seqs, [int(feed.rng.integers(1, 9)), 1])
                assert rt.position(seqs[1]) == 15
        except BaseException as exc:       # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]


@pytest.mark.parametrize("kind", list(KINDS))
def test_shared_bytes_split_among_holders_add_up(kind):
    """A block / cold group shared by forks is split among its holders in whole bytes that add
    up to it: the per-sequence and per-layer bytes sum to bytes_in_use whatever the number of
    holders (floor division alone lost up to holders - 1 bytes per shared block or group)."""
    with make_runtime(kind) as rt:
        feed = Feeder(rt, seed=21)
        a, b = feed.add(), feed.add()
        feed.step([a, b], [40, 37])
        forks = [rt.fork_sequence(a) for _ in range(4)] + [rt.fork_sequence(b) for _ in range(2)]
        for f, parent in zip(forks, [a] * 4 + [b] * 2):
            feed.track(f, like=parent)
        feed.step([forks[0]], [3])            # one fork writes: its copies hold alone
        for s in (rt.stats(), rt.stats()):    # and a second pass splits the same way
            kv = s.kv
            assert sum(r["bytes"] for r in kv["sequences"]) == kv["bytes_in_use"], kv
            assert sum(r["bytes"] for r in kv["layers"]) == kv["bytes_in_use"], kv
        rt.remove_sequence(a)
        kv = rt.stats().kv
        assert sum(r["bytes"] for r in kv["sequences"]) == kv["bytes_in_use"]
