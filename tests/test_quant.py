"""Quantization algorithms on synthetic data with known structure."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rwkvq_onnx.errors import BudgetError, ConfigError
from rwkvq_onnx.quant import (METHODS, AWQConfig, ElementwiseConfig, GPTQConfig, ScalarConfig, VQConfig,
                              awq_quantize, bpw, elementwise_quantize, gptq_quantize, gptvq_quantize,
                              kmeans_vq_quantize, proxies, rtn_quantize, total_bits)
from rwkvq_onnx.quant.elementwise import weighted_error
from rwkvq_onnx.quant.hessian import output_error
from rwkvq_onnx.quant.policy import (BUDGET_TOLERANCE, plan_by_thresholds, plan_for_budget, plan_uniform,
                                     proxy_score)


def correlated_hessian(k: int, seed: int = 0, n: int = 8192) -> np.ndarray:
    """Inputs with strong cross-channel correlation and uneven channel scales, as activations have."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    x = rng.standard_normal((n, k)) @ mix + 0.1 * rng.standard_normal((n, k))
    x *= np.exp(0.5 * rng.standard_normal(k))
    return 2.0 / n * x.T @ x


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


@pytest.mark.slow
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
    sq = GPTQConfig(bits=3, group_size=128, act_order=True)
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


def _model_like_weights(count: int = 18, seed: int = 1) -> tuple[dict, dict]:
    """Shapes of a small RWKV and proxies of weights from uniform (SQ-like) to heavy-tailed (VQ-like)."""
    rng = np.random.default_rng(seed)
    shapes, proxy = {}, {}
    for i in range(count):
        shapes[f"w{i:02d}"] = [(256, 256), (1024, 256), (256, 1024)][i % 3]
        sample = [rng.uniform(-0.05, 0.05, (256, 256)), rng.normal(0, 0.02, (256, 256)),
                  rng.laplace(0, 0.02 * (1 + i % 4), (256, 256))][i % 3]
        proxy[f"w{i:02d}"] = proxies(sample)
    return shapes, proxy


SQ = GPTQConfig(bits=3, group_size=128)  # 3.25 bpw as the paper counts
VQ = VQConfig(bits=3, dim=2)


@pytest.mark.parametrize("target", [3.26, 3.275, 3.3, 3.4])
@pytest.mark.parametrize("accounting", ["paper", "stored"])
def test_budget_plan_lands_just_below_target_with_fixed_configs_following_the_ranking(target, accounting):
    shapes, proxy = _model_like_weights()
    plan = plan_for_budget(shapes, proxy, target, SQ, VQ, vq_bpw=3.5, accounting=accounting)
    assert target - BUDGET_TOLERANCE <= plan.bpw(accounting) <= target + 1e-12
    assert plan.bpw("stored") <= plan.bpw("paper") + 1e-12
    vq = [e for e in plan.entries if e.kind == "vq"]
    sq = [e for e in plan.entries if e.kind == "sq"]
    assert vq and sq  # a real mix
    assert all(e.config == SQ and e.algorithm == "gptq" for e in sq)  # SQ stays at its own cost
    assert all(e.algorithm == "gptvq" and 3.4 < e.bpw() <= 3.5 for e in vq)  # VQ held at (just under) 3.5
    # the VQ set is the least uniform weights, except those skipped because their VQ would overshoot
    n = sum(e.numel for e in plan.entries)
    slack = (target - plan.bpw(accounting)) * n
    last_vq = max(e.reasons["rank"] for e in vq)
    for e in plan.entries:
        if e.kind == "sq" and e.reasons["rank"] < last_vq:
            vq_cost = VQ.bpw_with_rows(*e.shape, VQ.rows_for_bpw(*e.shape, 3.5))  # same in both accountings
            extra = (vq_cost - e.bpw(accounting)) * e.numel
            assert extra > slack, e.name
    share = plan.share()
    assert share["vq"]["tensors"] == len(vq) and share["sq"]["param_share"] + share["vq"]["param_share"] == 1.0


def test_paper_target_gives_the_paper_mix():
    """SQ at 3.25 and VQ at 3.5 (paper accounting): 3.275 is about a tenth of the parameters in VQ."""
    shapes = {f"w{i}": (640, 640) for i in range(40)}  # 5-row x 32-column blocks of 3-bit dim-1 VQ: 3.5 exactly
    proxy = {f"w{i}": proxies(np.random.default_rng(i).laplace(0, 0.02, (64, 64))) for i in range(40)}
    vq = VQConfig(bits=3, dim=1, group_cols=32)
    assert SQ.paper_bpw(768, 768) == 3.25 and SQ.bpw(768, 768) == 3 + 19 / 128
    assert vq.bpw_with_rows(640, 640, vq.rows_for_bpw(640, 640, 3.5)) == 3.5
    plan = plan_for_budget(shapes, proxy, 3.275, SQ, vq, vq_bpw=3.5, accounting="paper")
    assert plan.policy["accounting"] == "paper" and 3.27 <= plan.bpw("paper") <= 3.275
    assert plan.share()["vq"]["param_share"] == pytest.approx(0.1, abs=0.03)


