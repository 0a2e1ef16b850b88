"""RWKVQuant's coarse-to-fine proxy, computed as the authors' code computes it.

Input: the weight's values as float16 (the authors' models run in fp16),
flattened and sorted. The statistic is the SET of distinct gaps between
neighbouring sorted values, `G = unique(diff(sort(W)))` (differences taken
exactly, on the fp16 values widened to float64), normalised to sum to one,
with a leading zero gap (repeated values) dropped; n = len(G). On the fp16
grid that is a few dozen numbers even for a 768x768 matrix: it measures how
irregular the spacing steps of the weight grid are, not the spacing of every
pair of weights.

- coarse: P_c = log(n) + sum(G log G), the entropy deficit of G (0 when all
  distinct gaps are equal);
- fine: with c = G - 1/n,
  P_f = n^2/2 |mean c^2| + n^3/6 |mean c^3| + n^4/12 |mean c^4|,
  weighted central moments that a few outlying gaps inflate.

Uniform and outlier-free (P_c < tau_c and P_f < tau_f) -> scalar
quantization; otherwise vector quantization. Paper thresholds: tau_c = 1.5,
tau_f = 50. `tests/test_proxy_oracle.py` checks these functions against the
authors' values in `../shared/fixtures/official-proxy-values.json`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TAU_C = 1.5
TAU_F = 50.0


def weight_gaps(w: np.ndarray) -> np.ndarray:
    """The normalised set of distinct neighbour gaps of `w` as float16 values (leading zero dropped)."""
    v = np.sort(np.asarray(w, np.float32).astype(np.float16).reshape(-1)).astype(np.float64)
    gaps = np.unique(np.diff(v))  # sorted ascending, distinct
    total = gaps.sum()
    if total <= 0:
        return np.zeros(0)
    gaps = gaps / total
    return gaps[1:] if gaps[0] == 0 else gaps


def _coarse(g: np.ndarray) -> float:
    return math.log(g.size) + float(np.sum(g * np.log(g))) if g.size >= 2 else 0.0


def _fine(g: np.ndarray) -> float:
    n = g.size
    if n < 2:
        return 0.0
    c = g - 1.0 / n
    return float(n ** 2 / 2 * abs(np.mean(c ** 2)) + n ** 3 / 6 * abs(np.mean(c ** 3))
                 + n ** 4 / 12 * abs(np.mean(c ** 4)))


def coarse_proxy(w: np.ndarray) -> float:
    """P_c: entropy deficit log(n) - H(G) of the distinct-gap set (0 = perfectly regular grid)."""
    return _coarse(weight_gaps(w))


def fine_proxy(w: np.ndarray) -> float:
    """P_f: weighted 2nd-4th central moments of the distinct-gap set (outlying gaps raise it)."""
    return _fine(weight_gaps(w))


@dataclass(frozen=True)
class ProxyValues:
    """Both proxies of one weight and the size n of its distinct-gap set."""

    coarse: float
    fine: float
    n: int = 0

    def prefers_scalar(self, tau_c: float = TAU_C, tau_f: float = TAU_F) -> bool:
        """The paper's decision: scalar quantization iff both proxies are below their thresholds."""
        return self.coarse < tau_c and self.fine < tau_f


def proxies(w: np.ndarray) -> ProxyValues:
    """P_c, P_f and n of a weight (one pass over its sorted fp16 values)."""
    g = weight_gaps(w)
    return ProxyValues(_coarse(g), _fine(g), int(g.size))
