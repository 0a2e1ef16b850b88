"""The proxies reproduce the authors' statistic (official-proxy-values.json) for every weight listed."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rwkvq_onnx.checkpoint import load_checkpoint
from rwkvq_onnx.quant.proxy import TAU_C, TAU_F, proxies

from .conftest import shared_file

SYNTHETIC_KEY = "synthetic (numpy default_rng(0), in this order)"
REL_TOL = 1e-6


def _oracle() -> dict:
    return json.loads(shared_file("fixtures", "official-proxy-values.json").read_text())


def _synthetic_matrices() -> dict[str, np.ndarray]:
    """The JSON's seeded matrices: one default_rng(0), drawn in the listed order (normal, uniform, laplace)."""
    rng = np.random.default_rng(0)
    return {"gauss-768x768-std0.02": rng.normal(0.0, 0.02, (768, 768)),
            "uniform-768x768-pm0.05": rng.uniform(-0.05, 0.05, (768, 768)),
            "laplace-768x3072-b0.02": rng.laplace(0.0, 0.02, (768, 3072))}


def _check(name: str, w: np.ndarray, expected: dict) -> None:
    p = proxies(w)
    assert p.n == expected["n"], name
    assert p.coarse == pytest.approx(expected["P_c"], rel=REL_TOL), name
    assert p.fine == pytest.approx(expected["P_f"], rel=REL_TOL), name
    if "method" in expected:
        assert ("SQ" if p.prefers_scalar(TAU_C, TAU_F) else "VQ") == expected["method"], name


@pytest.mark.parametrize("model", ["ref-rwkv7-L4-D256.pth", "tiny-rwkv7-834K.pth", "tiny-rwkv6-1m.pth"])
def test_proxies_match_the_authors_values_on_every_fixture_weight(model):
    expected = _oracle()["models"][model]
    _, sd = load_checkpoint(shared_file("fixtures", model))
    assert expected
    for name, row in expected.items():
        assert list(sd[name].shape) == row["shape"], name
        _check(name, sd[name], row)


def test_proxies_match_the_authors_values_on_the_seeded_matrices():
    expected = _oracle()[SYNTHETIC_KEY]
    matrices = _synthetic_matrices()
    assert set(expected) == set(matrices)
    for name, row in expected.items():
        _check(name, matrices[name], row)
