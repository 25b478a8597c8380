"""The Llama-family forward pass over ruvpy's Runtime, and the generation loop.

A step is one Runtime step: ruvpy._linear.DecoderBlocks embeds the tokens and computes layer 0's
Q/K/V (RMSNorm, the GGUF block matmuls in place, RoPE), then per layer
`step.attention(layer, q, k, v)` appends K/V and attends, and ONE C call (`between`) finishes that
layer (output projection, residual, RMSNorm, gate/up with SwiGLU, down, residual) and starts the
next -- or computes the logits after the last. All activations live in the step's arena.
RoPE follows llama.cpp's "normal" mode: it rotates ADJACENT pairs (x[2i], x[2i+1]) by
pos * base^(-2i/head_dim); the GGUF converter has already permuted the Q/K weights so that this
pairing is right.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from ruvpy._kvcache import KVCacheFull
from ruvpy._linear import DecoderBlocks, StepBuffers
from ruvpy.models.gguf_loader import LlamaWeights, ModelConfig
from ruvpy.models.sampling import Sampler
from ruvpy.models.tokenizer import GGUFTokenizer

# Tokens that end generation besides the GGUF's eos id (llama.cpp's end-of-generation set).
_END_OF_GENERATION = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>",
                      "<|end_of_text|>")


@dataclasses.dataclass
class GenerationStats:
    """What the last `generate()` call did and how fast."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0          # forward passes of one token each
    stop_reason: str = ""          # "eos", "length", "context" or "kv_full" (the KV cache)
    token_ids: list = dataclasses.field(default_factory=list)   # the generated tokens

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0

    def summary(self) -> str:
        return (f"prompt {self.prompt_tokens} tok, {self.prefill_tokens_per_s:.1f} tok/s | "
                f"generated {self.generated_tokens} tok, {self.decode_tokens_per_s:.1f} tok/s "
                f"| stop: {self.stop_reason}")


def token_id_array(token_ids, vocab_size=None):
    """token_ids as a 1-D intp array, checked: non-empty, integers, and within
    0..vocab_size-1 when vocab_size is given. ValueError/TypeError name what is wrong."""
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"token_ids must be a non-empty 1-D sequence, got shape "
                         f"{list(ids.shape)}")
    if ids.dtype.kind not in "iu":
        if ids.dtype.kind in "fO" and isinstance(token_ids, (list, tuple)) and all(
                isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_)) for t in token_ids):
            # ints that no 64-bit type holds together (numpy made them float or object)
            bad = next(t for t in token_ids if not 0 <= t < (vocab_size or 2 ** 63))
            raise ValueError(f"token id {bad} is outside the vocabulary"
                             + (f" (0..{vocab_size - 1})" if vocab_size else ""))
        raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
    if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0]
        raise ValueError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
    return ids.astype(np.intp, copy=False)


