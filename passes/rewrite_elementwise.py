"""Pass: element-wise codebook payloads into the graph.

    Mul(a, v) -> rwkvq.VQElementwise(a, codes, codebook)        (float32 graphs)
    v         -> decode(codes, codebook) as a constant            (--fold-elementwise, float16 graphs,
                                                                   or v not directly multiplied, e.g. RWKV-6 maa)
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from rwkvq_onnx.names import DOMAIN, OPSET_VERSION
from rwkvq_onnx.opspec import vq_elementwise
from rwkvq_onnx.quant.formats import Payloads

from .base import Pass, PassResult, constants, replace_nodes


class RewriteElementwise(Pass):
    name = "rewrite-elementwise"
    requires = ("elementwise",)
    domains = {DOMAIN: OPSET_VERSION}
    phrases = {"vq_elementwise": "rewrote {n} Muls to " + vq_elementwise.QUALIFIED,
               "folded": "folded {n} decoded vectors into constants"}

    def __init__(self, fold: bool = False) -> None:
        self.fold = fold

    def run(self, graph: gs.Graph, payloads: Payloads) -> PassResult:
        result = PassResult(self.name, phrases=self.phrases)
        found = constants(graph)
        replacements = []
        for name, q in payloads.elementwise.items():
            if name not in found:
                continue
            vector = found[name]
            users = list(vector.outputs)
            direct = len(users) == 1 and users[0].op == "Mul"
            if self.fold or not direct or vector.dtype != np.float32:
                vector.values = q.dequantize().reshape(vector.shape).astype(vector.dtype)
                result.count("folded")
                continue
            mul = users[0]
            arrays, attrs = vq_elementwise.pack(q, shape=tuple(vector.shape))
            inputs = [gs.Constant(f"{name}_{key}", arrays[key]) for key in vq_elementwise.INPUTS[1:]]
            x = mul.inputs[0] if mul.inputs[1] is vector else mul.inputs[1]
            replacements.append((mul, [gs.Node(vq_elementwise.OP_TYPE, mul.name, attrs.as_dict(), [x, *inputs],
                                               list(mul.outputs), domain=DOMAIN)]))
            result.count("vq_elementwise")
        replace_nodes(graph, replacements)
        return result
