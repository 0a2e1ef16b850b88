"""RWKVQuant's coarse-to-fine proxy: is a weight matrix uniform enough for scalar quantization?

Both proxies look at the distribution of gaps between consecutive distinct
sorted weight values, normalised to sum to one (G, n = len(G)):

- coarse: P_c = log(n) + sum(G log G), the entropy deficit of G; zero when
  the values are evenly spaced (uniform), large when spacing varies a lot
  (dense centre and sparse tails, as in Gaussian/Laplacian weights);
- fine: P_f = n^2/2 |E(G-1/n)^2| + n^3/6 |E(G-1/n)^3| + n^4/12 |E(G-1/n)^4|,
  weighted high-order central moments that local outliers inflate.

Uniform and outlier-free (P_c < tau_c and P_f < tau_f) -> scalar (GPTQ);
otherwise vector (GPTVQ). Paper thresholds: tau_c = 1.5, tau_f = 50.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TAU_C = 1.5
TAU_F = 50.0


def weight_gaps(w: np.ndarray) -> np.ndarray:
    """Normalised gaps between consecutive distinct sorted values of `w`."""
    v = np.unique(np.asarray(w, np.float64).reshape(-1))  # sorted, distinct
    gaps = np.diff(v)
    gaps = gaps[gaps > 0]
    total = gaps.sum()
    return gaps / total if total > 0 else gaps


def coarse_proxy(w: np.ndarray) -> float:
    """Entropy deficit log(n) - H(G) of the gap distribution (0 = perfectly uniform spacing)."""
    g = weight_gaps(w)
    if g.size < 2:
        return 0.0
    return float(np.log(g.size) + np.sum(g * np.log(g)))


def fine_proxy(w: np.ndarray) -> float:
    """Weighted 2nd-4th central moments of the gap distribution (local outliers raise it)."""
    g = weight_gaps(w)
    n = g.size
    if n < 2:
        return 0.0
    c = g - 1.0 / n
    return float(n ** 2 / 2 * abs(np.mean(c ** 2)) + n ** 3 / 6 * abs(np.mean(c ** 3))
                 + n ** 4 / 12 * abs(np.mean(c ** 4)))


@dataclass(frozen=True)
class ProxyValues:
    coarse: float
    fine: float


def proxies(w: np.ndarray) -> ProxyValues:
    return ProxyValues(coarse_proxy(w), fine_proxy(w))


def select_method(w: np.ndarray | ProxyValues, tau_c: float = TAU_C, tau_f: float = TAU_F) -> str:
    """'sq' when the weights are uniform and outlier-free under both proxies, else 'vq'."""
    p = w if isinstance(w, ProxyValues) else proxies(w)
    return "sq" if p.coarse < tau_c and p.fine < tau_f else "vq"
