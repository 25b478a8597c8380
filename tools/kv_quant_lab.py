"""TurboQuant variants prototyped in float64 numpy on SmolLM2's own K/V: which choices reach
the paper's quality (Zandieh et al., arXiv 2504.19874) on real text.

    python tools/kv_quant_lab.py [--variants NAME ...] [--tokens 1536] [--json out.json]
                                 [--no-ppl] [--list] [--gauss] [--layers L ...]

Every variant is a quantize-dequantize codec for one head's group of G = 64 tokens (keys and
values apart). Two measurements per variant:

- attention-output cosine per layer on Q/K/V captured from the model (fp32 KV) over the
  GPL-3 text: every full group of 64 tokens quantized, causal attention in float64 against
  attention over the exact K/V; mean over query rows at positions >= 64 and heads;
- the model with the codec as its cold tier: a stand-in Runtime (this file) keeps K/V in
  float32, quantizes and dequantizes each group of 64 tokens as it leaves the hot tier (128
  tokens, text fed 32 tokens per step, as tools/eval_kv_quality.py does with the real caches)
  and attends in float32 numpy. Reported: perplexity on the GPL-3 and Python-reference texts
  relative to fp16 KV through the same stand-in (fp16 = K/V rounded to binary16), and the mean
  KL divergence of the next-token distributions from fp32 KV (less noisy than perplexity).

Variants beyond the named ones (--list) are parsed from their names:
{c|tcqS|idealGAP}-kBITSvBITS[-search][-ks][-qw[P]|-qd[P]][-sink[N]] - the C format's metadata (4-bit key group
mean, 8-bit log scales, least-squares scales) with scalar Lloyd-Max codes and the encoder's
7-scale search (c), trellis-coded quantization with S states and the same search (tcqS), or the
Gaussian rate-distortion bound's test channel GAP dB above the bound (idealGAP: what any code of
the rotated coordinates at that rate could at best do, give or take how far they are from
Gaussian); -ks adds 2-bit per-channel key scales, -qw codes M^P r for the key residual r
(M: the layer's query second moment per KV head, calibrated on a text no result is measured
on; P 0.25 unless given) and undoes it after the codes, -qd the same with M's diagonal only (a
scale per RoPE channel pair); -sink keeps the sequence's first N (1) tokens exact in a binary16
slot (its bits spread over the 1,024 captured tokens).

Bits per value are the variant's storage per token and head, metadata included (norms,
per-group means, outlier channel lists), as a formula: the C format's bytes are measured
from allocations by tools/eval_kv_quality.py and tools/bench_kvcache.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common  # noqa: E402,F401  (puts the checkout on sys.path)
from eval_kv_quality import (CALIBRATION, capture_qkv, log, log_softmax_nll, reference_attention,  # noqa: E402
                             row_cosines, texts)

G = 64          # tokens per cold group
HOT = 128       # hot-tier tokens in the perplexity runs
CHUNK = 32      # tokens per step in the perplexity runs

# ---- codebooks ------------------------------------------------------------------------------


def _lloyd(pdf, lo, hi, levels, iters=300, grid=20001):
    """Lloyd-Max quantizer of a density on [lo, hi]: (centroids, thresholds)."""
    x = np.linspace(lo, hi, grid)
    p = pdf(x)
    p /= p.sum()
    cdf = np.cumsum(p)
    c = np.interp((np.arange(levels) + 0.5) / levels, cdf, x)
    for _ in range(iters):
        t = (c[1:] + c[:-1]) / 2
        cell = np.searchsorted(t, x)
        mass = np.bincount(cell, p, levels)
        mean = np.bincount(cell, p * x, levels)
        c = np.where(mass > 0, mean / np.maximum(mass, 1e-300), c)
    return c, (c[1:] + c[:-1]) / 2


_BOOKS = {}


def codebook(kind, bits, D):
    """Centroids and thresholds for one rotated coordinate of a unit vector in D dimensions."""
    key = (kind, bits, D)
    if key not in _BOOKS:
        levels = 1 << bits
        if kind == "gauss":           # N(0, 1/D): the large-D limit
            c, t = _lloyd(lambda x: np.exp(-0.5 * x * x), -6, 6, levels)
            c, t = c / math.sqrt(D), t / math.sqrt(D)
        elif kind == "beta":          # exact: density (1 - x^2)^((D - 3) / 2) on [-1, 1]
            c, t = _lloyd(lambda x: np.maximum(1 - x * x, 0) ** ((D - 3) / 2), -1, 1, levels)
        elif kind == "uniform":       # evenly spaced over +-2.7 sigma (a plain int code)
            s = 2.7 / math.sqrt(D)
            c = np.linspace(-s, s, levels + 1)
            c = (c[1:] + c[:-1]) / 2
            t = (c[1:] + c[:-1]) / 2
        else:
            raise ValueError(kind)
        _BOOKS[key] = (c, t)
    return _BOOKS[key]


# ---- rotations ------------------------------------------------------------------------------

_ROT = {}


def hadamard(n):
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def rotation(kind, m, seed=0):
    """An m x m orthogonal matrix R (y = R x)."""
    key = (kind, m, seed)
    if key not in _ROT:
        rng = np.random.default_rng(1234 + 7 * m + seed)
        if kind == "hadamard":
            D = 1 << (m - 1).bit_length()
            if D != m:
                raise ValueError("randomized Hadamard needs a power-of-two size")
            R = hadamard(D) * rng.choice([-1.0, 1.0], D)[None, :] / math.sqrt(D)
        elif kind == "hadamard2":      # two rounds: H S2 H S1
            D = m
            H = hadamard(D) / math.sqrt(D)
            R = H @ np.diag(rng.choice([-1.0, 1.0], D)) @ H @ np.diag(rng.choice([-1.0, 1.0], D))
        elif kind == "dense":          # Haar-random orthogonal
            qm, r = np.linalg.qr(rng.standard_normal((m, m)))
            R = qm * np.sign(np.diag(r))[None, :]
        elif kind == "none":
            R = np.eye(m)
        else:
            raise ValueError(kind)
        _ROT[key] = R
    return _ROT[key]


# ---- trellis-coded quantization -------------------------------------------------------------
# Marcellin & Fischer's TCQ: a union codebook of 2^(r + 1) levels for r bits per coordinate, its
# levels dealt round-robin into 4 subsets D0..D3; a trellis of S = 2^nu states (state = the last
# nu branch bits) lets each state reach only D0/D2 or D1/D3, one branch bit chooses between the
# two and r - 1 bits pick a level inside the subset; the encoder is a Viterbi search. The decoder
# is local: a coordinate's level is a function of its own r bits and the nu branch bits before it.


def _parity(x):
    x = np.asarray(x)
    out = np.zeros_like(x)
    while np.any(x):
        out ^= x & 1
        x = x >> 1
    return out


# shift-register trellises (subset = 2 * parity((2s | b) & m1) + parity(s & m0)), the (m0, m1)
# that measured the least MSE on N(0, 1) at 3 bits (tcq_search_trellis: every pair up to 16
# states, 60 / 40 / 15 random pairs at 32 / 64 / 256)
_TRELLIS = {4: (1, 7), 8: (1, 13), 16: (7, 19), 32: (15, 59), 64: (31, 101), 256: (122, 403)}


def _trellis(S, masks=None):
    """next_state [S, 2] and subset [S, 2] of the S-state trellis."""
    m0, m1 = masks or _TRELLIS[S]
    s = np.arange(S)[:, None]
    b = np.arange(2)[None, :]
    reg = (s << 1) | b
    nxt = reg & (S - 1)
    sub = 2 * _parity(reg & m1) + _parity(s & m0)
    return nxt, np.broadcast_to(sub, (S, 2)).copy()


_TCQ_BOOKS = {}


def tcq_book(r, S, train=True):
    """Union codebook (2^(r+1) ascending levels) for unit-variance Gaussian coordinates: Lloyd-Max
    at r + 1 bits, then a few rounds of centroid updates on the TCQ encoder's own assignments."""
    key = (r, S, train)
    path = f"/tmp/kvlab_tcqbook_{r}_{S}_{int(train)}.npy"
    if key not in _TCQ_BOOKS and os.path.exists(path):
        _TCQ_BOOKS[key] = np.load(path)
    if key not in _TCQ_BOOKS:
        c, _ = _lloyd(lambda x: np.exp(-0.5 * x * x), -7, 7, 1 << (r + 1))
        if train:
            rng = np.random.default_rng(7)
            Y = rng.standard_normal((1024 if S > 16 else 4096, 64))
            rates = np.full(64, r)
            for _ in range(6):
                _TCQ_BOOKS[key] = c
                _, idx = tcq_encode(Y, rates, S, books={r: c})
                num = np.bincount(idx.ravel(), Y.ravel(), len(c))
                cnt = np.bincount(idx.ravel(), None, len(c))
                c = np.where(cnt > 0, num / np.maximum(cnt, 1), c)
                c = np.sort(c)
        _TCQ_BOOKS[key] = c
        np.save(path, c)
    return _TCQ_BOOKS[key]


