"""ruvpy.hf against transformers' own DynamicCache + sdpa, on tiny random-weight Llama models.

The reference is transformers itself: the same model object generating with DynamicCache and
sdpa attention. With float32 K/V in ruvpy both compute the same float32 attention (in different
summation orders, ~1e-7 apart), so greedy tokens, beams and batched left-padded generations must
be identical. (The real SmolLM2 model is checked in test_hf_smollm2.py.)
"""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import ruvpy  # noqa: E402
import ruvpy.hf  # noqa: E402
from ruvpy import KVCacheFull, Step  # noqa: E402
from ruvpy.hf import RuvpyCache  # noqa: E402
from ruvpy.runtime import IncompleteStepError  # noqa: E402

from _helpers import runtime_snapshot  # noqa: E402

VOCAB = 96
PAD = 0


def tiny_model(dtype=torch.float32, seed=0, layers=3, heads=4, kv_heads=2, head_dim=16):
    """A random Llama whose greedy choices are not near-ties: initializer_range 0.2 gives
    logits a spread of several units (with the default 0.02 they are all within ~1e-3, where
    float32 rounding could decide)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=heads * head_dim, intermediate_size=96,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=512, initializer_range=0.2,
                      pad_token_id=PAD, bos_token_id=1, eos_token_id=None,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def prompts(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen) for n in lengths]


def left_pad(seqs):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    return ids, mask


def generate(model, ids, mask=None, cache=None, n=24, **kw):
    kw.setdefault("do_sample", False)
    return model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids),
                          max_new_tokens=n, min_new_tokens=n, pad_token_id=PAD, cache=cache,
                          **kw)


def dynamic(model):
    return DynamicCache(config=model.config)


def assert_same_float32_logits(got, expected):
    """ruvpy's float32 attention against sdpa's: the same sums in another order. Measured worst
    difference 8e-7 of the logits' range on these models; bound 1e-5."""
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


# -- exact agreement in float32 --------------------------------------------------------------

def test_greedy_generation_equals_dynamic_cache_fp32(model, isa):
    for prompt in prompts([1, 7, 30]):
        ids = prompt[None]
        expected = generate(model, ids, cache=dynamic(model))
        cache = RuvpyCache(model, kv_dtype="float32", max_tokens=256)
        got = generate(model, ids, cache=cache)
        assert torch.equal(got, expected)
        assert cache.get_seq_length() == ids.shape[1] + 23   # the last token is not fed back
        assert cache.runtime.seq_len(cache.sequences[0]) == ids.shape[1] + 23


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_generate_takes_the_cache_as_past_key_values_too(model):
    """transformers 5 renamed generate's past_key_values= to cache=; the old spelling (the one
    most code uses) reaches the same RuvpyCache."""
    ids, mask = left_pad(prompts([4, 9], seed=11))
    cache = RuvpyCache(model, kv_dtype="float32")
    got = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=8,
                         min_new_tokens=8, do_sample=False, pad_token_id=PAD)
    assert torch.equal(got, generate(model, ids, mask, cache=dynamic(model), n=8))
    assert cache.get_seq_length() == ids.shape[1] + 7


def test_left_padded_batch_equals_dynamic_cache_and_stores_no_pads(model):
    seqs = prompts([9, 3, 14, 1])
    ids, mask = left_pad(seqs)
    expected_cache = dynamic(model)
    expected = generate(model, ids, mask, cache=expected_cache)
    cache = RuvpyCache(model, kv_dtype="float32", max_tokens=256)
    got = generate(model, ids, mask, cache=cache)
    assert torch.equal(got, expected)
    # DynamicCache counts columns (pads included); so does RuvpyCache, but stores no pad
    assert cache.get_seq_length() == expected_cache.get_seq_length() == ids.shape[1] + 23
    stored = [cache.runtime.seq_len(s) for s in cache.sequences]
    assert stored == [len(s) + 23 for s in seqs]
    assert cache.runtime.stats().kv["tokens"] == sum(stored)


def test_each_row_alone_equals_its_row_in_the_batch(model):
    """Padding changes nothing for a row: a batch row's continuation is the continuation of the
    same prompt generated alone."""
    seqs = prompts([5, 11], seed=7)
    ids, mask = left_pad(seqs)
    batch = generate(model, ids, mask, cache=RuvpyCache(model, kv_dtype="float32"), n=16)
    for i, s in enumerate(seqs):
        alone = generate(model, s[None], cache=RuvpyCache(model, kv_dtype="float32"), n=16)
        assert torch.equal(batch[i, -16:], alone[0, -16:])


def test_beam_search_equals_dynamic_cache_fp32(model):
    seqs = prompts([6, 10], seed=3)
    ids, mask = left_pad(seqs)
    kw = dict(num_beams=4, num_return_sequences=2, n=12, length_penalty=1.0)
    expected = generate(model, ids, mask, cache=dynamic(model), **kw)
    cache = RuvpyCache(model, kv_dtype="float32")
    got = generate(model, ids, mask, cache=cache, **kw)
    assert torch.equal(got, expected)
    assert len(cache.sequences) == 8          # 2 prompts x 4 beams, each its own sequence


