"""Next-token choice: greedy (temperature 0) or temperature + nucleus (top-p) sampling."""
from __future__ import annotations

import numpy as np


def check_sampling(temperature, top_p):
    """Raise ValueError for temperature < 0 or top_p outside (0, 1]."""
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


class Sampler:
    """Picks a token from a logits row. temperature 0 is greedy (argmax, lowest id on ties);
    otherwise softmax(logits / temperature) restricted to the smallest set of most likely
    tokens whose probability reaches top_p, drawn with numpy.random.Generator(seed)."""

    def __init__(self, temperature=0.0, top_p=1.0, seed=None):
        check_sampling(temperature, top_p)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self._rng = np.random.default_rng(seed)

    def __call__(self, logits) -> int:
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        ids, probs = self.distribution(logits)
        cdf = np.cumsum(probs)
        index = int(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"))
        return int(ids[min(index, len(ids) - 1)])

    def distribution(self, logits):
        """(ids, probabilities) the next draw picks from (temperature > 0)."""
        x = np.asarray(logits, dtype=np.float64).reshape(-1)
        # shifted before the division: x / T alone overflows for a tiny T (1e-310: +-inf,
        # then inf - inf = NaN probabilities); shifted, the largest is 0 and the rest -inf
        with np.errstate(over="ignore"):
            scaled = (x - x.max()) / self.temperature
        if self.top_p < 1.0:
            ids = np.argsort(-scaled, kind="stable")
            scaled = scaled[ids]
        else:
            ids = np.arange(len(scaled))
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if self.top_p < 1.0:
            # the most likely tokens until their mass reaches top_p (at least one token)
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p, side="left")) + 1
            ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
        return ids, probs
