"""How closely a quantized model's next-token distributions follow the full-precision model's.

Pure numpy on logits, shared by `validate` (fp vs quantized), `eval` and the
quality table: per-token KL(fp || q), top-1 agreement, the logit error
relative to the logit range, and a paired bootstrap over documents for
differences too small to read off one number.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis, in float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def token_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) in nats for every position (all axes but the last)."""
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)


@dataclass(frozen=True)
class Agreement:
    """Distribution-level agreement of q with the reference p over a set of token positions."""

    tokens: int
    mean_kl: float
    max_kl: float
    top1: float  # share of positions where argmax agrees
    rel_logit_error: float  # max |p - q| / (max p - min p), over all positions

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "mean_kl": self.mean_kl, "max_kl": self.max_kl, "top1": self.top1,
                "rel_logit_error": self.rel_logit_error}


def agreement(p_logits: np.ndarray, q_logits: np.ndarray) -> Agreement:
    """Agreement of `q_logits` with the reference `p_logits` (same shape, vocabulary last)."""
    p = np.asarray(p_logits, np.float64).reshape(-1, np.shape(p_logits)[-1])
    q = np.asarray(q_logits, np.float64).reshape(p.shape)
    kl = token_kl(p, q)
    span = float(p.max() - p.min()) or 1.0
    return Agreement(int(p.shape[0]), float(kl.mean()), float(kl.max()),
                     float(np.mean(p.argmax(-1) == q.argmax(-1))), float(np.abs(p - q).max() / span))


@dataclass(frozen=True)
class PairedInterval:
    """Mean of per-document differences (b - a) with a paired-bootstrap percentile interval."""

    mean: float
    low: float
    high: float
    level: float
    documents: int

    @property
    def contains_zero(self) -> bool:
        return self.low <= 0.0 <= self.high

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "level": self.level,
                "documents": self.documents}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None, *, rounds: int = 2000,
                     level: float = 0.95, seed: int = 0) -> PairedInterval:
    """Interval for the weighted mean difference b - a over documents, resampling documents with replacement.

    `a`, `b`: one value per document (e.g. bits-per-byte of the fp and the quantized model on the same
    document); `weights`: per-document weights (e.g. bytes), so the statistic is the corpus-level figure.
    Deterministic given `seed`.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError("paired_bootstrap needs two equal-length, non-empty 1-D arrays")
    w = np.ones_like(a) if weights is None else np.asarray(weights, np.float64)
    d = b - a
    mean = float((w * d).sum() / w.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(rounds, a.size))
    stats = (w[idx] * d[idx]).sum(axis=1) / w[idx].sum(axis=1)
    tail = (1.0 - level) / 2
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return PairedInterval(mean, float(low), float(high), level, int(a.size))