def test_compressed_caches_through_generate(model):
    """fp16 and q8 K/V change this model's logits by under 1e-2 of their range (measured: 2e-3
    and 2e-2 at head_dim 16, 6e-3 / 9e-2 at 64), far inside its top-1 margins: teacher-forced
    top-1 agrees at every step. q4 and TurboQuant run through generate with most tokens cold;
    their quality is measured on the real SmolLM2 (test_hf_smollm2.py): random weights with
    initializer_range 0.2 make attention so peaked that 4-bit keys move it (26/32 and 10/32
    here), which says nothing about trained models."""
    ids = prompts([40], seed=5)[0][None]
    ref = generate(model, ids, cache=dynamic(model), n=32)
    ref_logits = teacher_forced_logits(model, ref, dynamic(model))
    for kv_cache, opts in (("paged", {}), ("two-tier", {"cold": "q8"}),
                           ("two-tier", {"cold": "q4"}), ("turbo", {})):
        if kv_cache != "paged":
            opts = dict(opts, hot_tokens=8, migration_batch=8)
        cache = RuvpyCache(model, kv_cache=kv_cache, **opts)
        logits = teacher_forced_logits(model, ref, cache)
        assert torch.isfinite(logits).all()
        if kv_cache != "paged":
            assert cache.runtime.stats().kv["tiers"]["cold"]["tokens"] == 64
        if kv_cache == "paged" or opts.get("cold") == "q8":
            assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1)), (kv_cache, opts)


def teacher_forced_logits(model, ids, cache):
    """Logits for positions 40.. of `ids`, fed one token per forward after a 40-token prefill."""
    with torch.inference_mode():
        model(ids[:, :40], cache=cache, use_cache=True)
        out = []
        for t in range(40, ids.shape[1]):
            out.append(model(ids[:, t:t + 1], cache=cache, use_cache=True).logits[0, -1])
    return torch.stack(out)


# -- the same model keeps working with other caches ------------------------------------------

def test_model_switched_to_ruvpy_still_works_with_dynamic_cache():
    model = tiny_model(seed=4)
    ids, mask = left_pad(prompts([4, 9, 2], seed=11))
    before = generate(model, ids, mask, cache=dynamic(model))          # sdpa
    plain = generate(model, ids[:1, -4:], cache=None)
    RuvpyCache(model)
    assert model.config._attn_implementation == "ruvpy"
    assert torch.equal(generate(model, ids, mask, cache=dynamic(model)), before)
    assert torch.equal(generate(model, ids[:1, -4:], cache=None), plain)
    with torch.inference_mode():                                      # no cache at all
        expected = model(ids, attention_mask=mask, use_cache=False).logits
    model.set_attn_implementation("sdpa")
    with torch.inference_mode():
        assert torch.equal(model(ids, attention_mask=mask, use_cache=False).logits, expected)


def test_ruvpy_cache_refuses_a_model_switched_back_to_sdpa():
    model = tiny_model(seed=4)
    cache = RuvpyCache(model)
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="attention implementation 'ruvpy'"):
        generate(model, prompts([5])[0][None], cache=cache, n=2)
    assert cache.sequences == [] and cache.runtime.stats().kv["tokens"] == 0


# -- no copies between torch and ruvpy -------------------------------------------------------

def _hf_layout(batch, q_len, heads, head_dim, dtype=torch.float32):
    """Tensors laid out the way Llama's attention makes them: [batch, q_len, heads, head_dim]
    memory seen as [batch, heads, q_len, head_dim]."""
    return torch.randn(batch, q_len, heads, head_dim).to(dtype).transpose(1, 2)


def _capture_step_arrays(monkeypatch):
    seen = []
    original = Step.attention

    def spy(self, layer, q, k, v, *, scale=None, out=None):
        seen.append({"q": q.ctypes.data, "k": k.ctypes.data, "v": v.ctypes.data,
                     "out": None if out is None else out.ctypes.data,
                     "dtypes": (q.dtype, k.dtype, v.dtype)})
        return original(self, layer, q, k, v, scale=scale, out=out)

    monkeypatch.setattr(Step, "attention", spy)
    return seen


def _run_layers(model, cache, q, k, v, mask=None):
    outs = []
    with torch.inference_mode():
        for layer, block in enumerate(model.model.layers):
            keys, values = cache.update(k, v, layer)
            assert keys is k and values is v           # update() copies nothing
            out, weights = ruvpy.hf.ruvpy_attention_forward(block.self_attn, q, keys, values,
                                                             mask, scaling=0.25)
            assert weights is None
            outs.append(out)
    return outs


def test_float32_tensors_cross_without_copies(model, monkeypatch):
    seen = _capture_step_arrays(monkeypatch)
    cache = RuvpyCache(model, kv_dtype="float32")
    for q_len in (5, 1):                                # prefill, then a decode step
        q, k, v = _hf_layout(2, q_len, 4, 16), _hf_layout(2, q_len, 2, 16), \
            _hf_layout(2, q_len, 2, 16)
        seen.clear()
        outs = _run_layers(model, cache, q, k, v)
        for call, out in zip(seen, outs):
            assert call["q"] == q.data_ptr() and call["k"] == k.data_ptr() and \
                call["v"] == v.data_ptr()
            assert call["out"] == out.data_ptr()       # ruvpy wrote into the torch tensor
            assert out.dtype == torch.float32 and out.shape == (2, q_len, 4, 16)
    # K/V were copied into the cache (the only copy): stored values equal the inputs
    kv, _ = cache.runtime.get_kv(cache.sequences[1], 0)
    assert np.array_equal(kv[-1], k[1, :, 0].numpy())


