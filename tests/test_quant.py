"""Quantization algorithms on synthetic data with known structure."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rwkvq_onnx.errors import BudgetError, ConfigError
from rwkvq_onnx.quant import (METHODS, AWQConfig, ElementwiseConfig, GPTQConfig, ScalarConfig, TensorInfo,
                              VQConfig, awq_quantize, bpw, elementwise_quantize, from_arrays, gptq_quantize,
                              gptvq_quantize, kmeans_vq_quantize, payload_bits, plan_fixed, plan_for_budget,
                              proxies, rtn_quantize, total_bits)
from rwkvq_onnx.quant.elementwise import weighted_error
from rwkvq_onnx.quant.formats import pack_bits, unpack_bits
from rwkvq_onnx.quant.hessian import hessian_from_inputs, output_error


def correlated_hessian(k: int, seed: int = 0, n: int = 8192) -> np.ndarray:
    """Inputs with strong cross-channel correlation and uneven channel scales, as activations have."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    x = rng.standard_normal((n, k)) @ mix + 0.1 * rng.standard_normal((n, k))
    x *= np.exp(0.5 * rng.standard_normal(k))
    return hessian_from_inputs(x)


@pytest.fixture(scope="module")
def h256():
    return correlated_hessian(256)


@pytest.fixture(scope="module")
def h512():
    return correlated_hessian(512, seed=1)


def gaussian(n, k, seed=0):
    return (np.random.default_rng(seed).standard_normal((n, k)) * 0.05).astype(np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [0, 64])
def test_gptq_beats_rtn_at_every_bit_width(h256, bits, group_size):
    w = gaussian(128, 256)
    cfg = GPTQConfig(bits=bits, group_size=group_size)
    e_gptq = output_error(w, gptq_quantize(w, h256, cfg).dequantize(), h256)
    e_rtn = output_error(w, rtn_quantize(w, None, cfg).dequantize(), h256)
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)


def test_gptq_without_act_order_and_symmetric_also_beat_rtn(h256):
    w = gaussian(128, 256, seed=2)
    for cfg in (GPTQConfig(bits=4, act_order=False), GPTQConfig(bits=3, symmetric=True)):
        assert output_error(w, gptq_quantize(w, h256, cfg).dequantize(), h256) < \
            output_error(w, rtn_quantize(w, None, cfg).dequantize(), h256)


@pytest.mark.parametrize("bits,dim", [(2, 2), (3, 1), (3, 2)])
def test_gptvq_beats_kmeans_vq(h256, bits, dim):
    w = gaussian(128, 256, seed=3)
    cfg = VQConfig(bits=bits, dim=dim, group_rows=16, group_cols=128, kmeans_iters=15)
    e_gptvq = output_error(w, gptvq_quantize(w, h256, cfg).dequantize(), h256)
    e_km = output_error(w, kmeans_vq_quantize(w, None, cfg).dequantize(), h256)
    assert e_gptvq < 0.9 * e_km, (e_gptvq, e_km)


def test_vq_wins_on_clustered_and_sq_wins_on_uniform_at_equal_bpw(h512):
    """The effect RWKVQuant builds on.

    Clustered (non-uniform) weights: a codebook puts entries where the mass
    is, GPTVQ wins. Uniform weights whose range differs per output row (as
    real rows do): per-group scales follow each row's range while a codebook
    shared by a block of rows cannot, GPTQ wins. Each winner is given the
    slightly smaller bit budget, so the comparison is never in its favour.
    """
    rng = np.random.default_rng(5)
    n, k = 256, 512
    sq = GPTQConfig(bits=3, group_size=128)
    clustered = (rng.choice([-1.0, -0.3, 0.3, 1.0], size=(n, k)) + 0.1 * rng.standard_normal((n, k))) * 0.05
    row_range = np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=(n, 1)))
    uniform = rng.uniform(-1, 1, size=(n, k)) * row_range * 0.05
    for w, vq_rows, winner in ((clustered, 15, "vq"), (uniform, 14, "sq")):
        w = w.astype(np.float32)
        vq = VQConfig(bits=3, dim=2, group_rows=vq_rows, group_cols=512)
        q_sq, q_vq = gptq_quantize(w, h512, sq), gptvq_quantize(w, h512, vq)
        assert abs(bpw(q_sq) - bpw(q_vq)) < 0.01
        e_sq, e_vq = output_error(w, q_sq.dequantize(), h512), output_error(w, q_vq.dequantize(), h512)
        if winner == "vq":
            assert bpw(q_vq) <= bpw(q_sq) and e_vq < 0.8 * e_sq, (e_vq, e_sq)
        else:
            assert bpw(q_sq) <= bpw(q_vq) and e_sq < 0.9 * e_vq, (e_sq, e_vq)


