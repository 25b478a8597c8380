"""The Llama-family forward pass over ruvpy's Runtime, and the generation loop.

numpy does the matmuls (float32 weights, see gguf_loader.py); every KV append and every attention
goes through `Runtime.step(...).attention(layer, q, k, v)`. RoPE follows llama.cpp's "normal" mode:
it rotates ADJACENT pairs (x[2i], x[2i+1]) by pos * base^(-2i/head_dim); the GGUF converter has
already permuted the Q/K weights so that this pairing is right.
"""
from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np

from ruvpy.models.blas import find_blas
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
    stop_reason: str = ""          # "eos", "length" or "context"
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


def _rms_normalize(x, eps):
    """x / rms(x) per row (the gain is folded into the next matmul's weights)."""
    mean_square = np.einsum("ij,ij->i", x, x) / x.shape[1]
    return x * (1.0 / np.sqrt(mean_square + eps))[:, None]


def token_id_array(token_ids, vocab_size=None):
    """token_ids as a 1-D intp array, checked: non-empty, integers, and within
    0..vocab_size-1 when vocab_size is given. ValueError/TypeError name what is wrong."""
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"token_ids must be a non-empty 1-D sequence, got shape "
                         f"{list(ids.shape)}")
    if ids.dtype.kind not in "iu":
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
                 runtime, *, path=None, blas_threads=1):
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
        self.runtime = runtime
        self.path = path
        self.last_generation = GenerationStats()
        self._blas = None
        self.blas_threads = blas_threads
        c = config
        self._q_dim = c.num_heads * c.head_dim
        self._qk_heads = c.num_heads + c.num_kv_heads
        self._kv_dim = c.num_kv_heads * c.head_dim
        # cos/sin of pos * base^(-2i/head_dim) for every position of the context
        inv_freq = c.rope_base ** (-np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim)
        angles = np.outer(np.arange(c.context_length, dtype=np.float64), inv_freq)
        self._rope_cos = np.cos(angles).astype(np.float32)
        self._rope_sin = np.sin(angles).astype(np.float32)
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

    @property
    def blas_threads(self):
        """Threads of numpy's OpenBLAS during this model's steps (restored after each step);
        None leaves it alone. Default 1: on an idle 2-core machine a second thread gains ~25%
        on decode, but on busy cores OpenBLAS's busy-waiting workers lose 5-10x."""
        return self._blas_threads

    @blas_threads.setter
    def blas_threads(self, threads):
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise ValueError(f"blas_threads must be None or an int >= 1, got {threads!r}")
            if self._blas is None:
                self._blas = find_blas()
            if self._blas is None:
                warnings.warn("ruvpy.models: numpy's BLAS is not an OpenBLAS ruvpy can find; "
                              "blas_threads has no effect", RuntimeWarning, stacklevel=2)
        self._blas_threads = threads

    def _step(self, seq, token_ids, last_only):
        ids = self._check_token_ids(token_ids)
        if self._blas_threads is None or self._blas is None:
            return self._run_step(seq, ids, last_only)
        previous = self._blas.get()
        self._blas.set(self._blas_threads)
        try:
            return self._run_step(seq, ids, last_only)
        finally:
            self._blas.set(previous)

    def _run_step(self, seq, ids, last_only):
        c, w = self.config, self.weights
        n, q_dim, kv_dim, d = len(ids), self._q_dim, self._kv_dim, c.head_dim
        with self.runtime.step([seq], [n]) as step, np.errstate(over="ignore"):
            positions = np.asarray(step.positions)
            if positions[-1] >= c.context_length:
                raise ValueError(f"sequence {seq} would reach position {int(positions[-1])}, "
                                 f"beyond the model's context length {c.context_length}")
            cos = self._rope_cos[positions][:, None, :]
            sin = self._rope_sin[positions][:, None, :]
            x = np.ascontiguousarray(w.embedding_t[:, ids].T)
            qk = np.empty((n, self._qk_heads, d), np.float32)
            for layer in range(c.num_layers):
                qkv = _rms_normalize(x, c.rms_eps) @ w.qkv[layer]
                # RoPE on adjacent pairs of Q and K together (one view over both)
                raw = qkv[:, :q_dim + kv_dim].reshape(n, self._qk_heads, d)
                even, odd = raw[..., 0::2], raw[..., 1::2]
                qk[..., 0::2] = even * cos - odd * sin
                qk[..., 1::2] = even * sin + odd * cos
                q = np.ascontiguousarray(qk[:, :c.num_heads])
                k = np.ascontiguousarray(qk[:, c.num_heads:])
                v = np.ascontiguousarray(qkv[:, q_dim + kv_dim:]).reshape(n, c.num_kv_heads, d)
                attn = step.attention(layer, q, k, v)
                x += attn.reshape(n, q_dim) @ w.attn_out[layer]
                gate_up = _rms_normalize(x, c.rms_eps) @ w.gate_up[layer]
                gate, up = gate_up[:, :c.ffn_size], gate_up[:, c.ffn_size:]
                x += (gate / (1.0 + np.exp(-gate)) * up) @ w.down[layer]   # SwiGLU
            if last_only:
                x = x[-1:]
            logits = (_rms_normalize(x, c.rms_eps) * w.output_norm) @ w.output_t
        return logits

    # -- generation ------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens=64, *, temperature=0.0, top_p=1.0, seed=None,
                 on_token=None, seq=None) -> str:
        """Continue `prompt` (text, or token ids) by up to `max_new_tokens` tokens and return
        the new text. temperature 0 is greedy; otherwise temperature + top-p sampling with
        numpy Generator(seed). `on_token(piece)` receives each new piece of text as it is
        produced. Stops at an end-of-generation token. Statistics: `self.last_generation`.

        seq: None runs on a fresh sequence that is removed afterwards; a sequence id appends
        the prompt and the generated tokens (but the last) to that sequence and keeps it (a
        conversation can go on without recomputing its context)."""
        sampler = Sampler(temperature, top_p, seed)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty: there is nothing to continue")
        self._check_token_ids(ids)
        position = 0 if seq is None else self.runtime.position(seq)
        if position + len(ids) > self.config.context_length:
            raise ValueError(f"the prompt has {len(ids)} tokens after {position}: more than the "
                             f"model's context length {self.config.context_length}")
        stats = self.last_generation = GenerationStats(prompt_tokens=len(ids),
                                                       stop_reason="length")
        if max_new_tokens == 0:
            return ""
        own_sequence = seq is None
        if own_sequence:
            seq = self.new_sequence()
        try:
            self._generate(seq, ids, position, max_new_tokens, sampler, on_token, stats)
        finally:
            if own_sequence:
                self.remove_sequence(seq)
        return self.detokenize(stats.token_ids)

    def _generate(self, seq, ids, position, max_new_tokens, sampler, on_token, stats):
        stream = self.tokenizer.stream()
        generated = stats.token_ids
        start = time.perf_counter()
        for begin in range(0, len(ids), self.prefill_chunk):
            logits = self.forward_last(seq, ids[begin:begin + self.prefill_chunk])
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
            logits = self.forward_last(seq, [token])
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
                          path=self.path, blas_threads=self.blas_threads)

    # -- lifetime --------------------------------------------------------------------------
    def close(self):
        """Release the Runtime (its KV cache and arena)."""
        self.runtime.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        c = self.config
        return (f"<LlamaModel {c.name!r}: {c.num_layers} layers, {c.num_heads}/"
                f"{c.num_kv_heads} heads x {c.head_dim}, vocab {c.vocab_size}>")