def test_float16_kv_cross_as_they_are_and_bfloat16_is_converted(monkeypatch):
    seen = _capture_step_arrays(monkeypatch)
    for dtype in (torch.float16, torch.bfloat16):
        model = tiny_model(dtype)
        cache = RuvpyCache(model)
        q, k, v = _hf_layout(1, 3, 4, 16, dtype), _hf_layout(1, 3, 2, 16, dtype), \
            _hf_layout(1, 3, 2, 16, dtype)
        seen.clear()
        outs = _run_layers(model, cache, q, k, v)
        for call, out in zip(seen, outs):
            assert out.dtype == dtype
            assert call["dtypes"][0] == np.float32      # q converted (ruvpy takes f32 queries)
            if dtype == torch.float16:
                assert call["k"] == k.data_ptr() and call["v"] == v.data_ptr()
                assert call["dtypes"][1] == np.float16
            else:                                       # numpy has no bfloat16: exact f32 copy
                assert call["dtypes"][1] == np.float32
        # the same attention in float64 from the converted inputs
        ref = _reference_attention(q, k, v, scale=0.25)
        tol = 4 * torch.finfo(dtype).eps * float(ref.abs().max())   # one rounding of the output
        assert float((outs[0].double() - ref).abs().max()) <= tol


def _reference_attention(q, k, v, scale):
    """Causal GQA attention in float64 over [batch, heads, q_len, d] inputs; K/V through float16
    as the paged cache stores them."""
    q, k, v = q.double(), k.half().double(), v.half().double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    n = q.shape[2]
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_match_dynamic_cache(dtype):
    """A float16 / bfloat16 model with RuvpyCache (fp16 K/V, float32 attention) against the
    same model with DynamicCache + sdpa (attention in the model's dtype): logits differ by the
    model dtype's own rounding (measured 2.6 eps x max|logit| for both dtypes; bound 8), the
    RuvpyCache run is as close to the float32 model as DynamicCache's (measured 1.12x / 0.95x;
    bound 1.5x), and the greedy tokens are the same."""
    model, reference = tiny_model(dtype), tiny_model(torch.float32)
    ids = prompts([20], seed=5)[0][None]
    tokens = generate(reference, ids, cache=dynamic(reference), n=16)

    def logits(m, cache):
        with torch.inference_mode():
            out = m(tokens, cache=cache, use_cache=True).logits[0]
        assert out.dtype == m.dtype
        return out.float()

    ours, theirs, exact = logits(model, RuvpyCache(model)), logits(model, dynamic(model)), \
        logits(reference, dynamic(reference))
    scale = float(exact.abs().max())
    assert float((ours - theirs).abs().max()) <= 8 * torch.finfo(dtype).eps * scale
    assert float((ours - exact).abs().max()) <= 1.5 * float((theirs - exact).abs().max())
    assert torch.equal(generate(model, ids, cache=RuvpyCache(model), n=16),
                       generate(model, ids, cache=dynamic(model), n=16))


