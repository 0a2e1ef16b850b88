"""Pass: choose a quantization method and config for every linear weight (the per-weight plan).

RWKVQuant policy: the coarse-to-fine proxy decides SQ (GPTQ) or VQ (GPTVQ)
per weight, at fixed thresholds or, given a bpw target, by ranking so the
target is met. Baseline policies give every weight the same method, with
a config chosen to meet the bpw target when there is one. No graph change.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from tqdm import tqdm

from rwkvq_onnx.quant import (METHODS, GPTQConfig, ScalarConfig, TensorInfo, VQConfig, plan_fixed,
                              plan_for_budget, proxies)
from rwkvq_onnx.quant.budget import PlanEntry, solve_codebook_rows, vq_eligible
from rwkvq_onnx.errors import BudgetError, ConfigError

from .base import PassResult, QuantState

POLICIES = ("rwkvquant", *METHODS)
RANKINGS = ("proxy", "variance", "range", "mse")


def alternative_ranking(kind: str, state: QuantState, infos: list[TensorInfo], sq: ScalarConfig,
                        vq: VQConfig) -> dict[str, float] | None:
    """Ablation scores (higher = VQ first): weight variance, weight range, or the output-error gain of
    GPTVQ over GPTQ measured by quantizing every weight both ways (the costly choice the proxy avoids)."""
    if kind == "proxy":
        return None
    if kind not in RANKINGS:
        raise ConfigError(f"unknown ranking '{kind}' (choose from {', '.join(RANKINGS)})")
    out = {}
    for i in infos:
        w = state.weights[i.name]
        if kind == "variance":
            out[i.name] = float(np.var(w))
        elif kind == "range":
            out[i.name] = float(np.ptp(w) / max(np.std(w), 1e-30))
        else:
            from rwkvq_onnx.quant import gptq_quantize, gptvq_quantize
            from rwkvq_onnx.quant.hessian import output_error

            h = state.stats.hessians[i.name]
            e_sq = output_error(w, gptq_quantize(w, h, sq).dequantize(), h)
            e_vq = output_error(w, gptvq_quantize(w, h, vq).dequantize(), h) if vq_eligible(i, vq) else e_sq
            out[i.name] = (e_sq - e_vq) / max(e_sq, 1e-30)
    return out


# Group sizes come in powers of two, so a baseline lands near, not on, a target; small tensors
# (LoRA, K = 32) push the mean up. Up to this much above the target counts as meeting it.
SCALAR_BPW_SLACK = 0.05


def scalar_config_for_bpw(kind: type, bits: int, target: float, infos: list[TensorInfo], **extra) -> ScalarConfig:
    """The per-group config of `bits` bits whose model-mean bpw is closest to `target` (at most SLACK above)."""
    options = [kind(bits=bits, group_size=g, symmetric=s, **extra) for g in (0, 256, 128, 64, 32, 16)
               for s in (True, False)]
    n = sum(i.numel for i in infos)

    def mean(c: ScalarConfig) -> float:
        return sum(c.bpw(*i.shape) * i.numel for i in infos) / n

    fitting = [c for c in options if mean(c) <= target + SCALAR_BPW_SLACK]
    if not fitting:
        raise BudgetError(f"bpw target {target} is below what {bits}-bit scalar quantization needs "
                          f"({min(mean(c) for c in options):.3f})")
    return min(fitting, key=lambda c: (abs(mean(c) - target), c.symmetric))


@dataclass
class SelectMethods:
    """Plan: weight name -> (sq|vq, config). Reads proxies of the weights; writes `state.plan`."""

    policy: str = "rwkvquant"
    bpw: float | None = None
    sq: ScalarConfig = GPTQConfig(bits=3, group_size=64, symmetric=True)
    vq: VQConfig = VQConfig(bits=3, dim=2)
    tau_c: float = 1.5
    tau_f: float = 50.0
    progress: bool = True
    ranking: str = "proxy"
    name: str = "select-methods"

    def __call__(self, model: onnx.ModelProto, state: QuantState) -> PassResult:
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown method '{self.policy}' (choose from {', '.join(POLICIES)})")
        infos = []
        for t in tqdm(state.linear, desc="proxies", unit="tensor", disable=None if self.progress else True):
            infos.append(TensorInfo(t.weight, t.shape, proxies(state.weights[t.weight])))
        if self.policy == "rwkvquant":
            ranking = alternative_ranking(self.ranking, state, infos, self.sq, self.vq)
            if ranking is not None and not self.bpw:
                raise ConfigError("--ranking other than 'proxy' needs a --bpw target (it orders, it has no threshold)")
            plan = (plan_for_budget(infos, self.bpw, self.sq, self.vq, self.tau_c, self.tau_f, ranking=ranking)
                    if self.bpw else plan_fixed(infos, self.sq, self.vq, self.tau_c, self.tau_f))
            state.plan = plan.by_name()
            for e in plan.entries:
                state.algorithm[e.name] = "gptvq" if e.method == "vq" else "gptq"
        else:
            state.plan = self._uniform(infos)
            state.algorithm = {name: self.policy for name in state.plan}
        for info in infos:
            state.report[info.name] = {"shape": list(info.shape), "proxy_coarse": info.proxy.coarse,
                                       "proxy_fine": info.proxy.fine}
        result = PassResult(self.name)
        result.counts["sq"] = sum(e.method == "sq" for e in state.plan.values())
        result.counts["vq"] = sum(e.method == "vq" for e in state.plan.values())
        return result

    def _uniform(self, infos: list[TensorInfo]) -> dict[str, PlanEntry]:
        method = METHODS[self.policy]
        plan = {}
        if method.kind == "vq":
            infos_ok = [i for i in infos if vq_eligible(i, self.vq)]
            if len(infos_ok) != len(infos):
                bad = [i.name for i in infos if i not in infos_ok]
                raise ConfigError(f"{self.policy} cannot quantize {bad[0]} (input size not a multiple of "
                                  f"vq-dim / group columns)")
            if self.bpw:
                n_total = sum(i.numel for i in infos)
                rows, bits = solve_codebook_rows(infos, self.bpw * n_total, None, self.vq, 4096)
                if abs(bits / n_total - self.bpw) > 0.005:
                    raise BudgetError(f"bpw target {self.bpw} cannot be met with {self.vq.bits}-bit VQ "
                                      f"(closest {bits / n_total:.3f})")
            for i in infos:
                cfg = replace(self.vq, group_rows=rows[i.name]) if self.bpw else self.vq
                plan[i.name] = PlanEntry(i.name, "vq", cfg, cfg.bpw(*i.shape), 0.0)
        else:
            kind = method.config
            base = {f: getattr(self.sq, f) for f in ("damp", "block_size", "act_order")
                    if f in kind.__dataclass_fields__ and hasattr(self.sq, f)}
            cfg = (scalar_config_for_bpw(kind, self.sq.bits, self.bpw, infos, **base) if self.bpw
                   else kind(bits=self.sq.bits, group_size=self.sq.group_size, symmetric=self.sq.symmetric, **base))
            for i in infos:
                plan[i.name] = PlanEntry(i.name, "sq", cfg, cfg.bpw(*i.shape), 0.0)
        return plan
