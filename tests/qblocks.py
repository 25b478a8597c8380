"""Random valid GGUF weight blocks and float64 references for the block matmul kernels.

- random_matrix(rng, type, rows, cols): bytes of a rows x cols matrix in a GGUF block format,
  every code and packed-scale byte random (so every bit pattern of the formats' layouts is
  exercised) and the f16 scale fields finite; plus its values from gguf.quants.dequantize (the
  independent reference: gguf-py's numpy decoder, not ruvpy's).
- quantize_q8(x): the matmuls' int8 activations in numpy, as the kernels must make them (float32
  arithmetic, round half to even): exact, so the kernels are compared bit for bit.
- matmul_reference(w, x): float64 W x_hat with x_hat the Q8 activations (quantized types) or
  x itself (float types), and a bound on float32 accumulation error.
"""
import numpy as np
from gguf import GGMLQuantizationType as T   # the `test` extra installs gguf
from gguf.quants import dequantize

F32_EPS = float(np.finfo(np.float32).eps)
QUANTIZED = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
FLOATS = ("F32", "F16", "BF16")
ALL_TYPES = FLOATS + QUANTIZED
# byte offsets of the f16 fields in each block, and block (values, bytes)
_F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20),
          "Q8_0": (32, 34), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}


def type_id(name):
    return int(T[name])


# largest |w| per unit of a block's f16 scale field (code range times the packed sub-scale)
_CODE_RANGE = {"Q4_0": 8, "Q4_1": 15, "Q8_0": 128, "Q4_K": 63 * 15, "Q5_K": 63 * 31, "Q6_K": 127 * 32}


def random_matrix(rng, name, rows, cols, scale=0.05, std=None):
    """(uint8 [rows, row_bytes], float32 [rows, cols] from gguf.quants.dequantize). The f16
    scale fields are uniform in [-scale, scale], or with `std` set such that the weights' range
    is about 4 std (float types: normal with that std)."""
    t = T[name]
    f = 1.0 if std is None else std
    if name in _CODE_RANGE and std is not None:
        scale = 4 * std / _CODE_RANGE[name]
    if name == "F32":
        w = (rng.standard_normal((rows, cols)) * f).astype(np.float32)
        return w.view(np.uint8).copy(), w
    if name == "F16":
        w = (rng.standard_normal((rows, cols)) * f).astype(np.float16)
        return w.view(np.uint8).copy(), w.astype(np.float32)
    if name == "BF16":
        bits = ((rng.standard_normal((rows, cols)) * f).astype(np.float32).view(np.uint32) >> 16)
        data = bits.astype(np.uint16).view(np.uint8).reshape(rows, -1)
        return data.copy(), dequantize(data, t).astype(np.float32)
    bv, bb = BLOCKS[name]
    nb = rows * cols // bv
    raw = rng.integers(0, 256, (nb, bb), dtype=np.uint8)
    for off in _F16_FIELDS[name]:
        raw[:, off:off + 2] = rng.uniform(-scale, scale, nb).astype(np.float16).view(np.uint8).reshape(nb, 2)
    data = raw.reshape(rows, -1)
    return data, dequantize(data, t).astype(np.float32)


def quantize_q8(x):
    """(q int8 [n, k], d, s32 [n, k/32], s16 [n, k/16]) as the kernels make them."""
    x = np.asarray(x, np.float32)
    n, k = x.shape
    xb = x.reshape(n, k // 32, 32)
    d = (np.abs(xb).max(-1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(d > 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
        # 1 / d overflows for a block below ~3.7e-37: its values and d are scaled by 2^64 first
        tiny = np.isinf(inv)
        pre = np.where(tiny, np.float32(2.0 ** 64), np.float32(1)).astype(np.float32)
        inv = np.where(tiny, np.float32(1) / (d * pre), inv).astype(np.float32)
    q = np.clip(np.rint((xb * pre[..., None]) * inv[..., None]), -127, 127).astype(np.int8)
    halves = q.reshape(n, k // 32, 2, 16).astype(np.int32).sum(-1)
    s16 = (d[..., None] * halves.astype(np.float32)).astype(np.float32).reshape(n, k // 16)
    s32 = (d * halves.sum(-1).astype(np.float32)).astype(np.float32)
    return q.reshape(n, k), d, s32, s16


def nibble_order(q):
    """The kernels' second copy of the codes (rv_wmat.h, rv_qact.q4): per group of 4 blocks the
    first 16 codes of each block, then the last 16 of each; a partial last group unchanged."""
    n, k = q.shape
    full = k // 128 * 128
    out = q.copy()
    out[:, :full] = q[:, :full].reshape(n, -1, 4, 2, 16).transpose(0, 1, 3, 2, 4).reshape(n, full)
    return out


def activations(x, name):
    """float64 activations a matmul of type `name` multiplies: x itself for float types, the
    dequantized Q8 form for quantized ones."""
    x = np.asarray(x, np.float32)
    if name in FLOATS:
        return x.astype(np.float64)
    q, d, _, _ = quantize_q8(x)
    n, k = x.shape
    return (q.reshape(n, -1, 32).astype(np.float64) * d[..., None]).reshape(n, k)


def matmul_reference(w, x, name):
    """(float64 [n, rows] = x_hat @ w.T, tolerance [n, rows]). The kernels' integer dot products
    are exact; what remains is float32 rounding of the per-block scale products and of the sums
    over blocks and vector lanes: (2 sqrt(k) + 8) eps of sum |w x_hat| bounds it (measured worst
    ~1e-7 of that sum over every ISA, tests/test_qmatmul.py), far below one missing block."""
    xh = activations(x, name)
    w64 = np.asarray(w, np.float64)
    ref = xh @ w64.T
    tol = (2 * np.sqrt(w64.shape[1]) + 8) * F32_EPS * (np.abs(xh) @ np.abs(w64).T) + 1e-30
    return ref, tol