def test_threads_and_concurrent_models(model):
    """1 or 2 kernel threads give the same tokens; two models in two Python threads, each with
    its own RuvpyCache, generate what they generate alone."""
    import threading
    ids = prompts([25], seed=8)[0][None]
    expected = generate(model, ids, cache=dynamic(model), n=12)
    for threads in (1, 2):
        got = generate(model, ids, cache=RuvpyCache(model, kv_dtype="float32", threads=threads),
                       n=12)
        assert torch.equal(got, expected)
    other = tiny_model(seed=21)
    other_expected = generate(other, ids, cache=dynamic(other), n=12)
    results, errors = {}, []

    def work(name, m):
        try:
            for _ in range(3):
                results[name] = generate(m, ids, cache=RuvpyCache(m, kv_dtype="float32"), n=12)
        except BaseException as exc:     # reported below
            errors.append(exc)

    workers = [threading.Thread(target=work, args=("a", model)),
               threading.Thread(target=work, args=("b", other))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    assert torch.equal(results["a"], expected) and torch.equal(results["b"], other_expected)


def test_generate_passes_torch_memory_to_ruvpy(monkeypatch):
    """In model.generate: every v the step sees is the v_proj output's own memory, and every
    attention output the o_proj reads is memory ruvpy wrote."""
    model = tiny_model(seed=2)
    seen = _capture_step_arrays(monkeypatch)
    v_ptrs, o_ptrs = [], []
    hooks = []
    for block in model.model.layers:
        hooks.append(block.self_attn.v_proj.register_forward_hook(
            lambda m, i, o: v_ptrs.append(o.data_ptr())))
        hooks.append(block.self_attn.o_proj.register_forward_pre_hook(
            lambda m, i: o_ptrs.append(i[0].data_ptr())))
    try:
        ids, mask = left_pad(prompts([6, 6]))
        generate(model, ids, mask, cache=RuvpyCache(model, kv_dtype="float32"), n=5)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(v_ptrs) == len(o_ptrs) == 5 * 3
    assert [c["v"] for c in seen] == v_ptrs
    assert [c["out"] for c in seen] == o_ptrs


# -- the Cache API ---------------------------------------------------------------------------

def _prefilled(model, ids, mask, cache):
    with torch.inference_mode():
        model(ids, attention_mask=mask, cache=cache, use_cache=True)
    return cache


def _next_logits(model, cache, tokens, mask):
    with torch.inference_mode():
        return model(tokens, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1]


@pytest.mark.parametrize("edit, args", [
    ("reorder_cache", (torch.tensor([2, 2, 0]),)),
    ("reorder_cache", (torch.tensor([1, 0, 2]),)),
    ("batch_select_indices", (torch.tensor([2, 0]),)),
    ("batch_select_indices", (torch.tensor([True, False, True]),)),
    ("batch_repeat_interleave", (2,)),
])
def test_row_edits_match_dynamic_cache(model, edit, args):
    ids, mask = left_pad(prompts([5, 8, 3], seed=9))
    ours = _prefilled(model, ids, mask, RuvpyCache(model, kv_dtype="float32"))
    theirs = _prefilled(model, ids, mask, dynamic(model))
    getattr(ours, edit)(*args)
    getattr(theirs, edit)(*args)
    if edit == "batch_repeat_interleave":
        rows = torch.arange(3).repeat_interleave(2)
    elif args[0].dtype == torch.bool:
        rows = torch.nonzero(args[0]).flatten()
    else:
        rows = args[0]
    step_mask = torch.cat([mask[rows], torch.ones(len(rows), 1, dtype=mask.dtype)], 1)
    tokens = torch.arange(len(rows))[:, None] + 5
    assert_same_float32_logits(_next_logits(model, ours, tokens, step_mask),
                               _next_logits(model, theirs, tokens, step_mask))
    assert ours.get_seq_length() == theirs.get_seq_length()
    assert len(set(ours.sequences)) == len(rows)


def test_duplicated_rows_share_storage_copy_on_write(model):
    ids = prompts([40])[0][None]
    cache = _prefilled(model, ids, None, RuvpyCache(model, kv_dtype="float32", block_size=16))
    used = cache.runtime.stats().kv["bytes_in_use"]
    cache.batch_repeat_interleave(4)
    stats = cache.runtime.stats().kv
    assert [s["tokens"] for s in stats["sequences"]] == [40] * 4
    assert stats["bytes_in_use"] == used            # 4 rows, the blocks of one
    _next_logits(model, cache, torch.tensor([[5], [6], [7], [8]]), None)
    grown = cache.runtime.stats().kv["bytes_in_use"] - used
    assert grown <= 4 * used / 3                    # each row copied its last partial block only


def test_a_failed_reorder_changes_nothing(model):
    ids, mask = left_pad(prompts([5, 8], seed=2))
    cache = _prefilled(model, ids, mask, RuvpyCache(model, kv_dtype="float32", max_sequences=3))
    seqs, stats = cache.sequences, cache.runtime.stats().kv["sequences"]
    with pytest.raises(KVCacheFull):
        cache.reorder_cache(torch.tensor([0, 0, 1, 1]))        # needs 4 live sequences
    assert cache.sequences == seqs and cache.runtime.stats().kv["sequences"] == stats
    with pytest.raises(IndexError, match="out of range"):
        cache.reorder_cache(torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="integer"):
        cache.batch_select_indices(torch.tensor([0.5]))
    assert cache.sequences == seqs


def test_get_mask_sizes_and_seq_length_follow_dynamic_cache(model):
    ids, mask = left_pad(prompts([2, 6]))
    ours = RuvpyCache(model)
    theirs = dynamic(model)
    assert ours.get_seq_length() == theirs.get_seq_length() == 0
    assert ours.get_mask_sizes(6, 0) == (6, 0)
    _prefilled(model, ids, mask, ours)
    _prefilled(model, ids, mask, theirs)
    for q_len in (1, 3):
        assert ours.get_mask_sizes(q_len, 0) == theirs.get_mask_sizes(q_len, 0)
    assert ours.get_seq_length() == theirs.get_seq_length() == 6
    for layer in (0, 2, 3, 7):          # a layer the 3-layer model has not: 0, as DynamicCache
        assert ours.get_seq_length(layer) == theirs.get_seq_length(layer)
    assert ours.get_max_length() == theirs.get_max_length() == -1
    assert ours.batch_size == 2 and not ours.is_compileable and ours.is_initialized


def test_iteration_gives_the_kv_dynamic_cache_holds(model):
    """iter(cache) raised TypeError; DynamicCache yields (keys, values, sliding window) per
    layer. The same K/V at every stored column (layer 0's bit-identical; the later layers'
    come from attention outputs summed in another order, within the logits' 1e-5); a pad's
    column, which ruvpy does not store, holds zeros."""
    ours, theirs = RuvpyCache(model, kv_dtype="float32"), dynamic(model)
    assert len(ours) == len(theirs) == 3
    assert list(ours) == list(theirs) == [(None, None, None)] * 3
    ids, mask = left_pad(prompts([3, 6], seed=5))
    for cache in (ours, theirs):
        _prefilled(model, ids, mask, cache)
        _next_logits(model, cache, torch.tensor([[7], [8]]),
                     torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1))
    stored = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1).bool()
    layers = list(ours)
    assert len(layers) == 3
    for (k, v, window), (k_ref, v_ref, window_ref) in zip(layers, theirs):
        assert window is window_ref is None
        assert k.shape == k_ref.shape == (2, 2, 7, 16) and k.dtype == v.dtype == k_ref.dtype
        for got, expected in ((k, k_ref), (v, v_ref)):
            assert_same_float32_logits(got.transpose(1, 2)[stored],
                                       expected.transpose(1, 2)[stored])
            assert not got.transpose(1, 2)[~stored].any()
    assert torch.equal(layers[0][0].transpose(1, 2)[stored],
                       next(iter(theirs))[0].transpose(1, 2)[stored])