def tcq_encode(Y, rates, S, books=None, masks=None, tail="biting"):
    """Y [n, T] (unit-variance coordinates), rates [T] bits per coordinate: the Viterbi path's
    reconstruction [n, T] and union-level indices [n, T].

    tail="biting": the path ends in the state it starts from, so the state before coordinate 0
    is the branch bits of the last coordinates and no start state is stored (the decoder reads
    the nu branch bits before a coordinate circularly). The start state comes from a first
    Viterbi pass over the coordinates rotated by T/2 (the state it passes through where the
    vector wraps), the usual two-pass approximation of a tail-biting search. tail="zero": every
    path starts in state 0; tail="free": any start (nu bits per vector would be stored)."""
    n, T = Y.shape
    if tail == "biting":
        h = T // 2
        _, _, states = _viterbi(np.roll(Y, -h, axis=1), np.roll(rates, -h), S, books, masks, None, None)
        s0 = states[:, T - h - 1]                 # state after original coordinate T - 1
        rec, idx, _ = _viterbi(Y, rates, S, books, masks, s0, s0)
        return rec, idx
    rec, idx, _ = _viterbi(Y, rates, S, books, masks, np.zeros(n, int) if tail == "zero" else None, None)
    return rec, idx


def _viterbi(Y, rates, S, books, masks, start, end):
    """One Viterbi pass: start / end [n] states (None: free); (reconstruction, level indices,
    state after each coordinate [n, T])."""
    n, T = Y.shape
    nxt, sub = _trellis(S, masks)
    books = books or {}
    rows = np.arange(n)
    if start is None:
        cost = np.zeros((n, S))
    else:
        cost = np.full((n, S), np.inf)
        cost[rows, start] = 0.0
    back = np.empty((T, n, S), np.int32)          # (predecessor state << 1 | branch) per new state
    lvl = np.empty((T, n, 4), np.int32)
    # transitions into each state: two (s, b) pairs
    into = [[] for _ in range(S)]
    for s_ in range(S):
        for b_ in range(2):
            into[nxt[s_, b_]].append((s_, b_))
    src = np.array([[p[0] for p in into[t]] for t in range(S)])      # [S, 2]
    br = np.array([[p[1] for p in into[t]] for t in range(S)])
    subin = sub[src, br]                                             # [S, 2]
    for i in range(T):
        r = int(rates[i])
        c = books.get(r)
        if c is None:
            c = tcq_book(r, S)
        y = Y[:, i]
        dist = np.empty((n, 4))
        for j in range(4):
            cj = c[j::4]
            k = np.clip(np.searchsorted((cj[1:] + cj[:-1]) / 2, y), 0, len(cj) - 1)
            lvl[i, :, j] = 4 * k + j
            dist[:, j] = (y - cj[k]) ** 2
        cand = cost[:, src] + dist[:, subin]                          # [n, S, 2]
        pick = np.argmin(cand, axis=2)                                # [n, S]
        cost = np.take_along_axis(cand, pick[..., None], 2)[..., 0]
        back[i] = (np.take_along_axis(np.broadcast_to(src, (n, S, 2)), pick[..., None], 2)[..., 0] << 1) | \
            np.take_along_axis(np.broadcast_to(br, (n, S, 2)), pick[..., None], 2)[..., 0]
    state = np.argmin(cost, axis=1) if end is None else np.asarray(end)
    idx = np.empty((n, T), np.int64)
    states = np.empty((n, T), np.int64)
    for i in range(T - 1, -1, -1):
        states[:, i] = state
        code = back[i, rows, state]
        prev, b = code >> 1, code & 1
        idx[:, i] = lvl[i, rows, sub[prev, b]]
        state = prev
    out = np.empty((n, T))
    for r in np.unique(rates):
        cols = np.where(rates == r)[0]
        c = books.get(int(r))
        if c is None:
            c = tcq_book(int(r), S)
        out[:, cols] = c[idx[:, cols]]
    return out, idx, states


