"""Read a Llama-family GGUF file: hyper-parameters, tokenizer tables and float32 weights.

`gguf` (PyPI) parses the file and dequantizes each tensor to float32. The weights are then laid
out for the forward pass in `llama.py`: pre-transposed and C-contiguous for `x @ W`, Q/K/V and
gate/up fused into one matmul each, and the RMSNorm gains folded into the matmul that follows
them (diag(g) @ W), so a layer costs four matmuls and a handful of element-wise ops.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

SUPPORTED_ARCHITECTURES = ("llama",)
# What gguf's reader raises on a malformed file besides ValueError (found by tools/fuzz.py:
# a count or length past the end of the file indexes an empty array, an unknown type code
# misses its table, sizes overflow numpy's integers): all mean "not a readable GGUF file".
MALFORMED_GGUF_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, EOFError)

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family model, read from the GGUF metadata."""

    name: str
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    ffn_size: int
    vocab_size: int
    context_length: int
    rope_base: float
    rms_eps: float
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    tied_embeddings: bool


@dataclasses.dataclass(frozen=True)
class TokenizerData:
    """The GGUF's own tokenizer tables (`tokenizer.ggml.*`)."""

    model: str               # "gpt2" = byte-level BPE
    pre: str                 # pre-tokenizer name, as llama.cpp spells it
    tokens: list[str]
    token_types: np.ndarray  # int32 [vocab]
    merges: list[str]


@dataclasses.dataclass
class LlamaWeights:
    """Float32 weights laid out for `x @ W` (each [in, out], C-contiguous)."""

    qkv: list[np.ndarray]        # per layer [hidden, (H + 2 KVH) * head_dim], attn_norm folded in
    attn_out: list[np.ndarray]   # per layer [H * head_dim, hidden]
    gate_up: list[np.ndarray]    # per layer [hidden, 2 * ffn], ffn_norm folded in
    down: list[np.ndarray]       # per layer [ffn, hidden]
    output_norm: np.ndarray      # [hidden]
    embedding_t: np.ndarray      # [hidden, vocab]: token_embd transposed (lookup = a column)
    output_t: np.ndarray         # [hidden, vocab]: the LM head (the same array when tied)

    @property
    def nbytes(self) -> int:
        arrays = [*self.qkv, *self.attn_out, *self.gate_up, *self.down, self.output_norm,
                  self.embedding_t]
        if self.output_t is not self.embedding_t:
            arrays.append(self.output_t)
        return sum(a.nbytes for a in arrays)


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _required(reader, key):
    value = _field(reader, key)
    if value is None:
        raise ValueError(f"GGUF file lacks the metadata key {key!r}")
    return value


