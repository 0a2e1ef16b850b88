"""RWKVQuant's policy: which weight gets scalar (GPTQ) and which vector (GPTVQ) quantization.

Two decision modes, both returning a `Plan`:

- thresholds (`plan_by_thresholds`): scalar iff P_c < tau_c and P_f < tau_f
  (the paper's rule; the model's bpw is whatever that lands on);
- a bpw target (`plan_for_budget`): the scalar and vector configs stay fixed
  at their own costs (paper: SQ 3.25, VQ 3.5). The weights are ranked from
  least to most uniform and VQ is given down that ranking, skipping a weight
  whose VQ would overshoot, until the budget is spent. The result is never
  above the target and must land within `BUDGET_TOLERANCE` of it. No
  codebook is shrunk to fit.

Ranking key (`proxy` ranking): the combined score
`s = max(P_c / tau_c, log1p(P_f) / log1p(tau_f))`, highest first (ties by
name). It is >= 1 exactly when the threshold rule says VQ, so the budget mode
and the threshold mode agree on order: lowering the budget drops VQ weights
from the uniform end of the threshold rule's VQ set. log1p tames P_f, which
spans 1 to 10^4 on real weights. Ablation rankings replace the key: `coarse`
(P_c only), `fine` (P_f only), `variance`, `range` (max-min over std) and
`mse` (output-error gain of GPTVQ over GPTQ, measured by quantizing each weight
both ways: the costly search the proxy avoids).

Baselines (one algorithm everywhere) at a target: scalar methods pick the
group size whose mean bpw is nearest the target (at most `SCALAR_BPW_SLACK`
above: group sizes come in powers of two); vector methods hold every weight at
the target with `VQConfig.rows_for_bpw` (a weight too small for that gets one
codebook per column group, the cheapest there is). In the hybrid, a weight
whose VQ cannot be held at the VQ cost stays scalar.

Costs are counted in one of two accountings (see configs.py): "stored" (the
bits the payload holds; the CLI default) or "paper" (the paper's: fp16 scale
and fp16 zero per scalar group, so 3-bit groups of 128 cost 3.25). Stored is
never above paper, so a plan within budget in paper accounting is within it in
stored accounting too. On small matrices (K < 128, e.g. the LoRA factors)
the scalar group is the whole row and paper-counted SQ costs more than 3.25.

A weight whose VQ costs no more than its SQ (small LoRA factors, where a
scalar group is a short row) takes VQ whenever the ranking reaches it, since
that frees budget; the ranking still decides the order.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Mapping

import numpy as np

from ..errors import BudgetError, ConfigError
from .configs import GPTQConfig, ScalarConfig, VQConfig
from .plan import ALGORITHM_CONFIG, Plan, PlanEntry
from .proxy import TAU_C, TAU_F, ProxyValues, proxies

RANKINGS = ("proxy", "coarse", "fine", "variance", "range", "mse")
ACCOUNTINGS = ("paper", "stored")
BUDGET_TOLERANCE = 0.005  # a bpw target is met when the plan lands in [target - this, target]
SCALAR_BPW_SLACK = 0.05  # baselines: a scalar group size may overshoot the target by this much


def proxy_score(p: ProxyValues, tau_c: float = TAU_C, tau_f: float = TAU_F) -> float:
    """The ranking key: >= 1 exactly when the threshold rule sends the weight to VQ."""
    return max(p.coarse / tau_c, math.log1p(max(p.fine, 0.0)) / math.log1p(tau_f))


def vq_eligible(shape: tuple[int, int], vq: VQConfig) -> bool:
    """Whether a vector config can cut an [N, K] weight (K a multiple of dim and of the column group)."""
    k = shape[1]
    gc = min(vq.group_cols, k)
    return k % vq.dim == 0 and k % gc == 0 and gc % vq.dim == 0


def vq_at_cost(vq: VQConfig, shape: tuple[int, int], max_bpw: float | None) -> VQConfig | None:
    """`vq` with the block height that holds an [N, K] weight at `max_bpw` (unchanged when None; None when
    even one codebook per column group costs more, as on a small LoRA matrix)."""
    if max_bpw is None:
        return vq
    rows = vq.rows_for_bpw(*shape, max_bpw)
    return None if rows is None else replace(vq, group_rows=rows)


def ranking_scores(kind: str, weights: Mapping[str, np.ndarray], proxy: Mapping[str, ProxyValues],
                   tau_c: float, tau_f: float, mse: Callable[[str], float] | None = None) -> dict[str, float]:
    """Scores by which weights are ranked for VQ (higher = less uniform = VQ first)."""
    if kind not in RANKINGS:
        raise ConfigError(f"unknown ranking '{kind}' (choose from {', '.join(RANKINGS)})")
    out = {}
    for name, w in weights.items():
        if kind == "proxy":
            out[name] = proxy_score(proxy[name], tau_c, tau_f)
        elif kind == "coarse":
            out[name] = proxy[name].coarse
        elif kind == "fine":
            out[name] = proxy[name].fine
        elif kind == "variance":
            out[name] = float(np.var(w))
        elif kind == "range":
            out[name] = float(np.ptp(w) / max(float(np.std(w)), 1e-30))
        else:
            if mse is None:
                raise ConfigError("the mse ranking needs calibration statistics")
            out[name] = mse(name)
    return out


def mse_gain(w: np.ndarray, h: np.ndarray, sq: GPTQConfig, vq: VQConfig) -> float:
    """Relative output-error gain of GPTVQ over GPTQ on one weight (the `mse` ablation's score)."""
    from .hessian import output_error
    from .scalar import gptq_quantize
    from .vector import gptvq_quantize

    e_sq = output_error(w, gptq_quantize(w, h, sq).dequantize(), h)
    if not vq_eligible(w.shape, vq):
        return 0.0
    e_vq = output_error(w, gptvq_quantize(w, h, vq).dequantize(), h)
    return (e_sq - e_vq) / max(e_sq, 1e-30)


def _reasons(p: ProxyValues, score: float, rank: int) -> dict:
    return {"P_c": p.coarse, "P_f": p.fine, "n": p.n, "score": score, "rank": rank}


def _ranked(shapes: Mapping[str, tuple[int, int]], scores: Mapping[str, float]) -> list[str]:
    return sorted(shapes, key=lambda n: (-scores[n], n))


def plan_by_thresholds(shapes: Mapping[str, tuple[int, int]], proxy: Mapping[str, ProxyValues], sq: GPTQConfig,
                       vq: VQConfig, tau_c: float = TAU_C, tau_f: float = TAU_F,
                       vq_bpw: float | None = 3.5, policy: dict | None = None) -> Plan:
    """The paper's rule: GPTQ iff P_c < tau_c and P_f < tau_f, else GPTVQ (held at `vq_bpw`)."""
    scores = {n: proxy_score(proxy[n], tau_c, tau_f) for n in shapes}
    rank = {n: i for i, n in enumerate(_ranked(shapes, scores))}
    entries = []
    for name, shape in shapes.items():
        vq_cfg = vq_at_cost(vq, shape, vq_bpw) if vq_eligible(shape, vq) else None
        use_vq = not proxy[name].prefers_scalar(tau_c, tau_f) and vq_cfg is not None
        cfg = vq_cfg if use_vq else sq
        reasons = {**_reasons(proxy[name], scores[name], rank[name]), "tau_c": tau_c, "tau_f": tau_f}
        entries.append(PlanEntry(name, shape, "gptvq" if use_vq else "gptq", cfg, reasons))
    return Plan(tuple(entries), {}, {"policy": "rwkvquant", "mode": "thresholds", "tau_c": tau_c, "tau_f": tau_f,
                                     **(policy or {})})


def plan_for_budget(shapes: Mapping[str, tuple[int, int]], proxy: Mapping[str, ProxyValues], target: float,
                    sq: GPTQConfig, vq: VQConfig, vq_bpw: float | None = 3.5, scores: Mapping[str, float] | None = None,
                    accounting: str = "stored", tau_c: float = TAU_C, tau_f: float = TAU_F,
                    policy: dict | None = None) -> Plan:
    """VQ down the ranking (highest score first) until the bpw budget is spent; never above `target`.

    `scores` replaces the proxy ranking for ablations (higher = VQ first).
    """
    if not shapes:
        raise BudgetError("no weights to quantize")
    _check_accounting(accounting)
    if scores is None:
        scores = {n: proxy_score(proxy[n], tau_c, tau_f) for n in shapes}
    order = _ranked(shapes, scores)

    def cost(cfg, shape) -> float:
        return (cfg.paper_bpw if accounting == "paper" else cfg.bpw)(*shape) * shape[0] * shape[1]

    n_total = sum(s[0] * s[1] for s in shapes.values())
    budget = target * n_total
    vq_cfg = {n: vq_at_cost(vq, s, vq_bpw) for n, s in shapes.items() if vq_eligible(s, vq)}
    vq_cfg = {n: c for n, c in vq_cfg.items() if c is not None}  # the others cannot be held at the VQ cost
    spent = sum(cost(sq, s) for s in shapes.values())
    if spent > budget + 1e-9 * n_total:
        raise BudgetError(f"bpw target {target} is below what {sq.bits}-bit scalar quantization costs everywhere "
                          f"({spent / n_total:.4f} in {accounting} accounting)")
    chosen = set()
    for name in order:  # greedy down the ranking; a weight that would overshoot is skipped, not resized
        if name not in vq_cfg:
            continue
        extra = cost(vq_cfg[name], shapes[name]) - cost(sq, shapes[name])
        if spent + extra <= budget + 1e-9 * n_total:
            chosen.add(name)
            spent += extra
    refined = {}
    if spent < budget - BUDGET_TOLERANCE * n_total and len(chosen) < len(vq_cfg):
        swap = _landing_swap(order, chosen, {n: cost(vq_cfg[n], shapes[n]) - cost(sq, shapes[n]) for n in vq_cfg},
                             spent, budget - BUDGET_TOLERANCE * n_total, budget + 1e-9 * n_total)
        if swap is not None:
            out, into, spent = swap
            chosen = (chosen - {out}) | {into}
            refined = {"swap": {"out": out, "in": into}}
    achieved = spent / n_total
    if achieved < target - BUDGET_TOLERANCE:
        what = ("VQ on every eligible weight costs" if len(chosen) == len(vq_cfg)
                else f"the closest plan below it (VQ on {len(chosen)} of {len(shapes)} weights) costs")
        raise BudgetError(f"bpw target {target} cannot be met within {BUDGET_TOLERANCE}: {what} {achieved:.4f} "
                          f"({accounting} accounting); change --bpw or the VQ cost")
    rank = {n: i for i, n in enumerate(order)}
    entries = []
    for name, shape in shapes.items():
        use_vq = name in chosen
        reasons = {**_reasons(proxy[name], scores[name], rank[name])}
        entries.append(PlanEntry(name, shape, "gptvq" if use_vq else "gptq", vq_cfg[name] if use_vq else sq, reasons))
    return Plan(tuple(entries), {}, {"policy": "rwkvquant", "mode": "budget", "target": target,
                                     "accounting": accounting, "tau_c": tau_c, "tau_f": tau_f, **refined,
                                     **(policy or {})})


def _landing_swap(order: list[str], chosen: set[str], extra: Mapping[str, float], spent: float, low: float,
                  high: float) -> tuple[str, str, float] | None:
    """When the greedy walk stops below the landing window: one exchange of a chosen weight for a skipped one
    that lands in [low, high], or None.

    Whole weights have coarse costs, so on a small model the greedy walk can stop short of the window. The
    exchange that stays closest to the ranking wins: the skipped weight ranked highest comes in, and the chosen
    weight ranked lowest that makes it fit goes out."""
    rank = {n: i for i, n in enumerate(order)}
    skipped = sorted((n for n in extra if n not in chosen), key=rank.__getitem__)
    leaving = sorted(chosen, key=rank.__getitem__, reverse=True)
    for into in skipped:
        fits = [(out, spent - extra[out] + extra[into]) for out in leaving
                if low <= spent - extra[out] + extra[into] <= high]
        if fits:
            out, total = fits[0]
            return out, into, total
    return None


def _check_accounting(accounting: str) -> None:
    if accounting not in ACCOUNTINGS:
        raise ConfigError(f"unknown bpw accounting '{accounting}' (choose from {', '.join(ACCOUNTINGS)})")


def scalar_config_for_bpw(base: ScalarConfig, target: float, shapes: Mapping[str, tuple[int, int]],
                          accounting: str = "stored") -> ScalarConfig:
    """The group size (and zero-point mode) of `base` whose mean bpw is nearest `target`, at most
    SCALAR_BPW_SLACK above it (a baseline's knob; the hybrid keeps its scalar config fixed)."""
    _check_accounting(accounting)
    options = [replace(base, group_size=g, symmetric=s) for g in (0, 256, 128, 64, 32, 16) for s in (False, True)]
    n = sum(a * b for a, b in shapes.values())

    def mean(c: ScalarConfig) -> float:
        f = c.paper_bpw if accounting == "paper" else c.bpw
        return sum(f(*s) * s[0] * s[1] for s in shapes.values()) / n

    fitting = [c for c in options if mean(c) <= target + SCALAR_BPW_SLACK]
    if not fitting:
        raise BudgetError(f"bpw target {target} is below what {base.bits}-bit scalar quantization needs "
                          f"({min(mean(c) for c in options):.3f})")
    return min(fitting, key=lambda c: (abs(mean(c) - target), c.symmetric))


def plan_uniform(algorithm: str, shapes: Mapping[str, tuple[int, int]], sq: ScalarConfig, vq: VQConfig,
                 target: float | None = None, accounting: str = "stored", proxy: Mapping[str, ProxyValues] | None = None,
                 policy: dict | None = None) -> Plan:
    """A baseline: one algorithm on every weight, sized to `target` when given (proxies, when given, are
    recorded as reasons for the report; they decide nothing)."""
    scores = {n: proxy_score(p) for n, p in (proxy or {}).items()}
    rank = {n: i for i, n in enumerate(_ranked(shapes, scores))} if proxy else {}

    def why(name: str) -> dict:
        return _reasons(proxy[name], scores[name], rank[name]) if proxy else {}

    kind = ALGORITHM_CONFIG.get(algorithm)
    if kind is None:
        raise ConfigError(f"unknown method '{algorithm}' (choose from rwkvquant, {', '.join(ALGORITHM_CONFIG)})")
    entries = []
    if kind is VQConfig:
        bad = [n for n, s in shapes.items() if not vq_eligible(s, vq)]
        if bad:
            raise ConfigError(f"{algorithm} cannot quantize {bad[0]} (input size not a multiple of --vq-dim / "
                              f"--vq-group-cols)")
        for name, shape in shapes.items():  # at the target, or the cheapest blocks where none fits
            cfg = vq_at_cost(vq, shape, target) or replace(vq, group_rows=shape[0])
            entries.append(PlanEntry(name, shape, algorithm, cfg, why(name)))
    else:
        fields = {f: getattr(sq, f) for f in kind.__dataclass_fields__ if hasattr(sq, f)}
        cfg = kind(**fields)
        if target is not None:
            cfg = scalar_config_for_bpw(cfg, target, shapes, accounting)
        entries = [PlanEntry(name, shape, algorithm, cfg, why(name)) for name, shape in shapes.items()]
    return Plan(tuple(entries), {}, {"policy": algorithm, "mode": "budget" if target is not None else "fixed",
                                     "target": target, "accounting": accounting, **(policy or {})})


def weight_proxies(weights: Mapping[str, np.ndarray]) -> dict[str, ProxyValues]:
    """P_c, P_f, n of every weight."""
    return {n: proxies(w) for n, w in weights.items()}


__all__ = ["RANKINGS", "ACCOUNTINGS", "BUDGET_TOLERANCE", "proxy_score", "vq_eligible", "vq_at_cost",
           "ranking_scores", "mse_gain", "plan_by_thresholds", "plan_for_budget", "plan_uniform",
           "scalar_config_for_bpw", "weight_proxies"]