def tcq_search_trellis(S, r=3, n=2048):
    """MSE on N(0, 1) of every shift-register trellis of S states (untrained Lloyd-Max union)."""
    nu = S.bit_length() - 1
    Y = np.random.default_rng(3).standard_normal((n, 64))
    c, _ = _lloyd(lambda x: np.exp(-0.5 * x * x), -7, 7, 1 << (r + 1))
    res = []
    for m0 in range(1, 1 << (nu - 1)):
        for m1 in range(1 << nu, 1 << (nu + 1)):
            if not m1 & 1:
                continue
            out, _ = tcq_encode(Y, np.full(64, r), S, books={r: c}, masks=(m0, m1))
            res.append((float(((out - Y) ** 2).mean()), m0, m1))
    return sorted(res)[:5]


def test_channel(Y, rates, gap_db, rng):
    """What a code at `gap_db` above the Gaussian rate-distortion bound would do: the bound's
    backward test channel (Y = Y_hat + Z, Z independent of Y_hat) at distortion
    D = 2^(-2r) 10^(gap/10) per unit-variance coordinate."""
    D = np.minimum(2.0 ** (-2.0 * rates) * 10 ** (gap_db / 10), 1.0)[None, :]
    a = 1 - D
    return a * Y + np.sqrt(a * D) * rng.standard_normal(Y.shape)


# ---- the codec ------------------------------------------------------------------------------

@dataclasses.dataclass
class Part:
    """How one of K / V is coded."""
    bits: float = 3.0               # code bits per coordinate (fractional: `frac` decides how)
    qjl: bool = False               # bits - 1 MSE bits + 1 bit of QJL on the residual
    book: str = "gauss"
    rot: str = "hadamard"
    norm: str = "fp16"              # "fp16" per-token norm, "log8" 8-bit log-scale (group fp16 range)
    rescale: str = "plain"          # "plain" |x| y_hat, "length" keep |x|, "lsq" least-squares scale
    mean: str = "none"              # "none", "fp16", "q8", "q4": per-group per-channel mean taken out
    mean_flag: bool = False         # per token (1 bit): the mean is taken out only where that shrinks it
    frac: str = "coords"            # fractional bits: "coords" (first coordinates get ceil) or "split"
    split_by: str = "energy"        # "split": outlier channels by L2 energy over the group
    dense8: int = 0                 # outlier channels (RMS > 3x median) at 8 bits, at most this many
    mu_dense: int = 0               # channels of the largest |group mean| kept as scalar codes
    mu_dense_bits: int = 6          # (their bits, affine per channel over the group)
    scale_channels: float = 0.0     # divide channels by (their group RMS)^this before rotating (stored fp16)
    scale_codes: int = 0            # ... or as codes of this many bits, steps of half an octave below the largest
    search: int = 1                 # codes tried at this many scales around the norm's (0.85..1.15), least error kept
    code: str = "scalar"            # "scalar" Lloyd-Max, "tcq" trellis-coded (Viterbi), "ideal" R-D test channel
    states: int = 8                 # "tcq": trellis states
    gap_db: float = 0.0             # "ideal": distortion this many dB above the Gaussian R-D bound
    qweight: float = 0.0            # keys: multiply by M^qweight before the rotation (M: the layer's
                                    # query second moment per KV head, from a calibration text)
    qweight_diag: bool = False      # ... only M's diagonal, averaged over each RoPE channel pair


def _quantize_coords(Y, bits_per_coord, book, D):
    """Y [n, D]: nearest centroid per coordinate with the coordinate's bit count."""
    out = np.empty_like(Y)
    for b in np.unique(bits_per_coord):
        cols = np.where(bits_per_coord == b)[0]
        if b == 0:
            out[:, cols] = 0.0
            continue
        c, t = codebook(book, int(b), D)
        out[:, cols] = c[np.searchsorted(t, Y[:, cols])]
    return out


def _bits_per_coord(bits, D):
    lo = int(math.floor(bits))
    n_hi = int(round((bits - lo) * D))
    return np.array([lo + 1] * n_hi + [lo] * (D - n_hi))


def _code_norms(norms, how):
    if how == "fp16":
        return norms.astype(np.float16).astype(np.float64)
    if how in ("log8", "log6"):      # 8 / 6-bit codes of log |x| over the group's range
        pos = norms > 0
        if not pos.any():
            return norms
        lg = np.log(np.where(pos, norms, norms[pos].min()))
        lo, hi = lg.min(), lg.max()
        lo, hi = float(np.float16(lo)), float(np.float16(hi))
        top = 255 if how == "log8" else 63
        step = (hi - lo) / top if hi > lo else 1.0
        q = np.clip(np.round((lg - lo) / step), 0, top)
        return np.where(pos, np.exp(lo + q * step), 0.0)
    if how == "exact":
        return norms
    raise ValueError(how)


