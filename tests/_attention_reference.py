"""float64 attention, the reference the Runtime / cache tests of plans and truncation compare
with."""
import numpy as np


def causal_reference(q, k, v):
    """float64 causal attention of q [n, H, d] over k, v [T, KVH, d]; query i sits at
    T - n + i and sees keys 0 .. that position (scale 1/sqrt(d))."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    n, heads, d = q.shape
    g = heads // k.shape[1]
    visible = np.arange(len(k))[None, :] <= (len(k) - n + np.arange(n))[:, None]
    out = np.empty_like(q)
    for h in range(heads):
        s = np.where(visible, q[:, h] @ k[:, h // g].T / np.sqrt(d), -np.inf)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ v[:, h // g]
    return out