def test_awq_scaling_lowers_output_error_vs_rtn(h256):
    w = gaussian(128, 256, seed=4)
    cfg = AWQConfig(bits=3, group_size=64)
    res = awq_quantize(w, h256, cfg)
    assert res.input_scale.shape == (256,) and np.all(res.input_scale > 0)
    assert output_error(w, res.dequantize(), h256) < output_error(w, rtn_quantize(w, None, cfg).dequantize(), h256)


@pytest.mark.parametrize("target", [3.15, 3.25, 3.275, 3.3, 3.5])
def test_budget_selector_meets_target_following_proxy_ranking(target):
    rng = np.random.default_rng(1)
    tensors = []
    for i in range(18):
        n, k = [(768, 768), (3072, 768), (768, 3072)][i % 3]
        sample = rng.uniform(-1, 1, (128, 128)) if i % 3 else rng.standard_normal((128, 128)) * (1 + i % 2)
        tensors.append(TensorInfo(f"w{i}", (n, k), proxies(sample)))
    sq, vq = ScalarConfig(bits=3, group_size=64, symmetric=True), VQConfig(bits=3, dim=2)
    plan = plan_for_budget(tensors, target, sq, vq)
    total = sum(e.bpw * t.numel for e, t in zip(plan.entries, tensors)) / sum(t.numel for t in tensors)
    assert abs(total - target) <= 0.005 and abs(plan.bpw - total) < 1e-9
    vq_scores = [e.score for e in plan.entries if e.method == "vq"]
    sq_scores = [e.score for e in plan.entries if e.method == "sq"]
    if vq_scores and sq_scores:
        assert min(vq_scores) >= max(sq_scores)  # the split follows the proxy ranking
    fixed = plan_fixed(tensors, sq, vq)
    assert fixed.vq_count == plan.threshold_vq_count == sum(e.score >= 1 for e in fixed.entries)


def test_budget_selector_rejects_infeasible_target():
    t = [TensorInfo("w", (768, 768), proxies(np.random.default_rng(0).standard_normal((64, 64))))]
    with pytest.raises(BudgetError, match="cannot be met"):
        plan_for_budget(t, 2.0, ScalarConfig(bits=3), VQConfig(bits=3))


def test_weighted_elementwise_codebook_beats_unweighted_on_skewed_activations():
    rng = np.random.default_rng(0)
    v = rng.standard_normal(768) * 0.3 + 0.5
    lognormal = np.exp(2.0 * rng.standard_normal(768))  # energy spread very unevenly over channels
    few_hot = np.where(rng.random(768) < 0.02, 1000.0, 1.0)  # a few channels carry most of it
    for act, bits, ratio in ((lognormal, 4, 0.85), (few_hot, 3, 0.7)):
        act = act.copy()
        act[:3] *= 1e4  # extreme outliers, clipped by the percentile
        clipped = np.minimum(act, np.percentile(act, 99.0))
        weighted = elementwise_quantize(v, act, ElementwiseConfig(bits=bits, percentile=99.0))
        plain = elementwise_quantize(v, act, ElementwiseConfig(bits=bits, weighted=False))
        e_w = weighted_error(v, weighted.dequantize(), clipped)
        assert e_w < ratio * weighted_error(v, plain.dequantize(), clipped)
        assert weighted.dequantize().shape == v.shape and len(np.unique(weighted.codes)) <= 1 << bits
        unclipped = elementwise_quantize(v, act, ElementwiseConfig(bits=bits, percentile=100.0))
        assert e_w < weighted_error(v, unclipped.dequantize(), clipped)  # outliers must not own the codebook


