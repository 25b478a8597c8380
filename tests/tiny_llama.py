"""Tiny random Llama models as GGUF files (gguf-py's GGUFWriter), and a float64 reference forward.

write_tiny_llama(path, weight_type) writes a 2-block model (hidden 256, 4/2 heads x 64, ffn 512,
vocab 64) whose matrices are random valid blocks of one GGUF format (tests/qblocks.py) -- a few
hundred KB, written at test time so CI needs no download. reference_logits() runs the same
model in float64 numpy from gguf-py's own dequantization, quantizing each matmul input to Q8 at
the same points as ruvpy (and llama.cpp) for quantized formats.
"""
import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

import qblocks

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, LAYERS = 256, 4, 2, 64, 512, 64, 2
ROPE_BASE, EPS = 10000.0, 1e-5
MATRICES = {  # name -> (rows, cols) in numpy order
    "attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
    "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
    "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN),
}
# byte-level pieces for 64 ids: printable ASCII from "!" on, then two control tokens
TOKENS = [chr(c) for c in range(33, 33 + VOCAB - 2)] + ["<|endoftext|>", "<|im_end|>"]


def write_tiny_llama(path, weight_type="Q4_K", *, seed=0, arch="llama", embedding_type="Q8_0",
                     tied=True, skip=(), override=None, metadata=None):
    """Writes the model and returns {tensor name: float32 values (gguf-py's dequantization)}.
    skip: tensor names to leave out; override: {tensor name: (uint8 bytes, ggml type)}."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    a = arch
    for key, value in {f"{a}.block_count": LAYERS, f"{a}.context_length": 256,
                       f"{a}.embedding_length": HIDDEN, f"{a}.feed_forward_length": FFN,
                       f"{a}.attention.head_count": HEADS,
                       f"{a}.attention.head_count_kv": KV_HEADS,
                       f"{a}.rope.dimension_count": HEAD_DIM}.items():
        writer.add_uint32(key, value)
    writer.add_float32(f"{a}.rope.freq_base", ROPE_BASE)
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", EPS)
    writer.add_string("general.name", "tiny-llama-test")
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", TOKENS)
    writer.add_array("tokenizer.ggml.token_type", [1] * (VOCAB - 2) + [3, 3])
    writer.add_array("tokenizer.ggml.merges", [])
    writer.add_uint32("tokenizer.ggml.eos_token_id", VOCAB - 2)
    for key, value in (metadata or {}).items():
        writer.add_uint32(key, value)
    values = {}

    def put(name, rows, cols, type_name, std=HIDDEN ** -0.5):
        if name in skip:
            return
        if override and name in override:
            data, ggml_type = override[name]
            writer.add_tensor(name, data, raw_dtype=ggml_type)
            return
        data, w = qblocks.random_matrix(rng, type_name, rows, cols, std=std)
        values[name] = w
        if type_name == "F32":
            writer.add_tensor(name, w)
        else:
            writer.add_tensor(name, data, raw_dtype=T[type_name])

    def put_vector(name):
        if name in skip:
            return
        g = rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32)
        values[name] = g
        writer.add_tensor(name, g)

    put("token_embd.weight", VOCAB, HIDDEN, embedding_type, std=1.0)
    for i in range(LAYERS):
        put_vector(f"blk.{i}.attn_norm.weight")
        put_vector(f"blk.{i}.ffn_norm.weight")
        for name, (rows, cols) in MATRICES.items():
            put(f"blk.{i}.{name}.weight", rows, cols, weight_type)
    put_vector("output_norm.weight")
    if not tied:
        put("output.weight", VOCAB, HIDDEN, weight_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values


def _rms(x, g):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * g


def reference_logits(values, ids, weight_type="Q4_K", embedding_type="Q8_0", tied=True):
    """float64 logits [len(ids), vocab] of the tiny model over `ids` (positions 0..)."""
    W = {k: v.astype(np.float64) for k, v in values.items()}

    def mm(x, name, type_name):   # x [n, cols] @ W.T, input quantized like the kernels
        xh = qblocks.activations(x.astype(np.float32), type_name)
        return xh @ W[name].T

    n = len(ids)
    x = W["token_embd.weight"][ids]
    inv = ROPE_BASE ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    ang = np.arange(n)[:, None] * inv[None, :]
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)

    def rope(t):   # [n, heads, d], adjacent pairs
        out = t.copy()
        e, o = t[..., 0::2], t[..., 1::2]
        out[..., 0::2] = e * cos[:, None] - o * sin[:, None]
        out[..., 1::2] = e * sin[:, None] + o * cos[:, None]
        return out

    group = HEADS // KV_HEADS
    mask = np.tril(np.ones((n, n), bool))
    for i in range(LAYERS):
        p = f"blk.{i}."
        h = _rms(x, W[p + "attn_norm.weight"])
        q = rope(mm(h, p + "attn_q.weight", weight_type).reshape(n, HEADS, HEAD_DIM))
        k = rope(mm(h, p + "attn_k.weight", weight_type).reshape(n, KV_HEADS, HEAD_DIM))
        v = mm(h, p + "attn_v.weight", weight_type).reshape(n, KV_HEADS, HEAD_DIM)
        att = np.empty((n, HEADS, HEAD_DIM))
        for hh in range(HEADS):
            s = q[:, hh] @ k[:, hh // group].T / np.sqrt(HEAD_DIM)
            s = np.where(mask, s, -np.inf)
            s = np.exp(s - s.max(1, keepdims=True))
            att[:, hh] = (s / s.sum(1, keepdims=True)) @ v[:, hh // group]
        x = x + mm(att.reshape(n, -1), p + "attn_output.weight", weight_type)
        h = _rms(x, W[p + "ffn_norm.weight"])
        g, u = mm(h, p + "ffn_gate.weight", weight_type), mm(h, p + "ffn_up.weight", weight_type)
        x = x + mm(g / (1 + np.exp(-g)) * u, p + "ffn_down.weight", weight_type)
    h = _rms(x, W["output_norm.weight"])
    return mm(h, "token_embd.weight" if tied else "output.weight", embedding_type if tied else weight_type)
