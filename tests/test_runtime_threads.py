"""Threads belong to the Runtime, not the process: two Runtimes with different `threads`,
stepping at the same time in two Python threads, compute exactly what each computes alone,
and nobody's ruvpy.get_num_threads() moves (inside a step the stepping thread reports its
Runtime's count: a per-thread setting, never the process-wide one)."""
import threading

import numpy as np
import pytest

import ruvpy
from ruvpy import Runtime, RuntimeConfig

# long enough contexts that two threads are really used (the team is sized by the work)
SHAPE = dict(num_layers=3, num_heads=16, num_kv_heads=4, head_dim=64)
CONTEXT, STEPS = 4096, 24


def drive(threads, kv_cache, seed, seen_counts=None, start=None):
    """A Runtime of `threads` filled to CONTEXT tokens, then STEPS decode steps; returns
    every step's attention outputs (and records get_num_threads() inside its steps)."""
    rng = np.random.default_rng(seed)
    cfg = RuntimeConfig(**SHAPE, max_tokens=CONTEXT + STEPS + 16, threads=threads, kv_cache=kv_cache)
    H, KVH, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    outputs = []
    with Runtime(cfg) as rt:
        seq = rt.add_sequence()
        for chunk in (CONTEXT // 2, CONTEXT // 2):
            with rt.step([seq], [chunk]) as step:
                for layer in range(cfg.num_layers):
                    step.attention(layer, rng.standard_normal((chunk, H, D), dtype=np.float32),
                                   rng.standard_normal((chunk, KVH, D), dtype=np.float32),
                                   rng.standard_normal((chunk, KVH, D), dtype=np.float32))
        if start is not None:
            start.wait()
        for _ in range(STEPS):
            with rt.step([seq], [1]) as step:
                if seen_counts is not None:
                    seen_counts.append(ruvpy.get_num_threads())
                for layer in range(cfg.num_layers):
                    out = step.attention(layer, rng.standard_normal((1, H, D), dtype=np.float32),
                                         rng.standard_normal((1, KVH, D), dtype=np.float32),
                                         rng.standard_normal((1, KVH, D), dtype=np.float32))
                    outputs.append(out.copy())
        team = rt.cache.plan([seq], [1], num_heads=H, threads=threads).team
    return np.array(outputs), team


@pytest.mark.parametrize("kv_cache", ["paged", "two-tier"])
def test_runtimes_with_different_threads_step_concurrently_like_alone(kv_cache):
    previous = ruvpy.get_num_threads()
    ruvpy.set_num_threads(1)          # the process-wide count: neither runtime may change it
    try:
        alone = {t: drive(t, kv_cache, seed=t) for t in (1, 2)}
        assert alone[2][1] == 2 and alone[1][1] == 1      # the threads=2 runtime is parallel
        results, counts, errors = {}, {1: [], 2: []}, []
        start = threading.Barrier(2)

        def worker(t):
            try:
                results[t] = drive(t, kv_cache, seed=t, seen_counts=counts[t], start=start)
                counts[t].append(("after", ruvpy.get_num_threads()))
            except BaseException as exc:
                errors.append(exc)

        workers = [threading.Thread(target=worker, args=(t,)) for t in (1, 2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert not errors, errors[0]
        for t in (1, 2):
            # bit for bit what the runtime computed alone
            np.testing.assert_array_equal(results[t][0], alone[t][0])
            assert counts[t][:-1] == [t] * STEPS            # its own count inside its steps
            assert counts[t][-1] == ("after", 1)            # the process-wide one after
        assert ruvpy.get_num_threads() == 1
    finally:
        ruvpy.set_num_threads(previous)
    assert ruvpy.get_num_threads() == previous


def test_a_runtime_passes_its_threads_to_every_kernel_call():
    """With the process-wide count at 1, a threads=2 runtime's plans still use two threads,
    and the process-wide count is read (never set) by a runtime without threads."""
    previous = ruvpy.get_num_threads()
    ruvpy.set_num_threads(1)
    try:
        cfg = RuntimeConfig(**SHAPE, max_tokens=CONTEXT + 16, threads=2)
        with Runtime(cfg) as rt:
            seq = rt.add_sequence()
            rng = np.random.default_rng(3)
            with rt.step([seq], [CONTEXT]) as step:
                for layer in range(cfg.num_layers):
                    step.attention(layer, rng.standard_normal((CONTEXT, 16, 64), dtype=np.float32),
                                   rng.standard_normal((CONTEXT, 4, 64), dtype=np.float32),
                                   rng.standard_normal((CONTEXT, 4, 64), dtype=np.float32))
            assert ruvpy.get_num_threads() == 1
            assert rt.cache.plan([seq], [1], num_heads=16, threads=2).team == 2
            assert rt.cache.plan([seq], [1], num_heads=16).team == 1     # threads=None: the process's
    finally:
        ruvpy.set_num_threads(previous)
