"""A hypothesis state machine over the public Runtime API.

Rules add, fork and remove sequences; run steps of random shapes (prefill and decode mixed,
several sequences at once); abandon steps midway by raising; mix in bad calls (wrong shapes,
unknown ids, layers out of range, loose or huge token counts, more tokens than the cache
holds, out overlapping q, objects whose __float__ / __index__ / __hash__ run code); save and
load sequences (bytes and files), truncate them, and reset the runtime.

After every rule it checks that
- the accounting equals a pure-Python model: the live sequences, each one's position and
  length in every layer, and (paged) the blocks in use, predicted from the block tables of
  a model of the copy-on-write pool (so the model also predicts exactly when KVCacheFull
  must come);
- attention equals float64 attention over the model's K/V (what was fed in, rounded as the
  cache stores it) within tests/_helpers.py's float32 bound;
- a call that failed changed nothing (a runtime snapshot before and after).

Runs: `ci` (500 examples x 50 steps, what .ci/run's plain `pytest` runs) by default;
RUVPY_STATEFUL_PROFILE=quick (50 x 30) for iterating.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import ruvpy
from ruvpy import KVCacheFull
from ruvpy.runtime import IncompleteStepError
from ruvpy.seqfile import SequenceFileError

from _helpers import (FP32_ATTENTION_BOUND, Evil, EvilCount, EvilId, attention_error,
                      reference_attention, runtime_snapshot)

settings.register_profile("ci", max_examples=500, stateful_step_count=50, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("quick", max_examples=50, stateful_step_count=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("RUVPY_STATEFUL_PROFILE", "ci")

LAYERS, HEADS, KV_HEADS, DIM = 2, 4, 2, 8
BLOCK = 4
MAX_TOKENS = 48
MAX_SEQUENCES = 6      # the machine's own limit (the runtime has none): keeps each rule cheap


class Injected(Exception):
    """What a rule raises inside a step to abandon it."""


class SeqModel:
    """What the model knows of one sequence: its K/V per layer as the cache stores them
    (float64 copies), its position and (paged) its block table."""

    def __init__(self, k=None, v=None, position=0, blocks=()):
        empty = np.zeros((0, KV_HEADS, DIM))
        self.k = list(k) if k is not None else [empty] * LAYERS
        self.v = list(v) if v is not None else [empty] * LAYERS
        self.position = position
        self.blocks = list(blocks)

    @property
    def length(self):
        return len(self.k[0])

    def copy(self):
        return SeqModel(self.k, self.v, self.position, self.blocks)


class RuntimeMachine(RuleBasedStateMachine):
    KV_CACHE = "paged"

    def __init__(self):
        super().__init__()
        self.rng = np.random.default_rng(0)
        self.rt = None
        self.seqs = {}
        self.next_block = 0

    # -- setup and model helpers --------------------------------------------------------
    @initialize(seed=st.integers(0, 2 ** 32 - 1))
    def start(self, seed):
        self.rng = np.random.default_rng(seed)
        options = dict(kv_dtype="float32", block_size=BLOCK) if self.KV_CACHE == "paged" else \
            dict(hot_tokens=64, migration_batch=16, group_size=8, cold="q8")
        cfg = ruvpy.RuntimeConfig(num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS,
                                  head_dim=DIM, max_tokens=MAX_TOKENS, kv_cache=self.KV_CACHE,
                                  arena_bytes=1 << 16, **options)
        self.rt = ruvpy.Runtime(cfg)
        self.capacity = self.rt.capacity_tokens
        if self.KV_CACHE == "paged":
            self.total_blocks = self.rt.stats().kv["details"]["blocks_total"]

    def teardown(self):
        if self.rt is not None:
            self.rt.close()

    def stored(self, x):
        """x as the cache stores it, in float64."""
        x = np.asarray(x, np.float32)
        if self.KV_CACHE != "paged":
            x = x.astype(np.float16)
        return x.astype(np.float64)

    def blocks_for(self, n):
        return -(-n // BLOCK)

    def refcounts(self):
        counts = {}
        for model in self.seqs.values():
            for b in model.blocks:
                counts[b] = counts.get(b, 0) + 1
        return counts

    def step_fits(self, seqs, counts):
        """Whether a step of counts[i] tokens for seqs[i] fits (the pool's blocks, or the
        two-tier cache's max_tokens), as the cache must decide it."""
        if self.KV_CACHE != "paged":
            used = sum(m.length for m in self.seqs.values())
            return used + sum(counts) <= self.capacity
        refs = self.refcounts()
        need, writers = 0, {}
        for s, n in zip(seqs, counts):
            model = self.seqs[s]
            need += max(0, self.blocks_for(model.length + n) - len(model.blocks))
            for b in model.blocks[model.length // BLOCK:]:
                if refs[b] > 1:
                    writers[b] = writers.get(b, 0) + 1
        # every writer of a shared block copies it: inside the step's transaction the block a
        # writer leaves stays held for a rollback, so the last writer does not find it unshared
        need += sum(writers.values())
        free = self.total_blocks - len(refs)
        return need <= free

    def fork_fits(self, seq):
        if self.KV_CACHE == "paged":
            return True           # a fork shares every block
        used = sum(m.length for m in self.seqs.values())
        return used + self.seqs[seq].length <= self.capacity

    def new_block(self):
        self.next_block += 1
        return self.next_block

    def apply_step(self, seqs, counts, ks, vs):
        """The model after a committed step (paged: copy-on-write of the written blocks shared
        when the step began -- every writer copies, the transaction holding the block it
        leaves -- then new blocks)."""
        refs = self.refcounts()
        for s, n, k, v in zip(seqs, counts, ks, vs):
            model = self.seqs[s]
            if self.KV_CACHE == "paged":
                for i in range(model.length // BLOCK, len(model.blocks)):
                    if refs[model.blocks[i]] > 1:
                        model.blocks[i] = self.new_block()
                while len(model.blocks) < self.blocks_for(model.length + n):
                    model.blocks.append(self.new_block())
            for layer in range(LAYERS):
                model.k[layer] = np.concatenate([model.k[layer], self.stored(k[layer])])
                model.v[layer] = np.concatenate([model.v[layer], self.stored(v[layer])])
            model.position += n

    def random_layer_inputs(self, total):
        q = self.rng.standard_normal((total, HEADS, DIM)).astype(np.float32)
        k = self.rng.standard_normal((total, KV_HEADS, DIM)).astype(np.float32)
        v = self.rng.standard_normal((total, KV_HEADS, DIM)).astype(np.float32)
        return q, k, v

    def expect_unchanged(self, before, call, *errors):
        """call() must raise one of errors and leave the runtime exactly as it was."""
        try:
            call()
        except errors:
            pass
        else:
            raise AssertionError(f"{call} should have raised one of {errors}")
        assert runtime_snapshot(self.rt) == before

    # -- sequences ------------------------------------------------------------------------
    @precondition(lambda self: len(self.seqs) < MAX_SEQUENCES)
    @rule()
    def add_sequence(self):
        seq = self.rt.add_sequence()
        assert seq not in self.seqs
        self.seqs[seq] = SeqModel()

    @precondition(lambda self: 0 < len(self.seqs) < MAX_SEQUENCES)
    @rule(data=st.data())
    def fork_sequence(self, data):
        seq = data.draw(st.sampled_from(sorted(self.seqs)))
        if not self.fork_fits(seq):
            self.expect_unchanged(runtime_snapshot(self.rt), lambda: self.rt.fork_sequence(seq),
                                  KVCacheFull)
            return
        child = self.rt.fork_sequence(seq)
        self.seqs[child] = self.seqs[seq].copy()

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def remove_sequence(self, data):
        seq = data.draw(st.sampled_from(sorted(self.seqs)))
        self.rt.remove_sequence(seq)
        del self.seqs[seq]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def truncate_sequence(self, data):
        seq = data.draw(st.sampled_from(sorted(self.seqs)))
        model = self.seqs[seq]
        n = data.draw(st.integers(0, model.position + 2))
        self.rt.truncate_sequence(seq, n)
        if n < model.position:
            for layer in range(LAYERS):
                model.k[layer], model.v[layer] = model.k[layer][:n], model.v[layer][:n]
            model.position = n
            model.blocks = model.blocks[:self.blocks_for(n)]

    @rule()
    def reset(self):
        self.rt.reset()
        self.seqs = {}

    # -- steps --------------------------------------------------------------------------------
    def draw_step(self, data):
        ids = sorted(self.seqs)
        seqs = data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=min(3, len(ids)),
                                  unique=True))
        counts = [data.draw(st.integers(1, 9 if i == 0 else 3)) for i in range(len(seqs))]
        return seqs, counts

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), bad_calls=st.booleans())
    def step(self, data, bad_calls):
        """A whole step; with bad_calls, refused calls inside it first (each must leave the
        layer unchanged, and the step then completes)."""
        seqs, counts = self.draw_step(data)
        if not self.step_fits(seqs, counts):
            def too_many():
                with self.rt.step(seqs, counts):
                    raise AssertionError("a step that does not fit was opened")
            self.expect_unchanged(runtime_snapshot(self.rt), too_many, KVCacheFull)
            return
        total = sum(counts)
        inputs = [self.random_layer_inputs(total) for _ in range(LAYERS)]
        outs = []
        with self.rt.step(seqs, counts) as step:
            expected = np.concatenate([np.arange(self.seqs[s].position, self.seqs[s].position + n)
                                       for s, n in zip(seqs, counts)])
            assert np.array_equal(step.positions, expected)
            for layer, (q, k, v) in enumerate(inputs):
                if bad_calls:
                    self.bad_layer_calls(data, step, layer, q, k, v)
                outs.append(step.attention(layer, q, k, v).copy())
        ks = [[inputs[l][1][o:o + n] for l in range(LAYERS)] for o, n in self.offsets(counts)]
        vs = [[inputs[l][2][o:o + n] for l in range(LAYERS)] for o, n in self.offsets(counts)]
        self.apply_step(seqs, counts, ks, vs)
        for layer in range(LAYERS):
            q = inputs[layer][0]
            for (o, n), s in zip(self.offsets(counts), seqs):
                model = self.seqs[s]
                ref = reference_attention(q[o:o + n], model.k[layer], model.v[layer])
                err = attention_error(outs[layer][o:o + n], ref, model.v[layer])
                assert err <= FP32_ATTENTION_BOUND, (layer, s, err)

    @staticmethod
    def offsets(counts):
        o, out = 0, []
        for n in counts:
            out.append((o, n))
            o += n
        return out

    def bad_layer_calls(self, data, step, layer, q, k, v):
        total = q.shape[0]
        kind = data.draw(st.sampled_from(["shape", "layer", "dtype", "overlap", "scale",
                                          "evil-scale"]))
        if kind == "shape":
            calls = [lambda: step.attention(layer, q[:total - 1] if total > 1 else q[:, :2], k, v),
                     lambda: step.attention(layer, q, k[:, :1], v[:, :1])]
        elif kind == "layer":
            calls = [lambda: step.attention(LAYERS, q, k, v), lambda: step.attention(-1, q, k, v),
                     lambda: step.attention("0", q, k, v)]
        elif kind == "dtype":
            calls = [lambda: step.attention(layer, q.astype(np.float64), k, v),
                     lambda: step.attention(layer, q, k.astype(np.float16), v)]
        elif kind == "overlap":
            calls = [lambda: step.attention(layer, q, k, v, out=q[::-1])] if total > 1 else \
                [lambda: step.attention(layer, q, k, v, out=q[:, ::-1])]
        elif kind == "scale":
            calls = [lambda: step.attention(layer, q, k, v, scale=1e300),
                     lambda: step.attention(layer, q, k, v, scale=float("nan"))]
        else:
            victim = q.copy()
            shrink = Evil(0.5, lambda: victim.resize((1, 1, 1), refcheck=False))
            calls = [lambda: step.attention(layer, victim, k, v, scale=shrink)]
        for call in calls:
            with pytest.raises((ValueError, TypeError)):
                call()
        assert layer not in step.attended_layers

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), layers_done=st.integers(0, LAYERS), raising=st.booleans())
    def step_abandoned_midway(self, data, layers_done, raising):
        """A step that raises after layers_done layers, or whose block ends normally with
        layers unattended (IncompleteStepError): rolled back, nothing changed."""
        seqs, counts = self.draw_step(data)
        if not self.step_fits(seqs, counts):
            return
        raising = raising or layers_done == LAYERS
        before = runtime_snapshot(self.rt)

        def abandoned():
            with self.rt.step(seqs, counts) as step:
                for layer in range(layers_done):
                    step.attention(layer, *self.random_layer_inputs(sum(counts)))
                if raising:
                    raise Injected()

        self.expect_unchanged(before, abandoned, Injected if raising else IncompleteStepError)

    # -- bad calls outside steps -------------------------------------------------------------
    @rule(data=st.data())
    def bad_call(self, data):
        rt = self.rt
        before = runtime_snapshot(rt)
        unknown = max(self.seqs, default=-1) + 1000
        live = sorted(self.seqs)
        some = live[0] if live else unknown
        kind = data.draw(st.sampled_from(["unknown", "counts", "huge", "budget", "reentry",
                                          "evil-id", "layer"]))
        if kind == "unknown":
            self.expect_unchanged(before, lambda: rt.step([unknown], [1]).__enter__(), KeyError)
            self.expect_unchanged(before, lambda: rt.fork_sequence(unknown), KeyError)
            self.expect_unchanged(before, lambda: rt.remove_sequence(unknown), KeyError)
            self.expect_unchanged(before, lambda: rt.truncate_sequence(unknown, 0), KeyError)
            self.expect_unchanged(before, lambda: rt.save_sequence(unknown, os.devnull), KeyError)
        elif kind == "counts" and live:
            for n in ("5", 2.9, 5.0, True, None):
                self.expect_unchanged(before, lambda: rt.step([some], [n]), TypeError)
                self.expect_unchanged(before, lambda: rt.truncate_sequence(some, n), TypeError)
            self.expect_unchanged(before, lambda: rt.step([some], [0]), ValueError)
            self.expect_unchanged(before, lambda: rt.step([some, some], [1, 1]), ValueError)
        elif kind == "huge" and live:
            for n in (2 ** 31, 2 ** 63 - 1, 2 ** 64):
                def huge():
                    with rt.step([some], [n]):
                        raise AssertionError("opened")
                self.expect_unchanged(before, huge, ValueError)
        elif kind == "budget" and live:
            def too_many():
                with rt.step([some], [MAX_TOKENS + 1]):
                    raise AssertionError("opened")
            self.expect_unchanged(before, too_many, KVCacheFull)
        elif kind == "reentry" and live:
            # conversions run before any lock: calling back into the cache and the runtime
            # from them works; the bad count is then refused, nothing changed
            EvilCount.callback = lambda: (rt.cache.sequences(), rt.memory_bytes())
            self.expect_unchanged(before, lambda: rt.cache.reserve([some], [EvilCount(2 ** 40)]),
                                  ValueError)
        elif kind == "evil-id" and live:
            EvilId.callback = lambda: (rt.cache.seq_len(some), rt.seq_len(some))
            self.expect_unchanged(before, lambda: rt.cache.fork(EvilId(unknown)), KeyError)
            assert EvilId.callback is None, "the id's conversion did not run"
        elif kind == "layer" and live:
            self.expect_unchanged(before, lambda: rt.seq_len(some, LAYERS), ValueError)
            self.expect_unchanged(before, lambda: rt.get_kv(some, -1), ValueError)

    # -- persistence ----------------------------------------------------------------------------
    @precondition(lambda self: 0 < len(self.seqs) < MAX_SEQUENCES)
    @rule(data=st.data(), through_file=st.booleans())
    def save_and_load(self, data, through_file):
        seq = data.draw(st.sampled_from(sorted(self.seqs)))
        model = self.seqs[seq]
        if through_file:
            import tempfile
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "seq.ruvpy")
                self.rt.save_sequence(seq, path)
                blob = open(path, "rb").read()
                load = lambda: self.rt.load_sequence(path)       # noqa: E731
                fits = self.fits_copy(model)
                if fits:
                    loaded = load()
                else:
                    self.expect_unchanged(runtime_snapshot(self.rt), load, KVCacheFull)
        else:
            blob = self.rt.export_sequence(seq)
            fits = self.fits_copy(model)
            if fits:
                loaded = self.rt.import_sequence(blob)
            else:
                self.expect_unchanged(runtime_snapshot(self.rt),
                                      lambda: self.rt.import_sequence(blob), KVCacheFull)
        if fits:
            copy = SeqModel(model.k, model.v, model.position)
            copy.blocks = [self.new_block() for _ in range(self.blocks_for(model.length))]
            self.seqs[loaded] = copy
        # a corrupted copy is refused and changes nothing
        broken = bytearray(blob)
        broken[data.draw(st.integers(0, len(broken) - 1))] ^= 0x41
        self.expect_unchanged(runtime_snapshot(self.rt), lambda: self.rt.import_sequence(bytes(broken)),
                              SequenceFileError)

    def fits_copy(self, model):
        if self.KV_CACHE == "paged":
            return self.blocks_for(model.length) <= self.total_blocks - len(self.refcounts())
        return sum(m.length for m in self.seqs.values()) + model.length <= self.capacity

    # -- what must hold after every rule ----------------------------------------------------------
    @invariant()
    def accounting_matches_the_model(self):
        if self.rt is None:
            return
        rt = self.rt
        assert rt.sequences == list(self.seqs)
        for seq, model in self.seqs.items():
            assert rt.position(seq) == model.position
            assert [rt.seq_len(seq, layer) for layer in range(LAYERS)] == [model.length] * LAYERS
        kv = rt.stats().kv
        assert kv["tokens"] == sum(m.length for m in self.seqs.values())
        if self.KV_CACHE == "paged":
            details = kv["details"]
            assert details["blocks_used"] == len(self.refcounts())
            assert details["blocks_free"] == self.total_blocks - len(self.refcounts())
            for seq, model in self.seqs.items():
                assert len(rt.cache.block_table(seq)) == len(model.blocks)

    @invariant()
    def attention_matches_float64(self):
        if self.rt is None:
            return
        for seq, model in self.seqs.items():
            if model.length == 0:
                continue
            for layer in range(LAYERS):
                q = self.rng.standard_normal((2, HEADS, DIM)).astype(np.float32)
                out = self.rt.cache.attention(seq, layer, q, causal=False)
                ref = reference_attention(q, model.k[layer], model.v[layer], causal=False)
                err = attention_error(out, ref, model.v[layer])
                assert err <= FP32_ATTENTION_BOUND, (seq, layer, err)


class TwoTierMachine(RuntimeMachine):
    """The same over a two-tier cache (hot tier only: hot_tokens is above max_tokens, so every
    token stays fp16 and float64 attention over the rounded inputs is exact to float32)."""
    KV_CACHE = "two-tier"


TestRuntimePaged = RuntimeMachine.TestCase
TestRuntimePaged.settings = settings.get_profile(PROFILE)
TestRuntimeTwoTier = TwoTierMachine.TestCase
TestRuntimeTwoTier.settings = settings.get_profile(PROFILE)
