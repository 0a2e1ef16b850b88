"""Codebooks for element-wise multiplication vectors, weighted by the activations they multiply.

RWKV multiplies activations element-wise by learned vectors (token-shift
mixes x_r/x_w/.../x_k, k_k, k_a, r_k; RWKV-6 time_maa_*). The error of
element i costs about E[x_i^2] (v_i - v̂_i)^2 in the output, so the 1-D
k-means that builds the codebook weights each element by its mean squared
activation, after clipping activation outliers at a percentile so a few
extreme channels do not capture the whole codebook.
"""
from __future__ import annotations

import numpy as np

from .configs import ElementwiseConfig
from .formats import ElementwiseQuantized


def activation_weights(mean_sq: np.ndarray, percentile: float) -> np.ndarray:
    """Mean squared activations clipped at the given percentile (and kept positive)."""
    a = np.asarray(mean_sq, np.float64).reshape(-1)
    clip = np.percentile(a, percentile)
    return np.maximum(np.minimum(a, clip), 1e-12 * max(clip, 1e-30))


def _lloyd_1d(v: np.ndarray, w: np.ndarray, cents: np.ndarray, iters: int) -> np.ndarray:
    k = cents.size
    for _ in range(iters):
        cents = np.sort(cents)
        a = np.abs(v[:, None] - cents[None, :]).argmin(1)
        num = np.bincount(a, weights=w * v, minlength=k)
        den = np.bincount(a, weights=w, minlength=k)
        new = np.where(den > 0, num / np.maximum(den, 1e-300), cents)
        if np.array_equal(new, cents):
            break
        cents = new
    return np.sort(cents)


def _quantile_init(v: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(v)
    cdf = np.cumsum(w[order]) / w.sum()
    return v[order][np.searchsorted(cdf, (np.arange(k) + 0.5) / k).clip(0, v.size - 1)]


def _objective(v: np.ndarray, w: np.ndarray, cents: np.ndarray) -> float:
    return float(np.sum(w * np.min((v[:, None] - cents[None, :]) ** 2, axis=1)))


def weighted_kmeans_1d(values: np.ndarray, weights: np.ndarray, k: int, iters: int) -> np.ndarray:
    """Weighted 1-D k-means (Lloyd); returns sorted entries.

    Started both from weighted quantiles and from the unweighted k-means
    solution, keeping the better under the weighted objective, so weighting
    never ends worse than ignoring the activations.
    """
    v = np.asarray(values, np.float64)
    w = np.asarray(weights, np.float64)
    uniq = np.unique(v)
    if uniq.size <= k:
        return np.concatenate([uniq, np.full(k - uniq.size, uniq[-1])])
    ones = np.ones_like(w)
    starts = [_quantile_init(v, w, k), _lloyd_1d(v, ones, _quantile_init(v, ones, k), iters)]
    results = [_lloyd_1d(v, w, s, iters) for s in starts]
    return min(results, key=lambda c: _objective(v, w, c))


def elementwise_quantize(v: np.ndarray, act_mean_sq: np.ndarray | None = None,
                         cfg: ElementwiseConfig = ElementwiseConfig()) -> ElementwiseQuantized:
    """Quantize a vector to 2**bits fp16 codebook entries; weighted by activations when given."""
    arr = np.asarray(v, np.float32)
    flat = arr.reshape(-1).astype(np.float64)
    if cfg.weighted and act_mean_sq is not None:
        weights = activation_weights(act_mean_sq, cfg.percentile)
        if weights.size != flat.size:
            from ..errors import ConfigError

            raise ConfigError(f"activation statistics have {weights.size} elements, the vector {flat.size}")
    else:
        weights = np.ones_like(flat)
    k = 1 << cfg.bits
    book = weighted_kmeans_1d(flat, weights, k, cfg.iters).astype(np.float16)
    codes = np.abs(flat[:, None] - book.astype(np.float64)[None, :]).argmin(1)
    return ElementwiseQuantized(codes.astype(np.int64), book, tuple(arr.shape), cfg.bits)


def weighted_error(v: np.ndarray, v_hat: np.ndarray, act_mean_sq: np.ndarray) -> float:
    """Activation-weighted squared error sum_i E[x_i^2] (v_i - v̂_i)^2."""
    d = np.asarray(v, np.float64).reshape(-1) - np.asarray(v_hat, np.float64).reshape(-1)
    return float(np.sum(np.asarray(act_mean_sq, np.float64).reshape(-1) * d * d))
