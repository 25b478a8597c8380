"""Byte-level BPE tokenizer built from a GGUF file's own vocabulary and merges.

Encoding uses `tokenizers` (Rust BPE) with the pre-tokenizer llama.cpp applies for the GGUF's
`tokenizer.ggml.pre` name, so token ids equal llama.cpp's. Control tokens (`<|im_start|>`, ...)
are only recognised in the text when `special=True`, as llama.cpp's `parse_special`.
Decoding maps each token back to its bytes through the GPT-2 byte<->unicode table; streaming
goes through an incremental UTF-8 decoder so a character split across tokens comes out whole.
"""
from __future__ import annotations

import codecs
import re

import numpy as np

from ruvpy.models.gguf_loader import (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED,
                                      TokenizerData)

_GPT2_SPLIT = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp's pre-tokenizer regexes, applied in order, by `tokenizer.ggml.pre` name.
_PRE_TOKENIZER_REGEXES = {
    **dict.fromkeys(("gpt2", "gpt-2", "mpt", "olmo", "jais"), [_GPT2_SPLIT]),
    # one digit per token, then GPT-2 splitting (SmolLM, StarCoder, ...)
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva"), [r"\p{N}", _GPT2_SPLIT]),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3"), [_LLAMA3_SPLIT]),
}


def _bytes_to_unicode():
    """GPT-2's reversible map of the 256 byte values to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


_CHAR_TO_BYTE = {ch: b for b, ch in _bytes_to_unicode().items()}
# str.translate table turning a byte-level piece into latin-1 text of its bytes (C speed: the
# 49k-token table of a vocabulary in ~10 ms instead of ~150 ms per generator). Code points
# below 256 that are NOT byte-level characters map to one latin-1 cannot encode, so a token
# holding one falls back to UTF-8 text exactly as an unknown character does.
_BYTE_PIECES = {**{c: "\U0010ffff" for c in range(256)},
                **{ord(ch): chr(b) for ch, b in _CHAR_TO_BYTE.items()}}


class GGUFTokenizer:
    """Tokenize and detokenize with a GGUF file's byte-level BPE vocabulary."""

    def __init__(self, data: TokenizerData, *, bos_id=None, add_bos=False):
        if data.model != "gpt2":
            raise ValueError(f"unsupported tokenizer model {data.model!r}: ruvpy.models reads "
                             "byte-level BPE ('gpt2') GGUF vocabularies")
        regexes = _PRE_TOKENIZER_REGEXES.get(data.pre)
        if regexes is None:
            raise ValueError(f"unsupported pre-tokenizer {data.pre!r}; known: "
                             f"{', '.join(sorted(_PRE_TOKENIZER_REGEXES))}")
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers

        vocab = {token: i for i, token in enumerate(data.tokens)}
        merges = [tuple(m.split(" ", 1)) for m in data.merges]
        try:
            bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        except Exception as exc:   # `tokenizers` raises a bare Exception for a bad table
            raise ValueError(f"the GGUF's BPE tables are malformed: {exc}") from exc
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        self._bpe = bpe
        self.vocab_size = len(data.tokens)
        self.bos_id = bos_id
        self.add_bos = bool(add_bos and bos_id is not None)
        types = np.asarray(data.token_types)
        self._control = {int(i): data.tokens[i]
                         for i in np.flatnonzero(types == TOKEN_TYPE_CONTROL)}
        # Bytes of every token as llama.cpp renders it without `special`: control tokens
        # print nothing, user-defined tokens are plain text, the rest are byte-level pieces.
        self._bytes = [self._token_bytes(t, int(k)) for t, k in zip(data.tokens, types)]
        self._special_bytes = list(self._bytes)
        for i, text in self._control.items():
            self._special_bytes[i] = text.encode("utf-8")
        by_length = sorted(self._control.values(), key=len, reverse=True)
        self._special_split = (re.compile("(" + "|".join(map(re.escape, by_length)) + ")")
                               if by_length else None)
        self._control_ids = {text: i for i, text in self._control.items()}

    @staticmethod
    def _token_bytes(token, token_type):
        if token_type == TOKEN_TYPE_CONTROL:
            return b""
        if token_type == TOKEN_TYPE_USER_DEFINED:
            return token.encode("utf-8")
        try:
            return token.translate(_BYTE_PIECES).encode("latin-1")
        except UnicodeEncodeError:  # not a byte-level piece: take it as text
            return token.encode("utf-8")

    def token_id(self, text):
        """Id of the control token spelled `text` (e.g. "<|im_end|>"), or None."""
        return self._control_ids.get(text)

    @property
    def control_tokens(self):
        """{id: text} of the vocabulary's control tokens."""
        return dict(self._control)

    def tokenize(self, text, *, special=False):
        """Token ids of `text` (BOS first if the GGUF asks for it). With `special=True`,
        control-token spellings in the text become those tokens (chat templates)."""
        if not isinstance(text, str):
            raise TypeError(f"tokenize() takes a str, got {type(text).__name__}")
        ids = [self.bos_id] if self.add_bos else []
        if special and self._special_split is not None:
            for part in self._special_split.split(text):
                if part in self._control_ids:
                    ids.append(self._control_ids[part])
                elif part:
                    ids.extend(self._bpe.encode(part, add_special_tokens=False).ids)
        elif text:
            ids.extend(self._bpe.encode(text, add_special_tokens=False).ids)
        return ids

    def token_bytes(self, token_id, *, special=False):
        """The bytes token `token_id` stands for."""
        table = self._special_bytes if special else self._bytes
        return table[self._check_id(token_id)]

    def detokenize(self, ids, *, special=False):
        """Text of `ids`; control tokens render as nothing unless `special=True`; invalid UTF-8
        (a character cut at the end) becomes U+FFFD."""
        table = self._special_bytes if special else self._bytes
        return b"".join(table[self._check_id(i)] for i in ids).decode("utf-8", "replace")

    def stream(self, *, special=False):
        """A `TextStream` turning token ids into text pieces as they arrive."""
        return TextStream(self, special=special)

    def _check_id(self, token_id):
        if isinstance(token_id, (bool, np.bool_)) or not isinstance(token_id,
                                                                    (int, np.integer)):
            raise TypeError(f"token ids must be integers, got {token_id!r}")
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary "
                             f"(0..{self.vocab_size - 1})")
        return int(token_id)


class TextStream:
    """Incremental detokenizer: `feed(id)` returns the new complete text (may be "")."""

    def __init__(self, tokenizer: GGUFTokenizer, *, special=False):
        self._tokenizer = tokenizer
        self._special = special
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token_id):
        return self._decoder.decode(self._tokenizer.token_bytes(token_id,
                                                                special=self._special))

    def flush(self):
        """Whatever is left (an incomplete character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)
