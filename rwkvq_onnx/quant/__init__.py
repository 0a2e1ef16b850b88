"""Quantization: policy (proxies, plans) and algorithms, pure functions on arrays, no ONNX.

Each algorithm is a config dataclass plus one function `fn(w, h, cfg)`, listed
in `METHODS` (explicit registry). `w` is a weight in `nn.Linear` layout
[N out, K in]; `h` is the calibration Hessian 2/n X^T X [K, K] (unused by
RTN and k-means VQ). `policy` decides a `Plan` (weight -> algorithm and
config); `apply.apply_plan` turns a plan, weights and statistics into
`Payloads`, which `rwkvq_onnx.passes` lowers into the graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .configs import AWQConfig, ElementwiseConfig, GPTQConfig, ScalarConfig, VQConfig
from .elementwise import elementwise_quantize
from .formats import ElementwiseQuantized, Payloads, ScalarQuantized, VectorQuantized, bpw, model_bpw, total_bits
from .plan import Plan, PlanEntry
from .proxy import ProxyValues, coarse_proxy, fine_proxy, proxies
from .scalar import AWQResult, awq_quantize, gptq_quantize, rtn_quantize
from .vector import gptvq_quantize, kmeans_vq_quantize


@dataclass(frozen=True)
class Method:
    name: str
    config: type
    quantize: Callable
    kind: str  # "sq" | "vq"
    needs_hessian: bool


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("rtn", ScalarConfig, rtn_quantize, "sq", False),
    Method("gptq", GPTQConfig, gptq_quantize, "sq", True),
    Method("awq", AWQConfig, awq_quantize, "sq", True),
    Method("kmeans", VQConfig, kmeans_vq_quantize, "vq", False),
    Method("gptvq", VQConfig, gptvq_quantize, "vq", True),
)}

__all__ = [
    "METHODS", "Method", "ScalarConfig", "GPTQConfig", "AWQConfig", "VQConfig", "ElementwiseConfig",
    "ScalarQuantized", "VectorQuantized", "ElementwiseQuantized", "Payloads", "AWQResult", "rtn_quantize",
    "gptq_quantize", "awq_quantize", "kmeans_vq_quantize", "gptvq_quantize", "elementwise_quantize",
    "coarse_proxy", "fine_proxy", "proxies", "ProxyValues", "Plan", "PlanEntry", "bpw", "total_bits", "model_bpw",
]