def test_threshold_plan_is_the_papers_rule():
    shapes, proxy = _model_like_weights()
    plan = plan_by_thresholds(shapes, proxy, SQ, VQ, tau_c=1.5, tau_f=50)
    for e in plan.entries:
        p = proxy[e.name]
        assert (e.kind == "sq") == (p.coarse < 1.5 and p.fine < 50)
        assert (e.reasons["score"] >= 1) == (e.kind == "vq")  # the ranking key agrees with the thresholds
        assert e.reasons["score"] == proxy_score(p, 1.5, 50)
    assert {e.kind for e in plan.entries} == {"sq", "vq"}
    lax = plan_by_thresholds(shapes, proxy, SQ, VQ, tau_c=1e9, tau_f=1e300)
    assert all(e.kind == "sq" for e in lax.entries)  # thresholds are parameters


def test_budget_plan_rejects_infeasible_targets():
    shapes, proxy = _model_like_weights()
    with pytest.raises(BudgetError, match="below what 3-bit scalar"):
        plan_for_budget(shapes, proxy, 3.1, SQ, VQ)
    with pytest.raises(BudgetError, match="cannot be met"):
        plan_for_budget(shapes, proxy, 3.9, SQ, VQ)


def test_a_greedy_walk_that_stops_short_is_refined_by_one_exchange():
    """a (7) and b (4) fit, c (5) would overshoot 12: 11 misses [11.5, 12]; trading b for c lands on 12."""
    from rwkvq_onnx.quant.policy import _landing_swap

    extra = {"a": 7.0, "b": 4.0, "c": 5.0}
    assert _landing_swap(["a", "b", "c"], {"a", "b"}, extra, 11.0, 11.5, 12.0) == ("b", "c", 12.0)
    # nothing lands: no exchange, the caller reports the budget error
    assert _landing_swap(["a", "b", "c"], {"a"}, {"a": 7.0, "b": 6.0, "c": 5.0}, 7.0, 10.5, 11.0) is None


def test_budget_plan_follows_an_alternative_ranking_for_ablations():
    shapes = {f"w{i}": (256, 256) for i in range(6)}
    rng = np.random.default_rng(2)
    proxy = {n: proxies(rng.standard_normal((64, 64))) for n in shapes}
    order = {f"w{i}": float(i) for i in range(6)}  # w5 most deserving of VQ
    plan = plan_for_budget(shapes, proxy, 3.323, SQ, VQ, scores=order, accounting="paper")
    chosen = sorted(int(e.name[1:]) for e in plan.entries if e.kind == "vq")
    assert chosen and chosen == list(range(6 - len(chosen), 6))


def test_vq_baseline_is_held_at_its_target_and_scalar_baseline_picks_a_group():
    shapes, proxy = _model_like_weights(6)
    vq_plan = plan_uniform("gptvq", shapes, SQ, VQ, target=3.5)
    assert all(e.bpw() <= 3.5 for e in vq_plan.entries) and vq_plan.bpw() > 3.4
    sq_plan = plan_uniform("gptq", shapes, SQ, VQ, target=3.5, accounting="paper")
    assert len({e.config for e in sq_plan.entries}) == 1 and abs(sq_plan.bpw("paper") - 3.5) <= 0.05


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


def test_payload_bits_are_what_the_config_accounts(h256):
    for name, q in _all_payloads(h256).items():
        assert bpw(q) == total_bits(q) / np.prod(q.shape), name
    w = gaussian(64, 256, seed=9)
    cfg = GPTQConfig(bits=3, group_size=128)
    q = gptq_quantize(w, h256, cfg)
    assert total_bits(q) == 64 * 256 * 3 + 64 * 2 * (16 + 3) == cfg.bpw(64, 256) * 64 * 256
    assert cfg.paper_bpw(64, 256) == 3.25


def test_reported_bpw_matches_config_formula(h256):
    w = gaussian(96, 256, seed=1)
    for cfg in (ScalarConfig(bits=3, group_size=64), ScalarConfig(bits=4, group_size=0, symmetric=True)):
        assert bpw(rtn_quantize(w, None, cfg)) == pytest.approx(cfg.bpw(96, 256))
    cfg = VQConfig(bits=3, dim=2, group_rows=10, group_cols=128)
    assert bpw(kmeans_vq_quantize(w, None, cfg)) == pytest.approx(cfg.bpw(96, 256))


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
