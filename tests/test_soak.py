"""2,000-step decode soak through the Runtime with a memory budget: after warm-up the process
does not grow (RSS < 5 MiB), the arena's high-water mark does not move, and the KV cache
never holds more bytes than the budget -- with sequences forked and removed along the way."""
import gc

import numpy as np
import psutil
import pytest

from ruvpy.runtime import Runtime, RuntimeConfig

STEPS = 2000
WARMUP = 200
MiB = 1 << 20


@pytest.mark.parametrize("options", [
    # enough budget for every token of the soak
    dict(kv_cache="paged", memory_budget=2 * 1024 * 1024),
    # a budget the soak overruns: the oldest cold groups are evicted as it goes
    dict(kv_cache="two-tier", cold="q4", hot_tokens=64, group_size=32, migration_batch=32,
         policy="evict-oldest", memory_budget=256 * 1024, max_sequences=3),
], ids=["paged-fits", "two-tier-q4-evicting"])
def test_decode_soak(options):
    cfg = RuntimeConfig(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                        arena_bytes=1 * MiB, **options)
    budget = cfg.memory_budget
    rng = np.random.default_rng(0)
    process = psutil.Process()
    # q/k/v for every step come from one preallocated pool (the soak measures the runtime,
    # not numpy's random generator)
    q_pool = rng.standard_normal((64, 2, 4, 32)).astype(np.float32)
    kv_pool = rng.standard_normal((64, 2, 2, 32)).astype(np.float32)
    with Runtime(cfg) as rt:
        main, side = rt.add_sequence(), rt.add_sequence()
        branch = None
        rss_after_warmup = high_water_after_warmup = None
        for i in range(STEPS):
            seqs = [main, side] if branch is None else [main, side, branch]
            n = len(seqs)
            j = i % 60
            with rt.step(seqs, [1] * n) as step:
                for layer in range(cfg.num_layers):
                    out = step.attention(layer, q_pool[j:j + n, layer], kv_pool[j:j + n, 0],
                                         kv_pool[j + 1:j + 1 + n, 1])
                assert np.isfinite(out).all()
            kv_bytes = rt.cache.nbytes
            assert kv_bytes <= budget, f"step {i}: KV holds {kv_bytes} bytes > budget {budget}"
            # a branch lives for 50 steps out of every 100; the side sequence restarts
            # every 700 (alloc/free churn in the cache)
            if i % 100 == 10:
                # a two-tier fork counts the copy's tokens against max_tokens: in a cache the
                # soak keeps full by eviction it would not fit, so there a branch is new
                branch = rt.fork_sequence(main) if cfg.kv_cache == "paged" else \
                    rt.add_sequence()
            elif i % 100 == 60:
                rt.remove_sequence(branch)
                branch = None
            if i % 700 == 699:
                rt.remove_sequence(side)
                side = rt.add_sequence()
            if i == WARMUP:
                gc.collect()
                rss_after_warmup = process.memory_info().rss
                high_water_after_warmup = rt.arena.stats().high_water_mark
        gc.collect()
        stats = rt.stats()
        growth = process.memory_info().rss - rss_after_warmup
        assert growth < 5 * MiB, f"RSS grew {growth / MiB:.2f} MiB after warm-up"
        assert stats.arena["high_water_mark"] == high_water_after_warmup
        assert stats.steps == STEPS and stats.rollbacks == 0 and stats.arena_fallbacks == 0
        assert stats.kv["bytes"] <= budget
        assert rt.position(main) == STEPS
        if cfg.policy == "evict-oldest":
            assert rt.seq_len(main) < STEPS        # the budget really was overrun
        else:
            assert rt.seq_len(main) == STEPS