class LlamaModel:
    """A Llama-family model whose KV cache and attention live in a ruvpy `Runtime`."""

    #: prompt tokens per Runtime step in generate() (bounds step-scoped memory)
    prefill_chunk = 512

    def __init__(self, config: ModelConfig, weights: LlamaWeights, tokenizer: GGUFTokenizer,
                 runtime, *, path=None):
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
        self.runtime = runtime
        self.path = path
        self.last_generation = GenerationStats()
        c = config
        self._blocks = DecoderBlocks(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                                     c.ffn_size, c.rms_eps, c.rope_base, weights.layers,
                                     weights.embedding, weights.output, weights.output_norm)
        runtime.attach_weights(weights)
        eog = {c.eos_id} if c.eos_id is not None else set()
        eog.update(tokenizer.token_id(t) for t in _END_OF_GENERATION)
        eog.discard(None)
        self.end_of_generation_ids = frozenset(eog)

    # -- text ------------------------------------------------------------------------------
    def tokenize(self, text, *, special=False) -> list[int]:
        """Token ids of `text` (no BOS unless the GGUF's add_bos_token asks for it);
        `special=True` turns control-token spellings ("<|im_start|>") into those tokens."""
        return self.tokenizer.tokenize(text, special=special)

    def detokenize(self, ids, *, special=False) -> str:
        return self.tokenizer.detokenize(ids, special=special)

    def chat_prompt(self, message, *, system=None) -> list[int]:
        """Token ids of a one-turn ChatML conversation asking `message` (SmolLM2-Instruct's
        template), ready for generate()."""
        im_start, im_end = "<|im_start|>", "<|im_end|>"
        if self.tokenizer.token_id(im_start) is None or self.tokenizer.token_id(im_end) is None:
            raise ValueError("this model's vocabulary has no ChatML tokens")
        text = "" if system is None else f"{im_start}system\n{system}{im_end}\n"
        text += f"{im_start}user\n{message}{im_end}\n{im_start}assistant\n"
        return self.tokenize(text, special=True)

    # -- sequences and forward -------------------------------------------------------------
    def new_sequence(self) -> int:
        return self.runtime.add_sequence()

    def remove_sequence(self, seq):
        self.runtime.remove_sequence(seq)

    def forward(self, seq, token_ids) -> np.ndarray:
        """Append `token_ids` to `seq` in ONE Runtime step; float32 logits [len, vocab]."""
        return self._step(seq, token_ids, last_only=False)

    def forward_last(self, seq, token_ids) -> np.ndarray:
        """As forward(), but only the last position's logits [vocab] (what decoding needs)."""
        return self._step(seq, token_ids, last_only=True)[0]

    def _check_token_ids(self, token_ids):
        return token_id_array(token_ids, self.config.vocab_size)

    def _step(self, seq, token_ids, last_only):
        ids = self._check_token_ids(token_ids)
        c, n = self.config, len(ids)
        blocks = self._blocks
        with self.runtime.step([seq], [n]) as step:
            positions = step.positions
            if positions[-1] >= c.context_length:
                raise ValueError(f"sequence {seq} would reach position {int(positions[-1])}, "
                                 f"beyond the model's context length {c.context_length}")
            first = n - 1 if last_only else 0
            logits = np.empty((n - first, c.vocab_size), np.float32)   # the step's only heap array
            b = self._buffers(step, n, logits, first)
            blocks.begin(b, ids, positions)
            attention, between = step.attention, blocks.between
            q, k, v, attn = b.q, b.k, b.v, b.attn
            for layer in range(c.num_layers):
                attention(layer, q, k, v, out=attn)
                between(b, layer)
        return logits

    def _buffers(self, step, n, logits, first):
        """The step's activations, from its arena (numpy memory only for a step too large for
        the arena)."""
        c = self.config
        d, hidden = c.head_dim, c.hidden_size
        shapes = ((n, hidden), (n, c.num_heads, d), (n, c.num_kv_heads, d),
                  (n, c.num_kv_heads, d), (n, c.num_heads, d), (2, n, d // 2))
        work_bytes = self._blocks.work_bytes(n)
        try:
            arrays = [step.alloc(shape) for shape in shapes]
            work = step.alloc((work_bytes,), np.uint8)
        except MemoryError:   # ArenaExhausted: a prompt chunk larger than the arena holds
            arrays = [np.empty(shape, np.float32) for shape in shapes]
            raw = np.empty(work_bytes + 64, np.uint8)
            skip = -raw.ctypes.data % 64
            work = raw[skip:skip + work_bytes]
        return StepBuffers(self._blocks, n, *arrays, work, logits, first)

    # -- generation ------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens=64, *, temperature=0.0, top_p=1.0, seed=None,
                 on_token=None, seq=None) -> str:
        """Continue `prompt` (text, or token ids) by up to `max_new_tokens` tokens and return
        the new text. temperature 0 is greedy; otherwise temperature + top-p sampling with
        numpy Generator(seed). `on_token(piece)` receives each new piece of text as it is
        produced. Stops at an end-of-generation token. Statistics: `self.last_generation`.

        seq: None runs on a fresh sequence that is removed afterwards; a sequence id appends
        the prompt and the generated tokens (but the last) to that sequence and keeps it (a
        conversation can go on without recomputing its context). If the prompt does not fit
        the KV cache, KVCacheFull is raised with that sequence as it was; when the cache fills
        while generating, generation stops there (stop_reason "kv_full")."""
        sampler = Sampler(temperature, top_p, seed)
        if isinstance(max_new_tokens, (bool, np.bool_)) or not isinstance(max_new_tokens, (int, np.integer)):
            raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if isinstance(prompt, (bytes, bytearray, memoryview)):
            raise TypeError(f"prompt must be text (str) or token ids, got {type(prompt).__name__} "
                            f"(decode it first)")
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty: there is nothing to continue")
        self._check_token_ids(ids)
        position = 0 if seq is None else self.runtime.position(seq)
        if position + len(ids) > self.config.context_length:
            raise ValueError(f"the prompt has {len(ids)} tokens after {position}: more than the "
                             f"model's context length {self.config.context_length}")
        # this call's statistics, published when it ends (a generate() nested in on_token
        # publishes its own first)
        stats = GenerationStats(prompt_tokens=len(ids), stop_reason="length")
        if max_new_tokens == 0:
            self.last_generation = stats
            return ""
        own_sequence = seq is None
        if own_sequence:
            seq = self.new_sequence()
        try:
            self._generate(seq, ids, position, max_new_tokens, sampler, on_token, stats)
        finally:
            self.last_generation = stats
            if own_sequence:
                self.remove_sequence(seq)
        return self.detokenize(stats.token_ids)

    def _generate(self, seq, ids, position, max_new_tokens, sampler, on_token, stats):
        stream = self.tokenizer.stream()
        generated = stats.token_ids
        start = time.perf_counter()
        try:
            for begin in range(0, len(ids), self.prefill_chunk):
                logits = self.forward_last(seq, ids[begin:begin + self.prefill_chunk])
        except BaseException:
            # a prompt prefilled in part is no context to go on from: back to where it was
            try:
                if self.runtime.position(seq) > position:
                    self.runtime.truncate_sequence(seq, position)
            except Exception:           # (closed meanwhile: nothing left to restore)
                pass
            raise
        stats.prefill_seconds = time.perf_counter() - start
        position += len(ids)
        while True:
            token = sampler(logits)
            if token in self.end_of_generation_ids:
                stats.stop_reason = "eos"
                break
            generated.append(token)
            stats.generated_tokens = len(generated)
            piece = stream.feed(token)
            if piece and on_token is not None:
                on_token(piece)
            if len(generated) >= max_new_tokens:
                break
            if position >= self.config.context_length:
                stats.stop_reason = "context"
                break
            start = time.perf_counter()
            try:
                logits = self.forward_last(seq, [token])
            except KVCacheFull:         # refused before anything was written
                stats.stop_reason = "kv_full"
                break
            stats.decode_seconds += time.perf_counter() - start
            stats.decode_steps += 1
            position += 1
        tail = stream.flush()
        if tail and on_token is not None:
            on_token(tail)

    def with_kv_cache(self, kv_cache="paged", **runtime_options) -> "LlamaModel":
        """A model sharing these weights and tokenizer over a new Runtime (another KV cache
        kind or options); no file is read again."""
        from ruvpy.models import make_runtime

        return LlamaModel(self.config, self.weights, self.tokenizer,
                          make_runtime(self.config, kv_cache=kv_cache, **runtime_options),
                          path=self.path)

    # -- lifetime --------------------------------------------------------------------------
    def close(self):
        """Release the Runtime (its KV cache and arena). The weights stay mapped while another
        model shares them (with_kv_cache); LlamaWeights.close() unmaps them."""
        self.runtime.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        c = self.config
        return (f"<LlamaModel {c.name!r}: {c.num_layers} layers, {c.num_heads}/"
                f"{c.num_kv_heads} heads x {c.head_dim}, vocab {c.vocab_size}>")
