"""Agreement statistics (KL, top-1, relative logit error) and the paired bootstrap."""
from __future__ import annotations

import numpy as np
import pytest

from rwkvq_onnx.agreement import agreement, paired_bootstrap, token_kl


def test_kl_is_zero_for_equal_logits_and_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    p = rng.standard_normal((5, 7))
    q = p + 0.3 * rng.standard_normal((5, 7))
    assert np.allclose(token_kl(p, p + 4.0), 0.0, atol=1e-12)  # shift invariance
    pp = np.exp(p) / np.exp(p).sum(-1, keepdims=True)
    qq = np.exp(q) / np.exp(q).sum(-1, keepdims=True)
    np.testing.assert_allclose(token_kl(p, q), (pp * np.log(pp / qq)).sum(-1), rtol=1e-10)


def test_agreement_counts_top1_and_relative_error():
    p = np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    q = np.array([[0.0, 1.0, 2.5], [0.0, 1.0, 2.0]])  # second row flips the argmax
    a = agreement(p, q)
    assert a.tokens == 2 and a.top1 == 0.5
    assert a.rel_logit_error == pytest.approx(2.0 / 2.0)
    assert a.max_kl >= a.mean_kl > 0


def test_paired_bootstrap_interval_covers_the_mean_and_detects_a_shift():
    rng = np.random.default_rng(1)
    a = rng.normal(2.0, 0.5, 40)
    same = paired_bootstrap(a, a + rng.normal(0, 1e-3, 40))
    assert same.contains_zero and same.low <= same.mean <= same.high
    worse = paired_bootstrap(a, a + 0.01 + rng.normal(0, 1e-3, 40), weights=rng.integers(100, 400, 40))
    assert not worse.contains_zero and worse.low > 0
    assert paired_bootstrap(a, a + 0.01, seed=3) == paired_bootstrap(a, a + 0.01, seed=3)
    with pytest.raises(ValueError):
        paired_bootstrap(a, a[:-1])
