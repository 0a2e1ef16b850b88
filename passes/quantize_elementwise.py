"""Pass: activation-weighted codebooks for the element-wise multiplication vectors (no graph change)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from rwkvq_onnx.graph import get_initializer
from rwkvq_onnx.quant import ElementwiseConfig, bpw, elementwise_quantize
from rwkvq_onnx.quant.elementwise import weighted_error

from .base import PassResult, QuantState


@dataclass
class QuantizeElementwise:
    config: ElementwiseConfig = ElementwiseConfig()
    name: str = "quantize-elementwise"

    def __call__(self, model: onnx.ModelProto, state: QuantState) -> PassResult:
        result = PassResult(self.name)
        for t in state.elementwise:
            v = get_initializer(model, t.vector)
            act = state.stats.act_sq[t.vector]
            q = elementwise_quantize(v, act, self.config)
            state.elementwise_payloads[t.vector] = q
            err = weighted_error(v, q.dequantize(), act)
            ref = weighted_error(v, np.zeros_like(v), act)
            state.report[t.vector] = {"shape": list(v.shape), "method": "elementwise-codebook", "kind": "elementwise",
                                      "bits": self.config.bits, "bpw": bpw(q),
                                      "rel_weight_error": float(np.linalg.norm(v - q.dequantize())
                                                                / max(np.linalg.norm(v), 1e-30)),
                                      "rel_output_error": float(err / max(ref, 1e-30)),
                                      "config": self.config.to_json()}
            result.count("vectors")
        return result
