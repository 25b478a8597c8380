"""RuvpyCache.crop (speculative decoding, re-generation) against DynamicCache.crop, through
Runtime.truncate_sequence. float32 K/V: the same float32 attention as sdpa in another summation
order, so tokens are identical and logits within 1e-5 of their range (see test_hf.py)."""
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf import (VOCAB, assert_same_float32_logits, dynamic, generate,  # noqa: E402
                     left_pad, prompts, tiny_model)

from ruvpy.hf import RuvpyCache  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=12)


def _feed(model, cache, ids, mask=None):
    with torch.inference_mode():
        return model(ids, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1]


def test_crop_then_continue_equals_dynamic_cache(model):
    ids, mask = left_pad(prompts([12, 5, 9], seed=4))
    ours, theirs = RuvpyCache(model, kv_dtype="float32"), dynamic(model)
    more = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(1))
    full_mask = torch.cat([mask, torch.ones(3, 6, dtype=mask.dtype)], 1)
    for cache in (ours, theirs):
        _feed(model, cache, ids, mask)
        _feed(model, cache, more, full_mask)
    stored = [ours.runtime.seq_len(s) for s in ours.sequences]
    ours.crop(-4)
    theirs.crop(-4)
    assert ours.get_seq_length() == theirs.get_seq_length() == ids.shape[1] + 2
    assert [ours.runtime.seq_len(s) for s in ours.sequences] == [n - 4 for n in stored]
    step = torch.tensor([[7], [8], [9]])
    step_mask = torch.cat([full_mask[:, :-4], torch.ones(3, 1, dtype=mask.dtype)], 1)
    assert_same_float32_logits(_feed(model, ours, step, step_mask),
                               _feed(model, theirs, step, step_mask))


def test_crop_into_the_padding_of_a_row(model):
    """Cropping columns that were pads for one row removes only the tokens that row stored."""
    ids, mask = left_pad(prompts([10, 3], seed=8))
    cache = RuvpyCache(model, kv_dtype="float32")
    _feed(model, cache, ids, mask)
    cache.crop(-8)                           # row 1 stored only the last 3 of these columns
    assert [cache.runtime.seq_len(s) for s in cache.sequences] == [2, 0]
    assert cache.get_seq_length() == 2
    reference = dynamic(model)
    _feed(model, reference, ids[:, :2], mask[:, :2])
    step_mask = torch.cat([mask[:, :2], torch.ones(2, 1, dtype=mask.dtype)], 1)
    assert_same_float32_logits(_feed(model, cache, torch.tensor([[4], [5]]), step_mask),
                               _feed(model, reference, torch.tensor([[4], [5]]), step_mask))


def test_crop_for_regeneration(model):
    ids = prompts([8], seed=3)[0][None]
    ours, theirs = RuvpyCache(model, kv_dtype="float32"), dynamic(model)
    first = generate(model, ids, cache=ours, n=12)
    assert torch.equal(first, generate(model, ids, cache=theirs, n=12))
    for cache in (ours, theirs):
        cache.crop(-7)                         # back to the prompt and 4 generated tokens
    again = first[:, :ids.shape[1] + 5]
    assert torch.equal(generate(model, again, cache=ours, n=10),
                       generate(model, again, cache=theirs, n=10))


def test_speculative_decoding_with_an_assistant(model):
    """Assisted generation crops the main model's cache by the rejected draft tokens."""
    draft = tiny_model(seed=13, layers=1)
    ids = prompts([9], seed=5)[0][None]
    expected = generate(model, ids, cache=dynamic(model), n=20)
    got = generate(model, ids, cache=RuvpyCache(model, kv_dtype="float32"), n=20,
                   assistant_model=draft)
    assert torch.equal(got, expected)


def test_crop_edge_cases(model):
    cache = RuvpyCache(model, kv_dtype="float32")
    cache.crop(-3)                             # empty cache: nothing to do
    _feed(model, cache, prompts([6])[0][None])
    cache.crop(0)
    assert cache.get_seq_length() == 6
    cache.crop(-100)                           # more than it holds: everything, as DynamicCache
    assert cache.get_seq_length() == 0 and cache.runtime.seq_len(cache.sequences[0]) == 0
    with pytest.raises(ValueError, match="positive value"):
        cache.crop(2)
    with pytest.raises(TypeError, match="int"):
        cache.crop(-1.5)
    assert cache.is_croppable


def test_crop_two_tier_reaches_into_the_cold_tier(model):
    cache = RuvpyCache(model, kv_cache="two-tier", cold="q8", hot_tokens=8, migration_batch=8)
    ids = prompts([40], seed=6)[0][None]
    _feed(model, cache, ids)
    assert cache.runtime.stats().kv["tiers"]["cold"]["tokens"] >= 24
    cache.crop(-30)
    assert cache.get_seq_length() == 10 and cache.runtime.seq_len(cache.sequences[0]) == 10
    reference = dynamic(model)
    _feed(model, reference, ids[:, :10])
    got = _feed(model, cache, torch.tensor([[4]]))
    expected = _feed(model, reference, torch.tensor([[4]]))
    # q8 keys/values: 2e-2 of the logits' range on this model (test_hf.py); bound 5e-2
    assert float((got - expected).abs().max()) <= 5e-2 * float(expected.abs().max())