def read_config(reader) -> ModelConfig:
    arch = _required(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; ruvpy.models runs "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    hidden = int(_required(reader, f"{arch}.embedding_length"))
    heads = int(_required(reader, f"{arch}.attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"unsupported RoPE scaling {scaling!r} in the GGUF file")
    tokens = _required(reader, "tokenizer.ggml.tokens")
    embd = _tensor_info(reader, "token_embd.weight")
    vocab = int(_field(reader, f"{arch}.vocab_size", len(tokens)))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    config = ModelConfig(
        name=str(_field(reader, "general.name", os.path.basename(reader.data.filename))),
        architecture=arch,
        num_layers=int(_required(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        hidden_size=hidden,
        ffn_size=int(_required(reader, f"{arch}.feed_forward_length")),
        vocab_size=vocab,
        context_length=int(_required(reader, f"{arch}.context_length")),
        rope_base=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_eps=float(_required(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        bos_id=None if bos is None else int(bos),
        eos_id=None if eos is None else int(eos),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        tied_embeddings="output.weight" not in {t.name for t in reader.tensors},
    )
    if vocab != len(tokens) or tuple(int(s) for s in embd.shape) != (hidden, vocab):
        raise ValueError(f"GGUF vocabulary mismatch: {len(tokens)} tokens, vocab_size {vocab}, "
                         f"token_embd shape {list(embd.shape)}")
    if heads % config.num_kv_heads or head_dim % 2:
        raise ValueError(f"inconsistent attention shape in the GGUF file: {heads} heads, "
                         f"{config.num_kv_heads} KV heads, head_dim {head_dim}")
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"partial RoPE ({rope_dim} of {head_dim} dims per head) is not "
                         f"supported")
    return config


def read_tokenizer(reader) -> TokenizerData:
    tokens = list(_required(reader, "tokenizer.ggml.tokens"))
    types = _field(reader, "tokenizer.ggml.token_type")
    types = (np.full(len(tokens), TOKEN_TYPE_NORMAL, np.int32) if types is None
             else np.asarray(types, dtype=np.int32))
    return TokenizerData(model=str(_required(reader, "tokenizer.ggml.model")),
                         pre=str(_field(reader, "tokenizer.ggml.pre", "default")),
                         tokens=tokens, token_types=types,
                         merges=list(_field(reader, "tokenizer.ggml.merges", []) or []))


def _tensor_info(reader, name):
    for tensor in reader.tensors:
        if tensor.name == name:
            return tensor
    raise ValueError(f"GGUF file lacks the tensor {name!r}")


def read_weights(reader, config: ModelConfig) -> LlamaWeights:
    from gguf.quants import dequantize

    by_name = {t.name: t for t in reader.tensors}

    def load(name, shape):
        tensor = by_name.get(name)
        if tensor is None:
            raise ValueError(f"GGUF file lacks the tensor {name!r}")
        array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        if array.shape != shape:
            raise ValueError(f"GGUF tensor {name!r} has shape {list(array.shape)}, "
                             f"expected {list(shape)}")
        return array

    c = config
    hidden, q_dim, kv_dim = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    qkv, attn_out, gate_up, down = [], [], [], []
    for i in range(c.num_layers):
        p = f"blk.{i}."
        attn_norm = load(p + "attn_norm.weight", (hidden,))
        ffn_norm = load(p + "ffn_norm.weight", (hidden,))
        fused = np.concatenate([load(p + "attn_q.weight", (q_dim, hidden)),
                                load(p + "attn_k.weight", (kv_dim, hidden)),
                                load(p + "attn_v.weight", (kv_dim, hidden))])
        qkv.append(np.ascontiguousarray(fused.T * attn_norm[:, None]))
        attn_out.append(np.ascontiguousarray(load(p + "attn_output.weight", (hidden, q_dim)).T))
        fused = np.concatenate([load(p + "ffn_gate.weight", (c.ffn_size, hidden)),
                                load(p + "ffn_up.weight", (c.ffn_size, hidden))])
        gate_up.append(np.ascontiguousarray(fused.T * ffn_norm[:, None]))
        down.append(np.ascontiguousarray(load(p + "ffn_down.weight", (hidden, c.ffn_size)).T))
    embedding_t = np.ascontiguousarray(load("token_embd.weight", (c.vocab_size, hidden)).T)
    output_t = (embedding_t if c.tied_embeddings else
                np.ascontiguousarray(load("output.weight", (c.vocab_size, hidden)).T))
    return LlamaWeights(qkv=qkv, attn_out=attn_out, gate_up=gate_up, down=down,
                        output_norm=load("output_norm.weight", (hidden,)),
                        embedding_t=embedding_t, output_t=output_t)


# GGUF metadata value types -> bytes of one value (8: string, 9: array are walked)
_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_DIMS = 4


def check_gguf_layout(path):
    """Walk the header, metadata and tensor directory of the GGUF file at `path` and check
    that every count and length fits in the bytes the file has. gguf's reader trusts them:
    an array of 2**40 values declared in a 1 KiB file made it loop, allocating, until the
    machine ran out of memory (found by tools/fuzz.py). Raises ValueError naming the first
    field that does not fit."""
    import mmap
    import struct

    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ValueError(f"{path!r} is not a readable GGUF file: {size} bytes")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            magic, version = data[:4], struct.unpack_from("<I", data, 4)[0]
            if magic != b"GGUF" or version not in (2, 3):
                return              # not GGUF v2/v3: gguf's reader names the problem
            pos = 8

            def take(fmt):
                nonlocal pos
                n = struct.calcsize(fmt)
                if pos + n > size:
                    raise ValueError(f"{path!r} is not a readable GGUF file: it ends at byte "
                                     f"{size} inside its metadata (at {pos})")
                value = struct.unpack_from(fmt, data, pos)
                pos += n
                return value[0] if len(value) == 1 else value

            def fits(count, each, what):
                if count * each > size - pos:
                    raise ValueError(f"{path!r} is not a readable GGUF file: {what} of {count} "
                                     f"x {each} bytes at byte {pos} does not fit in its "
                                     f"{size} bytes")

            def skip_string(what):
                nonlocal pos
                n = take("<Q")
                fits(n, 1, what)
                pos += n

            def skip_value(kind, what):
                nonlocal pos
                if kind in _GGUF_SCALAR_BYTES:
                    fits(1, _GGUF_SCALAR_BYTES[kind], what)
                    pos += _GGUF_SCALAR_BYTES[kind]
                elif kind == _GGUF_STRING:
                    skip_string(what)
                elif kind == _GGUF_ARRAY:
                    item, count = take("<I"), take("<Q")
                    if item in _GGUF_SCALAR_BYTES:
                        fits(count, _GGUF_SCALAR_BYTES[item], what)
                        pos += count * _GGUF_SCALAR_BYTES[item]
                    else:    # strings take 8 bytes at least, nested arrays 12
                        fits(count, 8 if item == _GGUF_STRING else 12, what)
                        for _ in range(count):
                            skip_value(item, what)
                else:
                    raise ValueError(f"{path!r} is not a readable GGUF file: {what} has the "
                                     f"unknown value type {kind}")

            n_tensors, n_kv = take("<Q"), take("<Q")
            fits(n_kv, 12, "the metadata table")       # key length + type, at least
            fits(n_tensors, 8 + 4 + 4 + 8, "the tensor directory")
            for i in range(n_kv):
                skip_string(f"metadata key #{i}")
                skip_value(take("<I"), f"metadata value #{i}")
            for i in range(n_tensors):
                skip_string(f"the name of tensor #{i}")
                dims = take("<I")
                if dims > _GGUF_MAX_DIMS:
                    raise ValueError(f"{path!r} is not a readable GGUF file: tensor #{i} has "
                                     f"{dims} dimensions")
                fits(dims, 8, f"the shape of tensor #{i}")
                pos += 8 * dims
                take("<IQ")                           # type, offset


def open_gguf(path):
    """A `gguf.GGUFReader` over `path` (memory-mapped, read-only), after check_gguf_layout."""
    from gguf import GGUFReader

    check_gguf_layout(path)
    try:
        return GGUFReader(os.fspath(path), "r")
    except MALFORMED_GGUF_ERRORS as exc:
        raise ValueError(f"{os.fspath(path)!r} is not a readable GGUF file: "
                         f"{type(exc).__name__}: {exc}") from exc