def test_reset_drops_every_row_and_the_cache_is_reusable(model):
    ids = prompts([7])[0][None]
    cache = RuvpyCache(model, kv_dtype="float32")
    first = generate(model, ids, cache=cache, n=8)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.runtime.stats().kv["tokens"] == 0
    assert cache.sequences == []
    assert torch.equal(generate(model, ids, cache=cache, n=8), first)


def test_deepcopy_reuses_a_prompt_through_forks(model):
    """transformers' prompt-reuse recipe: prefill once, deepcopy the cache per continuation."""
    import copy
    prompt = prompts([20], seed=4)[0][None]
    prompt_cache = _prefilled(model, prompt, None, RuvpyCache(model, kv_dtype="float32"))
    used = prompt_cache.runtime.stats().kv["bytes_in_use"]
    for suffix in ([5, 6], [7, 8, 9]):
        ids = torch.cat([prompt, torch.tensor([suffix])], 1)
        cache = copy.deepcopy(prompt_cache)
        assert cache.runtime is prompt_cache.runtime
        assert cache.runtime.stats().kv["bytes_in_use"] == used       # shared, not copied
        got = generate(model, ids, cache=cache, n=8)
        assert torch.equal(got, generate(model, ids, cache=dynamic(model), n=8))
        cache.reset()                         # frees the copy's rows only
    assert prompt_cache.get_seq_length() == 20
    assert prompt_cache.runtime.sequences == prompt_cache.sequences


def test_a_dropped_copy_frees_its_rows_and_only_its_own(model, monkeypatch):
    """A deepcopy dropped without reset() kept its rows in the shared Runtime until close().
    Dropping a cache frees the rows it holds then (after its rows were reassigned too), never
    another cache's. Dropped where the runtime cannot free them -- a step open, a runtime call
    in progress in this thread (a GC inside it) or in another -- they are freed by the next
    use of a cache of the Runtime; dropped after close(), nothing happens."""
    import gc
    import sys
    import threading
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    prompt = prompts([10], seed=3)[0][None]
    prompt_cache = _prefilled(model, prompt, None, RuvpyCache(model, kv_dtype="float32"))
    runtime = prompt_cache.runtime
    first = copy.deepcopy(prompt_cache)
    first.batch_repeat_interleave(2)                # rows reassigned since the copy
    second = copy.deepcopy(first)
    assert len(runtime.sequences) == 5
    del first
    gc.collect()
    assert runtime.sequences == prompt_cache.sequences + second.sequences
    ids = torch.cat([prompt.repeat(2, 1), torch.tensor([[5], [6]])], 1)
    assert torch.equal(generate(model, ids, cache=second, n=4),
                       generate(model, ids, cache=dynamic(model), n=4))
    kept = runtime.sequences

    def drop_where_it_cannot_be_freed(hold):
        gc.disable()                                # collected in the hold, not before it
        try:
            copy.deepcopy(prompt_cache)             # dropped at once: a cycle, left to GC
            with hold():
                gc.collect()
                assert len(runtime.sequences) == len(kept) + 1
        finally:
            gc.enable()

    def stepping():
        other = runtime.add_sequence()
        kept.append(other)
        return runtime.step([other], [1])

    def collected_in_another_thread():                  # while this one is in a runtime call
        class Hold:
            def __enter__(self):
                runtime._state_lock.acquire()
                thread = threading.Thread(target=gc.collect)
                thread.start()
                thread.join()

            def __exit__(self, *exc):
                runtime._state_lock.release()
        return Hold()

    for hold in (lambda: runtime._state_lock, collected_in_another_thread):
        drop_where_it_cannot_be_freed(hold)
        prompt_cache.crop(0)                        # a use of a cache: freed
        assert runtime.sequences == kept
    with pytest.raises(IncompleteStepError):       # (the step attended nothing)
        drop_where_it_cannot_be_freed(stepping)
    prompt_cache.crop(0)
    assert runtime.sequences == kept
    assert prompt_cache.get_seq_length() == 10 and second.get_seq_length() == 14
    with pytest.raises(TypeError, match="deepcopy"):
        copy.copy(prompt_cache)                     # two caches of the same rows
    last = copy.deepcopy(prompt_cache)
    prompt_cache.close()
    del last
    gc.collect()
    assert not unraisable


def test_generate_continues_a_filled_cache_as_dynamic_cache_does(model):
    ids = prompts([6])[0][None]
    ours, theirs = RuvpyCache(model, kv_dtype="float32"), dynamic(model)
    a = generate(model, ids, cache=ours, n=6)
    b = generate(model, ids, cache=theirs, n=6)
    assert torch.equal(a, b)
    more = torch.cat([a, torch.tensor([[7, 8]])], 1)
    assert torch.equal(generate(model, more, cache=ours, n=6),
                       generate(model, more, cache=theirs, n=6))


def test_stats_work(model):
    cache = RuvpyCache(model, kv_cache="two-tier", cold="q4", hot_tokens=8, migration_batch=8)
    generate(model, prompts([30])[0][None], cache=cache, n=4)
    stats = cache.runtime.stats()
    assert stats.kv["tokens"] == 33 and stats.kv["tiers"]["cold"]["tokens"] > 0
    assert stats.steps == 4                             # one Runtime step per forward
    assert stats.attention_calls == 4 * 3
    assert "KV per sequence" in stats.format()


# -- failures leave everything as it was -----------------------------------------------------

