"""Pass: run the chosen algorithm on every planned weight (no graph change).

Reads `state.plan`, `state.algorithm`, the weights and their calibration
Hessians; writes `state.payloads` (and AWQ input scales) and the per-tensor
report: bits, bpw, relative weight error and relative output error on the
calibration data, tr(dW H dW^T) / tr(W H W^T).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from tqdm import tqdm

from rwkvq_onnx.quant import METHODS, AWQResult, bpw
from rwkvq_onnx.quant.hessian import output_error

from .base import PassResult, QuantState


def relative_errors(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> tuple[float, float]:
    """(||dW|| / ||W||, tr(dW H dW^T) / tr(W H W^T))."""
    rel_w = float(np.linalg.norm(w - w_hat) / max(np.linalg.norm(w), 1e-30))
    denom = output_error(w, np.zeros_like(w), h)
    return rel_w, float(output_error(w, w_hat, h) / max(denom, 1e-30))


@dataclass
class QuantizeWeights:
    progress: bool = True
    name: str = "quantize-weights"

    def __call__(self, model: onnx.ModelProto, state: QuantState) -> PassResult:
        result = PassResult(self.name)
        names = [t.weight for t in state.linear if t.weight in state.plan]
        for name in tqdm(names, desc="quantize", unit="tensor", disable=None if self.progress else True):
            entry, alg = state.plan[name], state.algorithm[name]
            method = METHODS[alg]
            w = state.weights[name]
            h = state.stats.hessians[name]
            out = method.quantize(w, h if method.needs_hessian else None, entry.config)
            if isinstance(out, AWQResult):
                state.input_scales[name] = out.input_scale
                w_hat, out = out.dequantize(), out.quantized
            else:
                w_hat = out.dequantize()
            state.payloads[name] = out
            rel_w, rel_out = relative_errors(w, w_hat, h)
            state.report[name].update(method=alg, kind=entry.method, bits=entry.config.bits, bpw=bpw(out),
                                      proxy_score=entry.score, rel_weight_error=rel_w, rel_output_error=rel_out,
                                      config=entry.config.to_json())
            result.count(alg)
        return result
