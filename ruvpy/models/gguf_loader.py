"""Read a Llama-family GGUF file: hyper-parameters, tokenizer tables and the weights in place.

The file is memory-mapped and indexed by ruvpy's own reader (ruvpy._gguf: bounds-checked C,
no copy). Weight matrices stay in their GGUF block formats -- F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q4_K, Q5_K, Q6_K -- as `QMatrix` objects over the mapping, multiplied in place by
ruvpy's SIMD kernels (ruvpy._linear). Nothing is dequantized. A file that cannot be run
(unsupported tensor type, missing tensor, another architecture, truncated or corrupt) raises
a ValueError naming what is wrong, and the mapping is closed again.
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
    """A model's weights, used in place from its memory-mapped GGUF file.

    layers: per block a dict of QMatrix q, k, v, o, gate, up, down (GGUF's [out, in] layout)
    and float32 [hidden] RMSNorm gains attn_norm, ffn_norm; embedding: QMatrix [vocab, hidden];
    output: the LM head (the embedding itself when tied); output_norm: float32 [hidden]."""

    file: object                 # ruvpy._gguf.GGUFFile (owns the mapping)
    layers: list
    embedding: object
    output: object
    output_norm: np.ndarray

    @property
    def path(self) -> str:
        return self.file.path

    @property
    def tied(self) -> bool:
        return self.output is self.embedding

    @property
    def nbytes(self) -> int:
        """Bytes of the weights the model reads (in the file's own formats)."""
        mats = [m for layer in self.layers for k, m in layer.items() if not k.endswith("norm")]
        mats += [self.embedding] + ([] if self.tied else [self.output])
        norms = [a.nbytes for layer in self.layers for k, a in layer.items() if k.endswith("norm")]
        return sum(m.nbytes for m in mats) + sum(norms) + self.output_norm.nbytes

    @property
    def mapped_bytes(self) -> int:
        """Bytes of the file mapped into memory (all of it)."""
        return self.file.size

    def resident_bytes(self) -> int:
        """Bytes of the tensor data resident in RAM now (mincore)."""
        return self.file.resident_bytes()

    def types(self) -> dict:
        """{block format: number of matrices} of the model's weight matrices."""
        counts = {}
        mats = [m for layer in self.layers for k, m in layer.items() if not k.endswith("norm")]
        for m in mats + [self.embedding] + ([] if self.tied else [self.output]):
            counts[m.type] = counts.get(m.type, 0) + 1
        return counts

    def close(self):
        """Unmap the file (deferred while arrays over it are alive)."""
        self.file.close()


def _field(reader, key, default=None):
    return reader.get(key, default)


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
    n_tokens = reader.length("tokenizer.ggml.tokens")
    if n_tokens is None:
        raise ValueError("GGUF file lacks the metadata key 'tokenizer.ggml.tokens'")
    embd = _tensor_info(reader, "token_embd.weight")
    vocab = int(_field(reader, f"{arch}.vocab_size", n_tokens))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    config = ModelConfig(
        name=str(_field(reader, "general.name", os.path.basename(reader.path))),
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
        tied_embeddings="output.weight" not in reader,
    )
    if vocab != n_tokens or tuple(embd.shape) != (hidden, vocab):
        raise ValueError(f"GGUF vocabulary mismatch: {n_tokens} tokens, vocab_size {vocab}, "
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
    if name not in reader:
        raise ValueError(f"GGUF file lacks the tensor {name!r}")
    return reader.tensor(name)


def _matrix(reader, name, rows, cols):
    """QMatrix over tensor `name` ([rows, cols] in numpy order: ggml shape (cols, rows))."""
    from ruvpy._linear import QMatrix, SUPPORTED_TYPES

    info = _tensor_info(reader, name)
    if info.type_name not in SUPPORTED_TYPES:
        raise ValueError(f"GGUF tensor {name!r} has type {info.type_name}, which ruvpy cannot "
                         f"run (supported: {', '.join(SUPPORTED_TYPES)})")
    if info.shape != (cols, rows):
        raise ValueError(f"GGUF tensor {name!r} has shape {list(info.shape[::-1])}, expected "
                         f"[{rows}, {cols}]")
    return QMatrix(reader.tensor_bytes(name), info.type, rows, cols, name=name)


def _vector(reader, name, n):
    """float32 [n] of a 1-D tensor: a view of the mapping for F32, converted for F16/BF16."""
    info = _tensor_info(reader, name)
    if info.shape != (n,):
        raise ValueError(f"GGUF tensor {name!r} has shape {list(info.shape)}, expected [{n}]")
    raw = reader.tensor_bytes(name)
    if info.type_name == "F32":
        return raw.view(np.float32)
    if info.type_name == "F16":
        return raw.view(np.float16).astype(np.float32)
    if info.type_name == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    raise ValueError(f"GGUF tensor {name!r} has type {info.type_name}; ruvpy reads norm "
                     f"vectors in F32, F16 or BF16")


def read_weights(reader, config: ModelConfig) -> LlamaWeights:
    """The model's weights over the mapping of `reader` (a ruvpy._gguf.GGUFFile)."""
    c = config
    hidden, q_dim, kv_dim = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layers = []
    for i in range(c.num_layers):
        p = f"blk.{i}."
        layers.append({
            "q": _matrix(reader, p + "attn_q.weight", q_dim, hidden),
            "k": _matrix(reader, p + "attn_k.weight", kv_dim, hidden),
            "v": _matrix(reader, p + "attn_v.weight", kv_dim, hidden),
            "o": _matrix(reader, p + "attn_output.weight", hidden, q_dim),
            "gate": _matrix(reader, p + "ffn_gate.weight", c.ffn_size, hidden),
            "up": _matrix(reader, p + "ffn_up.weight", c.ffn_size, hidden),
            "down": _matrix(reader, p + "ffn_down.weight", hidden, c.ffn_size),
            "attn_norm": _vector(reader, p + "attn_norm.weight", hidden),
            "ffn_norm": _vector(reader, p + "ffn_norm.weight", hidden),
        })
    embedding = _matrix(reader, "token_embd.weight", c.vocab_size, hidden)
    output = embedding if c.tied_embeddings else _matrix(reader, "output.weight", c.vocab_size,
                                                         hidden)
    return LlamaWeights(file=reader, layers=layers, embedding=embedding, output=output,
                        output_norm=_vector(reader, "output_norm.weight", hidden))


def open_gguf(path, *, populate=False):
    """A ruvpy._gguf.GGUFFile over `path` (memory-mapped, read-only)."""
    from ruvpy._gguf import GGUFFile

    return GGUFFile(os.fspath(path), populate=populate)
