"""Pass: vector payloads into the graph.

    MatMul(x, W) -> rwkvq.VQMatMul(x, codes, codebooks, scales)

Inputs and attributes come from `rwkvq_onnx.opspec.vq_matmul.pack`; the
constants are named after the weight (W_codes, W_codebooks, W_scales). In
float16 graphs the op runs in float32 between two Casts.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from rwkvq_onnx.names import DOMAIN, OPSET_VERSION
from rwkvq_onnx.opspec import vq_matmul
from rwkvq_onnx.quant import VectorQuantized
from rwkvq_onnx.quant.formats import Payloads

from .base import Pass, PassResult, float32_op_nodes, is_float16, replace_nodes, weight_matmuls


class RewriteVector(Pass):
    name = "rewrite-vector"
    requires = ("vector",)
    domains = {DOMAIN: OPSET_VERSION}
    phrases = {"vq_matmul": "rewrote {n} MatMuls to " + vq_matmul.QUALIFIED}

    def run(self, graph: gs.Graph, payloads: Payloads) -> PassResult:
        result = PassResult(self.name, phrases=self.phrases)
        targets = {n: q for n, q in payloads.linear.items() if isinstance(q, VectorQuantized)}
        replacements = []
        for node, w in weight_matmuls(graph, targets):
            arrays, attrs = vq_matmul.pack(targets[w])
            inputs = [gs.Constant(f"{w}_{key}", arrays[key]) for key in vq_matmul.INPUTS[1:]]
            nodes = float32_op_nodes(vq_matmul.OP_TYPE, DOMAIN, node.name, attrs.as_dict(), node.inputs[0], inputs,
                                     list(node.outputs), w, is_float16(node.inputs[1]))
            replacements.append((node, nodes))
            result.count("vq_matmul")
        replace_nodes(graph, replacements)
        return result