def _all_payloads(h256):
    w = gaussian(64, 256, seed=9)
    out = {name: (m.quantize(w, h256 if m.needs_hessian else None, m.config())) for name, m in METHODS.items()}
    out["awq"] = out["awq"].quantized
    out["gptq-sym-4"] = gptq_quantize(w, h256, GPTQConfig(bits=4, symmetric=True))
    out["gptvq-d4"] = gptvq_quantize(w, h256, VQConfig(bits=2, dim=4, group_rows=8, group_cols=64))
    out["vq-16bit-codebook"] = kmeans_vq_quantize(w, None, VQConfig(bits=2, codebook_bits=16, group_rows=7))
    out["elementwise"] = elementwise_quantize(np.linspace(-1, 1, 100).reshape(1, 1, 100), None)
    return out


def test_every_payload_round_trips_bit_exactly_and_bpw_matches_bytes(h256, tmp_path):
    for name, q in _all_payloads(h256).items():
        arrays = q.to_arrays()
        np.savez(tmp_path / f"{name}.npz", **arrays)
        loaded = dict(np.load(tmp_path / f"{name}.npz"))
        back = from_arrays(loaded)
        np.testing.assert_array_equal(back.dequantize(), q.dequantize(), err_msg=name)
        assert back.to_arrays().keys() == arrays.keys()
        stored = payload_bits(q)
        n_arrays = len(arrays) - 1
        assert total_bits(q) <= stored < total_bits(q) + 8 * n_arrays, name  # only byte padding differs
        assert bpw(q) == total_bits(q) / np.prod(q.shape)
        assert stored / np.prod(q.shape) == pytest.approx(bpw(q), abs=8 * n_arrays / np.prod(q.shape))


def test_reported_bpw_matches_config_formula(h256):
    w = gaussian(96, 256, seed=1)
    for cfg in (ScalarConfig(bits=3, group_size=64), ScalarConfig(bits=4, group_size=0, symmetric=True)):
        assert bpw(rtn_quantize(w, None, cfg)) == pytest.approx(cfg.bpw(96, 256))
    cfg = VQConfig(bits=3, dim=2, group_rows=10, group_cols=128)
    assert bpw(kmeans_vq_quantize(w, None, cfg)) == pytest.approx(cfg.bpw(96, 256))


def test_pack_bits_round_trip():
    rng = np.random.default_rng(0)
    for bits in (1, 2, 3, 4, 6, 8, 12):
        v = rng.integers(0, 1 << bits, 1001)
        packed = pack_bits(v, bits)
        assert packed.nbytes == -(-1001 * bits // 8)
        np.testing.assert_array_equal(unpack_bits(packed, bits, 1001), v)


def test_configs_validate_and_round_trip_json():
    for bad in (dict(bits=5), dict(group_size=3)):
        with pytest.raises(ConfigError):
            GPTQConfig(**bad)
    with pytest.raises(ConfigError):
        VQConfig(dim=3)
    with pytest.raises(ConfigError):
        VQConfig(init="random")
    cfg = VQConfig(bits=2, dim=4, group_rows=8)
    assert VQConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ConfigError, match="unknown field"):
        GPTQConfig.from_dict({"bits": 3, "groupsize": 64})
    with pytest.raises(ConfigError):
        kmeans_vq_quantize(gaussian(8, 30), None, VQConfig(dim=4))


def test_budget_selector_follows_an_alternative_ranking_for_ablations():
    rng = np.random.default_rng(2)
    tensors = [TensorInfo(f"w{i}", (768, 768), proxies(rng.standard_normal((64, 64)) * (1 + i))) for i in range(6)]
    sq, vq = ScalarConfig(bits=3, group_size=64, symmetric=True), VQConfig(bits=3, dim=2)
    order = {f"w{i}": float(i) for i in range(6)}  # w5 most deserving of VQ
    plan = plan_for_budget(tensors, 3.26, sq, vq, tau_c=1e9, tau_f=1e300, ranking=order)
    chosen = sorted(int(e.name[1:]) for e in plan.entries if e.method == "vq")
    assert chosen and chosen == list(range(6 - len(chosen), 6))
