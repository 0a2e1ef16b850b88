"""Apply a plan: pure functions from weights and calibration statistics to `Payloads`.

`apply_plan` runs each entry's algorithm on its weight; nothing here reads or
writes a graph, and the same plan, weights and statistics always give the
same payloads (every algorithm is seeded by its config). `tensor_rows`
measures what the payloads cost and lose, for the quantize report.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .elementwise import elementwise_quantize, weighted_error
from .formats import Payloads, bpw
from .hessian import output_error
from .plan import Plan
from .scalar import AWQResult


def apply_plan(plan: Plan, weights: Mapping[str, np.ndarray], hessians: Mapping[str, np.ndarray],
               vectors: Mapping[str, np.ndarray] | None = None, act_sq: Mapping[str, np.ndarray] | None = None,
               progress: bool = False) -> Payloads:
    """Quantize every planned weight ([N, K] layout, Hessian [K, K]) and element-wise vector.

    Weights absent from `weights` are skipped, so a sub-plan can be applied block by block.
    """
    from tqdm import tqdm

    from . import METHODS

    linear, input_scales, elementwise = {}, {}, {}
    entries = [e for e in plan.entries if e.name in weights]
    for e in tqdm(entries, desc="quantize", unit="tensor", disable=None if progress else True):
        method = METHODS[e.algorithm]
        out = method.quantize(weights[e.name], hessians[e.name] if method.needs_hessian else None, e.config)
        if isinstance(out, AWQResult):
            input_scales[e.name] = out.input_scale
            out = out.quantized
        linear[e.name] = out
    for name, cfg in plan.elementwise.items():
        if vectors is not None and name in vectors:
            elementwise[name] = elementwise_quantize(vectors[name], (act_sq or {}).get(name), cfg)
    return Payloads(linear, input_scales, elementwise)


def dequantized(payloads: Payloads, name: str) -> np.ndarray:
    """The weight a linear payload stands for, as seen by unscaled inputs (AWQ scales undone)."""
    w_hat = payloads.linear[name].dequantize()
    if name in payloads.input_scales:
        w_hat = w_hat / payloads.input_scales[name][None, :]
    return w_hat


def relative_errors(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> tuple[float, float]:
    """(||dW|| / ||W||, tr(dW H dW^T) / tr(W H W^T))."""
    rel_w = float(np.linalg.norm(w - w_hat) / max(np.linalg.norm(w), 1e-30))
    denom = output_error(w, np.zeros_like(w), h)
    return rel_w, float(output_error(w, w_hat, h) / max(denom, 1e-30))


def tensor_rows(plan: Plan, payloads: Payloads, weights: Mapping[str, np.ndarray],
                hessians: Mapping[str, np.ndarray], vectors: Mapping[str, np.ndarray] | None = None,
                act_sq: Mapping[str, np.ndarray] | None = None) -> dict[str, dict]:
    """Per-tensor report rows: method, config, bpw (stored and paper), errors, the policy's reasons."""
    rows = {}
    for e in plan.entries:
        if e.name not in payloads.linear:
            continue
        q = payloads.linear[e.name]
        rel_w, rel_out = relative_errors(weights[e.name], dequantized(payloads, e.name), hessians[e.name])
        rows[e.name] = {"shape": list(e.shape), "method": e.algorithm, "kind": e.kind, "bits": e.config.bits,
                        "bpw": bpw(q), "bpw_paper": e.bpw("paper"), "rel_weight_error": rel_w,
                        "rel_output_error": rel_out, "config": e.config.to_json(),
                        **({"proxy_coarse": e.reasons["P_c"], "proxy_fine": e.reasons["P_f"],
                            "proxy_n": e.reasons["n"], "proxy_score": e.reasons["score"],
                            "rank": e.reasons["rank"]} if "P_c" in e.reasons else {})}
    for name, q in payloads.elementwise.items():
        v = np.asarray(vectors[name], np.float32)
        act = (act_sq or {}).get(name)
        act = np.ones(v.size) if act is None else act
        err = weighted_error(v, q.dequantize(), act)
        ref = weighted_error(v, np.zeros_like(v), act)
        rows[name] = {"shape": list(v.shape), "method": "elementwise-codebook", "kind": "elementwise",
                      "bits": q.index_bits, "bpw": bpw(q),
                      "rel_weight_error": float(np.linalg.norm(v - q.dequantize()) / max(np.linalg.norm(v), 1e-30)),
                      "rel_output_error": float(err / max(ref, 1e-30)), "config": plan.elementwise[name].to_json()}
    return rows
