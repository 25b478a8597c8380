"""ruvpy.kvplan: per-layer TurboQuant widths. Its choice is the best worst layer any choice
within the budget reaches (brute force), the plan gives a harder layer more bits within the
uniform rate's bytes, and its cosines are what caches of its widths measure."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ruvpy import TwoTierKVCache, kvplan

from _helpers import random_kv


def test_candidates_are_every_width():
    c64 = kvplan.candidate_widths(64)
    assert len(c64) == 81 and (2.0, 2.0) in c64 and (4.0, 4.0) in c64 and (3.75, 3.25) in c64
    c128 = kvplan.candidate_widths(100)
    assert len(c128) == 17 * 17 and (2.125, 3.875) in c128
    for w in c64[::7]:
        TwoTierKVCache(1, 1, 64, cold="turbo", max_tokens=64, turbo_widths=[w]).close()


def _brute_force(cos, cost, budget):
    best = None
    for picks in itertools.product(range(cos.shape[1]), repeat=cos.shape[0]):
        if cost[list(picks)].sum() <= budget:
            worst = min(cos[l, j] for l, j in enumerate(picks))
            best = worst if best is None else max(best, worst)
    return best


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.data())
def test_the_choice_is_the_best_worst_layer_within_budget(layers, ncand, data):
    """_choose's worst layer is the best any choice within the budget reaches (brute force),
    it stays within the budget, and no layer could be lifted with what it leaves."""
    cos = np.array(data.draw(st.lists(st.lists(st.sampled_from([0.9, 0.95, 0.97, 0.98, 0.99, 0.999]),
                                               min_size=ncand, max_size=ncand),
                                      min_size=layers, max_size=layers)))
    cost = np.array(data.draw(st.lists(st.integers(1, 9), min_size=ncand, max_size=ncand)))
    budget = data.draw(st.integers(int(cost.min()) * layers, int(cost.max()) * layers))
    picks = kvplan._choose(cos, cost, budget)
    assert cost[picks].sum() <= budget
    assert min(cos[l, j] for l, j in enumerate(picks)) == _brute_force(cos, cost, budget)
    left = budget - cost[picks].sum()
    for l, j in enumerate(picks):
        assert not any(cos[l, c] > cos[l, j] and cost[c] - cost[j] <= left for c in range(ncand))


def test_the_plan_lifts_the_worst_layer_within_the_uniform_bytes():
    """On captured Q/K/V where one layer is harder (sharper attention: its errors do not
    average out over many tokens), the plan gives it more bits than the other, its worst
    layer is at least the uniform rate's, and its groups take no more bytes."""
    rng = np.random.default_rng(2)
    n, H, kvh, d = 256, 4, 2, 64
    captured = {}
    for layer, sharpness in enumerate((0.25, 3.0)):
        q = rng.standard_normal((n, H, d)).astype(np.float32) * sharpness
        captured[layer] = (q, *random_kv(rng, n, kvh, d))
    cands = [(3.0, 3.0), (3.75, 3.0), (4.0, 3.0), (3.5, 3.0), (4.0, 3.5), (3.25, 2.75)]
    plan = kvplan.plan_from_captured(captured, bits=3.5, candidates=cands)
    assert plan.group_bytes <= plan.uniform_group_bytes
    assert min(plan.cosines) >= min(plan.uniform_cosines)
    bits = lambda w: w[0] + w[1]
    assert bits(plan.widths[1]) > bits(plan.widths[0])
    # the plan's cosines are what a cache of its widths measures
    q, k, v = captured[1]
    ref = kvplan.exact_attention(q, k, v)
    assert kvplan.attention_cosines(q, k, v, ref, plan.widths[1]) == plan.cosines[1]
    assert plan.worst == (int(np.argmin(plan.cosines)), min(plan.cosines))
    with pytest.raises(ValueError, match="2 x migration_batch"):
        kvplan.plan_from_captured({0: (q[:100], k[:100], v[:100])})
    # (found by review: an empty capture raised KeyError, and layers' shapes went unchecked)
    with pytest.raises(ValueError, match="layers 0 .. n-1"):
        kvplan.plan_from_captured({})
    with pytest.raises(ValueError, match="captured layer 1"):
        kvplan.plan_from_captured({0: captured[0], 1: (q[:, :, :32], k[:, :, :32], v[:, :, :32])})