class _Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [_Boom, KeyboardInterrupt])
def test_a_forward_failing_part_way_rolls_back(model, exc):
    ids, mask = left_pad(prompts([4, 7], seed=6))
    cache = _prefilled(model, ids, mask, RuvpyCache(model, kv_dtype="float32"))
    before = (cache.get_seq_length(), [cache.runtime.seq_len(s) for s in cache.sequences])
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    tokens = torch.tensor([[9], [10]])

    def fail(*_):
        raise exc()

    hook = model.model.layers[1].mlp.register_forward_pre_hook(fail)
    try:
        with pytest.raises(exc):
            _next_logits(model, cache, tokens, step_mask)
    finally:
        hook.remove()
    # the open step is rolled back at the latest on the next use
    got = _next_logits(model, cache, tokens, step_mask)
    expected = _next_logits(model, _prefilled(model, ids, mask, dynamic(model)), tokens,
                            step_mask)
    assert_same_float32_logits(got, expected)
    assert [cache.runtime.seq_len(s) for s in cache.sequences] == [n + 1 for n in before[1]]
    assert cache.runtime.stats().rollbacks == 1


@pytest.mark.parametrize("copy_kept", [True, False])
def test_a_copy_whose_forward_failed_part_way_blocks_no_other_cache(model, copy_kept):
    """The prompt-reuse recipe with Ctrl-C: a deepcopy's forward raised part-way, its step
    left open on the shared Runtime until that copy's next use. The prompt cache's generate
    ("another step is open") and its next deepcopy ("cannot fork a sequence while a step is
    open") were refused, for good once the copy was dropped. The next call on any cache of the
    Runtime in that thread rolls the failed forward back first."""
    import copy
    import gc
    prompt = prompts([12], seed=8)[0][None]
    prompt_cache = _prefilled(model, prompt, None, RuvpyCache(model, kv_dtype="float32"))
    ids = torch.cat([prompt, torch.tensor([[5, 6]])], 1)
    first = copy.deepcopy(prompt_cache)
    hook = model.model.layers[0].mlp.register_forward_pre_hook(
        lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with pytest.raises(KeyboardInterrupt):
            generate(model, ids, cache=first, n=4)
    finally:
        hook.remove()
    if not copy_kept:
        del first
        gc.collect()
    second = copy.deepcopy(prompt_cache)                      # refused before
    assert torch.equal(generate(model, ids, cache=second, n=6),
                       generate(model, ids, cache=dynamic(model), n=6))
    assert prompt_cache.get_seq_length() == 12
    assert torch.equal(generate(model, ids, cache=prompt_cache, n=6),   # refused before
                       generate(model, ids, cache=dynamic(model), n=6))


def test_a_cache_made_for_another_number_of_layers_is_refused():
    """A 3-layer model's RuvpyCache used by a 2-layer model: its forwards never reached the
    last layer, so none committed, and each next one silently rolled the last back (wrong
    logits, get_seq_length 0)."""
    three, two = tiny_model(layers=3), tiny_model(layers=2)
    cache = RuvpyCache(three, kv_dtype="float32")
    two.set_attn_implementation("ruvpy")                      # (as RuvpyCache(two) would)
    with pytest.raises(ValueError, match="made for a model of 3 layers; the model using it has 2"):
        generate(two, prompts([6])[0][None], cache=cache, n=2)
    assert cache.runtime.sequences == [] and cache.get_seq_length() == 0


def test_a_mask_that_hides_a_cached_token_is_refused(model):
    ids, mask = left_pad(prompts([4, 7], seed=6))
    cache = _prefilled(model, ids, mask, RuvpyCache(model))
    bad = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    bad[1, 4] = 0                                   # a token the cache holds
    with pytest.raises(ValueError, match="row 1 does not match"):
        _next_logits(model, cache, torch.tensor([[3], [3]]), bad)
    with pytest.raises(ValueError, match="no attention mask"):
        _next_logits(model, cache, torch.tensor([[3], [3]]), None)
    assert cache.get_seq_length() == 7 and cache.runtime.stats().kv["tokens"] == 11


def test_bad_input_raises_clear_errors(model):
    cache = RuvpyCache(model)
    k = torch.zeros(1, 2, 3, 16)
    with pytest.raises(ValueError, match="layer_idx"):
        cache.update(k, k, 3)
    with pytest.raises(ValueError, match="num_kv_heads=2"):
        cache.update(torch.zeros(1, 3, 3, 16), torch.zeros(1, 3, 3, 16), 0)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        cache.update(k.long(), k.long(), 0)
    with pytest.raises(ValueError, match="differ"):
        cache.update(k, k.half(), 0)
    with pytest.raises(ValueError, match="positive value"):
        cache.crop(3)
    with pytest.raises(ValueError, match="repeats"):
        cache.batch_repeat_interleave(0)
    ids, mask = left_pad(prompts([3, 3]))
    _prefilled(model, ids, mask, cache)
    with pytest.raises(ValueError, match="batch size 3"):
        cache.update(torch.zeros(3, 2, 1, 16), torch.zeros(3, 2, 1, 16), 0)
    with pytest.raises(NotImplementedError, match="offloading"):
        cache.offload(0)
    with pytest.raises(NotImplementedError, match="cache.reorder_cache"):
        cache.layers[0].reorder_cache(torch.tensor([0, 1]))
    assert cache.runtime.stats().kv["tokens"] == 6


def test_inference_only_and_no_dropout(model):
    cache = RuvpyCache(model)
    ids = prompts([3])[0][None]
    with pytest.raises(RuntimeError, match="inference-only"):
        model(ids, cache=cache, use_cache=True)     # grad mode: parameters require grad
    assert cache.runtime.stats().kv["tokens"] == 0 and cache.sequences == []
    q, k = _hf_layout(1, 2, 4, 16), _hf_layout(1, 2, 2, 16)
    with torch.inference_mode():
        cache.update(k, k, 0)
        with pytest.raises(NotImplementedError, match="dropout"):
            ruvpy.hf.ruvpy_attention_forward(model.model.layers[0].self_attn, q, k, k, None,
                                             dropout=0.1)
        cache.update(k, k, 0)
        with pytest.raises(NotImplementedError, match="sliding-window"):
            ruvpy.hf.ruvpy_attention_forward(model.model.layers[0].self_attn, q, k, k, None,
                                             sliding_window=4)
    assert cache.runtime.stats().kv["tokens"] == 0


def test_unsupported_models_are_refused_by_name():
    from transformers import MistralConfig, MistralForCausalLM
    cfg = MistralConfig(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, sliding_window=8)
    with pytest.raises(NotImplementedError, match="sliding_attention"):
        RuvpyCache(MistralForCausalLM(cfg))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        RuvpyCache(object())


def test_runtime_options_reach_the_runtime(model):
    cache = RuvpyCache(model, kv_cache="turbo", turbo_bits=4.5, max_tokens=100, hot_tokens=16)
    cfg = cache.runtime.config
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (3, 4, 2, 16)
    assert (cfg.kv_cache, cfg.turbo_bits, cfg.max_tokens, cfg.hot_tokens) == \
        ("turbo", 4.5, 100, 16)
    assert RuvpyCache(model).runtime.config.max_tokens == 512   # max_position_embeddings
    with pytest.raises(ValueError, match="kv_dtype"):
        RuvpyCache(model, kv_cache="two-tier", kv_dtype="float32")
    with pytest.raises(TypeError):
        RuvpyCache(model, no_such_option=1)


def test_a_full_cache_raises_before_the_forward_changes_anything(model):
    cache = RuvpyCache(model, max_tokens=32, block_size=16)
    ids = prompts([30])[0][None]
    _prefilled(model, ids, None, cache)
    with pytest.raises(KVCacheFull):
        _next_logits(model, cache, torch.tensor([[1, 2, 3]]), None)
    assert cache.get_seq_length() == 30 and cache.runtime.seq_len(cache.sequences[0]) == 30


def test_closing_the_cache_from_another_thread_during_a_forward(model):
    """RuvpyCache.close() from another thread while a forward is part-way (layer 1 attended)
    does not end that forward's step from the wrong thread (which released its step slot):
    the Runtime is closed, the forward fails at its next layer with the Runtime's clear
    error, and its own thread gives the step slot back."""
    import threading

    ids, mask = left_pad(prompts([4, 7], seed=6))
    cache = _prefilled(model, ids, mask, RuvpyCache(model, kv_dtype="float32"))
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    seen = {}

    def close_elsewhere(*_):
        def closer():
            try:
                cache.close()
            except BaseException as exc:      # reported below
                seen["error"] = exc
        t = threading.Thread(target=closer)
        t.start()
        t.join(300)
        seen["alive"] = t.is_alive()
        seen["slot held"] = cache.runtime._step_lock.locked()

    hook = model.model.layers[1].mlp.register_forward_pre_hook(close_elsewhere)
    try:
        with pytest.raises(RuntimeError, match="closed by another thread while this step was open"):
            _next_logits(model, cache, torch.tensor([[9], [10]]), step_mask)
    finally:
        hook.remove()
    assert not seen["alive"] and "error" not in seen, seen
    assert seen["slot held"], "close() from another thread released the forward's step slot"
    assert cache.runtime.closed and not cache.runtime._step_lock.locked()


def _in_another_thread(call):
    """Run call() in a thread of its own and wait for it (a deadlock guard, not a timing):
    (whether it is still running, what it raised or None)."""
    import threading
    outcome = {}

    def other():
        try:
            call()
        except BaseException as exc:          # reported to the caller
            outcome["error"] = exc

    t = threading.Thread(target=other)
    t.start()
    t.join(300)
    return t.is_alive(), outcome.get("error")


def _calls_from_another_thread(model, cache):
    """name -> (call on `cache` from a thread other than the one whose forward is part-way,
    the call the refusal names)."""
    q, k = _hf_layout(2, 1, 4, 16), _hf_layout(2, 1, 2, 16)

    def update_and_attend(layer):
        def call():
            with torch.inference_mode():
                cache.update(k, k, layer)
                ruvpy.hf.ruvpy_attention_forward(model.model.layers[layer].self_attn, q, k, k,
                                                 None)
        return call

    return {
        "a forward": (lambda: _next_logits(model, cache, torch.tensor([[11], [12]]), None),
                      "RuvpyCache.update"),
        "update of an attended layer": (lambda: cache.update(k, k, 0), "RuvpyCache.update"),
        "attention of a layer not attended yet": (update_and_attend(2),
                                                  "ruvpy_attention_forward"),
        "reorder_cache": (lambda: cache.reorder_cache(torch.tensor([1, 0])),
                          "RuvpyCache.reorder_cache"),
        "batch_select_indices": (lambda: cache.batch_select_indices(torch.tensor([0])),
                                 "RuvpyCache.batch_select_indices"),
        "batch_repeat_interleave": (lambda: cache.batch_repeat_interleave(2),
                                    "RuvpyCache.batch_repeat_interleave"),
        "crop": (lambda: cache.crop(-1), "RuvpyCache.crop"),
        "reset": (lambda: cache.reset(), "RuvpyCache.reset"),
        "deepcopy": (lambda: copy.deepcopy(cache), "copy.deepcopy(RuvpyCache)"),
    }


@pytest.mark.parametrize("name", sorted(_calls_from_another_thread(None, None)))
def test_a_forward_part_way_is_refused_to_other_threads(model, name):
    """While a forward is part-way (layer 1 attended), a call from another thread that would
    join or end it (the forward's step is its thread's) raises a RuntimeError naming the call
    and changes nothing: the forward then finishes with the logits, rows and K/V of the same
    forward on a twin cache nobody interrupted. (It used to drop the forward from the cache
    and then fail ending its step from the wrong thread: the forward failed at its next
    layer and its step stayed open, the runtime unusable.)"""

    ids, mask = left_pad(prompts([4, 7], seed=6))
    options = dict(kv_dtype="float32", threads=1)
    cache = _prefilled(model, ids, mask, RuvpyCache(model, **options))
    twin = _prefilled(model, ids, mask, RuvpyCache(model, **options))
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    tokens = torch.tensor([[9], [10]])
    call, refused_call = _calls_from_another_thread(model, cache)[name]
    seen = {}

    def state():
        return (cache._plan, cache.sequences, cache.get_seq_length(), list(cache._attended),
                runtime_snapshot(cache.runtime), cache.runtime.arena.stats())

    def call_elsewhere(*_):
        seen["before"] = state()
        seen["alive"], seen["error"] = _in_another_thread(call)
        seen["after"] = state()

    hook = model.model.layers[1].mlp.register_forward_pre_hook(call_elsewhere)
    try:
        got = _next_logits(model, cache, tokens, step_mask)
    finally:
        hook.remove()
    assert not seen["alive"]
    error = seen["error"]
    assert type(error) is RuntimeError, repr(error)
    assert f"{refused_call} from another thread" in str(error), str(error)
    assert "only by the thread that entered it" in str(error) and "nothing was changed" in \
        str(error)
    assert seen["after"] == seen["before"]
    assert torch.equal(got, _next_logits(model, twin, tokens, step_mask))
    assert cache.sequences == twin.sequences and cache.get_seq_length() == twin.get_seq_length()
    assert runtime_snapshot(cache.runtime) == runtime_snapshot(twin.runtime)
    assert not cache.runtime._step_lock.locked()


def test_two_threads_starting_forwards_at_once_on_one_cache(model):
    """Thread B runs a whole forward on the cache while thread A's first forward is still
    creating its rows (B runs inside A's first add_sequence): B gets a RuntimeError naming the
    call and changes nothing; A's forward ends with the logits, rows and K/V of the same
    forward on a twin cache nobody disturbed, and the runtime holds A's rows only. (Before, B
    made rows of its own and committed a step on them, then A overwrote the cache's row list:
    B's rows stayed in the runtime, held by no row of the cache.)"""

    ids, mask = left_pad(prompts([4, 7], seed=6))
    cache = RuvpyCache(model, kv_dtype="float32", threads=1)
    twin = RuvpyCache(model, kv_dtype="float32", threads=1)
    runtime = cache.runtime
    real_add = runtime.add_sequence
    seen = {}

    def add_sequence():
        seq = real_add()
        if "error" not in seen:
            seen["error"] = None
            seen["alive"], seen["error"] = _in_another_thread(lambda: _next_logits(model, cache, ids, mask))
        return seq

    runtime.add_sequence = add_sequence
    try:
        got = _next_logits(model, cache, ids, mask)
    finally:
        del runtime.add_sequence
    assert not seen["alive"]
    error = seen["error"]
    assert type(error) is RuntimeError, repr(error)
    assert "ruvpy_attention_forward from another thread" in str(error) and \
        "nothing was changed" in str(error), str(error)
    assert torch.equal(got, _next_logits(model, twin, ids, mask))
    assert sorted(runtime.sequences) == sorted(cache.sequences) == sorted(twin.sequences)
    assert cache.get_seq_length() == twin.get_seq_length()
    assert runtime_snapshot(runtime) == runtime_snapshot(twin.runtime)
    cache.close()
    twin.close()


def test_closing_the_cache_from_the_forwards_own_thread_during_a_forward(model):
    """RuvpyCache.close() inside a forward, from its own thread (a hook between layers): the
    Runtime ends the forward's step there (close() knows whose step it is: one owner check,
    in Runtime), the forward fails at its next layer with the Runtime's "closed", and the
    step slot and the thread's kernel thread count are given back."""
    from ruvpy import _kernels

    ids, mask = left_pad(prompts([4, 7], seed=6))
    cache = _prefilled(model, ids, mask, RuvpyCache(model, kv_dtype="float32", threads=1))
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    seen = {}

    def close_here(*_):
        cache.close()
        seen["slot held"] = cache.runtime._step_lock.locked()

    hook = model.model.layers[1].mlp.register_forward_pre_hook(close_here)
    before = _kernels._swap_thread_count(5)
    try:
        with pytest.raises(RuntimeError, match="is closed"):
            _next_logits(model, cache, torch.tensor([[9], [10]]), step_mask)
        assert _kernels._swap_thread_count(before) == 5, "the step's thread count was not restored"
    finally:
        hook.remove()
        _kernels._swap_thread_count(before)
    assert seen == {"slot held": False}
    assert cache.runtime.closed and not cache.runtime._step_lock.locked()
    cache.close()                         # idempotent