def _code_vectors(X, bits_pc, part, seed, weight=None):
    """X [n, m] -> X_hat: norm, rotation, scalar codes (and QJL), rescale. `weight` (m x m,
    symmetric, invertible) is applied before the rotation and undone after the codes."""
    if weight is not None:
        return _code_vectors(X @ weight, bits_pc, part, seed) @ np.linalg.inv(weight)
    n, m = X.shape
    norms = np.linalg.norm(X, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    R = rotation(part.rot, m, seed)
    Y = (X / safe[:, None]) @ R.T
    if part.qjl:
        Yh = _quantize_coords(Y, np.maximum(bits_pc - 1, 0), part.book, m)
        r = Y - Yh
        S = np.random.default_rng(99 + m).standard_normal((m, m))
        gamma = np.linalg.norm(r, axis=1).astype(np.float16).astype(np.float64)
        Yh = Yh + math.sqrt(math.pi / 2) / m * gamma[:, None] * (np.sign(r @ S.T + 1e-300) @ S)
    elif part.code == "ideal":
        rng = np.random.default_rng(abs(hash((seed, n, float(X[0, 0])))) % 2**32)
        Yh = test_channel(Y * math.sqrt(m), bits_pc.astype(float), part.gap_db, rng) / math.sqrt(m)
    elif part.code == "tcq":    # the search's scales stacked into one Viterbi run
        mults = np.linspace(0.85, 1.15, part.search) if part.search > 1 else np.ones(1)
        big = np.concatenate([Y * (mu_ * math.sqrt(m)) for mu_ in mults])
        rec, _ = tcq_encode(big, bits_pc, part.states)
        Yh, best = None, np.full(n, -1.0)
        for j, mult in enumerate(mults):
            Ym = rec[j * n:(j + 1) * n] / (mult * math.sqrt(m))
            fit = (Y * Ym).sum(1) ** 2 / np.maximum((Ym * Ym).sum(1), 1e-300)
            Yh = Ym if Yh is None else np.where((fit > best)[:, None], Ym, Yh)
            best = np.maximum(fit, best)
    elif part.search > 1:       # the nearest codes at several scales; the least lsq error wins
        Yh, best = None, np.full(n, -1.0)
        for mult in np.linspace(0.85, 1.15, part.search):
            Ym = _quantize_coords(Y * mult, bits_pc, part.book, m) / mult
            fit = (Y * Ym).sum(1) ** 2 / np.maximum((Ym * Ym).sum(1), 1e-300)
            Yh = Ym if Yh is None else np.where((fit > best)[:, None], Ym, Yh)
            best = np.maximum(fit, best)
    else:
        Yh = _quantize_coords(Y, bits_pc, part.book, m)
    if part.rescale == "length":
        f = 1.0 / np.maximum(np.linalg.norm(Yh, axis=1), 1e-30)
    elif part.rescale == "lsq":
        f = (Y * Yh).sum(1) / np.maximum((Yh * Yh).sum(1), 1e-30)
    else:
        f = np.ones(n)
    scale = _code_norms(norms * f, part.norm)
    return (Yh @ R) * scale[:, None]


def _pick_heavy(X, most, ratio=3.0):
    ms = (X * X).sum(0)
    thresh = ratio * ratio * np.median(ms)
    idx = [c for c in np.argsort(-ms)[:most] if ms[c] > thresh and ms[c] > 0]
    return np.sort(np.array(idx, int))


def _q8_channels(X):
    mn, mx = X.min(0), X.max(0)
    s = ((mx - mn) / 255).astype(np.float16).astype(np.float64)
    z = mn.astype(np.float16).astype(np.float64)
    code = np.clip(np.round((X - z) / np.where(s > 0, s, 1)), 0, 255)
    return np.where(s > 0, code * s + z, z)


def _code_mean(mu, how):
    if how == "fp16":
        return mu.astype(np.float16).astype(np.float64)
    if how in ("q8", "q4"):
        L = 255 if how == "q8" else 15
        mn, mx = float(np.float16(mu.min())), float(np.float16(mu.max()))
        s = (mx - mn) / L if mx > mn else 1.0
        return mn + np.clip(np.round((mu - mn) / s), 0, L) * s
    raise ValueError(how)


def query_weight(M, part):
    """The key transform M^qweight (M: a KV head's query second moment, d x d): a key error e
    costs the scores (q . e)^2 on average e' M e, so coding M^p k spends the bits where the
    queries look. Regularized so that directions the calibration never queried stay coded."""
    d = len(M)
    if part.qweight_diag:
        e = np.diag(M).copy()
        e = np.tile((e[:d // 2] + e[d // 2:]) / 2, 2)       # RoPE pairs (c, c + d/2) alike
        return np.diag((e + 0.01 * e.mean()) ** part.qweight)
    w, U = np.linalg.eigh(M)
    w = np.maximum(w, 0) + 0.01 * max(w.mean(), 1e-30)
    return (U * w ** part.qweight) @ U.T


# {layer: [query second moment per KV head]} from a calibration text no result is measured on
# (main() fills it: Apache-2.0 from Debian's common licenses)
QUERY_METRIC = {}


def code_group(X, part, seed=0, metric=None):
    """One head's group X [G, d] (float64) quantized and dequantized by `part`; `metric` is the
    head's query second moment (needed when part.qweight)."""
    X = np.asarray(X, np.float64)
    n, d = X.shape
    out = np.zeros_like(X)
    rest = X.copy()
    if part.dense8:
        idx = _pick_heavy(X, part.dense8)
        if len(idx):
            out[:, idx] = _q8_channels(X[:, idx])
            rest[:, idx] = 0.0
    if part.mu_dense:
        idx = np.sort(np.argsort(-np.abs(rest.mean(0)))[:part.mu_dense])
        Y = rest[:, idx]
        L = 2 ** part.mu_dense_bits - 1
        mn = Y.min(0).astype(np.float16).astype(np.float64)
        st = ((Y.max(0) - mn) / L).astype(np.float16).astype(np.float64)
        st = np.where(st > 0, st, 1.0)
        out[:, idx] = np.clip(np.round((Y - mn) / st), 0, L) * st + mn
        rest[:, idx] = 0.0
    mu = np.zeros(d)
    flags = np.ones(n, bool)
    if part.mean != "none":
        mu = rest.mean(0)
        if part.mean_flag:       # tokens far from the group's mean (attention sinks) keep theirs
            for _ in range(2):
                flags = np.linalg.norm(rest - mu, axis=1) < np.linalg.norm(rest, axis=1)
                mu = rest[flags].mean(0) if flags.any() else np.zeros(d)
        mu = _code_mean(mu, part.mean)
        if part.dense8 and len(idx):
            mu[idx] = 0.0
        if part.mean_flag:
            flags = np.linalg.norm(rest - mu, axis=1) < np.linalg.norm(rest, axis=1)
        rest = rest - np.where(flags[:, None], mu, 0.0)
    sc = np.ones(d)
    if part.scale_channels:
        sc = np.sqrt((rest * rest).mean(0)) ** part.scale_channels
        if part.scale_codes:        # relative scales only (the token's scale absorbs the rest)
            top = sc.max() if sc.max() > 0 else 1.0
            code = np.clip(np.round(-2 * np.log2(np.maximum(sc, 1e-300) / top)), 0, 2 ** part.scale_codes - 1)
            sc = 2.0 ** (-code / 2)
        sc = sc.astype(np.float16).astype(np.float64)
        sc = np.where(sc > 0, sc, 1.0)
        rest = rest / sc
    if part.frac == "split" and part.bits != int(part.bits):
        lo = int(math.floor(part.bits))
        m_hi = int(round((part.bits - lo) * d))          # channels at lo + 1 bits
        energy = (rest * rest).sum(0)
        hi_idx = np.sort(np.argsort(-energy)[:m_hi])
        lo_idx = np.setdiff1d(np.arange(d), hi_idx)
        coded = np.zeros_like(rest)
        for idx, b in ((hi_idx, lo + 1), (lo_idx, lo)):
            if len(idx):
                sub = dataclasses.replace(part, rot="dense" if part.rot == "hadamard" else part.rot)
                coded[:, idx] = _code_vectors(rest[:, idx], np.full(len(idx), b), sub, seed + len(idx))
    else:
        weight = None
        if part.qweight:
            if metric is None:
                raise ValueError("a query-weighted part needs the layer's query metric (QUERY_METRIC)")
            weight = query_weight(metric, part)
        coded = _code_vectors(rest, _bits_per_coord(part.bits, d), part, seed, weight)
    return out + coded * sc + np.where(flags[:, None], mu, 0.0)


def part_bits(part, d, n_dense=0):
    """Stored bits per value of one of K / V at head_dim d (G = 64 tokens per group)."""
    b = part.bits * d
    b += {"fp16": 16, "log8": 8 + 32 / G, "log6": 6 + 32 / G, "exact": 32}[part.norm]
    if part.qjl:
        b += 16                                    # |r|
    if part.mean != "none":
        b += {"fp16": 16 * d, "q8": 8 * d + 32, "q4": 4 * d + 32}[part.mean] / G + part.mean_flag
    if part.scale_channels:
        b += (part.scale_codes or 16) * d / G
    if part.frac == "split" and part.bits != int(part.bits):
        b += {"fp16": 16, "log8": 8, "log6": 6, "exact": 32}[part.norm] + d / G     # second norm, channel mask
    if part.mu_dense:
        b += part.mu_dense * (part.mu_dense_bits + (32 + 8) / G)
    if part.dense8:
        b += n_dense * (8 - part.bits) + (n_dense * (8 + 32)) / G + 8 / G
    return b / d


@dataclasses.dataclass
class Variant:
    name: str
    k: Part
    v: Part
    note: str = ""
    sink: int = 0                   # the sequence's first tokens kept exact (a permanent fp16 slot)

    def bits(self, d=64, n_dense=(0, 0), context=1024):
        """Per stored value; a sink slot (binary16 K and V, besides the group that also codes
        those tokens) is spread over `context` tokens."""
        return (part_bits(self.k, d, n_dense[0]) + part_bits(self.v, d, n_dense[1])) / 2 + 16 * self.sink / context


def qdq_kv(variant, k, v, layer=None):
    """k, v [n, kvh, d] of `layer` in groups of G tokens (a partial last group stays exact)."""
    k2, v2 = np.array(k, np.float64), np.array(v, np.float64)
    n, kvh, d = k.shape
    metrics = QUERY_METRIC.get(layer, [None] * kvh)
    for a in range(0, n - G + 1, G):
        for h in range(kvh):
            k2[a:a + G, h] = code_group(k[a:a + G, h], variant.k, seed=h, metric=metrics[h])
            v2[a:a + G, h] = code_group(v[a:a + G, h], variant.v, seed=100 + h)
    return k2, v2


def apply_sink(variant, k, v, kq, vq, start=0):
    """The first variant.sink tokens of the sequence (at positions start...) back to exact."""
    s = max(0, min(variant.sink - start, len(k)))
    if s:
        kq[:s], vq[:s] = k[:s], v[:s]
    return kq, vq


# ---- a stand-in Runtime: cold groups through a codec, float32 numpy attention ---------------

class _Step:
    def __init__(self, rt, seq, n):
        self.rt, self.seq, self.n = rt, seq, n
        self.start = rt.pos[seq]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.rt.pos[self.seq] = self.start + self.n
        return False

    @property
    def positions(self):
        return np.arange(self.start, self.start + self.n, dtype=np.int64)

    def alloc(self, shape, dtype=np.float32):
        raise MemoryError("no arena here: the model falls back to numpy buffers")

    def attention(self, layer, q, k, v, out=None):
        res = self.rt.attend(self.seq, layer, self.start, q, k, v)
        if out is None:
            return res
        out[...] = res
        return out


class CodecRuntime:
    """Just what the model's forward pass uses of a Runtime. Layers keep K/V float32; a group
    of G tokens leaving the hot tier is replaced by codec(group) (None: kept; "fp16": rounded)."""

    def __init__(self, num_layers, codec, hot=HOT):
        self.num_layers, self.codec, self.hot = num_layers, codec, hot
        self.pos, self.kv, self.cold_end = {}, {}, {}
        self._next = 0

    def add_sequence(self):
        s = self._next
        self._next += 1
        self.pos[s] = 0
        self.kv[s] = [None] * self.num_layers
        self.cold_end[s] = [0] * self.num_layers
        return s

    def remove_sequence(self, seq):
        del self.pos[seq], self.kv[seq], self.cold_end[seq]

    def position(self, seq):
        return self.pos[seq]

    def step(self, seqs, n_tokens):
        assert len(seqs) == 1
        return _Step(self, seqs[0], n_tokens[0])

    def close(self):
        pass

    def attend(self, seq, layer, start, q, k, v):
        store = self.kv[seq][layer]
        if store is None:
            store = self.kv[seq][layer] = [np.empty((0,) + k.shape[1:], np.float32)] * 2
        K = np.concatenate([store[0], k.astype(np.float32)])
        V = np.concatenate([store[1], v.astype(np.float32)])
        if self.codec == "fp16":
            K[start:] = K[start:].astype(np.float16)
            V[start:] = V[start:].astype(np.float16)
        ce = self.cold_end[seq][layer]
        while self.codec not in (None, "fp16") and len(K) - ce >= self.hot + G:
            kq, vq = apply_sink(self.codec, K[ce:ce + G], V[ce:ce + G],
                                *qdq_kv(self.codec, K[ce:ce + G], V[ce:ce + G], layer), start=ce)
            K[ce:ce + G], V[ce:ce + G] = kq, vq
            ce += G
        self.cold_end[seq][layer] = ce
        self.kv[seq][layer] = [K, V]
        n, H, d = q.shape
        kvh = K.shape[1]
        g = H // kvh
        L = len(K)
        qh = q.reshape(n, kvh, g, d).transpose(1, 2, 0, 3)          # [kvh, g, n, d]
        s = np.einsum("hgnd,thd->hgnt", qh, K) / np.float32(math.sqrt(d))
        mask = np.arange(L)[None, :] > (start + np.arange(n))[:, None]
        s[..., mask] = -np.inf
        s -= s.max(-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(-1, keepdims=True)
        out = np.einsum("hgnt,thd->nhgd", p, V)
        return np.ascontiguousarray(out.reshape(n, H, d), np.float32)


def model_run(model, codec, ids):
    """(perplexity, NLL per position, log-probs rows) of ids with the codec as cold tier."""
    real = model.runtime
    model.runtime = CodecRuntime(model.config.num_layers, codec)
    try:
        seq = model.new_sequence()
        nll, logp = [], []
        for a in range(0, len(ids) - 1, CHUNK):
            part = ids[a:min(a + CHUNK, len(ids) - 1)]
            logits = model.forward(seq, part).astype(np.float64)
            logits -= logits.max(1, keepdims=True)
            lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            logp.append(lp.astype(np.float32))
            nll.append(-lp[np.arange(len(part)), ids[a + 1:a + 1 + len(part)]])
    finally:
        model.runtime = real
    nll = np.concatenate(nll)
    return float(np.exp(nll.mean())), np.concatenate(logp)


def kl_from(ref_logp, logp):
    p = np.exp(ref_logp.astype(np.float64))
    return float((p * (ref_logp - logp)).sum(1).mean())


# ---- the variants ---------------------------------------------------------------------------

def P(**kw):
    return Part(**kw)


def variants():
    V = []
    add = lambda name, k, v, note="": V.append(Variant(name, k, v, note))
    # the C format before this work: keys (b - 1) MSE + 1 QJL, values b; hi/lo coordinates
    for b in (2.5, 3.5, 4.5):
        add(f"old{b}", P(bits=b, qjl=True, dense8=4), P(bits=b, dense8=4), "C format before this issue")
    # MSE-only vs QJL at equal code bits
    for b in (3, 4):
        add(f"mse{b}", P(bits=b), P(bits=b))
        add(f"qjl{b}", P(bits=b, qjl=True), P(bits=b))
    # codebooks
    for book in ("beta", "uniform"):
        add(f"mse3-{book}", P(bits=3, book=book), P(bits=3, book=book))
    # rescaling
    for rs in ("length", "lsq"):
        add(f"mse3-{rs}", P(bits=3, rescale=rs), P(bits=3, rescale=rs))
    # rotations
    for rot in ("dense", "hadamard2", "none"):
        add(f"mse3-{rot}", P(bits=3, rot=rot), P(bits=3, rot=rot))
    # key means / channel scaling
    for mean in ("fp16", "q8", "q4"):
        add(f"mse3-kmean{mean}", P(bits=3, mean=mean), P(bits=3))
    add("mse3-kscale", P(bits=3, mean="fp16", scale_channels=1.0), P(bits=3))
    add("mse3-vmean", P(bits=3, mean="fp16"), P(bits=3, mean="fp16"))
    # outliers
    add("mse3-dense8", P(bits=3, dense8=4), P(bits=3, dense8=4))
    add("mse3.5-split", P(bits=3.5, frac="split"), P(bits=3.5, frac="split"))
    add("mse3.5-coords", P(bits=3.5), P(bits=3.5))
    # K vs V bits
    add("k4v3", P(bits=4), P(bits=3))
    add("k3v4", P(bits=3), P(bits=4))
    add("k4v3-kmean", P(bits=4, mean="q8"), P(bits=3))
    add("k3.5v3-kmean", P(bits=3.5, mean="q8"), P(bits=3))
    # the candidates: keys with their group mean out (sinks keep theirs), 8-bit log norms
    km = dict(mean="q8", mean_flag=True, norm="log8")
    add("k3v3-mf", P(bits=3, **km), P(bits=3, norm="log8"))
    add("k3.5v3-mf", P(bits=3.5, **km), P(bits=3, norm="log8"))
    add("k3.75v3-mf", P(bits=3.75, **km), P(bits=3, norm="log8"))
    add("k4v3-mf", P(bits=4, **km), P(bits=3, norm="log8"))
    add("k4v4-mf", P(bits=4, **km), P(bits=4, norm="log8"))
    add("k2.75v2-mf", P(bits=2.75, **km), P(bits=2, norm="log8"))
    add("k3v2-mf", P(bits=3, **km), P(bits=2, norm="log8"))
    add("k4.75v4-mf", P(bits=4.75, **km), P(bits=4, norm="log8"))
    k46 = dict(mean="q4", mean_flag=True, norm="log6")
    for kb, vb in ((3.875, 3), (4, 2.875), (2.75, 2), (3, 1.75), (2.5, 2.25), (4.75, 4), (5, 3.75)):
        add(f"k{kb}v{vb}-m4n6", P(bits=kb, **k46), P(bits=vb, norm="log6"))
    for kb, vb, nd in ((3.625, 3, 2), (3.5, 3, 2), (3.75, 3, 1), (2.5, 2, 2), (2.75, 1.75, 2), (4.5, 4, 2)):
        add(f"k{kb}d{nd}v{vb}", P(bits=kb, mu_dense=nd, **k46), P(bits=vb, norm="log6"))
    # the C format: keys' group mean out (4-bit, sinks keep theirs), 8-bit log norms,
    # least-squares scales; code widths 2-4 bits in blocks of 16 coordinates
    kc = dict(mean="q4", mean_flag=True, norm="log8", rescale="lsq")
    vc = dict(norm="log8", rescale="lsq")
    for kb, vb in ((3.75, 3), (4, 2.75), (2.75, 2), (2.5, 2.25), (4, 4), (4, 3.5)):
        add(f"c-k{kb}v{vb}", P(bits=kb, **kc), P(bits=vb, **vc), "C format candidate")
    # the encoder's search (the format unchanged): codes at 7 scales around the norm's, the
    # least-squares best kept; then what would reach 0.99 in every layer
    for kb, vb in ((3.75, 3), (4, 3.5), (4, 3.75), (4.25, 3.75)):
        add(f"c-k{kb}v{vb}-search", P(bits=kb, search=7, **kc), P(bits=vb, search=7, **vc), "encoder search")
    # per-channel key scales (channel / its group RMS^0.5 before the rotation, 2-bit codes)
    for kb, vb in ((3.75, 3), (4, 3.5)):
        add(f"c-k{kb}v{vb}-search-ks", P(bits=kb, search=7, scale_channels=0.5, scale_codes=2, **kc),
            P(bits=vb, search=7, **vc), "encoder search, key channel scales")
    return {v.name: v for v in V}


def gauss_table(n=2048, T=64):
    """Distortion of each code on iid N(0, 1) vectors of T coordinates (a token's rotated
    coordinates), in dB above the Gaussian rate-distortion bound 2^(-2r)."""
    from _bench_common import print_table
    Y = np.random.default_rng(11).standard_normal((n, T))
    rows = []
    for r in (2, 3, 4):
        c, t = _lloyd(lambda x: np.exp(-0.5 * x * x), -7, 7, 1 << r)
        res = {"bits": r, "bound": 2.0 ** (-2 * r), "Lloyd-Max": float(((c[np.searchsorted(t, Y)] - Y) ** 2).mean())}
        for S in (8, 256):
            book = tcq_book(r, S)
            for tail in ("biting", "free"):
                out, _ = tcq_encode(Y, np.full(T, r), S, books={r: book}, tail=tail)
                res[f"TCQ {S} {tail}"] = float(((out - Y) ** 2).mean())
        for k in list(res)[2:]:
            res[k + " dB"] = 10 * math.log10(res[k] / res["bound"])
        rows.append(res)
        log(" ".join(f"{k}={v:.4g}" for k, v in res.items()))
    print_table(rows, list(rows[0]))


def parse_variant(name):
    """Variants named by their parts, beyond the list: {c|tcqS|idealGAP}-kBITSvBITS[-ks][-sink]
    (c: the C format's scalar codes; all with the encoder search and the C format's metadata)."""
    import re
    m = re.fullmatch(r"(c|tcq(\d+)|ideal([\d.]+))-k([\d.]+)v([\d.]+)(-search)?(-ks)?(-q(w|d)([\d.]*))?(-sink(\d*))?",
                     name)
    if not m:
        raise SystemExit(f"unknown variant {name!r} (--list shows the named ones)")
    kind, S, gap, kb, vb, _, ks, qw, qkind, qp, sink, ns = m.groups()
    code = dict(search=7)
    if S:
        code = dict(search=7, code="tcq", states=int(S))
    elif gap:
        code = dict(code="ideal", gap_db=float(gap))
    kc = dict(mean="q4", mean_flag=True, norm="log8", rescale="lsq")
    kx = dict(scale_channels=0.5, scale_codes=2) if ks else {}
    if qw:
        kx.update(qweight=float(qp or 0.25), qweight_diag=qkind == "d")
    return Variant(name, Part(bits=float(kb), **code, **kx, **kc), Part(bits=float(vb), **code, norm="log8", rescale="lsq"),
                   kind, (int(ns) if ns else 1) if sink else 0)


CALIBRATION_TEXT = CALIBRATION


def calibration_metric(model, n=1024):
    """{layer: [E[q q^T] over the query heads of each KV head]} from the model's own queries on
    a text none of the results is measured on."""
    cache = f"/tmp/kvlab_calibration_{n}.npz"
    if os.path.exists(cache):
        z = np.load(cache)
        return {int(k.split("_")[1]): list(z[k]) for k in z.files}
    with open(CALIBRATION_TEXT, encoding="utf-8") as f:
        ids = model.tokenize(f.read())[:n]
    out = {}
    for layer, (q, k, _) in capture_qkv(model, ids).items():
        g = q.shape[1] // k.shape[1]
        qs = np.asarray(q, np.float64).reshape(len(q), k.shape[1], g, -1)
        out[layer] = [np.einsum("ngd,nge->de", qs[:, h], qs[:, h]) / (len(q) * g) for h in range(k.shape[1])]
    np.savez(cache, **{f"m_{l}": np.stack(ms) for l, ms in out.items()})
    log(f"query metric calibrated on {len(ids)} tokens of {CALIBRATION_TEXT}")
    return out


# ---- main -----------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="*", default=None)
    ap.add_argument("--tokens", type=int, default=1536)
    ap.add_argument("--capture", type=int, default=1024)
    ap.add_argument("--no-ppl", action="store_true")
    ap.add_argument("--texts", type=int, default=2, help="how many of the texts for perplexity")
    ap.add_argument("--json")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--gauss", action="store_true",
                    help="MSE of scalar / TCQ codes on iid N(0, 1) against the rate-distortion bound, and exit")
    ap.add_argument("--layers", type=int, nargs="*", help="attention cosine on these layers only")
    ap.add_argument("--capture-text", choices=("GPL-3", "calibration"), default="GPL-3",
                    help="the text whose Q/K/V the attention cosine is measured on")
    args = ap.parse_args()
    allv = variants()
    if args.gauss:
        gauss_table()
        return
    if args.list:
        for v in allv.values():
            print(f"{v.name:18s} {v.bits(64):.3f} bits/value (d=64)  K {v.k}  V {v.v}")
        return
    chosen = [allv[n] if n in allv else parse_variant(n) for n in (args.variants or list(allv))]

    import ruvpy.models
    model = ruvpy.models.load(kv_cache="paged", kv_dtype="float32", max_tokens=8192)
    all_texts = dict(list(texts().items())[:args.texts])
    tok = {name: model.tokenize(t)[:args.tokens] for name, t in all_texts.items()}
    cache = f"/tmp/kvlab_capture_{args.capture}.npz"
    if args.capture_text != "GPL-3":
        cache = f"/tmp/kvlab_capture_{args.capture_text}_{args.capture}.npz"
    if os.path.exists(cache):
        z = np.load(cache)
        captured = {int(k.split("_")[1]): (z[k], z[k.replace("q_", "k_")], z[k.replace("q_", "v_")])
                    for k in z.files if k.startswith("q_")}
    else:
        if args.capture_text == "GPL-3":
            ids = model.tokenize(texts()["GPL-3"])[:args.capture]
        else:
            with open(CALIBRATION_TEXT, encoding="utf-8") as f:
                ids = model.tokenize(f.read())[:args.capture]
        captured = capture_qkv(model, ids)
        np.savez(cache, **{f"{n}_{l}": x for l, qkv in captured.items() for n, x in zip("qkv", qkv)})
    if any(var.k.qweight for var in chosen):
        QUERY_METRIC.update(calibration_metric(model))
    refs = {l: reference_attention(*qkv) for l, qkv in captured.items()}
    log(f"captured {args.capture} tokens x {len(captured)} layers")

    base = {}
    if not args.no_ppl:
        for tname, ids in tok.items():
            t = time.perf_counter()
            saved = f"/tmp/kvlab_base_{tname}_{len(ids)}.npz"     # fp32 / fp16 runs, reused
            if os.path.exists(saved):
                z = np.load(saved)
                ppl32, lp32, ppl16, lp16 = float(z["ppl32"]), z["lp32"], float(z["ppl16"]), z["lp16"]
            else:
                ppl32, lp32 = model_run(model, None, ids)
                ppl16, lp16 = model_run(model, "fp16", ids)
                np.savez(saved, ppl32=ppl32, lp32=lp32, ppl16=ppl16, lp16=lp16)
            base[tname] = (ppl32, lp32, ppl16)
            log(f"{tname}: fp32 {ppl32:.4f} fp16 {ppl16:.4f} (kl {kl_from(lp32, lp16):.2e}) "
                f"{time.perf_counter() - t:.0f} s")
    results = []
    for var in chosen:
        t = time.perf_counter()
        cos, layers = [], []
        for l, (q, k, v) in captured.items():
            if args.layers and l not in args.layers:
                continue
            layers.append(l)
            kq, vq = apply_sink(var, k, v, *qdq_kv(var, k, v, l))
            out = reference_attention(q, kq, vq)
            cos.append(float(row_cosines(out, refs[l])[G:].mean()))
        row = {"variant": var.name, "bits": var.bits(64), "min cos": min(cos), "mean cos": float(np.mean(cos)),
               "worst layer": layers[int(np.argmin(cos))]}
        for tname, ids in tok.items() if not args.no_ppl else ():
            ppl, lp = model_run(model, var, ids)
            ppl32, lp32, ppl16 = base[tname]
            row[f"ppl% {tname}"] = 100 * (ppl / ppl16 - 1)
            row[f"kl {tname}"] = kl_from(lp32, lp)
        row["note"] = var.note
        row["cos per layer"] = cos
        results.append(row)
        log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                     if k != "cos per layer") + f"  ({time.perf_counter() - t:.0f} s)")
    from _bench_common import print_table
    cols = [c for c in results[0] if c not in ("cos per layer", "note")]
    print_table(results, cols)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"base": {k: (v[0], v[2]) for k, v in base.items()}, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
